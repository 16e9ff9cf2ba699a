//! The actions an audit record can name: one list, so that a record, a
//! refusal at the gate, a refusal in a handler and a query filter all
//! speak of the same call by the same name.

use std::fmt;

/// What an audit record says was done (its `action` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// `TokenService.Tokenize`.
    Tokenize,
    /// `TokenService.TokenizeBatch` (one record per item).
    TokenizeBatch,
    /// `TokenService.CreateCollectSession`.
    CreateCollectSession,
    /// `TokenService.TokenizeSealed`.
    TokenizeSealed,
    /// `TokenService.Detokenize`: a read of a card.
    Detokenize,
    /// `TokenService.DetokenizeBatch` (one record per item): reads of cards.
    DetokenizeBatch,
    /// `TokenService.GetMetadata`.
    GetMetadata,
    /// `TokenService.DeleteToken`.
    DeleteToken,
    /// `AuditService.Query`.
    AuditQuery,
    /// `AuditService.BlastRadius`.
    AuditBlastRadius,
    /// `AuditService.Verify`.
    AuditVerify,
    /// `KeyService.Status`.
    Status,
    /// `KeyService.Init`, and the vault's own initialisation.
    Init,
    /// `KeyService.Unseal`, and unsealing at start.
    Unseal,
    /// `KeyService.Seal`.
    Seal,
    /// `KeyService.RotateDataKey`.
    RotateDataKey,
    /// `KeyService.Rewrap`.
    Rewrap,
    /// `KeyService.RetireKey`.
    RetireKey,
    /// `KeyService.StartRekey` refused before it reached the vault.
    StartRekey,
    /// `KeyService.SubmitRekeyShare` refused before it reached the vault.
    SubmitRekeyShare,
    /// `KeyService.CancelRekey` refused before it reached the vault.
    CancelRekey,
    /// `KeyService.ClearEnumerationGuard`.
    ClearEnumerationGuard,
    /// A rekey started (the vault's record of `StartRekey`).
    RekeyStart,
    /// A custodian's rekey share taken (of `SubmitRekeyShare`).
    RekeyShare,
    /// A rekey finished: the new shares are out.
    RekeyComplete,
    /// A rekey cancelled (of `CancelRekey`).
    RekeyCancel,
    /// The enumeration guard locked a bucket.
    EnumerationLock,
    /// A call to a method that is none of the above (health checks,
    /// reflection, a path no service has), refused at the gate. The
    /// caller's path is not recorded: it is the caller's text, and could
    /// hold anything, a card number included.
    OtherMethod,
}

impl AuditAction {
    /// Every action, in the order above.
    pub const ALL: [AuditAction; 28] = [
        AuditAction::Tokenize,
        AuditAction::TokenizeBatch,
        AuditAction::CreateCollectSession,
        AuditAction::TokenizeSealed,
        AuditAction::Detokenize,
        AuditAction::DetokenizeBatch,
        AuditAction::GetMetadata,
        AuditAction::DeleteToken,
        AuditAction::AuditQuery,
        AuditAction::AuditBlastRadius,
        AuditAction::AuditVerify,
        AuditAction::Status,
        AuditAction::Init,
        AuditAction::Unseal,
        AuditAction::Seal,
        AuditAction::RotateDataKey,
        AuditAction::Rewrap,
        AuditAction::RetireKey,
        AuditAction::StartRekey,
        AuditAction::SubmitRekeyShare,
        AuditAction::CancelRekey,
        AuditAction::ClearEnumerationGuard,
        AuditAction::RekeyStart,
        AuditAction::RekeyShare,
        AuditAction::RekeyComplete,
        AuditAction::RekeyCancel,
        AuditAction::EnumerationLock,
        AuditAction::OtherMethod,
    ];

    /// The actions that return a card.
    pub const CARD_READS: [AuditAction; 2] =
        [AuditAction::Detokenize, AuditAction::DetokenizeBatch];

    /// The name stored in records. Never change one: stored records and
    /// the queries of their readers use it.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Tokenize => "Tokenize",
            AuditAction::TokenizeBatch => "TokenizeBatch",
            AuditAction::CreateCollectSession => "CreateCollectSession",
            AuditAction::TokenizeSealed => "TokenizeSealed",
            AuditAction::Detokenize => "Detokenize",
            AuditAction::DetokenizeBatch => "DetokenizeBatch",
            AuditAction::GetMetadata => "GetMetadata",
            AuditAction::DeleteToken => "DeleteToken",
            AuditAction::AuditQuery => "AuditQuery",
            AuditAction::AuditBlastRadius => "AuditBlastRadius",
            AuditAction::AuditVerify => "AuditVerify",
            AuditAction::Status => "Status",
            AuditAction::Init => "Init",
            AuditAction::Unseal => "Unseal",
            AuditAction::Seal => "Seal",
            AuditAction::RotateDataKey => "RotateDataKey",
            AuditAction::Rewrap => "Rewrap",
            AuditAction::RetireKey => "RetireKey",
            AuditAction::StartRekey => "StartRekey",
            AuditAction::SubmitRekeyShare => "SubmitRekeyShare",
            AuditAction::CancelRekey => "CancelRekey",
            AuditAction::ClearEnumerationGuard => "ClearEnumerationGuard",
            AuditAction::RekeyStart => "RekeyStart",
            AuditAction::RekeyShare => "RekeyShare",
            AuditAction::RekeyComplete => "RekeyComplete",
            AuditAction::RekeyCancel => "RekeyCancel",
            AuditAction::EnumerationLock => "EnumerationLock",
            AuditAction::OtherMethod => "OtherMethod",
        }
    }

    /// The action named `name`, if any.
    pub fn parse(name: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Whether this action returns a card.
    pub fn reads_a_card(self) -> bool {
        AuditAction::CARD_READS.contains(&self)
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_parse_back() {
        let mut names = std::collections::HashSet::new();
        for a in AuditAction::ALL {
            assert!(names.insert(a.as_str()), "{a} twice");
            assert_eq!(AuditAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(AuditAction::parse("Query"), None);
        assert_eq!(AuditAction::parse("4111111111111111"), None);
    }
}
