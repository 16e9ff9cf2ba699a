//! Configuration: a TOML file, then `CARDVAULT_*` environment overrides.
//! Every setting has a safe default except the TLS files and the KEK, which
//! production must supply (dev mode generates throwaway ones).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use std::sync::Arc;

use crate::vault::VaultConfig;
use crate::vault::audit_log::AuditSink;

/// Why a configuration cannot be used. Every message names the file,
/// variable or setting at fault, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The file is not a valid configuration (TOML syntax, an unknown key,
    /// a value of the wrong type); the reason has the line.
    Parse {
        /// The file, if the text came from one.
        path: Option<PathBuf>,
        /// What is wrong, and where.
        reason: String,
    },
    /// A `CARDVAULT_*` variable holds a value that does not parse.
    Env {
        /// The variable.
        name: String,
        /// What it must be, where that is a short list.
        must: Option<&'static str>,
    },
    /// A setting is out of its range, or missing where another needs it.
    Invalid {
        /// The setting (e.g. `cvv.ttl_secs`).
        setting: String,
        /// What it must be (e.g. `must be 1 to 3600`).
        rule: String,
    },
    /// A file a setting names cannot be opened.
    File {
        /// The setting.
        setting: String,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(setting: &str, rule: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting: setting.into(),
            rule: rule.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read { path, reason } => {
                write!(f, "cannot read {}: {reason}", path.display())
            }
            ConfigError::Parse {
                path: Some(path),
                reason,
            } => write!(f, "{}: {reason}", path.display()),
            ConfigError::Parse { path: None, reason } => f.write_str(reason),
            ConfigError::Env { name, must: None } => {
                write!(f, "environment variable {name} has an invalid value")
            }
            ConfigError::Env {
                name,
                must: Some(must),
            } => write!(f, "environment variable {name} must be {must}"),
            ConfigError::Invalid { setting, rule } => write!(f, "{setting} {rule}"),
            ConfigError::File {
                setting,
                path,
                reason,
            } => write!(f, "{setting}: cannot open {}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The command line prints errors as text.
impl From<ConfigError> for String {
    fn from(e: ConfigError) -> String {
        e.to_string()
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC listener binds (`CARDVAULT_LISTEN`).
    pub listen: SocketAddr,
    /// Directory for the embedded database and dev files (`CARDVAULT_DATA_DIR`).
    pub data_dir: PathBuf,
    /// TLS files.
    pub tls: TlsConfig,
    /// Policy file mapping principals to roles and tenants (`CARDVAULT_POLICY`).
    /// Required: the vault refuses to start without one.
    pub policy: Option<PathBuf>,
    /// CVV holder limits.
    pub cvv: CvvConfig,
    /// Where the key-encrypting key comes from.
    pub keys: KeysConfig,
    /// Logging.
    pub log: LogConfig,
    /// Audit log checkpoints and SIEM copy.
    pub audit: AuditConfig,
    /// Storage backend.
    pub store: StoreConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The tokenize enumeration guard.
    pub enumeration_guard: GuardSettings,
    /// Collect sessions (sealed card collection).
    pub collect: CollectSettings,
    /// Bounds on client connections.
    pub connections: ConnectionSettings,
}

/// Bounds on client connections (see `docs/operations.md`). Lowered at
/// start to fit the process's open-file limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Most established connections (`CARDVAULT_MAX_CONNECTIONS`; default 4096).
    pub max: usize,
    /// Most TLS handshakes in progress; past it the oldest is closed
    /// (`CARDVAULT_MAX_HANDSHAKES`; default 512).
    pub max_handshakes: usize,
    /// Seconds a connection may send nothing before it is closed, 1 to
    /// 86400 (`CARDVAULT_IDLE_TIMEOUT_SECS`; default 300).
    pub idle_timeout_secs: u64,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        let d = crate::server::tls::Limits::default();
        ConnectionSettings {
            max: d.max_connections,
            max_handshakes: d.max_handshakes,
            idle_timeout_secs: d.idle_timeout.as_secs(),
        }
    }
}

impl ConnectionSettings {
    /// The limits these settings name (before fitting them to the
    /// open-file limit).
    pub fn limits(&self) -> crate::server::tls::Limits {
        crate::server::tls::Limits {
            max_connections: self.max,
            max_handshakes: self.max_handshakes,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }
}

/// Collect sessions (see `docs/collect.md`): memory-only HPKE keys that
/// checkout pages seal cards to.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectSettings {
    /// Life of a session the caller names none for, 1 to 1800 seconds (default 600).
    pub session_ttl_secs: u64,
    /// Most sessions held at once (default 100000).
    pub max_sessions: usize,
    /// Most sessions of one tenant (default 20000).
    pub max_per_tenant: usize,
}

impl Default for CollectSettings {
    fn default() -> Self {
        let d = crate::vault::collect::CollectConfig::default();
        CollectSettings {
            session_ttl_secs: d.default_ttl.as_secs(),
            max_sessions: d.max_sessions,
            max_per_tenant: d.max_per_tenant,
        }
    }
}

/// The enumeration guard (see `docs/security.md`): per tenant, the distinct
/// cards tokenized per bucket of visible digits (first six or four, last
/// four, length) are counted in a window; past the threshold the bucket is
/// locked for the rest of the window.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardSettings {
    /// Window length in seconds, 60 to 604800 (`CARDVAULT_GUARD_WINDOW_SECS`; default 3600).
    pub window_secs: u64,
    /// Distinct cards per bucket and window, 1 to 64 (`CARDVAULT_GUARD_THRESHOLD`; default 8).
    pub threshold: u32,
}

impl Default for GuardSettings {
    fn default() -> Self {
        let d = crate::vault::guard::GuardConfig::default();
        GuardSettings {
            window_secs: d.window.as_secs(),
            threshold: d.threshold,
        }
    }
}

/// Prometheus metrics endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP `/metrics` endpoint, e.g. `127.0.0.1:9464`
    /// (`CARDVAULT_METRICS_LISTEN`); unset = off. It carries no secrets but
    /// should still only be reachable by the monitoring system.
    pub listen: Option<SocketAddr>,
    /// Label per-tenant gauges with the tenant's name
    /// (`CARDVAULT_METRICS_TENANT_LABELS`; default false: tenant names are
    /// customer names, and the gauges are summed up instead).
    pub tenant_labels: bool,
}

/// Which database holds records, keys and the audit log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded sled in `<data_dir>/sled` (one node).
    #[default]
    Sled,
    /// PostgreSQL (many stateless replicas on one database).
    Postgres,
}

/// Storage settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sled` or `postgres` (`CARDVAULT_STORE_BACKEND`).
    pub backend: Backend,
    /// PostgreSQL connection string, e.g. `host=db user=cardvault dbname=cardvault`
    /// or `postgresql://cardvault@db/cardvault` (`CARDVAULT_STORE_URL`).
    /// Prefer a password file or client certificates to a password in here.
    pub url: Option<String>,
    /// Connections in the pool (`CARDVAULT_STORE_POOL_SIZE`).
    pub pool_size: usize,
    /// CA certificate (PEM) for TLS to PostgreSQL; when set, TLS is
    /// required and the server certificate is verified (`CARDVAULT_STORE_TLS_CA`).
    pub tls_ca: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sled,
            url: None,
            pool_size: 16,
            tls_ca: None,
        }
    }
}

/// Audit settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Sign a checkpoint every this many records (`CARDVAULT_AUDIT_CHECKPOINT_EVERY`).
    pub checkpoint_every: u64,
    /// Also sign one every this many seconds if records were added (`CARDVAULT_AUDIT_CHECKPOINT_SECS`).
    pub checkpoint_secs: u64,
    /// Append every record as a JSON line to this file, or `-` for stdout
    /// (`CARDVAULT_AUDIT_SIEM_FILE`). Off by default.
    pub siem_file: Option<PathBuf>,
    /// This replica's name in every audit record it writes
    /// (`CARDVAULT_AUDIT_REPLICA_ID`; default: the host name, which is
    /// the pod name under Kubernetes).
    pub replica_id: Option<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_every: 1000,
            checkpoint_secs: 60,
            siem_file: None,
            replica_id: None,
        }
    }
}

/// Server certificate, key and the CA that signs client certificates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM server certificate chain (`CARDVAULT_TLS_CERT`).
    pub cert: Option<PathBuf>,
    /// PEM server private key (`CARDVAULT_TLS_KEY`).
    pub key: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to (`CARDVAULT_TLS_CLIENT_CA`).
    pub client_ca: Option<PathBuf>,
}

/// CVV holder limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CvvConfig {
    /// Seconds a CVV stays readable, 1-3600 (`CARDVAULT_CVV_TTL_SECS`).
    pub ttl_secs: u64,
    /// Most CVVs held at once (`CARDVAULT_CVV_MAX_ENTRIES`).
    pub max_entries: usize,
    /// Most CVVs held at once for one tenant (`CARDVAULT_CVV_MAX_PER_TENANT`;
    /// default 50,000; more than `max_entries` means no separate limit), so one tenant's traffic
    /// cannot fill the holder for the others.
    pub max_per_tenant: usize,
}

impl Default for CvvConfig {
    fn default() -> Self {
        CvvConfig {
            ttl_secs: 300,
            max_entries: 100_000,
            max_per_tenant: 50_000,
        }
    }
}

/// Source of the key-encrypting key and data key rotation limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// File holding the KEK as 64 hex characters (`CARDVAULT_KEK_FILE`).
    /// With neither this nor `CARDVAULT_KEK`, the vault starts sealed and is
    /// unsealed with Shamir key shares (`cardvault init` / `cardvault unseal`).
    pub kek_file: Option<PathBuf>,
    /// Rotate a tenant's data key after this many encryptions
    /// (`CARDVAULT_DEK_MAX_ENCRYPTIONS`; default 2^30, far below the 2^32
    /// random-nonce limit of AES-GCM).
    pub dek_max_encryptions: u64,
    /// Rotate a tenant's data key after this many days (cryptoperiod,
    /// `CARDVAULT_DEK_MAX_AGE_DAYS`).
    pub dek_max_age_days: u64,
    /// Pause between rewrap pages of 500 records, ms (`CARDVAULT_REWRAP_PAUSE_MS`),
    /// to keep a rewrap from competing with live traffic.
    pub rewrap_pause_ms: u64,
    /// Seconds after a data key version stops being active before it may be
    /// retired (`CARDVAULT_RETIRE_GRACE_SECS`; default 60): requests and
    /// replicas that loaded the keys before the rotation may still write
    /// with it.
    pub retire_grace_secs: u64,
    /// Lock the process memory (`mlockall`) so keys never reach swap
    /// (`CARDVAULT_MLOCK`); needs CAP_IPC_LOCK or a high RLIMIT_MEMLOCK.
    pub mlock: bool,
    /// Start in production with swap on and memory unlocked
    /// (`CARDVAULT_ALLOW_SWAP`; default false: `serve` refuses, since
    /// secrets in memory could be written to swap).
    pub allow_swap: bool,
    /// Seconds a rekey may take from its start to its last share, 60 to
    /// 86400 (`CARDVAULT_REKEY_TIMEOUT_SECS`; default 900).
    pub rekey_timeout_secs: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            kek_file: None,
            dek_max_encryptions: 1 << 30,
            dek_max_age_days: 365,
            rewrap_pause_ms: 0,
            retire_grace_secs: crate::vault::DEFAULT_RETIRE_GRACE.as_secs(),
            mlock: false,
            allow_swap: false,
            rekey_timeout_secs: crate::vault::custody::DEFAULT_REKEY_TIMEOUT.as_secs(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json` (`CARDVAULT_LOG_FORMAT`).
    pub format: LogFormat,
    /// tracing filter, e.g. `info,cardvault=debug` (`CARDVAULT_LOG`).
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7443".parse().expect("valid default address"),
            data_dir: PathBuf::from("./cardvault-data"),
            tls: TlsConfig::default(),
            policy: None,
            cvv: CvvConfig::default(),
            keys: KeysConfig::default(),
            log: LogConfig::default(),
            audit: AuditConfig::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
            enumeration_guard: GuardSettings::default(),
            collect: CollectSettings::default(),
            connections: ConnectionSettings::default(),
        }
    }
}

fn env_parse<T: std::str::FromStr>(
    name: &str,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<T>, ConfigError> {
    match get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ConfigError::Env {
            name: name.to_owned(),
            must: None,
        }),
    }
}

impl Config {
    /// Reads `path` (if given), applies environment overrides, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.to_path_buf(),
                    reason: e.to_string(),
                })?;
                Config::from_toml(&text).map_err(|e| match e {
                    ConfigError::Parse { reason, .. } => ConfigError::Parse {
                        path: Some(p.to_path_buf()),
                        reason,
                    },
                    other => other,
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(&|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment, no validation).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            reason: e.to_string(),
        })
    }

    /// Applies `CARDVAULT_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env_parse("CARDVAULT_LISTEN", get)? {
            self.listen = v;
        }
        if let Some(v) = get("CARDVAULT_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("CARDVAULT_TLS_CERT") {
            self.tls.cert = Some(v.into());
        }
        if let Some(v) = get("CARDVAULT_TLS_KEY") {
            self.tls.key = Some(v.into());
        }
        if let Some(v) = get("CARDVAULT_TLS_CLIENT_CA") {
            self.tls.client_ca = Some(v.into());
        }
        if let Some(v) = get("CARDVAULT_POLICY") {
            self.policy = Some(v.into());
        }
        if let Some(v) = env_parse("CARDVAULT_CVV_TTL_SECS", get)? {
            self.cvv.ttl_secs = v;
        }
        if let Some(v) = env_parse("CARDVAULT_CVV_MAX_ENTRIES", get)? {
            self.cvv.max_entries = v;
        }
        if let Some(v) = env_parse("CARDVAULT_CVV_MAX_PER_TENANT", get)? {
            self.cvv.max_per_tenant = v;
        }
        if let Some(v) = env_parse("CARDVAULT_DEK_MAX_ENCRYPTIONS", get)? {
            self.keys.dek_max_encryptions = v;
        }
        if let Some(v) = env_parse("CARDVAULT_DEK_MAX_AGE_DAYS", get)? {
            self.keys.dek_max_age_days = v;
        }
        if let Some(v) = env_parse("CARDVAULT_REWRAP_PAUSE_MS", get)? {
            self.keys.rewrap_pause_ms = v;
        }
        if let Some(v) = env_parse("CARDVAULT_RETIRE_GRACE_SECS", get)? {
            self.keys.retire_grace_secs = v;
        }
        if let Some(v) = env_parse("CARDVAULT_GUARD_WINDOW_SECS", get)? {
            self.enumeration_guard.window_secs = v;
        }
        if let Some(v) = env_parse("CARDVAULT_GUARD_THRESHOLD", get)? {
            self.enumeration_guard.threshold = v;
        }
        if let Some(v) = env_parse("CARDVAULT_REKEY_TIMEOUT_SECS", get)? {
            self.keys.rekey_timeout_secs = v;
        }
        if let Some(v) = env_parse("CARDVAULT_MLOCK", get)? {
            self.keys.mlock = v;
        }
        if let Some(v) = env_parse("CARDVAULT_METRICS_TENANT_LABELS", get)? {
            self.metrics.tenant_labels = v;
        }
        if let Some(v) = env_parse("CARDVAULT_ALLOW_SWAP", get)? {
            self.keys.allow_swap = v;
        }
        if let Some(v) = env_parse("CARDVAULT_MAX_CONNECTIONS", get)? {
            self.connections.max = v;
        }
        if let Some(v) = env_parse("CARDVAULT_MAX_HANDSHAKES", get)? {
            self.connections.max_handshakes = v;
        }
        if let Some(v) = env_parse("CARDVAULT_IDLE_TIMEOUT_SECS", get)? {
            self.connections.idle_timeout_secs = v;
        }
        if let Some(v) = get("CARDVAULT_KEK_FILE") {
            self.keys.kek_file = Some(v.into());
        }
        if let Some(v) = get("CARDVAULT_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "CARDVAULT_LOG_FORMAT".into(),
                        must: Some("text or json"),
                    });
                }
            };
        }
        if let Some(v) = env_parse("CARDVAULT_AUDIT_CHECKPOINT_EVERY", get)? {
            self.audit.checkpoint_every = v;
        }
        if let Some(v) = env_parse("CARDVAULT_AUDIT_CHECKPOINT_SECS", get)? {
            self.audit.checkpoint_secs = v;
        }
        if let Some(v) = get("CARDVAULT_AUDIT_SIEM_FILE") {
            self.audit.siem_file = Some(v.into());
        }
        if let Some(v) = get("CARDVAULT_AUDIT_REPLICA_ID") {
            self.audit.replica_id = Some(v);
        }
        if let Some(v) = get("CARDVAULT_STORE_BACKEND") {
            self.store.backend = match v.as_str() {
                "sled" => Backend::Sled,
                "postgres" => Backend::Postgres,
                _ => {
                    return Err(ConfigError::Env {
                        name: "CARDVAULT_STORE_BACKEND".into(),
                        must: Some("sled or postgres"),
                    });
                }
            };
        }
        if let Some(v) = get("CARDVAULT_STORE_URL") {
            self.store.url = Some(v);
        }
        if let Some(v) = env_parse("CARDVAULT_STORE_POOL_SIZE", get)? {
            self.store.pool_size = v;
        }
        if let Some(v) = get("CARDVAULT_STORE_TLS_CA") {
            self.store.tls_ca = Some(v.into());
        }
        if let Some(v) = env_parse("CARDVAULT_METRICS_LISTEN", get)? {
            self.metrics.listen = Some(v);
        }
        if let Some(v) = get("CARDVAULT_LOG") {
            self.log.filter = v;
        }
        Ok(())
    }

    /// The name this replica writes into audit records: `audit.replica_id`,
    /// else the host name (checked like the setting; a host name that
    /// fails the check, or none, leaves records unnamed).
    pub fn replica_id(&self) -> String {
        if let Some(id) = &self.audit.replica_id {
            return id.clone();
        }
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        match crate::fields::check_free_text("host name", &host, 64) {
            Ok(()) => host,
            Err(_) => String::new(),
        }
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=3600).contains(&self.cvv.ttl_secs) {
            return Err(ConfigError::invalid("cvv.ttl_secs", "must be 1 to 3600"));
        }
        if self.keys.dek_max_encryptions == 0 || self.keys.dek_max_encryptions > 1 << 32 {
            return Err(ConfigError::invalid(
                "keys.dek_max_encryptions",
                "must be 1 to 2^32",
            ));
        }
        if self.keys.dek_max_age_days == 0 {
            return Err(ConfigError::invalid(
                "keys.dek_max_age_days",
                "must be at least 1",
            ));
        }
        if self.audit.checkpoint_every == 0 || self.audit.checkpoint_secs == 0 {
            return Err(ConfigError::invalid(
                "audit.checkpoint_every and audit.checkpoint_secs",
                "must be at least 1",
            ));
        }
        if let Some(id) = &self.audit.replica_id
            && (id.is_empty()
                || crate::fields::check_free_text("audit.replica_id", id, 64).is_err())
        {
            return Err(ConfigError::invalid(
                "audit.replica_id",
                "must be 1 to 64 characters, no control characters and no card number",
            ));
        }
        if self.store.backend == Backend::Postgres && self.store.url.is_none() {
            return Err(ConfigError::invalid(
                "store.url",
                "is required with store.backend = \"postgres\"",
            ));
        }
        if !(1..=1000).contains(&self.store.pool_size) {
            return Err(ConfigError::invalid("store.pool_size", "must be 1 to 1000"));
        }
        if self.cvv.max_entries == 0 {
            return Err(ConfigError::invalid(
                "cvv.max_entries",
                "must be at least 1",
            ));
        }
        if self.cvv.max_per_tenant == 0 {
            return Err(ConfigError::invalid(
                "cvv.max_per_tenant",
                "must be at least 1",
            ));
        }
        // A window shorter than a minute or a threshold past 64 gives an
        // attacker guesses faster than the documented cost; a week-long
        // lock is the most an honest customer should ever wait out.
        if !(60..=7 * 86_400).contains(&self.enumeration_guard.window_secs) {
            return Err(ConfigError::invalid(
                "enumeration_guard.window_secs",
                "must be 60 to 604800",
            ));
        }
        if !(60..=86_400).contains(&self.keys.rekey_timeout_secs) {
            return Err(ConfigError::invalid(
                "keys.rekey_timeout_secs",
                "must be 60 to 86400",
            ));
        }
        if !(1..=64).contains(&self.enumeration_guard.threshold) {
            return Err(ConfigError::invalid(
                "enumeration_guard.threshold",
                "must be 1 to 64",
            ));
        }
        let max_ttl = crate::vault::collect::MAX_SESSION_TTL.as_secs();
        if !(1..=max_ttl).contains(&self.collect.session_ttl_secs) {
            return Err(ConfigError::invalid(
                "collect.session_ttl_secs",
                format!("must be 1 to {max_ttl}"),
            ));
        }
        if self.connections.max == 0 || self.connections.max_handshakes == 0 {
            return Err(ConfigError::invalid(
                "connections.max and connections.max_handshakes",
                "must be at least 1",
            ));
        }
        if !(1..=86_400).contains(&self.connections.idle_timeout_secs) {
            return Err(ConfigError::invalid(
                "connections.idle_timeout_secs",
                "must be 1 to 86400",
            ));
        }
        if self.collect.max_sessions == 0 || self.collect.max_per_tenant == 0 {
            return Err(ConfigError::invalid(
                "collect.max_sessions and collect.max_per_tenant",
                "must be at least 1",
            ));
        }
        // Upper bounds: past them a duration overflows a timer (a panic in
        // a background task, e.g. no more periodic checkpoints) or the
        // value is a typo rather than a policy.
        const DAY: u64 = 86_400;
        for (name, value, max) in [
            ("audit.checkpoint_secs", self.audit.checkpoint_secs, DAY),
            (
                "keys.retire_grace_secs",
                self.keys.retire_grace_secs,
                3650 * DAY,
            ),
            ("keys.dek_max_age_days", self.keys.dek_max_age_days, 3650),
            ("keys.rewrap_pause_ms", self.keys.rewrap_pause_ms, 60_000),
        ] {
            if value > max {
                return Err(ConfigError::invalid(name, format!("must be at most {max}")));
            }
        }
        Ok(())
    }

    /// The vault tunables this configuration implies (opens the SIEM file).
    pub fn vault_config(&self) -> Result<VaultConfig, ConfigError> {
        let audit_sink = match &self.audit.siem_file {
            None => None,
            Some(p) if p.as_os_str() == "-" => {
                Some(Arc::new(AuditSink::new(Box::new(std::io::stdout()))))
            }
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| ConfigError::File {
                        setting: "audit.siem_file".into(),
                        path: p.clone(),
                        reason: e.to_string(),
                    })?;
                Some(Arc::new(AuditSink::new(Box::new(f))))
            }
        };
        Ok(VaultConfig {
            replica: self.replica_id(),
            cvv_ttl: Duration::from_secs(self.cvv.ttl_secs),
            cvv_max_entries: self.cvv.max_entries,
            // Past the holder's own size it is no limit.
            cvv_max_per_tenant: self.cvv.max_per_tenant.min(self.cvv.max_entries),
            checkpoint_every: self.audit.checkpoint_every,
            audit_sink,
            dek_max_encryptions: self.keys.dek_max_encryptions,
            dek_max_age_ms: (self.keys.dek_max_age_days as i64).saturating_mul(86_400_000),
            seal_mode: "kek-file".into(),
            rewrap_pause: Duration::from_millis(self.keys.rewrap_pause_ms),
            retire_grace: Duration::from_secs(self.keys.retire_grace_secs),
            guard: crate::vault::guard::GuardConfig {
                window: Duration::from_secs(self.enumeration_guard.window_secs),
                threshold: self.enumeration_guard.threshold,
            },
            rekey_timeout: Duration::from_secs(self.keys.rekey_timeout_secs),
            collect: crate::vault::collect::CollectConfig {
                default_ttl: Duration::from_secs(self.collect.session_ttl_secs),
                max_sessions: self.collect.max_sessions,
                max_per_tenant: self.collect.max_per_tenant.min(self.collect.max_sessions),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn toml_then_env() {
        let mut cfg = Config::from_toml(
            r#"
            listen = "0.0.0.0:9000"
            data_dir = "/var/lib/cardvault"
            [cvv]
            ttl_secs = 60
            [log]
            format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.cvv.ttl_secs, 60);
        assert_eq!(cfg.cvv.max_entries, 100_000);
        assert_eq!(cfg.log.format, LogFormat::Json);
        let env: HashMap<&str, &str> = [
            ("CARDVAULT_CVV_TTL_SECS", "30"),
            ("CARDVAULT_LISTEN", "127.0.0.1:1"),
        ]
        .into();
        cfg.apply_env(&|k| env.get(k).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(cfg.cvv.ttl_secs, 30);
        assert_eq!(cfg.listen.port(), 1);
        cfg.validate().unwrap();
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::from_toml("unknown_key = 1").is_err());
        let mut cfg = Config::default();
        cfg.cvv.ttl_secs = 7200;
        assert!(cfg.validate().is_err());
        for (edit, field) in [
            (
                (|c: &mut Config| c.audit.checkpoint_secs = u64::MAX) as fn(&mut Config),
                "audit.checkpoint_secs",
            ),
            (|c| c.store.pool_size = 1 << 40, "store.pool_size"),
            (
                |c| c.keys.retire_grace_secs = u64::MAX,
                "keys.retire_grace_secs",
            ),
            (
                |c| c.keys.rewrap_pause_ms = u64::MAX,
                "keys.rewrap_pause_ms",
            ),
            (
                |c| c.keys.rekey_timeout_secs = 59,
                "keys.rekey_timeout_secs",
            ),
            (
                |c| c.enumeration_guard.window_secs = 59,
                "enumeration_guard.window_secs",
            ),
            (
                |c| c.enumeration_guard.threshold = 0,
                "enumeration_guard.threshold",
            ),
            (
                |c| c.enumeration_guard.threshold = 65,
                "enumeration_guard.threshold",
            ),
            (|c| c.cvv.max_per_tenant = 0, "cvv.max_per_tenant"),
            (
                |c| c.audit.replica_id = Some(String::new()),
                "audit.replica_id",
            ),
            (
                |c| c.audit.replica_id = Some("r".repeat(65)),
                "audit.replica_id",
            ),
            (
                |c| c.audit.replica_id = Some("a\nb".into()),
                "audit.replica_id",
            ),
            (
                |c| c.audit.replica_id = Some("node-4111111111111111".into()),
                "audit.replica_id",
            ),
        ] {
            let mut c = Config::default();
            edit(&mut c);
            let err = c.validate().unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { setting, .. } if setting.starts_with(field)),
                "{err}"
            );
        }
        // The replica's name: the setting, else the host name.
        let mut c = Config::default();
        let host = c.replica_id();
        assert!(!host.is_empty(), "the host name names the replica");
        c.apply_env(&|k: &str| (k == "CARDVAULT_AUDIT_REPLICA_ID").then(|| "vault-7".to_owned()))
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.vault_config().unwrap().replica, "vault-7");
        // The guard and the quotas take their settings from the file and
        // the environment, and pass them to the vault.
        let mut c = Config::from_toml(
            "[enumeration_guard]\nwindow_secs = 600\nthreshold = 4\n[cvv]\nmax_entries = 10\nmax_per_tenant = 50",
        )
        .unwrap();
        let env: HashMap<&str, &str> = [("CARDVAULT_GUARD_THRESHOLD", "5")].into();
        c.apply_env(&|k| env.get(k).map(|v| v.to_string())).unwrap();
        c.validate().unwrap();
        let v = c.vault_config().unwrap();
        assert_eq!(v.guard.window, std::time::Duration::from_secs(600));
        assert_eq!(v.guard.threshold, 5);
        assert_eq!(v.cvv_max_per_tenant, 10, "clamped to the holder's size");
        let env: HashMap<&str, &str> = [("CARDVAULT_CVV_TTL_SECS", "soon")].into();
        assert!(
            cfg.apply_env(&|k| env.get(k).map(|v| v.to_string()))
                .is_err()
        );
    }
}
