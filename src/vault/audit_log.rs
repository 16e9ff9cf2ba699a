//! Reading the audit log back: query, blast radius, verification, and the
//! optional JSON-lines copy for a SIEM.

use crate::audit::AuditAction;
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Mutex;

use serde_json::json;

use super::{CallContext, Vault, audit_body};
use crate::audit::query::{AuditFilter, BlastRadius};
use crate::audit::{AuditBody, AuditRecord, Verifier, VerifyReport, public_key};
use crate::error::{Error, Result};
use crate::store::AuditLink;
use crate::sync::Recover;
use crate::token::Token;

/// Records read from the store per page when scanning the log.
const PAGE: usize = 5000;
/// Most records one query returns.
pub const MAX_QUERY_LIMIT: usize = 10_000;

/// Copies each committed audit record as one JSON line to a writer (a file
/// or stdout) for a SIEM. The hash-chained store stays the source of truth;
/// a write error here is logged, never fatal.
///
/// The writing happens on a thread of its own, fed through a bounded queue:
/// a stalled destination (a full pipe, a hung network file system) must
/// not stall the calls being audited. Lines follow the order the calls
/// finished in, which is not always seq order (group commits answer their
/// callers in any order): consumers order them by `seq`. If the queue is
/// full, lines are dropped and counted ([`AuditSink::dropped`], exported as
/// a metric), and the gap shows in the seqs the SIEM received.
pub struct AuditSink {
    /// To the writer thread; `None` once closed (drop).
    tx: Mutex<Option<std::sync::mpsc::SyncSender<String>>>,
    /// Lines dropped because the queue was full.
    dropped: std::sync::atomic::AtomicU64,
    /// Told when the writer thread has written everything and stopped.
    done: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// Lines that may wait for the writer thread.
const SINK_QUEUE: usize = 65_536;

/// How long a closing sink waits for its queue to be written.
const SINK_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

impl AuditSink {
    /// A sink writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self::with_queue(out, SINK_QUEUE)
    }

    /// A sink whose queue holds `capacity` lines.
    pub fn with_queue(mut out: Box<dyn Write + Send>, capacity: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(capacity);
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("cardvault-siem".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let mut ok = writeln!(out, "{line}").is_ok();
                    // Whatever else is waiting, then one flush.
                    while let Ok(line) = rx.try_recv() {
                        ok &= writeln!(out, "{line}").is_ok();
                    }
                    if !(ok && out.flush().is_ok()) {
                        tracing::warn!("audit SIEM sink write failed");
                    }
                }
                let _ = done_tx.send(());
            })
            .expect("spawn the SIEM writer thread");
        AuditSink {
            tx: Mutex::new(Some(tx)),
            dropped: Default::default(),
            done: Mutex::new(done),
        }
    }

    /// Queues one record for writing; never blocks.
    pub fn write(&self, link: &AuditLink, b: &AuditBody) {
        let line = json!({
            "seq": link.seq,
            "hash": hex::encode(&link.hash),
            "time_ms": b.time_ms,
            "principal": b.principal,
            "roles": b.roles,
            "tenant": b.tenant,
            "action": b.action,
            "token": b.token,
            "purpose": b.purpose,
            "outcome": b.outcome,
            "error": b.error,
            "request_id": b.request_id,
            "peer": b.peer,
            "detail": b.detail,
            "replica": b.replica,
        })
        .to_string();
        let tx = self.tx.lock().recover();
        let Some(tx) = tx.as_ref() else { return };
        if tx.try_send(line).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Once, then at every power of two: a stuck SIEM is loud but
            // does not flood the log.
            if (n + 1).is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "audit SIEM sink is not keeping up; lines dropped"
                );
            }
        }
    }

    /// Lines dropped so far because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops taking lines and waits (at most a few seconds) until those
    /// queued are written: at shutdown, so the SIEM file is complete.
    pub fn close(&self) {
        drop(self.tx.lock().recover().take());
        let done = self.done.lock().recover();
        if done.recv_timeout(SINK_DRAIN).is_err() {
            tracing::warn!("audit SIEM sink did not drain at close");
        }
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        if self.tx.get_mut().map(|t| t.is_some()).unwrap_or(false) {
            self.close();
        }
    }
}

/// One query hit.
pub struct AuditHit {
    /// The stored record (seq, hashes).
    pub record: AuditRecord,
    /// Its decoded body.
    pub body: AuditBody,
    /// Its position among its tenant's records, when the query named a
    /// tenant.
    pub tenant_seq: Option<u64>,
}

impl Vault {
    /// Feeds every audit record after position `after` to `f`, in chain
    /// order, page by page, until the log ends or `f` breaks. Returns the
    /// position of the last record fed (or `after`). Positions are seqs, or
    /// with `tenant` the numbers of that tenant's records, read through the
    /// store's tenant index.
    async fn scan_audit(
        &self,
        tenant: Option<&str>,
        after: u64,
        mut f: impl FnMut(u64, AuditRecord) -> ControlFlow<()>,
    ) -> Result<u64> {
        let mut cursor = after;
        loop {
            let page = match tenant {
                None => self.store.audit_records(cursor, PAGE).await?,
                Some(t) => self.store.tenant_audit_records(t, cursor, PAGE).await?,
            };
            if page.is_empty() {
                return Ok(cursor);
            }
            for (position, record) in page {
                cursor = position;
                if f(position, record).is_break() {
                    return Ok(cursor);
                }
            }
        }
    }

    /// Audit records matching `filter` after position `after_seq`, at most
    /// `limit`. Returns the hits and the position to continue after. The
    /// position is the tenant's numbering when the filter names a tenant
    /// (read through the store's tenant index), else the chain's seq.
    pub async fn query_audit(
        &self,
        ctx: &CallContext,
        filter: &AuditFilter,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Vec<AuditHit>, u64)> {
        // Sealed, the audit service is unavailable like the token service.
        // A refusal is itself recorded, without the refused values.
        if let Err(e) = self.check_unsealed().and_then(|()| filter.validate()) {
            self.audit_rejected(ctx, AuditAction::AuditQuery, "", "", &e)
                .await;
            return Err(e);
        }
        let limit = limit.clamp(1, MAX_QUERY_LIMIT);
        let mut hits = Vec::new();
        let mut found = |tenant_seq: Option<u64>, record: AuditRecord| {
            if let Some(body) = record.decode_body()
                && filter.matches(&body)
            {
                hits.push(AuditHit {
                    record,
                    body,
                    tenant_seq,
                });
            }
            if hits.len() >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        // A query naming a tenant reads that tenant's index and is paged by
        // its numbering; any other reads the whole chain.
        let tenant = Some(filter.tenant.as_str()).filter(|t| !t.is_empty());
        let cursor = self
            .scan_audit(tenant, after_seq, |n, record| {
                found(tenant.map(|_| n), record)
            })
            .await?;
        // A digit token in the filter names no card this query read: masked
        // (it may be a mistyped card number, see `Token::recorded`).
        let token = match Token::parse(&filter.token) {
            Ok(t) => t.recorded(false).into_owned(),
            Err(_) => String::new(),
        };
        let mut body = audit_body(ctx, AuditAction::AuditQuery, &filter.tenant, &token, Ok(()));
        body.detail = format!(
            "principal={} action={} hits={}",
            filter.principal,
            filter.action,
            hits.len()
        );
        self.record(body).await?;
        Ok((hits, cursor))
    }

    /// Every card `principal` read (successful detokenize) in the window,
    /// by tenant and token, with counts.
    pub async fn blast_radius(
        &self,
        ctx: &CallContext,
        principal: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<BlastRadius> {
        let checked = self.check_unsealed().and_then(|()| match principal {
            "" => Err(Error::invalid("principal", "is required")),
            p => crate::audit::query::check_principal(p),
        });
        if let Err(e) = checked {
            self.audit_rejected(ctx, AuditAction::AuditBlastRadius, "", "", &e)
                .await;
            return Err(e);
        }
        let filter = AuditFilter {
            principal: principal.to_owned(),
            since_ms,
            until_ms,
            ..Default::default()
        };
        let mut radius = BlastRadius::default();
        self.scan_audit(None, 0, |_, record| {
            if let Some(body) = record.decode_body()
                && filter.matches(&body)
            {
                radius.add(&body);
            }
            ControlFlow::Continue(())
        })
        .await?;
        let mut body = audit_body(ctx, AuditAction::AuditBlastRadius, "", "", Ok(()));
        body.detail = format!("principal={principal} tokens={}", radius.distinct_tokens());
        self.record(body).await?;
        Ok(radius)
    }

    /// Recomputes the whole chain and every checkpoint signature; reports
    /// the first record that does not fit. Needs the vault unsealed (the
    /// signing key's public half comes from the wrapped key, not from the
    /// store, so a forged key in the store cannot vouch for a forged log).
    pub async fn verify_audit(&self, ctx: &CallContext) -> Result<VerifyReport> {
        // A refusal (sealed) or a failure is recorded too, as for a query.
        let result = self.verify_inner(ctx).await;
        self.audit_failure(ctx, AuditAction::AuditVerify, "", result)
            .await
    }

    async fn verify_inner(&self, ctx: &CallContext) -> Result<VerifyReport> {
        let keyring = self.keyring()?;
        // Read before the store's list: every checkpoint counted in it was
        // stored before it was counted, so the list must hold it.
        let seen = self
            .last_checkpoint
            .load(std::sync::atomic::Ordering::Relaxed);
        let checkpoints = self.store.checkpoints().await?;
        let newest = checkpoints.iter().map(|c| c.seq).max().unwrap_or(0);
        let mut v = Verifier::new(checkpoints, public_key(keyring.audit_key()));
        let head = self.store.audit_head().await?;
        // Records appended after the head was read are the next verify's:
        // counting them here would make a busy log look truncated.
        let upto = head.as_ref().map_or(u64::MAX, |(seq, _)| *seq);
        self.scan_audit(None, 0, |seq, record| {
            if seq > upto {
                return ControlFlow::Break(());
            }
            v.record(seq, &record);
            if v.failed() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        let mut report = v.finish(head);
        // Deleting the newest checkpoints and rewriting the records after
        // the last one left would otherwise verify: this process knows a
        // checkpoint at `seen` existed. (After a restart only the SIEM
        // feed keeps that knowledge.)
        if report.ok() && newest < seen {
            report.first_bad_seq = newest + 1;
            report.problem = format!(
                "the checkpoint signed at record {seen} is gone from the store: checkpoints were deleted"
            );
        }
        let mut body = audit_body(ctx, AuditAction::AuditVerify, "", "", Ok(()));
        body.detail = if report.ok() {
            format!("intact: {} records", report.records)
        } else {
            format!(
                "first bad record {}: {}",
                report.first_bad_seq, report.problem
            )
        };
        // Appended after the scan, so a verify never reports its own record.
        self.record(body).await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar};

    /// Whether the gate is open, and what went through it.
    type GateState = Mutex<(bool, Vec<u8>)>;

    /// A destination that takes nothing until opened, then keeps lines.
    #[derive(Clone, Default)]
    struct Gate(Arc<(GateState, Condvar)>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, open) = &*self.0;
            let mut g = open
                .wait_while(lock.lock().unwrap(), |(opened, _)| !*opened)
                .unwrap();
            g.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn link(seq: u64) -> AuditLink {
        AuditLink {
            seq,
            hash: vec![0; 32],
        }
    }

    /// A stalled SIEM destination does not stall the audited calls: writes
    /// return at once, a full queue drops (and counts) lines, and what was
    /// queued is written, in order, once the destination moves again.
    #[test]
    fn a_stalled_destination_never_blocks_a_write() {
        let gate = Gate::default();
        let sink = AuditSink::with_queue(Box::new(gate.clone()), 4);
        let body = AuditBody::default();
        // The writer thread takes line 1 and blocks in it; 4 more queue
        // (or lines 1-4 queue first and one more finds room later).
        for seq in 1..=20 {
            sink.write(&link(seq), &body);
        }
        let dropped = sink.dropped();
        assert!((15..=16).contains(&dropped), "dropped {dropped}");
        {
            let (lock, open) = &*gate.0;
            lock.lock().unwrap().0 = true;
            open.notify_all();
        }
        sink.close();
        let text = String::from_utf8(gate.0.0.lock().unwrap().1.clone()).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs.len() as u64, 20 - dropped, "{seqs:?}");
        // In order. Which lines found room depends on when the writer
        // thread took the first one (before or after the queue filled).
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(seqs[..4], [1, 2, 3, 4], "{seqs:?}");
        // Closed: further writes are ignored, not queued.
        sink.write(&link(99), &body);
        assert_eq!(sink.dropped(), dropped);
    }
}
