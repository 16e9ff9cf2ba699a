//! The gate in front of every gRPC service, between TLS and tonic.
//!
//! tonic decodes a whole request body before a handler runs, so without
//! this a certificate from the right CA that the policy does not know (or
//! has revoked) could make the vault decode megabytes before being told
//! no. The gate refuses such callers with `UNAUTHENTICATED` from the TLS
//! identity alone, before the body is read.
//!
//! For callers it lets in, each method reads at most what its largest real
//! request needs ([`method_limit`]: a Tokenize is a few hundred bytes, a
//! full batch about 600 KiB); a body past it is refused as it streams in,
//! before it is decoded. And it turns tonic's own refusals of a body into
//! the API's codes: a body that is not a valid message for the method is
//! `INVALID_ARGUMENT` (tonic says `INTERNAL`), one over the service's size
//! limit `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`). Every refusal
//! here is audited like any other refused call, and none echoes the bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use tonic::{Code, Status};

use crate::audit::AuditAction;
use crate::auth::{Action, Authorizer};
use crate::error::Error;
use crate::server::tls::Peer;
use crate::vault::Vault;

/// Largest request the key and audit services take (a 255-custodian init
/// is under 200 KiB).
pub(crate) const SMALL_MESSAGE_LIMIT: usize = 256 << 10;
/// Largest request the token service takes: a batch of 1,000 cards, each
/// at most a few hundred bytes.
pub(crate) const TOKEN_MESSAGE_LIMIT: usize = 1 << 20;

/// The most bytes a request body for `method` (`None`: a path that is not
/// one of ours) may hold, gRPC framing included, sized to its largest real
/// request with room to spare: names are at most 100 characters, tokens
/// 26, purposes 200, batches 1,000 items, an init 255 custodians.
pub(crate) fn method_limit(method: Option<Action>) -> usize {
    const KIB: usize = 1 << 10;
    match method {
        Some(Action::TokenizeBatch) => TOKEN_MESSAGE_LIMIT,
        Some(Action::DetokenizeBatch) => 256 * KIB,
        Some(Action::KeyInit | Action::StartRekey) => SMALL_MESSAGE_LIMIT,
        Some(
            Action::TokenizeSealed
            | Action::KeyUnseal
            | Action::SubmitRekeyShare
            | Action::AuditQuery
            | Action::AuditBlastRadius,
        ) => 16 * KIB,
        Some(
            Action::Tokenize
            | Action::Detokenize
            | Action::GetMetadata
            | Action::DeleteToken
            | Action::CreateCollectSession
            | Action::KeyStatus
            | Action::KeySeal
            | Action::RotateDataKey
            | Action::Rewrap
            | Action::RetireKey
            | Action::CancelRekey
            | Action::ClearEnumerationGuard
            | Action::AuditVerify,
        ) => 8 * KIB,
        // Health checks, reflection: small, but not ours to size exactly.
        None => 64 * KIB,
    }
}

/// The error type of request bodies, as tonic takes them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that fails once it has carried more than its method's
/// limit, and says so in `over`.
pub(crate) struct Limited<B> {
    inner: B,
    left: usize,
    over: Arc<AtomicBool>,
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > this.left {
                        this.over.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(
                            "request larger than the method accepts".into()
                        )));
                    }
                    this.left -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps the services in a [`Gate`].
#[derive(Clone)]
pub(crate) struct GateLayer {
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
pub(crate) struct Gate<S> {
    inner: S,
    layer: GateLayer,
}

/// The action a refusal of `method` is recorded under: the name its
/// handler uses (`AuditQuery` for `/cardvault.v1.AuditService/Query`), or
/// `OtherMethod` for any path that is not one of ours.
fn action_of(method: Option<Action>) -> AuditAction {
    method.map_or(AuditAction::OtherMethod, AuditAction::from)
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
    S: tower::Service<http::Request<Limited<B>>, Response = http::Response<ResBody>> + Send,
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
        // The path is parsed once: it names both the action refusals are
        // recorded under and the body limit.
        let method = Action::of_path(req.uri().path());
        let action = action_of(method);
        let vault = self.layer.vault.clone();
        if let Err(e) = self.layer.auth.check_identity(&caller) {
            // The body is dropped unread with the request.
            drop(req);
            return Box::pin(async move {
                tracing::warn!(request_id = %ctx.request_id, principal = %ctx.principal, action = %action, error = %e, "denied");
                vault.audit_rejected(&ctx, action, "", "", &e).await;
                Ok(super::status_of(&e).into_http())
            });
        }
        let over = Arc::new(AtomicBool::new(false));
        let limit = method_limit(method);
        let req = req.map(|inner| Limited {
            inner,
            left: limit,
            over: over.clone(),
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let refusal = if over.load(Ordering::Acquire) {
                Some(Error::ResourceExhausted(format!(
                    "request: larger than {action} accepts ({} KiB)",
                    limit >> 10
                )))
            } else {
                Status::from_header_map(res.headers())
                    .as_ref()
                    .and_then(body_refusal)
            };
            let Some(e) = refusal else {
                return Ok(res);
            };
            vault.audit_rejected(&ctx, action, "", "", &e).await;
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
        assert_eq!(
            action_of(Action::of_path("/cardvault.v1.TokenService/Tokenize")),
            AuditAction::Tokenize
        );
        // Refusals at the gate go under the name the handler uses.
        assert_eq!(
            action_of(Action::of_path("/cardvault.v1.AuditService/Query")),
            AuditAction::AuditQuery
        );
        // A caller's own path is never recorded: it could hold anything.
        for path in [
            "/cardvault.v1.TokenService/4111111111111111",
            "/grpc.health.v1.Health/Check",
            "/x/Tokenize",
            "",
        ] {
            assert_eq!(
                action_of(Action::of_path(path)),
                AuditAction::OtherMethod,
                "{path}"
            );
        }
    }

    #[test]
    fn batches_get_their_service_limit_and_single_calls_far_less() {
        assert_eq!(
            method_limit(Action::of_path("/cardvault.v1.TokenService/TokenizeBatch")),
            TOKEN_MESSAGE_LIMIT
        );
        assert_eq!(
            method_limit(Action::of_path("/cardvault.v1.TokenService/Tokenize")),
            8 << 10
        );
        assert_eq!(
            method_limit(Action::of_path("/cardvault.v1.KeyService/Init")),
            SMALL_MESSAGE_LIMIT
        );
        assert!(method_limit(Action::of_path("/grpc.health.v1.Health/Check")) <= 64 << 10);
    }
}
