//! The TLS front door: TLS 1.3 only, client certificate mandatory and
//! verified against the configured client CA, handshakes bounded in time
//! and in number, connections bounded in number and closed when idle.
//!
//! Why the bounds: a connection costs a file descriptor before it has
//! proved anything. Unbounded, 2,000 TCP connects that never send a byte
//! used up a vault's 1,024 descriptors, and legitimate clients could not be
//! accepted until the handshakes timed out. So handshakes in progress are
//! capped, and at the cap the oldest one is closed to make room (a real
//! client finishes its handshake in milliseconds, an idle connect never
//! does); established connections are capped, and past the cap a new one
//! is closed at once; and a connection that has sent nothing for the idle
//! timeout is closed.
//!
//! tonic's built-in TLS cannot restrict protocol versions, so connections
//! are accepted here with tokio-rustls and handed to tonic already
//! encrypted, each with its [`Peer`]: the principal named by the verified
//! client certificate and the peer address, worked out once per connection
//! (the certificate cannot change on it) and found in every request's
//! extensions.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::sync::Recover;
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
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Longest a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on connections (config `[connections]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most established connections; past it a new one is closed at once.
    pub max_connections: usize,
    /// Most TLS handshakes in progress; past it the oldest is closed.
    pub max_handshakes: usize,
    /// A connection that has sent nothing for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_handshakes: 512,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl Limits {
    /// These limits, lowered to fit `open_files` descriptors: a quarter of
    /// what is left after a reserve for the store's files goes to
    /// handshakes, the rest to connections, so the vault never runs out
    /// and stops accepting.
    pub fn fitted(self, open_files: u64) -> Limits {
        let budget = usize::try_from(open_files.saturating_sub(128))
            .unwrap_or(usize::MAX)
            .max(8);
        let max_handshakes = self.max_handshakes.min(budget / 4).max(1);
        Limits {
            max_handshakes,
            max_connections: self.max_connections.min(budget - max_handshakes).max(1),
            ..self
        }
    }
}

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
    /// `grpc::identity::principal_from_cert`); `None` if it names
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
    /// Holds the connection's place among the established ones.
    _slot: Slot,
    /// When the peer last sent anything.
    last_read: Instant,
    /// Fires at the idle deadline (moved on when reads happened since).
    idle: Pin<Box<tokio::time::Sleep>>,
    /// How long the peer may send nothing.
    idle_timeout: Duration,
    /// Resolves when the server closes every connection (end of drain):
    /// polled by reads that wait (so a waiting connection wakes), checked
    /// by writes (a cheap flag).
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The same, as a flag.
    close_all: CancellationToken,
}

/// A place among the established connections (counted in the metrics'
/// `connections_open`), given back on drop.
struct Slot(Arc<crate::server::metrics::Metrics>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PeerStream {
    /// Why the connection must end now, if it must: the server closed
    /// every connection, or the peer has been silent for the idle timeout.
    fn ended(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Some(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the vault is shutting down",
            ));
        }
        while self.idle.as_mut().poll(cx).is_ready() {
            let deadline = self.last_read + self.idle_timeout;
            if Instant::now() >= deadline {
                return Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection idle",
                ));
            }
            // Reads happened since the timer was set: move it on (and
            // poll again, so that it wakes this task).
            self.idle.as_mut().reset(deadline.into());
        }
        None
    }
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
        let before = buf.filled().len();
        match Pin::new(&mut self.tls).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // Cheap: the timer is only moved when it fires.
                    self.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.ended(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.close_all.is_cancelled() {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.close_all.is_cancelled() {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into()));
        }
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

/// Handshakes in progress, oldest first, so that the oldest can be closed
/// when a new connection needs its place.
#[derive(Default)]
struct Handshakes {
    next: u64,
    running: BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Accepts TCP connections and completes TLS handshakes concurrently,
/// within `limits`, yielding only connections that passed. Stops accepting
/// (and closes the listener) when the returned stream is dropped; closes
/// every connection it yielded when `close_all` is cancelled.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    metrics: Arc<crate::server::metrics::Metrics>,
    limits: Limits,
    close_all: CancellationToken,
) -> ReceiverStream<Result<PeerStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
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
            if metrics.connections_open.load(Ordering::Acquire) >= limits.max_connections {
                metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "connection refused: at the connection limit");
                continue;
            }
            let seq = {
                let mut h = handshakes.lock().recover();
                while h.running.len() >= limits.max_handshakes {
                    let Some((_, oldest)) = h.running.pop_first() else {
                        break;
                    };
                    oldest.abort();
                    metrics.handshakes_evicted.fetch_add(1, Ordering::Relaxed);
                }
                h.next += 1;
                h.next
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = metrics.clone();
            let handshakes_done = handshakes.clone();
            let close_all = close_all.clone();
            let task = tokio::spawn(async move {
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                handshakes_done.lock().recover().running.remove(&seq);
                match result {
                    Ok(Ok(tls)) => {
                        metrics.connections_open.fetch_add(1, Ordering::AcqRel);
                        let slot = Slot(metrics.clone());
                        let peer = Peer::of(&tls, peer);
                        let stream = PeerStream {
                            tls,
                            peer,
                            _slot: slot,
                            last_read: Instant::now(),
                            idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                            idle_timeout: limits.idle_timeout,
                            // A token per connection: waiting on the one
                            // shared token would serialise every
                            // connection's waits on its lock.
                            closed: Box::pin(close_all.child_token().cancelled_owned()),
                            close_all: close_all.clone(),
                        };
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        metrics
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
            let mut h = handshakes.lock().recover();
            // A handshake that ended before it was listed stays unlisted.
            if !task.is_finished() {
                h.running.insert(seq, task.abort_handle());
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fit_the_open_file_budget() {
        let d = Limits::default();
        assert_eq!(d.fitted(1 << 20), d);
        let small = d.fitted(1024);
        assert_eq!(small.max_handshakes, (1024 - 128) / 4);
        assert_eq!(small.max_connections, 1024 - 128 - small.max_handshakes);
        let tiny = d.fitted(10);
        assert!(tiny.max_handshakes >= 1 && tiny.max_connections >= 1);
    }
}
