//! The domain error type. It never carries a PAN, CVV or key: messages name
//! the field and the reason only, so an error can be logged or sent to a
//! client as-is.

use std::fmt;

/// Everything that can go wrong in the vault core, classified so that the
/// gRPC layer can map each variant to exactly one status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A request field failed validation. `field` names it, `reason` says why;
    /// neither contains the rejected value.
    InvalidArgument {
        /// The request field, e.g. `pan` or `items[3].exp_month`.
        field: String,
        /// Why it was rejected, e.g. `fails the Luhn check`.
        reason: String,
    },
    /// The token does not exist *for this tenant*. Deliberately the same for a
    /// missing token and another tenant's token, so there is no existence oracle.
    NotFound,
    /// The caller could not be identified (no certificate, or a principal
    /// the policy does not know).
    Unauthenticated(String),
    /// The caller is not allowed to perform this operation.
    PermissionDenied(String),
    /// The vault holds no keys (sealed); data operations cannot run.
    Sealed,
    /// The operation does not fit the vault's current state (e.g. init on
    /// an initialised vault, retiring a key still in use).
    FailedPrecondition(String),
    /// A bounded resource is full (CVV holder, token space, rate limit).
    ResourceExhausted(String),
    /// Stored data failed authentication or could not be decoded: tampering,
    /// corruption, or a record moved between tenants/tokens.
    DataLoss(String),
    /// A dependency (storage, audit) failed; the operation did not happen.
    Unavailable(String),
    /// A bug or an impossible state.
    Internal(String),
}

impl Error {
    /// The gRPC code name the API answers this error with, e.g.
    /// `INVALID_ARGUMENT`: what audit records, batch item errors and logs
    /// call it. The one table of them.
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Error::NotFound => "NOT_FOUND",
            Error::Unauthenticated(_) => "UNAUTHENTICATED",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::Sealed | Error::Unavailable(_) => "UNAVAILABLE",
            Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Error::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Error::DataLoss(_) => "DATA_LOSS",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Re-labels the field of an `InvalidArgument` error, e.g. to prefix a
    /// batch item index (`items[3].pan`). Other variants pass through.
    pub fn in_field(self, prefix: &str) -> Self {
        match self {
            Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { field, reason } => write!(f, "{field}: {reason}"),
            Error::NotFound => f.write_str("token not found"),
            Error::Unauthenticated(m) => write!(f, "unauthenticated: {m}"),
            Error::PermissionDenied(m) => write!(f, "permission denied: {m}"),
            Error::Sealed => f.write_str("vault is sealed"),
            Error::FailedPrecondition(m) => write!(f, "failed precondition: {m}"),
            Error::ResourceExhausted(m) => write!(f, "resource exhausted: {m}"),
            Error::DataLoss(m) => write!(f, "stored data failed integrity check: {m}"),
            Error::Unavailable(m) => write!(f, "unavailable: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// An error with its causes, for a person: libraries often put the useful
/// part in a source (tonic's "transport error", tokio-postgres's "db error").
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Result alias for the vault core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
