//! Crash consistency of the embedded store's own files, through a
//! simulated disk (`store::disk`), as redb tests its crash safety through
//! its storage backend.
//!
//! A randomized workload (inserts, updates, deletes, audit appends from
//! several tasks, with log segments small enough to rotate and be deleted)
//! runs until the disk "crashes" at a random write or sync. The crashed
//! disk keeps what was synced, plus any subset of the sectors written
//! since (lost, torn and reordered writes), plus any subset of the file
//! creations and deletions not yet made durable; sometimes a bit rots as
//! well. Then the store is opened again and checked:
//!
//! * after a crash alone, it opens, every acknowledged write is there, no
//!   acknowledged delete is undone, and the audit chain is whole;
//! * after bit rot, it either refuses with `DATA_LOSS` (at open or on a
//!   read) or passes the same checks: never a silent loss.
//!
//! sled's own files are not simulated: sled keeps (and flushes on close)
//! whatever the store applied to it, which it applies only after the log
//! write is durable, so it never holds what the simulated disk lost.
//!
//! The run lasts `CARDVAULT_CRASH_SECS` seconds (default 4; `.ci/run`
//! gives it longer). `CARDVAULT_CRASH_SEED` repeats a failing run.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardvault::Error;
use cardvault::audit::{AuditBody, Verifier};
use cardvault::store::conformance::{audit_body, sample};
use cardvault::store::disk::{Disk, DiskFile, OpenMode};
use cardvault::store::sled::SledStore;
use cardvault::store::{InsertOutcome, Store, StoredRecord};

/// Disks write whole sectors: a write is torn between sectors, never
/// inside one.
const SECTOR: u64 = 512;

/// A small, seedable generator (xorshift64*): the test needs repeatable
/// choices, not quality randomness.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// A change to a file not yet synced.
#[derive(Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// One simulated file: what reads see, what a crash keeps for sure, and
/// what it may keep.
#[derive(Default)]
struct SimFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

impl SimFile {
    /// Makes every change so far durable (a sync).
    fn make_durable(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            apply(&mut self.durable, &p);
        }
    }
}

fn apply(buf: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, bytes) => {
            let end = *off as usize + bytes.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(bytes);
        }
        Pending::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

/// The sectors of a write, as separate writes (a torn write keeps some).
fn sectors(off: u64, bytes: &[u8]) -> Vec<Pending> {
    let mut out = Vec::new();
    let mut at = off;
    while at < off + bytes.len() as u64 {
        let end = ((at / SECTOR + 1) * SECTOR).min(off + bytes.len() as u64);
        let piece = bytes[(at - off) as usize..(end - off) as usize].to_vec();
        out.push(Pending::Write(at, piece));
        at = end;
    }
    out
}

type FileRef = Arc<Mutex<SimFile>>;

enum DirOp {
    Create(PathBuf, FileRef),
    Remove(PathBuf),
}

struct SimState {
    files: HashMap<PathBuf, FileRef>,
    durable_names: HashMap<PathBuf, FileRef>,
    dir_ops: Vec<DirOp>,
    /// Writes and syncs left before the crash (`None`: never).
    ops_left: Option<u64>,
    dead: bool,
    rng: Rng,
    /// Whether opens may be direct (writes durable on return).
    allow_direct: bool,
}

/// The simulated disk. Clones share it.
#[derive(Clone)]
struct SimDisk(Arc<Mutex<SimState>>);

fn crashed() -> io::Error {
    io::Error::other("simulated crash: the disk is gone")
}

impl SimDisk {
    fn new(rng: Rng, allow_direct: bool) -> SimDisk {
        SimDisk(Arc::new(Mutex::new(SimState {
            files: HashMap::new(),
            durable_names: HashMap::new(),
            dir_ops: Vec::new(),
            ops_left: None,
            dead: false,
            rng,
            allow_direct,
        })))
    }

    fn crash_after(&self, ops: u64) {
        self.0.lock().unwrap().ops_left = Some(ops);
    }

    fn is_dead(&self) -> bool {
        self.0.lock().unwrap().dead
    }

    /// Counts one write, sync, delete or directory sync; true if the crash
    /// happens at it.
    fn tick(st: &mut SimState) -> bool {
        match &mut st.ops_left {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        }
    }

    /// The disk as a restart finds it: synced state plus any subset of
    /// what was not, and optionally one flipped bit.
    fn after_crash(&self, rng: &mut Rng, rot: bool) -> (SimDisk, String) {
        let st = self.0.lock().unwrap();
        let mut names = st.durable_names.clone();
        for op in &st.dir_ops {
            if rng.coin() {
                match op {
                    DirOp::Create(p, f) => {
                        names.insert(p.clone(), f.clone());
                    }
                    DirOp::Remove(p) => {
                        names.remove(p);
                    }
                }
            }
        }
        let mut files = HashMap::new();
        for (path, f) in names {
            let f = f.lock().unwrap();
            let mut content = f.durable.clone();
            for p in &f.pending {
                match p {
                    Pending::Write(off, bytes) => {
                        for s in sectors(*off, bytes) {
                            if rng.coin() {
                                apply(&mut content, &s);
                            }
                        }
                    }
                    Pending::SetLen(_) => {
                        if rng.coin() {
                            apply(&mut content, p);
                        }
                    }
                }
            }
            files.insert(path, content);
        }
        let mut note = String::new();
        if rot {
            let mut paths: Vec<_> = files
                .iter()
                .filter(|(_, c)| !c.is_empty())
                .map(|(p, _)| p.clone())
                .collect();
            paths.sort();
            if !paths.is_empty() {
                let p = &paths[rng.below(paths.len() as u64) as usize];
                let c = files.get_mut(p).unwrap();
                let bit = rng.below(c.len() as u64 * 8);
                c[(bit / 8) as usize] ^= 1 << (bit % 8);
                note = format!("bit {bit} of {} rotted", p.display());
            }
        }
        let disk = SimDisk::new(rng.clone(), st.allow_direct);
        {
            let mut new = disk.0.lock().unwrap();
            for (path, content) in files {
                let f = Arc::new(Mutex::new(SimFile {
                    data: content.clone(),
                    durable: content,
                    pending: Vec::new(),
                }));
                new.files.insert(path.clone(), f.clone());
                new.durable_names.insert(path, f);
            }
        }
        (disk, note)
    }
}

struct SimHandle {
    disk: SimDisk,
    file: FileRef,
    direct: bool,
}

impl Disk for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut st = self.0.lock().unwrap();
        if st.dead {
            return Err(crashed());
        }
        if mode.direct && !st.allow_direct {
            return Err(io::Error::other("no direct I/O here"));
        }
        let file = match st.files.get(path) {
            Some(f) => f.clone(),
            None if mode.create => {
                let f: FileRef = Default::default();
                st.files.insert(path.to_path_buf(), f.clone());
                st.dir_ops
                    .push(DirOp::Create(path.to_path_buf(), f.clone()));
                f
            }
            None => return Err(io::Error::from(io::ErrorKind::NotFound)),
        };
        if mode.truncate {
            let mut f = file.lock().unwrap();
            f.data.clear();
            f.pending.push(Pending::SetLen(0));
        }
        Ok(Arc::new(SimHandle {
            disk: self.clone(),
            file,
            direct: mode.direct,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.0.lock().unwrap();
        if st.dead {
            return Err(crashed());
        }
        let f = st.files.get(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(f.lock().unwrap().data.clone())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        if st.dead || SimDisk::tick(&mut st) {
            st.dead = true;
            return Err(crashed());
        }
        st.files.remove(path).ok_or(io::ErrorKind::NotFound)?;
        st.dir_ops.push(DirOp::Remove(path.to_path_buf()));
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.0.lock().unwrap();
        if st.dead {
            return Err(crashed());
        }
        Ok(st
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
            .collect())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        if st.dead || SimDisk::tick(&mut st) {
            st.dead = true;
            return Err(crashed());
        }
        st.durable_names = st.files.clone();
        st.dir_ops.clear();
        Ok(())
    }
}

impl DiskFile for SimHandle {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.disk.is_dead() {
            return Err(crashed());
        }
        let f = self.file.lock().unwrap();
        let end = off as usize + buf.len();
        let src = f
            .data
            .get(off as usize..end)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.disk.0.lock().unwrap();
        if st.dead {
            return Err(crashed());
        }
        let mut f = self.file.lock().unwrap();
        if self.direct {
            // O_DSYNC: a write is durable with everything before it that
            // reading it back needs (the file's earlier truncation).
            f.make_durable();
        }
        if SimDisk::tick(&mut st) {
            // Torn: some of this write's sectors made it.
            st.dead = true;
            for s in sectors(off, buf) {
                if st.rng.coin() {
                    if self.direct {
                        apply(&mut f.durable, &s);
                    } else {
                        f.pending.push(s);
                    }
                }
            }
            return Err(crashed());
        }
        let w = Pending::Write(off, buf.to_vec());
        apply(&mut f.data, &w);
        if self.direct {
            apply(&mut f.durable, &w);
        } else {
            f.pending.push(w);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.disk.0.lock().unwrap();
        if st.dead {
            return Err(crashed());
        }
        if SimDisk::tick(&mut st) {
            st.dead = true;
            return Err(crashed());
        }
        self.file.lock().unwrap().make_durable();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        if self.disk.is_dead() {
            return Err(crashed());
        }
        Ok(self.file.lock().unwrap().data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.disk.is_dead() {
            return Err(crashed());
        }
        let mut f = self.file.lock().unwrap();
        let p = Pending::SetLen(len);
        apply(&mut f.data, &p);
        f.pending.push(p);
        Ok(())
    }
}

/// What a token may hold after a restart: its envelope, or nothing.
type Allowed = Vec<Option<Vec<u8>>>;

/// What the workload knows: per token, the states a restart may show
/// (one if its last write was acknowledged), and the audit records.
#[derive(Default)]
struct Model {
    tokens: BTreeMap<String, Allowed>,
    /// Details of acknowledged audit records: each must be in the chain.
    audited: Vec<String>,
}

fn body(detail: String) -> AuditBody {
    AuditBody {
        tenant: "acme".into(),
        detail,
        ..audit_body("Tokenize")
    }
}

/// One task's operations on its own tokens until the disk dies. Returns
/// what it learned.
async fn work(
    store: Arc<SledStore>,
    task: usize,
    round: usize,
    mut rng: Rng,
    mut model: Model,
) -> Model {
    let mut own: Vec<String> = model
        .tokens
        .iter()
        .filter(|(_, a)| a.iter().any(Option::is_some))
        .map(|(t, _)| t.clone())
        .collect();
    for i in 0.. {
        let detail = format!("t{task}-r{round}-op{i}");
        let kind = rng.below(10);
        let ok = if kind < 4 || own.is_empty() {
            let token = format!("tok_{task}_{round}_{i}");
            let mut r = sample("acme", &token, rng.below(256) as u8);
            r.fingerprint = format!("{token}-fp").into_bytes();
            r.envelope = format!("{token}-env-{}", rng.next()).into_bytes();
            let res = store.insert(&r, false, &body(detail.clone())).await;
            let ok = matches!(res, Ok(InsertOutcome::Inserted(_)));
            let states = if ok {
                own.push(token.clone());
                vec![Some(r.envelope)]
            } else {
                vec![None, Some(r.envelope)]
            };
            model.tokens.insert(token, states);
            ok
        } else if kind < 7 {
            let token = own[rng.below(own.len() as u64) as usize].clone();
            let current = match store.get("acme", &token).await {
                Ok(Some(c)) => c,
                _ => break,
            };
            let mut next: StoredRecord = current.clone();
            next.envelope = format!("{token}-env-{}", rng.next()).into_bytes();
            let res = store.update(&current, &next).await;
            let ok = matches!(res, Ok(true));
            let states = if ok {
                vec![Some(next.envelope)]
            } else {
                vec![Some(current.envelope), Some(next.envelope)]
            };
            model.tokens.insert(token, states);
            // An update writes no audit record.
            if ok {
                continue;
            }
            ok
        } else if kind < 8 {
            let at = rng.below(own.len() as u64) as usize;
            let token = own.swap_remove(at);
            let res = store.delete("acme", &token, &body(detail.clone())).await;
            let ok = matches!(res, Ok((true, _)));
            let before = model.tokens[&token].clone();
            let states = if ok {
                vec![None]
            } else {
                own.push(token.clone());
                let mut s = before;
                s.push(None);
                s
            };
            model.tokens.insert(token, states);
            ok
        } else {
            store.append_audit(&body(detail.clone())).await.is_ok()
        };
        if !ok {
            break;
        }
        model.audited.push(detail);
    }
    model
}

/// Checks a reopened store against the model. `Err` carries a DATA_LOSS
/// refusal (acceptable only after bit rot); a silent loss panics.
async fn check(store: &SledStore, model: &mut Model, ctx: &str) -> Result<(), Error> {
    for (token, allowed) in model.tokens.iter_mut() {
        let got = store.get("acme", token).await?.map(|r| r.envelope);
        assert!(
            allowed.contains(&got),
            "{ctx}: token {token} holds {:?}, allowed {:?}",
            got.as_deref().map(String::from_utf8_lossy),
            allowed
                .iter()
                .map(|a| a.as_deref().map(String::from_utf8_lossy))
                .collect::<Vec<_>>()
        );
        *allowed = vec![got];
    }
    let mut verifier = Verifier::new(Vec::new(), Vec::new());
    let mut details = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page = store.audit_records(after, 1000).await?;
        if page.is_empty() {
            break;
        }
        for (seq, rec) in &page {
            verifier.record(*seq, rec);
            if let Some(b) = rec.decode_body() {
                details.insert(b.detail);
            }
            after = *seq;
        }
    }
    let report = verifier.finish(store.audit_head().await?);
    if !report.ok() {
        return Err(Error::DataLoss(format!("chain broken: {}", report.problem)));
    }
    for d in &model.audited {
        assert!(
            details.contains(d),
            "{ctx}: acknowledged audit record {d} is gone"
        );
    }
    model.audited = details.into_iter().collect();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_never_lose_acknowledged_writes_silently() {
    let secs: u64 = std::env::var("CARDVAULT_CRASH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("CARDVAULT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash test seed {seed} (CARDVAULT_CRASH_SEED={seed} repeats it)");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rng = Rng(seed);
    let (mut runs, mut crashes, mut refused) = (0, 0, 0);
    while Instant::now() < deadline {
        runs += 1;
        let dir = tempfile::tempdir().unwrap();
        let mut disk = SimDisk::new(rng.clone(), rng.coin());
        let mut model = Model::default();
        // A few crashes per store, until bit rot makes it refuse.
        // Until bit rot makes the store refuse, or a few crashes.
        let (mut rotted, mut last) = (false, "nothing".to_owned());
        for round in 0..8 {
            let ctx = format!("seed {seed}, run {runs}, round {round}, after {last}");
            // Often early, while it opens (replays, deletes segments).
            let span = if rng.coin() { 30 } else { 400 };
            disk.crash_after(1 + rng.below(span));
            match SledStore::open_on(dir.path(), 4 << 10, Arc::new(disk.clone())) {
                Ok(store) => {
                    // Reads never reach the planned crash: check, then
                    // write until the disk dies.
                    match check(&store, &mut model, &ctx).await {
                        Ok(()) => {}
                        Err(Error::DataLoss(_)) if rotted => {
                            refused += 1;
                            break;
                        }
                        Err(e) => panic!("{ctx}: {e}"),
                    }
                    let store = Arc::new(store);
                    let tasks: Vec<_> = (0..3)
                        .map(|task| {
                            let mine = Model {
                                tokens: model
                                    .tokens
                                    .iter()
                                    .filter(|(t, _)| t.starts_with(&format!("tok_{task}_")))
                                    .map(|(t, a)| (t.clone(), a.clone()))
                                    .collect(),
                                ..Default::default()
                            };
                            let mut r = rng.clone();
                            r.0 ^= (task as u64 + 1) * 0x9E37_79B9;
                            rng.next();
                            tokio::spawn(work(store.clone(), task, round, r, mine))
                        })
                        .collect();
                    for t in tasks {
                        let got = t.await.unwrap();
                        model.tokens.extend(got.tokens);
                        model.audited.extend(got.audited);
                    }
                    assert!(
                        disk.is_dead(),
                        "{ctx}: the workload stopped before the crash"
                    );
                }
                // The crash came while it opened.
                Err(_) if disk.is_dead() => {}
                Err(Error::DataLoss(_)) if rotted => {
                    refused += 1;
                    break;
                }
                Err(e) => panic!("{ctx}: refused to open after a crash: {e}"),
            }
            crashes += 1;
            let rot = rng.below(5) == 0;
            let (next, note) = disk.after_crash(&mut rng, rot);
            disk = next;
            rotted |= rot;
            last = if rot { note } else { "a crash".to_owned() };
        }
    }
    println!("{runs} stores, {crashes} crashes, {refused} refused after bit rot");
    assert!(crashes > 0);
}
