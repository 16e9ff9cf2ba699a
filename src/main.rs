//! The `cardvault` binary: the server (`serve`, `dev`) and client
//! subcommands for operators and testing.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use cardvault::card::YearMonth;
use cardvault::cli::{self, ClientOpts};
use cardvault::server;
use cardvault::server::config::{Config, LogFormat};
use cardvault::server::pki::{DEV_CLIENTS, dev_principal};

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
}

/// A client command's own arguments, and how to reach the vault. The
/// server commands (`dev`, `serve`) take none of the latter.
#[derive(Args)]
struct Client<T: Args> {
    #[command(flatten)]
    cmd: T,
    #[command(flatten)]
    client: ClientOpts,
}

/// A client command with subcommands, and how to reach the vault.
#[derive(Args)]
struct ClientGroup<T: Subcommand> {
    #[command(subcommand)]
    cmd: T,
    #[command(flatten)]
    client: ClientOpts,
}

/// No arguments of its own.
#[derive(Args)]
struct NoArgs {}

/// Arguments of `health`.
#[derive(Args)]
struct HealthArgs {
    /// Service name; TokenService is not serving while sealed.
    #[arg(long, default_value = "cardvault.v1.TokenService")]
    service: String,
}

/// Arguments of `shares`.
#[derive(Args)]
struct SharesArgs {
    /// Directory to write them to.
    #[arg(long, default_value = "./cardvault-shares")]
    out_dir: PathBuf,
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
    Tokenize(Client<cli::token::TokenizeCmd>),
    /// Detokenize a token (role: processor).
    Detokenize(Client<cli::token::DetokenizeCmd>),
    /// Show a token's non-sensitive metadata.
    Metadata(Client<cli::token::TokenCmd>),
    /// Delete (redact) a token.
    Delete(Client<cli::token::TokenCmd>),
    /// Query and verify the audit log (role: auditor).
    Audit(ClientGroup<cli::audit::AuditCmd>),
    /// Seal state and key versions (role: admin).
    Status(Client<NoArgs>),
    /// gRPC health of a service; exits non-zero unless SERVING (probes).
    Health(Client<HealthArgs>),
    /// Create the master key and split it into key shares, one per named
    /// custodian, each encrypted to the custodian's age key (role: admin).
    Init(Client<cli::keys::InitCmd>),
    /// Enter your key share (role: custodian).
    Unseal(Client<cli::keys::UnsealCmd>),
    /// Master key rotation with a quorum of custodians: start (admin),
    /// submit (custodian), cancel.
    Rekey(ClientGroup<cli::keys::RekeyCmd>),
    /// Write the current encrypted key shares out again (role: admin).
    Shares(Client<SharesArgs>),
    /// Wipe all keys from memory (role: admin).
    Seal(Client<NoArgs>),
    /// Rotate, rewrap and retire keys (role: admin).
    Keys(ClientGroup<cli::keys::KeysCmd>),
}

/// The flags of [`ClientOpts`], which take a value.
const CLIENT_FLAGS: [&str; 7] = [
    "--addr",
    "--ca",
    "--cert",
    "--key",
    "--dev-dir",
    "--server-name",
    "--as",
];

/// Moves client flags written before the command (`cardvault --addr A
/// tokenize ...`, as scripts and the docs have long done) to just after
/// it, where the command takes them. Before `dev` or `serve` they are
/// refused: the server commands take none.
fn hoist_client_flags(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, String> {
    let mut hoisted = Vec::new();
    let mut i = 1;
    while let Some(arg) = args.get(i).and_then(|a| a.to_str()) {
        let name = arg.split_once('=').map_or(arg, |(n, _)| n);
        if !CLIENT_FLAGS.contains(&name) {
            break;
        }
        hoisted.push(args[i].clone());
        if !arg.contains('=')
            && let Some(value) = args.get(i + 1)
        {
            hoisted.push(value.clone());
            i += 1;
        }
        i += 1;
    }
    let Some(command) = args.get(i) else {
        return Ok(args);
    };
    if hoisted.is_empty() {
        return Ok(args);
    }
    if let Some(server @ ("dev" | "serve")) = command.to_str() {
        let flag = hoisted[0].to_string_lossy();
        let flag = flag.split_once('=').map_or(&*flag, |(n, _)| n);
        return Err(format!(
            "{flag} is a client flag; `cardvault {server}` takes its own (see `cardvault {server} --help`{})",
            if flag == "--dev-dir" && server == "dev" {
                ": it names its directory with --data-dir"
            } else {
                ""
            }
        ));
    }
    let mut out = vec![args[0].clone(), command.clone()];
    out.extend(hoisted);
    out.extend(args[i + 1..].iter().cloned());
    Ok(out)
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
         \x20 {exe} tokenize{flags} --pan-stdin --exp 12/{exp_year}   (then type a test card number, e.g. Visa's)\n\
         \x20 {exe} metadata{flags} <token>\n\
         \x20 {exe} detokenize{flags} <token> --purpose authorization --include-cvv\n\
         \x20 {exe} audit query{flags} --action Detokenize\n\
         \x20 {exe} status{flags}\n\
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
            let cfg = server::dev_config(config.as_deref(), &data_dir, listen)?;
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
        Command::Tokenize(c) => cli::token::tokenize(&c.client, c.cmd).await,
        Command::Detokenize(c) => cli::token::detokenize(&c.client, c.cmd).await,
        Command::Metadata(c) => cli::token::metadata(&c.client, c.cmd).await,
        Command::Delete(c) => cli::token::delete(&c.client, c.cmd).await,
        Command::Audit(c) => cli::audit::run(&c.client, c.cmd).await,
        Command::Status(c) => cli::keys::status(&c.client).await,
        Command::Health(c) => cli::health(&c.client, c.cmd.service).await,
        Command::Init(c) => cli::keys::init(&c.client, c.cmd).await,
        Command::Unseal(c) => cli::keys::unseal(&c.client, c.cmd).await,
        Command::Rekey(c) => cli::keys::rekey(&c.client, c.cmd).await,
        Command::Shares(c) => cli::keys::shares(&c.client, &c.cmd.out_dir).await,
        Command::Seal(c) => cli::keys::seal(&c.client).await,
        Command::Keys(c) => cli::keys::keys(&c.client, c.cmd).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match hoist_client_flags(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("cardvault: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardvault: {e}");
            ExitCode::FAILURE
        }
    }
}
