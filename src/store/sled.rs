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

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::oneshot;

use super::{InsertOutcome, Store, StoredRecord};
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

/// sled-backed [`Store`].
pub struct SledStore {
    /// Records by `tenant \0 token`.
    records: sled::Tree,
    /// Fingerprint index: `tenant \0 fingerprint` -> token.
    fingerprints: sled::Tree,
    /// Wrapped keys and vault metadata by name.
    keys: sled::Tree,
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

impl SledStore {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path) -> Result<SledStore> {
        let db = sled::Config::new().path(path).open().map_err(unavailable)?;
        let records = db.open_tree("records").map_err(unavailable)?;
        let fingerprints = db.open_tree("fingerprints").map_err(unavailable)?;
        let keys = db.open_tree("keys").map_err(unavailable)?;
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
            flush_tx: Some(tx),
            writing,
            flusher: Some(flusher),
        })
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

#[async_trait]
impl Store for SledStore {
    fn backend(&self) -> &'static str {
        "sled"
    }

    async fn insert(&self, record: &StoredRecord, dedupe: bool) -> Result<InsertOutcome> {
        let rkey = record_key(&record.tenant, &record.token);
        let fkey = fingerprint_key(&record.tenant, &record.fingerprint);
        let value = record.encode_to_vec();
        let write = self.start_write();
        let res = (&self.records, &self.fingerprints).transaction(|(records, fps)| {
            let indexed = match fps.get(&fkey)? {
                Some(tok) => {
                    records.get(record_key(&record.tenant, &String::from_utf8_lossy(&tok)))?
                }
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
            Ok(())
        });
        match res {
            Ok(()) => {
                self.durable(write).await?;
                Ok(InsertOutcome::Inserted)
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
        let rkey = record_key(&record.tenant, &record.token);
        let value = record.encode_to_vec();
        let write = self.start_write();
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

    async fn delete(&self, tenant: &str, token: &str) -> Result<bool> {
        let rkey = record_key(tenant, token);
        let write = self.start_write();
        let res = (&self.records, &self.fingerprints).transaction(|(records, fps)| {
            let Some(old) = records.remove(rkey.as_slice())? else {
                return Ok(false);
            };
            // The fingerprint is needed to find the index entry; a record that
            // no longer decodes is still deleted, its index entry left behind
            // (harmless: lookups through it find no record).
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
        });
        let deleted = res.map_err(|e: TransactionError<()>| unavailable(format!("{e:?}")))?;
        if deleted {
            self.durable(write).await?;
        }
        Ok(deleted)
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
}
