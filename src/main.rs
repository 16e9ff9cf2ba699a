//! The `cardvault` binary: the server (`serve`, `dev`) and client
//! subcommands for operators and testing.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cardvault::card::YearMonth;
use cardvault::cli::{self, ClientOpts};
use cardvault::config::{Config, LogFormat};
use cardvault::pki::{DEV_CLIENTS, dev_principal, ensure_dev_pki};
use cardvault::server;

/// mimalloc instead of glibc malloc: the request path makes many small,
/// short-lived allocations across threads, and profiling detokenize showed
/// ~14% of server CPU in glibc's `_int_malloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tokenised card vault.
#[derive(Parser)]
#[command(name = "cardvault", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Subcommand)]
enum Command {
    /// Run the vault in development mode: throwaway CA and certificates, a
    /// KEK stored in the data directory (INSECURE), sled storage.
    Dev {
        /// Data directory (certificates, dev KEK, database).
        #[arg(long, default_value = cli::DEFAULT_DEV_DIR)]
        data_dir: PathBuf,
        /// Listen address (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Optional config file for other settings (CVV TTL, logging).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the vault in production mode from a config file.
    Serve {
        /// TOML configuration file (settings can be overridden by CARDVAULT_* variables).
        #[arg(long, env = "CARDVAULT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Tokenize a card (role: merchant).
    Tokenize(cli::token::TokenizeCmd),
    /// Detokenize a token (role: processor).
    Detokenize(cli::token::DetokenizeCmd),
    /// Show a token's non-sensitive metadata.
    Metadata(cli::token::TokenCmd),
    /// Delete (redact) a token.
    Delete(cli::token::TokenCmd),
    /// Query and verify the audit log (role: auditor).
    #[command(subcommand)]
    Audit(cli::audit::AuditCmd),
    /// Seal state and key versions (role: admin).
    Status,
    /// gRPC health of a service; exits non-zero unless SERVING (probes).
    Health {
        /// Service name; TokenService is not serving while sealed.
        #[arg(long, default_value = "cardvault.v1.TokenService")]
        service: String,
    },
    /// Create the master key and split it into key shares, one per named
    /// custodian, each encrypted to the custodian's age key (role: admin).
    Init(cli::keys::InitCmd),
    /// Enter your key share (role: custodian).
    Unseal(cli::keys::UnsealCmd),
    /// Master key rotation with a quorum of custodians: start (admin),
    /// submit (custodian), cancel.
    #[command(subcommand)]
    Rekey(cli::keys::RekeyCmd),
    /// Write the current encrypted key shares out again (role: admin).
    Shares {
        /// Directory to write them to.
        #[arg(long, default_value = "./cardvault-shares")]
        out_dir: PathBuf,
    },
    /// Wipe all keys from memory (role: admin).
    Seal,
    /// Rotate, rewrap and retire keys (role: admin).
    #[command(subcommand)]
    Keys(cli::keys::KeysCmd),
    /// Load-test a running vault over gRPC + mTLS (optionally against a
    /// no-op baseline server in the same run).
    Bench(cli::bench::BenchCmd),
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // tokio-postgres logs every statement's parameters at debug: record
        // envelopes and wrapped keys. Capped whatever the filter says.
        .add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    // Colours only for a person at a terminal, and never with NO_COLOR
    // (no-color.org): escape codes in a log file or journal are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn print_dev_banner(data_dir: &std::path::Path, addr: SocketAddr) {
    let certs = data_dir.join("certs");
    let c = certs.display();
    let exp_year = YearMonth::now_utc().year + 3;
    let port = addr.port();
    let mut flags = String::new();
    if port != 7443 {
        flags.push_str(&format!(" --addr https://localhost:{port}"));
    }
    if data_dir != std::path::Path::new(cli::DEFAULT_DEV_DIR) {
        flags.push_str(&format!(" --dev-dir {}", data_dir.display()));
    }
    // The binary as it can be run from here: a newcomer who started the
    // vault with `cargo run` has no `cardvault` on PATH.
    let exe = std::env::current_exe()
        .ok()
        .map(|p| {
            let cwd = std::env::current_dir().unwrap_or_default();
            match p.strip_prefix(&cwd) {
                Ok(rel) => format!("./{}", rel.display()),
                Err(_) => p.display().to_string(),
            }
        })
        .unwrap_or_else(|| "cardvault".into());
    println!(
        "\n=== cardvault DEV MODE: INSECURE ===\n\
         The key-encrypting key is stored in {kek}. Anyone who can read that\n\
         directory can decrypt every card. Never use dev mode for real cards.\n\n\
         Client certificates in {c}, with roles from {policy}:",
        policy = data_dir.join("policy.toml").display(),
        kek = data_dir.join("dev-kek.hex").display()
    );
    for client in DEV_CLIENTS {
        println!(
            "  {:<16} {}  ({}.pem / {}.key)",
            client.name,
            dev_principal(client),
            client.name,
            client.name
        );
    }
    println!(
        "\nTry it from another terminal in this directory (the token is in the first command's output):\n\
         \x20 {exe}{flags} tokenize --pan-stdin --exp 12/{exp_year}   (then type a test card number, e.g. Visa's)\n\
         \x20 {exe}{flags} metadata <token>\n\
         \x20 {exe}{flags} detokenize <token> --purpose authorization --include-cvv\n\
         \x20 {exe}{flags} audit query --action Detokenize\n\
         \x20 {exe}{flags} status\n\
         (`cargo run --release --` works in place of {exe} too)\n\n\
         With grpcurl:\n\
         \x20 grpcurl -cacert {c}/ca.pem -cert {c}/merchant.pem -key {c}/merchant.key \\\n\
         \x20   -d '{{\"tenant\":\"demo\",\"pan\":\"<test card number>\",\"exp_month\":12,\"exp_year\":{exp_year},\"cvv\":\"123\"}}' \\\n\
         \x20   localhost:{port} cardvault.v1.TokenService/Tokenize\n\
         \x20 grpcurl -cacert {c}/ca.pem -cert {c}/processor.pem -key {c}/processor.key \\\n\
         \x20   -d '{{\"tenant\":\"demo\",\"token\":\"<token>\",\"purpose\":\"authorization\",\"include_cvv\":true}}' \\\n\
         \x20   localhost:{port} cardvault.v1.TokenService/Detokenize\n\
         \x20 grpcurl -cacert {c}/ca.pem -cert {c}/merchant.pem -key {c}/merchant.key localhost:{port} list\n"
    );
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Dev {
            data_dir,
            listen,
            config,
        } => {
            // --dev-dir is the client commands' name for this directory; on
            // `dev` it used to be accepted and ignored.
            if cli.client.dev_dir != std::path::Path::new(cli::DEFAULT_DEV_DIR) {
                return Err(format!(
                    "`cardvault dev` names its directory with --data-dir (--dev-dir is for the client commands): cardvault dev --data-dir {}",
                    cli.client.dev_dir.display()
                ));
            }
            let mut cfg = Config::load(config.as_deref())?;
            cfg.data_dir = data_dir.clone();
            cfg.listen = listen;
            let pki = ensure_dev_pki(&data_dir.join("certs"))?;
            cfg.tls.cert = Some(pki.server_cert());
            cfg.tls.key = Some(pki.server_key());
            cfg.tls.client_ca = Some(pki.ca());
            let policy = data_dir.join("policy.toml");
            if !policy.exists() {
                std::fs::write(&policy, cardvault::pki::dev_policy_toml())
                    .map_err(|e| format!("cannot write {}: {e}", policy.display()))?;
            }
            cfg.policy = Some(policy);
            init_logging(&cfg);
            server::harden(&cfg, false)?;
            let kek = server::dev_kek(&data_dir)?;
            tracing::warn!(
                "DEV MODE: the key-encrypting key is stored unprotected in the data directory"
            );
            server::serve(
                &cfg,
                server::KeySource::Dev(kek),
                |addr| {
                    print_dev_banner(&data_dir, addr);
                    // Tests and scripts wait for this exact line.
                    println!("cardvault listening on {addr}");
                },
                server::shutdown_signal(),
            )
            .await
            .map_err(String::from)
        }
        Command::Serve { config } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(&cfg);
            server::harden(&cfg, true)?;
            let keys = server::load_kek(&cfg)?;
            server::serve(
                &cfg,
                keys,
                |addr| println!("cardvault listening on {addr}"),
                server::shutdown_signal(),
            )
            .await
            .map_err(String::from)
        }
        Command::Tokenize(cmd) => cli::token::tokenize(&cli.client, cmd).await,
        Command::Detokenize(cmd) => cli::token::detokenize(&cli.client, cmd).await,
        Command::Metadata(cmd) => cli::token::metadata(&cli.client, cmd).await,
        Command::Delete(cmd) => cli::token::delete(&cli.client, cmd).await,
        Command::Audit(cmd) => cli::audit::run(&cli.client, cmd).await,
        Command::Status => cli::keys::status(&cli.client).await,
        Command::Health { service } => cli::health(&cli.client, service).await,
        Command::Init(cmd) => cli::keys::init(&cli.client, cmd).await,
        Command::Unseal(cmd) => cli::keys::unseal(&cli.client, cmd).await,
        Command::Rekey(cmd) => cli::keys::rekey(&cli.client, cmd).await,
        Command::Shares { out_dir } => cli::keys::shares(&cli.client, &out_dir).await,
        Command::Seal => cli::keys::seal(&cli.client).await,
        Command::Keys(cmd) => cli::keys::keys(&cli.client, cmd).await,
        Command::Bench(cmd) => cli::bench::run(&cli.client, cmd).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardvault: {e}");
            ExitCode::FAILURE
        }
    }
}
