//! Identity and authorisation: who may call what, for which tenant, how fast.
//!
//! The rule set is deliberately small: an action is allowed to a fixed set
//! of roles ([`Action::roles`]); a principal acts only for the tenants it is
//! granted; no role implies another. A merchant credential (what a
//! compromised app tier holds) can tokenize but never read a PAN.

pub mod policy;
pub mod rate;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::audit::AuditAction;
use crate::error::{Error, Result};
use crate::fields::Tenant;
use crate::sync::Recover;
use policy::{Grant, Policy};
use rate::RateLimiter;

/// A role a principal can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Merchant backends: create tokens, read metadata, delete.
    Merchant,
    /// Payment processors: read cards (detokenize) and metadata.
    Processor,
    /// Operators: key management and status. Never reads cards.
    Admin,
    /// Auditors: read and verify the audit log only.
    Auditor,
    /// Key custodians: enter their own key share (unseal, rekey). Nothing
    /// else: in particular they start no ceremony and read no card.
    Custodian,
}

impl Role {
    /// Lower-case name, as in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Merchant => "merchant",
            Role::Processor => "processor",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::Custodian => "custodian",
        }
    }
}

/// Every operation subject to authorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `TokenService.Tokenize`
    Tokenize,
    /// `TokenService.TokenizeBatch`
    TokenizeBatch,
    /// `TokenService.CreateCollectSession`
    CreateCollectSession,
    /// `TokenService.TokenizeSealed`
    TokenizeSealed,
    /// `TokenService.Detokenize`
    Detokenize,
    /// `TokenService.DetokenizeBatch`
    DetokenizeBatch,
    /// `TokenService.GetMetadata`
    GetMetadata,
    /// `TokenService.DeleteToken`
    DeleteToken,
    /// `AuditService.Query`
    AuditQuery,
    /// `AuditService.BlastRadius`
    AuditBlastRadius,
    /// `AuditService.Verify`
    AuditVerify,
    /// `KeyService.Status`
    KeyStatus,
    /// `KeyService.Init`
    KeyInit,
    /// `KeyService.Unseal`
    KeyUnseal,
    /// `KeyService.Seal`
    KeySeal,
    /// `KeyService.RotateDataKey`
    RotateDataKey,
    /// `KeyService.Rewrap`
    Rewrap,
    /// `KeyService.RetireKey`
    RetireKey,
    /// `KeyService.StartRekey`
    StartRekey,
    /// `KeyService.SubmitRekeyShare`
    SubmitRekeyShare,
    /// `KeyService.CancelRekey`
    CancelRekey,
    /// `KeyService.ClearEnumerationGuard`
    ClearEnumerationGuard,
}

impl Action {
    /// The roles allowed to perform the action. The single source of truth
    /// for the authorisation matrix in `docs/api.md`.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Action::Tokenize
            | Action::TokenizeBatch
            | Action::CreateCollectSession
            | Action::TokenizeSealed
            | Action::DeleteToken => &[Role::Merchant],
            Action::Detokenize | Action::DetokenizeBatch => &[Role::Processor],
            Action::GetMetadata => &[Role::Merchant, Role::Processor],
            Action::AuditQuery | Action::AuditBlastRadius | Action::AuditVerify => &[Role::Auditor],
            Action::KeyStatus
            | Action::KeyInit
            | Action::KeySeal
            | Action::RotateDataKey
            | Action::Rewrap
            | Action::RetireKey
            | Action::StartRekey
            | Action::ClearEnumerationGuard => &[Role::Admin],
            // Shares are entered by their custodians only: an admin
            // identity that could enter them could collect them all.
            Action::KeyUnseal | Action::SubmitRekeyShare => &[Role::Custodian],
            Action::CancelRekey => &[Role::Admin, Role::Custodian],
        }
    }

    /// RPC-style name for logs and errors.
    pub fn as_str(self) -> &'static str {
        AuditAction::from(self).as_str()
    }

    /// The action of the gRPC method at `path`
    /// (`/cardvault.v1.TokenService/Tokenize`), if it is one of ours.
    pub fn of_path(path: &str) -> Option<Action> {
        let (service, method) = path.strip_prefix("/cardvault.v1.")?.split_once('/')?;
        Some(match (service, method) {
            ("TokenService", "Tokenize") => Action::Tokenize,
            ("TokenService", "TokenizeBatch") => Action::TokenizeBatch,
            ("TokenService", "CreateCollectSession") => Action::CreateCollectSession,
            ("TokenService", "TokenizeSealed") => Action::TokenizeSealed,
            ("TokenService", "Detokenize") => Action::Detokenize,
            ("TokenService", "DetokenizeBatch") => Action::DetokenizeBatch,
            ("TokenService", "GetMetadata") => Action::GetMetadata,
            ("TokenService", "DeleteToken") => Action::DeleteToken,
            ("AuditService", "Query") => Action::AuditQuery,
            ("AuditService", "BlastRadius") => Action::AuditBlastRadius,
            ("AuditService", "Verify") => Action::AuditVerify,
            ("KeyService", "Status") => Action::KeyStatus,
            ("KeyService", "Init") => Action::KeyInit,
            ("KeyService", "Unseal") => Action::KeyUnseal,
            ("KeyService", "Seal") => Action::KeySeal,
            ("KeyService", "RotateDataKey") => Action::RotateDataKey,
            ("KeyService", "Rewrap") => Action::Rewrap,
            ("KeyService", "RetireKey") => Action::RetireKey,
            ("KeyService", "StartRekey") => Action::StartRekey,
            ("KeyService", "SubmitRekeyShare") => Action::SubmitRekeyShare,
            ("KeyService", "CancelRekey") => Action::CancelRekey,
            ("KeyService", "ClearEnumerationGuard") => Action::ClearEnumerationGuard,
            _ => return None,
        })
    }
}

impl From<Action> for AuditAction {
    /// The name a call's records (and refusals) go under.
    fn from(a: Action) -> AuditAction {
        match a {
            Action::Tokenize => AuditAction::Tokenize,
            Action::TokenizeBatch => AuditAction::TokenizeBatch,
            Action::CreateCollectSession => AuditAction::CreateCollectSession,
            Action::TokenizeSealed => AuditAction::TokenizeSealed,
            Action::Detokenize => AuditAction::Detokenize,
            Action::DetokenizeBatch => AuditAction::DetokenizeBatch,
            Action::GetMetadata => AuditAction::GetMetadata,
            Action::DeleteToken => AuditAction::DeleteToken,
            Action::AuditQuery => AuditAction::AuditQuery,
            Action::AuditBlastRadius => AuditAction::AuditBlastRadius,
            Action::AuditVerify => AuditAction::AuditVerify,
            Action::KeyStatus => AuditAction::Status,
            Action::KeyInit => AuditAction::Init,
            Action::KeyUnseal => AuditAction::Unseal,
            Action::KeySeal => AuditAction::Seal,
            Action::RotateDataKey => AuditAction::RotateDataKey,
            Action::Rewrap => AuditAction::Rewrap,
            Action::RetireKey => AuditAction::RetireKey,
            Action::StartRekey => AuditAction::StartRekey,
            Action::SubmitRekeyShare => AuditAction::SubmitRekeyShare,
            Action::CancelRekey => AuditAction::CancelRekey,
            Action::ClearEnumerationGuard => AuditAction::ClearEnumerationGuard,
        }
    }
}

/// Who is calling, as the TLS handshake established it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The principal the client certificate names (`None`: no certificate,
    /// or one that names no principal).
    pub principal: Option<String>,
    /// SHA-256 of the client certificate (DER): what the policy's
    /// `revoked_certificates` lists.
    pub cert_sha256: Option<[u8; 32]>,
}

impl Caller {
    /// A caller known only by principal name (tests, tools).
    pub fn named(principal: &str) -> Caller {
        Caller {
            principal: Some(principal.to_owned()),
            cert_sha256: None,
        }
    }
}

/// The outcome of a successful check: the principal's grant and the tenant
/// the call acts for.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The caller's grant (roles, tenants, budget).
    pub grant: Grant,
    /// The tenant the request acts for.
    pub tenant: Tenant,
}

/// Decides every call. The policy can be swapped at run time (SIGHUP)
/// without touching connections.
pub struct Authorizer {
    /// Current policy; replaced whole on reload.
    policy: RwLock<Arc<Policy>>,
    /// Policy file to reload from (`None` for a fixed in-memory policy).
    path: Option<PathBuf>,
    /// Detokenize budgets.
    limiter: RateLimiter,
    /// Tokenize budgets (every card).
    tokenize_limiter: RateLimiter,
    /// Collision budgets (cards new to an occupied bucket).
    collision_limiter: RateLimiter,
    /// Calls refused by a detokenize budget, for metrics.
    rate_limited: AtomicU64,
    /// Cards refused by a tokenize or collision budget, for metrics.
    tokenize_limited: AtomicU64,
}

impl Authorizer {
    /// An authorizer with a fixed policy.
    pub fn new(policy: Policy) -> Self {
        Authorizer {
            policy: RwLock::new(Arc::new(policy)),
            path: None,
            limiter: RateLimiter::default(),
            tokenize_limiter: RateLimiter::default(),
            collision_limiter: RateLimiter::default(),
            rate_limited: AtomicU64::new(0),
            tokenize_limited: AtomicU64::new(0),
        }
    }

    /// Loads the policy file at `path` (and remembers it for [`reload`](Self::reload)).
    pub fn from_file(path: PathBuf) -> std::result::Result<Self, String> {
        let policy = read_policy(&path)?;
        let mut a = Authorizer::new(policy);
        a.path = Some(path);
        Ok(a)
    }

    /// Re-reads the policy file. On any error the old policy stays in force.
    pub fn reload(&self) -> std::result::Result<usize, String> {
        let path = self.path.as_ref().ok_or("no policy file to reload")?;
        let policy = read_policy(path)?;
        let n = policy.principals.len();
        *self.policy.write().recover() = Arc::new(policy);
        Ok(n)
    }

    fn current(&self) -> Arc<Policy> {
        self.policy.read().recover().clone()
    }

    /// Checks a call that is not scoped to one tenant (audit verify, blast
    /// radius, an unfiltered query): the caller needs the role *and* a
    /// grant for every tenant (`"*"`).
    pub fn authorize_global(&self, caller: &Caller, action: Action) -> Result<Grant> {
        let grant = self.grant_for(caller, action)?;
        if grant.tenants.is_some() {
            return Err(Error::PermissionDenied(format!(
                "{} across tenants requires a grant for all tenants (\"*\")",
                action.as_str()
            )));
        }
        Ok(grant)
    }

    /// Checks who the caller is, before anything about its request: a
    /// certificate that names a principal the policy knows, and is not
    /// revoked. `UNAUTHENTICATED` otherwise.
    pub fn check_identity(&self, caller: &Caller) -> Result<()> {
        self.known(caller, &self.current()).map(drop)
    }

    fn known<'p>(&self, caller: &Caller, policy: &'p Policy) -> Result<&'p Grant> {
        let name = caller.principal.as_deref().ok_or_else(|| {
            Error::Unauthenticated("the client certificate names no principal".into())
        })?;
        // Checked on every call, not only at the handshake: a reload cuts
        // off a revoked certificate's open connections too.
        if caller
            .cert_sha256
            .is_some_and(|fp| policy.revoked_certificates.contains(&fp))
        {
            return Err(Error::Unauthenticated(
                "the client certificate is revoked".into(),
            ));
        }
        policy.principals.get(name).ok_or_else(|| {
            Error::Unauthenticated("the client certificate names no known principal".into())
        })
    }

    fn grant_for(&self, caller: &Caller, action: Action) -> Result<Grant> {
        let policy = self.current();
        let grant = self.known(caller, &policy)?;
        if !action.roles().iter().any(|r| grant.roles.contains(r)) {
            let need: Vec<&str> = action.roles().iter().map(|r| r.as_str()).collect();
            return Err(Error::PermissionDenied(format!(
                "{} requires role {}",
                action.as_str(),
                need.join(" or ")
            )));
        }
        Ok(grant.clone())
    }

    /// Checks that `principal` may perform `action` for `requested_tenant`
    /// (empty: the principal's only tenant). Order matters: identity, then
    /// role, then tenant, so an unauthorised caller learns nothing about
    /// request validation or tenants.
    pub fn authorize(
        &self,
        caller: &Caller,
        action: Action,
        requested_tenant: &str,
    ) -> Result<Authorized> {
        let grant = self.grant_for(caller, action)?;
        let tenant = if requested_tenant.is_empty() {
            match &grant.tenants {
                Some(t) if t.len() == 1 => Tenant::parse(t.iter().next().expect("one tenant"))?,
                _ => {
                    return Err(Error::invalid(
                        "tenant",
                        "is required (the caller acts for several tenants)",
                    ));
                }
            }
        } else {
            Tenant::parse(requested_tenant)?
        };
        if !grant.covers(tenant.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "not authorised for tenant {tenant}"
            )));
        }
        Ok(Authorized { grant, tenant })
    }

    /// Charges `cards` detokenized cards to the principal's budget.
    pub fn charge_detokenize(&self, principal: &str, grant: &Grant, cards: u32) -> Result<()> {
        self.limiter
            .take(principal, grant.rate, cards)
            .map_err(|wait| {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                spent("detokenize budget", "cards/s", grant.rate, wait)
            })
    }

    /// Charges `cards` tokenized cards to the principal's tokenize budget
    /// (every card, before any is looked at).
    pub fn charge_tokenize(&self, principal: &str, grant: &Grant, cards: u32) -> Result<()> {
        self.tokenize_limiter
            .take(principal, grant.tokenize, cards)
            .map_err(|wait| {
                self.tokenize_limited
                    .fetch_add(u64::from(cards), Ordering::Relaxed);
                spent("tokenize budget", "cards/s", grant.tokenize, wait)
            })
    }

    /// Admits one card to the principal's collision budget: refused once
    /// it is spent, whatever the card; charged if `collision`.
    pub fn admit_collision(&self, principal: &str, grant: &Grant, collision: bool) -> Result<()> {
        self.collision_limiter
            .admit(principal, grant.collision, collision)
            .map_err(|wait| {
                self.tokenize_limited.fetch_add(1, Ordering::Relaxed);
                spent(
                    "tokenize collision budget",
                    "new cards/s in buckets that hold another card",
                    grant.collision,
                    wait,
                )
            })
    }

    /// How many cards tokenize budgets have refused since start.
    pub fn tokenize_limited_total(&self) -> u64 {
        self.tokenize_limited.load(Ordering::Relaxed)
    }

    /// A metrics label for a principal's roles (`merchant`, `admin+auditor`,
    /// `unknown`): bounded values, never the principal itself.
    pub fn role_label(&self, principal: Option<&str>) -> &'static str {
        let Some(name) = principal else {
            return "none";
        };
        match self.current().principals.get(name) {
            Some(g) => roles_label(&g.roles),
            None => "unknown",
        }
    }

    /// How many calls budgets have refused since start.
    pub fn rate_limited_total(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }
}

/// The refusal of a spent budget: which one, its rate and burst, and when
/// to retry (the same text for every caller in the same state).
fn spent(budget: &str, unit: &str, limit: policy::RateLimit, wait_secs: f64) -> Error {
    Error::ResourceExhausted(format!(
        "{budget} exceeded ({} {unit}, burst {}); retry in {:.0} ms",
        limit.per_second,
        limit.burst,
        (wait_secs * 1000.0).ceil()
    ))
}

/// The metric label of a set of roles: their names joined by `+` in a
/// fixed order. A static table (32 sets), so labelling a request allocates
/// nothing.
fn roles_label<'a>(roles: impl IntoIterator<Item = &'a Role>) -> &'static str {
    const ALL: [Role; 5] = [
        Role::Merchant,
        Role::Processor,
        Role::Admin,
        Role::Auditor,
        Role::Custodian,
    ];
    static LABELS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        (0..1usize << ALL.len())
            .map(|mask| {
                ALL.iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, r)| r.as_str())
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect()
    });
    let mask = roles.into_iter().fold(0usize, |m, r| {
        m | 1
            << ALL
                .iter()
                .position(|a| a == r)
                .expect("ALL lists every role")
    });
    &LABELS[mask]
}

fn read_policy(path: &std::path::Path) -> std::result::Result<Policy, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read policy {}: {e}", path.display()))?;
    Policy::from_toml(&text).map_err(|e| format!("policy {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_labels_are_joined_in_a_fixed_order() {
        use std::collections::BTreeSet;
        assert_eq!(roles_label(&BTreeSet::new()), "");
        assert_eq!(roles_label(&BTreeSet::from([Role::Processor])), "processor");
        assert_eq!(
            roles_label(&[Role::Auditor, Role::Merchant, Role::Admin]),
            "merchant+admin+auditor"
        );
    }

    fn authz() -> Authorizer {
        Authorizer::new(
            Policy::from_toml(
                r#"
                [[principal]]
                name = "m"
                roles = ["merchant"]
                tenants = ["demo"]
                [[principal]]
                name = "multi"
                roles = ["merchant", "processor"]
                tenants = ["a", "b"]
                [[principal]]
                name = "admin"
                roles = ["admin"]
                tenants = ["*"]
                "#,
            )
            .unwrap(),
        )
    }

    #[test]
    fn roles_tenants_and_identity() {
        let a = authz();
        assert_eq!(
            a.authorize(&Caller::named("m"), Action::Tokenize, "")
                .unwrap()
                .tenant
                .as_str(),
            "demo"
        );
        assert!(matches!(
            a.authorize(&Caller::named("m"), Action::Detokenize, "demo"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            a.authorize(&Caller::named("m"), Action::Tokenize, "other"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            a.authorize(&Caller::default(), Action::Tokenize, "demo"),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            a.authorize(&Caller::named("who"), Action::Tokenize, "demo"),
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            a.authorize(&Caller::named("multi"), Action::Tokenize, ""),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(
            a.authorize(&Caller::named("multi"), Action::Detokenize, "b")
                .is_ok()
        );
        // Admin holds every tenant but no data role.
        assert!(matches!(
            a.authorize(&Caller::named("admin"), Action::Detokenize, "demo"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            a.authorize(&Caller::named("admin"), Action::GetMetadata, "demo"),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn a_revoked_certificate_is_refused_whatever_it_names() {
        let mut policy = authz().current().as_ref().clone();
        policy.revoked_certificates.insert([7; 32]);
        let a = Authorizer::new(policy);
        let with = |fp: [u8; 32]| Caller {
            principal: Some("m".into()),
            cert_sha256: Some(fp),
        };
        assert!(matches!(
            a.authorize(&with([7; 32]), Action::Tokenize, "demo"),
            Err(Error::Unauthenticated(m)) if m.contains("revoked")
        ));
        // The replacement certificate of the same principal.
        assert!(
            a.authorize(&with([8; 32]), Action::Tokenize, "demo")
                .is_ok()
        );
    }

    #[test]
    fn no_role_implies_another() {
        for action in [
            Action::Tokenize,
            Action::TokenizeBatch,
            Action::Detokenize,
            Action::DetokenizeBatch,
            Action::GetMetadata,
            Action::DeleteToken,
        ] {
            assert!(!action.roles().contains(&Role::Admin));
            assert!(!action.roles().contains(&Role::Auditor));
        }
        assert!(!Action::Detokenize.roles().contains(&Role::Merchant));
        assert!(!Action::Tokenize.roles().contains(&Role::Processor));
    }
}
