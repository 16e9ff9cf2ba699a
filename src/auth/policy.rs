//! The policy file: which principal holds which roles, for which tenants,
//! with which detokenize and tokenize budgets.
//!
//! ```toml
//! [defaults]
//! detokenize_per_second = 100   # refill rate of each principal's bucket
//! detokenize_burst = 1000       # bucket size
//! tokenize_per_second = 1000    # every tokenized card
//! tokenize_burst = 20000
//! # cards new to a bucket (first digits, last four, length) that already
//! # holds another card: what a guess at a stored card is
//! tokenize_collision_per_second = 0.05
//! tokenize_collision_burst = 1000
//!
//! [[principal]]
//! name = "spiffe://payments.example/acme/checkout"   # SAN URI, or CN
//! roles = ["merchant"]
//! tenants = ["acme"]
//!
//! [[principal]]
//! name = "spiffe://payments.example/processor"
//! roles = ["processor"]
//! tenants = ["*"]               # every tenant
//! detokenize_per_second = 500   # overrides the default
//!
//! # Certificates refused whoever they name (a leaked key), by SHA-256 of
//! # the DER certificate as `openssl x509 -noout -fingerprint -sha256` prints it.
//! revoked_certificates = ["3F:A2:...:9C"]
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Deserialize;

use super::Role;

/// Budget for reading cards: a token bucket per principal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Cards per second the bucket refills.
    pub per_second: f64,
    /// Largest number of cards that can be read at once.
    pub burst: f64,
}

/// One principal's grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Roles held; none implies another.
    pub roles: BTreeSet<Role>,
    /// Tenants it may act for; `None` means every tenant (`"*"`).
    pub tenants: Option<BTreeSet<String>>,
    /// Detokenize budget.
    pub rate: RateLimit,
    /// Tokenize budget: every card tokenized.
    pub tokenize: RateLimit,
    /// Collision budget: cards new to a bucket that already holds another
    /// card (see `vault::guard`).
    pub collision: RateLimit,
}

impl Grant {
    /// Whether the grant covers `tenant`.
    pub fn covers(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant))
    }
}

/// A parsed, validated policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Grants by principal name.
    pub principals: HashMap<String, Grant>,
    /// SHA-256 of client certificates refused on every call, whatever
    /// principal they name: a leaked certificate is cut off while its
    /// replacement, naming the same principal, keeps working.
    pub revoked_certificates: HashSet<[u8; 32]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    revoked_certificates: Vec<String>,
    #[serde(default)]
    principal: Vec<Entry>,
}

/// A certificate's SHA-256 written as 64 hex digits, with or without `:`
/// between the bytes (as `openssl x509 -fingerprint -sha256` prints it,
/// after the `=`), in either case.
fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text.trim().chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hex).ok()?;
    bytes.try_into().ok()
}

/// Default tokenize budget per principal: 1,000 cards a second, 20,000 at
/// once (a bulk import of 20 full batches back to back).
pub const DEFAULT_TOKENIZE: RateLimit = RateLimit {
    per_second: 1000.0,
    burst: 20_000.0,
};

/// Default collision budget per principal: 0.05 a second (4,320 a day),
/// 1,000 at once. See `docs/security.md` for the cost this puts on
/// recovering a card and what legitimate traffic spends of it.
pub const DEFAULT_COLLISION: RateLimit = RateLimit {
    per_second: 0.05,
    burst: 1000.0,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Defaults {
    detokenize_per_second: f64,
    detokenize_burst: f64,
    tokenize_per_second: f64,
    tokenize_burst: f64,
    tokenize_collision_per_second: f64,
    tokenize_collision_burst: f64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            detokenize_per_second: 100.0,
            detokenize_burst: 1000.0,
            tokenize_per_second: DEFAULT_TOKENIZE.per_second,
            tokenize_burst: DEFAULT_TOKENIZE.burst,
            tokenize_collision_per_second: DEFAULT_COLLISION.per_second,
            tokenize_collision_burst: DEFAULT_COLLISION.burst,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    roles: Vec<Role>,
    #[serde(default)]
    tenants: Vec<String>,
    detokenize_per_second: Option<f64>,
    detokenize_burst: Option<f64>,
    tokenize_per_second: Option<f64>,
    tokenize_burst: Option<f64>,
    tokenize_collision_per_second: Option<f64>,
    tokenize_collision_burst: Option<f64>,
}

/// A budget from a principal's own values or the defaults, checked: TOML
/// has `inf` and `nan`, and either would switch the limit off (an infinite
/// bucket, or a NaN refill that fills it each call).
fn budget(
    at: &str,
    name: &str,
    per_second: (Option<f64>, f64),
    burst: (Option<f64>, f64),
) -> Result<RateLimit, String> {
    let rate = RateLimit {
        per_second: per_second.0.unwrap_or(per_second.1),
        burst: burst.0.unwrap_or(burst.1),
    };
    let finite = rate.per_second.is_finite() && rate.burst.is_finite();
    if !(finite && rate.per_second > 0.0 && rate.burst >= 1.0) {
        return Err(format!(
            "{at}: {name}_per_second must be a finite number > 0 and {name}_burst a finite number >= 1"
        ));
    }
    Ok(rate)
}

impl Policy {
    /// Parses and validates policy TOML.
    pub fn from_toml(text: &str) -> Result<Policy, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut principals = HashMap::new();
        for (i, e) in file.principal.into_iter().enumerate() {
            let at = format!("principal[{i}] ({})", e.name);
            if e.name.trim().is_empty() {
                return Err(format!("principal[{i}]: name is empty"));
            }
            if e.roles.is_empty() {
                return Err(format!("{at}: roles is empty"));
            }
            let tenants = if e.tenants.iter().any(|t| t == "*") {
                None
            } else {
                for t in &e.tenants {
                    crate::fields::Tenant::parse(t).map_err(|err| format!("{at}: {err}"))?;
                }
                Some(e.tenants.into_iter().collect())
            };
            let d = &file.defaults;
            let rate = budget(
                &at,
                "detokenize",
                (e.detokenize_per_second, d.detokenize_per_second),
                (e.detokenize_burst, d.detokenize_burst),
            )?;
            let tokenize = budget(
                &at,
                "tokenize",
                (e.tokenize_per_second, d.tokenize_per_second),
                (e.tokenize_burst, d.tokenize_burst),
            )?;
            let collision = budget(
                &at,
                "tokenize_collision",
                (
                    e.tokenize_collision_per_second,
                    d.tokenize_collision_per_second,
                ),
                (e.tokenize_collision_burst, d.tokenize_collision_burst),
            )?;
            let grant = Grant {
                roles: e.roles.into_iter().collect(),
                tenants,
                rate,
                tokenize,
                collision,
            };
            if principals.insert(e.name.clone(), grant).is_some() {
                return Err(format!("{at}: listed twice"));
            }
        }
        let mut revoked_certificates = HashSet::new();
        for (i, f) in file.revoked_certificates.iter().enumerate() {
            let fp = parse_fingerprint(f).ok_or_else(|| {
                format!("revoked_certificates[{i}]: not a SHA-256 fingerprint (64 hex digits, `:` allowed between bytes)")
            })?;
            revoked_certificates.insert(fp);
        }
        Ok(Policy {
            principals,
            revoked_certificates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_applies_defaults() {
        let p = Policy::from_toml(
            r#"
            [defaults]
            detokenize_per_second = 10
            [[principal]]
            name = "m"
            roles = ["merchant"]
            tenants = ["acme"]
            [[principal]]
            name = "p"
            roles = ["processor", "merchant"]
            tenants = ["*"]
            detokenize_burst = 5
            "#,
        )
        .unwrap();
        let m = &p.principals["m"];
        assert!(m.covers("acme") && !m.covers("other"));
        assert_eq!(
            m.rate,
            RateLimit {
                per_second: 10.0,
                burst: 1000.0
            }
        );
        let pr = &p.principals["p"];
        assert!(pr.covers("anything"));
        assert_eq!(pr.roles.len(), 2);
        assert_eq!(pr.rate.burst, 5.0);
        assert_eq!(
            (m.tokenize, m.collision),
            (DEFAULT_TOKENIZE, DEFAULT_COLLISION)
        );
    }

    #[test]
    fn tokenize_budgets_take_defaults_and_overrides() {
        let p = Policy::from_toml(
            r#"
            [defaults]
            tokenize_collision_per_second = 0.5
            [[principal]]
            name = "m"
            roles = ["merchant"]
            tenants = ["acme"]
            tokenize_burst = 7
            tokenize_collision_burst = 3
            "#,
        )
        .unwrap();
        let m = &p.principals["m"];
        assert_eq!(
            m.tokenize,
            RateLimit {
                per_second: DEFAULT_TOKENIZE.per_second,
                burst: 7.0
            }
        );
        assert_eq!(
            m.collision,
            RateLimit {
                per_second: 0.5,
                burst: 3.0
            }
        );
    }

    #[test]
    fn revoked_certificates_parse_with_or_without_colons() {
        let fp: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let colons = fp
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let p = Policy::from_toml(&format!(
            "revoked_certificates = [\"{colons}\", \"{}\"]",
            hex::encode([9u8; 32])
        ))
        .unwrap();
        assert!(p.revoked_certificates.contains(&fp));
        assert!(p.revoked_certificates.contains(&[9u8; 32]));
        assert_eq!(p.revoked_certificates.len(), 2);
    }

    #[test]
    fn rejects_bad_policies() {
        for bad in [
            "[[principal]]\nname = \"x\"\nroles = []",
            "[[principal]]\nname = \"x\"\nroles = [\"root\"]",
            "[[principal]]\nname = \"x\"\nroles = [\"merchant\"]\ntenants = [\"Bad Tenant\"]",
            "[[principal]]\nname = \"x\"\nroles = [\"merchant\"]\n[[principal]]\nname = \"x\"\nroles = [\"admin\"]",
            "[[principal]]\nname = \"x\"\nroles = [\"processor\"]\ndetokenize_per_second = 0",
            "[[principal]]\nname = \"x\"\nroles = [\"merchant\"]\nextra = 1",
            "[[principal]]\nname = \"x\"\nroles = [\"processor\"]\ndetokenize_burst = inf",
            "[[principal]]\nname = \"x\"\nroles = [\"processor\"]\ndetokenize_per_second = inf",
            "[[principal]]\nname = \"x\"\nroles = [\"processor\"]\ndetokenize_per_second = nan",
            "[defaults]\ndetokenize_burst = inf\n[[principal]]\nname = \"x\"\nroles = [\"processor\"]",
            "[[principal]]\nname = \"x\"\nroles = [\"merchant\"]\ntokenize_burst = 0",
            "[[principal]]\nname = \"x\"\nroles = [\"merchant\"]\ntokenize_per_second = nan",
            "[defaults]\ntokenize_collision_per_second = inf\n[[principal]]\nname = \"x\"\nroles = [\"merchant\"]",
            "[[principal]]\nname = \"x\"\nroles = [\"merchant\"]\ntokenize_collision_per_second = -1",
            "revoked_certificates = [\"AB:CD\"]",
            "revoked_certificates = [\"not hex\"]",
        ] {
            assert!(Policy::from_toml(bad).is_err(), "{bad}");
        }
    }
}
