//! How audit records are stored (storage format 3): appended to one file,
//! `cardvault-audit.log`, beside sled, with a sparse seq -> offset index
//! and the chain head in sled.
//!
//! Why not sled: every detokenize appends a record, and rewriting sled
//! values for them (format 2 packed 16 records to a value) cost sled
//! inserts, node rewrites and about twice the record bytes in sled's own
//! log on every group commit. An audit log is append-only and read in
//! order, which a plain file does with one `pwrite` per group commit.
//!
//! * Frame: `seq u64 LE | len u32 LE | crc32 u32 LE | AuditRecord bytes`.
//!   The seq is the record's storage position (what a per-record key was
//!   before), so verification still sees records moved, removed or
//!   inserted behind the chain's back. The CRC only finds torn writes;
//!   tampering is the hash chain's and the signed checkpoints' job.
//! * Durability comes from the write-ahead log: records reach this file
//!   (unsynced) when a batch is applied. Before log segments are deleted
//!   the file is synced and its synced length recorded in sled
//!   ([`Journal::sync`]). On open the file is checked from the last index
//!   entry inside the synced part and cut at the first torn frame after
//!   the synced part (a bad frame inside it is damage: refused as
//!   DATA_LOSS, the file left as it is); the log replay then appends what
//!   is missing (records already present are skipped, a gap is refused as
//!   DATA_LOSS), and the store checks that the journal then ends at the
//!   chain head.
//! * Index: every [`INDEX_EVERY`]th seq's offset, in sled tree
//!   `audit_index`, so a page of records starts with one sled lookup and a
//!   short scan.
//! * The head `(seq, hash)` stays in sled (tree `meta`), written apart from
//!   the records, so a file cut short is reported by verification.

use std::path::Path;
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};

use prost::Message;

use super::{AUDIT_HEAD, buckets, corrupt, decode_head, unavailable};
use crate::audit::AuditRecord;
use crate::error::Result;
use crate::store::disk::{Disk, DiskFile, OpenMode};
use crate::sync::Recover;

/// File name of the journal, in the sled directory.
pub const FILE: &str = "cardvault-audit.log";
/// Bytes before each record.
const HEADER: usize = 16;
/// Largest record a frame may hold; a longer length means a corrupt frame.
const MAX_RECORD: usize = 1 << 20;
/// One index entry per this many seqs.
pub(super) const INDEX_EVERY: u64 = 64;
/// sled tree of the index: seq (u64 BE) -> offset (u64 LE).
const INDEX_TREE: &str = "audit_index";
/// Keys in the `meta` tree.
const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"3";
const SYNCED_KEY: &[u8] = b"audit-synced-len";

/// Appends the frame of record `rec` at position `seq` to `out`.
pub(super) fn encode_frame(seq: u64, rec: &[u8], out: &mut Vec<u8>) {
    let (seq_b, len_b) = (seq.to_le_bytes(), (rec.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq_b);
    crc.update(&len_b);
    crc.update(rec);
    out.extend_from_slice(&seq_b);
    out.extend_from_slice(&len_b);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(rec);
}

/// Frames written together, with the index entries they need.
#[derive(Default)]
struct Frames {
    /// The frames, to be written at file offset `base`.
    buf: Vec<u8>,
    base: u64,
    /// `(seq, offset)` of the frames the index holds.
    index: Vec<(u64, u64)>,
}

impl Frames {
    fn at(base: u64) -> Frames {
        Frames {
            base,
            ..Frames::default()
        }
    }

    fn push(&mut self, seq: u64, rec: &[u8]) {
        if seq % INDEX_EVERY == 1 {
            self.index.push((seq, self.base + self.buf.len() as u64));
        }
        encode_frame(seq, rec, &mut self.buf);
    }

    /// Writes them to `file`, then their entries to `index`.
    fn write(&self, file: &dyn DiskFile, index: &sled::Tree) -> Result<()> {
        file.write_all_at(&self.buf, self.base)
            .map_err(|e| unavailable(format!("audit journal: {e}")))?;
        for (seq, off) in &self.index {
            index
                .insert(seq.to_be_bytes(), &off.to_le_bytes())
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

/// What a frame at the start of `buf` is.
enum Frame<'a> {
    /// A whole valid frame: its seq, record bytes and total length.
    Valid(u64, &'a [u8], usize),
    /// `buf` ends inside the frame; read at least this many bytes.
    Short(usize),
    /// Not a frame (torn, zeroed or corrupt).
    Invalid,
}

fn parse(buf: &[u8]) -> Frame<'_> {
    let Some(h) = buf.get(..HEADER) else {
        return Frame::Short(HEADER);
    };
    let seq = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if seq == 0 || len > MAX_RECORD {
        return Frame::Invalid;
    }
    let Some(rec) = buf.get(HEADER..HEADER + len) else {
        return Frame::Short(HEADER + len);
    };
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..12]);
    c.update(rec);
    if c.finalize() == crc {
        Frame::Valid(seq, rec, HEADER + len)
    } else {
        Frame::Invalid
    }
}

/// Calls `f(offset, seq, record)` for the frames in `file` from `from` up
/// to `end`, until `f` returns false or a frame is invalid. Returns the
/// offset where it stopped and whether it stopped at an invalid frame.
fn scan(
    file: &dyn DiskFile,
    from: u64,
    end: u64,
    mut f: impl FnMut(u64, u64, &[u8]) -> bool,
) -> std::io::Result<(u64, bool)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = from;
    'read: while off < end {
        let want = buf.len().min((end - off) as usize);
        file.read_exact_at(&mut buf[..want], off)?;
        let mut pos = 0;
        while pos < want {
            match parse(&buf[pos..want]) {
                Frame::Valid(seq, rec, n) => {
                    if !f(off + pos as u64, seq, rec) {
                        return Ok((off + pos as u64, false));
                    }
                    pos += n;
                }
                Frame::Short(n) => {
                    if off + (pos + n) as u64 > end {
                        return Ok((off + pos as u64, true));
                    }
                    if n > buf.len() {
                        buf.resize(n, 0);
                    }
                    off += pos as u64;
                    continue 'read;
                }
                Frame::Invalid => return Ok((off + pos as u64, true)),
            }
        }
        off += pos as u64;
    }
    Ok((off, false))
}

/// Where the file ends and what it ends with.
struct Tail {
    /// Length of the valid frames.
    len: u64,
    /// Seq of the last frame (0 if none).
    last_seq: u64,
}

/// The audit journal: file, index and tail.
pub(super) struct Journal {
    file: Arc<dyn DiskFile>,
    index: sled::Tree,
    /// Holds the head and the synced length.
    meta: sled::Tree,
    /// Appends and raw rewrites hold it; readers take the length from it.
    tail: Mutex<Tail>,
}

fn le_u64(v: &[u8]) -> Result<u64> {
    v.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| corrupt("audit index value is corrupt".into()))
}

impl Journal {
    /// Opens the journal in `dir`, first migrating audit records of storage
    /// format 1 or 2 out of sled, and cuts a torn tail (see the module doc).
    pub(super) fn open(db: &sled::Db, dir: &Path, disk: &dyn Disk) -> Result<Journal> {
        let meta = db.open_tree("meta").map_err(unavailable)?;
        let index = db.open_tree(INDEX_TREE).map_err(unavailable)?;
        let path = dir.join(FILE);
        if meta.get(FORMAT_KEY).map_err(unavailable)?.as_deref() != Some(FORMAT) {
            migrate(db, &meta, &index, &path, disk)?;
        }
        let file = disk.open(&path, OpenMode::CREATE).map_err(unavailable)?;
        // A journal created just now must still be there after a crash:
        // sled will record how much of it was synced.
        disk.sync_dir(dir).map_err(unavailable)?;
        let file_len = file.len().map_err(unavailable)?;
        let synced = match meta.get(SYNCED_KEY).map_err(unavailable)? {
            Some(v) => le_u64(&v)?,
            None => 0,
        };
        if file_len < synced {
            return Err(corrupt(format!(
                "audit journal {FILE} is {file_len} bytes, shorter than the {synced} bytes synced to disk: it was cut short"
            )));
        }
        // Start at the last indexed frame inside the synced part: what was
        // synced is intact, what came after may have holes (page cache
        // writes back in any order) and is checked frame by frame.
        let mut start = 0;
        for kv in index.iter().rev() {
            let (_, v) = kv.map_err(unavailable)?;
            let off = le_u64(&v)?;
            if off < synced {
                start = off;
                break;
            }
        }
        let mut last_seq = 0;
        let (end, _) = scan(&*file, start, file_len, |_, seq, _| {
            last_seq = seq;
            true
        })
        .map_err(unavailable)?;
        // What was synced cannot have been torn by a crash: a bad frame
        // there is damage, and cutting the file at it would throw away the
        // records after it (which the write-ahead log no longer holds).
        if end < synced {
            return Err(corrupt(format!(
                "audit journal {FILE} is corrupt at byte {end}, inside the {synced} bytes synced to disk"
            )));
        }
        if end < file_len {
            tracing::warn!(
                valid = end,
                length = file_len,
                "audit journal ends in an incomplete write (a crash); the write-ahead log restores what it held"
            );
            file.set_len(end).map_err(unavailable)?;
        }
        // Index entries past the cut point at nothing.
        for kv in index.range((last_seq + 1).to_be_bytes()..) {
            let (k, _) = kv.map_err(unavailable)?;
            index.remove(k).map_err(unavailable)?;
        }
        Ok(Journal {
            file,
            index,
            meta,
            tail: Mutex::new(Tail { len: end, last_seq }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().recover()
    }

    /// Appends records `(seq, bytes)` in seq order with one write. Records
    /// at or below the last stored seq are skipped (a log replay after the
    /// file already had them); a gap is refused.
    pub(super) fn append(&self, recs: &[(u64, &[u8])]) -> Result<()> {
        let mut tail = self.lock();
        let mut frames = Frames::at(tail.len);
        let mut last = tail.last_seq;
        for &(seq, rec) in recs {
            if seq <= last {
                continue;
            }
            if seq != last + 1 {
                return Err(corrupt(format!(
                    "audit journal: record {seq} would follow {last} (gap)"
                )));
            }
            frames.push(seq, rec);
            last = seq;
        }
        if frames.buf.is_empty() {
            return Ok(());
        }
        frames.write(&*self.file, &self.index)?;
        tail.len += frames.buf.len() as u64;
        tail.last_seq = last;
        Ok(())
    }

    /// Makes the appended records durable in the file and records how much
    /// of it is; call before deleting the write-ahead log that held them,
    /// then flush sled.
    pub(super) fn sync(&self) -> Result<()> {
        let len = self.lock().len;
        self.file.sync().map_err(unavailable)?;
        self.meta
            .insert(SYNCED_KEY, &len.to_le_bytes())
            .map_err(unavailable)?;
        Ok(())
    }

    /// The stored chain head `(seq, hash)`.
    pub(super) fn head(&self) -> Result<Option<(u64, Vec<u8>)>> {
        match self.meta.get(AUDIT_HEAD).map_err(unavailable)? {
            Some(v) => Ok(Some(
                decode_head(&v).ok_or_else(|| corrupt("audit head is corrupt".into()))?,
            )),
            None => Ok(None),
        }
    }

    /// Writes the chain head (as encoded in the log).
    pub(super) fn set_head(&self, value: &[u8]) -> Result<()> {
        self.meta.insert(AUDIT_HEAD, value).map_err(unavailable)?;
        Ok(())
    }

    /// Up to `limit` records with seq above `after`, in order. A record that
    /// does not decode comes back empty, so verification can name it.
    pub(super) fn records(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        Ok(self
            .frames(after, limit)?
            .into_iter()
            .map(|(_, seq, rec)| (seq, rec))
            .collect())
    }

    /// Like [`Journal::records`], with each frame's offset in the file, so
    /// that an index can read a record back with [`Journal::read_at`].
    pub(super) fn frames(&self, after: u64, limit: usize) -> Result<Vec<(u64, u64, AuditRecord)>> {
        let end = self.lock().len;
        let first = after.saturating_add(1);
        let start = match self
            .index
            .range(..=first.to_be_bytes())
            .next_back()
            .transpose()
            .map_err(unavailable)?
        {
            Some((_, v)) => le_u64(&v)?,
            None => 0,
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let (_, invalid) = scan(&*self.file, start, end, |off, seq, rec| {
            if seq >= first {
                out.push((off, seq, AuditRecord::decode(rec).unwrap_or_default()));
            }
            out.len() < limit
        })
        .map_err(unavailable)?;
        if invalid {
            return Err(corrupt("audit journal holds a corrupt frame".into()));
        }
        Ok(out)
    }

    /// Record `seq`, read from the frame at `offset` if it is there, else
    /// found by seq (the file was rewritten since the offset was taken);
    /// `None` if no record has that seq.
    pub(super) fn read_at(&self, offset: u64, seq: u64) -> Result<Option<AuditRecord>> {
        let end = self.lock().len;
        let mut found = None;
        let mut header = [0u8; HEADER];
        if offset + HEADER as u64 <= end
            && self.file.read_exact_at(&mut header, offset).is_ok()
            && let Frame::Short(n) = parse(&header)
            && offset + n as u64 <= end
        {
            let mut frame = vec![0u8; n];
            self.file
                .read_exact_at(&mut frame, offset)
                .map_err(unavailable)?;
            if let Frame::Valid(s, rec, _) = parse(&frame)
                && s == seq
            {
                found = Some(AuditRecord::decode(rec).unwrap_or_default());
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        Ok(self
            .records(seq.saturating_sub(1), 1)?
            .into_iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, rec)| rec))
    }

    /// The highest stored seq (0 if none).
    pub(super) fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    #[cfg(any(test, feature = "fault-injection"))]
    /// Rewrites the whole file with `edit` applied to its records (position
    /// -> bytes), then rebuilds the index. For [`RawAudit`] only: slow, and
    /// not safe against concurrent readers.
    fn rewrite(
        &self,
        edit: impl FnOnce(&mut std::collections::BTreeMap<u64, Vec<u8>>),
    ) -> Result<()> {
        let mut tail = self.lock();
        let mut recs = std::collections::BTreeMap::new();
        scan(&*self.file, 0, tail.len, |_, seq, rec| {
            recs.insert(seq, rec.to_vec());
            true
        })
        .map_err(unavailable)?;
        edit(&mut recs);
        let mut frames = Frames::at(0);
        for (seq, rec) in &recs {
            frames.push(*seq, rec);
        }
        self.index.clear().map_err(unavailable)?;
        self.file.set_len(0).map_err(unavailable)?;
        frames.write(&*self.file, &self.index)?;
        tail.len = frames.buf.len() as u64;
        tail.last_seq = recs.keys().next_back().copied().unwrap_or(0);
        drop(tail);
        self.sync()
    }
}

/// Moves the audit records of format 1 or 2 (sled trees) into a fresh
/// journal. Crash-safe: the format is recorded only once the journal is
/// synced, and an unfinished journal is rewritten from the start.
fn migrate(
    db: &sled::Db,
    meta: &sled::Tree,
    index: &sled::Tree,
    path: &Path,
    disk: &dyn Disk,
) -> Result<()> {
    let old = buckets::open(db)?;
    index.clear().map_err(unavailable)?;
    let file = disk.open(path, OpenMode::NEW).map_err(unavailable)?;
    let mut frames = Frames::at(0);
    let mut migrated = 0u64;
    let mut last = 0u64;
    for kv in old.iter() {
        let (k, v) = kv.map_err(unavailable)?;
        if k.as_ref() == AUDIT_HEAD {
            meta.insert(AUDIT_HEAD, v).map_err(unavailable)?;
            continue;
        }
        for (seq, rec) in buckets::decode(&v)? {
            if seq <= last {
                return Err(corrupt("format 2 audit records are out of order".into()));
            }
            frames.push(seq, rec);
            (last, migrated) = (seq, migrated + 1);
        }
    }
    frames.write(&*file, index)?;
    file.sync().map_err(unavailable)?;
    if let Some(parent) = path.parent() {
        disk.sync_dir(parent).map_err(unavailable)?;
    }
    meta.insert(SYNCED_KEY, &(frames.buf.len() as u64).to_le_bytes())
        .map_err(unavailable)?;
    db.flush().map_err(unavailable)?;
    meta.insert(FORMAT_KEY, FORMAT).map_err(unavailable)?;
    db.flush().map_err(unavailable)?;
    db.drop_tree(buckets::TREE).map_err(unavailable)?;
    if migrated > 0 {
        tracing::info!(
            records = migrated,
            "moved the audit log out of sled into {FILE} (storage format 3)"
        );
    }
    Ok(())
}

#[cfg(any(test, feature = "fault-injection"))]
/// Direct access to stored audit records, bypassing the chain and the
/// write-ahead log: for forensics and for tests that tamper with the log
/// the way an attacker with file access would. Writes rewrite the file.
pub struct RawAudit<'a>(pub(super) &'a Journal);

#[cfg(any(test, feature = "fault-injection"))]
impl RawAudit<'_> {
    /// The record stored at `seq`.
    pub fn get(&self, seq: u64) -> Option<AuditRecord> {
        let page = self.0.records(seq.checked_sub(1)?, 1).ok()?;
        page.into_iter().find(|(s, _)| *s == seq).map(|(_, r)| r)
    }

    /// Stores `rec` at position `seq` (whatever seq the record itself names).
    pub fn put(&self, seq: u64, rec: &AuditRecord) -> Result<()> {
        let bytes = rec.encode_to_vec();
        self.0.rewrite(|recs| {
            recs.insert(seq, bytes);
        })
    }

    /// Removes the record at `seq`.
    pub fn remove(&self, seq: u64) -> Result<()> {
        self.0.rewrite(|recs| {
            recs.remove(&seq);
        })
    }

    /// The highest stored seq (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.0.last_seq()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Frame parsing never panics, and what it accepts lies inside
        /// the input.
        #[test]
        fn fuzz_frames_parse_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let mut pos = 0;
            while let Frame::Valid(_, rec, n) = parse(&bytes[pos..]) {
                proptest::prop_assert!(n >= HEADER + rec.len() && pos + n <= bytes.len());
                pos += n;
            }
        }

        /// A damaged valid frame is refused, or is the frame itself.
        #[test]
        fn fuzz_damaged_frames_are_refused(seq in 1u64.., len in 0usize..300, at in proptest::prelude::any::<proptest::sample::Index>(), bit in 0u8..8) {
            let rec = vec![0x5Au8; len];
            let mut buf = Vec::new();
            encode_frame(seq, &rec, &mut buf);
            let i = at.index(buf.len());
            buf[i] ^= 1 << bit;
            proptest::prop_assert!(!matches!(parse(&buf), Frame::Valid(..)));
        }
    }

    fn journal(dir: &Path) -> (sled::Db, Journal) {
        let db = sled::Config::new().path(dir.join("db")).open().unwrap();
        let j = Journal::open(&db, dir, &crate::store::disk::OsDisk).unwrap();
        (db, j)
    }

    fn rec(seq: u64) -> Vec<u8> {
        AuditRecord {
            seq,
            body: vec![seq as u8; 100 + (seq % 7) as usize],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn appends_read_back_by_page_skip_replays_and_refuse_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, j) = journal(dir.path());
        let all: Vec<Vec<u8>> = (1..=300).map(rec).collect();
        for chunk in (1..=300u64).collect::<Vec<_>>().chunks(37) {
            let batch: Vec<(u64, &[u8])> = chunk
                .iter()
                .map(|&s| (s, all[s as usize - 1].as_slice()))
                .collect();
            j.append(&batch).unwrap();
        }
        assert_eq!(j.last_seq(), 300);
        // A replay of records already there is a no-op.
        j.append(&[(299, &all[298]), (300, &all[299])]).unwrap();
        assert_eq!(j.last_seq(), 300);
        assert!(j.append(&[(302, &all[0])]).is_err(), "a gap is refused");
        for after in [0, 1, 63, 64, 65, 128, 250, 299, 300] {
            let page = j.records(after, 10).unwrap();
            let want: Vec<u64> = (after + 1..=300).take(10).collect();
            let got: Vec<u64> = page.iter().map(|(s, _)| *s).collect();
            assert_eq!(got, want, "after {after}");
            for (s, r) in &page {
                assert_eq!(r.encode_to_vec(), all[*s as usize - 1]);
            }
        }
    }

    #[test]
    fn reopen_cuts_a_torn_tail_and_keeps_the_synced_part() {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<Vec<u8>> = (1..=200).map(rec).collect();
        let batch = |r: std::ops::RangeInclusive<u64>| -> Vec<(u64, &[u8])> {
            r.map(|s| (s, all[s as usize - 1].as_slice())).collect()
        };
        let len_after_150 = {
            let (db, j) = journal(dir.path());
            j.append(&batch(1..=150)).unwrap();
            j.sync().unwrap();
            db.flush().unwrap();
            let len = j.lock().len;
            j.append(&batch(151..=200)).unwrap();
            len
        };
        // A crash: the unsynced tail is torn mid-frame and zero-filled.
        let path = dir.path().join(FILE);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let cut = len_after_150 + 3 * 120 + 5;
        f.set_len(cut).unwrap();
        f.set_len(cut + 4096).unwrap();
        let (_db, j) = journal(dir.path());
        let last = j.last_seq();
        assert!((150..200).contains(&last), "kept {last}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            j.lock().len,
            "the torn tail is cut off"
        );
        // The write-ahead log replay then continues the journal.
        j.append(&batch(1..=200)).unwrap();
        assert_eq!(j.last_seq(), 200);
        let got: Vec<u64> = j.records(140, 100).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(got, (141..=200).collect::<Vec<_>>());
    }

    #[test]
    fn raw_rewrites_keep_the_index_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, j) = journal(dir.path());
        let all: Vec<Vec<u8>> = (1..=150).map(rec).collect();
        let batch: Vec<(u64, &[u8])> = (1..=150u64)
            .map(|s| (s, all[s as usize - 1].as_slice()))
            .collect();
        j.append(&batch).unwrap();
        let raw = RawAudit(&j);
        raw.remove(70).unwrap();
        let long = AuditRecord {
            body: vec![9; 5000],
            ..Default::default()
        };
        raw.put(3, &long).unwrap();
        assert_eq!(raw.get(3).unwrap(), long);
        assert!(raw.get(70).is_none());
        let got: Vec<u64> = j.records(128, 5).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(got, vec![129, 130, 131, 132, 133]);
        let got: Vec<u64> = j.records(68, 3).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(got, vec![69, 71, 72]);
    }
}
