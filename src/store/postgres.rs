//! The scale-out backend: PostgreSQL, shared by many stateless vault
//! replicas. Every statement is parameterised; the schema is created by
//! versioned migrations at start-up; each operation is one transaction.
//!
//! The audit chain stays a single chain under concurrent writers from
//! several replicas because every append locks the one `audit_head` row
//! (`SELECT ... FOR UPDATE`) inside the transaction that writes the record.
//! Serialisation failures and deadlocks (SQLSTATE 40001 / 40P01), which
//! wire-compatible distributed engines report for contention, are retried.
//!
//! Text keys use the `"C"` collation so ordering is bytewise, as in sled.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use prost::Message;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Transaction};

use super::{AuditLink, InsertOutcome, Store, StoredRecord};
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
];

/// How many times a transaction is retried on a serialisation failure.
const RETRIES: usize = 8;

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    /// Connection pool; each operation borrows one connection.
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
        None => unavailable(e),
    }
}

/// Contention errors a transaction should simply be run again for.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
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
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

/// Appends `body` to the chain inside `tx`, locking the head row so that
/// concurrent writers (other connections, other replicas) queue up.
async fn append(tx: &Transaction<'_>, body: &AuditBody) -> std::result::Result<AuditLink, TxError> {
    let row = tx
        .query_one(
            "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let (seq, hash): (i64, Vec<u8>) = (row.get(0), row.get(1));
    let rec = AuditRecord::next(seq as u64, &hash, body.encode_to_vec());
    tx.execute(
        "INSERT INTO audit_log (seq, record) VALUES ($1, $2)",
        &[&(rec.seq as i64), &rec.encode_to_vec()],
    )
    .await?;
    tx.execute(
        "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
        &[&(rec.seq as i64), &rec.hash],
    )
    .await?;
    Ok(AuditLink {
        seq: rec.seq,
        hash: rec.hash,
    })
}

/// Runs `body` in a transaction, committing on success and retrying on
/// serialisation failures.
macro_rules! transaction {
    ($self:ident, |$tx:ident| $body:block) => {{
        let mut attempt = 0;
        loop {
            let mut client = $self.pool.get().await.map_err(unavailable)?;
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
                Err(TxError::Vault(e)) => break Err(e),
            }
        }
    }};
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
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::invalid(
                "store.url",
                format!("not a valid PostgreSQL connection string: {e}"),
            )
        })?;
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
            .build()
            .map_err(unavailable)?;
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies every migration not yet recorded. Safe to run from several
    /// replicas at once: the version row is claimed in the same transaction
    /// as the DDL, so a concurrent starter waits, then sees it applied.
    async fn migrate(&self) -> Result<()> {
        let client = self.pool.get().await.map_err(unavailable)?;
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
        let data = record.encode_to_vec();
        let version = record.key_version as i32;
        transaction!(self, |tx| {
            let existing = |tok: String| {
                let tx = &tx;
                let tenant = record.tenant.clone();
                async move {
                    tx.query_opt(
                        "SELECT data FROM records WHERE tenant = $1 AND token = $2",
                        &[&tenant, &tok],
                    )
                    .await
                    .map(|r| r.map(|r| r.get::<_, Vec<u8>>(0)))
                }
            };
            let indexed = match tx
                .query_opt(
                    "SELECT token FROM fingerprints WHERE tenant = $1 AND fingerprint = $2",
                    &[&record.tenant, &record.fingerprint],
                )
                .await?
            {
                Some(row) => existing(row.get(0)).await?,
                None => None,
            };
            if dedupe && let Some(bytes) = indexed {
                return Ok(InsertOutcome::Deduplicated(
                    decode(&bytes).map_err(TxError::Vault)?,
                ));
            }
            let inserted = tx
                .execute(
                    "INSERT INTO records (tenant, token, key_version, data) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[&record.tenant, &record.token, &version, &data],
                )
                .await?;
            if inserted == 0 {
                return Ok(InsertOutcome::TokenTaken);
            }
            let indexed_now = tx
                .execute(
                    "INSERT INTO fingerprints (tenant, fingerprint, token) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&record.tenant, &record.fingerprint, &record.token],
                )
                .await?;
            if indexed_now == 0 && dedupe {
                // A concurrent transaction indexed this PAN first (we waited
                // for it on the unique index): adopt its token, drop ours.
                let row = tx
                    .query_one(
                        "SELECT token FROM fingerprints WHERE tenant = $1 AND fingerprint = $2",
                        &[&record.tenant, &record.fingerprint],
                    )
                    .await?;
                if let Some(bytes) = existing(row.get(0)).await? {
                    tx.execute(
                        "DELETE FROM records WHERE tenant = $1 AND token = $2",
                        &[&record.tenant, &record.token],
                    )
                    .await?;
                    return Ok(InsertOutcome::Deduplicated(
                        decode(&bytes).map_err(TxError::Vault)?,
                    ));
                }
            }
            let link = append(&tx, audit).await?;
            Ok(InsertOutcome::Inserted(link))
        })
    }

    async fn get(&self, tenant: &str, token: &str) -> Result<Option<StoredRecord>> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let row = client
            .query_opt(
                "SELECT data FROM records WHERE tenant = $1 AND token = $2",
                &[&tenant, &token],
            )
            .await
            .map_err(pg)?;
        row.map(|r| decode(&r.get::<_, Vec<u8>>(0))).transpose()
    }

    async fn update(&self, record: &StoredRecord) -> Result<bool> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let n = client
            .execute(
                "UPDATE records SET key_version = $3, data = $4 WHERE tenant = $1 AND token = $2",
                &[
                    &record.tenant,
                    &record.token,
                    &(record.key_version as i32),
                    &record.encode_to_vec(),
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
        transaction!(self, |tx| {
            let old = tx
                .query_opt(
                    "DELETE FROM records WHERE tenant = $1 AND token = $2 RETURNING data",
                    &[&tenant, &token],
                )
                .await?;
            if let Some(row) = &old
                && let Ok(rec) = StoredRecord::decode(row.get::<_, Vec<u8>>(0).as_slice())
            {
                tx.execute(
                    "DELETE FROM fingerprints WHERE tenant = $1 AND fingerprint = $2 AND token = $3",
                    &[&tenant, &rec.fingerprint, &token],
                )
                .await?;
            }
            let link = append(&tx, audit).await?;
            Ok((old.is_some(), link))
        })
    }

    async fn count(&self, tenant: Option<&str>) -> Result<u64> {
        let client = self.pool.get().await.map_err(unavailable)?;
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
        let client = self.pool.get().await.map_err(unavailable)?;
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

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let client = self.pool.get().await.map_err(unavailable)?;
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
        let client = self.pool.get().await.map_err(unavailable)?;
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
        let client = self.pool.get().await.map_err(unavailable)?;
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
        transaction!(self, |tx| { append(&tx, audit).await })
    }

    async fn audit_head(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let row = client
            .query_one("SELECT seq, hash FROM audit_head WHERE id = 1", &[])
            .await
            .map_err(pg)?;
        let seq: i64 = row.get(0);
        Ok((seq > 0).then(|| (seq as u64, row.get(1))))
    }

    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let rows = client
            .query(
                "SELECT seq, record FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&(after_seq.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                let rec =
                    AuditRecord::decode(r.get::<_, Vec<u8>>(1).as_slice()).unwrap_or_default();
                (seq as u64, rec)
            })
            .collect())
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        let client = self.pool.get().await.map_err(unavailable)?;
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
        let client = self.pool.get().await.map_err(unavailable)?;
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
