//! The durable baseline's group commit (`cardvault-bench --durable-baseline DIR`).
//!
//! The no-op baseline answers at once, but a vault cannot: a tokenize's
//! record and a detokenize's audit record are on disk before the answer.
//! This committer gives the baseline that one cost and nothing else: its
//! tokenize and detokenize handlers each queue [`FRAME_BYTES`] and wait
//! until a group commit has written them, with the vault's own
//! write-ahead-log segment code ([`cardvault::store::wal::Segment`]:
//! `O_DIRECT | O_DSYNC` into preallocated space where the file system
//! allows it) on one thread, every waiting request in one write. So the
//! vault's ratio to it leaves what the vault does besides the durable
//! write, and its ratio to the no-op baseline is the most a server that
//! makes each request durable can reach on this machine.
//!
//! The scratch log lives in a directory of its own, created under the
//! given one and removed when the bench ends; it is rewritten in a loop
//! and never read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use cardvault::store::wal::Segment;

/// Bytes each waiting request adds to a commit: about a detokenize's
/// audit record as the vault logs it (a tokenize's record is a little
/// larger; direct writes are whole 4 KiB blocks either way).
pub(super) const FRAME_BYTES: usize = 256;
/// Size of the preallocated scratch log; writes wrap around within it.
const LOG_BYTES: u64 = 64 << 20;

/// Requests waiting for the next commit.
#[derive(Default)]
struct State {
    /// One reply per waiting request.
    waiting: Vec<oneshot::Sender<Result<(), String>>>,
    /// Whether the commit thread waits for work (so it is woken only then).
    sleeping: bool,
    /// The first write error: every later commit fails with it.
    failed: Option<String>,
    /// Set when the bench ends: the thread exits.
    closing: bool,
}

/// Group commit of fixed-size frames to a scratch log.
pub(super) struct Committer {
    state: Mutex<State>,
    work: Condvar,
    /// Writes made so far (commits share them).
    writes: AtomicU64,
}

/// The running committer: its thread and directory, cleaned up on drop.
pub(super) struct Running {
    /// Shared with the baseline's handlers.
    pub committer: Arc<Committer>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Committer {
    /// Creates a fresh directory under `parent`, preallocates the scratch
    /// log there (before any measured run) and starts the commit thread,
    /// named like the baseline's workers so that its CPU counts as the
    /// baseline server's.
    pub(super) fn start(parent: &Path, thread_name: &str) -> Result<Running, String> {
        Self::start_with(parent, thread_name, LOG_BYTES)
    }

    fn start_with(parent: &Path, thread_name: &str, log_bytes: u64) -> Result<Running, String> {
        let dir = parent.join(format!("cardvault-bench-{}", std::process::id()));
        let fail = |e: std::io::Error| format!("--durable-baseline {}: {e}", dir.display());
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let segment = match Segment::prepare(&dir, 1, log_bytes, Default::default()) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(fail(e));
            }
        };
        let committer = Arc::new(Committer {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            writes: AtomicU64::new(0),
        });
        let c = committer.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || c.run(segment))
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                format!("durable baseline thread: {e}")
            })?;
        Ok(Running {
            committer,
            thread: Some(thread),
            dir,
        })
    }

    /// The state, even if a handler panicked holding it: every update
    /// leaves it whole.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes made so far.
    #[cfg(test)]
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Queues one frame and waits until a commit has written it.
    pub(super) async fn commit(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            if let Some(why) = &st.failed {
                return Err(why.clone());
            }
            if st.closing {
                return Err("durable baseline closed".into());
            }
            st.waiting.push(tx);
            if st.sleeping {
                self.work.notify_one();
            }
        }
        rx.await
            .unwrap_or_else(|_| Err("durable baseline stopped".into()))
    }

    /// The commit thread: everything queued, one write, every waiter told.
    fn run(&self, mut segment: Segment) {
        let mut frames = Vec::new();
        loop {
            let batch = {
                let mut st = self.lock();
                while st.waiting.is_empty() && !st.closing {
                    st.sleeping = true;
                    st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                    st.sleeping = false;
                }
                if st.closing {
                    // Waiters left are answered with an error by the drop.
                    return;
                }
                std::mem::take(&mut st.waiting)
            };
            frames.clear();
            frames.resize(batch.len() * FRAME_BYTES, 0xa5);
            if segment.len + frames.len() as u64 > segment.allocated() {
                segment.rewind();
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
            let res = segment
                .append_durable(&frames)
                .map_err(|e| format!("durable baseline write: {e}"));
            if let Err(why) = &res {
                self.lock().failed.get_or_insert_with(|| why.clone());
            }
            for reply in batch {
                let _ = reply.send(res.clone());
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.committer.lock().closing = true;
        self.committer.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_complete_share_writes_and_the_directory_is_removed() {
        let parent = tempfile::tempdir().unwrap();
        let log_bytes = 1 << 20;
        let running = Committer::start_with(parent.path(), "durable-test", log_bytes).unwrap();
        let dir = running.dir.clone();
        assert!(dir.starts_with(parent.path()) && dir.is_dir());
        let log = cardvault::store::wal::segment_path(&dir, 1);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), log_bytes);
        // More frames than the log holds: the writes wrap around in it.
        let total = log_bytes as usize / FRAME_BYTES * 3;
        let c = running.committer.clone();
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    for _ in 0..total / 64 + 1 {
                        c.commit().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            log_bytes,
            "no growth"
        );
        let writes = c.writes();
        assert!(
            writes > 0 && writes < total as u64,
            "{writes} writes for {total} commits"
        );
        drop(running);
        assert!(!dir.exists(), "scratch directory removed");
        assert!(parent.path().is_dir(), "the given directory is kept");
        // Closed: a late commit fails instead of hanging.
        assert!(c.commit().await.is_err());
    }

    #[test]
    fn an_unusable_directory_is_refused_with_its_name() {
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = Committer::start(&file, "durable-test").err().unwrap();
        assert!(
            err.contains("--durable-baseline") && err.contains("not-a-dir"),
            "{err}"
        );
    }
}
