//! Filters and reports over audit bodies: who did what, and the blast
//! radius of a credential (which cards it read).

use std::collections::BTreeMap;

use super::AuditBody;

/// Which records a query returns. Empty strings match anything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Exact principal.
    pub principal: String,
    /// Exact tenant.
    pub tenant: String,
    /// Exact action, e.g. `Detokenize`.
    pub action: String,
    /// Exact token.
    pub token: String,
    /// Inclusive lower bound, ms since the epoch (0 = none).
    pub since_ms: i64,
    /// Exclusive upper bound, ms since the epoch (0 = none).
    pub until_ms: i64,
}

impl AuditFilter {
    /// Whether `b` passes the filter.
    pub fn matches(&self, b: &AuditBody) -> bool {
        (self.principal.is_empty() || b.principal == self.principal)
            && (self.tenant.is_empty() || b.tenant == self.tenant)
            && (self.action.is_empty() || b.action == self.action)
            && (self.token.is_empty() || b.token == self.token)
            && (self.since_ms == 0 || b.time_ms >= self.since_ms)
            && (self.until_ms == 0 || b.time_ms < self.until_ms)
    }
}

/// Reads of one token by one principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReads {
    /// Number of successful detokenize reads.
    pub reads: u64,
    /// First read, ms.
    pub first_ms: i64,
    /// Last read, ms.
    pub last_ms: i64,
}

/// Cards a principal read, by tenant then token: exactly the set to notify
/// after that credential leaks. Only successful reads count (a refused or
/// failed detokenize returned no card).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlastRadius {
    /// tenant -> token -> reads.
    pub tenants: BTreeMap<String, BTreeMap<String, TokenReads>>,
}

impl BlastRadius {
    /// Adds one audit body if it is a successful read by the filtered principal.
    pub fn add(&mut self, b: &AuditBody) {
        let is_read = b.action == "Detokenize" || b.action == "DetokenizeBatch";
        if !is_read || b.outcome != "OK" || b.token.is_empty() {
            return;
        }
        let e = self
            .tenants
            .entry(b.tenant.clone())
            .or_default()
            .entry(b.token.clone())
            .or_insert(TokenReads {
                reads: 0,
                first_ms: b.time_ms,
                last_ms: b.time_ms,
            });
        e.reads += 1;
        e.first_ms = e.first_ms.min(b.time_ms);
        e.last_ms = e.last_ms.max(b.time_ms);
    }

    /// Distinct tokens across tenants.
    pub fn distinct_tokens(&self) -> usize {
        self.tenants.values().map(|t| t.len()).sum()
    }
}
