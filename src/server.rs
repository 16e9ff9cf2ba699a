//! Wiring: storage, vault, TLS, gRPC services, background tasks and
//! graceful shutdown. The only module that knows about all the others.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::Config;
use crate::crypto::keys::SecretKey;
use crate::grpc::token_service::TokenServiceImpl;
use crate::proto::token_service_server::TokenServiceServer;
use crate::store::Store;
use crate::store::sled::SledStore;
use crate::vault::Vault;

/// How long shutdown waits for in-flight calls before closing connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Reads the KEK as configured: `keys.kek_file`, else `CARDVAULT_KEK`.
pub fn load_kek(cfg: &Config) -> Result<SecretKey, String> {
    let text = match &cfg.keys.kek_file {
        Some(p) => zeroize::Zeroizing::new(
            String::from_utf8(read(p, "KEK file")?)
                .map_err(|_| format!("KEK file {} is not text", p.display()))?,
        ),
        None => zeroize::Zeroizing::new(std::env::var("CARDVAULT_KEK").map_err(|_| {
            "no key-encrypting key: set keys.kek_file or CARDVAULT_KEK (64 hex characters)"
                .to_string()
        })?),
    };
    SecretKey::from_hex(&text)
        .ok_or_else(|| "the KEK must be exactly 64 hex characters (256 bits)".to_string())
}

/// Dev mode only: the KEK kept in `dev-kek.hex` in the data directory,
/// created on first start. Anyone who can read the data directory can
/// decrypt every card, which is why production never does this.
pub fn dev_kek(data_dir: &Path) -> Result<SecretKey, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("dev-kek.hex");
    if path.exists() {
        let text =
            zeroize::Zeroizing::new(String::from_utf8(read(&path, "dev KEK")?).unwrap_or_default());
        return SecretKey::from_hex(&text).ok_or_else(|| format!("{} is corrupt", path.display()));
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let key = SecretKey::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(key.to_hex().as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(key)
}

/// Opens the configured store.
pub fn open_store(cfg: &Config) -> Result<Arc<dyn Store>, String> {
    let path = cfg.data_dir.join("sled");
    let store = SledStore::open(&path).map_err(|e| format!("{e} (data dir {})", path.display()))?;
    Ok(Arc::new(store))
}

fn tls_config(cfg: &Config) -> Result<ServerTlsConfig, String> {
    let missing = |name: &str| {
        format!(
            "tls.{name} is required (or CARDVAULT_TLS_{})",
            name.to_uppercase()
        )
    };
    let cert = cfg.tls.cert.as_deref().ok_or_else(|| missing("cert"))?;
    let key = cfg.tls.key.as_deref().ok_or_else(|| missing("key"))?;
    let ca = cfg
        .tls
        .client_ca
        .as_deref()
        .ok_or_else(|| missing("client_ca"))?;
    server_tls(cert, key, ca)
}

/// Server TLS with mandatory client certificates: `cert`/`key` identify the
/// server, `client_ca` signs the accepted clients. Shared with the
/// benchmark's baseline server so both run the same TLS.
pub fn server_tls(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerTlsConfig, String> {
    // Client certificates are mandatory: tonic rejects a handshake without
    // one when a client CA is set (client_auth_optional stays false).
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(cert, "TLS certificate")?,
            read(key, "TLS key")?,
        ))
        .client_ca_root(Certificate::from_pem(read(client_ca, "client CA")?)))
}

/// The gRPC server builder of the vault: TLS, per-call timeout, HTTP/2
/// settings. Shared with the benchmark's baseline server.
pub fn grpc_server(tls: ServerTlsConfig) -> Result<Server, String> {
    Ok(Server::builder()
        .tls_config(tls)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .timeout(Duration::from_secs(30)))
}

/// Accepted connections of `listener`, with the socket options the vault
/// uses. tonic applies none to a listener it did not bind itself, so
/// without this Nagle's algorithm stays on and small responses can wait for
/// the peer's delayed ACK (tens of milliseconds).
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Runs the vault until `shutdown` resolves: binds, unseals with `kek`,
/// serves gRPC over mTLS, then drains in-flight calls and wipes keys and
/// CVVs. `on_ready` receives the bound address (useful with port 0).
pub async fn serve(
    cfg: &Config,
    kek: SecretKey,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let tls = tls_config(cfg)?;
    let store = open_store(cfg)?;
    let vault = Arc::new(Vault::new(store.clone(), cfg.vault_config()));
    vault
        .unseal(kek)
        .await
        .map_err(|e| format!("cannot unseal: {e}"))?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TokenServiceServer<TokenServiceImpl>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    // grpcurl and many tools still speak only the v1alpha reflection protocol.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| e.to_string())?;

    // Expired CVVs are wiped promptly, not just when someone asks for them.
    let purge_vault = vault.clone();
    let purger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            purge_vault.cvv_holder().purge_expired();
        }
    });

    tracing::info!(%addr, store = store.backend(), "cardvault listening");
    on_ready(addr);
    // Graceful shutdown waits for clients to finish; a client that never
    // does must not keep the vault (and its keys) alive forever.
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = fired_tx.send(());
    };
    let drain_deadline = async move {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(DRAIN_TIMEOUT).await,
            Err(_) => std::future::pending().await,
        }
    };
    let server = grpc_server(tls)?
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TokenServiceServer::new(TokenServiceImpl::new(
            vault.clone(),
        )))
        .serve_with_incoming_shutdown(incoming(listener), signal);
    let result = tokio::select! {
        r = server => r.map_err(|e| format!("server error: {e}")),
        _ = drain_deadline => {
            tracing::warn!(timeout_secs = DRAIN_TIMEOUT.as_secs(), "drain timeout; closing remaining connections");
            Ok(())
        }
    };
    purger.abort();
    // In-flight calls have drained; wipe keys and CVVs before the store closes.
    vault.seal();
    tracing::info!("cardvault stopped; keys and CVVs wiped");
    result
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; draining in-flight calls");
}
