//! Collect sessions: a card typed in the shopper's browser is sealed there
//! to a key only the vault holds, so the merchant's app tier relays
//! ciphertext and never sees the card number (see `docs/collect.md`).
//!
//! A session is one HPKE key pair. Its private key lives in memory only,
//! like a CVV: bounded in number and per tenant, expiring (at most
//! [`MAX_SESSION_TTL`]), used once, and wiped on use, expiry, seal and
//! shutdown. A session of another tenant, an expired one, a used one and an
//! unknown one get one identical answer, so the answer tells none apart.

use crate::audit::AuditAction;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroize;

use super::{CallContext, NewCard, Vault, audit_body, now_ms};
use crate::card::YearMonth;
use crate::crypto::sealed::{self, SessionKey};
use crate::error::{Error, Result};
use crate::fields::Tenant;
use crate::sync::Recover;

/// Longest session life: a checkout page is filled in within minutes.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// Session life when the caller names none.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10 * 60);
/// Prefix of session ids.
const SESSION_PREFIX: &str = "cs_";
/// Length of a session id: the prefix and 22 base64url characters
/// (128 random bits).
const SESSION_ID_LEN: usize = 25;

/// The one answer for a session that cannot be used, whatever the reason.
const SESSION_GONE: &str =
    "collect session: unknown, expired or already used; create a new session";

/// Collect session settings (config `[collect]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectConfig {
    /// Life of a session when the caller names none (at most
    /// [`MAX_SESSION_TTL`]).
    pub default_ttl: Duration,
    /// Most sessions held at once, so a flood of session requests cannot
    /// exhaust memory.
    pub max_sessions: usize,
    /// Most sessions of one tenant, so one tenant cannot refuse every
    /// other tenant's checkouts.
    pub max_per_tenant: usize,
}

impl Default for CollectConfig {
    fn default() -> Self {
        CollectConfig {
            default_ttl: DEFAULT_SESSION_TTL,
            max_sessions: 100_000,
            max_per_tenant: 20_000,
        }
    }
}

/// A new session, as its creator gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectSession {
    /// The session id (`cs_` and 22 base64url characters).
    pub id: String,
    /// The HPKE public key: an uncompressed P-256 point (65 bytes).
    pub public_key: Vec<u8>,
    /// The HPKE suite, as RFC 9180 names it.
    pub suite: &'static str,
    /// When the session stops opening seals, ms since the epoch.
    pub expires_at_ms: i64,
}

struct Entry {
    tenant: String,
    key: SessionKey,
    expires_at: Instant,
}

#[derive(Default)]
struct Held {
    entries: HashMap<String, Entry>,
    per_tenant: HashMap<String, usize>,
}

impl Held {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        if let Some(n) = self.per_tenant.get_mut(&e.tenant) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(&e.tenant);
            }
        }
        Some(e)
    }

    fn purge(&mut self, now: Instant) -> usize {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.remove(k);
        }
        expired.len()
    }
}

/// The memory-only session keys.
pub struct CollectSessions {
    /// A `Mutex` is enough: every operation is a short map access.
    held: Mutex<Held>,
    /// Limits and default life.
    config: CollectConfig,
}

impl CollectSessions {
    /// An empty holder.
    pub fn new(config: CollectConfig) -> Self {
        CollectSessions {
            held: Mutex::new(Held::default()),
            config: CollectConfig {
                default_ttl: config.default_ttl.min(MAX_SESSION_TTL),
                ..config
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // Every update is a single map operation: a poisoned lock holds
        // nothing half-written.
        self.held.lock().recover()
    }

    /// Makes a session of `tenant` living `ttl`; `RESOURCE_EXHAUSTED` when
    /// the holder, or the tenant's share of it, is full of live sessions.
    fn create(&self, tenant: &str, ttl: Duration) -> Result<(String, Vec<u8>)> {
        // The key pair is made outside the lock: it is the slow part.
        let (key, public_key) = SessionKey::generate();
        let id = format!(
            "{SESSION_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(crate::crypto::random_array::<16>())
        );
        let mut held = self.lock();
        let count = |h: &Held| h.per_tenant.get(tenant).copied().unwrap_or(0);
        if held.entries.len() >= self.config.max_sessions
            || count(&held) >= self.config.max_per_tenant
        {
            held.purge(Instant::now());
        }
        if held.entries.len() >= self.config.max_sessions {
            return Err(Error::ResourceExhausted(
                "collect sessions are full; retry later".into(),
            ));
        }
        if count(&held) >= self.config.max_per_tenant {
            return Err(Error::ResourceExhausted(
                "this tenant's share of collect sessions is full; retry later".into(),
            ));
        }
        *held.per_tenant.entry(tenant.to_owned()).or_default() += 1;
        held.entries.insert(
            id.clone(),
            Entry {
                tenant: tenant.to_owned(),
                key,
                expires_at: Instant::now() + ttl,
            },
        );
        Ok((id, public_key))
    }

    /// Removes and returns the session's key if it is `tenant`'s and live.
    /// Another tenant's session is left in place (its owner may still use
    /// it) but answered exactly like an unknown one.
    fn take(&self, tenant: &str, id: &str) -> Option<SessionKey> {
        let mut held = self.lock();
        if held.entries.get(id)?.tenant != tenant {
            return None;
        }
        let entry = held.remove(id)?;
        (entry.expires_at > Instant::now()).then_some(entry.key)
    }

    /// Wipes every expired session; returns how many. Called periodically
    /// so that expired keys do not linger until their session is used.
    pub fn purge_expired(&self) -> usize {
        self.lock().purge(Instant::now())
    }

    /// Wipes every session (seal, shutdown).
    pub fn clear(&self) {
        let mut held = self.lock();
        held.entries.clear();
        held.per_tenant.clear();
    }

    /// Sessions held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The card inside a seal, as the documented JSON object. Card numbers and
/// CVVs are borrowed from the plaintext buffer (which is wiped), never
/// copied into strings of their own; a name with escapes is the only field
/// that may be, and it is wiped below.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload<'a> {
    pan: &'a str,
    exp_month: u32,
    exp_year: u32,
    #[serde(default)]
    cvv: Option<&'a str>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
}

/// Parses the JSON card of an opened seal. Errors name the field and the
/// reason, never a value: the plaintext is the card.
pub fn parse_payload(plaintext: &[u8], today: YearMonth) -> Result<NewCard> {
    let mut payload: Payload<'_> = serde_json::from_slice(plaintext).map_err(|e| {
        // serde's messages can quote the input (a wrong-typed value, an
        // unknown key); only a missing field's message is ours alone.
        let msg = e.to_string();
        let missing = ["pan", "exp_month", "exp_year"]
            .into_iter()
            .find(|f| msg.starts_with(&format!("missing field `{f}`")));
        match missing {
            Some(f) => Error::invalid(f, "is required"),
            None => Error::invalid(
                "sealed",
                "the card inside is not the documented JSON object (pan and cvv as strings without escapes, exp_month and exp_year as integers, optional name)",
            ),
        }
    })?;
    let card = NewCard::parse(
        payload.pan,
        payload.exp_month,
        payload.exp_year,
        payload.name.as_deref(),
        payload.cvv,
        today,
    );
    if let Some(Cow::Owned(name)) = &mut payload.name {
        name.zeroize();
    }
    card
}

fn check_session_id(id: &str) -> Result<()> {
    let ok = id.len() == SESSION_ID_LEN
        && id.starts_with(SESSION_PREFIX)
        && id[SESSION_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "session_id",
            "is not a collect session id (cs_ and 22 base64url characters)",
        ))
    }
}

impl Vault {
    /// Starts a collect session for `tenant`: a fresh key pair whose public
    /// half the checkout page seals a card to. Audited.
    pub async fn create_collect_session(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        ttl: Option<Duration>,
    ) -> Result<CollectSession> {
        let result = self.create_session_inner(ctx, tenant, ttl).await;
        self.audit_failure(
            ctx,
            AuditAction::CreateCollectSession,
            tenant.as_str(),
            result,
        )
        .await
    }

    async fn create_session_inner(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        ttl: Option<Duration>,
    ) -> Result<CollectSession> {
        self.check_unsealed()?;
        let ttl = match ttl {
            None => self.collect.config.default_ttl,
            Some(t) if t.is_zero() || t > MAX_SESSION_TTL => {
                return Err(Error::invalid(
                    "ttl_seconds",
                    format!("must be 1 to {}", MAX_SESSION_TTL.as_secs()),
                ));
            }
            Some(t) => t,
        };
        let (id, public_key) = self.collect.create(tenant.as_str(), ttl)?;
        let expires_at_ms = now_ms() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let mut body = audit_body(
            ctx,
            AuditAction::CreateCollectSession,
            tenant.as_str(),
            "",
            Ok(()),
        );
        body.detail = format!(
            "session {id}, expires {}",
            crate::time::rfc3339(expires_at_ms)
        );
        if let Err(e) = self.record(body).await {
            // Fail closed: a session nobody can account for is not handed out.
            self.collect.take(tenant.as_str(), &id);
            return Err(super::audit_unavailable(&e));
        }
        Ok(CollectSession {
            id,
            public_key,
            suite: sealed::SUITE,
            expires_at_ms,
        })
    }

    /// Opens a sealed card with its session's key and validates it exactly
    /// like a tokenize's fields. The session is used up by the attempt,
    /// whatever its outcome: a key opens at most one seal, so a replayed
    /// seal is refused and no key answers a second guess. Failures are
    /// audited as `TokenizeSealed` with the session id.
    pub async fn open_sealed(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        session_id: &str,
        sealed_card: &str,
    ) -> Result<NewCard> {
        let result = self.open_sealed_inner(tenant, session_id, sealed_card);
        if let Err(e) = &result {
            self.audit_sealed_refusal(ctx, tenant, session_id, e).await;
        }
        result
    }

    /// Records a refused `TokenizeSealed` with its session id (when the id
    /// is well-formed: a malformed one may be anything).
    pub(crate) async fn audit_sealed_refusal(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        session_id: &str,
        e: &Error,
    ) {
        let mut body = audit_body(
            ctx,
            AuditAction::TokenizeSealed,
            tenant.as_str(),
            "",
            Err(e),
        );
        if check_session_id(session_id).is_ok() {
            body.detail = format!("session {session_id}");
        }
        if let Err(err) = self.record(body).await {
            tracing::error!(request_id = %ctx.request_id, error = %err, "audit append failed for a refused call");
        }
    }

    fn open_sealed_inner(
        &self,
        tenant: &Tenant,
        session_id: &str,
        sealed_card: &str,
    ) -> Result<NewCard> {
        self.check_unsealed()?;
        check_session_id(session_id)?;
        let key = self
            .collect
            .take(tenant.as_str(), session_id)
            .ok_or_else(|| Error::FailedPrecondition(SESSION_GONE.into()))?;
        let plaintext = key.open(sealed_card, tenant.as_str(), session_id)?;
        drop(key);
        parse_payload(&plaintext, YearMonth::now_utc())
    }

    /// The collect session holder (for the periodic purge and for status).
    pub fn collect_sessions(&self) -> &CollectSessions {
        &self.collect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> YearMonth {
        YearMonth {
            year: 2026,
            month: 12,
        }
    }

    #[test]
    fn sessions_are_single_use_tenant_bound_and_bounded() {
        let s = CollectSessions::new(CollectConfig {
            default_ttl: Duration::from_secs(60),
            max_sessions: 3,
            max_per_tenant: 2,
        });
        let (a, _) = s.create("demo", Duration::from_secs(60)).unwrap();
        let (b, _) = s.create("demo", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            s.create("demo", Duration::from_secs(60)),
            Err(Error::ResourceExhausted(_))
        ));
        let (_c, _) = s.create("other", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            s.create("third", Duration::from_secs(60)),
            Err(Error::ResourceExhausted(_))
        ));
        // Another tenant's session is not handed out, nor removed.
        assert!(s.take("other", &a).is_none());
        assert!(s.take("demo", &a).is_some());
        assert!(s.take("demo", &a).is_none(), "used once");
        assert_eq!(s.len(), 2);
        s.clear();
        assert!(s.take("demo", &b).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn expired_sessions_open_nothing_and_are_purged() {
        let s = CollectSessions::new(CollectConfig::default());
        let (a, _) = s.create("demo", Duration::ZERO).unwrap();
        let (b, _) = s.create("demo", Duration::ZERO).unwrap();
        assert!(s.take("demo", &a).is_none());
        assert_eq!(s.purge_expired(), 1);
        assert!(s.take("demo", &b).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn payload_errors_name_the_field_never_the_value() {
        let ok = parse_payload(
            br#"{"pan":"4111 1111 1111 1111","exp_month":12,"exp_year":2030,"cvv":"123","name":"Ada \"L\""}"#,
            today(),
        )
        .unwrap();
        assert_eq!(ok.pan.last4(), "1111");
        assert!(ok.cvv.is_some() && ok.name.is_some());
        for (json, field) in [
            (
                r#"{"pan":"4111111111111112","exp_month":12,"exp_year":2030}"#,
                "pan",
            ),
            (
                r#"{"pan":"4111111111111111","exp_month":13,"exp_year":2030}"#,
                "exp_month",
            ),
            (r#"{"exp_month":12,"exp_year":2030}"#, "pan"),
            (
                r#"{"pan":"4111111111111111","exp_month":12,"exp_year":2030,"cvv":"1"}"#,
                "cvv",
            ),
            (
                r#"{"pan":4111111111111111,"exp_month":12,"exp_year":2030}"#,
                "sealed",
            ),
            (
                r#"{"pan":"4111111111111111","exp_month":"4111111111111111","exp_year":2030}"#,
                "sealed",
            ),
            (r#"{"4111111111111111":1}"#, "sealed"),
            ("4111111111111111", "sealed"),
            ("", "sealed"),
        ] {
            let e = parse_payload(json.as_bytes(), today()).err().expect(json);
            let Error::InvalidArgument { field: f, reason } = &e else {
                panic!("{e}")
            };
            assert_eq!(f, field, "{json}: {e}");
            assert!(!reason.contains("4111") && !reason.contains("1111"), "{e}");
        }
    }

    #[test]
    fn session_ids_are_checked_before_lookup() {
        assert!(check_session_id("cs_AAAAAAAAAAAAAAAAAAAAAA").is_ok());
        for bad in ["", "cs_", "4111111111111111", "cs_AAAAAAAAAAAAAAAAAAAAA!"] {
            let e = check_session_id(bad).unwrap_err().to_string();
            assert!(e.contains("session_id") && !e.contains("4111"), "{e}");
        }
    }
}
