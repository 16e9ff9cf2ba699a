//! `cardvault-bench`: the load generator for cardvault, kept out of the
//! vault's own binary. It drives a running vault over gRPC + mTLS and
//! reports throughput and latency, as a ratio of an in-process no-op
//! baseline measured in the same run (see `docs/benchmarks.md`).

#![forbid(unsafe_code)]

mod bench;

use std::process::ExitCode;

use clap::Parser;

use cardvault::cli::ClientOpts;

/// The same allocator as the vault, so the client side of a run costs
/// what it would against a vault built the usual way.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for cardvault: throughput and latency of a running
/// vault, optionally as a ratio of a same-run no-op baseline.
#[derive(Debug, Parser)]
#[command(name = "cardvault-bench", version)]
struct Cli {
    #[command(flatten)]
    client: ClientOpts,
    #[command(flatten)]
    bench: bench::BenchCmd,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench::run(&cli.client, cli.bench).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardvault-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
