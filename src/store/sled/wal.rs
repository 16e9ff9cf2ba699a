//! The write-ahead log of the embedded backend: how a write becomes durable
//! without asking sled to flush.
//!
//! Why it exists: sled 0.34 makes every multi-key batch or transaction
//! durable on its own (it seals its I/O buffer before and after each one and
//! writes it with a waited `sync_file_range`), and its `flush` does the
//! same. Measured under load, that was one synchronous disk write per
//! request, on a pool of threads, and the vault spent most of its time
//! there. So the vault keeps its own log and uses sled only as the
//! queryable state behind it:
//!
//! 1. A writer decides what to change (under the store's state lock, so
//!    checks like "token taken" see earlier writes that are not applied
//!    yet) and queues the changes of one operation as one entry.
//! 2. A sync thread takes every queued entry and appends them to the
//!    current [`Segment`] with one synchronous write (group commit: under
//!    load one write serves dozens of requests), then applies them to sled
//!    in log order with plain single-key writes (no sled batches, so no
//!    forced sled I/O) and answers the writers.
//! 3. A segment that has grown past [`SEGMENT_BYTES`] is closed; a helper
//!    thread flushes sled (which makes everything applied so far durable in
//!    sled) and deletes the closed segments.
//!
//! Recovery replays the remaining segments in order on open. Replay is
//! exact because sled never holds a change the log does not: changes reach
//! sled only after their log write is durable, and replaying blind
//! puts/removes in log order over any prefix of them gives the same state.
//! A torn last frame (crash in mid-write) is dropped with everything after
//! it; such a frame was never acknowledged. Anything else that is wrong is
//! damage to acknowledged writes, and replay refuses it ([`End::Corrupt`],
//! DATA_LOSS at open) rather than drop them. What tells the two apart
//! ([`end_of`]):
//!
//! * The header has its own checksum and a marker byte at each end, so a
//!   damaged length is never trusted (a length read as too long once made
//!   replay call megabytes of acknowledged frames a torn tail).
//! * A crash can only have left parts of the last write unwritten, and the
//!   log's unwritten space is zeroes: a torn frame has a sector (512 bytes,
//!   the smallest unit disks write whole) of its extent still zero. A bad
//!   frame whose every sector was written, or whose header is written but
//!   does not check, was damaged after it was written.
//! * Nothing lies further on than one write ([`MAX_WRITE`]) reaches from a
//!   torn frame: frames written after it prove it was acknowledged.
//!
//! Frame: `0xC5 | len u32 LE | crc32(payload) u32 LE | crc32(the 9 bytes
//! before) u32 LE | 0x5C | payload`; payload: repeated `tree u8 | op u8 (0
//! remove, 1 put) | klen u32 LE | key | [vlen u32 LE | value]`. Segments
//! of this format are `cardvault-wal2.N`; `cardvault-wal.N` segments, whose
//! frames had an 8-byte header without its own checksum, are still
//! replayed ([`legacy`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::disk::{Disk, DiskFile, OpenMode, OsDisk};

/// A segment is closed (and deleted once sled is flushed) past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The segment file is extended with written zeros this much at a time, so
/// that most syncs only flush data: appending past the end of a file (or
/// into unwritten space) also makes `fdatasync` write the inode.
pub const PREALLOCATE: u64 = 1 << 20;

/// Largest frame replay accepts; a length above it is a torn or corrupt header.
const MAX_FRAME: usize = 256 << 20;

/// The most frame bytes one write to a segment carries; a larger append is
/// made as several writes, each durable before the next. A crash can then
/// tear only the bytes of the last write, so replay can tell a torn last
/// write from damage to frames written before it ([`End`]). 1 MiB is
/// dozens of group commits under load, and one write per MiB costs nothing
/// next to writing the MiB.
pub const MAX_WRITE: usize = 1 << 20;

const SEGMENT_PREFIX: &str = "cardvault-wal2.";

/// Bytes of a frame header.
pub const HEADER: usize = 14;
/// First byte of every header: never zero, so a written header is never
/// mistaken for unwritten space, whichever sector of it was lost.
const MAGIC_HEAD: u8 = 0xC5;
/// Last byte of every header (see [`MAGIC_HEAD`]).
const MAGIC_TAIL: u8 = 0x5C;
/// The unit a crash leaves written or unwritten as a whole. Devices write
/// 512-byte sectors (or 4 KiB ones, which are whole 512-byte sectors too)
/// atomically; a device that tears inside a sector makes a torn write look
/// like damage, which is refused (DATA_LOSS), never dropped silently.
const SECTOR: usize = 512;

/// One change to one sled tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    /// Which tree (an index the store assigns).
    pub tree: u8,
    /// The key.
    pub key: Vec<u8>,
    /// New value, or `None` to remove the key.
    pub value: Option<Vec<u8>>,
}

/// Appends the frame for one operation's mutations to `out`.
pub fn encode_frame(muts: &[Mutation], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    for m in muts {
        out.push(m.tree);
        out.push(u8::from(m.value.is_some()));
        out.extend_from_slice(&(m.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&m.key);
        if let Some(v) = &m.value {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
    let payload = &out[start + HEADER..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    let h = &mut out[start..start + HEADER];
    h[0] = MAGIC_HEAD;
    h[1..5].copy_from_slice(&len);
    h[5..9].copy_from_slice(&crc);
    let hcrc = crc32fast::hash(&h[..9]).to_le_bytes();
    h[9..13].copy_from_slice(&hcrc);
    h[13] = MAGIC_TAIL;
}

/// What the bytes at a frame position hold.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// A header that checks: a frame of `len` payload bytes and checksum `crc`.
    Valid { len: usize, crc: u32 },
    /// Part of it is unwritten (a whole sector's share of it is zero, or the
    /// buffer ends): what a torn write leaves.
    Unwritten,
    /// Written, but it does not check: damage.
    Damaged,
}

/// Whether `buf[from..to]` has a sector's share that is all zero, or runs
/// past the end of `buf` (a part a crash may have left unwritten).
fn has_unwritten_sector(buf: &[u8], from: usize, to: usize) -> bool {
    if to > buf.len() {
        return true;
    }
    let mut at = from;
    while at < to {
        let next = ((at / SECTOR + 1) * SECTOR).min(to);
        if buf[at..next].iter().all(|b| *b == 0) {
            return true;
        }
        at = next;
    }
    false
}

fn header_at(buf: &[u8], pos: usize) -> Header {
    let Some(h) = buf.get(pos..pos + HEADER) else {
        return Header::Unwritten;
    };
    let len = u32::from_le_bytes(h[1..5].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(h[5..9].try_into().expect("4 bytes"));
    let hcrc = u32::from_le_bytes(h[9..13].try_into().expect("4 bytes"));
    if h[0] == MAGIC_HEAD
        && h[13] == MAGIC_TAIL
        && crc32fast::hash(&h[..9]) == hcrc
        && (1..=MAX_FRAME).contains(&len)
    {
        Header::Valid { len, crc }
    } else if has_unwritten_sector(buf, pos, pos + HEADER) {
        Header::Unwritten
    } else {
        Header::Damaged
    }
}

/// Decodes frames from `buf` until the end or the first frame that is torn
/// or corrupt. Returns the operations and the length of the valid prefix.
pub fn decode_frames(buf: &[u8]) -> (Vec<Vec<Mutation>>, usize) {
    let mut ops = Vec::new();
    let mut pos = 0;
    while let Header::Valid { len, crc } = header_at(buf, pos) {
        let Some(payload) = buf.get(pos + HEADER..pos + HEADER + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(muts) = decode_payload(payload) else {
            break;
        };
        ops.push(muts);
        pos += HEADER + len;
    }
    (ops, pos)
}

/// Where the frames of `buf`'s valid prefix start, with their header
/// lengths (for tests that damage headers).
pub fn frame_spans(buf: &[u8]) -> Vec<(usize, usize)> {
    let (_, valid) = decode_frames(buf);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < valid {
        let Header::Valid { len, .. } = header_at(buf, pos) else {
            break;
        };
        out.push((pos, HEADER));
        pos += HEADER + len;
    }
    out
}

fn decode_payload(mut p: &[u8]) -> Option<Vec<Mutation>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn take_len(p: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(p, 4)?.try_into().ok()?) as usize)
    }
    let mut muts = Vec::new();
    while !p.is_empty() {
        let tree = take(&mut p, 1)?[0];
        let op = take(&mut p, 1)?[0];
        let klen = take_len(&mut p)?;
        let key = take(&mut p, klen)?.to_vec();
        let value = match op {
            0 => None,
            1 => {
                let vlen = take_len(&mut p)?;
                Some(take(&mut p, vlen)?.to_vec())
            }
            _ => return None,
        };
        muts.push(Mutation { tree, key, value });
    }
    Some(muts)
}

/// Path of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{n:016}"))
}

/// Numbers of the segments in `dir`, ascending.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    segments_on(&OsDisk, dir)
}

/// [`segments`] on `disk`.
pub fn segments_on(disk: &dyn Disk, dir: &Path) -> std::io::Result<Vec<u64>> {
    numbered(disk, dir, SEGMENT_PREFIX)
}

fn numbered(disk: &dyn Disk, dir: &Path, prefix: &str) -> std::io::Result<Vec<u64>> {
    let mut out: Vec<u64> = disk
        .list(dir)?
        .iter()
        .filter_map(|name| name.strip_prefix(prefix)?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// How a segment ends after its last valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Only zeroes follow: preallocated space, never written.
    Clean,
    /// Something other than zeroes follows, but within reach of one write
    /// from the last valid frame: a write torn by a crash, never
    /// acknowledged, dropped. (Damage this close to the end looks the same.)
    Torn,
    /// Bytes follow further on than the write that could have been torn
    /// reaches: later writes exist, so the frame at byte `at` is damage to
    /// a write that was acknowledged, not a torn one.
    Corrupt {
        /// Offset of the first frame that is not valid.
        at: u64,
    },
}

/// Tells how `buf` ends after its valid prefix of `valid` bytes.
///
/// Why it holds: appends go at the end, one write at a time, each durable
/// before the next, and a write carries at most [`MAX_WRITE`] new bytes
/// (direct mode also rewrites the last partial block, with the bytes it
/// already holds). So a crash can leave unwritten (zero: the space is
/// written with zeroes before frames go into it) only sectors of the last
/// write, and nothing written lies further than `MAX_WRITE` past the start
/// of the first frame it tore, plus that frame's own length when its header
/// was written. A bad frame that is not like that was damaged after it was
/// written, and it was acknowledged: [`End::Corrupt`].
pub fn end_of(buf: &[u8], valid: usize) -> End {
    let Some(last) = buf[valid..].iter().rposition(|b| *b != 0) else {
        return End::Clean;
    };
    let corrupt = End::Corrupt { at: valid as u64 };
    let reach = match header_at(buf, valid) {
        Header::Valid { len, .. } => {
            // A frame whose every sector was written cannot be torn (nor
            // can one that checks but does not decode).
            if !has_unwritten_sector(buf, valid + HEADER, valid + HEADER + len) {
                return corrupt;
            }
            HEADER + len
        }
        Header::Unwritten => HEADER,
        Header::Damaged => return corrupt,
    };
    if last >= reach + MAX_WRITE {
        corrupt
    } else {
        End::Torn
    }
}

/// Reads segment `n`: the operations of its valid frames, and how it ends
/// after them ([`End`]; on `Torn` or `Corrupt` the rest was not decoded).
pub fn read_segment(dir: &Path, n: u64) -> std::io::Result<(Vec<Vec<Mutation>>, End)> {
    read_segment_on(&OsDisk, dir, n)
}

/// [`read_segment`] on `disk`.
pub fn read_segment_on(
    disk: &dyn Disk,
    dir: &Path,
    n: u64,
) -> std::io::Result<(Vec<Vec<Mutation>>, End)> {
    let buf = disk.read(&segment_path(dir, n))?;
    let (ops, valid) = decode_frames(&buf);
    Ok((ops, end_of(&buf, valid)))
}

/// Segments of the earlier format (`cardvault-wal.N`): frames with an
/// 8-byte header, `len u32 LE | crc32 u32 LE`, and no header checksum.
/// A vault that crashed before an upgrade still replays them; new
/// segments are never written so.
pub mod legacy {
    use std::path::{Path, PathBuf};

    use super::{Disk, End, MAX_FRAME, MAX_WRITE, Mutation, decode_payload};

    const PREFIX: &str = "cardvault-wal.";

    /// Path of legacy segment `n` in `dir`.
    pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
        dir.join(format!("{PREFIX}{n:016}"))
    }

    /// Numbers of the legacy segments in `dir`, ascending.
    pub fn segments(disk: &dyn Disk, dir: &Path) -> std::io::Result<Vec<u64>> {
        super::numbered(disk, dir, PREFIX)
    }

    fn decode_frames(buf: &[u8]) -> (Vec<Vec<Mutation>>, usize) {
        let mut ops = Vec::new();
        let mut pos = 0;
        while let Some(header) = buf.get(pos..pos + 8) {
            let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
            if len == 0 || len > MAX_FRAME {
                break;
            }
            let Some(payload) = buf.get(pos + 8..pos + 8 + len) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                break;
            }
            let Some(muts) = decode_payload(payload) else {
                break;
            };
            ops.push(muts);
            pos += 8 + len;
        }
        (ops, pos)
    }

    /// Reads legacy segment `n`. Without a header checksum a damaged length
    /// cannot be told from a torn one, so anything but zeroes after the
    /// valid frames is refused ([`End::Corrupt`]) unless it lies within
    /// one write of them and the header is all there is to go on.
    pub fn read_segment(
        disk: &dyn Disk,
        dir: &Path,
        n: u64,
    ) -> std::io::Result<(Vec<Vec<Mutation>>, End)> {
        let buf = disk.read(&segment_path(dir, n))?;
        let (ops, valid) = decode_frames(&buf);
        let end = match buf[valid..].iter().rposition(|b| *b != 0) {
            None => End::Clean,
            // The length is not trusted: only a tail within one write of
            // the last valid frame can be a torn write.
            Some(last) if last < 8 + MAX_WRITE => End::Torn,
            Some(_) => End::Corrupt { at: valid as u64 },
        };
        Ok((ops, end))
    }
}

/// Alignment of direct I/O (covers 512-byte and 4 KiB logical blocks).
const ALIGN: usize = 4096;

/// Heap memory whose window starts on an [`ALIGN`] boundary, as `O_DIRECT`
/// requires (found by offset into an over-sized `Vec`: no unsafe code).
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        AlignedBuf {
            raw: Vec::new(),
            off: 0,
        }
    }

    /// An aligned window of `n` bytes (contents unspecified).
    fn window(&mut self, n: usize) -> &mut [u8] {
        if self.raw.len() < self.off + n {
            self.raw = vec![0; n + ALIGN];
            self.off = (ALIGN - self.raw.as_ptr() as usize % ALIGN) % ALIGN;
        }
        &mut self.raw[self.off..self.off + n]
    }
}

/// The segment being appended to.
///
/// Where the file system allows it the file is opened `O_DIRECT | O_DSYNC`:
/// a write returns once it is on the device, with no page-cache writeback
/// and no separate `fdatasync` (measured here: ~0.1 ms per 4 KiB write
/// instead of ~0.15-0.3 ms). Writes are then whole aligned blocks, so the
/// last partial block is kept in memory and rewritten, extended, by the
/// next append. Elsewhere it falls back to `write` + `fdatasync`.
pub struct Segment {
    /// Its number (segments sort by it).
    pub number: u64,
    file: Arc<dyn DiskFile>,
    /// Bytes of frames written so far (where the next frame goes).
    pub len: u64,
    /// Bytes of the file that exist on disk (frames, then zeroes).
    allocated: u64,
    /// Whether the file is open for direct, synchronous writes.
    direct: bool,
    /// Frame bytes of the last, partial block (direct mode).
    tail: Vec<u8>,
    /// Staging memory for direct writes.
    buf: AlignedBuf,
    /// Writes of frames made so far (a test sees appends split by it).
    writes: u64,
}

impl Segment {
    /// Creates segment `n` (empty) and makes its directory entry durable.
    pub fn create(dir: &Path, number: u64) -> std::io::Result<Segment> {
        Self::create_on(&OsDisk, dir, number)
    }

    /// [`Segment::create`] on `disk`.
    pub fn create_on(disk: &dyn Disk, dir: &Path, number: u64) -> std::io::Result<Segment> {
        Self::create_with(disk, dir, number, true)
    }

    fn create_with(
        disk: &dyn Disk,
        dir: &Path,
        number: u64,
        try_direct: bool,
    ) -> std::io::Result<Segment> {
        let path = segment_path(dir, number);
        let mut seg = Segment {
            number,
            file: disk.open(&path, OpenMode::NEW)?,
            len: 0,
            allocated: 0,
            direct: false,
            tail: Vec::new(),
            buf: AlignedBuf::new(),
            writes: 0,
        };
        if try_direct {
            let direct = OpenMode {
                direct: true,
                ..OpenMode::NEW
            };
            // Some file systems refuse O_DIRECT at open, others only at the
            // first write: try both before relying on it.
            if let Ok(file) = disk.open(&path, direct) {
                let block = seg.buf.window(ALIGN);
                block.fill(0);
                if file.write_all_at(block, 0).is_ok() {
                    seg.file = file;
                    seg.direct = true;
                }
            }
        }
        disk.sync_dir(dir)?;
        Ok(seg)
    }

    /// Creates segment `number` with its first `bytes` already written as
    /// zeroes (and synced), so appends into it never stop to grow the file.
    /// Run ahead of time on a helper thread: growing by
    /// [`PREALLOCATE`] on the group-commit thread stalled one commit per MiB.
    ///
    /// `pause` is slept between 1 MiB writes so that the fill does not
    /// monopolise the disk the group commits are waiting on.
    pub fn prepare(
        dir: &Path,
        number: u64,
        bytes: u64,
        pause: std::time::Duration,
    ) -> std::io::Result<Segment> {
        Self::prepare_on(&OsDisk, dir, number, bytes, pause)
    }

    /// [`Segment::prepare`] on `disk`.
    pub fn prepare_on(
        disk: &dyn Disk,
        dir: &Path,
        number: u64,
        bytes: u64,
        pause: std::time::Duration,
    ) -> std::io::Result<Segment> {
        let mut seg = Self::create_on(disk, dir, number)?;
        while seg.allocated < bytes {
            let zeros = seg.buf.window(PREALLOCATE as usize);
            zeros.fill(0);
            seg.file.write_all_at(zeros, seg.allocated)?;
            seg.allocated += PREALLOCATE;
            std::thread::sleep(pause);
        }
        if !seg.direct {
            seg.file.sync()?;
        }
        Ok(seg)
    }

    /// Bytes of the file already written (frames, then zeroes): appends
    /// up to this length never grow the file.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Makes the next append start at the beginning of the file again,
    /// over what is there. Only for a scratch log that is never replayed
    /// (the bench's durable baseline): replay would stop at the first
    /// frame that no longer chains.
    pub fn rewind(&mut self) {
        self.len = 0;
        self.tail.clear();
    }

    /// Writes of frames made so far: an append of more than [`MAX_WRITE`]
    /// bytes makes several.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Appends `frames` and waits until they are on disk, with one write per
    /// [`MAX_WRITE`] bytes, each durable before the next.
    pub fn append_durable(&mut self, frames: &[u8]) -> std::io::Result<()> {
        let end = self.len + frames.len() as u64;
        if end > self.allocated {
            // Replay stops at the zeroes. Direct writes are durable at once;
            // buffered ones with the sync below.
            let grow = (end - self.allocated).div_ceil(PREALLOCATE) * PREALLOCATE;
            let zeros = self.buf.window(grow as usize);
            zeros.fill(0);
            self.file.write_all_at(zeros, self.allocated)?;
            self.allocated += grow;
        }
        for chunk in frames.chunks(MAX_WRITE) {
            self.write_durable(chunk)?;
        }
        Ok(())
    }

    /// Writes `frames` (at most [`MAX_WRITE`] bytes) at the end, durably.
    fn write_durable(&mut self, frames: &[u8]) -> std::io::Result<()> {
        if self.direct {
            let start = self.len - self.tail.len() as u64;
            let data = self.tail.len() + frames.len();
            let w = self.buf.window(data.div_ceil(ALIGN) * ALIGN);
            w[..self.tail.len()].copy_from_slice(&self.tail);
            w[self.tail.len()..data].copy_from_slice(frames);
            w[data..].fill(0);
            self.file.write_all_at(w, start)?;
            self.tail = w[data - data % ALIGN..data].to_vec();
        } else {
            self.file.write_all_at(frames, self.len)?;
            self.file.sync()?;
        }
        self.len += frames.len() as u64;
        self.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(tree: u8, key: &[u8], value: Option<&[u8]>) -> Mutation {
        Mutation {
            tree,
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn frames_round_trip_and_stop_at_a_torn_tail() {
        let a = vec![m(0, b"k1", Some(b"v1")), m(3, b"k2", None)];
        let b = vec![m(2, b"", Some(b""))];
        let mut buf = Vec::new();
        encode_frame(&a, &mut buf);
        encode_frame(&b, &mut buf);
        let whole = buf.len();
        assert_eq!(decode_frames(&buf), (vec![a.clone(), b.clone()], whole));
        // Every truncation keeps exactly the frames that are complete.
        let first = {
            let mut one = Vec::new();
            encode_frame(&a, &mut one);
            one.len()
        };
        for cut in 0..whole {
            let (ops, valid) = decode_frames(&buf[..cut]);
            let want = if cut >= first { 1 } else { 0 };
            assert_eq!(ops.len(), want, "cut at {cut}");
            assert_eq!(valid, if want == 1 { first } else { 0 });
        }
        // A flipped bit in the second frame drops it, not the first.
        let mut bad = buf.clone();
        bad[whole - 1] ^= 1;
        assert_eq!(decode_frames(&bad), (vec![a], first));
        // Zeroes (a preallocated or never-written tail) end the log.
        let mut zeros = buf.clone();
        zeros.extend_from_slice(&[0; 32]);
        assert_eq!(decode_frames(&zeros).1, whole);
    }

    /// Appends of every size, in direct and buffered mode, read back
    /// whole after each append (direct mode rewrites the partial block).
    #[test]
    fn appends_of_any_size_read_back_in_both_modes() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut seg = Segment::create_with(&OsDisk, dir.path(), 1, direct).unwrap();
            let mut want = Vec::new();
            for i in 0..300usize {
                let op = vec![m(
                    3,
                    &i.to_be_bytes(),
                    Some(&vec![i as u8; (i * 37) % 5000]),
                )];
                let mut f = Vec::new();
                encode_frame(&op, &mut f);
                if i % 3 == 0 {
                    // Several frames in one append, as a group commit does.
                    encode_frame(&op, &mut f);
                    want.push(op.clone());
                }
                seg.append_durable(&f).unwrap();
                want.push(op);
                if i % 50 == 0 || i == 299 {
                    let (ops, end) = read_segment(dir.path(), 1).unwrap();
                    assert_eq!(end, End::Clean, "direct={direct} i={i}");
                    assert_eq!(ops, want, "direct={direct} i={i}");
                }
            }
            assert!(seg.allocated >= seg.len && seg.allocated.is_multiple_of(PREALLOCATE));
            eprintln!("asked direct={direct}, got direct={}", seg.direct);
        }
    }

    /// One frame of `n` bytes of payload (a put of an `n - 10`-byte value).
    fn sized_frame(key: u32, n: usize) -> Vec<u8> {
        let mut f = Vec::new();
        encode_frame(
            &[m(1, &key.to_be_bytes(), Some(&vec![0xA5; n - 14]))],
            &mut f,
        );
        assert_eq!(f.len(), n + HEADER);
        f
    }

    /// An append of more than [`MAX_WRITE`] bytes is made as several writes
    /// of at most that many, in both modes, and reads back whole.
    #[test]
    fn a_large_append_is_made_as_writes_of_at_most_max_write() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut seg = Segment::create_with(&OsDisk, dir.path(), 1, direct).unwrap();
            seg.append_durable(&sized_frame(0, 100)).unwrap();
            assert_eq!(seg.writes(), 1);
            // One frame larger than a write, then several that together are.
            let mut frames = sized_frame(1, MAX_WRITE + 5000);
            for k in 2..40 {
                frames.extend_from_slice(&sized_frame(k, 40_000));
            }
            let len = frames.len();
            seg.append_durable(&frames).unwrap();
            assert_eq!(seg.writes(), 1 + len.div_ceil(MAX_WRITE) as u64);
            let (ops, end) = read_segment(dir.path(), 1).unwrap();
            assert_eq!((ops.len(), end), (40, End::Clean), "direct={direct}");
        }
    }

    /// Tiny deterministic generator for the tear patterns below.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// A crash in mid-write leaves any subset of the 512-byte sectors of the
    /// last write's new bytes written, the rest zero. Whatever the subset,
    /// replay keeps every frame before that write and never calls it
    /// corruption. Damage to any frame before the tear is told apart
    /// (`Corrupt`), near the end too, and so is a lost block further back.
    #[test]
    fn a_torn_last_write_is_told_from_damage_before_it() {
        // Frames of 300 B to 40 KiB, about 2.5 MiB in all, in appends of
        // one to eight frames; the last append (a single large frame, made
        // as two writes, or a small one) is the one torn.
        for last_is_large in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut seg = Segment::create_with(&OsDisk, dir.path(), 1, false).unwrap();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            let mut starts = Vec::new();
            let mut key = 0;
            while seg.len < (5 * MAX_WRITE / 2) as u64 {
                let mut frames = Vec::new();
                for _ in 0..=next(&mut rng) % 8 {
                    starts.push(seg.len as usize + frames.len());
                    frames.extend_from_slice(&sized_frame(
                        key,
                        300 + (next(&mut rng) % 40_000) as usize,
                    ));
                    key += 1;
                }
                seg.append_durable(&frames).unwrap();
            }
            let before = starts.len();
            let last_len = if last_is_large {
                MAX_WRITE + 300_000
            } else {
                3000
            };
            let begin = seg.len as usize;
            starts.push(begin);
            seg.append_durable(&sized_frame(key, last_len)).unwrap();
            let written = std::fs::read(segment_path(dir.path(), 1)).unwrap();
            let end = seg.len as usize;
            // The new bytes of the last write (the second, for the large one).
            let torn_from = if last_is_large {
                begin + MAX_WRITE
            } else {
                begin
            };
            assert_eq!(end_of(&written, end), End::Clean);

            for _ in 0..200 {
                let mut buf = written.clone();
                let mut sector = torn_from / 512 * 512;
                while sector < end {
                    if next(&mut rng) & 1 == 0 {
                        buf[sector.max(torn_from)..(sector + 512).min(end)].fill(0);
                    }
                    sector += 512;
                }
                let (ops, valid) = decode_frames(&buf);
                let got = end_of(&buf, valid);
                assert!(
                    !matches!(got, End::Corrupt { .. }),
                    "a tear taken for damage (large={last_is_large})"
                );
                assert!(
                    ops.len() >= before,
                    "a frame before the last write was lost"
                );
            }

            // A flipped byte in an early frame, with later writes after it.
            for (i, &at) in starts.iter().enumerate().take(before) {
                let next_start = starts[i + 1];
                let mut buf = written.clone();
                buf[(at + next_start) / 2] ^= 0x40;
                let (ops, valid) = decode_frames(&buf);
                assert_eq!((ops.len(), valid), (i, at));
                // Every sector of it is written, so it is damage, however
                // close to the end (there is no blind zone).
                assert_eq!(
                    end_of(&buf, valid),
                    End::Corrupt { at: at as u64 },
                    "frame {i}"
                );
            }
            // A lost block (read back as zeroes) early in the segment.
            let mut buf = written.clone();
            buf[8192..12288].fill(0);
            let (_, valid) = decode_frames(&buf);
            assert!(valid <= 8192);
            assert_eq!(end_of(&buf, valid), End::Corrupt { at: valid as u64 });
        }
    }

    #[test]
    fn a_prepared_segment_is_zeroed_ahead_and_replays_empty_or_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg =
            Segment::prepare(dir.path(), 9, 3 * PREALLOCATE - 1, Default::default()).unwrap();
        assert_eq!(seg.allocated, 3 * PREALLOCATE);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 9))
                .unwrap()
                .len(),
            3 * PREALLOCATE
        );
        // Unused, it replays as an empty segment (not a torn one).
        let (ops, end) = read_segment(dir.path(), 9).unwrap();
        assert!(ops.is_empty() && end == End::Clean);
        let mut frames = Vec::new();
        encode_frame(&[m(1, b"k", Some(b"v"))], &mut frames);
        seg.append_durable(&frames).unwrap();
        assert_eq!(seg.allocated, 3 * PREALLOCATE, "no growth needed");
        let (ops, end) = read_segment(dir.path(), 9).unwrap();
        assert_eq!((ops.len(), end), (1, End::Clean));
    }

    #[test]
    fn a_rewound_segment_is_written_from_the_start_without_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::prepare(dir.path(), 3, PREALLOCATE, Default::default()).unwrap();
        let mut a = Vec::new();
        encode_frame(&[m(1, b"first", Some(&[1; 5000]))], &mut a);
        // Leaves a partial last block, which a rewind must not carry over.
        seg.append_durable(&a).unwrap();
        assert!(!seg.len.is_multiple_of(ALIGN as u64));
        seg.rewind();
        let mut b = Vec::new();
        encode_frame(&[m(2, b"second", Some(b"v"))], &mut b);
        seg.append_durable(&b).unwrap();
        assert_eq!(seg.len, b.len() as u64);
        assert_eq!(seg.allocated(), PREALLOCATE, "no growth");
        // The new frame is first; what follows it no longer chains.
        let (ops, _) = read_segment(dir.path(), 3).unwrap();
        assert_eq!(ops.first(), Some(&vec![m(2, b"second", Some(b"v"))]));
    }

    #[test]
    fn segments_are_listed_in_order_and_other_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for n in [10, 2, 1] {
            let mut s = Segment::create(dir.path(), n).unwrap();
            let mut f = Vec::new();
            encode_frame(&[m(1, b"k", Some(b"v"))], &mut f);
            s.append_durable(&f).unwrap();
        }
        std::fs::write(dir.path().join("conf"), b"x").unwrap();
        std::fs::write(dir.path().join("cardvault-wal.x"), b"x").unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![1, 2, 10]);
        let (ops, end) = read_segment(dir.path(), 10).unwrap();
        assert_eq!((ops.len(), end), (1, End::Clean));
    }
}
