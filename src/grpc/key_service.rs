//! `cardvault.v1.KeyService` (role: admin): seal state and key rotation.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::authorize_call;
use super::timestamp;
use crate::auth::{Action, Authorizer};
use crate::error::{Error, Result};
use crate::fields::Tenant;
use crate::proto::{self, key_service_server::KeyService};
use crate::vault::custody::{Custodian, RekeyView, UnsealProgress};
use crate::vault::guard::BucketId;
use crate::vault::keys::SealConfig;
use crate::vault::{CallContext, Vault};

/// The service, holding the shared vault and the authorizer.
pub(crate) struct KeyServiceImpl {
    /// The domain core (owns the keys).
    vault: Arc<Vault>,
    /// Decides who may manage keys.
    auth: Arc<Authorizer>,
}

impl KeyServiceImpl {
    /// Serves key management for `vault`.
    pub(crate) fn new(vault: Arc<Vault>, auth: Arc<Authorizer>) -> Self {
        KeyServiceImpl { vault, auth }
    }

    /// Authorises (see [`authorize_call`]).
    async fn authorize<T>(
        &self,
        req: &Request<T>,
        action: Action,
        tenant: Option<&str>,
    ) -> Result<CallContext> {
        authorize_call(&self.vault, &self.auth, req, action, tenant).await
    }
}

/// A timestamp, or none for "never" (0).
fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| timestamp(ms))
}

/// The custodians of a request, as the vault core takes them.
fn custodians_in(list: Vec<proto::Custodian>) -> Vec<Custodian> {
    list.into_iter()
        .map(|c| Custodian {
            principal: c.principal,
            age_recipient: c.age_recipient,
        })
        .collect()
}

/// The custodians' shares, each encrypted to its custodian: no plaintext
/// share is ever in a response.
fn shares_out(cfg: &SealConfig) -> Vec<proto::CustodianShare> {
    cfg.custodians
        .iter()
        .map(|c| proto::CustodianShare {
            principal: c.principal.clone(),
            age_recipient: c.age_recipient.clone(),
            age_share: c.age_share.clone(),
        })
        .collect()
}

fn rekey_out(v: RekeyView) -> proto::RekeyStatus {
    proto::RekeyStatus {
        nonce: v.nonce,
        expires_at: ts(v.expires_ms),
        entered_by: v.entered_by,
        required: v.required,
        new_threshold: v.new_threshold,
        new_custodians: v.new_custodians,
        completed: v.completed.is_some(),
        key_generation: v.completed.as_ref().map_or(0, |c| c.generation),
        shares: v.completed.as_ref().map(shares_out).unwrap_or_default(),
    }
}

type RewrapStream = ReceiverStream<Result<proto::RewrapProgress, Status>>;

#[tonic::async_trait]
impl KeyService for KeyServiceImpl {
    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        self.authorize(&request, Action::KeyStatus, None).await?;
        let s = self.vault.status().await?;
        let cfg = s.seal_config.clone().unwrap_or_default();
        let tenants = s
            .tenants
            .into_iter()
            .map(|t| {
                let newest = t.versions.iter().rfind(|v| v.retired_at_ms.is_none());
                let active = newest.map_or(0, |v| v.version);
                let last_rotation = newest.map_or(0, |v| v.created_at_ms);
                proto::TenantKeys {
                    tenant: t.tenant,
                    active_version: active,
                    last_rotation: ts(last_rotation),
                    versions: t
                        .versions
                        .into_iter()
                        .map(|v| proto::KeyVersion {
                            version: v.version,
                            records: v.records,
                            created_at: ts(v.created_at_ms),
                            active: v.version == active,
                            encryptions: v.encryptions,
                            retired_at: v.retired_at_ms.and_then(ts),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(proto::StatusResponse {
            sealed: s.sealed,
            initialized: s.initialized,
            seal_mode: s.seal_mode,
            threshold: cfg.threshold,
            shares: cfg.shares,
            unseal_progress: s.unseal_entered_by.len() as u32,
            key_generation: cfg.generation,
            tenants,
            store: s.store,
            cvvs_held: s.cvvs_held,
            last_master_rotation: ts(cfg.last_master_rotation_ms),
            unseal_entered_by: s.unseal_entered_by,
            custodians: shares_out(&cfg),
            rekey: s.rekey.map(rekey_out),
        }))
    }

    async fn init(
        &self,
        request: Request<proto::InitRequest>,
    ) -> Result<Response<proto::InitResponse>, Status> {
        let ctx = self.authorize(&request, Action::KeyInit, None).await?;
        let req = request.into_inner();
        let cfg = self
            .vault
            .init(&ctx, req.threshold, &custodians_in(req.custodians))
            .await?;
        Ok(Response::new(proto::InitResponse {
            shares: shares_out(&cfg),
            threshold: cfg.threshold,
            key_generation: cfg.generation,
        }))
    }

    async fn unseal(
        &self,
        request: Request<proto::UnsealRequest>,
    ) -> Result<Response<proto::UnsealResponse>, Status> {
        let ctx = self.authorize(&request, Action::KeyUnseal, None).await?;
        let mut req = request.into_inner();
        if req.reset {
            self.vault.reset_unseal();
        }
        let result = if req.share.is_empty() {
            if req.reset {
                // Only the seal state and the threshold: a full status
                // would count every record for this answer.
                Ok(UnsealProgress {
                    sealed: self.vault.is_sealed(),
                    entered_by: Vec::new(),
                    threshold: self.vault.seal_config().await?.map_or(0, |c| c.threshold),
                })
            } else {
                Err(Error::invalid("share", "is required"))
            }
        } else {
            self.vault.submit_share(&ctx, &req.share).await
        };
        zeroize::Zeroize::zeroize(&mut req.share);
        let p = result?;
        Ok(Response::new(proto::UnsealResponse {
            sealed: p.sealed,
            progress: p.entered_by.len() as u32,
            threshold: p.threshold,
            entered_by: p.entered_by,
        }))
    }

    async fn seal(
        &self,
        request: Request<proto::SealRequest>,
    ) -> Result<Response<proto::SealResponse>, Status> {
        let ctx = self.authorize(&request, Action::KeySeal, None).await?;
        self.vault.seal_by(&ctx).await?;
        Ok(Response::new(proto::SealResponse {}))
    }

    async fn rotate_data_key(
        &self,
        request: Request<proto::RotateDataKeyRequest>,
    ) -> Result<Response<proto::RotateDataKeyResponse>, Status> {
        let scope = (!request.get_ref().all).then(|| request.get_ref().tenant.clone());
        // Identity and role first, as for every call: a caller without the
        // admin role learns nothing about request validation.
        let ctx = self
            .authorize(&request, Action::RotateDataKey, scope.as_deref())
            .await?;
        if scope.as_deref() == Some("") {
            return Err(Error::invalid("tenant", "is required (or set all=true)").into());
        }
        let tenant = scope.as_deref().map(Tenant::parse).transpose()?;
        let rotated = self.vault.rotate_data_key(&ctx, tenant.as_ref()).await?;
        Ok(Response::new(proto::RotateDataKeyResponse {
            rotated: rotated
                .into_iter()
                .map(|(tenant, new_version)| proto::Rotated {
                    tenant,
                    new_version,
                })
                .collect(),
        }))
    }

    async fn clear_enumeration_guard(
        &self,
        request: Request<proto::ClearEnumerationGuardRequest>,
    ) -> Result<Response<proto::ClearEnumerationGuardResponse>, Status> {
        let req = request.get_ref();
        let ctx = self
            .authorize(&request, Action::ClearEnumerationGuard, Some(&req.tenant))
            .await?;
        let parsed = Tenant::parse(&req.tenant).and_then(|t| {
            let bucket = match req.bucket.as_str() {
                "" => None,
                b => Some(BucketId::parse(b)?),
            };
            Ok((t, bucket))
        });
        let (tenant, bucket) = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.vault
                    .audit_rejected(&ctx, Action::ClearEnumerationGuard.into(), "", "", &e)
                    .await;
                return Err(e.into());
            }
        };
        let cleared = self
            .vault
            .clear_enumeration_guard(&ctx, &tenant, bucket)
            .await?;
        Ok(Response::new(proto::ClearEnumerationGuardResponse {
            cleared,
        }))
    }

    type RewrapStream = RewrapStream;

    async fn rewrap(
        &self,
        request: Request<proto::RewrapRequest>,
    ) -> Result<Response<Self::RewrapStream>, Status> {
        let scope = request.get_ref().tenant.clone();
        let scope = (!scope.is_empty()).then_some(scope);
        let ctx = self
            .authorize(&request, Action::Rewrap, scope.as_deref())
            .await?;
        let tenant = scope.as_deref().map(Tenant::parse).transpose()?;
        let (ptx, mut prx) = tokio::sync::mpsc::channel(16);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let vault = self.vault.clone();
        // The job runs to completion even if the client goes away; running it
        // again later finds nothing left to do.
        tokio::spawn(async move {
            let job = vault.rewrap(&ctx, tenant.as_ref(), ptx);
            tokio::pin!(job);
            let outcome = loop {
                tokio::select! {
                    r = &mut job => break r,
                    Some(p) = prx.recv() => {
                        let _ = tx.send(Ok(progress(p))).await;
                    }
                }
            };
            while let Ok(p) = prx.try_recv() {
                let _ = tx.send(Ok(progress(p))).await;
            }
            if let Err(e) = outcome {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn retire_key(
        &self,
        request: Request<proto::RetireKeyRequest>,
    ) -> Result<Response<proto::RetireKeyResponse>, Status> {
        let tenant = request.get_ref().tenant.clone();
        let ctx = self
            .authorize(&request, Action::RetireKey, Some(&tenant))
            .await?;
        let t = Tenant::parse(&tenant)?;
        self.vault
            .retire_key(&ctx, &t, request.get_ref().version)
            .await?;
        Ok(Response::new(proto::RetireKeyResponse {}))
    }

    async fn start_rekey(
        &self,
        request: Request<proto::StartRekeyRequest>,
    ) -> Result<Response<proto::RekeyStatus>, Status> {
        let ctx = self.authorize(&request, Action::StartRekey, None).await?;
        let req = request.into_inner();
        let view = self
            .vault
            .start_rekey(&ctx, req.threshold, &custodians_in(req.custodians))
            .await?;
        Ok(Response::new(rekey_out(view)))
    }

    async fn submit_rekey_share(
        &self,
        request: Request<proto::SubmitRekeyShareRequest>,
    ) -> Result<Response<proto::RekeyStatus>, Status> {
        let ctx = self
            .authorize(&request, Action::SubmitRekeyShare, None)
            .await?;
        let mut req = request.into_inner();
        let result = self
            .vault
            .submit_rekey_share(&ctx, &req.nonce, &req.share)
            .await;
        zeroize::Zeroize::zeroize(&mut req.share);
        Ok(Response::new(rekey_out(result?)))
    }

    async fn cancel_rekey(
        &self,
        request: Request<proto::CancelRekeyRequest>,
    ) -> Result<Response<proto::RekeyStatus>, Status> {
        let ctx = self.authorize(&request, Action::CancelRekey, None).await?;
        let req = request.into_inner();
        self.vault.cancel_rekey(&ctx, &req.nonce).await?;
        Ok(Response::new(proto::RekeyStatus::default()))
    }
}

fn progress(p: crate::vault::keys::RewrapProgress) -> proto::RewrapProgress {
    proto::RewrapProgress {
        done: p.done,
        total: p.total,
        skipped: p.skipped,
        finished: p.finished,
    }
}
