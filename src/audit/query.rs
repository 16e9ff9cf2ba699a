//! Filters and reports over audit bodies: who did what, and the blast
//! radius of a credential (which cards it read).

use std::collections::BTreeMap;

use super::{AuditAction, AuditBody};
use crate::error::{Error, Result};
use crate::fields::{Tenant, check_free_text};
use crate::token::Token;

/// Longest principal a filter accepts (certificate names are far shorter).
const MAX_PRINCIPAL_CHARS: usize = 256;

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
    /// Checks the client-given fields, which go into the query's own audit
    /// record: a token must be a token (a card number is refused, as on
    /// every token RPC), a tenant a tenant name, a principal short
    /// printable text without a card number, an action one the log records (or `Reads`).
    /// Errors name the field and never echo the value.
    pub fn validate(&self) -> Result<()> {
        if !self.token.is_empty() {
            Token::parse(&self.token)?;
        }
        // Tenant names may hold digits, but never a card number (it would
        // go into this query's record): `Tenant::parse` refuses one.
        if !self.tenant.is_empty() {
            Tenant::parse(&self.tenant)?;
        }
        if !self.principal.is_empty() {
            check_principal(&self.principal)?;
        }
        let action_ok = self.action.is_empty()
            || self.action == READS
            || AuditAction::parse(&self.action).is_some();
        if !action_ok {
            return Err(Error::invalid(
                "action",
                "is not an audited action (e.g. Detokenize, or Reads for every read of a card)",
            ));
        }
        Ok(())
    }

    /// Whether `b` passes the filter. The action `Reads` matches every
    /// action that reads a card, so "every read of this token" is one query.
    pub fn matches(&self, b: &AuditBody) -> bool {
        (self.principal.is_empty() || b.principal == self.principal)
            && (self.tenant.is_empty() || b.tenant == self.tenant)
            && (self.action.is_empty()
                || b.action == self.action
                || (self.action == READS && reads_a_card(b)))
            && (self.token.is_empty() || b.token == self.token)
            && (self.since_ms == 0 || b.time_ms >= self.since_ms)
            && (self.until_ms == 0 || b.time_ms < self.until_ms)
    }
}

/// The filter action that stands for every read of a card.
pub const READS: &str = "Reads";

/// Whether the record is of an action that returns a card.
fn reads_a_card(b: &AuditBody) -> bool {
    AuditAction::parse(&b.action).is_some_and(AuditAction::reads_a_card)
}

/// Checks a principal given by a client (field `principal`): at most 256
/// characters, no control characters, no card number.
pub fn check_principal(principal: &str) -> Result<()> {
    check_free_text("principal", principal, MAX_PRINCIPAL_CHARS)
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
        if !reads_a_card(b) || b.outcome != "OK" || b.token.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_refuse_card_numbers_and_junk_naming_the_field() {
        let field_of = |f: AuditFilter| match f.validate() {
            Err(Error::InvalidArgument { field, reason }) => {
                assert!(!reason.contains("4111"), "{reason}");
                field
            }
            other => panic!("{other:?}"),
        };
        let with = |edit: &dyn Fn(&mut AuditFilter)| {
            let mut f = AuditFilter::default();
            edit(&mut f);
            field_of(f)
        };
        let pan = "4111111111111111";
        assert_eq!(with(&|f| f.token = pan.into()), "token");
        assert_eq!(with(&|f| f.principal = format!("cn={pan}")), "principal");
        assert_eq!(with(&|f| f.tenant = pan.into()), "tenant");
        assert_eq!(with(&|f| f.action = format!("{pan} x")), "action");
        assert_eq!(with(&|f| f.principal = "a\nb".into()), "principal");
        assert_eq!(with(&|f| f.principal = "p".repeat(257)), "principal");
        assert_eq!(with(&|f| f.action = "A".repeat(65)), "action");
        let ok = AuditFilter {
            principal: "processor-1".into(),
            tenant: "demo".into(),
            action: "DetokenizeBatch".into(),
            token: format!("tok_{}", "a".repeat(22)),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(AuditFilter::default().validate(), Ok(()));
        assert_eq!(check_principal(&"p".repeat(256)), Ok(()));
    }
}
