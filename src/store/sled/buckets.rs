//! How audit records sit in sled: up to [`BUCKET`] consecutive records in
//! one value, keyed by the bucket's first possible seq (8 bytes, big endian).
//!
//! Why: each sled insert costs several microseconds, and every detokenize
//! appends an audit record. Applying a group commit's records as one
//! read-modify-write per bucket, instead of one insert per record, removed
//! about a quarter of the vault's CPU per detokenize in the benchmark.
//!
//! Value: repeated `seq u64 BE | len u32 BE | AuditRecord bytes`, sorted
//! by seq. The seq stored beside each record is its storage position, the
//! counterpart of a per-record key, so verification still detects records
//! moved, removed or inserted behind the chain's back.

use std::collections::BTreeMap;

use prost::Message;

use super::unavailable;
use crate::audit::AuditRecord;
use crate::error::{Error, Result};

/// Changes to one bucket: seq -> new record bytes, or `None` to remove.
pub type Changes<'a> = Vec<(u64, Option<&'a [u8]>)>;

/// Records per bucket. sled splits a leaf above 16 entries and writes a
/// node larger than a quarter segment (128 KiB) as a separate blob file,
/// so 17 buckets must stay well under that: 16 records of a few hundred
/// bytes each do.
pub const BUCKET: u64 = 16;

/// The key of the bucket holding `seq`.
pub fn key(seq: u64) -> [u8; 8] {
    (seq - seq % BUCKET).to_be_bytes()
}

fn corrupt() -> Error {
    Error::DataLoss("audit storage bucket is corrupt".into())
}

/// The `(seq, record bytes)` pairs of a bucket value.
pub fn decode(mut v: &[u8]) -> Result<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let seq = u64::from_be_bytes(v.get(..8).ok_or_else(corrupt)?.try_into().expect("8"));
        let len = u32::from_be_bytes(v.get(8..12).ok_or_else(corrupt)?.try_into().expect("4"));
        let end = 12 + len as usize;
        out.push((seq, v.get(12..end).ok_or_else(corrupt)?));
        v = &v[end..];
    }
    Ok(out)
}

fn encode<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut v = Vec::new();
    for (seq, rec) in entries {
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&(rec.len() as u32).to_be_bytes());
        v.extend_from_slice(rec);
    }
    v
}

/// Applies `changes` (seq -> new record bytes, or `None` to remove) to the
/// bucket at `base` with one read and one write.
pub fn update(tree: &sled::Tree, base: [u8; 8], changes: &[(u64, Option<&[u8]>)]) -> Result<()> {
    let old = tree.get(base).map_err(unavailable)?;
    let mut entries: BTreeMap<u64, &[u8]> = match &old {
        Some(v) => decode(v)?.into_iter().collect(),
        None => BTreeMap::new(),
    };
    for (seq, rec) in changes {
        match rec {
            Some(r) => entries.insert(*seq, r),
            None => entries.remove(seq),
        };
    }
    if entries.is_empty() {
        tree.remove(base).map_err(unavailable)?;
    } else {
        tree.insert(base, encode(entries)).map_err(unavailable)?;
    }
    Ok(())
}

/// A bucket being gathered during migration: its key and records.
type Gathered = ([u8; 8], Vec<(u64, Vec<u8>)>);

/// Tree holding the buckets (format 2).
pub const TREE: &str = "audit_buckets";
/// Tree of format 1 (one record per key), read only to migrate it.
const OLD_TREE: &str = "audit";
/// Key, in the `meta` tree, of the storage format number.
const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"2";

/// Opens the bucket tree, first migrating a format 1 audit tree (one sled
/// key per record, written by cardvault before 2026-11-25) if there is one.
///
/// The migration fills a fresh bucket tree, flushes, then records the new
/// format and drops the old tree; a crash before the format is recorded
/// leaves the old tree intact and the migration starts over.
pub fn open(db: &sled::Db, head_key: &[u8]) -> Result<sled::Tree> {
    let meta = db.open_tree("meta").map_err(unavailable)?;
    let tree = db.open_tree(TREE).map_err(unavailable)?;
    if meta.get(FORMAT_KEY).map_err(unavailable)?.as_deref() == Some(FORMAT) {
        return Ok(tree);
    }
    tree.clear().map_err(unavailable)?;
    let old = db.open_tree(OLD_TREE).map_err(unavailable)?;
    let mut migrated = 0u64;
    let mut bucket: Option<Gathered> = None;
    let flush = |b: Option<Gathered>| -> Result<()> {
        if let Some((base, recs)) = b {
            let value = encode(recs.iter().map(|(s, r)| (*s, r.as_slice())));
            tree.insert(base, value).map_err(unavailable)?;
        }
        Ok(())
    };
    for kv in old.iter() {
        let (k, v) = kv.map_err(unavailable)?;
        if k.as_ref() == head_key {
            tree.insert(head_key, v).map_err(unavailable)?;
            continue;
        }
        let seq = u64::from_be_bytes(
            k.as_ref()
                .try_into()
                .map_err(|_| Error::DataLoss("format 1 audit key is corrupt".into()))?,
        );
        match &mut bucket {
            Some((base, recs)) if *base == key(seq) => recs.push((seq, v.to_vec())),
            _ => {
                flush(bucket.take())?;
                bucket = Some((key(seq), vec![(seq, v.to_vec())]));
            }
        }
        migrated += 1;
    }
    flush(bucket)?;
    db.flush().map_err(unavailable)?;
    meta.insert(FORMAT_KEY, FORMAT).map_err(unavailable)?;
    db.flush().map_err(unavailable)?;
    db.drop_tree(OLD_TREE).map_err(unavailable)?;
    if migrated > 0 {
        tracing::info!(
            records = migrated,
            "migrated the audit log to storage format 2"
        );
    }
    Ok(tree)
}

/// Direct access to stored audit records, bypassing the chain and the
/// write-ahead log: for forensics and for tests that tamper with the log
/// the way an attacker with file access would.
pub struct RawAudit<'a>(pub(super) &'a sled::Tree);

impl RawAudit<'_> {
    /// The record stored at `seq`.
    pub fn get(&self, seq: u64) -> Option<AuditRecord> {
        let v = self.0.get(key(seq)).ok()??;
        let (_, rec) = decode(&v).ok()?.into_iter().find(|(s, _)| *s == seq)?;
        AuditRecord::decode(rec).ok()
    }

    /// Stores `rec` at position `seq` (whatever seq the record itself names).
    pub fn put(&self, seq: u64, rec: &AuditRecord) -> Result<()> {
        update(self.0, key(seq), &[(seq, Some(&rec.encode_to_vec()))])
    }

    /// Removes the record at `seq`.
    pub fn remove(&self, seq: u64) -> Result<()> {
        update(self.0, key(seq), &[(seq, None)])
    }

    /// The highest stored seq (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.0
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(k, _)| k.len() == 8)
            .filter_map(|(_, v)| decode(&v).ok()?.last().map(|(s, _)| *s))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_merge_by_seq_and_disappear_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let t = db.open_tree("a").unwrap();
        assert_eq!(key(1), key(BUCKET - 1));
        assert_ne!(key(BUCKET - 1), key(BUCKET));
        update(&t, key(1), &[(2, Some(b"two")), (1, Some(b"one"))]).unwrap();
        update(&t, key(3), &[(3, Some(b"three")), (2, Some(b"TWO"))]).unwrap();
        let v = t.get(key(1)).unwrap().unwrap();
        let got: Vec<(u64, &[u8])> = decode(&v).unwrap();
        assert_eq!(
            got,
            vec![(1, &b"one"[..]), (2, &b"TWO"[..]), (3, &b"three"[..])]
        );
        update(&t, key(1), &[(1, None), (2, None), (3, None)]).unwrap();
        assert!(t.get(key(1)).unwrap().is_none());
        // A value cut short is reported, not misread.
        assert!(decode(&v[..v.len() - 1]).is_err());
    }
}
