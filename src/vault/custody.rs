//! Key ceremonies with split knowledge and dual control, so that no one
//! identity can rebuild the KEK (PCI DSS 3.6.1.2, 3.7.6):
//!
//! * **Init** names its custodians: each is a principal (the identity it
//!   will unseal as) and an `age` X25519 public key. The KEK is split into
//!   one Shamir share per custodian, each bound to the vault id, key
//!   generation, threshold and custodian by a MAC under a key derived from
//!   the KEK, and encrypted to that custodian. No plaintext share leaves
//!   the vault; the encrypted ones are also kept in the seal configuration,
//!   so a lost answer loses nothing (`Status` returns them).
//! * **Unseal** takes one share per custodian per attempt, from the
//!   principal the share was issued to. Once `threshold` custodians have
//!   entered theirs the KEK is rebuilt and checked, every share's MAC and
//!   the seal configuration's MAC with it: a forged or altered share, or an
//!   altered configuration, is named, never silently combined.
//! * **Rekey** (master key rotation) needs `threshold` distinct custodians to
//!   each submit a current share within a time limit. Only then is a new KEK
//!   made, every wrapped key re-wrapped and new shares issued to the (possibly
//!   new) custodians, all in one atomic write. A rekey that is cancelled,
//!   times out or stops halfway changes nothing: the old shares stay valid.
//!
//! The model is HashiCorp Vault's `operator init -pgp-keys` and
//! `operator rekey`, with age in place of PGP.

use crate::audit::AuditAction;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use ring::hmac;

use super::keyring::{AUDIT_KEY_NAME, KEK_CHECK_NAME, Keyring, is_wrapped_key};
use super::keys::{SEAL_CONFIG_NAME, SealConfig};
use super::{CallContext, Vault, audit_body, now_ms};
use crate::crypto::custody::Recipient;
use crate::crypto::keys::{Aead, SecretKey, kek_check_value, kek_matches, unwrap_key, wrap_key};
use crate::crypto::random_array;
use crate::crypto::shamir::{self, Binding, ShareText, derived_key};
use crate::error::{Error, Result};
use crate::sync::Recover;

/// The answer to `init` or `rekey` on a vault whose KEK was given at start:
/// such a vault has no key shares, and a user trying the ceremony on
/// `cardvault dev` should learn what to run instead.
const KEK_GIVEN_AT_START: &str = "this vault's key-encrypting key was given at start \
     (dev mode, keys.kek_file or CARDVAULT_KEK), so it has no key shares: init and rekey \
     are for a vault started with neither (cardvault serve; see docs/key-custody.md)";

/// Default time a rekey may take, from its start to its last share.
pub const DEFAULT_REKEY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Purpose of the key the seal configuration's MAC is made under.
const CONFIG_MAC_DOMAIN: &[u8] = b"cardvault-seal-config-mac-v2";
/// Longest principal name a custodian may have.
const MAX_PRINCIPAL: usize = 512;

/// A custodian named at init or rekey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Custodian {
    /// The principal (client certificate identity) it unseals as.
    pub principal: String,
    /// Its `age` X25519 public key (`age1...`).
    pub age_recipient: String,
}

/// One custodian's share as issued, kept in the seal configuration.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IssuedShare {
    /// The custodian's principal.
    #[prost(string, tag = "1")]
    pub principal: String,
    /// The custodian's age public key.
    #[prost(string, tag = "2")]
    pub age_recipient: String,
    /// The share's x (which point of the polynomial it is).
    #[prost(uint32, tag = "3")]
    pub x: u32,
    /// The share text, encrypted to the custodian (ASCII-armoured age).
    #[prost(string, tag = "4")]
    pub age_share: String,
}

/// What an unseal attempt has so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsealProgress {
    /// Whether the vault is (still) sealed.
    pub sealed: bool,
    /// Custodians (principals) who entered a share in this attempt.
    pub entered_by: Vec<String>,
    /// Shares needed.
    pub threshold: u32,
}

/// The state of a rekey, as its participants see it.
#[derive(Debug, Clone, PartialEq)]
pub struct RekeyView {
    /// Names this rekey in submissions and cancellation.
    pub nonce: String,
    /// When it times out, ms since the epoch.
    pub expires_ms: i64,
    /// Current custodians who submitted a share.
    pub entered_by: Vec<String>,
    /// Current shares needed.
    pub required: u32,
    /// Threshold of the new key.
    pub new_threshold: u32,
    /// Custodians of the new key.
    pub new_custodians: Vec<String>,
    /// Set once the rekey is done: the new seal configuration, with the
    /// new shares encrypted to their custodians.
    pub completed: Option<SealConfig>,
}

/// A rekey in progress (memory only: a restart abandons it, and the old
/// shares stay valid).
pub(crate) struct RekeyState {
    nonce: String,
    /// Current shares needed (the current threshold).
    required: u32,
    expires_ms: i64,
    threshold: u8,
    custodians: Vec<(String, Recipient)>,
    /// Shares submitted, by custodian; wiped on drop.
    entered: Vec<(String, ShareText)>,
}

impl RekeyState {
    fn view(&self) -> RekeyView {
        RekeyView {
            nonce: self.nonce.clone(),
            expires_ms: self.expires_ms,
            entered_by: self.entered.iter().map(|(p, _)| p.clone()).collect(),
            required: self.required,
            new_threshold: u32::from(self.threshold),
            new_custodians: self.custodians.iter().map(|(p, _)| p.clone()).collect(),
            completed: None,
        }
    }
}

/// Checks a threshold and custodian list; returns the threshold and the
/// parsed custodians. Errors name the field and never echo a key.
fn check_custodians(
    threshold: u32,
    custodians: &[Custodian],
) -> Result<(u8, Vec<(String, Recipient)>)> {
    let n = custodians.len();
    if !(2..=255).contains(&n) {
        return Err(Error::invalid(
            "custodians",
            "must name 2 to 255 custodians (split knowledge: one custodian would hold the whole key)",
        ));
    }
    if threshold < 2 || threshold as usize > n {
        return Err(Error::invalid(
            "threshold",
            "must be at least 2 and at most the number of custodians",
        ));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    for (i, c) in custodians.iter().enumerate() {
        let principal = c.principal.trim();
        if principal.is_empty() || principal.len() > MAX_PRINCIPAL {
            return Err(Error::invalid(
                format!("custodians[{i}].principal"),
                format!("must be 1 to {MAX_PRINCIPAL} characters"),
            ));
        }
        if !seen.insert(principal.to_owned()) {
            return Err(Error::invalid(
                format!("custodians[{i}].principal"),
                "is named twice (each custodian holds one share)",
            ));
        }
        let recipient = Recipient::parse(&c.age_recipient)
            .map_err(|why| Error::invalid(format!("custodians[{i}].age_recipient"), why))?;
        out.push((principal.to_owned(), recipient));
    }
    Ok((threshold as u8, out))
}

/// Splits `kek` into one share per custodian, binds and encrypts each.
fn issue_shares(
    kek: &SecretKey,
    vault_id: &str,
    generation: u32,
    threshold: u8,
    custodians: &[(String, Recipient)],
) -> Result<Vec<IssuedShare>> {
    let n = u8::try_from(custodians.len())
        .map_err(|_| Error::Internal("too many custodians".into()))?;
    let parts = shamir::split(kek.expose(), threshold, n).map_err(Error::Internal)?;
    custodians
        .iter()
        .zip(&parts)
        .map(|((principal, recipient), share)| {
            let binding = Binding {
                vault_id: vault_id.to_owned(),
                generation,
                threshold,
                custodian: principal.clone(),
            };
            let text = shamir::encode_share(kek.expose(), &binding, share);
            Ok(IssuedShare {
                principal: principal.clone(),
                age_recipient: recipient.to_string(),
                x: u32::from(share.x),
                age_share: recipient
                    .encrypt(text.as_bytes())
                    .map_err(Error::Internal)?,
            })
        })
        .collect()
}

/// What the seal configuration's MAC covers: its encoding with the MAC
/// field empty.
fn config_mac_input(cfg: &SealConfig) -> Vec<u8> {
    let mut unsigned = cfg.clone();
    unsigned.mac.clear();
    unsigned.encode_to_vec()
}

/// The seal configuration's MAC, under a key derived from the KEK.
fn config_mac(kek: &[u8], cfg: &SealConfig) -> Vec<u8> {
    let key = derived_key(kek, CONFIG_MAC_DOMAIN);
    hmac::sign(&key, &config_mac_input(cfg)).as_ref().to_vec()
}

/// Whether the seal configuration's MAC is right under `kek` (constant-time).
fn config_authentic(kek: &[u8], cfg: &SealConfig) -> bool {
    let key = derived_key(kek, CONFIG_MAC_DOMAIN);
    hmac::verify(&key, &config_mac_input(cfg), &cfg.mac).is_ok()
}

/// Checks what can be checked of a share before the KEK is rebuilt: that
/// it is this vault's, of the current generation, issued to the caller,
/// and issued as the seal configuration says.
fn check_binding(cfg: &SealConfig, parsed: &ShareText, principal: &str) -> Result<()> {
    let b = &parsed.binding;
    if b.vault_id != cfg.vault_id {
        return Err(Error::invalid("share", "belongs to another vault"));
    }
    if b.generation != cfg.generation {
        return Err(Error::invalid(
            "share",
            format!(
                "is from key generation {}; the current generation is {} (the vault was rekeyed)",
                b.generation, cfg.generation
            ),
        ));
    }
    if b.custodian != principal {
        return Err(Error::invalid(
            "share",
            "was issued to another custodian; each custodian enters their own share, as themselves",
        ));
    }
    let listed = cfg
        .custodians
        .iter()
        .any(|c| c.principal == b.custodian && c.x == u32::from(parsed.share.x));
    if !listed || u32::from(b.threshold) != cfg.threshold {
        return Err(Error::DataLoss(
            "the seal configuration in the store does not match this share (custodians or threshold differ): it was altered".into(),
        ));
    }
    Ok(())
}

impl Vault {
    pub(crate) async fn seal_config(&self) -> Result<Option<SealConfig>> {
        match self.store.get_key(SEAL_CONFIG_NAME).await? {
            None => Ok(None),
            Some(b) => SealConfig::decode(b.as_slice()).map(Some).map_err(|_| {
                Error::DataLoss("the seal configuration in the store does not decode".into())
            }),
        }
    }

    /// Creates the KEK, records its check value and a seal configuration
    /// naming the custodians, and returns that configuration: each
    /// custodian's share is in it, encrypted to them. The vault stays
    /// sealed: the custodians unseal it.
    pub async fn init(
        &self,
        ctx: &CallContext,
        threshold: u32,
        custodians: &[Custodian],
    ) -> Result<SealConfig> {
        let (t, list) = check_custodians(threshold, custodians)?;
        if self.is_initialized().await? {
            return Err(match self.seal_config().await? {
                Some(_) => Error::FailedPrecondition("the vault is already initialised".into()),
                None => Error::FailedPrecondition(KEK_GIVEN_AT_START.into()),
            });
        }
        // Audited before anything is written: an audit log that fails now
        // refuses the init and changes nothing.
        let mut start = audit_body(ctx, AuditAction::Init, "", "", Ok(()));
        start.detail = "starting".into();
        self.record(start).await?;
        let kek = SecretKey::generate();
        let aead = Aead::new(&kek);
        if self
            .store
            .put_key_if_absent(KEK_CHECK_NAME, &kek_check_value(&aead))
            .await?
            .is_some()
        {
            return Err(Error::FailedPrecondition(
                "the vault is already initialised".into(),
            ));
        }
        let vault_id = hex::encode(random_array::<8>());
        let mut cfg = SealConfig {
            custodians: issue_shares(&kek, &vault_id, 1, t, &list)?,
            vault_id,
            generation: 1,
            threshold: u32::from(t),
            shares: list.len() as u32,
            last_master_rotation_ms: 0,
            mac: Vec::new(),
        };
        cfg.mac = config_mac(kek.expose(), &cfg);
        self.store
            .put_keys(&[(SEAL_CONFIG_NAME.to_owned(), cfg.encode_to_vec())])
            .await?;
        let mut body = audit_body(ctx, AuditAction::Init, "", "", Ok(()));
        body.detail = format!(
            "vault {}; threshold {t} of {} custodians: {}",
            cfg.vault_id,
            list.len(),
            principals(&cfg)
        );
        if let Err(e) = self.record(body).await {
            // The shares are in the seal configuration, so nothing is lost.
            tracing::error!(error = %e, vault = %cfg.vault_id, "vault initialised, but its outcome was not audited (the start was)");
        }
        tracing::warn!(
            threshold = t,
            custodians = list.len(),
            "vault initialised; each custodian decrypts their own share"
        );
        Ok(cfg)
    }

    /// Enters one custodian's share towards the unseal. Audited with the
    /// principal only, never share bytes.
    pub async fn submit_share(&self, ctx: &CallContext, text: &str) -> Result<UnsealProgress> {
        let result = match self.seal_config().await {
            Ok(Some(cfg)) => match shamir::decode_share(text) {
                Ok(parsed) => self.add_share(ctx, &cfg, parsed).await,
                Err(e) => Err(Error::invalid("share", e)),
            },
            Ok(None) => Err(Error::FailedPrecondition(
                "this vault was not initialised with key shares".into(),
            )),
            Err(e) => Err(e),
        };
        let mut body = audit_body(
            ctx,
            AuditAction::Unseal,
            "",
            "",
            result.as_ref().map(|_| ()),
        );
        if let Ok(p) = &result {
            body.detail = format!(
                "{} of {} custodians ({}); sealed={}",
                p.entered_by.len(),
                p.threshold,
                p.entered_by.join(", "),
                p.sealed
            );
        }
        self.record(body).await?;
        result
    }

    async fn add_share(
        &self,
        ctx: &CallContext,
        cfg: &SealConfig,
        parsed: ShareText,
    ) -> Result<UnsealProgress> {
        if !self.is_sealed() {
            return Err(Error::FailedPrecondition(
                "the vault is already unsealed".into(),
            ));
        }
        check_binding(cfg, &parsed, &ctx.principal)?;
        let entered = {
            let mut pending = self.pending_shares.lock().recover();
            if pending.iter().any(|(p, _)| *p == ctx.principal) {
                return Err(Error::invalid(
                    "share",
                    "this custodian has already entered a share in this unseal; each custodian enters one",
                ));
            }
            pending.push((ctx.principal.clone(), parsed));
            if (pending.len() as u32) < cfg.threshold {
                return Ok(UnsealProgress {
                    sealed: true,
                    entered_by: pending.iter().map(|(p, _)| p.clone()).collect(),
                    threshold: cfg.threshold,
                });
            }
            std::mem::take(&mut *pending)
        };
        let who: Vec<String> = entered.iter().map(|(p, _)| p.clone()).collect();
        let kek = self.rebuild(cfg, &entered).await?;
        self.unseal(kek).await?;
        tracing::warn!(custodians = %who.join(", "), "vault unsealed with key shares");
        Ok(UnsealProgress {
            sealed: false,
            entered_by: who,
            threshold: cfg.threshold,
        })
    }

    /// Rebuilds the KEK from custodians' shares and authenticates it, each
    /// share and the seal configuration. Progress is lost on any failure
    /// (the shares were taken out of it).
    async fn rebuild(
        &self,
        cfg: &SealConfig,
        entered: &[(String, ShareText)],
    ) -> Result<SecretKey> {
        let shares: Vec<shamir::Share> = entered.iter().map(|(_, s)| s.share.clone()).collect();
        let secret = shamir::combine(&shares).map_err(|e| Error::invalid("share", e))?;
        let kek = SecretKey::from_bytes(&secret)
            .ok_or_else(|| Error::invalid("share", "shares do not hold a 256-bit key"))?;
        let check = self
            .store
            .get_key(KEK_CHECK_NAME)
            .await?
            .unwrap_or_default();
        let names = entered
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if !kek_matches(&Aead::new(&kek), &check) {
            // With exactly `threshold` shares a wrong one cannot be told
            // from the others: the key they give is simply not this vault's.
            return Err(Error::invalid(
                "share",
                format!(
                    "the shares of {names} do not rebuild this vault's key: one is forged, damaged or of another key; progress was reset, start again"
                ),
            ));
        }
        let forged: Vec<&str> = entered
            .iter()
            .filter(|(_, s)| !s.authentic(kek.expose()))
            .map(|(p, _)| p.as_str())
            .collect();
        if !forged.is_empty() {
            return Err(Error::invalid(
                "share",
                format!(
                    "the share of {} failed authentication: its custodian, threshold, generation or point was altered; progress was reset",
                    forged.join(", ")
                ),
            ));
        }
        if !config_authentic(kek.expose(), cfg) {
            return Err(Error::DataLoss(
                "the seal configuration in the store failed authentication: it was altered".into(),
            ));
        }
        Ok(kek)
    }

    /// Forgets the shares entered so far.
    pub fn reset_unseal(&self) {
        self.pending_shares.lock().recover().clear();
    }

    /// Custodians who entered a share towards the next unseal.
    pub fn unseal_entered_by(&self) -> Vec<String> {
        self.pending_shares
            .lock()
            .recover()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Starts a rekey: `threshold` of the current custodians must submit a
    /// current share within the rekey timeout; then the KEK is replaced and
    /// `custodians` get the new shares. Audited.
    pub async fn start_rekey(
        &self,
        ctx: &CallContext,
        threshold: u32,
        custodians: &[Custodian],
    ) -> Result<RekeyView> {
        let result = self.start_rekey_inner(threshold, custodians).await;
        let mut body = audit_body(
            ctx,
            AuditAction::RekeyStart,
            "",
            "",
            result.as_ref().map(|_| ()),
        );
        if let Ok(v) = &result {
            body.detail = format!(
                "rekey {}: needs {} current shares by {}; new key: threshold {} of {}",
                v.nonce,
                v.required,
                crate::time::rfc3339(v.expires_ms),
                v.new_threshold,
                v.new_custodians.join(", ")
            );
        }
        if let Err(e) = self.record(body).await {
            // Not audited, not started.
            if let Ok(v) = &result {
                let mut rekey = self.rekey.lock().recover();
                if rekey.as_ref().is_some_and(|r| r.nonce == v.nonce) {
                    rekey.take();
                }
            }
            return Err(e);
        }
        result
    }

    async fn start_rekey_inner(
        &self,
        threshold: u32,
        custodians: &[Custodian],
    ) -> Result<RekeyView> {
        self.check_unsealed()?;
        let cfg = self
            .seal_config()
            .await?
            .ok_or_else(|| Error::FailedPrecondition(KEK_GIVEN_AT_START.into()))?;
        let (t, list) = check_custodians(threshold, custodians)?;
        let mut rekey = self.rekey.lock().recover();
        if let Some(r) = rekey.as_ref()
            && r.expires_ms > now_ms()
        {
            return Err(Error::FailedPrecondition(format!(
                "rekey {} is in progress until {}; cancel it first",
                r.nonce,
                crate::time::rfc3339(r.expires_ms)
            )));
        }
        let timeout = i64::try_from(self.config.rekey_timeout.as_millis()).unwrap_or(i64::MAX);
        let state = RekeyState {
            nonce: hex::encode(random_array::<8>()),
            required: cfg.threshold,
            expires_ms: now_ms().saturating_add(timeout),
            threshold: t,
            custodians: list,
            entered: Vec::new(),
        };
        let view = state.view();
        *rekey = Some(state);
        Ok(view)
    }

    /// Enters one current custodian's current share towards the rekey
    /// `nonce`. The last one needed completes it. Audited (the principal,
    /// never share bytes); a completion is audited on its own too.
    pub async fn submit_rekey_share(
        &self,
        ctx: &CallContext,
        nonce: &str,
        text: &str,
    ) -> Result<RekeyView> {
        let result = self.rekey_share_inner(ctx, nonce, text).await;
        let mut body = audit_body(
            ctx,
            AuditAction::RekeyShare,
            "",
            "",
            result.as_ref().map(|_| ()),
        );
        if let Ok(v) = &result {
            body.detail = format!(
                "rekey {}: {} of {} current custodians ({})",
                v.nonce,
                v.entered_by.len(),
                v.required,
                v.entered_by.join(", ")
            );
        }
        let recorded = self.record(body).await;
        if let Ok(RekeyView {
            completed: Some(cfg),
            nonce,
            ..
        }) = &result
        {
            // Done and committed: the old shares no longer work and the new
            // ones are in the seal configuration, so this answer must say
            // so even if the log cannot take the record.
            if let Err(e) = &recorded {
                tracing::error!(error = %e, "rekey completed, but its share was not audited");
            }
            let mut done = audit_body(ctx, AuditAction::RekeyComplete, "", "", Ok(()));
            done.detail = format!(
                "rekey {nonce}: key generation {}; threshold {} of {}",
                cfg.generation,
                cfg.threshold,
                principals(cfg)
            );
            if let Err(e) = self.record(done).await {
                // The new shares are in the seal configuration: nothing is lost.
                tracing::error!(error = %e, "rekey completed, but its completion was not audited");
            }
            return result;
        }
        recorded?;
        result
    }

    async fn rekey_share_inner(
        &self,
        ctx: &CallContext,
        nonce: &str,
        text: &str,
    ) -> Result<RekeyView> {
        self.check_unsealed()?;
        let cfg = self.seal_config().await?.ok_or_else(|| {
            Error::FailedPrecondition("this vault was not initialised with key shares".into())
        })?;
        let parsed = shamir::decode_share(text).map_err(|e| Error::invalid("share", e))?;
        let done = {
            let mut rekey = self.rekey.lock().recover();
            let Some(state) = rekey.as_mut().filter(|r| r.nonce == nonce) else {
                return Err(Error::FailedPrecondition(
                    "no rekey is in progress with this nonce".into(),
                ));
            };
            if state.expires_ms <= now_ms() {
                rekey.take();
                return Err(Error::FailedPrecondition(
                    "the rekey timed out; nothing changed and the current shares stay valid; start again".into(),
                ));
            }
            check_binding(&cfg, &parsed, &ctx.principal)?;
            if state.entered.iter().any(|(p, _)| *p == ctx.principal) {
                return Err(Error::invalid(
                    "share",
                    "this custodian has already submitted a share to this rekey; each custodian submits one",
                ));
            }
            state.entered.push((ctx.principal.clone(), parsed));
            if (state.entered.len() as u32) < cfg.threshold {
                return Ok(state.view());
            }
            // Taken out: a failure from here on ends this rekey.
            rekey.take().expect("present")
        };
        let current = self.rebuild(&cfg, &done.entered).await?;
        let new_cfg = self
            .replace_kek(&current, &cfg, done.threshold, &done.custodians)
            .await?;
        let mut view = done.view();
        view.completed = Some(new_cfg);
        Ok(view)
    }

    /// Cancels the rekey `nonce` (admin or a custodian). Audited.
    pub async fn cancel_rekey(&self, ctx: &CallContext, nonce: &str) -> Result<()> {
        let result = {
            let mut rekey = self.rekey.lock().recover();
            match rekey.as_ref() {
                Some(r) if r.nonce == nonce => {
                    rekey.take();
                    Ok(())
                }
                _ => Err(Error::FailedPrecondition(
                    "no rekey is in progress with this nonce".into(),
                )),
            }
        };
        let mut body = audit_body(
            ctx,
            AuditAction::RekeyCancel,
            "",
            "",
            result.as_ref().map(|_| ()),
        );
        body.detail = format!("rekey {nonce}");
        self.record(body).await?;
        if result.is_ok() {
            tracing::warn!(principal = %ctx.principal, "rekey cancelled; the current shares stay valid");
        }
        result
    }

    /// The rekey in progress, if any (expired ones are dropped here).
    pub fn rekey_in_progress(&self) -> Option<RekeyView> {
        let mut rekey = self.rekey.lock().recover();
        if rekey.as_ref().is_some_and(|r| r.expires_ms <= now_ms()) {
            rekey.take();
        }
        rekey.as_ref().map(RekeyState::view)
    }

    /// Replaces the KEK (the rebuilt `current` one) with a new one: every
    /// wrapped key is re-wrapped, and the new check value and seal
    /// configuration (new generation, custodians and shares) are written in
    /// one atomic batch. Blocks new tenant keys while it runs.
    async fn replace_kek(
        &self,
        current: &SecretKey,
        cfg: &SealConfig,
        threshold: u8,
        custodians: &[(String, Recipient)],
    ) -> Result<SealConfig> {
        let _guard = self.key_lock.write().await;
        let current = Aead::new(current);
        let new_kek = SecretKey::generate();
        let new_aead = Aead::new(&new_kek);
        let mut batch = Vec::new();
        let mut audit_seed = None;
        for (name, wrapped) in self.store.list_keys("").await? {
            if !is_wrapped_key(&name) {
                continue;
            }
            let key = unwrap_key(&current, &name, &wrapped)
                .map_err(|_| Error::DataLoss(format!("wrapped key {name} failed to unwrap")))?;
            batch.push((name.clone(), wrap_key(&new_aead, &name, &key)));
            if name == AUDIT_KEY_NAME {
                audit_seed = Some(key);
            }
        }
        let generation = cfg.generation + 1;
        let mut new_cfg = SealConfig {
            vault_id: cfg.vault_id.clone(),
            generation,
            threshold: u32::from(threshold),
            shares: custodians.len() as u32,
            last_master_rotation_ms: now_ms(),
            custodians: issue_shares(&new_kek, &cfg.vault_id, generation, threshold, custodians)?,
            mac: Vec::new(),
        };
        new_cfg.mac = config_mac(new_kek.expose(), &new_cfg);
        batch.push((KEK_CHECK_NAME.to_owned(), kek_check_value(&new_aead)));
        batch.push((SEAL_CONFIG_NAME.to_owned(), new_cfg.encode_to_vec()));
        self.store.put_keys(&batch).await?;
        let seed = audit_seed.ok_or_else(|| Error::Internal("audit signing key missing".into()))?;
        let audit_key = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed.expose())
            .map_err(|_| Error::Internal("bad audit signing key".into()))?;
        {
            let mut keys = self.keys.write().recover();
            // Sealed meanwhile (seal does not wait for this lock): it stays
            // sealed, and is unsealed with the new shares.
            if keys.is_some() {
                let limit = self.config.dek_max_encryptions;
                *keys = Some(Arc::new(Keyring::new(new_aead, audit_key, limit)));
            }
        }
        tracing::warn!(generation, "vault rekeyed; the old shares no longer work");
        Ok(new_cfg)
    }
}

/// The custodians of a configuration, by principal, for audit details.
fn principals(cfg: &SealConfig) -> String {
    cfg.custodians
        .iter()
        .map(|c| c.principal.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
