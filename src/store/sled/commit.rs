//! The group commit: the thread that makes queued changes durable in the
//! write-ahead log, answers the writers and applies the changes to sled;
//! the helper that prepares the next log segment; and the cleaner that
//! deletes segments once their changes are durable without them.

use super::*;

/// The group-commit loop: takes every queued entry, makes them durable with
/// one synchronous write, answers the writers, then applies the entries to
/// sled and answers the barriers.
/// (Applying on a second thread, to overlap it with the next write, was
/// measured slower: the extra wake-up per batch cost more than it saved.)
pub(super) fn run_sync(
    shared: Arc<Shared>,
    dir: PathBuf,
    mut segment: Segment,
    closed: mpsc::Sender<u64>,
    prepared: Preparer,
) {
    let mut frames = Vec::new();
    // Whether the next segment was asked for: once this one is half full,
    // so that short-lived stores (tests, CLI commands) never write one.
    let mut asked = false;
    loop {
        let (batch, failed) = {
            let mut st = shared.lock();
            while st.queue.is_empty() && !st.closing {
                st.sleeping = true;
                st = shared.work.wait(st).recover();
                st.sleeping = false;
            }
            if st.queue.is_empty() {
                return;
            }
            // Only buffered audit records (metadata reads): nobody waits, so
            // gather more of them for one sync instead of syncing each.
            let deadline = Instant::now() + BUFFERED_LINGER;
            while !st.waited_for && !st.closing {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                st.sleeping = true;
                st = (shared.work.wait_timeout(st, left)).recover().0;
                st.sleeping = false;
            }
            st.waited_for = false;
            (std::mem::take(&mut st.queue), st.failed.clone())
        };
        let res = match failed {
            Some(why) => Err(why),
            None => {
                frames.clear();
                for e in batch.iter().filter(|e| !e.muts.is_empty()) {
                    wal::encode_frame(&e.muts, &mut frames);
                }
                if frames.is_empty() {
                    Ok(())
                } else if shared.fail_next_write.swap(false, Ordering::AcqRel) {
                    Err("write-ahead log: injected write failure".to_owned())
                } else {
                    segment
                        .append_durable(&frames)
                        .map_err(|e| format!("write-ahead log: {e}"))
                }
            }
        };
        let rotate = res.is_ok() && segment.len >= shared.segment_bytes;
        if !asked && segment.len >= shared.segment_bytes / 2 {
            prepared.want(segment.number + 1);
            asked = true;
        }
        finish_batch(&shared, batch, res);
        if rotate {
            let next = if asked {
                prepared.take(&*shared.disk, &dir, segment.number + 1)
            } else {
                Segment::create_on(&*shared.disk, &dir, segment.number + 1)
            };
            match next {
                Ok(next) => {
                    let old = std::mem::replace(&mut segment, next).number;
                    let _ = closed.send(old);
                    asked = false;
                }
                // Keep appending to the old segment; only disk use grows.
                // The next attempt asks for (or creates) a segment afresh.
                Err(e) => {
                    asked = false;
                    tracing::warn!(error = %e, "could not start a new write-ahead log segment")
                }
            }
        }
    }
}

/// The group-commit thread's side of the segment preparer: it asks for
/// the next segment once the current one is half full, and takes it at
/// rotation.
pub(super) struct Preparer {
    want: mpsc::Sender<u64>,
    ready: mpsc::Receiver<std::io::Result<Segment>>,
}

impl Preparer {
    /// Starts the helper thread that creates and zero-fills segments ahead
    /// of need ([`Segment::prepare`]).
    pub(super) fn start(
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        bytes: u64,
    ) -> std::io::Result<(Preparer, JoinHandle<()>)> {
        let (want, wanted) = mpsc::channel::<u64>();
        let (done, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sled-wal-prepare".into())
            .spawn(move || {
                // Ends when the group-commit thread drops its sender.
                while let Ok(n) = wanted.recv() {
                    if done
                        .send(Segment::prepare_on(&*disk, &dir, n, bytes, PREPARE_PAUSE))
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok((Preparer { want, ready }, thread))
    }

    fn want(&self, number: u64) {
        let _ = self.want.send(number);
    }

    /// Segment `number`: the prepared one (waiting for it if the helper is
    /// not done), or, if preparing failed, one created here. The helper
    /// never touches a number again once it has answered for it, so the
    /// two never create the same file.
    fn take(&self, disk: &dyn Disk, dir: &Path, number: u64) -> std::io::Result<Segment> {
        match self.ready.recv() {
            Ok(Ok(seg)) if seg.number == number => Ok(seg),
            Ok(Ok(seg)) => Err(std::io::Error::other(format!(
                "prepared segment {} where {number} was due",
                seg.number
            ))),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not prepare a write-ahead log segment ahead; creating it now");
                Segment::create_on(disk, dir, number)
            }
            Err(_) => Segment::create_on(disk, dir, number),
        }
    }
}

/// Queued entries beyond which a buffered audit append waits for its
/// group commit like any write (see `append_audit_buffered`).
pub(super) const MAX_BUFFERED: usize = 16_384;

/// Answers a synced batch's writers, applies the batch to sled (unless the
/// sync failed), records it as applied, and answers its barriers.
///
/// Writers are answered as soon as their changes are durable in the log,
/// before the apply: the apply is a third of a tokenize's cost, and
/// answering after it kept every caller of the batch waiting for it.
/// Until applied, reads find those changes in `State::pending` (see
/// [`SledStore::unapplied`]); scans wait on a barrier, which is answered
/// after the apply.
pub(super) fn finish_batch(
    shared: &Shared,
    mut batch: Vec<Entry>,
    res: std::result::Result<(), String>,
) {
    let last = batch.last().map_or(0, |e| e.lsn);
    if res.is_ok() {
        shared.durable.store(last, Ordering::Release);
        for e in batch.iter_mut().filter(|e| !e.muts.is_empty()) {
            if let Some(reply) = e.reply.take() {
                let _ = reply.send(Ok(()));
            }
        }
    }
    let gate = shared.apply_gate.read().recover();
    let applied = res.clone().and_then(|()| {
        let writes = batch.iter().any(|e| !e.muts.is_empty());
        if writes && shared.fail_next_apply.swap(false, Ordering::AcqRel) {
            return Err("storage: injected apply failure".to_owned());
        }
        shared
            .trees
            .apply(batch.iter().flat_map(|e| &e.muts))
            .map_err(|e| e.to_string())
    });
    drop(gate);
    {
        let mut st = shared.lock();
        if let Err(why) = &applied {
            st.failed.get_or_insert_with(|| why.clone());
            if res.is_ok() {
                shared.apply_failed.store(true, Ordering::Release);
            }
        }
        // Applied changes leave the overlay, and so do changes whose log
        // write failed (never acknowledged). Acknowledged changes that
        // could not be applied stay, so reads keep seeing them; the log
        // replays them on the next open.
        if applied.is_ok() || res.is_err() {
            st.pending.retain(|_, (lsn, _)| *lsn > last);
            shared
                .pending_len
                .store(st.pending.len(), Ordering::Release);
        }
        shared.applied.store(last, Ordering::Release);
    }
    if let Err(why) = &applied {
        tracing::error!(error = %why, "storage write failed; refusing writes until restart");
    }
    for e in batch {
        if let Some(reply) = e.reply {
            let _ = reply.send(applied.clone());
        }
    }
}

/// Deletes closed segments once a journal sync and a sled flush have made
/// their changes durable without the log.
///
/// Never after a failure: a batch that was acknowledged but not applied
/// lives only in the log (its segment may be one being closed), and a
/// failed journal sync or sled flush may have lost written pages that a
/// later, successful sync would not bring back (after a failed
/// `fdatasync` the kernel may mark them clean). So a failed sync or flush
/// fails the store closed, like a failed log write, and every segment is
/// kept for the next open to replay.
pub(super) fn run_cleaner(
    shared: Arc<Shared>,
    db: sled::Db,
    dir: PathBuf,
    closed: mpsc::Receiver<u64>,
) {
    let fail = |why: String| {
        tracing::error!(error = %why, "refusing writes and reads until restart; keeping the write-ahead log");
        shared.lock().failed.get_or_insert(why);
        // Pages that failed to sync may be gone from what reads see too.
        shared.apply_failed.store(true, Ordering::Release);
    };
    while let Ok(n) = closed.recv() {
        let upto = closed.try_iter().fold(n, u64::max);
        // Batches in segments up to `upto` finished before it was closed,
        // so a failed apply among them is already recorded here.
        if shared.lock().failed.is_some() {
            continue;
        }
        let synced = match shared.fail_next_journal_sync.swap(false, Ordering::AcqRel) {
            true => Err(Error::Unavailable("injected journal sync failure".into())),
            false => shared.trees.journal.sync(),
        };
        if let Err(e) = synced {
            fail(format!("audit journal sync failed: {e}"));
            continue;
        }
        if let Err(e) = db.flush() {
            fail(format!("sled flush failed: {e}"));
            continue;
        }
        if let Err(e) = remove_segments(&*shared.disk, &dir, upto) {
            // Harmless: they are replayed (over what they already hold)
            // and deleted at the next open.
            tracing::warn!(error = %e, "could not delete retired write-ahead log segments");
        }
        // Keep the tenant index near the head, so that a tenant query
        // after a long quiet spell does not index a day's records first.
        index_tenants(&shared);
    }
}
