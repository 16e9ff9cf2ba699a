//! The gate in front of every gRPC service, between TLS and tonic.
//!
//! tonic decodes a whole request body before a handler runs, so without
//! this a certificate from the right CA that the policy does not know (or
//! has revoked) could make the vault decode megabytes before being told
//! no. The gate refuses such callers with `UNAUTHENTICATED` from the TLS
//! identity alone, before the body is read.
//!
//! For callers it lets in, it turns tonic's own refusals of a body into
//! the API's codes: a body that is not a valid message for the method is
//! `INVALID_ARGUMENT` (tonic says `INTERNAL`), one over the service's size
//! limit `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`). Every refusal
//! here is audited like any other refused call, and none echoes the bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Code, Status};

use crate::auth::Authorizer;
use crate::error::Error;
use crate::tls::Peer;
use crate::vault::Vault;

/// Largest request the key and audit services take (a 255-custodian init
/// is under 200 KiB).
pub const SMALL_MESSAGE_LIMIT: usize = 256 << 10;
/// Largest request the token service takes: a batch of 1,000 cards, each
/// at most a few hundred bytes.
pub const TOKEN_MESSAGE_LIMIT: usize = 1 << 20;

/// Wraps the services in a [`Gate`].
#[derive(Clone)]
pub struct GateLayer {
    /// Where refusals are audited.
    pub vault: Arc<Vault>,
    /// Who is known (and not revoked).
    pub auth: Arc<Authorizer>,
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Gate {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`GateLayer`].
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    layer: GateLayer,
}

/// The method's name (`Tokenize` from `/cardvault.v1.TokenService/Tokenize`),
/// as the audit log names actions.
fn action_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

/// tonic's refusal of a body, in the API's terms; `None` for anything else.
fn body_refusal(status: &Status) -> Option<Error> {
    match status.code() {
        Code::Internal
            if status
                .message()
                .starts_with("failed to decode Protobuf message") =>
        {
            Some(Error::invalid(
                "request",
                "is not a valid protobuf message for this method",
            ))
        }
        Code::OutOfRange
            if status
                .message()
                .contains("decoded message length too large") =>
        {
            Some(Error::ResourceExhausted(
                "request: larger than this service accepts".into(),
            ))
        }
        _ => None,
    }
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (ctx, caller) = super::identity::context_for(
            req.extensions().get::<Peer>(),
            super::identity::new_request_id(),
        );
        let action = action_of(req.uri().path());
        let vault = self.layer.vault.clone();
        if let Err(e) = self.layer.auth.check_identity(&caller) {
            // The body is dropped unread with the request.
            drop(req);
            return Box::pin(async move {
                tracing::warn!(request_id = %ctx.request_id, principal = %ctx.principal, action = %action, error = %e, "denied");
                vault.audit_rejected(&ctx, &action, "", "", &e).await;
                Ok(super::status_of(&e).into_http())
            });
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let refusal = Status::from_header_map(res.headers())
                .as_ref()
                .and_then(body_refusal);
            let Some(e) = refusal else {
                return Ok(res);
            };
            vault.audit_rejected(&ctx, &action, "", "", &e).await;
            Ok(super::status_of(&e).into_http())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonics_body_refusals_are_rewritten() {
        let decode = Status::internal(
            "failed to decode Protobuf message: TokenizeRequest.pan: invalid string value",
        );
        assert!(matches!(
            body_refusal(&decode),
            Some(Error::InvalidArgument { .. })
        ));
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
        );
        assert!(matches!(
            body_refusal(&big),
            Some(Error::ResourceExhausted(_))
        ));
        assert!(body_refusal(&Status::internal("audit log down")).is_none());
        assert!(body_refusal(&Status::invalid_argument("pan: fails the Luhn check")).is_none());
        assert_eq!(action_of("/cardvault.v1.TokenService/Tokenize"), "Tokenize");
    }
}
