//! The scale-out backend: PostgreSQL, shared by many stateless vault
//! replicas. Every statement is parameterised; the schema is created by
//! versioned migrations at start-up; an operation's writes (record, index,
//! audit record) commit together, in one transaction.
//!
//! The audit chain stays a single chain under concurrent writers from
//! several replicas because every append locks the one `audit_head` row
//! (`SELECT ... FOR UPDATE`) inside the transaction that writes the record.
//! Serialisation failures and deadlocks (SQLSTATE 40001 / 40P01), which
//! wire-compatible distributed engines report for contention, are retried.
//!
//! That lock makes every audited operation queue on one row for a whole
//! commit (a WAL flush), so each replica group-commits its writes: a task
//! takes every operation waiting and runs them in one transaction, with
//! one lock of the head and one flush (`Committer`). Audit-only appends
//! (detokenize, metadata, denials) and record writes (tokenize, delete)
//! have a committer each, so a batch of record writes does not hold up
//! card reads. Within a batch the jobs' statements are pipelined on the
//! one connection, and hot statements are prepared once per connection.
//!
//! Text keys use the `"C"` collation so ordering is bytewise, as in sled.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::join_all;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::{AuditLink, BucketCard, InsertOutcome, Store, StoredRecord};
use crate::audit::{AuditBody, AuditRecord, Checkpoint};
use crate::error::{Error, Result};

/// Schema migrations, applied in order, each exactly once (recorded in
/// `cardvault_migrations`). Never edit a shipped migration; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r#"
    CREATE TABLE records (
        tenant TEXT COLLATE "C" NOT NULL,
        token TEXT COLLATE "C" NOT NULL,
        key_version INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (tenant, token)
    );
    CREATE INDEX records_by_key_version ON records (tenant, key_version);
    CREATE TABLE fingerprints (
        tenant TEXT COLLATE "C" NOT NULL,
        fingerprint BYTEA NOT NULL,
        token TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (tenant, fingerprint)
    );
    CREATE TABLE vault_keys (
        name TEXT COLLATE "C" PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        record BYTEA NOT NULL
    );
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash BYTEA NOT NULL
    );
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');
    CREATE TABLE audit_checkpoints (
        seq BIGINT PRIMARY KEY,
        checkpoint BYTEA NOT NULL
    );
    "#,
    // 2: enumeration-guard state, shared by every replica.
    r#"
    CREATE TABLE enumeration_guard (
        tenant TEXT COLLATE "C" NOT NULL,
        bucket BYTEA NOT NULL,
        state BYTEA NOT NULL,
        PRIMARY KEY (tenant, bucket)
    );
    "#,
    // 3: each tenant's audit records numbered in chain order, indexed, for
    // the tenant view. `tenant` is NULL on records written before, until
    // `index_old_audit_records` fills it in ('' for a record of no tenant,
    // which gets no number).
    r#"
    ALTER TABLE audit_log ADD COLUMN tenant TEXT COLLATE "C";
    ALTER TABLE audit_log ADD COLUMN tenant_seq BIGINT;
    CREATE UNIQUE INDEX audit_log_by_tenant ON audit_log (tenant, tenant_seq)
        WHERE tenant_seq IS NOT NULL;
    CREATE INDEX audit_log_unindexed ON audit_log (seq) WHERE tenant IS NULL;
    "#,
    // 4: each card's enumeration-guard bucket in the fingerprint index, so
    // the guard can tell a bucket's first card without state of its own.
    // NULL for entries written before.
    r#"
    ALTER TABLE fingerprints ADD COLUMN bucket BYTEA;
    CREATE INDEX fingerprints_by_bucket ON fingerprints (tenant, bucket)
        WHERE bucket IS NOT NULL;
    "#,
];

/// How many times a transaction is retried on a serialisation failure.
const RETRIES: usize = 8;

/// Most operations one group commit runs.
const BATCH: usize = 512;

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    /// Connection pool; each operation borrows one connection.
    pool: Pool,
    /// Audit-only appends, for their group-commit task.
    audits: mpsc::UnboundedSender<Queued>,
    /// Record writes with their audit records, for theirs.
    writes: mpsc::UnboundedSender<Queued>,
}

/// An operation for a group commit.
enum Job {
    /// Append an audit record.
    Audit(AuditBody),
    /// [`Store::insert`].
    Insert {
        record: StoredRecord,
        dedupe: bool,
        audit: AuditBody,
    },
    /// [`Store::delete`].
    Delete {
        tenant: String,
        token: String,
        audit: AuditBody,
    },
}

/// What a job did, once its batch committed.
#[derive(Debug, Clone)]
enum Done {
    Audit(AuditLink),
    Insert(InsertOutcome),
    Delete(bool, AuditLink),
    /// This job alone failed (e.g. a stored record it had to read does not
    /// decode); the rest of its batch went on and committed.
    Failed(Error),
}

/// A job waiting for its group commit, and who to tell.
type Queued = (Job, oneshot::Sender<Result<Done>>);

/// Group commit: takes every job waiting (up to [`BATCH`]) and runs them in
/// order in one transaction, whose audit records are appended at its end
/// with one lock of the `audit_head` row; so the row is locked, and the WAL
/// flushed, once per batch rather than once per operation. Jobs queue
/// while a batch commits, so batches grow with the load. A batch that
/// fails fails all its jobs (none of them happened); one that hits a
/// serialisation failure or deadlock is run again whole.
struct Committer {
    pool: Pool,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("storage (postgres): {e}"))
}

fn pg(e: tokio_postgres::Error) -> Error {
    // The server's message names the failing constraint or connection
    // problem; values never include a PAN (the database never sees one).
    match e.as_db_error() {
        Some(db) => unavailable(format!("{} ({})", db.message(), db.code().code())),
        // "error connecting to server" alone hides the cause (refused,
        // timed out, authentication failed): give the whole chain.
        None => unavailable(crate::error::with_causes(&e)),
    }
}

/// A pool error with its causes (a connection that could not be made says
/// why only in its source).
fn pool(e: deadpool_postgres::PoolError) -> Error {
    unavailable(crate::error::with_causes(&e))
}

/// Contention errors a transaction should simply be run again for.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// The error a failed batch reports, out of its statements' errors: the
/// one that failed the transaction, not the "transaction is aborted" that
/// statements pipelined after it get (so that a deadlock or serialisation
/// failure is recognised and retried, and the message names the cause).
fn first_cause(errors: Vec<TxError>) -> Option<TxError> {
    let aborted = |e: &TxError| matches!(e, TxError::Pg(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    let cause = errors.iter().position(|e| !aborted(e)).unwrap_or(0);
    errors.into_iter().nth(cause)
}

/// A group commit answered a job with another kind's result: a bug.
fn mismatch(done: &Done) -> Error {
    // The kind only: a record's fields have no place in an error.
    let kind = match done {
        Done::Audit(_) => "audit",
        Done::Insert(_) => "insert",
        Done::Delete(..) => "delete",
        Done::Failed(_) => "failure",
    };
    Error::Internal(format!(
        "group commit answered with a result of kind {kind}"
    ))
}

fn decode(bytes: &[u8]) -> Result<StoredRecord> {
    StoredRecord::decode(bytes)
        .map_err(|_| Error::DataLoss("stored record could not be decoded".into()))
}

/// A transaction body's error: either ours or the driver's (kept so that
/// serialisation failures can be recognised and retried).
enum TxError {
    Pg(tokio_postgres::Error),
    Vault(Error),
    /// Fails only the job it came from: nothing went wrong in the
    /// transaction (the job undoes what it wrote), so the other jobs of its
    /// batch, other tenants' included, are not failed with it.
    Job(Error),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

/// [`Store::insert`]'s record statements inside `tx`: `None` when the
/// record was inserted (its audit record is still to be appended), else
/// the outcome.
async fn insert_in(
    tx: &Transaction<'_>,
    record: &StoredRecord,
    dedupe: bool,
) -> std::result::Result<Option<InsertOutcome>, TxError> {
    let select_record = tx
        .prepare_cached("SELECT data FROM records WHERE tenant = $1 AND token = $2")
        .await?;
    let select_index = tx
        .prepare_cached("SELECT token FROM fingerprints WHERE tenant = $1 AND fingerprint = $2")
        .await?;
    let existing = |tok: String| {
        let (tx, select_record) = (&tx, &select_record);
        async move {
            tx.query_opt(select_record, &[&record.tenant, &tok])
                .await
                .map(|r| r.map(|r| r.get::<_, Vec<u8>>(0)))
        }
    };
    let indexed = match tx
        .query_opt(&select_index, &[&record.tenant, &record.fingerprint])
        .await?
    {
        Some(row) => existing(row.get(0)).await?,
        None => None,
    };
    if dedupe && let Some(bytes) = indexed {
        return Ok(Some(InsertOutcome::Deduplicated(
            decode(&bytes).map_err(TxError::Job)?,
        )));
    }
    let insert_record = tx
        .prepare_cached(
            "INSERT INTO records (tenant, token, key_version, data) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    let version = record.key_version as i32;
    let data = record.encode_to_vec();
    let inserted = tx
        .execute(
            &insert_record,
            &[&record.tenant, &record.token, &version, &data],
        )
        .await?;
    if inserted == 0 {
        return Ok(Some(InsertOutcome::TokenTaken));
    }
    let insert_index = tx
        .prepare_cached(
            "INSERT INTO fingerprints (tenant, fingerprint, token, bucket) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    let bucket = (!record.bucket.is_empty()).then_some(record.bucket.as_slice());
    let indexed_now = tx
        .execute(
            &insert_index,
            &[&record.tenant, &record.fingerprint, &record.token, &bucket],
        )
        .await?;
    if indexed_now == 0 && dedupe {
        // Another transaction (or an earlier job of this batch) indexed
        // this PAN first (we waited for it on the unique index): adopt its
        // token, drop ours. A concurrent delete may remove that token's
        // record and entry at any point here, and an entry may name a token
        // whose record is gone: then ours takes the entry's place instead,
        // so the card never stays unindexed (and a later dedupe never makes
        // a second token for it). Each pass loses only to another writer.
        let take_over = tx
            .prepare_cached(
                "UPDATE fingerprints SET token = $3
                 WHERE tenant = $1 AND fingerprint = $2 AND token = $4",
            )
            .await?;
        for _ in 0..3 {
            let indexed = tx
                .query_opt(&select_index, &[&record.tenant, &record.fingerprint])
                .await?;
            let placed = match indexed {
                Some(row) => {
                    let theirs: String = row.get(0);
                    if let Some(bytes) = existing(theirs.clone()).await? {
                        let delete = tx
                            .prepare_cached("DELETE FROM records WHERE tenant = $1 AND token = $2")
                            .await?;
                        tx.execute(&delete, &[&record.tenant, &record.token])
                            .await?;
                        // Our record is gone again, so failing just this
                        // job is clean.
                        return Ok(Some(InsertOutcome::Deduplicated(
                            decode(&bytes).map_err(TxError::Job)?,
                        )));
                    }
                    let args: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                        [&record.tenant, &record.fingerprint, &record.token, &theirs];
                    tx.execute(&take_over, &args).await?
                }
                None => {
                    tx.execute(
                        &insert_index,
                        &[&record.tenant, &record.fingerprint, &record.token, &bucket],
                    )
                    .await?
                }
            };
            if placed == 1 {
                break;
            }
        }
    }
    Ok(None)
}

/// [`Store::delete`]'s record statements inside `tx`: whether the record
/// existed.
async fn delete_in(
    tx: &Transaction<'_>,
    tenant: &str,
    token: &str,
) -> std::result::Result<bool, TxError> {
    let delete = tx
        .prepare_cached("DELETE FROM records WHERE tenant = $1 AND token = $2 RETURNING data")
        .await?;
    let old = tx.query_opt(&delete, &[&tenant, &token]).await?;
    if let Some(row) = &old {
        match StoredRecord::decode(row.get::<_, Vec<u8>>(0).as_slice()) {
            Ok(rec) => {
                let unindex = tx
                    .prepare_cached(
                        "DELETE FROM fingerprints WHERE tenant = $1 AND fingerprint = $2 AND token = $3",
                    )
                    .await?;
                tx.execute(&unindex, &[&tenant, &rec.fingerprint, &token])
                    .await?;
            }
            // Its fingerprint is unreadable: find its entry by token (a
            // scan of the tenant's entries; only for a damaged record), so
            // no entry is left naming a token that is gone.
            Err(_) => {
                let unindex = tx
                    .prepare_cached("DELETE FROM fingerprints WHERE tenant = $1 AND token = $2")
                    .await?;
                tx.execute(&unindex, &[&tenant, &token]).await?;
            }
        }
    }
    Ok(old.is_some())
}

/// Appends `bodies` in order to the chain inside `tx`, with one lock of
/// the head row, one insert and one head update.
async fn append_many(
    tx: &Transaction<'_>,
    bodies: &[&AuditBody],
) -> std::result::Result<Vec<AuditLink>, TxError> {
    // A batch whose inserts all found their token taken or deduplicated
    // has nothing to append, and need not queue for the head.
    if bodies.is_empty() {
        return Ok(Vec::new());
    }
    let lock = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        .await?;
    let row = tx.query_one(&lock, &[]).await?;
    let (seq, hash): (i64, Vec<u8>) = (row.get(0), row.get(1));
    let (mut seq, mut hash) = (seq as u64, hash);
    let mut seqs = Vec::with_capacity(bodies.len());
    let mut tenants = Vec::with_capacity(bodies.len());
    let mut records = Vec::with_capacity(bodies.len());
    let mut links = Vec::with_capacity(bodies.len());
    for body in bodies {
        let rec = AuditRecord::next(seq, &hash, body.encode_to_vec());
        seqs.push(rec.seq as i64);
        tenants.push(body.tenant.as_str());
        records.push(rec.encode_to_vec());
        (seq, hash) = (rec.seq, rec.hash.clone());
        links.push(AuditLink {
            seq: rec.seq,
            hash: rec.hash,
        });
    }
    // Each tenant's records are numbered on from its highest number (one
    // index lookup per tenant in the batch), under the head lock like the
    // seqs, so the numbers follow chain order without gaps.
    let insert = tx
        .prepare_cached(
            "WITH n AS (
                SELECT * FROM unnest($1::BIGINT[], $2::BYTEA[], $3::TEXT[]) AS n(seq, record, tenant)
            ), top AS (
                SELECT t.tenant, COALESCE((
                    SELECT max(a.tenant_seq) FROM audit_log a
                    WHERE a.tenant = t.tenant AND a.tenant_seq IS NOT NULL
                ), 0) AS top
                FROM (SELECT DISTINCT tenant FROM n WHERE tenant <> '') t
            )
            INSERT INTO audit_log (seq, record, tenant, tenant_seq)
            SELECT n.seq, n.record, n.tenant,
                CASE WHEN n.tenant = '' THEN NULL
                ELSE top.top + row_number() OVER (PARTITION BY n.tenant ORDER BY n.seq) END
            FROM n LEFT JOIN top ON top.tenant = n.tenant",
        )
        .await?;
    let head = tx
        .prepare_cached("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .await?;
    // Pipelined: one round trip while the head is locked.
    let last = seq as i64;
    let rows: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&seqs, &records, &tenants];
    let new_head: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&last, &hash];
    let (inserted, moved) = tokio::join!(tx.execute(&insert, &rows), tx.execute(&head, &new_head));
    let failed = [inserted.err(), moved.err()].into_iter().flatten();
    match first_cause(failed.map(TxError::Pg).collect()) {
        Some(e) => Err(e),
        None => Ok(links),
    }
}

/// Runs `body` in a transaction, committing on success and retrying on
/// serialisation failures.
macro_rules! transaction {
    ($self:ident, |$tx:ident| $body:block) => {{
        let mut attempt = 0;
        loop {
            let mut client = $self.pool.get().await.map_err(pool)?;
            let $tx = client.transaction().await.map_err(pg)?;
            let result: std::result::Result<_, TxError> = async { $body }.await;
            let result = match result {
                Ok(v) => $tx.commit().await.map(|_| v).map_err(TxError::Pg),
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => break Ok(v),
                Err(TxError::Pg(e)) if attempt < RETRIES && retryable(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(2 << attempt.min(6))).await;
                }
                Err(TxError::Pg(e)) => break Err(pg(e)),
                Err(TxError::Vault(e) | TxError::Job(e)) => break Err(e),
            }
        }
    }};
}

impl Committer {
    /// Runs until the store (the last sender) is dropped.
    async fn run(self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        let mut batch = Vec::with_capacity(BATCH);
        while queue.recv_many(&mut batch, BATCH).await > 0 {
            let jobs: Vec<&Job> = batch.iter().map(|(j, _)| j).collect();
            let result = self.commit(&jobs).await;
            for (i, (_, reply)) in batch.drain(..).enumerate() {
                // A caller that went away (cancelled request) needs no answer.
                let _ = reply.send(match &result {
                    Ok(done) => Ok(done[i].clone()),
                    Err(e) => Err(e.clone()),
                });
            }
        }
    }

    async fn commit(&self, jobs: &[&Job]) -> Result<Vec<Done>> {
        transaction!(self, |tx| {
            // The jobs' record statements run concurrently, so the
            // connection pipelines them: a batch costs a few round trips,
            // not a few per job. Interleaved in one transaction they still
            // behave like concurrent transactions would (a dedupe that
            // finds the fingerprint indexed by another job adopts its
            // token). Then every audit record, in job order, under one
            // lock of the head.
            let results = join_all(jobs.iter().map(|job| {
                let tx = &tx;
                async move {
                    Ok::<_, TxError>(match job {
                        Job::Audit(audit) => Step::Audited(audit),
                        Job::Insert {
                            record,
                            dedupe,
                            audit,
                        } => match insert_in(tx, record, *dedupe).await? {
                            None => Step::Audited(audit),
                            Some(outcome) => Step::Done(Done::Insert(outcome)),
                        },
                        Job::Delete {
                            tenant,
                            token,
                            audit,
                        } => Step::Deleted(delete_in(tx, tenant, token).await?, audit),
                    })
                }
            }))
            .await;
            let mut steps = Vec::with_capacity(results.len());
            let mut failed = Vec::new();
            for result in results {
                match result {
                    Ok(step) => steps.push(step),
                    Err(TxError::Job(e)) => steps.push(Step::Done(Done::Failed(e))),
                    Err(e) => failed.push(e),
                }
            }
            if let Some(e) = first_cause(failed) {
                return Err(e);
            }
            let bodies: Vec<&AuditBody> = steps
                .iter()
                .filter_map(|step| match step {
                    Step::Audited(audit) | Step::Deleted(_, audit) => Some(*audit),
                    Step::Done(_) => None,
                })
                .collect();
            let mut links = append_many(&tx, &bodies).await?.into_iter();
            let mut link = || {
                links
                    .next()
                    .ok_or_else(|| TxError::Vault(Error::Internal("audit link missing".into())))
            };
            let mut done = Vec::with_capacity(steps.len());
            for (job, step) in jobs.iter().zip(steps) {
                done.push(match (job, step) {
                    (_, Step::Done(d)) => d,
                    (Job::Audit(_), _) => Done::Audit(link()?),
                    (_, Step::Deleted(existed, _)) => Done::Delete(existed, link()?),
                    (_, Step::Audited(_)) => Done::Insert(InsertOutcome::Inserted(link()?)),
                });
            }
            Ok(done)
        })
    }
}

/// A job's state between its record statements and the audit append.
// One per job of a batch, for the length of one transaction: the size of
// a deduplicated record inline costs less than an allocation per job.
#[allow(clippy::large_enum_variant)]
enum Step<'a> {
    /// Needs this audit record.
    Audited(&'a AuditBody),
    /// A delete (whether the record existed) that needs this audit record.
    Deleted(bool, &'a AuditBody),
    /// Finished without an audit record of its own.
    Done(Done),
}

/// Longest a new database connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a call waits for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Longest sent data may stay unacknowledged before the connection is
/// taken for dead (TCP_USER_TIMEOUT). A slow query is not cut by it: its
/// request was acknowledged.
const DEAD_PEER: Duration = Duration::from_secs(30);

/// A database that stops answering (a partition that drops packets
/// without a reset) must fail calls with UNAVAILABLE, not hang them and
/// every call queued behind them: bounded connects, and dead-peer
/// detection on open connections. A value the connection string sets wins.
fn with_timeouts(cfg: &mut tokio_postgres::Config) {
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(DEAD_PEER);
    }
    // Idle connections in the pool: probe after a minute, not two hours.
    if cfg.get_keepalives_idle() == Duration::from_secs(2 * 3600) {
        cfg.keepalives_idle(Duration::from_secs(60));
    }
}

impl PostgresStore {
    /// Connects (`url` is a libpq-style connection string or URL) with a
    /// pool of `pool_size` connections and applies pending migrations.
    /// `tls` is an optional rustls client configuration for the database.
    pub async fn connect(
        url: &str,
        pool_size: usize,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<PostgresStore> {
        let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::invalid(
                "store.url",
                format!("not a valid PostgreSQL connection string: {e}"),
            )
        })?;
        with_timeouts(&mut cfg);
        if tls.is_some() {
            // tokio-postgres defaults to `prefer`: a server (or anyone in
            // the path) answering "no TLS" would get the password and the
            // traffic in clear. With a CA configured, TLS is required.
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match tls {
            None => Manager::from_config(cfg, NoTls, mgr_cfg),
            Some(c) => Manager::from_config(
                cfg,
                tokio_postgres_rustls::MakeRustlsConnect::new(c),
                mgr_cfg,
            ),
        };
        let pool = Pool::builder(mgr)
            .max_size(pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(unavailable)?;
        let (audits, audit_jobs) = mpsc::unbounded_channel();
        let (writes, write_jobs) = mpsc::unbounded_channel();
        let store = PostgresStore {
            pool,
            audits,
            writes,
        };
        store.migrate().await?;
        store.index_old_audit_records().await?;
        for jobs in [audit_jobs, write_jobs] {
            let committer = Committer {
                pool: store.pool.clone(),
            };
            tokio::spawn(committer.run(jobs));
        }
        Ok(store)
    }

    /// Hands `job` to a group-commit task and waits for its batch.
    async fn queue(&self, to: &mpsc::UnboundedSender<Queued>, job: Job) -> Result<Done> {
        let (reply, done) = oneshot::channel();
        let stopped = || unavailable("group commit stopped");
        to.send((job, reply)).map_err(|_| stopped())?;
        match done.await.map_err(|_| stopped())?? {
            Done::Failed(e) => Err(e),
            done => Ok(done),
        }
    }

    /// Applies every migration not yet recorded. Safe to run from several
    /// replicas at once: the version row is claimed in the same transaction
    /// as the DDL, so a concurrent starter waits, then sees it applied.
    async fn migrate(&self) -> Result<()> {
        let client = self.pool.get().await.map_err(pool)?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS cardvault_migrations (
                    version INTEGER PRIMARY KEY,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
            )
            .await
            .or_else(|e| {
                // Two replicas creating the table at once: one loses the race
                // on the catalog (reported as one of these codes); the table
                // exists either way.
                let raced = [
                    SqlState::UNIQUE_VIOLATION,
                    SqlState::DUPLICATE_OBJECT,
                    SqlState::DUPLICATE_TABLE,
                ];
                if e.code().is_some_and(|c| raced.contains(c)) {
                    Ok(())
                } else {
                    Err(pg(e))
                }
            })?;
        drop(client);
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = (i + 1) as i32;
            transaction!(self, |tx| {
                let claimed = tx
                    .execute(
                        "INSERT INTO cardvault_migrations (version) VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&version],
                    )
                    .await?;
                if claimed == 1 {
                    tx.batch_execute(sql).await?;
                    tracing::info!(version, "applied PostgreSQL migration");
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

impl PostgresStore {
    /// Numbers the audit records written before the tenant view existed
    /// (or by a replica of an older version during a rolling upgrade):
    /// those whose `tenant` is still NULL. A page at a time, each under the
    /// head lock, so that no append numbers a tenant's record meanwhile.
    async fn index_old_audit_records(&self) -> Result<()> {
        const PAGE: i64 = 5000;
        let mut indexed = 0u64;
        loop {
            let done = transaction!(self, |tx| {
                tx.query_one("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE", &[])
                    .await?;
                let rows = tx
                    .query(
                        "SELECT seq, record FROM audit_log WHERE tenant IS NULL ORDER BY seq LIMIT $1",
                        &[&PAGE],
                    )
                    .await?;
                if rows.is_empty() {
                    return Ok(true);
                }
                let mut tops: std::collections::HashMap<String, i64> = Default::default();
                let (mut seqs, mut tenants, mut numbers) = (vec![], vec![], vec![]);
                for row in &rows {
                    let seq: i64 = row.get(0);
                    // A record that does not decode names no tenant;
                    // verification reports it.
                    let tenant = AuditRecord::decode(row.get::<_, Vec<u8>>(1).as_slice())
                        .ok()
                        .and_then(|r| r.decode_body())
                        .map(|b| b.tenant)
                        .unwrap_or_default();
                    let number = if tenant.is_empty() {
                        None
                    } else {
                        if !tops.contains_key(&tenant) {
                            let top: Option<i64> = tx
                                .query_one(
                                    "SELECT max(tenant_seq) FROM audit_log
                                     WHERE tenant = $1 AND tenant_seq IS NOT NULL",
                                    &[&tenant],
                                )
                                .await?
                                .get(0);
                            tops.insert(tenant.clone(), top.unwrap_or(0));
                        }
                        let top = tops.get_mut(&tenant).expect("inserted above");
                        *top += 1;
                        Some(*top)
                    };
                    seqs.push(seq);
                    tenants.push(tenant);
                    numbers.push(number);
                }
                tx.execute(
                    "UPDATE audit_log a SET tenant = u.tenant, tenant_seq = u.number
                     FROM unnest($1::BIGINT[], $2::TEXT[], $3::BIGINT[]) AS u(seq, tenant, number)
                     WHERE a.seq = u.seq",
                    &[&seqs, &tenants, &numbers],
                )
                .await?;
                indexed += rows.len() as u64;
                Ok(false)
            })?;
            if done {
                break;
            }
        }
        if indexed > 0 {
            tracing::info!(records = indexed, "numbered old audit records by tenant");
        }
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn insert(
        &self,
        record: &StoredRecord,
        dedupe: bool,
        audit: &AuditBody,
    ) -> Result<InsertOutcome> {
        let job = Job::Insert {
            record: record.clone(),
            dedupe,
            audit: audit.clone(),
        };
        match self.queue(&self.writes, job).await? {
            Done::Insert(outcome) => Ok(outcome),
            other => Err(mismatch(&other)),
        }
    }

    async fn bucket_card(&self, tenant: &str, bucket: &[u8]) -> Result<Option<BucketCard>> {
        let client = self.pool.get().await.map_err(pool)?;
        let select = client
            .prepare_cached(
                "SELECT r.data FROM fingerprints f
                 JOIN records r ON r.tenant = f.tenant AND r.token = f.token
                 WHERE f.tenant = $1 AND f.bucket = $2 LIMIT 1",
            )
            .await
            .map_err(pg)?;
        let row = client
            .query_opt(&select, &[&tenant, &bucket])
            .await
            .map_err(pg)?;
        let Some(row) = row else { return Ok(None) };
        let rec = decode(&row.get::<_, Vec<u8>>(0))?;
        Ok(Some(BucketCard {
            fingerprint: rec.fingerprint,
            created_at_ms: rec.created_at_ms,
        }))
    }

    async fn get(&self, tenant: &str, token: &str) -> Result<Option<StoredRecord>> {
        let client = self.pool.get().await.map_err(pool)?;
        let select = client
            .prepare_cached("SELECT data FROM records WHERE tenant = $1 AND token = $2")
            .await
            .map_err(pg)?;
        let row = client
            .query_opt(&select, &[&tenant, &token])
            .await
            .map_err(pg)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0))).transpose()
    }

    async fn update(&self, current: &StoredRecord, record: &StoredRecord) -> Result<bool> {
        let client = self.pool.get().await.map_err(pool)?;
        let n = client
            .execute(
                "UPDATE records SET key_version = $3, data = $4 \
                 WHERE tenant = $1 AND token = $2 AND data = $5",
                &[
                    &record.tenant,
                    &record.token,
                    &(record.key_version as i32),
                    &record.encode_to_vec(),
                    &current.encode_to_vec(),
                ],
            )
            .await
            .map_err(pg)?;
        Ok(n > 0)
    }

    async fn delete(
        &self,
        tenant: &str,
        token: &str,
        audit: &AuditBody,
    ) -> Result<(bool, AuditLink)> {
        let job = Job::Delete {
            tenant: tenant.to_owned(),
            token: token.to_owned(),
            audit: audit.clone(),
        };
        match self.queue(&self.writes, job).await? {
            Done::Delete(existed, link) => Ok((existed, link)),
            other => Err(mismatch(&other)),
        }
    }

    async fn count(&self, tenant: Option<&str>) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool)?;
        let row = match tenant {
            Some(t) => {
                client
                    .query_one("SELECT count(*) FROM records WHERE tenant = $1", &[&t])
                    .await
            }
            None => client.query_one("SELECT count(*) FROM records", &[]).await,
        }
        .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn get_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let client = self.pool.get().await.map_err(pool)?;
        let row = client
            .query_opt("SELECT value FROM vault_keys WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn put_key_if_absent(&self, name: &str, value: &[u8]) -> Result<Option<Vec<u8>>> {
        transaction!(self, |tx| {
            let n = tx
                .execute(
                    "INSERT INTO vault_keys (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&name, &value],
                )
                .await?;
            if n == 1 {
                return Ok(None);
            }
            let row = tx
                .query_one("SELECT value FROM vault_keys WHERE name = $1", &[&name])
                .await?;
            Ok(Some(row.get(0)))
        })
    }

    async fn guard_get(&self, tenant: &str, bucket: &[u8]) -> Result<Option<Vec<u8>>> {
        let client = self.pool.get().await.map_err(pool)?;
        let row = client
            .query_opt(
                "SELECT state FROM enumeration_guard WHERE tenant = $1 AND bucket = $2",
                &[&tenant, &bucket],
            )
            .await
            .map_err(pg)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn guard_swap(
        &self,
        tenant: &str,
        bucket: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        _durable: bool,
    ) -> Result<bool> {
        // One statement, so no transaction: the row lock of the UPDATE (or
        // the primary key of the INSERT) makes it a compare-and-swap
        // across replicas.
        let client = self.pool.get().await.map_err(pool)?;
        let n = match expected {
            None => client
                .execute(
                    "INSERT INTO enumeration_guard (tenant, bucket, state) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&tenant, &bucket, &value],
                )
                .await
                .map_err(pg)?,
            Some(old) => client
                .execute(
                    "UPDATE enumeration_guard SET state = $3
                     WHERE tenant = $1 AND bucket = $2 AND state = $4",
                    &[&tenant, &bucket, &value, &old],
                )
                .await
                .map_err(pg)?,
        };
        Ok(n == 1)
    }

    async fn guard_clear(&self, tenant: &str, bucket: Option<&[u8]>) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool)?;
        match bucket {
            Some(b) => client
                .execute(
                    "DELETE FROM enumeration_guard WHERE tenant = $1 AND bucket = $2",
                    &[&tenant, &b],
                )
                .await
                .map_err(pg),
            None => client
                .execute(
                    "DELETE FROM enumeration_guard WHERE tenant = $1",
                    &[&tenant],
                )
                .await
                .map_err(pg),
        }
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let client = self.pool.get().await.map_err(pool)?;
        // substr rather than LIKE: a prefix may contain '%' or '_'.
        let rows = client
            .query(
                "SELECT name, value FROM vault_keys WHERE substr(name, 1, char_length($1)) = $1 ORDER BY name",
                &[&prefix],
            )
            .await
            .map_err(pg)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn put_keys(&self, entries: &[(String, Vec<u8>)]) -> Result<()> {
        transaction!(self, |tx| {
            for (name, value) in entries {
                tx.execute(
                    "INSERT INTO vault_keys (name, value) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                    &[name, value],
                )
                .await?;
            }
            Ok(())
        })
    }

    async fn delete_key(&self, name: &str) -> Result<()> {
        let client = self.pool.get().await.map_err(pool)?;
        client
            .execute("DELETE FROM vault_keys WHERE name = $1", &[&name])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn scan_records(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        let client = self.pool.get().await.map_err(pool)?;
        let limit = limit as i64;
        let rows = match after {
            Some((tenant, token)) => {
                client
                    .query(
                        "SELECT data FROM records WHERE (tenant, token) > ($1, $2)
                         ORDER BY tenant, token LIMIT $3",
                        &[&tenant, &token, &limit],
                    )
                    .await
            }
            None => {
                client
                    .query(
                        "SELECT data FROM records ORDER BY tenant, token LIMIT $1",
                        &[&limit],
                    )
                    .await
            }
        }
        .map_err(pg)?;
        rows.iter()
            .map(|r| decode(&r.get::<_, Vec<u8>>(0)))
            .collect()
    }

    async fn append_audit(&self, audit: &AuditBody) -> Result<AuditLink> {
        match self.queue(&self.audits, Job::Audit(audit.clone())).await? {
            Done::Audit(link) => Ok(link),
            other => Err(mismatch(&other)),
        }
    }

    async fn audit_head(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let client = self.pool.get().await.map_err(pool)?;
        let row = client
            .query_one("SELECT seq, hash FROM audit_head WHERE id = 1", &[])
            .await
            .map_err(pg)?;
        let seq: i64 = row.get(0);
        Ok((seq > 0).then(|| (seq as u64, row.get(1))))
    }

    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        let client = self.pool.get().await.map_err(pool)?;
        let rows = client
            .query(
                "SELECT seq, record FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&(after_seq.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                // Storage damage, told apart from tampering (which decodes
                // but breaks the chain).
                let rec = AuditRecord::decode(r.get::<_, Vec<u8>>(1).as_slice()).map_err(|_| {
                    Error::DataLoss(format!("audit record {seq} cannot be decoded"))
                })?;
                Ok((seq as u64, rec))
            })
            .collect()
    }

    async fn tenant_audit_records(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord)>> {
        let client = self.pool.get().await.map_err(pool)?;
        let rows = client
            .query(
                "SELECT tenant_seq, record FROM audit_log
                 WHERE tenant = $1 AND tenant_seq > $2 ORDER BY tenant_seq LIMIT $3",
                &[
                    &tenant,
                    &(after.min(i64::MAX as u64) as i64),
                    &(limit as i64),
                ],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let number: i64 = r.get(0);
                let rec = AuditRecord::decode(r.get::<_, Vec<u8>>(1).as_slice()).map_err(|_| {
                    Error::DataLoss(format!(
                        "audit record {number} of tenant {tenant} cannot be decoded"
                    ))
                })?;
                Ok((number as u64, rec))
            })
            .collect()
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        let client = self.pool.get().await.map_err(pool)?;
        client
            .execute(
                "INSERT INTO audit_checkpoints (seq, checkpoint) VALUES ($1, $2)
                 ON CONFLICT (seq) DO UPDATE SET checkpoint = EXCLUDED.checkpoint",
                &[&(checkpoint.seq as i64), &checkpoint.encode_to_vec()],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let client = self.pool.get().await.map_err(pool)?;
        let rows = client
            .query("SELECT checkpoint FROM audit_checkpoints ORDER BY seq", &[])
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Checkpoint::decode(r.get::<_, Vec<u8>>(0).as_slice())
                    .map_err(|_| Error::DataLoss("audit checkpoint is corrupt".into()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_set_unless_the_connection_string_sets_them() {
        let mut cfg: tokio_postgres::Config = "host=db user=v".parse().unwrap();
        with_timeouts(&mut cfg);
        assert_eq!(cfg.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&DEAD_PEER));
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(60));
        let mut cfg: tokio_postgres::Config = "host=db user=v connect_timeout=3 keepalives_idle=5"
            .parse()
            .unwrap();
        with_timeouts(&mut cfg);
        assert_eq!(cfg.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(5));
    }
}
