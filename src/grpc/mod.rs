//! The gRPC edge: protobuf <-> domain types, domain errors -> `Status`,
//! and the caller's identity from its TLS client certificate. All policy and
//! crypto live below, in [`crate::vault`].

pub(crate) mod audit_service;
pub(crate) mod gate;
pub(crate) mod identity;
pub(crate) mod key_service;
mod redact;
pub(crate) mod token_service;

use tonic::Status;

use crate::error::Error;

/// Maps a domain error to the one gRPC status the API contract promises.
/// Messages come from [`Error`]'s `Display`, which never holds a secret.
pub(crate) fn status_of(err: &Error) -> Status {
    let msg = err.to_string();
    match err {
        Error::InvalidArgument { .. } => Status::invalid_argument(msg),
        Error::NotFound => Status::not_found(msg),
        Error::Unauthenticated(_) => Status::unauthenticated(msg),
        Error::PermissionDenied(_) => Status::permission_denied(msg),
        Error::Sealed => Status::unavailable(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        Error::DataLoss(_) => Status::data_loss(msg),
        Error::Unavailable(_) => Status::unavailable(msg),
        Error::Internal(_) => Status::internal(msg),
    }
}

/// Authorises a request to an admin or audit RPC and returns its call
/// context with the caller's roles. `scope` is the tenant of a per-tenant
/// call; `None` needs a grant for all tenants. Denials are logged and
/// audited.
pub(crate) async fn authorize_call<T>(
    vault: &crate::vault::Vault,
    auth: &crate::auth::Authorizer,
    req: &tonic::Request<T>,
    action: crate::auth::Action,
    scope: Option<&str>,
) -> Result<crate::vault::CallContext, Error> {
    authorize_grant(vault, auth, req, action, scope)
        .await
        .map(|(ctx, _)| ctx)
}

/// Like [`authorize_call`], also returning the caller's grant (whether it
/// spans every tenant decides what the audit view shows).
pub(crate) async fn authorize_grant<T>(
    vault: &crate::vault::Vault,
    auth: &crate::auth::Authorizer,
    req: &tonic::Request<T>,
    action: crate::auth::Action,
    scope: Option<&str>,
) -> Result<(crate::vault::CallContext, crate::auth::policy::Grant), Error> {
    let (mut ctx, caller) = identity::context_of(req);
    let res = match scope {
        Some(t) => auth.authorize(&caller, action, t).map(|a| a.grant),
        None => auth.authorize_global(&caller, action),
    };
    match res {
        Ok(grant) => {
            ctx.roles = grant.roles.iter().map(|r| r.as_str().to_owned()).collect();
            Ok((ctx, grant))
        }
        Err(e) => {
            tracing::warn!(request_id = %ctx.request_id, principal = %ctx.principal, action = action.as_str(), error = %e, "denied");
            vault.audit_rejected(&ctx, action.into(), "", "", &e).await;
            Err(e)
        }
    }
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A batch item's error in protobuf form.
pub(crate) fn item_error(err: &Error) -> crate::proto::ItemError {
    crate::proto::ItemError {
        code: err.code_name().to_owned(),
        field: match err {
            Error::InvalidArgument { field, .. } => field.clone(),
            _ => String::new(),
        },
        message: err.to_string(),
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        status_of(&err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code name written to audit records and batch item errors is the
    /// code the call answers with.
    #[test]
    fn code_names_match_the_status_codes() {
        for e in [
            Error::invalid("f", "r"),
            Error::NotFound,
            Error::Unauthenticated("x".into()),
            Error::PermissionDenied("x".into()),
            Error::Sealed,
            Error::FailedPrecondition("x".into()),
            Error::ResourceExhausted("x".into()),
            Error::DataLoss("x".into()),
            Error::Unavailable("x".into()),
            Error::Internal("x".into()),
        ] {
            let code = status_of(&e).code();
            let name = format!("{code:?}");
            // tonic's Debug is CamelCase: compare without underscores.
            assert_eq!(
                name.to_ascii_uppercase(),
                e.code_name().replace('_', ""),
                "{e:?}"
            );
        }
    }
}
