//! Command-line clients: thin gRPC callers used by operators and by people
//! trying the vault out. They hold no key and do nothing the API does not.

pub mod audit;
pub mod keys;
pub mod token;

use std::path::PathBuf;

use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::proto::token_service_client::TokenServiceClient;

/// Where `cardvault dev` keeps its files, and the client commands look.
pub const DEFAULT_DEV_DIR: &str = "./cardvault-dev";

/// How a CLI command reaches the vault.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Vault address.
    #[arg(
        long,
        env = "CARDVAULT_ADDR",
        default_value = "https://localhost:7443",
        global = true
    )]
    pub addr: String,
    /// CA certificate that signed the server certificate (PEM).
    #[arg(long, env = "CARDVAULT_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "CARDVAULT_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CARDVAULT_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Dev-mode data directory; certificates default to `<dev-dir>/certs`.
    #[arg(long, default_value = DEFAULT_DEV_DIR, global = true)]
    pub dev_dir: PathBuf,
    /// TLS server name to verify (default: the host of --addr).
    #[arg(long, env = "CARDVAULT_SERVER_NAME", global = true)]
    pub server_name: Option<String>,
    /// Dev identity to use when --cert/--key are not given (merchant,
    /// processor, admin, auditor, other-merchant, other-processor).
    #[arg(long = "as", global = true)]
    pub identity: Option<String>,
}

impl ClientOpts {
    /// Connects with mTLS. `default_identity` is the dev certificate used
    /// when neither `--cert` nor `--as` is given.
    pub async fn connect(&self, default_identity: &str) -> Result<Channel, String> {
        // The vault speaks only TLS: say so before tonic says "transport error".
        match self.addr.split_once("://") {
            Some(("https", _)) => {}
            Some(("http", rest)) => {
                return Err(format!(
                    "--addr {}: the vault speaks only TLS; use https://{rest}",
                    self.addr
                ));
            }
            _ => {
                return Err(format!(
                    "--addr {}: give a URL, e.g. https://{}",
                    self.addr,
                    self.addr.rsplit("://").next().unwrap_or_default()
                ));
            }
        }
        let certs = self.dev_dir.join("certs");
        let name = self.identity.as_deref().unwrap_or(default_identity);
        let ca = self.ca.clone().unwrap_or_else(|| certs.join("ca.pem"));
        let cert = self
            .cert
            .clone()
            .unwrap_or_else(|| certs.join(format!("{name}.pem")));
        let key = self
            .key
            .clone()
            .unwrap_or_else(|| certs.join(format!("{name}.key")));
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let server_name = match &self.server_name {
            Some(n) => n.clone(),
            None => self
                .addr
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned))
                .unwrap_or_else(|| "localhost".into()),
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca)?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?))
            .domain_name(server_name);
        Channel::from_shared(self.addr.clone())
            .map_err(|e| format!("bad --addr: {e}"))?
            .tls_config(tls)
            .map_err(|e| format!("TLS: {e}"))?
            .connect()
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to {}: {}",
                    self.addr,
                    crate::error::with_causes(&e)
                )
            })
    }

    /// A `TokenService` client.
    pub async fn token_client(
        &self,
        default_identity: &str,
    ) -> Result<TokenServiceClient<Channel>, String> {
        Ok(TokenServiceClient::new(
            self.connect(default_identity).await?,
        ))
    }
}

/// `cardvault health`: asks the gRPC health service about `service` and
/// exits non-zero unless it is SERVING (for exec readiness probes, which
/// can present the client certificate the port requires).
pub async fn health(opts: &ClientOpts, service: String) -> Result<(), String> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let mut client =
        tonic_health::pb::health_client::HealthClient::new(opts.connect("admin").await?);
    let r = client
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    println!("{service}: {}", status.as_str_name());
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("{service} is {}", status.as_str_name()))
    }
}

/// Renders a gRPC error for a terminal: code and message (never a secret:
/// server messages are built not to contain any).
pub fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}
