//! Opening the embedded store: sled itself, the replay of what is left of
//! the write-ahead log, the deletion of replayed and retired segments, and
//! the derived state rebuilt in the background (the key filter, the tenant
//! audit index).

use super::*;

/// Opens sled in `path`. sled takes an exclusive file lock, and a handle
/// dropped in this process can keep it a few milliseconds longer (sled's
/// I/O threads finish their last jobs), so a lock conflict is retried for
/// up to [`LOCK_WAIT`] before it is reported (e.g. another vault running
/// on the same directory).
pub(super) fn open_db(path: &Path) -> Result<sled::Db> {
    let started = Instant::now();
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
}

/// How long [`open_db`] waits for sled's lock.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(2);

/// A log segment left at open: its number, and whether it is of the
/// earlier frame format ([`wal::legacy`]).
pub(super) type LeftSegment = (u64, bool);

pub(super) fn read_left(
    disk: &dyn Disk,
    dir: &Path,
    &(n, legacy): &LeftSegment,
) -> Result<(Vec<Vec<Mutation>>, wal::End)> {
    let read = if legacy {
        wal::legacy::read_segment(disk, dir, n)
    } else {
        wal::read_segment_on(disk, dir, n)
    };
    read.map_err(unavailable)
}

/// Whether every one of `segs` holds no frame at all (zero-filled spares).
pub(super) fn later_segments_are_unused(
    disk: &dyn Disk,
    dir: &Path,
    segs: &[LeftSegment],
) -> Result<bool> {
    for seg in segs {
        let (ops, end) = read_left(disk, dir, seg)?;
        if !ops.is_empty() || end != wal::End::Clean {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Replays what is left of the log into sled and flushes sled. Returns the
/// number for the next segment and the replayed segments' files, which the
/// caller deletes only once the whole open, every check included, has
/// succeeded: until then they are the only copy of what a failed check
/// may need.
pub(super) fn recover(
    db: &sled::Db,
    trees: &Trees,
    dir: &Path,
    disk: &dyn Disk,
) -> Result<(u64, Vec<PathBuf>)> {
    // Segments of the earlier format were all written before any of the
    // current one (an open replays and removes them first): one sequence.
    let mut segs: Vec<LeftSegment> = wal::legacy::segments(disk, dir)
        .map_err(unavailable)?
        .into_iter()
        .map(|n| (n, true))
        .chain(
            wal::segments_on(disk, dir)
                .map_err(unavailable)?
                .into_iter()
                .map(|n| (n, false)),
        )
        .collect();
    segs.sort_unstable();
    for (i, seg) in segs.iter().enumerate() {
        let n = seg.0;
        let (ops, end) = read_left(disk, dir, seg)?;
        trees.apply(ops.iter().flatten())?;
        match end {
            wal::End::Clean => {}
            // Damage, not a tear: acknowledged writes are unreadable.
            wal::End::Corrupt { at } => {
                return Err(corrupt(format!(
                    "write-ahead log segment {n} is corrupt at byte {at}: acknowledged writes there cannot be read; the log is kept as it is"
                )));
            }
            // Only the segment being written at the crash can end mid-frame;
            // an earlier one was complete and synced before the next began.
            // Segments after it may exist but be empty: prepared ahead of
            // need (see `Preparer`), never written.
            wal::End::Torn if !later_segments_are_unused(disk, dir, &segs[i + 1..])? => {
                return Err(corrupt(format!(
                    "write-ahead log segment {n} is corrupt before its end"
                )));
            }
            wal::End::Torn => tracing::warn!(
                segment = n,
                replayed = ops.len(),
                "write-ahead log ended in an incomplete write (a crash while writing); that unacknowledged write is dropped"
            ),
        }
    }
    let Some(&(last, _)) = segs.last() else {
        return Ok((1, Vec::new()));
    };
    trees.journal.sync()?;
    db.flush().map_err(unavailable)?;
    let files = segs
        .iter()
        .map(|&(n, legacy)| {
            if legacy {
                wal::legacy::segment_path(dir, n)
            } else {
                wal::segment_path(dir, n)
            }
        })
        .collect();
    Ok((last + 1, files))
}

/// Adds the record and fingerprint keys present at open to the filter,
/// then marks it ready. Stops early (filter never ready) when the store
/// closes or sled fails; checks then keep reading sled, which is correct.
pub(super) fn fill_filter(shared: &Shared) {
    let started = Instant::now();
    let mut n = 0u64;
    for (no, tree) in [
        (RECORDS, &shared.trees.records),
        (FINGERPRINTS, &shared.trees.fingerprints),
        (GUARD, &shared.trees.guard),
    ] {
        for key in tree.iter().keys() {
            match key {
                Ok(k) => shared.filter.add(no, &k),
                Err(e) => {
                    tracing::warn!(error = %e, "could not scan keys for the key filter; tokenize reads sled for every check");
                    return;
                }
            }
            n += 1;
            if n.is_multiple_of(4096) && shared.lock().closing {
                return;
            }
        }
    }
    shared.filter.set_ready();
    index_tenants(shared);
    tracing::info!(
        keys = n,
        ms = started.elapsed().as_millis() as u64,
        "key filter ready"
    );
}

/// Deletes the segments numbered up to `upto`, oldest first, each deletion
/// durable before the next. Replaying an old segment over state that later
/// ones changed would bring deleted records back, so a crash must never
/// leave an older segment behind a deleted newer one.
pub(super) fn remove_segments(disk: &dyn Disk, dir: &Path, upto: u64) -> std::io::Result<()> {
    let retired: Vec<PathBuf> = wal::segments_on(disk, dir)?
        .into_iter()
        .filter(|&s| s <= upto)
        .map(|s| wal::segment_path(dir, s))
        .collect();
    remove_in_order(disk, dir, &retired)
}

/// Deletes `files` of `dir` in the order given (oldest segment first),
/// each deletion durable before the next (see [`remove_segments`]).
pub(super) fn remove_in_order(
    disk: &dyn Disk,
    dir: &Path,
    files: &[PathBuf],
) -> std::io::Result<()> {
    for f in files {
        disk.remove(f)?;
        disk.sync_dir(dir)?;
    }
    Ok(())
}

/// Brings the tenant audit index up to the journal; a failure is logged
/// (the next tenant query tries again and reports it).
pub(super) fn index_tenants(shared: &Shared) {
    let started = Instant::now();
    match shared
        .trees
        .tenant_audit
        .catch_up(&shared.trees.journal, || shared.lock().closing)
    {
        Ok(0) => {}
        Ok(n) => tracing::debug!(
            records = n,
            ms = started.elapsed().as_millis() as u64,
            "indexed audit records by tenant"
        ),
        Err(e) => tracing::warn!(error = %e, "could not index audit records by tenant"),
    }
}
