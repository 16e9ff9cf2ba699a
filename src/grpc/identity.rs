//! Who is calling: the principal named by the client's TLS certificate,
//! and a request id for correlating logs.

use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::auth::Caller;
use crate::vault::CallContext;

/// The principal named by a DER certificate: its SAN URI (e.g.
/// `spiffe://cardvault.dev/demo/merchant`), or, for a certificate with no
/// URI in its SAN, its subject common name. `None` if the certificate names
/// nothing usable, or nothing unambiguous:
///
/// * several SAN URIs (which one would the policy mean?);
/// * a SAN extension that does not parse (no falling back to the CN then);
/// * a common name shaped like a URI (with `:`): the CN is the field CAs
///   check least, and it must not pass for a SAN URI principal such as a
///   processor's SPIFFE ID.
pub(crate) fn principal_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()?;
    let mut uris = san
        .iter()
        .flat_map(|s| &s.value.general_names)
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => return Some(uri.to_owned()),
        (Some(_), Some(_)) => return None,
        (None, _) => {}
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty() && !cn.contains(':'))
        .map(str::to_owned)
}

/// A caller-supplied `x-request-id` if it is short and plain and holds no
/// card number, otherwise a fresh random one (so a hostile id cannot
/// inject text into logs).
fn request_id<T>(req: &Request<T>) -> String {
    if let Some(v) = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        // It is logged and audited: not a card number sent by mistake.
        && !crate::fields::contains_card_number(v)
    {
        return v.to_owned();
    }
    new_request_id()
}

/// A fresh request id: a per-process random prefix and a counter.
pub(crate) fn new_request_id() -> String {
    // Unique, and no `getrandom` system call per request (it showed in
    // profiles).
    static PREFIX: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hex::encode(crate::crypto::random_array::<4>()));
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{n:08x}", *PREFIX)
}

/// The peer of the request's connection (see [`crate::server::tls::Peer`]);
/// `None` for a request that did not come through [`crate::server::tls::incoming`].
pub(crate) fn peer_of<T>(req: &Request<T>) -> Option<&crate::server::tls::Peer> {
    req.extensions().get::<crate::server::tls::Peer>()
}

/// Builds the call context of a request: request id and the caller from
/// the verified peer certificate (principal `anonymous` without one;
/// authorisation refuses such calls).
pub(crate) fn context_of<T>(req: &Request<T>) -> (CallContext, Caller) {
    context_for(peer_of(req), request_id(req))
}

/// The caller and call context of a connection's peer (`None`: no TLS
/// peer), with the request id to use; shared by the services and the gate
/// in front of them.
pub(crate) fn context_for(
    peer: Option<&crate::server::tls::Peer>,
    request_id: String,
) -> (CallContext, Caller) {
    let caller = Caller {
        principal: peer.and_then(|p| p.principal()).map(str::to_owned),
        cert_sha256: peer.and_then(|p| p.cert_sha256().copied()),
    };
    let ctx = CallContext {
        request_id,
        principal: caller
            .principal
            .clone()
            .unwrap_or_else(|| "anonymous".to_owned()),
        roles: Vec::new(),
        peer: peer.map(|p| p.addr().to_owned()).unwrap_or_default(),
    };
    (ctx, caller)
}

#[cfg(test)]
mod tests {
    use super::principal_from_cert;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, sans: &[SanType]) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.subject_alt_names = sans.to_vec();
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    #[test]
    fn the_principal_is_the_one_san_uri_else_a_plain_common_name() {
        let spiffe = "spiffe://payments.example/acme/processor";
        assert_eq!(
            principal_from_cert(&cert(Some("checkout"), &[uri(spiffe)])).as_deref(),
            Some(spiffe)
        );
        // DNS names do not count as URIs: the CN names the principal.
        let dns = SanType::DnsName("svc.example".try_into().unwrap());
        assert_eq!(
            principal_from_cert(&cert(Some("batch-job"), &[dns])).as_deref(),
            Some("batch-job")
        );
        assert_eq!(
            principal_from_cert(&cert(Some("batch-job"), &[])).as_deref(),
            Some("batch-job")
        );
        // Ambiguous or masquerading certificates name no one.
        let two = [uri(spiffe), uri("spiffe://payments.example/acme/merchant")];
        assert_eq!(principal_from_cert(&cert(Some("x"), &two)), None);
        assert_eq!(principal_from_cert(&cert(Some(spiffe), &[])), None);
        assert_eq!(principal_from_cert(&cert(None, &[])), None);
        assert_eq!(principal_from_cert(b"not a certificate"), None);
    }
}
