//! The policy file: which principal holds which roles, for which tenants,
//! with which detokenize budget.
//!
//! ```toml
//! [defaults]
//! detokenize_per_second = 100   # refill rate of each principal's bucket
//! detokenize_burst = 1000       # bucket size
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Defaults {
    detokenize_per_second: f64,
    detokenize_burst: f64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            detokenize_per_second: 100.0,
            detokenize_burst: 1000.0,
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
                    crate::token::Tenant::parse(t).map_err(|err| format!("{at}: {err}"))?;
                }
                Some(e.tenants.into_iter().collect())
            };
            let rate = RateLimit {
                per_second: e
                    .detokenize_per_second
                    .unwrap_or(file.defaults.detokenize_per_second),
                burst: e.detokenize_burst.unwrap_or(file.defaults.detokenize_burst),
            };
            // TOML has `inf` and `nan`: either would switch the limit off
            // (an infinite bucket, or a NaN refill that fills it each call).
            let finite = rate.per_second.is_finite() && rate.burst.is_finite();
            if !(finite && rate.per_second > 0.0 && rate.burst >= 1.0) {
                return Err(format!(
                    "{at}: detokenize_per_second must be a finite number > 0 and detokenize_burst a finite number >= 1"
                ));
            }
            let grant = Grant {
                roles: e.roles.into_iter().collect(),
                tenants,
                rate,
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
            "revoked_certificates = [\"AB:CD\"]",
            "revoked_certificates = [\"not hex\"]",
        ] {
            assert!(Policy::from_toml(bad).is_err(), "{bad}");
        }
    }
}
