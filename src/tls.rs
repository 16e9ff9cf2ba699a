//! The TLS front door: TLS 1.3 only, client certificate mandatory and
//! verified against the configured client CA, handshakes bounded in time.
//!
//! tonic's built-in TLS cannot restrict protocol versions, so connections
//! are accepted here with tokio-rustls and handed to tonic already
//! encrypted, each with its [`Peer`]: the principal named by the verified
//! client certificate and the peer address, worked out once per connection
//! (the certificate cannot change on it) and found in every request's
//! extensions.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Longest a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM in {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Builds the server configuration: TLS 1.3 only, HTTP/2 only, client
/// certificates required and verified against `client_ca`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(client_ca, "client CA")? {
        roots
            .add(ca)
            .map_err(|e| format!("client CA {}: {e}", client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("client CA {}: {e}", client_ca.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read TLS key {}: {e}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert, "TLS certificate")?, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS client configuration trusting only the CA in `ca` (used for the
/// connection to PostgreSQL).
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certs(ca, "database CA")? {
        roots
            .add(c)
            .map_err(|e| format!("database CA {}: {e}", ca.display()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Who is on the other end of a connection, shared by all its requests
/// (tonic puts a clone in each request's extensions).
#[derive(Clone, Debug)]
pub struct Peer(Arc<PeerDetails>);

/// The contents of a [`Peer`].
#[derive(Debug)]
struct PeerDetails {
    /// Principal named by the verified client certificate (see
    /// [`crate::grpc::identity::principal_from_cert`]); `None` if it names
    /// none.
    principal: Option<String>,
    /// SHA-256 of the client certificate (DER), which the policy can revoke.
    cert_sha256: Option<[u8; 32]>,
    /// Peer address as written in audit records.
    addr: String,
}

impl Peer {
    /// Works out the peer of a connection from its verified certificate.
    fn of(tls: &TlsStream<TcpStream>, addr: SocketAddr) -> Peer {
        let cert = (tls.get_ref().1.peer_certificates()).and_then(|c| c.first());
        let principal = cert.and_then(|c| crate::grpc::identity::principal_from_cert(c.as_ref()));
        let cert_sha256 = cert.map(|c| {
            let d = ring::digest::digest(&ring::digest::SHA256, c.as_ref());
            d.as_ref().try_into().expect("SHA-256 is 32 bytes")
        });
        Peer(Arc::new(PeerDetails {
            principal,
            cert_sha256,
            addr: addr.to_string(),
        }))
    }

    /// The principal named by the client certificate, if any.
    pub fn principal(&self) -> Option<&str> {
        self.0.principal.as_deref()
    }

    /// SHA-256 of the client certificate (DER), if there is one.
    pub fn cert_sha256(&self) -> Option<&[u8; 32]> {
        self.0.cert_sha256.as_ref()
    }

    /// The peer's address (`ip:port`).
    pub fn addr(&self) -> &str {
        &self.0.addr
    }
}

/// A TLS connection that passed the handshake, with its [`Peer`].
pub struct PeerStream {
    /// The connection.
    tls: TlsStream<TcpStream>,
    /// Who is on the other end.
    peer: Peer,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

// Plain delegation. Vectored writes must be passed on too: hyper writes
// HTTP/2 frames vectored when the stream supports it.
impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently,
/// yielding only connections that passed. Stops accepting (and closes the
/// listener) when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    metrics: Arc<crate::metrics::Metrics>,
) -> ReceiverStream<Result<PeerStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let peer = Peer::of(&tls, peer);
                        let _ = tx.send(Ok(PeerStream { tls, peer })).await;
                    }
                    Ok(Err(e)) => {
                        metrics
                            .tls_handshake_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics
                            .tls_handshake_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
