//! `cardvault.v1.TokenService`: validates and converts requests, calls the
//! vault, converts results. Secrets copied out of a request are wiped from
//! the request message as soon as they have been parsed.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroize;

use super::identity::context_of;
use super::{item_error, timestamp};
use crate::auth::policy::Grant;
use crate::auth::{Action, Authorized, Authorizer, Caller};
use crate::card::YearMonth;
use crate::error::Result;
use crate::fields::{Purpose, Tenant};
use crate::proto::{self, token_service_server::TokenService};
use crate::token::{Token, TokenFormat};
use crate::vault::{
    CallContext, Card, CardMetadata, CvvOutcome, NewCard, TokenizeBudget, TokenizeOptions, Vault,
    check_batch_size,
};

/// The service, holding the shared vault and the authorizer.
pub(crate) struct TokenServiceImpl {
    /// The domain core.
    vault: Arc<Vault>,
    /// Decides who may call what, for which tenant.
    auth: Arc<Authorizer>,
}

impl TokenServiceImpl {
    /// Serves `vault`, checking every call with `auth`.
    pub(crate) fn new(vault: Arc<Vault>, auth: Arc<Authorizer>) -> Self {
        TokenServiceImpl { vault, auth }
    }

    /// Authorises a call and records the caller's roles in `ctx`. Denials
    /// are logged and audited.
    async fn authorize(
        &self,
        ctx: &mut CallContext,
        caller: &Caller,
        action: Action,
        tenant: &str,
    ) -> Result<Authorized> {
        match self.auth.authorize(caller, action, tenant) {
            Ok(a) => {
                ctx.roles = a
                    .grant
                    .roles
                    .iter()
                    .map(|r| r.as_str().to_owned())
                    .collect();
                Ok(a)
            }
            Err(e) => {
                tracing::warn!(
                    request_id = %ctx.request_id,
                    principal = %ctx.principal,
                    action = action.as_str(),
                    error = %e,
                    "denied"
                );
                // The requested tenant is recorded only if it is well-formed.
                let t = Tenant::parse(tenant)
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default();
                self.vault
                    .audit_rejected(ctx, action.into(), &t, "", &e)
                    .await;
                Err(e)
            }
        }
    }

    /// Passes a validation result through, auditing a failure. The raw
    /// input is never recorded (a malformed token may be a PAN).
    async fn validated<T>(
        &self,
        ctx: &CallContext,
        action: Action,
        tenant: &Tenant,
        parsed: Result<T>,
    ) -> Result<T> {
        // Sealed, every data call answers UNAVAILABLE whatever its input,
        // and before a detokenize budget is charged.
        let parsed = self.vault.check_unsealed().and(parsed);
        if let Err(e) = &parsed {
            self.vault
                .audit_rejected(ctx, action.into(), tenant.as_str(), "", e)
                .await;
        }
        parsed
    }

    /// The caller's collision budget, for the vault core to ask per card.
    fn budget_of<'a>(&'a self, ctx: &'a CallContext, authz: &'a Authorized) -> CallerBudget<'a> {
        CallerBudget {
            auth: &self.auth,
            principal: &ctx.principal,
            grant: &authz.grant,
        }
    }

    /// Charges the detokenize budget (a detokenize action) or the tokenize
    /// budget (a tokenize action); a refusal is logged and audited.
    async fn charge(
        &self,
        ctx: &CallContext,
        action: Action,
        authz: &Authorized,
        cards: usize,
    ) -> Result<()> {
        let cards = u32::try_from(cards).unwrap_or(u32::MAX);
        let res = match action {
            Action::Tokenize | Action::TokenizeBatch | Action::TokenizeSealed => self
                .auth
                .charge_tokenize(&ctx.principal, &authz.grant, cards),
            _ => self
                .auth
                .charge_detokenize(&ctx.principal, &authz.grant, cards),
        };
        if let Err(e) = &res {
            tracing::warn!(request_id = %ctx.request_id, principal = %ctx.principal, error = %e, "rate limited");
            self.vault
                .audit_rejected(ctx, action.into(), authz.tenant.as_str(), "", e)
                .await;
        }
        res
    }
}

/// The caller's collision budget, as the vault core asks it once per card.
struct CallerBudget<'a> {
    auth: &'a Authorizer,
    principal: &'a str,
    grant: &'a Grant,
}

impl TokenizeBudget for CallerBudget<'_> {
    fn admit(&self, collision: bool) -> Result<()> {
        let res = self
            .auth
            .admit_collision(self.principal, self.grant, collision);
        if let Err(e) = &res {
            tracing::warn!(principal = %self.principal, error = %e, "rate limited");
        }
        res
    }
}

/// Parses one card's fields (see [`NewCard::parse`]).
fn parse_card(
    pan: &str,
    exp_month: u32,
    exp_year: u32,
    name: Option<&str>,
    cvv: Option<&str>,
    today: YearMonth,
) -> Result<NewCard> {
    NewCard::parse(pan, exp_month, exp_year, name, cvv, today)
}

fn wipe(pan: &mut String, name: &mut Option<String>, cvv: &mut Option<String>) {
    pan.zeroize();
    if let Some(n) = name {
        n.zeroize();
    }
    if let Some(c) = cvv {
        c.zeroize();
    }
}

fn format_of(value: i32) -> Result<TokenFormat> {
    match proto::TokenFormat::try_from(value) {
        Ok(proto::TokenFormat::Unspecified | proto::TokenFormat::Opaque) => Ok(TokenFormat::Opaque),
        Ok(proto::TokenFormat::FormatPreserving) => {
            Ok(TokenFormat::FormatPreserving { keep_bin: false })
        }
        Ok(proto::TokenFormat::FormatPreservingKeepBin) => {
            Ok(TokenFormat::FormatPreserving { keep_bin: true })
        }
        Err(_) => Err(crate::Error::invalid("format", "unknown token format")),
    }
}

fn tokenize_response(m: CardMetadata) -> proto::TokenizeResponse {
    proto::TokenizeResponse {
        token: m.token,
        brand: m.brand,
        last4: m.last4,
        bin: m.bin,
        exp_month: m.exp_month,
        exp_year: m.exp_year,
        fingerprint: m.fingerprint,
        created_at: Some(timestamp(m.created_at_ms)),
        existing: m.existing,
        cvv_held: m.cvv_held,
    }
}

fn detokenize_response(card: Card) -> proto::DetokenizeResponse {
    let (cvv, cvv_status) = match card.cvv {
        CvvOutcome::NotRequested => (None, proto::CvvStatus::CvvNotRequested),
        CvvOutcome::Returned(c) => (Some(c.expose().to_owned()), proto::CvvStatus::CvvReturned),
        CvvOutcome::NotAvailable => (None, proto::CvvStatus::CvvNotAvailable),
    };
    proto::DetokenizeResponse {
        token: card.token.as_str().to_owned(),
        pan: card.pan.expose().to_owned(),
        exp_month: card.exp_month,
        exp_year: card.exp_year,
        cardholder_name: card
            .name
            .as_ref()
            .map(|n| n.expose().to_owned())
            .unwrap_or_default(),
        cvv,
        cvv_status: cvv_status as i32,
        brand: card.brand.as_str().to_owned(),
    }
}

#[tonic::async_trait]
impl TokenService for TokenServiceImpl {
    async fn create_collect_session(
        &self,
        request: Request<proto::CreateCollectSessionRequest>,
    ) -> Result<Response<proto::CreateCollectSessionResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let req = request.into_inner();
        let action = Action::CreateCollectSession;
        let authz = self
            .authorize(&mut ctx, &caller, action, &req.tenant)
            .await?;
        let ttl = req
            .ttl_seconds
            .map(|s| std::time::Duration::from_secs(u64::from(s)));
        let session = self
            .vault
            .create_collect_session(&ctx, &authz.tenant, ttl)
            .await?;
        let (kem_id, kdf_id, aead_id) = crate::crypto::sealed::SUITE_IDS;
        let session_key = format!(
            "cvk1.{}.{}.{}",
            authz.tenant,
            session.id,
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                &session.public_key
            )
        );
        Ok(Response::new(proto::CreateCollectSessionResponse {
            session_id: session.id,
            public_key: session.public_key,
            suite: session.suite.to_owned(),
            kem_id: kem_id.into(),
            kdf_id: kdf_id.into(),
            aead_id: aead_id.into(),
            expires_at: Some(timestamp(session.expires_at_ms)),
            session_key,
        }))
    }

    async fn tokenize_sealed(
        &self,
        request: Request<proto::TokenizeSealedRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let req = request.into_inner();
        let action = Action::TokenizeSealed;
        let authz = self
            .authorize(&mut ctx, &caller, action, &req.tenant)
            .await?;
        let format = self
            .validated(&ctx, action, &authz.tenant, format_of(req.format))
            .await?;
        // Opening validates the card like Tokenize's fields and audits a
        // failure; only then is the budget charged, so bad input is never.
        let card = self
            .vault
            .open_sealed(&ctx, &authz.tenant, &req.session_id, &req.sealed)
            .await?;
        self.charge(&ctx, action, &authz, 1).await?;
        let opts = TokenizeOptions {
            format,
            dedupe: req.dedupe,
        };
        let budget = self.budget_of(&ctx, &authz);
        let meta = self
            .vault
            .tokenize_sealed(&ctx, &authz.tenant, &req.session_id, card, opts, &budget)
            .await?;
        Ok(Response::new(tokenize_response(meta)))
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let mut req = request.into_inner();
        let authz = self
            .authorize(&mut ctx, &caller, Action::Tokenize, &req.tenant)
            .await;
        // Parse only for authorised callers, but wipe the secrets either way.
        let parsed = authz.as_ref().ok().map(|_| {
            let card = parse_card(
                &req.pan,
                req.exp_month,
                req.exp_year,
                req.cardholder_name.as_deref(),
                req.cvv.as_deref(),
                YearMonth::now_utc(),
            )?;
            Ok((card, format_of(req.format)?))
        });
        wipe(&mut req.pan, &mut req.cardholder_name, &mut req.cvv);
        let authz = authz?;
        let parsed = parsed.expect("parsed when authorised");
        let (card, format) = self
            .validated(&ctx, Action::Tokenize, &authz.tenant, parsed)
            .await?;
        // After validation: bad input is never charged.
        self.charge(&ctx, Action::Tokenize, &authz, 1).await?;
        let opts = TokenizeOptions {
            format,
            dedupe: req.dedupe,
        };
        let budget = self.budget_of(&ctx, &authz);
        let meta = self
            .vault
            .tokenize(&ctx, &authz.tenant, card, opts, &budget)
            .await?;
        Ok(Response::new(tokenize_response(meta)))
    }

    async fn tokenize_batch(
        &self,
        request: Request<proto::TokenizeBatchRequest>,
    ) -> Result<Response<proto::TokenizeBatchResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let mut req = request.into_inner();
        let action = Action::TokenizeBatch;
        let authz = match self.authorize(&mut ctx, &caller, action, &req.tenant).await {
            // Before any item is parsed: a 4 MiB request of empty items is
            // millions of them.
            Ok(a) => {
                let size = check_batch_size(req.items.len());
                self.validated(&ctx, action, &a.tenant, size)
                    .await
                    .map(|()| a)
            }
            Err(e) => Err(e),
        };
        if authz.is_err() {
            for item in &mut req.items {
                wipe(&mut item.pan, &mut item.cardholder_name, &mut item.cvv);
            }
        }
        let authz = authz?;
        let tenant = &authz.tenant;
        let today = YearMonth::now_utc();
        let mut references = Vec::with_capacity(req.items.len());
        let mut cards = Vec::with_capacity(req.items.len());
        for (i, item) in req.items.iter_mut().enumerate() {
            let parsed = parse_card(
                &item.pan,
                item.exp_month,
                item.exp_year,
                item.cardholder_name.as_deref(),
                item.cvv.as_deref(),
                today,
            )
            .map_err(|e| e.in_field(&format!("items[{i}]")));
            wipe(&mut item.pan, &mut item.cardholder_name, &mut item.cvv);
            references.push(std::mem::take(&mut item.reference));
            cards.push(parsed);
        }
        let format = self
            .validated(&ctx, action, tenant, format_of(req.format))
            .await?;
        // Per valid item, so a batch is no way around the budget.
        let valid = cards.iter().filter(|c| c.is_ok()).count();
        self.charge(&ctx, action, &authz, valid).await?;
        let opts = TokenizeOptions {
            format,
            dedupe: req.dedupe,
        };
        let budget = self.budget_of(&ctx, &authz);
        let results = self
            .vault
            .tokenize_batch(&ctx, tenant, cards, opts, &budget)
            .await?;
        let results = references
            .into_iter()
            .zip(results)
            .map(|(reference, r)| proto::TokenizeBatchResult {
                reference,
                result: Some(match r {
                    Ok(m) => proto::tokenize_batch_result::Result::Ok(tokenize_response(m)),
                    Err(e) => proto::tokenize_batch_result::Result::Error(item_error(&e)),
                }),
            })
            .collect();
        Ok(Response::new(proto::TokenizeBatchResponse { results }))
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let req = request.into_inner();
        let action = Action::Detokenize;
        let authz = self
            .authorize(&mut ctx, &caller, action, &req.tenant)
            .await?;
        let token = self
            .validated(&ctx, action, &authz.tenant, Token::parse(&req.token))
            .await?;
        // A refused purpose is recorded against the token it was for (masked
        // if it is digits: nothing says yet that it names a card), so "every
        // read of this token" shows the refused attempts too.
        let purpose = match Purpose::parse(&req.purpose) {
            Ok(p) => p,
            Err(e) => {
                self.vault
                    .audit_rejected(
                        &ctx,
                        action.into(),
                        authz.tenant.as_str(),
                        &token.recorded(false),
                        &e,
                    )
                    .await;
                return Err(e.into());
            }
        };
        self.charge(&ctx, action, &authz, 1).await?;
        let card = self
            .vault
            .detokenize(&ctx, &authz.tenant, &token, &purpose, req.include_cvv)
            .await?;
        Ok(Response::new(detokenize_response(card)))
    }

    async fn detokenize_batch(
        &self,
        request: Request<proto::DetokenizeBatchRequest>,
    ) -> Result<Response<proto::DetokenizeBatchResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let req = request.into_inner();
        let action = Action::DetokenizeBatch;
        let authz = self
            .authorize(&mut ctx, &caller, action, &req.tenant)
            .await?;
        // The size before any item is parsed (see tokenize_batch).
        let parsed = check_batch_size(req.items.len()).and_then(|()| Purpose::parse(&req.purpose));
        let purpose = self.validated(&ctx, action, &authz.tenant, parsed).await?;
        // The whole batch is charged up front: a budget bounds cards read,
        // however they are packaged.
        self.charge(&ctx, action, &authz, req.items.len()).await?;
        let (references, tokens): (Vec<_>, Vec<_>) = req
            .items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let token =
                    Token::parse(&item.token).map_err(|e| e.in_field(&format!("items[{i}]")));
                (item.reference, token)
            })
            .unzip();
        let results = self
            .vault
            .detokenize_batch(&ctx, &authz.tenant, tokens, &purpose, req.include_cvv)
            .await?;
        let results = references
            .into_iter()
            .zip(results)
            .map(|(reference, r)| proto::DetokenizeBatchResult {
                reference,
                result: Some(match r {
                    Ok(card) => {
                        proto::detokenize_batch_result::Result::Ok(detokenize_response(card))
                    }
                    Err(e) => proto::detokenize_batch_result::Result::Error(item_error(&e)),
                }),
            })
            .collect();
        Ok(Response::new(proto::DetokenizeBatchResponse { results }))
    }

    async fn get_metadata(
        &self,
        request: Request<proto::GetMetadataRequest>,
    ) -> Result<Response<proto::CardMetadata>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let req = request.into_inner();
        let action = Action::GetMetadata;
        let authz = self
            .authorize(&mut ctx, &caller, action, &req.tenant)
            .await?;
        let token = self
            .validated(&ctx, action, &authz.tenant, Token::parse(&req.token))
            .await?;
        let m = self.vault.metadata(&ctx, &authz.tenant, &token).await?;
        Ok(Response::new(proto::CardMetadata {
            token: m.token,
            brand: m.brand,
            last4: m.last4,
            bin: m.bin,
            exp_month: m.exp_month,
            exp_year: m.exp_year,
            fingerprint: m.fingerprint,
            created_at: Some(timestamp(m.created_at_ms)),
            cvv_held: m.cvv_held,
            key_version: m.key_version,
        }))
    }

    async fn delete_token(
        &self,
        request: Request<proto::DeleteTokenRequest>,
    ) -> Result<Response<proto::DeleteTokenResponse>, Status> {
        let (mut ctx, caller) = context_of(&request);
        let req = request.into_inner();
        let action = Action::DeleteToken;
        let authz = self
            .authorize(&mut ctx, &caller, action, &req.tenant)
            .await?;
        let token = self
            .validated(&ctx, action, &authz.tenant, Token::parse(&req.token))
            .await?;
        let deleted = self.vault.delete(&ctx, &authz.tenant, &token).await?;
        Ok(Response::new(proto::DeleteTokenResponse { deleted }))
    }
}
