//! The embedded default backend: sled 0.34 for state, and the vault's own
//! write-ahead log ([`super::wal`]) for atomicity and durability.
//!
//! Why not sled's own durability: every sled batch or transaction, and every
//! `flush`, writes sled's I/O buffer out with a waited `sync_file_range`, so
//! durable multi-key writes cost one synchronous disk write each whatever
//! the grouping; measured, that bounded the vault at a fraction of what
//! gRPC + TLS alone reach. Here a write works like this:
//!
//! * The writer reads from sled what its checks need (token taken, dedupe,
//!   key present; skipped for record and fingerprint keys an in-memory
//!   filter has never seen, see `sled/filter.rs`), then, under the state
//!   lock, checks against those values overlaid with the changes queued
//!   but not yet applied (re-reading if a batch finished applying
//!   meanwhile), extends the audit chain if it writes an audit record, and
//!   queues the operation's changes as one log entry.
//! * The sync thread appends all queued entries with one synchronous write
//!   (group commit), answers the writers (their changes are durable), then
//!   applies the changes to sled in log order with plain single-key
//!   writes. Until then point reads find acknowledged changes in the
//!   overlay of queued changes, and scans first wait for a barrier
//!   (answered after the apply), so every read sees every acknowledged
//!   write. Audit records go to an append-only journal file instead, one
//!   write per batch (see `sled/journal.rs`); the head goes to sled once per
//!   batch, after them.
//! * Entries nobody waits for (metadata reads' audit records) are held up
//!   to [`BUFFERED_LINGER`] to share a sync; a waiting writer ends the wait.
//! * Closed log segments are deleted, once the journal is synced and sled
//!   flushed, on a helper thread; on open, what is left of the log is
//!   replayed (see [`super::wal`]).
//!
//! If the log cannot be written the store fails closed: that batch and
//! every later write return `UNAVAILABLE` until a restart replays the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use tokio::sync::oneshot;

use super::disk::{Disk, OsDisk};
use crate::sync::Recover;

mod buckets;
mod commit;
mod recovery;
use commit::*;
use recovery::*;
mod filter;
mod journal;
mod tenant_audit;
pub mod wal;
use super::{AuditLink, BucketCard, InsertOutcome, Store, StoredRecord};
use crate::audit::{AuditBody, AuditRecord, Checkpoint, GENESIS};
use crate::error::{Error, Result};
pub use journal::FILE as AUDIT_FILE;
#[cfg(feature = "fault-injection")]
pub use journal::RawAudit;
use wal::{Mutation, Segment};

/// Longest a batch of buffered audit records (nobody waiting) is held
/// back to share one sync with later writes.
pub const BUFFERED_LINGER: Duration = Duration::from_millis(5);

/// Pause between the 1 MiB zero writes that prepare the next log segment:
/// 65 MiB then take at least 1.3 s (50 MB/s at most), while the current
/// segment's second half takes several seconds to fill at the highest
/// rates measured here (~8 MB/s of log).
const PREPARE_PAUSE: Duration = Duration::from_millis(20);

/// Key of the audit head `(seq, hash)`: in the `meta` tree (format 3), in
/// the bucket tree before (where record keys were 8-byte seqs and this
/// longer key was skipped by scans). Written to the log as a change of
/// tree [`AUDIT`].
const AUDIT_HEAD: &[u8] = b"~audit-head";

/// Tree numbers as written in the log.
const RECORDS: u8 = 0;
const FINGERPRINTS: u8 = 1;
const KEYS: u8 = 2;
const AUDIT: u8 = 3;
const CHECKPOINTS: u8 = 4;
const GUARD: u8 = 5;

type Reply = oneshot::Sender<std::result::Result<(), String>>;
type ReplyRx = oneshot::Receiver<std::result::Result<(), String>>;
/// A queued value by `(tree, key)`: the lsn that wrote it and the value.
type Pending = HashMap<(u8, Vec<u8>), (u64, Option<Vec<u8>>)>;

/// The sled trees, by the number the log uses for each.
struct Trees {
    /// Records by `tenant \0 token`.
    records: sled::Tree,
    /// Fingerprint index: `tenant \0 fingerprint` -> token, and each
    /// bucket's first card in its slot (see `slot_key`).
    fingerprints: sled::Tree,
    /// Wrapped keys and vault metadata by name.
    keys: sled::Tree,
    /// Audit records in their append-only file, and the head (see
    /// `sled/journal.rs`).
    journal: journal::Journal,
    /// Signed checkpoints by big-endian seq.
    checkpoints: sled::Tree,
    /// Enumeration-guard state by `tenant \0 bucket`.
    guard: sled::Tree,
    /// Each tenant's audit records, numbered (see [`tenant_audit`]).
    tenant_audit: tenant_audit::TenantIndex,
}

impl Trees {
    fn get(&self, tree: u8) -> Option<&sled::Tree> {
        match tree {
            RECORDS => Some(&self.records),
            FINGERPRINTS => Some(&self.fingerprints),
            KEYS => Some(&self.keys),
            CHECKPOINTS => Some(&self.checkpoints),
            GUARD => Some(&self.guard),
            _ => None,
        }
    }

    /// Reads one key of one of the store's own trees.
    fn read(&self, tree: u8, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let t = self.get(tree).expect("the store names only its own trees");
        Ok(t.get(key).map_err(unavailable)?.map(|v| v.to_vec()))
    }

    /// Applies one change as it is.
    fn write_one(&self, m: &Mutation) -> Result<()> {
        let tree = self
            .get(m.tree)
            .ok_or_else(|| corrupt(format!("log names unknown tree {}", m.tree)))?;
        match &m.value {
            Some(v) => tree.insert(m.key.as_slice(), v.as_slice()),
            None => tree.remove(m.key.as_slice()),
        }
        .map_err(unavailable)?;
        Ok(())
    }

    /// Applies logged changes in log order, except that the batch's audit
    /// records are appended to the journal with one write, and the audit
    /// head, written once with its last value, goes last, so a reader never
    /// sees a head ahead of its records.
    fn apply<'a>(&self, muts: impl IntoIterator<Item = &'a Mutation>) -> Result<()> {
        let mut head = None;
        let mut audit: Vec<(u64, &[u8])> = Vec::new();
        for m in muts {
            if m.tree != AUDIT {
                self.write_one(m)?;
            } else if m.key == AUDIT_HEAD {
                head = m.value.as_deref();
            } else {
                let seq = m
                    .key
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt("log holds a malformed audit key".into()))?;
                let rec = m.value.as_deref().ok_or_else(|| {
                    corrupt("log removes an audit record (never written so)".into())
                })?;
                audit.push((seq, rec));
            }
        }
        self.journal.append(&audit)?;
        if let Some(h) = head {
            self.journal.set_head(h)?;
        }
        Ok(())
    }
}

/// One operation waiting for the sync thread.
struct Entry {
    /// Position in the log; entries are applied in this order.
    lsn: u64,
    /// Its changes (empty for a barrier).
    muts: Vec<Mutation>,
    /// Who to tell: a write once it is durable in the log, a barrier once
    /// it is applied (`None` for buffered audit records nobody waits for).
    reply: Option<Reply>,
}

/// What writers and the log threads share, under one lock.
struct State {
    /// Audit chain head `(seq, hash)` including queued records, so each new
    /// record links to the one queued before it.
    head: (u64, Vec<u8>),
    /// Lsn the next entry gets.
    next_lsn: u64,
    /// Entries not yet taken by the sync thread.
    queue: Vec<Entry>,
    /// Latest queued-but-unapplied value per `(tree, key)` with its lsn, so
    /// writers' checks, and reads of acknowledged writes (see
    /// [`SledStore::unapplied`]), see what sled does not show yet.
    pending: Pending,
    /// Set when the log could not be written or applied: the store then
    /// refuses every write (fail closed) until reopened.
    failed: Option<String>,
    /// Set on drop: the sync thread drains the queue and stops.
    closing: bool,
    /// Whether some queued entry has a writer waiting for it.
    waited_for: bool,
    /// Whether the sync thread is waiting on `Shared::work`.
    sleeping: bool,
}

/// State shared by the store handle and its threads.
struct Shared {
    trees: Trees,
    /// Where the log and the journal live (the OS file system outside
    /// crash tests).
    disk: Arc<dyn Disk>,
    /// Record, fingerprint and guard keys ever written, so tokenize's checks skip
    /// sled for keys certainly absent (see [`filter`]).
    filter: filter::KeyFilter,
    /// Every entry up to this lsn is durable and applied to sled. Written
    /// under the state lock (with `State::pending`), readable without it
    /// (see [`Prefetch`]).
    applied: AtomicU64,
    /// Every entry up to this lsn is durable in the log (writers are
    /// answered then, before the sled apply; see [`SledStore::unapplied`]).
    durable: AtomicU64,
    /// `State::pending.len()`, readable without the lock, so that reads
    /// skip the lock when no change is waiting to be applied.
    pending_len: AtomicUsize,
    /// Set once reads could miss acknowledged changes: a batch durable in
    /// the log failed to apply (sled lacks it, and the overlay is not a
    /// complete record of it: a later queued write may have replaced one
    /// of its entries), or a journal sync or sled flush failed (the kernel
    /// may drop pages that failed to write). Reads are then refused too,
    /// until the store is reopened and the log replayed. (After a failed
    /// log write nothing acknowledged is missing, and reads go on.)
    apply_failed: AtomicBool,
    /// Test hook: fail the next log write (see [`SledStore::fail_next_log_write`]).
    fail_next_write: AtomicBool,
    /// Test hook: fail the next apply (see [`SledStore::fail_next_apply`]).
    fail_next_apply: AtomicBool,
    /// Test hook: fail the cleaner's next journal sync (see
    /// [`SledStore::fail_next_journal_sync`]).
    fail_next_journal_sync: AtomicBool,
    /// Test hook: the apply waits while a test holds this for writing
    /// (see [`SledStore::hold_apply`]).
    apply_gate: std::sync::RwLock<()>,
    /// Log segment size past which a segment is closed.
    segment_bytes: u64,
    state: Mutex<State>,
    /// Wakes the sync thread: the queue became non-empty, or got its first
    /// entry that a writer waits for.
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().recover()
    }

    /// Reads a key from sled, unless the filter says it was never written.
    ///
    /// Sound for a key applied by a batch this caller has seen as applied
    /// (`applied` loaded with acquire ordering first, as [`Prefetch`] and
    /// the state lock do): its writer added it to the filter before queuing
    /// it. Keys present at open are in the filter once it is ready.
    fn read_filtered(&self, tree: u8, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if matches!(tree, RECORDS | FINGERPRINTS | GUARD) && !self.filter.may_contain(tree, key) {
            return Ok(None);
        }
        self.trees.read(tree, key)
    }
}

/// sled values read before taking the state lock, so that the lock is
/// held for hash lookups rather than sled reads. They are still valid
/// under the lock if no batch finished applying since they were read:
/// changes of a batch being applied meanwhile are all still in
/// `State::pending`, which is consulted first.
struct Prefetch {
    /// `Shared::applied` before the reads.
    seen: u64,
    values: Vec<(u8, Vec<u8>, Option<Vec<u8>>)>,
}

impl Prefetch {
    fn new(shared: &Shared) -> Prefetch {
        Prefetch {
            seen: shared.applied.load(Ordering::Acquire),
            values: Vec::new(),
        }
    }

    /// Reads `key` from sled and remembers it; returns the value.
    fn read(&mut self, shared: &Shared, tree: u8, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let v = shared.read_filtered(tree, key)?;
        self.values.push((tree, key.to_vec(), v.clone()));
        Ok(v)
    }
}

/// sled-backed [`Store`] with its own write-ahead log.
pub struct SledStore {
    shared: Arc<Shared>,
    /// The database, flushed on drop so the log can be deleted.
    db: sled::Db,
    /// Directory of the database and the log segments.
    dir: PathBuf,
    /// Group-commit thread (log write, sled apply, replies); joined on
    /// drop after it drained the queue.
    sync_thread: Option<JoinHandle<()>>,
    /// Deletes closed segments once sled is flushed; joined on drop.
    cleaner: Option<JoinHandle<()>>,
    /// Fills the key filter with the keys present at open; joined on drop.
    filler: Option<JoinHandle<()>>,
    /// Creates and zero-fills the next log segment ahead of need; ends
    /// with the sync thread, joined on drop.
    prepare_thread: Option<JoinHandle<()>>,
}

/// Why the embedded store failed. It converts into the crate's [`Error`]:
/// storage that cannot be used now is `UNAVAILABLE`, stored data that does
/// not decode or fit together is `DATA_LOSS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SledError {
    /// sled, the write-ahead log or the audit journal could not be read or
    /// written.
    Io(String),
    /// Stored data does not decode, or does not fit together (damage to
    /// acknowledged writes, never a torn last write).
    Corrupt(String),
    /// An earlier write, apply or sync failed: the store refuses writes
    /// (and, after a failed apply or sync, reads) until it is reopened and
    /// replays its log.
    Failed(String),
}

impl std::fmt::Display for SledError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SledError::Io(m) => write!(f, "storage (sled): {m}"),
            SledError::Corrupt(m) | SledError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for SledError {}

impl From<SledError> for Error {
    fn from(e: SledError) -> Error {
        match e {
            SledError::Io(_) | SledError::Failed(_) => Error::Unavailable(e.to_string()),
            SledError::Corrupt(_) => Error::DataLoss(e.to_string()),
        }
    }
}

/// A read or write of the store's files or of sled failed.
fn unavailable(e: impl std::fmt::Display) -> Error {
    SledError::Io(e.to_string()).into()
}

/// Stored data is damaged.
fn corrupt(why: String) -> Error {
    SledError::Corrupt(why).into()
}

fn record_key(tenant: &str, token: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + token.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(token.as_bytes());
    k
}

/// `tenant \0 bucket`, as record and fingerprint keys are built.
fn guard_key(tenant: &str, bucket: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + bucket.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(bucket);
    k
}

fn fingerprint_key(tenant: &str, fp: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + fp.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(fp);
    k
}

/// `tenant \0 b bucket`: the bucket's slot in the fingerprint index, which
/// holds the entry of the first card indexed in the bucket instead of its
/// `tenant \0 fingerprint` key. So the bucket is marked by a write the
/// card needs anyway, and the enumeration guard needs none for it. Never
/// as long as a fingerprint key (a 16-byte bucket against a 32-byte
/// fingerprint), so the two cannot meet.
fn slot_key(tenant: &str, bucket: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 2 + bucket.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.push(b'b');
    k.extend_from_slice(bucket);
    k
}

/// A slot's value: `fingerprint length (1) | fingerprint | created at
/// (ms, 8 bytes big endian) | token`, so that the guard learns what it
/// needs of the bucket's card without reading its record.
fn slot_value(record: &StoredRecord) -> Vec<u8> {
    let fp = &record.fingerprint;
    let mut v = Vec::with_capacity(1 + fp.len() + 8 + record.token.len());
    v.push(fp.len() as u8);
    v.extend_from_slice(fp);
    v.extend_from_slice(&record.created_at_ms.to_be_bytes());
    v.extend_from_slice(record.token.as_bytes());
    v
}

/// The card in a slot; `None` if the value does not parse (only a
/// database writer could make it so; it is then treated as an empty slot
/// and overwritten).
struct Slot {
    fingerprint: Vec<u8>,
    created_at_ms: i64,
    token: String,
}

fn parse_slot(value: &[u8]) -> Option<Slot> {
    let (&len, rest) = value.split_first()?;
    let len = usize::from(len);
    if rest.len() <= len + 8 {
        return None;
    }
    let (fingerprint, rest) = rest.split_at(len);
    let (created, token) = rest.split_at(8);
    Some(Slot {
        fingerprint: fingerprint.to_vec(),
        created_at_ms: i64::from_be_bytes(created.try_into().ok()?),
        token: std::str::from_utf8(token).ok()?.to_owned(),
    })
}

fn decode(bytes: &[u8]) -> Result<StoredRecord> {
    StoredRecord::decode(bytes).map_err(|_| corrupt("stored record could not be decoded".into()))
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

fn put(tree: u8, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Mutation {
    Mutation {
        tree,
        key: key.into(),
        value: Some(value.into()),
    }
}

fn remove(tree: u8, key: impl Into<Vec<u8>>) -> Mutation {
    Mutation {
        tree,
        key: key.into(),
        value: None,
    }
}

fn link(rec: &AuditRecord) -> AuditLink {
    AuditLink {
        seq: rec.seq,
        hash: rec.hash.clone(),
    }
}

impl SledStore {
    /// Opens (or creates) the database in `path`, replaying the write-ahead
    /// log left by a crash.
    pub fn open(path: &Path) -> Result<SledStore> {
        Self::open_with(path, wal::SEGMENT_BYTES)
    }

    /// [`SledStore::open`] with log segments closed past `segment_bytes`
    /// (small values exercise rotation in tests).
    pub fn open_with(path: &Path, segment_bytes: u64) -> Result<SledStore> {
        Self::open_on(path, segment_bytes, Arc::new(OsDisk))
    }

    /// [`SledStore::open_with`] with the log and the audit journal on
    /// `disk` (sled's own files stay on the OS file system): how crash
    /// tests put a simulated disk under them.
    pub fn open_on(path: &Path, segment_bytes: u64, disk: Arc<dyn Disk>) -> Result<SledStore> {
        let db = open_db(path)?;
        let tree = |name: &str| db.open_tree(name).map_err(unavailable);
        let trees = Trees {
            records: tree("records")?,
            fingerprints: tree("fingerprints")?,
            keys: tree("keys")?,
            journal: journal::Journal::open(&db, path, &*disk)?,
            checkpoints: tree("audit_checkpoints")?,
            guard: tree("enumeration_guard")?,
            tenant_audit: tenant_audit::TenantIndex::open(&db)?,
        };
        let (next_segment, replayed) = recover(&db, &trees, path, &*disk)?;
        let head = trees.journal.head()?.unwrap_or((0, GENESIS.to_vec()));
        // After the replay every record up to the head is in the journal. If
        // not, the journal was cut short or damaged past what the log could
        // restore: appending would leave a gap (or, past the head, write
        // over nothing and drop the new record), so refuse now, with the
        // files as they are.
        let last = trees.journal.last_seq();
        if last != head.0 {
            return Err(corrupt(format!(
                "audit journal {} ends at record {last} but the audit chain head is record {}: {}",
                journal::FILE,
                head.0,
                if last < head.0 {
                    "records are missing (the file was cut short or damaged)"
                } else {
                    "the file holds records the chain never reached"
                }
            )));
        }
        // Every check has passed: what the log held is in sled, flushed.
        if !replayed.is_empty() {
            remove_in_order(&*disk, path, &replayed).map_err(unavailable)?;
            tracing::info!(segments = replayed.len(), "replayed the write-ahead log");
        }
        let segment = Segment::create_on(&*disk, path, next_segment).map_err(unavailable)?;
        let shared = Arc::new(Shared {
            trees,
            disk: disk.clone(),
            filter: filter::KeyFilter::new(),
            applied: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            pending_len: AtomicUsize::new(0),
            fail_next_write: AtomicBool::new(false),
            fail_next_apply: AtomicBool::new(false),
            apply_failed: AtomicBool::new(false),
            fail_next_journal_sync: AtomicBool::new(false),
            apply_gate: std::sync::RwLock::new(()),
            segment_bytes,
            state: Mutex::new(State {
                head,
                next_lsn: 1,
                queue: Vec::new(),
                pending: Pending::new(),
                failed: None,
                closing: false,
                waited_for: false,
                sleeping: false,
            }),
            work: Condvar::new(),
        });
        let (closed_tx, closed_rx) = mpsc::channel();
        let cleaner = {
            let (shared, db, dir) = (shared.clone(), db.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name("sled-wal-cleaner".into())
                .spawn(move || run_cleaner(shared, db, dir, closed_rx))
                .map_err(unavailable)?
        };
        let filler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("sled-key-filter".into())
                .spawn(move || fill_filter(&shared))
                .map_err(unavailable)?
        };
        let (preparer, prepare_thread) =
            Preparer::start(disk, path.to_path_buf(), segment_bytes + wal::PREALLOCATE)
                .map_err(unavailable)?;
        let sync_thread = {
            let (shared, dir) = (shared.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name("sled-group-commit".into())
                .spawn(move || run_sync(shared, dir, segment, closed_tx, preparer))
                .map_err(unavailable)?
        };
        Ok(SledStore {
            shared,
            db,
            dir: path.to_path_buf(),
            sync_thread: Some(sync_thread),
            cleaner: Some(cleaner),
            filler: Some(filler),
            prepare_thread: Some(prepare_thread),
        })
    }

    /// Whether the key filter has all keys present at open (tests wait for
    /// it to check that tokenize still sees those keys).
    #[doc(hidden)]
    pub fn key_filter_ready(&self) -> bool {
        self.shared.filter.is_ready()
    }

    /// Holds every sled apply (after its writers were answered) until the
    /// guard is dropped, to test reads of acknowledged, unapplied writes.
    /// Take it with no apply in flight (after a scan, say): otherwise it
    /// may stop an earlier batch's apply, and the commit thread then
    /// writes nothing until it is dropped.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn hold_apply(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.shared.apply_gate.write().recover()
    }

    /// Changes acknowledged or queued but not yet applied to sled.
    #[doc(hidden)]
    pub fn unapplied_changes(&self) -> usize {
        self.shared.pending_len.load(Ordering::Acquire)
    }

    /// Makes the next log write fail as a full or broken disk would, to
    /// test that the store then fails closed.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn fail_next_log_write(&self) {
        self.shared.fail_next_write.store(true, Ordering::Release);
    }

    /// Makes the next apply of a batch with changes to sled and the
    /// journal fail (after the log write succeeded and the writers were
    /// answered), to test that the acknowledged changes survive in the log.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn fail_next_apply(&self) {
        self.shared.fail_next_apply.store(true, Ordering::Release);
    }

    /// Makes the cleaner's next journal sync fail, to test that the store
    /// then fails closed and keeps its log.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn fail_next_journal_sync(&self) {
        self.shared
            .fail_next_journal_sync
            .store(true, Ordering::Release);
    }

    /// The stored audit records, for forensics and tamper tests. Writing
    /// through it bypasses the chain: that is what `audit verify` detects.
    #[cfg(feature = "fault-injection")]
    pub fn raw_audit(&self) -> RawAudit<'_> {
        RawAudit(&self.shared.trees.journal)
    }

    /// Deletes the signed checkpoints at or above `seq` behind the store's
    /// back (not through the log), as an attacker with file access would:
    /// for tamper tests.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn raw_remove_checkpoints_from(&self, seq: u64) -> Result<usize> {
        let tree = &self.shared.trees.checkpoints;
        let keys: Vec<_> = tree
            .range(seq.to_be_bytes()..)
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(unavailable)?;
        for k in &keys {
            tree.remove(k).map_err(unavailable)?;
        }
        Ok(keys.len())
    }

    /// Reads a key as writers must see it: queued changes first, then sled.
    fn lookup(&self, st: &State, tree: u8, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.lookup_pre(st, None, tree, key)
    }

    /// [`SledStore::lookup`], using a value prefetched without the lock
    /// when it is still valid.
    fn lookup_pre(
        &self,
        st: &State,
        pre: Option<&Prefetch>,
        tree: u8,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        debug_assert!(
            matches!(tree, RECORDS | FINGERPRINTS | KEYS | GUARD),
            "queued changes are only tracked for records, fingerprints, keys and guard state"
        );
        if let Some((_, v)) = st.pending.get(&(tree, key.to_vec())) {
            return Ok(v.clone());
        }
        if let Some(pre) = pre.filter(|p| p.seen == self.shared.applied.load(Ordering::Acquire))
            && let Some((_, _, v)) = pre.values.iter().find(|(t, k, _)| *t == tree && k == key)
        {
            return Ok(v.clone());
        }
        self.shared.read_filtered(tree, key)
    }

    /// Extends the chain with `audit` and adds its two writes to `muts`.
    fn chain(st: &mut State, audit: &AuditBody, muts: &mut Vec<Mutation>) -> AuditLink {
        let rec = AuditRecord::next(st.head.0, &st.head.1, audit.encode_to_vec());
        muts.push(put(AUDIT, rec.seq.to_be_bytes(), rec.encode_to_vec()));
        muts.push(put(AUDIT, AUDIT_HEAD, encode_head(rec.seq, &rec.hash)));
        st.head = (rec.seq, rec.hash.clone());
        link(&rec)
    }

    /// Queues one operation's changes; with `wait`, returns the receiver
    /// that resolves once they are durable (a barrier's, with no changes,
    /// once everything before it is applied).
    fn enqueue(&self, st: &mut State, muts: Vec<Mutation>, wait: bool) -> Result<Option<ReplyRx>> {
        if let Some(why) = &st.failed {
            return Err(SledError::Failed(format!("storage (sled): {why}")).into());
        }
        if st.closing {
            return Err(unavailable("store is closing"));
        }
        let lsn = st.next_lsn;
        st.next_lsn += 1;
        // Writers only ever check records, fingerprints, keys and guard
        // state; audit records and checkpoints (most of the bytes) need no
        // overlay.
        for m in muts
            .iter()
            .filter(|m| matches!(m.tree, RECORDS | FINGERPRINTS | KEYS | GUARD))
        {
            if m.value.is_some() && matches!(m.tree, RECORDS | FINGERPRINTS | GUARD) {
                self.shared.filter.add(m.tree, &m.key);
            }
            st.pending
                .insert((m.tree, m.key.clone()), (lsn, m.value.clone()));
        }
        let (reply, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // The sync thread sleeps on an empty queue, and lingers on a queue
        // nobody waits for: wake it when either ends.
        // (A notify costs a system call, so only when it is asleep.)
        let wake = st.sleeping && (st.queue.is_empty() || (wait && !st.waited_for));
        st.waited_for |= wait;
        st.queue.push(Entry { lsn, muts, reply });
        self.shared
            .pending_len
            .store(st.pending.len(), Ordering::Release);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(rx)
    }

    /// Waits for the answer to a queued entry (see [`SledStore::enqueue`]).
    async fn durable(rx: Option<oneshot::Receiver<std::result::Result<(), String>>>) -> Result<()> {
        match rx {
            Some(rx) => rx
                .await
                .map_err(|_| unavailable("log thread stopped"))?
                .map_err(unavailable),
            None => Ok(()),
        }
    }

    /// Queues `muts` and waits until they are durable.
    async fn write(&self, muts: Vec<Mutation>) -> Result<()> {
        let rx = self.enqueue(&mut self.shared.lock(), muts, true)?;
        Self::durable(rx).await
    }

    /// The acknowledged but not yet applied value of `key`, if it has one
    /// (`Some(None)`: removed); `None`: sled holds its latest acknowledged
    /// value. If its latest change is queued but not yet durable, waits
    /// until it is applied (a barrier) and answers `None`.
    async fn unapplied(&self, tree: u8, key: &[u8]) -> Result<Option<Option<Vec<u8>>>> {
        self.check_readable()?;
        // A writer's pending entry is counted before it is acknowledged,
        // and the reader of an acknowledged write comes after the ack.
        if self.shared.pending_len.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        {
            let st = self.shared.lock();
            match st.pending.get(&(tree, key.to_vec())) {
                None => return Ok(None),
                Some((lsn, v)) if *lsn <= self.shared.durable.load(Ordering::Acquire) => {
                    return Ok(Some(v.clone()));
                }
                Some(_) => {}
            }
        }
        self.barrier().await?;
        Ok(None)
    }

    /// Refuses reads once an acknowledged batch failed to apply or a sync
    /// failed (see `Shared::apply_failed`): an answer could miss
    /// acknowledged writes.
    fn check_readable(&self) -> Result<()> {
        if self.shared.apply_failed.load(Ordering::Acquire) {
            return Err(SledError::Failed(
                "storage: acknowledged writes may be missing from reads after a storage failure; reopen the store (restart) to replay them from the log".into(),
            )
            .into());
        }
        Ok(())
    }

    /// If the latest change of `key` is queued but not yet durable, a
    /// barrier to wait on before handing its value out: what the store
    /// returns as existing must survive a crash as surely as what it writes.
    fn until_durable(&self, st: &mut State, tree: u8, key: &[u8]) -> Result<Option<ReplyRx>> {
        let durable = self.shared.durable.load(Ordering::Acquire);
        match st.pending.get(&(tree, key.to_vec())) {
            Some((lsn, _)) if *lsn > durable => self.enqueue(st, Vec::new(), true),
            _ => Ok(None),
        }
    }

    /// Waits until everything queued so far (including buffered audit
    /// records) is applied, so scans of sled and the journal see it.
    async fn barrier(&self) -> Result<()> {
        self.check_readable()?;
        let rx = {
            let mut st = self.shared.lock();
            if self.shared.applied.load(Ordering::Acquire) + 1 >= st.next_lsn {
                return Ok(());
            }
            self.enqueue(&mut st, Vec::new(), true)?
        };
        Self::durable(rx).await
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        if let Some(t) = self.sync_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.cleaner.take() {
            let _ = t.join();
        }
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
        if let Some(t) = self.prepare_thread.take() {
            let _ = t.join();
        }
        // Clean close: sled holds everything, the log is no longer needed.
        // After a failure the log is kept for the next open to replay.
        if self.shared.lock().failed.is_none()
            && self.shared.trees.journal.sync().is_ok()
            && self.db.flush().is_ok()
        {
            let _ = remove_segments(&*self.shared.disk, &self.dir, u64::MAX);
        }
    }
}

/// Why an insert stops without writing.
enum Skip {
    TokenTaken,
    /// The existing record, and what to wait for before returning it if
    /// its write is still queued (see [`SledStore::until_durable`]).
    Deduplicated(Vec<u8>, Option<ReplyRx>),
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
        let rkey = record_key(&record.tenant, &record.token);
        let fkey = fingerprint_key(&record.tenant, &record.fingerprint);
        let skey = (!record.bucket.is_empty()).then(|| slot_key(&record.tenant, &record.bucket));
        let value = record.encode_to_vec();
        let shared = &*self.shared;
        let mut pre = Prefetch::new(shared);
        if let Some(tok) = pre.read(shared, FINGERPRINTS, &fkey)?
            && dedupe
        {
            let key = record_key(&record.tenant, &String::from_utf8_lossy(&tok));
            pre.read(shared, RECORDS, &key)?;
        }
        // A new bucket's slot is answered by the filter; an occupied one's
        // card is read too (for dedupe, or to see whether it is live).
        if let Some(skey) = &skey
            && let Some(slot) = pre
                .read(shared, FINGERPRINTS, skey)?
                .as_deref()
                .and_then(parse_slot)
        {
            pre.read(shared, RECORDS, &record_key(&record.tenant, &slot.token))?;
        }
        pre.read(shared, RECORDS, &rkey)?;
        let queued = {
            let mut st = self.shared.lock();
            let pre = Some(&pre);
            let own_entry = self.lookup_pre(&st, pre, FINGERPRINTS, &fkey)?;
            let slot = match &skey {
                Some(skey) => self
                    .lookup_pre(&st, pre, FINGERPRINTS, skey)?
                    .as_deref()
                    .and_then(parse_slot),
                None => None,
            };
            // The token the index gives this card: its own entry, else the
            // bucket's slot if the slot holds this card.
            let fp_token = match (&own_entry, &slot) {
                (Some(tok), _) => Some(String::from_utf8_lossy(tok).into_owned()),
                (None, Some(slot)) if slot.fingerprint == record.fingerprint => {
                    Some(slot.token.clone())
                }
                _ => None,
            };
            // The record the index points at, if live. Only dedupe needs it:
            // without dedupe an existing entry is simply kept (delete
            // removes entries pointing at the deleted token).
            let indexed = match &fp_token {
                Some(tok) if dedupe => {
                    self.lookup_pre(&st, pre, RECORDS, &record_key(&record.tenant, tok))?
                }
                _ => None,
            };
            if dedupe && let Some(existing) = indexed.clone() {
                let key = record_key(&record.tenant, fp_token.as_deref().unwrap_or_default());
                let wait = self.until_durable(&mut st, RECORDS, &key)?;
                Err(Skip::Deduplicated(existing, wait))
            } else if self.lookup_pre(&st, pre, RECORDS, &rkey)?.is_some() {
                Err(Skip::TokenTaken)
            } else {
                let mut muts = vec![put(RECORDS, rkey, value)];
                // A dangling entry (its record gone) is replaced under dedupe.
                if fp_token.is_none() || (dedupe && indexed.is_none()) {
                    let entry = match (&skey, &slot, &own_entry) {
                        // An entry of its own is replaced where it is.
                        (_, _, Some(_)) | (None, _, _) => None,
                        // The bucket's first card, or this card's dangling slot.
                        (Some(skey), None, _) => Some(skey),
                        (Some(skey), Some(slot), _) if slot.fingerprint == record.fingerprint => {
                            Some(skey)
                        }
                        // Another card's slot: taken over if that card is
                        // gone, so a dangling slot never leaves the bucket
                        // unmarked.
                        (Some(skey), Some(slot), _) => {
                            let theirs = record_key(&record.tenant, &slot.token);
                            match self.lookup_pre(&st, pre, RECORDS, &theirs)? {
                                Some(_) => None,
                                None => Some(skey),
                            }
                        }
                    };
                    muts.push(match entry {
                        Some(skey) => put(FINGERPRINTS, skey.clone(), slot_value(record)),
                        None => put(FINGERPRINTS, fkey, record.token.as_bytes()),
                    });
                }
                let l = Self::chain(&mut st, audit, &mut muts);
                Ok((self.enqueue(&mut st, muts, true)?, l))
            }
        };
        match queued {
            Ok((rx, l)) => {
                Self::durable(rx).await?;
                Ok(InsertOutcome::Inserted(l))
            }
            Err(Skip::TokenTaken) => Ok(InsertOutcome::TokenTaken),
            Err(Skip::Deduplicated(bytes, wait)) => {
                Self::durable(wait).await?;
                Ok(InsertOutcome::Deduplicated(decode(&bytes)?))
            }
        }
    }

    async fn bucket_card(&self, tenant: &str, bucket: &[u8]) -> Result<Option<BucketCard>> {
        // The slot only: a card indexed after the bucket's first one is
        // under its fingerprint (see `slot_key`). A slot names a live card:
        // a delete of that card removes it.
        let skey = slot_key(tenant, bucket);
        let value = match self.unapplied(FINGERPRINTS, &skey).await? {
            Some(v) => v,
            None => self.shared.read_filtered(FINGERPRINTS, &skey)?,
        };
        Ok(value.as_deref().and_then(parse_slot).map(|s| BucketCard {
            fingerprint: s.fingerprint,
            created_at_ms: s.created_at_ms,
        }))
    }

    async fn get(&self, tenant: &str, token: &str) -> Result<Option<StoredRecord>> {
        let key = record_key(tenant, token);
        if let Some(v) = self.unapplied(RECORDS, &key).await? {
            return v.map(|b| decode(&b)).transpose();
        }
        match self.shared.trees.records.get(key).map_err(unavailable)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn update(&self, current: &StoredRecord, record: &StoredRecord) -> Result<bool> {
        let rkey = record_key(&record.tenant, &record.token);
        let expected = current.encode_to_vec();
        let rx = {
            let mut st = self.shared.lock();
            if self.lookup(&st, RECORDS, &rkey)?.as_deref() != Some(expected.as_slice()) {
                return Ok(false);
            }
            self.enqueue(
                &mut st,
                vec![put(RECORDS, rkey, record.encode_to_vec())],
                true,
            )?
        };
        Self::durable(rx).await?;
        Ok(true)
    }

    async fn delete(
        &self,
        tenant: &str,
        token: &str,
        audit: &AuditBody,
    ) -> Result<(bool, AuditLink)> {
        let rkey = record_key(tenant, token);
        let (rx, out) = {
            let mut st = self.shared.lock();
            let mut muts = Vec::new();
            let existed = match self.lookup(&st, RECORDS, &rkey)? {
                Some(old) => {
                    // The fingerprint is needed to find the index entry; a
                    // record that no longer decodes is still deleted, its
                    // index entry left behind (lookups through it find no
                    // record).
                    if let Ok(rec) = StoredRecord::decode(old.as_slice()) {
                        let fkey = fingerprint_key(tenant, &rec.fingerprint);
                        if self
                            .lookup(&st, FINGERPRINTS, &fkey)?
                            .is_some_and(|t| t == token.as_bytes())
                        {
                            muts.push(remove(FINGERPRINTS, fkey));
                        }
                        if !rec.bucket.is_empty() {
                            let skey = slot_key(tenant, &rec.bucket);
                            let slot = self.lookup(&st, FINGERPRINTS, &skey)?;
                            if slot
                                .as_deref()
                                .and_then(parse_slot)
                                .is_some_and(|s| s.token == token)
                            {
                                muts.push(remove(FINGERPRINTS, skey));
                            }
                        }
                    }
                    muts.push(remove(RECORDS, rkey));
                    true
                }
                None => false,
            };
            let l = Self::chain(&mut st, audit, &mut muts);
            (self.enqueue(&mut st, muts, true)?, (existed, l))
        };
        Self::durable(rx).await?;
        Ok(out)
    }

    async fn count(&self, tenant: Option<&str>) -> Result<u64> {
        self.barrier().await?;
        let records = &self.shared.trees.records;
        match tenant {
            None => Ok(records.len() as u64),
            Some(t) => Ok(records.scan_prefix(record_key(t, "")).keys().count() as u64),
        }
    }

    async fn get_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.unapplied(KEYS, name.as_bytes()).await? {
            return Ok(v);
        }
        Ok(self
            .shared
            .trees
            .keys
            .get(name)
            .map_err(unavailable)?
            .map(|v| v.to_vec()))
    }

    async fn put_key_if_absent(&self, name: &str, value: &[u8]) -> Result<Option<Vec<u8>>> {
        let (rx, existing) = {
            let mut st = self.shared.lock();
            match self.lookup(&st, KEYS, name.as_bytes())? {
                // Another writer's key, perhaps still queued: returned once durable.
                Some(existing) => (
                    self.until_durable(&mut st, KEYS, name.as_bytes())?,
                    Some(existing),
                ),
                None => (
                    self.enqueue(&mut st, vec![put(KEYS, name.as_bytes(), value)], true)?,
                    None,
                ),
            }
        };
        Self::durable(rx).await?;
        Ok(existing)
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.barrier().await?;
        self.shared
            .trees
            .keys
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(unavailable)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    async fn put_keys(&self, entries: &[(String, Vec<u8>)]) -> Result<()> {
        let muts = entries
            .iter()
            .map(|(k, v)| put(KEYS, k.as_bytes(), v.as_slice()))
            .collect();
        self.write(muts).await
    }

    async fn delete_key(&self, name: &str) -> Result<()> {
        self.write(vec![remove(KEYS, name.as_bytes())]).await
    }

    async fn scan_records(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        self.barrier().await?;
        let records = &self.shared.trees.records;
        let iter = match after {
            // Keys are `tenant \0 token`; tenants never contain \0, so byte
            // order of keys is (tenant, token) order.
            Some((tenant, token)) => {
                let mut start = record_key(tenant, token);
                start.push(0);
                records.range(start..)
            }
            None => records.iter(),
        };
        iter.values()
            .take(limit)
            .map(|v| decode(&v.map_err(unavailable)?))
            .collect()
    }

    async fn append_audit(&self, audit: &AuditBody) -> Result<AuditLink> {
        let (rx, l) = {
            let mut st = self.shared.lock();
            let mut muts = Vec::with_capacity(2);
            let l = Self::chain(&mut st, audit, &mut muts);
            (self.enqueue(&mut st, muts, true)?, l)
        };
        Self::durable(rx).await?;
        Ok(l)
    }

    async fn append_audit_buffered(&self, audit: &AuditBody) -> Result<AuditLink> {
        // Queued in chain order and written with the next group commit
        // (within about one disk sync); a crash loses at most the last
        // such records, never a record in the middle of the chain. Past
        // MAX_BUFFERED queued entries (a stalled disk) the caller waits
        // like any writer, so the queue cannot grow without bound.
        let (rx, l) = {
            let mut st = self.shared.lock();
            let wait = st.queue.len() >= MAX_BUFFERED;
            let mut muts = Vec::with_capacity(2);
            let l = Self::chain(&mut st, audit, &mut muts);
            (self.enqueue(&mut st, muts, wait)?, l)
        };
        Self::durable(rx).await?;
        Ok(l)
    }

    async fn audit_head(&self) -> Result<Option<(u64, Vec<u8>)>> {
        self.barrier().await?;
        self.shared.trees.journal.head()
    }

    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        self.barrier().await?;
        self.shared.trees.journal.records(after_seq, limit)
    }

    async fn tenant_audit_records(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord)>> {
        self.barrier().await?;
        let (shared, tenant) = (self.shared.clone(), tenant.to_owned());
        // Catching up may read many records (the first query after an
        // upgrade indexes the whole log): off the async workers.
        tokio::task::spawn_blocking(move || {
            let trees = &shared.trees;
            trees.tenant_audit.catch_up(&trees.journal, || false)?;
            trees
                .tenant_audit
                .records(&trees.journal, &tenant, after, limit)
        })
        .await
        .map_err(|e| Error::Internal(format!("tenant audit query: {e}")))?
    }

    async fn guard_get(&self, tenant: &str, bucket: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_readable()?;
        let key = guard_key(tenant, bucket);
        // A queued value is returned even before it is durable (no barrier,
        // unlike `unapplied`): guard state only bounds guesses, a crash that
        // loses a count gives at most that guess again, and the tokenize
        // of a card seen a moment ago should not wait for a sync.
        if self.shared.pending_len.load(Ordering::Acquire) != 0
            && let Some((_, v)) = self.shared.lock().pending.get(&(GUARD, key.clone()))
        {
            return Ok(v.clone());
        }
        // Values leave the overlay only after sled holds them. A new
        // bucket (most tokenizes of a new card) is answered by the filter.
        self.shared.read_filtered(GUARD, &key)
    }

    async fn guard_swap(
        &self,
        tenant: &str,
        bucket: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        durable: bool,
    ) -> Result<bool> {
        let key = guard_key(tenant, bucket);
        let rx = {
            let mut st = self.shared.lock();
            if self.lookup(&st, GUARD, &key)?.as_deref() != expected {
                return Ok(false);
            }
            // Not waited for unless asked: the tokenize that follows waits
            // for its own write, which the log makes durable after this.
            self.enqueue(&mut st, vec![put(GUARD, key, value)], durable)?
        };
        Self::durable(rx).await?;
        Ok(true)
    }

    async fn guard_clear(&self, tenant: &str, bucket: Option<&[u8]>) -> Result<u64> {
        let keys: Vec<Vec<u8>> = match bucket {
            Some(b) => vec![guard_key(tenant, b)],
            None => {
                self.barrier().await?;
                self.shared
                    .trees
                    .guard
                    .scan_prefix(guard_key(tenant, b""))
                    .keys()
                    .map(|k| k.map(|k| k.to_vec()).map_err(unavailable))
                    .collect::<Result<_>>()?
            }
        };
        let (rx, n) = {
            let mut st = self.shared.lock();
            let mut muts = Vec::new();
            for k in keys {
                if self.lookup(&st, GUARD, &k)?.is_some() {
                    muts.push(remove(GUARD, k));
                }
            }
            let n = muts.len() as u64;
            (self.enqueue(&mut st, muts, true)?, n)
        };
        Self::durable(rx).await?;
        Ok(n)
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        self.write(vec![put(
            CHECKPOINTS,
            checkpoint.seq.to_be_bytes(),
            checkpoint.encode_to_vec(),
        )])
        .await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.barrier().await?;
        self.shared
            .trees
            .checkpoints
            .iter()
            .values()
            .map(|v| {
                let v = v.map_err(unavailable)?;
                Checkpoint::decode(v.as_ref())
                    .map_err(|_| corrupt("audit checkpoint is corrupt".into()))
            })
            .collect()
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn sled_errors_convert_to_the_codes_callers_act_on() {
        let io: Error = SledError::Io("disk full".into()).into();
        assert_eq!(io, Error::Unavailable("storage (sled): disk full".into()));
        let failed: Error = SledError::Failed("log write failed".into()).into();
        assert!(matches!(failed, Error::Unavailable(_)));
        let damaged: Error = SledError::Corrupt("segment 3 is corrupt".into()).into();
        assert_eq!(damaged, Error::DataLoss("segment 3 is corrupt".into()));
        assert_eq!(
            unavailable("x"),
            Error::Unavailable("storage (sled): x".into())
        );
    }
}
