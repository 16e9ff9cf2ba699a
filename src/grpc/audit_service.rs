//! `cardvault.v1.AuditService` (role: auditor).

use crate::audit::AuditAction;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::timestamp;
use super::{authorize_call, authorize_grant};
use crate::audit::query::AuditFilter;
use crate::auth::{Action, Authorizer};
use crate::error::{Error, Result};
use crate::proto::{self, audit_service_server::AuditService};
use crate::vault::Vault;
use crate::vault::audit_log::AuditHit;

/// The service, holding the shared vault and the authorizer.
pub(crate) struct AuditServiceImpl {
    /// The domain core (owns the log).
    vault: Arc<Vault>,
    /// Decides who may read the log.
    auth: Arc<Authorizer>,
}

impl AuditServiceImpl {
    /// Serves the audit log of `vault`.
    pub(crate) fn new(vault: Arc<Vault>, auth: Arc<Authorizer>) -> Self {
        AuditServiceImpl { vault, auth }
    }

    /// The request's `since` and `until` in ms; a refusal is audited.
    async fn window(
        &self,
        ctx: &crate::vault::CallContext,
        action: AuditAction,
        since: &Option<prost_types::Timestamp>,
        until: &Option<prost_types::Timestamp>,
    ) -> Result<(i64, i64)> {
        // Sealed, the service is unavailable whatever the input.
        let window = (self.vault.check_unsealed())
            .and_then(|()| Ok((ms_of(since, "since")?, ms_of(until, "until")?)));
        if let Err(e) = &window {
            self.vault.audit_rejected(ctx, action, "", "", e).await;
        }
        window
    }
}

/// Milliseconds since the epoch of an optional request time (0 if unset).
fn ms_of(t: &Option<prost_types::Timestamp>, field: &str) -> Result<i64> {
    match t {
        None => Ok(0),
        Some(t) if t.seconds >= 0 && (0..1_000_000_000).contains(&t.nanos) => t
            .seconds
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
            .ok_or_else(|| Error::invalid(field, "is too far in the future")),
        Some(_) => Err(Error::invalid(field, "must be a valid time after 1970")),
    }
}

/// One hit as an event. `global` says whether the caller may see the
/// chain's own numbering: a caller scoped to tenants gets only its
/// tenant's numbers, since gaps in the global ones would tell how busy the
/// other tenants are.
fn event(hit: AuditHit, global: bool) -> proto::AuditEvent {
    let b = hit.body;
    proto::AuditEvent {
        seq: if global { hit.record.seq } else { 0 },
        tenant_seq: hit.tenant_seq.unwrap_or(0),
        time: Some(timestamp(b.time_ms)),
        principal: b.principal,
        roles: b.roles,
        tenant: b.tenant,
        action: b.action,
        token: b.token,
        purpose: b.purpose,
        outcome: b.outcome,
        error: b.error,
        request_id: b.request_id,
        peer: b.peer,
        detail: b.detail,
        hash: hex::encode(&hit.record.hash),
        replica: b.replica,
    }
}

#[tonic::async_trait]
impl AuditService for AuditServiceImpl {
    async fn query(
        &self,
        request: Request<proto::AuditQueryRequest>,
    ) -> Result<Response<proto::AuditQueryResponse>, Status> {
        let scope = Some(request.get_ref().tenant.clone()).filter(|t| !t.is_empty());
        let (ctx, grant) = authorize_grant(
            &self.vault,
            &self.auth,
            &request,
            Action::AuditQuery,
            scope.as_deref(),
        )
        .await?;
        let global = grant.tenants.is_none();
        let req = request.into_inner();
        let window = self
            .window(&ctx, AuditAction::AuditQuery, &req.since, &req.until)
            .await?;
        let filter = AuditFilter {
            principal: req.principal,
            tenant: req.tenant,
            action: req.action,
            token: req.token,
            since_ms: window.0,
            until_ms: window.1,
        };
        let limit = if req.limit == 0 {
            1000
        } else {
            req.limit as usize
        };
        let (hits, next) = self
            .vault
            .query_audit(&ctx, &filter, req.after_seq, limit)
            .await?;
        Ok(Response::new(proto::AuditQueryResponse {
            events: hits.into_iter().map(|h| event(h, global)).collect(),
            next_after_seq: next,
        }))
    }

    async fn blast_radius(
        &self,
        request: Request<proto::BlastRadiusRequest>,
    ) -> Result<Response<proto::BlastRadiusResponse>, Status> {
        let ctx = authorize_call(
            &self.vault,
            &self.auth,
            &request,
            Action::AuditBlastRadius,
            None,
        )
        .await?;
        let req = request.into_inner();
        let (since, until) = self
            .window(&ctx, AuditAction::AuditBlastRadius, &req.since, &req.until)
            .await?;
        let radius = self
            .vault
            .blast_radius(&ctx, &req.principal, since, until)
            .await?;
        let mut total_reads = 0;
        let tenants = radius
            .tenants
            .iter()
            .map(|(tenant, tokens)| proto::TenantReads {
                tenant: tenant.clone(),
                tokens: tokens
                    .iter()
                    .map(|(token, r)| {
                        total_reads += r.reads;
                        proto::TokenReads {
                            token: token.clone(),
                            reads: r.reads,
                            first_read: Some(timestamp(r.first_ms)),
                            last_read: Some(timestamp(r.last_ms)),
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(proto::BlastRadiusResponse {
            principal: req.principal,
            tenants,
            distinct_tokens: radius.distinct_tokens() as u64,
            total_reads,
        }))
    }

    async fn verify(
        &self,
        request: Request<proto::VerifyAuditRequest>,
    ) -> Result<Response<proto::VerifyAuditResponse>, Status> {
        let ctx =
            authorize_call(&self.vault, &self.auth, &request, Action::AuditVerify, None).await?;
        let r = self.vault.verify_audit(&ctx).await?;
        Ok(Response::new(proto::VerifyAuditResponse {
            ok: r.ok(),
            records: r.records,
            checkpoints: r.checkpoints,
            last_checkpoint_seq: r.last_checkpoint_seq,
            first_bad_seq: r.first_bad_seq,
            problem: r.problem,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn request_times_convert_or_are_refused_naming_the_field() {
        assert_eq!(ms_of(&None, "since"), Ok(0));
        assert_eq!(ms_of(&at(1, 999_999_999), "since"), Ok(1999));
        for (t, why) in [
            (at(i64::MAX, 999_000_000), "is too far in the future"),
            (at(i64::MAX / 1000 + 1, 0), "is too far in the future"),
            (at(-1, 0), "must be a valid time after 1970"),
            (at(0, -1), "must be a valid time after 1970"),
            (at(0, 1_000_000_000), "must be a valid time after 1970"),
        ] {
            assert_eq!(ms_of(&t, "until"), Err(Error::invalid("until", why)));
        }
    }
}
