//! Who is calling: the principal named by the client's TLS certificate,
//! and a request id for correlating logs.

use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::vault::CallContext;

/// The principal named by a DER certificate: its first SAN URI (e.g.
/// `spiffe://cardvault.dev/demo/merchant`) if it has one, else its subject
/// common name. `None` if the certificate names nothing usable.
pub fn principal_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Some((*uri).to_owned());
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// A caller-supplied `x-request-id` if it is short and plain, otherwise a
/// fresh random one (so a hostile id cannot inject text into logs).
fn request_id<T>(req: &Request<T>) -> String {
    if let Some(v) = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return v.to_owned();
    }
    // A per-process random prefix and a counter: unique, and no
    // `getrandom` system call per request (it showed in profiles).
    static PREFIX: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hex::encode(crate::crypto::random_array::<4>()));
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{n:08x}", *PREFIX)
}

/// The peer of the request's connection (see [`crate::tls::Peer`]);
/// `None` for a request that did not come through [`crate::tls::incoming`].
pub fn peer_of<T>(req: &Request<T>) -> Option<&crate::tls::Peer> {
    req.extensions().get::<crate::tls::Peer>()
}

/// Builds the call context of a request: request id and the principal from
/// the verified peer certificate (`anonymous` without one; authorisation
/// refuses such calls).
pub fn context_of<T>(req: &Request<T>) -> (CallContext, Option<String>) {
    let peer = peer_of(req);
    let principal = peer.and_then(|p| p.principal()).map(str::to_owned);
    let ctx = CallContext {
        request_id: request_id(req),
        principal: principal.clone().unwrap_or_else(|| "anonymous".to_owned()),
        roles: Vec::new(),
        peer: peer.map(|p| p.addr().to_owned()).unwrap_or_default(),
    };
    (ctx, principal)
}
