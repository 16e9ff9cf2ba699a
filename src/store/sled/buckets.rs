//! How audit records sat in sled in storage format 2 (2026-11-25), read
//! now only to migrate them to the journal of format 3 (see [`super::journal`]):
//! up to [`BUCKET`] consecutive records in one value, keyed by the bucket's
//! first possible seq (8 bytes, big endian). Format 1 (one sled key per
//! record) is first migrated to format 2 here.
//!
//! Value: repeated `seq u64 BE | len u32 BE | AuditRecord bytes`, sorted
//! by seq. The seq stored beside each record is its storage position, the
//! counterpart of a per-record key, so verification still detects records
//! moved, removed or inserted behind the chain's back.

use super::{AUDIT_HEAD, unavailable};
use crate::error::{Error, Result};

/// Records per bucket. sled splits a leaf above 16 entries and writes a
/// node larger than a quarter segment (128 KiB) as a separate blob file,
/// so 17 buckets must stay well under that: 16 records of a few hundred
/// bytes each do.
pub(super) const BUCKET: u64 = 16;

/// The key of the bucket holding `seq`.
pub(super) fn key(seq: u64) -> [u8; 8] {
    (seq - seq % BUCKET).to_be_bytes()
}

fn corrupt() -> Error {
    super::corrupt("audit storage bucket is corrupt".into())
}

/// The `(seq, record bytes)` pairs of a bucket value.
pub(super) fn decode(mut v: &[u8]) -> Result<Vec<(u64, &[u8])>> {
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

/// A bucket being gathered during migration: its key and records.
type Gathered = ([u8; 8], Vec<(u64, Vec<u8>)>);

/// Tree holding the buckets (format 2).
pub(super) const TREE: &str = "audit_buckets";
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
pub(super) fn open(db: &sled::Db) -> Result<sled::Tree> {
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
        if k.as_ref() == AUDIT_HEAD {
            tree.insert(AUDIT_HEAD, v).map_err(unavailable)?;
            continue;
        }
        let seq = u64::from_be_bytes(
            k.as_ref()
                .try_into()
                .map_err(|_| super::corrupt("format 1 audit key is corrupt".into()))?,
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

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Bucket values decode or are refused as corrupt, never panic.
        #[test]
        fn fuzz_buckets_decode_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(recs) = decode(&bytes) {
                let total: usize = recs.iter().map(|(_, r)| 12 + r.len()).sum();
                proptest::prop_assert_eq!(total, bytes.len());
            }
        }
    }

    #[test]
    fn bucket_values_decode_by_seq_and_reject_truncation() {
        assert_eq!(key(1), key(BUCKET - 1));
        assert_ne!(key(BUCKET - 1), key(BUCKET));
        let v = encode([(1, &b"one"[..]), (2, &b"TWO"[..]), (3, &b"three"[..])]);
        let got: Vec<(u64, &[u8])> = decode(&v).unwrap();
        assert_eq!(
            got,
            vec![(1, &b"one"[..]), (2, &b"TWO"[..]), (3, &b"three"[..])]
        );
        // A value cut short is reported, not misread.
        assert!(decode(&v[..v.len() - 1]).is_err());
    }
}
