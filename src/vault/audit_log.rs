//! Reading the audit log back: query, blast radius, verification, and the
//! optional JSON-lines copy for a SIEM.

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Mutex;

use serde_json::json;

use super::{CallContext, Vault, audit_body};
use crate::audit::query::{AuditFilter, BlastRadius};
use crate::audit::{AuditBody, AuditRecord, Verifier, VerifyReport, public_key};
use crate::error::{Error, Result};
use crate::store::AuditLink;
use crate::token::Token;

/// Records read from the store per page when scanning the log.
const PAGE: usize = 5000;
/// Most records one query returns.
pub const MAX_QUERY_LIMIT: usize = 10_000;

/// Copies each committed audit record as one JSON line to a writer (a file
/// or stdout) for a SIEM. The hash-chained store stays the source of truth;
/// a write error here is logged, never fatal.
pub struct AuditSink {
    /// Destination; a mutex keeps lines whole.
    out: Mutex<Box<dyn Write + Send>>,
}

impl AuditSink {
    /// A sink writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        AuditSink {
            out: Mutex::new(out),
        }
    }

    /// Writes one record.
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
        });
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            tracing::warn!("audit SIEM sink write failed");
        }
    }
}

/// One query hit.
pub struct AuditHit {
    /// The stored record (seq, hashes).
    pub record: AuditRecord,
    /// Its decoded body.
    pub body: AuditBody,
}

impl Vault {
    /// Feeds every audit record with seq > `after` to `f`, in chain order,
    /// page by page, until the log ends or `f` breaks. Returns the seq of
    /// the last record fed (or `after`).
    async fn scan_audit(
        &self,
        after: u64,
        mut f: impl FnMut(u64, AuditRecord) -> ControlFlow<()>,
    ) -> Result<u64> {
        let mut cursor = after;
        loop {
            let page = self.store.audit_records(cursor, PAGE).await?;
            if page.is_empty() {
                return Ok(cursor);
            }
            for (seq, record) in page {
                cursor = seq;
                if f(seq, record).is_break() {
                    return Ok(cursor);
                }
            }
        }
    }

    /// Audit records matching `filter` with seq > `after_seq`, at most
    /// `limit`. Returns the hits and the seq to continue after.
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
            self.audit_rejected(ctx, "AuditQuery", "", "", &e).await;
            return Err(e);
        }
        let limit = limit.clamp(1, MAX_QUERY_LIMIT);
        let mut hits = Vec::new();
        let cursor = self
            .scan_audit(after_seq, |_, record| {
                if let Some(body) = record.decode_body()
                    && filter.matches(&body)
                {
                    hits.push(AuditHit { record, body });
                }
                if hits.len() >= limit {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await?;
        // A digit token in the filter names no card this query read: masked
        // (it may be a mistyped card number, see `Token::recorded`).
        let token = match Token::parse(&filter.token) {
            Ok(t) => t.recorded(false).into_owned(),
            Err(_) => String::new(),
        };
        let mut body = audit_body(ctx, "AuditQuery", &filter.tenant, &token, Ok(()));
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
            self.audit_rejected(ctx, "AuditBlastRadius", "", "", &e)
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
        self.scan_audit(0, |_, record| {
            if let Some(body) = record.decode_body()
                && filter.matches(&body)
            {
                radius.add(&body);
            }
            ControlFlow::Continue(())
        })
        .await?;
        let mut body = audit_body(ctx, "AuditBlastRadius", "", "", Ok(()));
        body.detail = format!("principal={principal} tokens={}", radius.distinct_tokens());
        self.record(body).await?;
        Ok(radius)
    }

    /// Recomputes the whole chain and every checkpoint signature; reports
    /// the first record that does not fit. Needs the vault unsealed (the
    /// signing key's public half comes from the wrapped key, not from the
    /// store, so a forged key in the store cannot vouch for a forged log).
    pub async fn verify_audit(&self, ctx: &CallContext) -> Result<VerifyReport> {
        let keyring = self.keyring()?;
        let mut v = Verifier::new(
            self.store.checkpoints().await?,
            public_key(keyring.audit_key()),
        );
        let head = self.store.audit_head().await?;
        // Records appended after the head was read are the next verify's:
        // counting them here would make a busy log look truncated.
        let upto = head.as_ref().map_or(u64::MAX, |(seq, _)| *seq);
        self.scan_audit(0, |seq, record| {
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
        let report = v.finish(head);
        let mut body = audit_body(ctx, "AuditVerify", "", "", Ok(()));
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
