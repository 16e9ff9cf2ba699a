//! Each tenant's audit records, numbered 1, 2, 3... in chain order: the
//! index behind the tenant view of the audit log (see
//! [`crate::store::Store::tenant_audit_records`]).
//!
//! Why: a tenant's auditor must not learn how busy other tenants are, which
//! the gaps between global sequence numbers would tell, and a query for
//! one tenant should not read every other tenant's records to find it.
//!
//! The index is derived from the journal, never written on the path of an
//! audited call: [`TenantIndex::catch_up`] reads the records appended since
//! it last ran and indexes them in one atomic sled batch together with the
//! seq it has reached. So it is consistent after any crash (a batch is
//! all or nothing, and the journal keeps every record it indexed) and
//! costs the calls being audited nothing. It runs when the store opens,
//! each time a log segment is retired, and before every tenant query, so a
//! query sees every record acknowledged before it.
//!
//! Tree `audit_tenant`:
//! * `u` -> seq (u64 BE): every record up to it is indexed;
//! * `h` tenant -> tenant seq (u64 BE): the tenant's last number;
//! * `b` tenant `\0` bucket (u64 BE) -> up to [`BUCKET`] entries
//!   `seq (u64 BE) | file offset (u64 BE)`, for the tenant's records
//!   numbered `bucket * BUCKET + 1` on.
//!
//! Entries go [`BUCKET`] to a value because a sled insert costs about as
//! much as the rest of a metadata read (12 us measured here): one per
//! record would tax every audited call by a fifth.
//!
//! Tenant names never hold `\0` (see `Tenant::parse`), so one tenant's
//! entries never run into another's.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::journal::Journal;
use super::unavailable;
use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::sync::Recover;

/// Name of the sled tree.
const TREE: &str = "audit_tenant";
/// Key of the seq indexed up to.
const UPTO: &[u8] = b"u";
/// Records indexed per sled batch.
const BATCH: usize = 8192;
/// Entries per bucket value (2 KiB).
pub(super) const BUCKET: u64 = 128;
/// Bytes per entry: seq and offset.
const ENTRY: usize = 16;

/// The index, and the lock that lets one catch-up run at a time.
pub(super) struct TenantIndex {
    tree: sled::Tree,
    running: Mutex<()>,
}

fn be_u64(v: &[u8]) -> Result<u64> {
    v.try_into().map(u64::from_be_bytes).map_err(|_| corrupt())
}

fn head_key(tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + tenant.len());
    k.push(b'h');
    k.extend_from_slice(tenant.as_bytes());
    k
}

fn bucket_key(tenant: &str, bucket: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + tenant.len());
    k.push(b'b');
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

fn corrupt() -> Error {
    super::corrupt("tenant audit index is corrupt".into())
}

impl TenantIndex {
    /// Opens the index tree of `db`.
    pub(super) fn open(db: &sled::Db) -> Result<TenantIndex> {
        Ok(TenantIndex {
            tree: db.open_tree(TREE).map_err(unavailable)?,
            running: Mutex::new(()),
        })
    }

    fn upto(&self) -> Result<u64> {
        match self.tree.get(UPTO).map_err(unavailable)? {
            Some(v) => be_u64(&v),
            None => Ok(0),
        }
    }

    /// Indexes every journal record not yet indexed. `stop` is asked
    /// between batches whether to give up (the store is closing).
    pub(super) fn catch_up(&self, journal: &Journal, stop: impl Fn() -> bool) -> Result<u64> {
        let _one = self.running.lock().recover();
        let mut upto = self.upto()?;
        let mut indexed = 0;
        loop {
            let page = journal.frames(upto, BATCH)?;
            let Some(&(_, last, _)) = page.last() else {
                return Ok(indexed);
            };
            // Each tenant's new entries, in chain order.
            let mut new: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for (offset, seq, rec) in page {
                // A record that does not decode names no tenant; the
                // chain's verification reports it.
                let Some(body) = rec.decode_body() else {
                    continue;
                };
                if body.tenant.is_empty() {
                    continue;
                }
                let entries = new.entry(body.tenant).or_default();
                entries.extend_from_slice(&seq.to_be_bytes());
                entries.extend_from_slice(&offset.to_be_bytes());
                indexed += 1;
            }
            let mut batch = sled::Batch::default();
            for (tenant, entries) in new {
                let count = match self.tree.get(head_key(&tenant)).map_err(unavailable)? {
                    Some(v) => be_u64(&v)?,
                    None => 0,
                };
                // The last bucket, if partly filled, is filled on.
                let mut bucket = count / BUCKET;
                let mut value = match count % BUCKET {
                    0 => Vec::new(),
                    n => {
                        let v = self
                            .tree
                            .get(bucket_key(&tenant, bucket))
                            .map_err(unavailable)?
                            .ok_or_else(corrupt)?;
                        if v.len() != n as usize * ENTRY {
                            return Err(corrupt());
                        }
                        v.to_vec()
                    }
                };
                for entry in entries.chunks(ENTRY) {
                    value.extend_from_slice(entry);
                    if value.len() == BUCKET as usize * ENTRY {
                        batch.insert(bucket_key(&tenant, bucket), std::mem::take(&mut value));
                        bucket += 1;
                    }
                }
                if !value.is_empty() {
                    batch.insert(bucket_key(&tenant, bucket), value);
                }
                let total = count + (entries.len() / ENTRY) as u64;
                batch.insert(head_key(&tenant), &total.to_be_bytes()[..]);
            }
            batch.insert(UPTO, &last.to_be_bytes()[..]);
            self.tree.apply_batch(batch).map_err(unavailable)?;
            upto = last;
            if stop() {
                return Ok(indexed);
            }
        }
    }

    /// Up to `limit` of `tenant`'s records numbered above `after`, as
    /// `(tenant seq, record)`. Call [`TenantIndex::catch_up`] first.
    pub(super) fn records(
        &self,
        journal: &Journal,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord)>> {
        let first = after.saturating_add(1);
        let from = bucket_key(tenant, (first - 1) / BUCKET);
        let to = bucket_key(tenant, u64::MAX);
        let mut out = Vec::new();
        'buckets: for kv in self.tree.range(from..=to) {
            let (k, v) = kv.map_err(unavailable)?;
            let bucket = be_u64(&k[k.len() - 8..])?;
            if v.len() % ENTRY != 0 {
                return Err(corrupt());
            }
            for (i, entry) in v.chunks(ENTRY).enumerate() {
                let number = bucket * BUCKET + i as u64 + 1;
                if number < first {
                    continue;
                }
                if out.len() >= limit {
                    break 'buckets;
                }
                let (seq, offset) = (be_u64(&entry[..8])?, be_u64(&entry[8..])?);
                // A record removed behind the chain's back is skipped here
                // and reported by verification.
                if let Some(rec) = journal.read_at(offset, seq)? {
                    out.push((number, rec));
                }
            }
        }
        Ok(out)
    }
}
