//! Wiring: storage, vault, TLS, gRPC services, background tasks and
//! graceful shutdown. The only module that knows about all the others.

pub mod config;
pub mod hardening;
pub(crate) mod metrics;
pub mod pki;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;

use crate::auth::Authorizer;
use crate::crypto::keys::SecretKey;
use crate::grpc::audit_service::AuditServiceImpl;
use crate::grpc::key_service::KeyServiceImpl;
use crate::grpc::token_service::TokenServiceImpl;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::proto::token_service_server::TokenServiceServer;
use crate::server::config::{Backend, Config, ConfigError};
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sled::SledStore;
use crate::vault::Vault;

/// How long shutdown waits for in-flight calls before closing connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the vault could not start, or stopped serving. The message says what
/// is wrong and which setting or file to fix; the variant says where.
#[derive(Debug)]
pub enum StartError {
    /// The configuration is unusable.
    Config(ConfigError),
    /// The access policy is missing or unusable.
    Policy(String),
    /// The server's TLS files are missing or unusable.
    Tls(String),
    /// The key-encrypting key cannot be read, or unsealing with it failed.
    Keys(String),
    /// The store cannot be opened.
    Store(String),
    /// Process hardening that was asked for failed, or swap is on while
    /// memory is not locked (production).
    Hardening(String),
    /// A listener could not be bound, or the server failed.
    Serve(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Policy(m)
            | StartError::Tls(m)
            | StartError::Keys(m)
            | StartError::Store(m)
            | StartError::Hardening(m)
            | StartError::Serve(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// The command line prints errors as text.
impl From<StartError> for String {
    fn from(e: StartError) -> String {
        e.to_string()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// How the server gets its key-encrypting key.
pub enum KeySource {
    /// Dev mode: a KEK file in the data directory, unsealed at start (INSECURE).
    Dev(SecretKey),
    /// A KEK supplied by the platform (file or environment), unsealed at start.
    KekFile(SecretKey),
    /// No KEK at start: the vault starts sealed and custodians unseal it with
    /// Shamir key shares (`cardvault init`, `cardvault unseal`).
    Shamir,
}

impl KeySource {
    fn mode(&self) -> &'static str {
        match self {
            KeySource::Dev(_) => "dev",
            KeySource::KekFile(_) => "kek-file",
            KeySource::Shamir => "shamir",
        }
    }
}

/// Reads the KEK as configured: `keys.kek_file`, else `CARDVAULT_KEK`, else
/// none (Shamir mode: start sealed).
pub fn load_kek(cfg: &Config) -> Result<KeySource, StartError> {
    let text = match &cfg.keys.kek_file {
        Some(p) => {
            warn_if_shared(p, "keys.kek_file");
            zeroize::Zeroizing::new(
                String::from_utf8(read(p, "KEK file").map_err(StartError::Keys)?).map_err(
                    |_| StartError::Keys(format!("KEK file {} is not text", p.display())),
                )?,
            )
        }
        None => match std::env::var("CARDVAULT_KEK") {
            Ok(v) => zeroize::Zeroizing::new(v),
            Err(_) => return Ok(KeySource::Shamir),
        },
    };
    SecretKey::from_hex(&text)
        .map(KeySource::KekFile)
        .ok_or_else(|| {
            StartError::Keys("the KEK must be exactly 64 hex characters (256 bits)".into())
        })
}

/// Logs a warning if the file at `path` (a secret) can be read by its
/// group or by others: the KEK unlocks every card. (A warning, not a
/// refusal: secret mounts differ, e.g. Kubernetes' default mode 0644.)
fn warn_if_shared(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "{what} is readable by its group or others; make it 0400 or 0600"
            );
        }
    }
}

/// Dev mode's configuration: the file at `config` (or defaults and
/// `CARDVAULT_*` variables), serving on `listen` from `data_dir`, with the
/// dev certificates and policy there (created on first start).
pub fn dev_config(
    config: Option<&Path>,
    data_dir: &Path,
    listen: std::net::SocketAddr,
) -> Result<Config, StartError> {
    let mut cfg = Config::load(config)?;
    cfg.data_dir = data_dir.to_owned();
    cfg.listen = listen;
    let pki = pki::ensure_dev_pki(&data_dir.join("certs")).map_err(StartError::Tls)?;
    cfg.tls.cert = Some(pki.server_cert());
    cfg.tls.key = Some(pki.server_key());
    cfg.tls.client_ca = Some(pki.ca());
    let policy = data_dir.join("policy.toml");
    if !policy.exists() {
        std::fs::write(&policy, pki::dev_policy_toml())
            .map_err(|e| StartError::Policy(format!("cannot write {}: {e}", policy.display())))?;
    }
    cfg.policy = Some(policy);
    Ok(cfg)
}

/// Dev mode only: the KEK kept in `dev-kek.hex` in the data directory,
/// created on first start. Anyone who can read the data directory can
/// decrypt every card, which is why production never does this.
pub fn dev_kek(data_dir: &Path) -> Result<SecretKey, StartError> {
    dev_kek_file(data_dir).map_err(StartError::Keys)
}

fn dev_kek_file(data_dir: &Path) -> Result<SecretKey, String> {
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

/// Opens the configured store (and, for PostgreSQL, applies migrations).
pub async fn open_store(cfg: &Config) -> Result<Arc<dyn Store>, StartError> {
    open_configured_store(cfg).await.map_err(StartError::Store)
}

async fn open_configured_store(cfg: &Config) -> Result<Arc<dyn Store>, String> {
    match cfg.store.backend {
        Backend::Sled => {
            let path = cfg.data_dir.join("sled");
            let store =
                SledStore::open(&path).map_err(|e| format!("{e} (data dir {})", path.display()))?;
            Ok(Arc::new(store))
        }
        Backend::Postgres => {
            let url = cfg
                .store
                .url
                .as_deref()
                .ok_or("store.url is required for postgres")?;
            let tls = match &cfg.store.tls_ca {
                None => {
                    // Fine on one host or a private socket; elsewhere the
                    // password and every ciphertext cross the network in clear.
                    tracing::warn!(
                        "store.tls_ca is not set: the PostgreSQL connection is not encrypted"
                    );
                    None
                }
                Some(ca) => Some(crate::server::tls::client_config(ca)?),
            };
            let store = PostgresStore::connect(url, cfg.store.pool_size, tls)
                .await
                .map_err(|e| format!("cannot open the PostgreSQL store: {e}"))?;
            Ok(Arc::new(store))
        }
    }
}

fn tls_config(cfg: &Config) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let missing = |name: &str| {
        format!(
            "tls.{name} is required (or CARDVAULT_TLS_{})",
            name.to_uppercase()
        )
    };
    let cert = cfg.tls.cert.as_deref().ok_or_else(|| missing("cert"));
    let key = cfg.tls.key.as_deref().ok_or_else(|| missing("key"));
    let ca = cfg
        .tls
        .client_ca
        .as_deref()
        .ok_or_else(|| missing("client_ca"));
    (|| crate::server::tls::server_config(cert?, key?, ca?))().map_err(StartError::Tls)
}

fn authorizer(cfg: &Config) -> Result<Arc<Authorizer>, StartError> {
    // Fail closed: without a policy nobody would be authorised, and an
    // "allow all" default is exactly what the threat model rules out.
    let path = cfg.policy.clone().ok_or_else(|| {
        StartError::Policy(
            "policy is required (or CARDVAULT_POLICY): the file mapping principals to roles and tenants"
                .into(),
        )
    })?;
    Ok(Arc::new(
        Authorizer::from_file(path).map_err(StartError::Policy)?,
    ))
}

/// Reloads the policy on every SIGHUP; a bad file keeps the old policy.
fn reload_policy_on_sighup(auth: Arc<Authorizer>) -> tokio::task::JoinHandle<()> {
    // Installed here, before the vault says it is listening, not in the
    // task: until the handler is in place a SIGHUP takes its default
    // action and terminates the process (a test that reloaded the policy
    // right after start lost the vault that way).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tokio::spawn(async move {
        let Ok(mut hup) = hup else {
            tracing::warn!("cannot listen for SIGHUP; policy reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match auth.reload() {
                Ok(n) => tracing::info!(principals = n, "policy reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "policy reload failed; the previous policy stays in force"
                ),
            }
        }
    })
}

/// Most HTTP/2 streams (calls) one connection may have open at once. tonic
/// otherwise lifts hyper's limit entirely, and every stream is a task and a
/// buffer: one client with a valid certificate could exhaust memory.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The gRPC server builder of the vault: per-call timeout and a bound on
/// concurrent calls per connection. Shared with `cardvault-bench`'s baseline
/// server so both are set up alike; TLS, and the connection bounds and
/// idle timeout, are applied by [`crate::server::tls::incoming`]. No server
/// keepalive pings: a peer's answer to a ping would count as activity and
/// keep an idle connection open; a peer that is gone sends nothing, and
/// the idle timeout closes its connection.
pub fn grpc_server() -> Server {
    Server::builder()
        .timeout(Duration::from_secs(30))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
}

/// Hardens the process before any key is read into it: no core dumps, not
/// dumpable, and with `keys.mlock` all memory locked. With swap on (and
/// not kept away by the process's cgroup) and memory unlocked, production
/// (`production`: `serve`) refuses to start unless `keys.allow_swap` says
/// otherwise; dev mode warns. Other warnings
/// are logged: the vault still runs, but ops should know.
pub fn harden(cfg: &Config, production: bool) -> Result<(), StartError> {
    for w in crate::server::hardening::harden_process() {
        tracing::warn!("{w}");
    }
    if cfg.keys.mlock {
        crate::server::hardening::lock_memory().map_err(StartError::Hardening)?;
    }
    // The swaps table can be replaced by a stand-in (tests), which is then
    // taken as the swap this process can use, whatever its cgroup says:
    // CARDVAULT_PROC_SWAPS.
    let stand_in = std::env::var("CARDVAULT_PROC_SWAPS").ok();
    let path = stand_in
        .clone()
        .unwrap_or_else(|| crate::server::hardening::PROC_SWAPS.to_owned());
    // Without the table (not Linux, or /proc not mounted) swap cannot be
    // checked: production refuses unless memory is locked or swap allowed.
    let swaps = match std::fs::read_to_string(&path) {
        // Swap the kernel keeps this process out of (cgroup v2
        // memory.swap.max = 0) is no swap for it.
        Ok(_)
            if stand_in.is_none() && crate::server::hardening::this_cgroup_keeps_out_of_swap() =>
        {
            Vec::new()
        }
        Ok(t) => crate::server::hardening::active_swaps(&t),
        Err(e) => vec![format!("unknown: cannot read {path}: {e}")],
    };
    if let Some(w) = crate::server::hardening::swap_verdict(
        &swaps,
        cfg.keys.mlock,
        cfg.keys.allow_swap,
        production,
    )
    .map_err(StartError::Hardening)?
    {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// Runs the vault until `shutdown` resolves (the caller has called
/// [`harden`] before loading `keys`): opens the
/// store, unseals from `keys` (or starts sealed in Shamir mode), serves gRPC
/// over mTLS (plus metrics if configured), then drains in-flight calls,
/// signs a final audit checkpoint and wipes keys and CVVs. `on_ready`
/// receives the bound address (useful with port 0).
///
/// The work is split into named parts: `unseal_at_start`, the
/// `Background` tasks, `Listener::run` (the gRPC server and its
/// drain), and `wipe_on_exit`.
pub async fn serve(
    cfg: &Config,
    keys: KeySource,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let tls = tls_config(cfg)?;
    let auth = authorizer(cfg)?;
    let store = open_store(cfg).await?;
    let mut vcfg = cfg.vault_config()?;
    vcfg.seal_mode = keys.mode().to_owned();
    let vault = Arc::new(Vault::new(store.clone(), vcfg));
    unseal_at_start(&vault, keys)
        .await
        .map_err(StartError::Keys)?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| StartError::Serve(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Serve(e.to_string()))?;
    let metrics = Arc::new(crate::server::metrics::Metrics::default());
    metrics.tenant_labels.store(
        cfg.metrics.tenant_labels,
        std::sync::atomic::Ordering::Relaxed,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    let background = Background::start(cfg, &vault, &auth, &metrics, health)
        .await
        .map_err(StartError::Serve)?;

    tracing::info!(%addr, store = store.backend(), "cardvault listening");
    on_ready(addr);
    let listener = Listener {
        listener,
        tls,
        vault: vault.clone(),
        auth,
        metrics,
        health_service,
        // Connection bounds, fitted to the open files this process may
        // have (raised to its hard limit first).
        limits: cfg
            .connections
            .limits()
            .fitted(crate::server::hardening::raise_open_files()),
    };
    let result = listener.run(shutdown).await.map_err(StartError::Serve);
    background.stop();
    wipe_on_exit(&vault).await;
    result
}

/// Unseals with the key-encrypting key when there is one (dev, KEK file);
/// in Shamir mode the vault starts sealed and says what to do.
async fn unseal_at_start(vault: &Vault, keys: KeySource) -> Result<(), String> {
    match keys {
        KeySource::Dev(kek) | KeySource::KekFile(kek) => vault
            .unseal(kek)
            .await
            .map_err(|e| format!("cannot unseal: {e}")),
        KeySource::Shamir => {
            if vault.is_initialized().await.map_err(|e| e.to_string())? {
                tracing::warn!("vault is SEALED: enter key shares with `cardvault unseal`");
            } else {
                tracing::warn!(
                    "vault is not initialised: run `cardvault init --shares N --threshold M`"
                );
            }
            Ok(())
        }
    }
}

/// The tasks that run beside the gRPC server for the life of the process:
/// health that follows the seal state, the purge of expired CVVs and
/// collect session keys, periodic audit checkpoints, policy reloads on
/// SIGHUP and the metrics endpoint. Stopped together after the drain.
struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    async fn start(
        cfg: &Config,
        vault: &Arc<Vault>,
        auth: &Arc<Authorizer>,
        metrics: &Arc<crate::server::metrics::Metrics>,
        health: tonic_health::server::HealthReporter,
    ) -> Result<Background, String> {
        health
            .set_serving::<KeyServiceServer<KeyServiceImpl>>()
            .await;
        let mut tasks = vec![
            tokio::spawn(follow_seal_state(vault.clone(), health)),
            tokio::spawn(purge_expired(vault.clone())),
            tokio::spawn(checkpoint_periodically(
                vault.clone(),
                Duration::from_secs(cfg.audit.checkpoint_secs),
            )),
            reload_policy_on_sighup(auth.clone()),
        ];
        if let Some(maddr) = cfg.metrics.listen {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(|e| format!("cannot listen on {maddr} for metrics: {e}"))?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(addr = %bound, "metrics endpoint listening");
            println!("cardvault metrics on {bound}");
            tasks.push(tokio::spawn(crate::server::metrics::serve(
                l,
                metrics.clone(),
                vault.clone(),
                auth.clone(),
            )));
        }
        Ok(Background { tasks })
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// TokenService and AuditService are ready only while unsealed, so load
/// balancers and readiness probes skip a sealed replica.
async fn follow_seal_state(vault: Arc<Vault>, health: tonic_health::server::HealthReporter) {
    let mut last = None;
    loop {
        let sealed = vault.is_sealed();
        if last != Some(sealed) {
            if sealed {
                health
                    .set_not_serving::<TokenServiceServer<TokenServiceImpl>>()
                    .await;
                health
                    .set_not_serving::<AuditServiceServer<AuditServiceImpl>>()
                    .await;
            } else {
                health
                    .set_serving::<TokenServiceServer<TokenServiceImpl>>()
                    .await;
                health
                    .set_serving::<AuditServiceServer<AuditServiceImpl>>()
                    .await;
            }
            last = Some(sealed);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Expired CVVs and collect session keys are wiped promptly, not just when
/// someone asks for them.
async fn purge_expired(vault: Arc<Vault>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        vault.cvv_holder().purge_expired();
        vault.collect_sessions().purge_expired();
    }
}

/// A quiet log still gets its tail signed within `every`.
async fn checkpoint_periodically(vault: Arc<Vault>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = vault.checkpoint_now().await {
            tracing::warn!(error = %e, "periodic audit checkpoint failed");
        }
    }
}

/// The gRPC side: the services behind the metrics layer and the gate, on
/// the TLS listener with its connection bounds.
struct Listener<H> {
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    vault: Arc<Vault>,
    auth: Arc<Authorizer>,
    metrics: Arc<crate::server::metrics::Metrics>,
    health_service: tonic_health::pb::health_server::HealthServer<H>,
    limits: crate::server::tls::Limits,
}

impl<H: tonic_health::pb::health_server::Health> Listener<H> {
    /// Serves until `shutdown`, then drains in-flight calls for at most
    /// [`DRAIN_TIMEOUT`] and closes whatever connections are left.
    async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), String> {
        let Listener {
            listener,
            tls,
            vault,
            auth,
            metrics,
            health_service,
            limits,
        } = self;
        tracing::info!(
            max_connections = limits.max_connections,
            max_handshakes = limits.max_handshakes,
            idle_timeout_secs = limits.idle_timeout.as_secs(),
            "connection limits"
        );
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
        // Closes every connection still open when the drain ends.
        let close_all = tokio_util::sync::CancellationToken::new();
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
        let server = grpc_server()
            .layer(crate::server::metrics::MetricsLayer {
                metrics: metrics.clone(),
                auth: auth.clone(),
            })
            // Inside the metrics layer, so its refusals are counted too.
            .layer(crate::grpc::gate::GateLayer {
                vault: vault.clone(),
                auth: auth.clone(),
            })
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                TokenServiceServer::new(TokenServiceImpl::new(vault.clone(), auth.clone()))
                    .max_decoding_message_size(crate::grpc::gate::TOKEN_MESSAGE_LIMIT),
            )
            .add_service(
                AuditServiceServer::new(AuditServiceImpl::new(vault.clone(), auth.clone()))
                    .max_decoding_message_size(crate::grpc::gate::SMALL_MESSAGE_LIMIT),
            )
            .add_service(
                KeyServiceServer::new(KeyServiceImpl::new(vault, auth))
                    .max_decoding_message_size(crate::grpc::gate::SMALL_MESSAGE_LIMIT),
            )
            .serve_with_incoming_shutdown(
                crate::server::tls::incoming(listener, tls, metrics, limits, close_all.clone()),
                signal,
            );
        let result = tokio::select! {
            r = server => r.map_err(|e| format!("server error: {e}")),
            _ = drain_deadline => {
                tracing::warn!(timeout_secs = DRAIN_TIMEOUT.as_secs(), "drain timeout; closing remaining connections");
                Ok(())
            }
        };
        // Connections still busy after the drain are closed before the
        // keys are wiped (their tasks outlive the server future).
        close_all.cancel();
        result
    }
}

/// After the drain: the tail of the audit log is signed before the signing
/// key is wiped, the SIEM copy is completed (bounded wait), and keys, CVVs
/// and collect session keys are wiped before the store closes.
async fn wipe_on_exit(vault: &Vault) {
    if let Err(e) = vault.checkpoint_now().await {
        tracing::warn!(error = %e, "final audit checkpoint failed");
    }
    vault.close_audit_sink();
    vault.seal();
    tracing::info!("cardvault stopped; keys and CVVs wiped");
}

/// Resolves on SIGINT or SIGTERM.
///
/// The handlers are installed by this call, not when the future is first
/// polled (after the listening line is printed): a SIGTERM sent as soon
/// as the vault says it listens would otherwise meet the default action
/// and kill it without a drain. Needs the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    if let Err(e) = term.as_ref().and(int.as_ref()) {
        tracing::warn!(error = %e, "cannot install a shutdown signal handler");
    }
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {},
            _ = wait(int) => {},
        }
        tracing::info!("shutdown requested; draining in-flight calls");
    }
}
