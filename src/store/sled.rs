//! The embedded default backend: sled 0.34, one node, no server to run.
//!
//! Durability: sled buffers writes and flushes in the background, so a
//! write is only durable after `Db::flush`. Flushing per request would cap
//! throughput at one fsync per call, so writers hand a completion slot to a
//! dedicated flusher thread which drains every request queued meanwhile and
//! serves them all with one `flush()` (group commit). `flush_async` is never
//! used: concurrent `flush_async` calls deadlock in sled 0.34 (sled#1308).
//!
//! Each flush costs a log write and a `sync_file_range` whatever it carries,
//! so under load the flusher waits briefly (at most [`MAX_LINGER`]) for
//! writers that are already inside a write to queue too, and flushes them
//! together. A lone writer never waits: with no other write in progress the
//! flush starts at once.
//!
//! Audit chain: appends are serialised by one mutex that also caches the
//! head, so each record links to the one before it; the record is written
//! in the same sled transaction as the operation it describes.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::oneshot;

use super::{AuditLink, InsertOutcome, Store, StoredRecord};
use crate::audit::{AuditBody, AuditRecord, Checkpoint, GENESIS};
use crate::error::{Error, Result};

type FlushReply = oneshot::Sender<Result<(), String>>;

/// Longest the flusher holds a flush back for writes still in progress.
pub const MAX_LINGER: Duration = Duration::from_micros(1000);

/// Counts a write from its start until its flush request is queued, so the
/// flusher knows whether waiting a little would let it serve more writers.
struct InFlightWrite<'a>(&'a AtomicUsize);

impl Drop for InFlightWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Key of the audit head `(seq, hash)`, kept in the audit tree itself so
/// that a record and the head move together in one single-tree batch (far
/// cheaper than a multi-tree transaction). Record keys are 8-byte seqs;
/// this key is longer and sorts after every seq below 2^62.
const AUDIT_HEAD: &[u8] = b"~audit-head";

/// sled-backed [`Store`].
pub struct SledStore {
    /// Records by `tenant \0 token`.
    records: sled::Tree,
    /// Fingerprint index: `tenant \0 fingerprint` -> token.
    fingerprints: sled::Tree,
    /// Wrapped keys and vault metadata by name.
    keys: sled::Tree,
    /// Audit records by big-endian seq.
    audit: sled::Tree,
    /// Signed checkpoints by big-endian seq.
    checkpoints: sled::Tree,
    /// Serialises audit appends and caches the head `(seq, hash)`.
    chain: Mutex<(u64, Vec<u8>)>,
    /// Queue to the flusher thread; `None` only while dropping.
    flush_tx: Option<mpsc::Sender<FlushReply>>,
    /// Writes started whose flush request is not queued yet.
    writing: Arc<AtomicUsize>,
    /// The flusher thread, joined on drop so the database lock is released
    /// when the store is gone (a reopen in the same process then succeeds).
    flusher: Option<JoinHandle<()>>,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("storage (sled): {e}"))
}

fn record_key(tenant: &str, token: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + token.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(token.as_bytes());
    k
}

fn fingerprint_key(tenant: &str, fp: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + fp.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(fp);
    k
}

fn decode(bytes: &[u8]) -> Result<StoredRecord> {
    StoredRecord::decode(bytes)
        .map_err(|_| Error::DataLoss("stored record could not be decoded".into()))
}

fn encode_head(seq: u64, hash: &[u8]) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(hash);
    v
}

fn decode_head(v: &[u8]) -> Option<(u64, Vec<u8>)> {
    let seq = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    Some((seq, v[8..].to_vec()))
}

/// Writes `rec` and the new head inside a transaction.
fn put_audit(
    audit: &TransactionalTree,
    rec: &AuditRecord,
) -> std::result::Result<(), sled::transaction::UnabortableTransactionError> {
    audit.insert(&rec.seq.to_be_bytes(), rec.encode_to_vec())?;
    audit.insert(AUDIT_HEAD, encode_head(rec.seq, &rec.hash))?;
    Ok(())
}

impl SledStore {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path) -> Result<SledStore> {
        let db = sled::Config::new().path(path).open().map_err(unavailable)?;
        let tree = |name: &str| db.open_tree(name).map_err(unavailable);
        let (records, fingerprints, keys) =
            (tree("records")?, tree("fingerprints")?, tree("keys")?);
        let (audit, checkpoints) = (tree("audit")?, tree("audit_checkpoints")?);
        let head = match audit.get(AUDIT_HEAD).map_err(unavailable)? {
            Some(v) => {
                decode_head(&v).ok_or_else(|| Error::DataLoss("audit head is corrupt".into()))?
            }
            None => (0, GENESIS.to_vec()),
        };
        let (tx, rx) = mpsc::channel::<FlushReply>();
        let writing = Arc::new(AtomicUsize::new(0));
        let in_progress = writing.clone();
        let flusher = std::thread::Builder::new()
            .name("sled-group-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued before this flush starts was written
                    // before it was queued, so one flush makes all of it durable.
                    let mut waiters = vec![first];
                    let started = Instant::now();
                    loop {
                        waiters.extend(rx.try_iter());
                        let waited = started.elapsed();
                        if in_progress.load(Ordering::Acquire) == 0 || waited >= MAX_LINGER {
                            break;
                        }
                        match rx.recv_timeout(MAX_LINGER - waited) {
                            Ok(w) => waiters.push(w),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break;
                            }
                        }
                    }
                    let res = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for w in waiters {
                        let _ = w.send(res.clone());
                    }
                }
                let _ = db.flush();
            })
            .map_err(unavailable)?;
        Ok(SledStore {
            records,
            fingerprints,
            keys,
            audit,
            checkpoints,
            chain: Mutex::new(head),
            flush_tx: Some(tx),
            writing,
            flusher: Some(flusher),
        })
    }

    /// The raw audit tree (seq -> record), for forensics and tamper tests.
    /// Writing to it bypasses the chain: that is what `audit verify` detects.
    pub fn raw_audit_tree(&self) -> &sled::Tree {
        &self.audit
    }

    fn chain(&self) -> MutexGuard<'_, (u64, Vec<u8>)> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an audit record to the chain (not yet flushed).
    fn append_audit_now(&self, audit: &AuditBody) -> Result<AuditLink> {
        let mut head = self.chain();
        let arec = AuditRecord::next(head.0, &head.1, audit.encode_to_vec());
        let mut batch = sled::Batch::default();
        batch.insert(&arec.seq.to_be_bytes(), arec.encode_to_vec());
        batch.insert(AUDIT_HEAD, encode_head(arec.seq, &arec.hash));
        self.audit.apply_batch(batch).map_err(unavailable)?;
        *head = (arec.seq, arec.hash.clone());
        Ok(link(&arec))
    }

    /// Marks a write as started (until the guard is passed to
    /// [`SledStore::durable`] or dropped).
    fn start_write(&self) -> InFlightWrite<'_> {
        self.writing.fetch_add(1, Ordering::AcqRel);
        InFlightWrite(&self.writing)
    }

    /// Waits until every write made before this call is on disk.
    async fn durable(&self, write: InFlightWrite<'_>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let queued = self
            .flush_tx
            .as_ref()
            .ok_or_else(|| unavailable("store is closing"))?
            .send(tx)
            .map_err(|_| unavailable("flusher thread stopped"));
        // Queued first, then no longer counted: the flusher never sees
        // neither, so it never misses a writer it should wait for.
        drop(write);
        queued?;
        rx.await
            .map_err(|_| unavailable("flusher thread stopped"))?
            .map_err(unavailable)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.flush_tx.take();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

/// Why an insert transaction stopped without writing.
enum Abort {
    TokenTaken,
    Deduplicated(Vec<u8>),
}

fn link(rec: &AuditRecord) -> AuditLink {
    AuditLink {
        seq: rec.seq,
        hash: rec.hash.clone(),
    }
}

#[async_trait]
impl Store for SledStore {
    fn backend(&self) -> &'static str {
        "sled"
    }

    async fn insert(
        &self,
        record: &StoredRecord,
        dedupe: bool,
        audit: &AuditBody,
    ) -> Result<InsertOutcome> {
        let write = self.start_write();
        let rkey = record_key(&record.tenant, &record.token);
        let fkey = fingerprint_key(&record.tenant, &record.fingerprint);
        let value = record.encode_to_vec();
        let res = {
            let mut head = self.chain();
            let arec = AuditRecord::next(head.0, &head.1, audit.encode_to_vec());
            let res = (&self.records, &self.fingerprints, &self.audit).transaction(
                |(records, fps, audit_t)| {
                    let indexed = match fps.get(&fkey)? {
                        Some(tok) => records
                            .get(record_key(&record.tenant, &String::from_utf8_lossy(&tok)))?,
                        None => None,
                    };
                    if dedupe && let Some(existing) = indexed.clone() {
                        return Err(ConflictableTransactionError::Abort(Abort::Deduplicated(
                            existing.to_vec(),
                        )));
                    }
                    if records.get(&rkey)?.is_some() {
                        return Err(ConflictableTransactionError::Abort(Abort::TokenTaken));
                    }
                    records.insert(rkey.as_slice(), value.as_slice())?;
                    if indexed.is_none() {
                        fps.insert(fkey.as_slice(), record.token.as_bytes())?;
                    }
                    put_audit(audit_t, &arec)?;
                    Ok(())
                },
            );
            if res.is_ok() {
                *head = (arec.seq, arec.hash.clone());
            }
            res.map(|()| link(&arec))
        };
        match res {
            Ok(l) => {
                self.durable(write).await?;
                Ok(InsertOutcome::Inserted(l))
            }
            Err(TransactionError::Abort(Abort::TokenTaken)) => Ok(InsertOutcome::TokenTaken),
            Err(TransactionError::Abort(Abort::Deduplicated(bytes))) => {
                Ok(InsertOutcome::Deduplicated(decode(&bytes)?))
            }
            Err(TransactionError::Storage(e)) => Err(unavailable(e)),
        }
    }

    async fn get(&self, tenant: &str, token: &str) -> Result<Option<StoredRecord>> {
        match self
            .records
            .get(record_key(tenant, token))
            .map_err(unavailable)?
        {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn update(&self, record: &StoredRecord) -> Result<bool> {
        let write = self.start_write();
        let rkey = record_key(&record.tenant, &record.token);
        let value = record.encode_to_vec();
        let res = self.records.transaction(|records| {
            if records.get(&rkey)?.is_none() {
                return Ok(false);
            }
            records.insert(rkey.as_slice(), value.as_slice())?;
            Ok(true)
        });
        let updated = res.map_err(|e: TransactionError<()>| unavailable(format!("{e:?}")))?;
        if updated {
            self.durable(write).await?;
        }
        Ok(updated)
    }

    async fn delete(
        &self,
        tenant: &str,
        token: &str,
        audit: &AuditBody,
    ) -> Result<(bool, AuditLink)> {
        let write = self.start_write();
        let rkey = record_key(tenant, token);
        let res = {
            let mut head = self.chain();
            let arec = AuditRecord::next(head.0, &head.1, audit.encode_to_vec());
            let res = (&self.records, &self.fingerprints, &self.audit).transaction(
                |(records, fps, audit_t)| {
                    put_audit(audit_t, &arec)?;
                    let Some(old) = records.remove(rkey.as_slice())? else {
                        return Ok(false);
                    };
                    // The fingerprint is needed to find the index entry; a record
                    // that no longer decodes is still deleted, its index entry left
                    // behind (harmless: lookups through it find no record).
                    if let Ok(rec) = StoredRecord::decode(&old[..]) {
                        let fkey = fingerprint_key(tenant, &rec.fingerprint);
                        if fps
                            .get(&fkey)?
                            .is_some_and(|t| t.as_ref() == token.as_bytes())
                        {
                            fps.remove(fkey)?;
                        }
                    }
                    Ok(true)
                },
            );
            if res.is_ok() {
                *head = (arec.seq, arec.hash.clone());
            }
            res.map(|d| (d, link(&arec)))
        };
        let out = res.map_err(|e: TransactionError<()>| unavailable(format!("{e:?}")))?;
        self.durable(write).await?;
        Ok(out)
    }

    async fn count(&self, tenant: Option<&str>) -> Result<u64> {
        match tenant {
            None => Ok(self.records.len() as u64),
            Some(t) => {
                let prefix = record_key(t, "");
                Ok(self.records.scan_prefix(prefix).keys().count() as u64)
            }
        }
    }

    async fn get_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .keys
            .get(name)
            .map_err(unavailable)?
            .map(|v| v.to_vec()))
    }

    async fn put_key_if_absent(&self, name: &str, value: &[u8]) -> Result<Option<Vec<u8>>> {
        let write = self.start_write();
        let res = self
            .keys
            .compare_and_swap(name, None as Option<&[u8]>, Some(value))
            .map_err(unavailable)?;
        match res {
            Ok(()) => {
                self.durable(write).await?;
                Ok(None)
            }
            Err(cas) => Ok(cas.current.map(|v| v.to_vec())),
        }
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.keys
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(unavailable)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    async fn put_keys(&self, entries: &[(String, Vec<u8>)]) -> Result<()> {
        let write = self.start_write();
        let mut batch = sled::Batch::default();
        for (k, v) in entries {
            batch.insert(k.as_bytes(), v.as_slice());
        }
        self.keys.apply_batch(batch).map_err(unavailable)?;
        self.durable(write).await
    }

    async fn delete_key(&self, name: &str) -> Result<()> {
        let write = self.start_write();
        self.keys.remove(name).map_err(unavailable)?;
        self.durable(write).await
    }

    async fn scan_records(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        let iter = match after {
            // Keys are `tenant \0 token`; tenants never contain \0, so byte
            // order of keys is (tenant, token) order.
            Some((tenant, token)) => {
                let mut start = record_key(tenant, token);
                start.push(0);
                self.records.range(start..)
            }
            None => self.records.iter(),
        };
        iter.values()
            .take(limit)
            .map(|v| decode(&v.map_err(unavailable)?))
            .collect()
    }

    async fn append_audit(&self, audit: &AuditBody) -> Result<AuditLink> {
        let write = self.start_write();
        let l = self.append_audit_now(audit)?;
        self.durable(write).await?;
        Ok(l)
    }

    async fn append_audit_buffered(&self, audit: &AuditBody) -> Result<AuditLink> {
        // sled writes its log in order, so a crash can lose only a suffix
        // of such records: the chain that survives is still unbroken.
        self.append_audit_now(audit)
    }

    async fn audit_head(&self) -> Result<Option<(u64, Vec<u8>)>> {
        match self.audit.get(AUDIT_HEAD).map_err(unavailable)? {
            Some(v) => {
                Ok(Some(decode_head(&v).ok_or_else(|| {
                    Error::DataLoss("audit head is corrupt".into())
                })?))
            }
            None => Ok(None),
        }
    }

    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        let start = after_seq.saturating_add(1).to_be_bytes();
        self.audit
            .range(start..)
            // Every other key in the tree (the head) is not 8 bytes long.
            .filter(|kv| kv.as_ref().map_or(true, |(k, _)| k.len() == 8))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(unavailable)?;
                let seq = k
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| Error::DataLoss("audit key is corrupt".into()))?;
                // A record that does not decode is reported as an empty one,
                // so verification can name it instead of failing outright.
                let rec = AuditRecord::decode(v.as_ref()).unwrap_or_default();
                Ok((seq, rec))
            })
            .collect()
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        let write = self.start_write();
        self.checkpoints
            .insert(checkpoint.seq.to_be_bytes(), checkpoint.encode_to_vec())
            .map_err(unavailable)?;
        self.durable(write).await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.checkpoints
            .iter()
            .values()
            .map(|v| {
                let v = v.map_err(unavailable)?;
                Checkpoint::decode(v.as_ref())
                    .map_err(|_| Error::DataLoss("audit checkpoint is corrupt".into()))
            })
            .collect()
    }
}
