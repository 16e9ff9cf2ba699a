//! The load generator: drives a running vault over gRPC + mTLS with many
//! concurrent clients and reports throughput and latency, optionally as a
//! ratio of an in-process *baseline* server measured in the same run.
//!
//! The baseline implements the same `TokenService` with handlers that do
//! nothing but return canned responses copied from real vault responses, so
//! requests and responses have the same sizes; it is served with the same
//! certificates, client CA and server builder ([`cardvault::server::grpc_server`])
//! on `127.0.0.1:0`, on its own runtime with as many worker threads as the
//! vault has. What the ratio leaves is the cost of the vault itself: parsing,
//! crypto, storage, durable writes and logging.
//!
//! Every run is bounded: by `--duration` (or `--count` and `--max-seconds`),
//! by a hard cap on requests per run, and by a per-request timeout.
//!
//! On a shared machine throughput drifts between runs, so `--rounds N`
//! measures each operation N times, vault and baseline back to back in
//! alternating order (so a drift favours neither), and reports the round
//! with the median ratio, the spread of the ratios and every round.
//!
//! With `--vault-pid` (a vault on this machine), each run also reports the
//! CPU time per request of the server (the vault process, or the baseline's
//! threads) and of the client, read from `/proc` (module `cpu`): where a
//! run's CPU went.
//!
//! With `--durable-baseline DIR`, a second baseline answers tokenize and
//! detokenize only once a group-committed durable write of a frame per
//! request is done (module `durable`), as the vault must: the vault's
//! ratio to it leaves what the vault does besides that write, and its own
//! ratio to the no-op baseline is the most any server that makes each
//! request durable reaches on this machine.
//!
//! With `--check-targets`, the report ends with the throughput targets checked
//! against the median rounds (module `targets`), and the bench exits
//! non-zero if one is missed.
//!
//! The cards sent are well-known test numbers; they are never printed.

mod cpu;
mod durable;
mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use cardvault::card::YearMonth;
use cardvault::cli::{ClientOpts, status_text};
use cardvault::proto::token_service_server::{TokenService, TokenServiceServer};
use cardvault::proto::{self, token_service_client::TokenServiceClient};

/// Test card numbers sent by tokenize (Luhn-valid test PANs; never printed).
const TEST_PANS: [&str; 2] = ["4111111111111111", "5555555555554444"];
/// First digit of the card numbers `--new-cards` makes (Visa).
const NEW_CARD_PREFIX: &str = "4";
/// Cardholder name sent with every tokenize, for a realistic request size.
const TEST_NAME: &str = "BENCH TEST CARDHOLDER";
/// Purpose sent with every detokenize.
const PURPOSE: &str = "benchmark";
/// Hard cap on requests in one run, whatever the duration or count.
const MAX_REQUESTS_PER_RUN: u64 = 20_000_000;
/// Most concurrent clients accepted.
const MAX_CONCURRENCY: usize = 4096;
/// Longest run accepted, in seconds (duration, warmup or --max-seconds).
const MAX_RUN_SECS: f64 = 3600.0;
/// A request that takes longer is abandoned and counted as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most rounds per operation accepted.
const MAX_ROUNDS: usize = 50;

/// Which calls the bench makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchOp {
    /// `Tokenize`: a new token for one of two test cards (no dedupe, no
    /// CVV), one durable record write (the cards are indexed after the
    /// first); with --new-cards, a card never tokenized before.
    Tokenize,
    /// `Detokenize` (no CVV) of tokens created before the run.
    Detokenize,
    /// `GetMetadata` of tokens created before the run.
    Metadata,
    /// 20% tokenize, 60% detokenize, 20% metadata.
    Mix,
    /// Each of tokenize, detokenize, metadata and mix in turn.
    All,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::Tokenize => "tokenize",
            BenchOp::Detokenize => "detokenize",
            BenchOp::Metadata => "metadata",
            BenchOp::Mix => "mix",
            BenchOp::All => "all",
        }
    }
}

/// What to measure, and how.
#[derive(Debug, Clone, Args)]
pub struct BenchCmd {
    /// Operation to measure.
    #[arg(long, value_enum, default_value = "mix")]
    pub op: BenchOp,
    /// Concurrent clients (each keeps one request in flight).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// gRPC (HTTP/2) connections per identity; clients are spread over them.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured seconds per run (ignored with --count).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Measure exactly this many requests per run instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Upper bound in seconds on a --count run.
    #[arg(long, default_value_t = 600.0)]
    pub max_seconds: f64,
    /// Unmeasured seconds of the same load before each run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Tenant to use.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// Tokens created before the run for detokenize and metadata to read.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Dev identity for tokenize (default: --as, else merchant).
    #[arg(long)]
    pub tokenize_as: Option<String>,
    /// Dev identity for detokenize and metadata (default: --as, else processor).
    #[arg(long)]
    pub detokenize_as: Option<String>,
    /// Also run the same load against an in-process no-op baseline server
    /// and report the vault's throughput as a ratio of it.
    #[arg(long)]
    pub baseline: bool,
    /// Baseline server certificate (default: `<dev-dir>/certs/server.pem`).
    #[arg(long)]
    pub baseline_cert: Option<PathBuf>,
    /// Baseline server key (default: `<dev-dir>/certs/server.key`).
    #[arg(long)]
    pub baseline_key: Option<PathBuf>,
    /// CA of the clients the baseline accepts (default: --ca, else `<dev-dir>/certs/ca.pem`).
    #[arg(long)]
    pub baseline_client_ca: Option<PathBuf>,
    /// Also run a durable baseline: the no-op server whose tokenize and
    /// detokenize answer only after a group-committed `O_DIRECT | O_DSYNC`
    /// write (the vault's log code) of 256 bytes per request, to a scratch
    /// log in a new directory under DIR (removed afterwards; put DIR on
    /// the vault's file system). Needs --baseline.
    #[arg(long, value_name = "DIR", requires = "baseline")]
    pub durable_baseline: Option<PathBuf>,
    /// Rounds per operation: each measures the vault and the baselines
    /// asked for; the round with the median ratio to the no-op baseline
    /// (median vault ops/s without --baseline) is the one reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Tokenize a card number never sent before in every request (a
    /// Luhn-valid test number from the 400000 range, never printed), so
    /// each tokenize also indexes a new card, instead of one of two test
    /// cards again.
    #[arg(long)]
    pub new_cards: bool,
    /// Pid of the vault process, when it runs on this machine: each run
    /// then also reports the vault's CPU time per request (from `/proc`).
    #[arg(long)]
    pub vault_pid: Option<u32>,
    /// Check the throughput targets against the median rounds (the
    /// `--target-*` bounds, and no errors); exit non-zero if one is
    /// missed. Needs --baseline and --op tokenize, detokenize or all.
    #[arg(long, requires = "baseline")]
    pub check_targets: bool,
    /// Least tokenize throughput, as a fraction of the no-op baseline's,
    /// that --check-targets accepts.
    #[arg(long, default_value_t = targets::TOKENIZE_RATIO, value_name = "FRACTION")]
    pub target_tokenize_ratio: f64,
    /// Least detokenize throughput, as a fraction of the no-op baseline's,
    /// that --check-targets accepts.
    #[arg(long, default_value_t = targets::DETOKENIZE_RATIO, value_name = "FRACTION")]
    pub target_detokenize_ratio: f64,
    /// Most p99 latency in milliseconds of tokenize and detokenize that
    /// --check-targets accepts.
    #[arg(long, default_value_t = targets::P99_MAX_MS, value_name = "MS")]
    pub target_p99_ms: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The servers a round measures, in the order of odd rounds.
#[derive(Debug, Clone, Copy)]
enum Server {
    Vault,
    Baseline,
    Durable,
}

/// One call kind.
#[derive(Debug, Clone, Copy)]
enum Call {
    Tokenize,
    Detokenize,
    Metadata,
}

impl Call {
    /// The call a run of `op` makes as its `n`th request.
    fn pick(op: BenchOp, n: u64) -> Call {
        match op {
            BenchOp::Tokenize => Call::Tokenize,
            BenchOp::Detokenize => Call::Detokenize,
            BenchOp::Metadata => Call::Metadata,
            BenchOp::Mix | BenchOp::All => match n % 10 {
                0 | 1 => Call::Tokenize,
                2..=7 => Call::Detokenize,
                _ => Call::Metadata,
            },
        }
    }
}

/// Clients of one server: per connection, a tokenize and a read client.
struct Clients {
    tokenize: Vec<TokenServiceClient<Channel>>,
    read: Vec<TokenServiceClient<Channel>>,
}

/// What every request of a run needs.
struct Load {
    tenant: String,
    tokens: Vec<String>,
    exp_year: u32,
    /// With --new-cards: where this invocation's card numbers start, so
    /// that runs against the same vault send cards it has not seen.
    new_cards: Option<u64>,
}

impl Load {
    async fn call(
        &self,
        call: Call,
        n: u64,
        tok: &mut TokenServiceClient<Channel>,
        read: &mut TokenServiceClient<Channel>,
    ) -> Result<(), Status> {
        match call {
            Call::Tokenize => tok.tokenize(self.tokenize_request(n)).await.map(|_| ()),
            Call::Detokenize => read
                .detokenize(proto::DetokenizeRequest {
                    tenant: self.tenant.clone(),
                    token: self.token(n).to_owned(),
                    purpose: PURPOSE.to_owned(),
                    include_cvv: false,
                })
                .await
                .map(|_| ()),
            Call::Metadata => read
                .get_metadata(proto::GetMetadataRequest {
                    tenant: self.tenant.clone(),
                    token: self.token(n).to_owned(),
                })
                .await
                .map(|_| ()),
        }
    }

    fn token(&self, n: u64) -> &str {
        &self.tokens[(n % self.tokens.len() as u64) as usize]
    }

    fn tokenize_request(&self, n: u64) -> proto::TokenizeRequest {
        proto::TokenizeRequest {
            tenant: self.tenant.clone(),
            pan: match self.new_cards {
                Some(start) => new_card(start.wrapping_add(n)),
                None => TEST_PANS[(n % TEST_PANS.len() as u64) as usize].to_owned(),
            },
            exp_month: 12,
            exp_year: self.exp_year,
            cardholder_name: Some(TEST_NAME.to_owned()),
            cvv: None,
            format: proto::TokenFormat::Opaque as i32,
            dedupe: false,
        }
    }
}

/// The `n`th card number of `--new-cards`: a 16-digit Visa number whose
/// visible digits (first six, last four) differ for every `n` below 10^8,
/// so that, like real traffic, the cards spread over the enumeration
/// guard's buckets instead of piling into a few.
fn new_card(n: u64) -> String {
    let n = n % 1_000_000_000;
    let (low, mid, high) = (n % 100_000, n / 100_000 % 1000, n / 100_000_000);
    cardvault::card::with_check_digit(&format!("{NEW_CARD_PREFIX}{low:05}{high:06}{mid:03}"))
}

/// Results of one measured run.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    /// Successful requests.
    pub ops: u64,
    /// Failed requests.
    pub errors: u64,
    /// Failed requests by gRPC code (`Timeout` for the client's own timeout).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Wall-clock seconds of the run.
    pub elapsed_s: f64,
    /// Successful requests per second.
    pub ops_per_s: f64,
    /// Median latency of successful requests, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile latency, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Slowest successful request, milliseconds.
    pub max_ms: f64,
    /// Server CPU time per successful request, microseconds: the vault
    /// process (with `--vault-pid`) or the baseline server's threads.
    pub server_cpu_us: Option<f64>,
    /// CPU time of the bench client per successful request, microseconds.
    pub client_cpu_us: Option<f64>,
}

/// One round of one operation: the vault, then (with --baseline) the
/// baseline and (with --durable-baseline) the durable baseline, or the
/// other way round in even rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// Against the vault.
    pub vault: RunStats,
    /// Against the baseline, with --baseline.
    pub baseline: Option<RunStats>,
    /// vault ops/s divided by baseline ops/s, with --baseline.
    pub ratio: Option<f64>,
    /// Against the durable baseline, with --durable-baseline.
    pub durable_baseline: Option<RunStats>,
    /// vault ops/s divided by durable baseline ops/s.
    pub durable_ratio: Option<f64>,
}

/// One operation's results: the median round's figures, their spread and
/// every round.
#[derive(Debug, Clone, Serialize)]
pub struct OpResult {
    /// The operation.
    pub op: BenchOp,
    /// Against the vault, in the median round.
    pub vault: RunStats,
    /// Against the baseline, in the median round, with --baseline.
    pub baseline: Option<RunStats>,
    /// The median round's ratio, with --baseline.
    pub ratio: Option<f64>,
    /// Lowest ratio of all rounds, with --baseline.
    pub ratio_min: Option<f64>,
    /// Highest ratio of all rounds, with --baseline.
    pub ratio_max: Option<f64>,
    /// Against the durable baseline, in the median round.
    pub durable_baseline: Option<RunStats>,
    /// The median round's ratio to the durable baseline.
    pub durable_ratio: Option<f64>,
    /// Lowest ratio to the durable baseline of all rounds.
    pub durable_ratio_min: Option<f64>,
    /// Highest ratio to the durable baseline of all rounds.
    pub durable_ratio_max: Option<f64>,
    /// Every round, in the order run.
    pub rounds: Vec<Round>,
}

/// The key rounds are ranked by: the ratio (0 if the baseline completed
/// nothing), or vault ops/s without a baseline.
fn round_key(r: &Round) -> f64 {
    match (&r.baseline, r.ratio) {
        (Some(_), ratio) => ratio.unwrap_or(0.0),
        (None, _) => r.vault.ops_per_s,
    }
}

/// Index of the median round (the lower one of an even count).
fn median_round(rounds: &[Round]) -> usize {
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| round_key(&rounds[a]).total_cmp(&round_key(&rounds[b])));
    order[(order.len() - 1) / 2]
}

impl OpResult {
    /// Summarises the rounds of `op` (at least one).
    fn of(op: BenchOp, rounds: Vec<Round>) -> OpResult {
        let m = &rounds[median_round(&rounds)];
        let ratios = rounds.iter().filter_map(|r| r.ratio);
        let durable = rounds.iter().filter_map(|r| r.durable_ratio);
        OpResult {
            op,
            vault: m.vault.clone(),
            baseline: m.baseline.clone(),
            ratio: m.ratio,
            ratio_min: ratios.clone().reduce(f64::min),
            ratio_max: ratios.reduce(f64::max),
            durable_baseline: m.durable_baseline.clone(),
            durable_ratio: m.durable_ratio,
            durable_ratio_min: durable.clone().reduce(f64::min),
            durable_ratio_max: durable.reduce(f64::max),
            rounds,
        }
    }
}

/// The whole report (`--json` prints it as one object).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Vault address.
    pub addr: String,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Connections per identity.
    pub connections: usize,
    /// Seconds per run, unless `count` is set.
    pub duration_s: f64,
    /// Requests per run, if set.
    pub count: Option<u64>,
    /// Warmup seconds before each run.
    pub warmup_s: f64,
    /// Rounds per operation.
    pub rounds: usize,
    /// Tenant.
    pub tenant: String,
    /// Logical CPUs of this machine.
    pub cores: usize,
    /// Results per operation.
    pub results: Vec<OpResult>,
    /// With --check-targets: the throughput targets, checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<targets::Targets>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// Runs `op` with `concurrency` clients until `deadline` or `limit` requests.
/// Latencies are recorded in microseconds.
async fn run_load(
    clients: &Clients,
    load: &Arc<Load>,
    op: BenchOp,
    concurrency: usize,
    limit: u64,
    deadline: Instant,
) -> RunStats {
    let started = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut tok = clients.tokenize[i % clients.tokenize.len()].clone();
        let mut read = clients.read[i % clients.read.len()].clone();
        let load = load.clone();
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u64> = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= limit {
                    break;
                }
                let call = Call::pick(op, n);
                let t0 = Instant::now();
                let res =
                    tokio::time::timeout(REQUEST_TIMEOUT, load.call(call, n, &mut tok, &mut read))
                        .await;
                let micros = t0.elapsed().as_micros() as u64;
                match res {
                    Ok(Ok(())) => latencies.push(micros),
                    Ok(Err(s)) => *errors.entry(format!("{:?}", s.code())).or_default() += 1,
                    Err(_) => *errors.entry("Timeout".to_owned()).or_default() += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors_by_code: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok((l, e)) => {
                latencies.extend(l);
                for (k, v) in e {
                    *errors_by_code.entry(k).or_default() += v;
                }
            }
            Err(_) => *errors_by_code.entry("ClientPanic".to_owned()).or_default() += 1,
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    RunStats {
        ops,
        errors: errors_by_code.values().sum(),
        errors_by_code,
        elapsed_s,
        ops_per_s: if elapsed_s > 0.0 {
            ops as f64 / elapsed_s
        } else {
            0.0
        },
        p50_ms: percentile(&latencies, 0.50),
        p90_ms: percentile(&latencies, 0.90),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map_or(0.0, |&m| m as f64 / 1000.0),
        server_cpu_us: None,
        client_cpu_us: None,
    }
}

/// Warmup, then one measured run, with the CPU it cost `server` and the
/// client.
async fn measure(
    clients: &Clients,
    load: &Arc<Load>,
    op: BenchOp,
    cmd: &BenchCmd,
    server: cpu::Server,
) -> RunStats {
    if cmd.warmup > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(cmd.warmup);
        run_load(
            clients,
            load,
            op,
            cmd.concurrency,
            MAX_REQUESTS_PER_RUN,
            until,
        )
        .await;
    }
    let (limit, secs) = match cmd.count {
        Some(n) => (n.min(MAX_REQUESTS_PER_RUN), cmd.max_seconds),
        None => (MAX_REQUESTS_PER_RUN, cmd.duration),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let before = cpu::Sample::take(server);
    let mut stats = run_load(clients, load, op, cmd.concurrency, limit, deadline).await;
    (stats.server_cpu_us, stats.client_cpu_us) =
        before.per_op(&cpu::Sample::take(server), stats.ops);
    stats
}

/// Opens `connections` channels for each of the two identities.
async fn connect_all(
    opts: &ClientOpts,
    connections: usize,
    tokenize_as: &str,
    read_as: &str,
) -> Result<Clients, String> {
    let mut clients = Clients {
        tokenize: Vec::with_capacity(connections),
        read: Vec::with_capacity(connections),
    };
    for _ in 0..connections {
        clients
            .tokenize
            .push(TokenServiceClient::new(opts.connect(tokenize_as).await?));
        clients
            .read
            .push(TokenServiceClient::new(opts.connect(read_as).await?));
    }
    Ok(clients)
}

/// Creates the tokens detokenize and metadata read, and captures one real
/// response of each kind for the baseline to send back.
async fn setup(clients: &Clients, load: &mut Load, tokens: usize) -> Result<Canned, String> {
    let mut tok = clients.tokenize[0].clone();
    let mut read = clients.read[0].clone();
    let first = tok
        .tokenize(load.tokenize_request(0))
        .await
        .map_err(|s| format!("setup tokenize failed: {}", status_text(&s)))?
        .into_inner();
    load.tokens.push(first.token.clone());
    // The rest concurrently, 32 at a time.
    let mut n = 1u64;
    while load.tokens.len() < tokens {
        let batch = (tokens - load.tokens.len()).min(32);
        let calls = (0..batch).map(|i| {
            let mut c = clients.tokenize[i % clients.tokenize.len()].clone();
            let req = load.tokenize_request(n + i as u64);
            async move { c.tokenize(req).await }
        });
        for r in futures::future::join_all(calls).await {
            let r = r.map_err(|s| format!("setup tokenize failed: {}", status_text(&s)))?;
            load.tokens.push(r.into_inner().token);
        }
        n += batch as u64;
    }
    let detokenize = read
        .detokenize(proto::DetokenizeRequest {
            tenant: load.tenant.clone(),
            token: first.token.clone(),
            purpose: PURPOSE.to_owned(),
            include_cvv: false,
        })
        .await
        .map_err(|s| format!("setup detokenize failed: {}", status_text(&s)))?
        .into_inner();
    let metadata = read
        .get_metadata(proto::GetMetadataRequest {
            tenant: load.tenant.clone(),
            token: first.token.clone(),
        })
        .await
        .map_err(|s| format!("setup metadata failed: {}", status_text(&s)))?
        .into_inner();
    Ok(Canned {
        tokenize: first,
        detokenize,
        metadata,
    })
}

/// Responses the baseline returns: copies of real vault responses.
#[derive(Clone)]
struct Canned {
    tokenize: proto::TokenizeResponse,
    detokenize: proto::DetokenizeResponse,
    metadata: proto::CardMetadata,
}

/// The baseline: the vault's service interface with no-op handlers (in
/// the durable baseline, tokenize and detokenize first wait for a commit).
struct BaselineService {
    canned: Canned,
    durable: Option<Arc<durable::Committer>>,
}

impl BaselineService {
    /// Waits for a durable commit, in the durable baseline.
    async fn commit(&self) -> Result<(), Status> {
        match &self.durable {
            Some(c) => c.commit().await.map_err(Status::internal),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl TokenService for BaselineService {
    async fn tokenize(
        &self,
        _request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        self.commit().await?;
        Ok(Response::new(self.canned.tokenize.clone()))
    }

    async fn tokenize_batch(
        &self,
        _request: Request<proto::TokenizeBatchRequest>,
    ) -> Result<Response<proto::TokenizeBatchResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn detokenize(
        &self,
        _request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        self.commit().await?;
        Ok(Response::new(self.canned.detokenize.clone()))
    }

    async fn detokenize_batch(
        &self,
        _request: Request<proto::DetokenizeBatchRequest>,
    ) -> Result<Response<proto::DetokenizeBatchResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn get_metadata(
        &self,
        _request: Request<proto::GetMetadataRequest>,
    ) -> Result<Response<proto::CardMetadata>, Status> {
        Ok(Response::new(self.canned.metadata.clone()))
    }

    async fn delete_token(
        &self,
        _request: Request<proto::DeleteTokenRequest>,
    ) -> Result<Response<proto::DeleteTokenResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn create_collect_session(
        &self,
        _request: Request<proto::CreateCollectSessionRequest>,
    ) -> Result<Response<proto::CreateCollectSessionResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn tokenize_sealed(
        &self,
        _request: Request<proto::TokenizeSealedRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// A running baseline server on its own runtime.
struct Baseline {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The durable baseline's committer; dropped (thread joined, scratch
    /// log removed) after the runtime is shut down.
    _durable: Option<durable::Running>,
}

impl Baseline {
    /// Starts the no-op baseline, or with `durable` (a directory) the
    /// durable one.
    fn start(
        opts: &ClientOpts,
        cmd: &BenchCmd,
        canned: Canned,
        durable: Option<&std::path::Path>,
    ) -> Result<Baseline, String> {
        // Its commit thread is named like the baseline's workers, so that
        // its CPU time counts as the baseline server's.
        let durable = durable
            .map(|dir| durable::Committer::start(dir, cpu::BASELINE_THREAD))
            .transpose()?;
        let committer = durable.as_ref().map(|d| d.committer.clone());
        let certs = opts.dev_dir.join("certs");
        let cert = cmd
            .baseline_cert
            .clone()
            .unwrap_or_else(|| certs.join("server.pem"));
        let key = cmd
            .baseline_key
            .clone()
            .unwrap_or_else(|| certs.join("server.key"));
        let client_ca = cmd
            .baseline_client_ca
            .clone()
            .or_else(|| opts.ca.clone())
            .unwrap_or_else(|| certs.join("ca.pem"));
        let tls = cardvault::server::tls::server_config(&cert, &key, &client_ca)?;
        // Its own worker threads, as many as a vault process gets by default,
        // so the client's runtime is shared with neither server.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(cpu::BASELINE_THREAD)
            .enable_all()
            .build()
            .map_err(|e| format!("baseline runtime: {e}"))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("baseline listen: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = cardvault::server::grpc_server();
        runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("bench: baseline listener: {e}");
                    return;
                }
            };
            let served = builder
                .add_service(TokenServiceServer::new(BaselineService {
                    canned,
                    durable: committer,
                }))
                .serve_with_incoming_shutdown(
                    cardvault::server::tls::incoming(
                        listener,
                        tls,
                        Default::default(),
                        cardvault::server::tls::Limits::default(),
                        tokio_util::sync::CancellationToken::new(),
                    ),
                    async move {
                        let _ = stopped.await;
                    },
                )
                .await;
            if let Err(e) = served {
                eprintln!("bench: baseline server: {e}");
            }
        });
        Ok(Baseline {
            addr,
            stop: Some(stop),
            runtime: Some(runtime),
            _durable: durable,
        })
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn check_args(cmd: &BenchCmd) -> Result<(), String> {
    let secs_ok = |s: f64| s.is_finite() && (0.0..=MAX_RUN_SECS).contains(&s);
    if cmd.concurrency == 0 || cmd.concurrency > MAX_CONCURRENCY {
        return Err(format!("--concurrency must be 1-{MAX_CONCURRENCY}"));
    }
    if cmd.connections == 0 || cmd.connections > cmd.concurrency {
        return Err("--connections must be 1 to --concurrency".into());
    }
    if !secs_ok(cmd.duration) || cmd.duration == 0.0 {
        return Err(format!(
            "--duration must be above 0 and at most {MAX_RUN_SECS}"
        ));
    }
    if !secs_ok(cmd.warmup) {
        return Err(format!("--warmup must be 0-{MAX_RUN_SECS}"));
    }
    if !secs_ok(cmd.max_seconds) || cmd.max_seconds == 0.0 {
        return Err(format!(
            "--max-seconds must be above 0 and at most {MAX_RUN_SECS}"
        ));
    }
    if cmd.count == Some(0) {
        return Err("--count must be at least 1".into());
    }
    if cmd.tokens == 0 || cmd.tokens > 100_000 {
        return Err("--tokens must be 1-100000".into());
    }
    if cmd.rounds == 0 || cmd.rounds > MAX_ROUNDS {
        return Err(format!("--rounds must be 1-{MAX_ROUNDS}"));
    }
    if cmd.check_targets && matches!(cmd.op, BenchOp::Metadata | BenchOp::Mix) {
        return Err("--check-targets needs --op tokenize, detokenize or all \
                    (only they have targets)"
            .into());
    }
    let fraction_ok = |f: f64| f.is_finite() && (0.0..=1.0).contains(&f);
    if !fraction_ok(cmd.target_tokenize_ratio) || !fraction_ok(cmd.target_detokenize_ratio) {
        return Err("--target-tokenize-ratio and --target-detokenize-ratio must be 0-1".into());
    }
    if !(cmd.target_p99_ms.is_finite() && cmd.target_p99_ms > 0.0) {
        return Err("--target-p99-ms must be above 0".into());
    }
    if let Some(pid) = cmd.vault_pid
        && !cpu::readable(pid)
    {
        return Err(format!(
            "--vault-pid: cannot read the CPU time of process {pid} (/proc/{pid}/stat)"
        ));
    }
    Ok(())
}

/// Runs the benchmark and prints the report. Interrupted (SIGINT or
/// SIGTERM), it stops without a report, after the baselines are shut
/// down and the durable baseline's scratch log removed.
pub async fn run(opts: &ClientOpts, cmd: BenchCmd) -> Result<(), String> {
    let term = tokio::signal::unix::SignalKind::terminate();
    let mut term = tokio::signal::unix::signal(term).map_err(|e| format!("SIGTERM: {e}"))?;
    tokio::select! {
        done = bench(opts, cmd) => done,
        // Dropping the bench future drops its baselines, which clean up.
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        _ = term.recv() => Err("terminated".into()),
    }
}

async fn bench(opts: &ClientOpts, cmd: BenchCmd) -> Result<(), String> {
    check_args(&cmd)?;
    let tokenize_as = cmd
        .tokenize_as
        .clone()
        .or_else(|| opts.identity.clone())
        .unwrap_or_else(|| "merchant".into());
    let read_as = cmd
        .detokenize_as
        .clone()
        .or_else(|| opts.identity.clone())
        .unwrap_or_else(|| "processor".into());
    let vault = connect_all(opts, cmd.connections, &tokenize_as, &read_as).await?;
    let mut load = Load {
        tenant: cmd.tenant.clone(),
        tokens: Vec::with_capacity(cmd.tokens),
        exp_year: YearMonth::now_utc().year + 3,
        // A different start per invocation (clock-derived; it need not be
        // secret, only unlikely to repeat a run's billion numbers).
        new_cards: cmd.new_cards.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }),
    };
    let canned = setup(&vault, &mut load, cmd.tokens).await?;
    let load = Arc::new(load);

    let start_baseline = |durable: Option<PathBuf>| {
        let (opts, cmd, canned) = (opts, &cmd, canned.clone());
        let (tokenize_as, read_as) = (&tokenize_as, &read_as);
        async move {
            let server = Baseline::start(opts, cmd, canned, durable.as_deref())?;
            let mut bopts = opts.clone();
            bopts.addr = format!("https://{}", server.addr);
            let clients = connect_all(&bopts, cmd.connections, tokenize_as, read_as).await?;
            Ok::<_, String>((server, clients))
        }
    };
    let baseline = match cmd.baseline {
        true => Some(start_baseline(None).await?),
        false => None,
    };
    let durable_baseline = match &cmd.durable_baseline {
        Some(dir) => Some(start_baseline(Some(dir.clone())).await?),
        None => None,
    };

    let ops: Vec<BenchOp> = match cmd.op {
        BenchOp::All => vec![
            BenchOp::Tokenize,
            BenchOp::Detokenize,
            BenchOp::Metadata,
            BenchOp::Mix,
        ],
        op => vec![op],
    };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let mut rounds = Vec::with_capacity(cmd.rounds);
        for n in 1..=cmd.rounds {
            let say = |server: &str| {
                if !cmd.json {
                    match cmd.rounds {
                        1 => eprintln!("bench: {} against the {server}", op.name()),
                        all => eprintln!(
                            "bench: {} against the {server} (round {n}/{all})",
                            op.name()
                        ),
                    }
                }
            };
            // Odd rounds run the vault, the baseline, the durable baseline;
            // even rounds the other way round, so that a machine slowing
            // down (or speeding up) during a round favours none of them.
            let mut order = [Server::Vault, Server::Baseline, Server::Durable];
            if n % 2 == 0 {
                order.reverse();
            }
            let (mut vault_stats, mut baseline_stats, mut durable_stats) = (None, None, None);
            for server in order {
                match server {
                    Server::Vault => {
                        say("vault");
                        let pid = cpu::Server::Vault(cmd.vault_pid);
                        vault_stats = Some(measure(&vault, &load, op, &cmd, pid).await);
                    }
                    Server::Baseline => {
                        if let Some((_, clients)) = &baseline {
                            say("baseline");
                            let s = measure(clients, &load, op, &cmd, cpu::Server::Baseline);
                            baseline_stats = Some(s.await);
                        }
                    }
                    Server::Durable => {
                        if let Some((_, clients)) = &durable_baseline {
                            say("durable baseline");
                            let s = measure(clients, &load, op, &cmd, cpu::Server::Baseline);
                            durable_stats = Some(s.await);
                        }
                    }
                }
            }
            let vault_stats = vault_stats.expect("every round measures the vault");
            let ratio_to = |b: &Option<RunStats>| {
                b.as_ref()
                    .filter(|b| b.ops_per_s > 0.0)
                    .map(|b| vault_stats.ops_per_s / b.ops_per_s)
            };
            rounds.push(Round {
                ratio: ratio_to(&baseline_stats),
                durable_ratio: ratio_to(&durable_stats),
                vault: vault_stats,
                baseline: baseline_stats,
                durable_baseline: durable_stats,
            });
        }
        results.push(OpResult::of(op, rounds));
    }
    drop(baseline);
    drop(durable_baseline);

    let mut report = Report {
        addr: opts.addr.clone(),
        concurrency: cmd.concurrency,
        connections: cmd.connections,
        duration_s: cmd.duration,
        count: cmd.count,
        warmup_s: cmd.warmup,
        rounds: cmd.rounds,
        tenant: cmd.tenant.clone(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        results,
        targets: None,
    };
    if cmd.check_targets {
        let limits = targets::Limits {
            tokenize_ratio: cmd.target_tokenize_ratio,
            detokenize_ratio: cmd.target_detokenize_ratio,
            p99_ms: cmd.target_p99_ms,
        };
        report.targets = Some(targets::Targets::check(&report, &limits));
    }
    if cmd.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&report);
    }
    match report.targets.map(|t| t.missed()) {
        Some(missed) if !missed.is_empty() => Err(format!("targets missed: {}", missed.join(", "))),
        _ => Ok(()),
    }
}

fn print_table(r: &Report) {
    let run = match r.count {
        Some(n) => format!("{n} requests"),
        None => format!("{} s", r.duration_s),
    };
    let rounds = match r.rounds {
        1 => String::new(),
        n => format!("  {n} rounds (median round reported last)"),
    };
    println!(
        "{}  concurrency {}  connections {}  {run} per run (after {} s warmup)  {} cores{rounds}",
        r.addr, r.concurrency, r.connections, r.warmup_s, r.cores
    );
    println!(
        "{:<11} {:<12} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10} {:>10}",
        "op",
        "server",
        "ops",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "srv us/op",
        "cli us/op"
    );
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let row = |op: &str, server: &str, s: &RunStats| {
        println!(
            "{op:<11} {server:<12} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>10} {:>10}",
            s.ops,
            s.ops_per_s,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.max_ms,
            s.errors,
            us(s.server_cpu_us),
            us(s.client_cpu_us)
        );
    };
    let ratio_row = |op: &str, label: &str, ratio: f64, of: &str, tail: &str| {
        println!("{op:<11} {label:<12} {:>9.1}% of {of}{tail}", ratio * 100.0);
    };
    let spread = |res: &OpResult, lo: Option<f64>, hi: Option<f64>| match (lo, hi) {
        (Some(lo), Some(hi)) if res.rounds.len() > 1 => format!(
            " (median of {}; {:.1}-{:.1}%)",
            res.rounds.len(),
            lo * 100.0,
            hi * 100.0
        ),
        _ => String::new(),
    };
    for res in &r.results {
        let op = res.op.name();
        if res.rounds.len() > 1 {
            for (i, round) in res.rounds.iter().enumerate() {
                let n = i + 1;
                row(op, &format!("vault #{n}"), &round.vault);
                if let Some(b) = &round.baseline {
                    row(op, &format!("baseline #{n}"), b);
                }
                if let Some(b) = &round.durable_baseline {
                    row(op, &format!("durable #{n}"), b);
                }
                if let Some(ratio) = round.ratio {
                    ratio_row(op, &format!("ratio #{n}"), ratio, "baseline", "");
                }
                if let Some(ratio) = round.durable_ratio {
                    let of = "durable baseline";
                    ratio_row(op, &format!("ratio #{n}"), ratio, of, "");
                }
            }
        }
        row(op, "vault", &res.vault);
        if let Some(b) = &res.baseline {
            row(op, "baseline", b);
        }
        if let Some(b) = &res.durable_baseline {
            row(op, "durable", b);
        }
        if let Some(ratio) = res.ratio {
            let tail = spread(res, res.ratio_min, res.ratio_max);
            ratio_row(op, "ratio", ratio, "baseline", &tail);
        }
        if let Some(ratio) = res.durable_ratio {
            let tail = spread(res, res.durable_ratio_min, res.durable_ratio_max);
            ratio_row(op, "ratio", ratio, "durable baseline", &tail);
        }
        let server_cpu = res.baseline.as_ref().and_then(|b| b.server_cpu_us);
        if let (Some(v), Some(b)) = (res.vault.server_cpu_us, server_cpu)
            && b > 0.0
        {
            println!(
                "{op:<11} {:<12} {:>9.2}x the baseline's per request ({v:.1} / {b:.1} us)",
                "server cpu",
                v / b
            );
        }
        for (i, round) in res.rounds.iter().enumerate() {
            let n = if res.rounds.len() > 1 {
                format!(" #{}", i + 1)
            } else {
                String::new()
            };
            let by_server = std::iter::once(("vault", &round.vault))
                .chain(round.baseline.as_ref().map(|b| ("baseline", b)))
                .chain(round.durable_baseline.as_ref().map(|b| ("durable", b)));
            for (server, stats) in by_server {
                for (code, count) in &stats.errors_by_code {
                    println!("{op:<11} {server}{n} errors {code}: {count}");
                }
            }
        }
    }
    if let Some(t) = &r.targets {
        t.print();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn stats(ops_per_s: f64) -> RunStats {
        RunStats {
            ops: ops_per_s as u64,
            errors: 0,
            errors_by_code: BTreeMap::new(),
            elapsed_s: 1.0,
            ops_per_s,
            p50_ms: 1.0,
            p90_ms: 2.0,
            p99_ms: 3.0,
            max_ms: 4.0,
            server_cpu_us: None,
            client_cpu_us: None,
        }
    }

    pub(super) fn round(vault: f64, baseline: Option<f64>) -> Round {
        Round {
            vault: stats(vault),
            baseline: baseline.map(stats),
            ratio: baseline.map(|b| vault / b),
            durable_baseline: None,
            durable_ratio: None,
        }
    }

    #[test]
    fn the_durable_ratio_is_the_median_rounds_with_its_spread() {
        let with_durable = |vault: f64, baseline: f64, durable: f64| Round {
            durable_baseline: Some(stats(durable)),
            durable_ratio: Some(vault / durable),
            ..round(vault, Some(baseline))
        };
        // Ratios to the baseline 0.5, 0.4, 0.6 (the first round is the
        // median); to the durable baseline 0.8, 1.0, 0.75.
        let r = OpResult::of(
            BenchOp::Tokenize,
            vec![
                with_durable(40.0, 80.0, 50.0),
                with_durable(40.0, 100.0, 40.0),
                with_durable(60.0, 100.0, 80.0),
            ],
        );
        assert_eq!(r.ratio, Some(0.5));
        assert_eq!(r.durable_ratio, Some(0.8));
        assert_eq!(r.durable_baseline.as_ref().unwrap().ops_per_s, 50.0);
        assert_eq!(
            (r.durable_ratio_min, r.durable_ratio_max),
            (Some(0.75), Some(1.0))
        );
        // Without a durable baseline there is none of it.
        let r = OpResult::of(BenchOp::Tokenize, vec![round(1.0, Some(2.0))]);
        assert!(r.durable_baseline.is_none() && r.durable_ratio.is_none());
        assert_eq!((r.durable_ratio_min, r.durable_ratio_max), (None, None));
    }

    #[tokio::test]
    async fn the_durable_baseline_writes_for_tokenize_and_detokenize_only() {
        let dir = tempfile::tempdir().unwrap();
        let running = durable::Committer::start(dir.path(), "durable-test").unwrap();
        let svc = BaselineService {
            canned: Canned {
                tokenize: Default::default(),
                detokenize: Default::default(),
                metadata: Default::default(),
            },
            durable: Some(running.committer.clone()),
        };
        let writes = || running.committer.writes();
        svc.get_metadata(Request::new(Default::default()))
            .await
            .unwrap();
        assert_eq!(
            writes(),
            0,
            "metadata waits for no write in the vault either"
        );
        svc.tokenize(Request::new(Default::default()))
            .await
            .unwrap();
        assert_eq!(writes(), 1);
        svc.detokenize(Request::new(Default::default()))
            .await
            .unwrap();
        assert_eq!(writes(), 2);
    }

    #[test]
    fn target_checks_need_the_baseline_and_an_op_with_targets() {
        assert!(try_parse(&["--check-targets", "--op", "all"]).is_err());
        for op in ["tokenize", "detokenize", "all"] {
            let cmd = parse(&["--check-targets", "--baseline", "--op", op]);
            assert!(cmd.check_targets);
            assert_eq!(check_args(&cmd), Ok(()));
        }
        for op in ["metadata", "mix"] {
            let cmd = parse(&["--check-targets", "--baseline", "--op", op]);
            let err = check_args(&cmd).unwrap_err();
            assert!(err.contains("--check-targets needs --op"), "{err}");
        }
    }

    #[test]
    fn a_durable_baseline_needs_the_baseline() {
        assert!(try_parse(&["--durable-baseline", "/tmp"]).is_err());
        let cmd = parse(&["--baseline", "--durable-baseline", "/tmp"]);
        assert_eq!(cmd.durable_baseline, Some(PathBuf::from("/tmp")));
    }

    #[test]
    fn the_round_with_the_median_ratio_is_reported() {
        // Ratios 0.5, 0.4, 0.6: the median round is the first, although
        // the third has the highest vault throughput.
        let r = OpResult::of(
            BenchOp::Detokenize,
            vec![
                round(50.0, Some(100.0)),
                round(20.0, Some(50.0)),
                round(90.0, Some(150.0)),
            ],
        );
        assert_eq!(r.ratio, Some(0.5));
        assert_eq!(r.vault.ops_per_s, 50.0);
        assert_eq!(r.baseline.as_ref().unwrap().ops_per_s, 100.0);
        assert_eq!((r.ratio_min, r.ratio_max), (Some(0.4), Some(0.6)));
        assert_eq!(r.rounds.len(), 3);
        // An even count reports the lower of the two middle rounds.
        let r = OpResult::of(
            BenchOp::Tokenize,
            vec![round(30.0, Some(100.0)), round(40.0, Some(100.0))],
        );
        assert_eq!(r.ratio, Some(0.3));
    }

    fn try_parse(args: &[&str]) -> Result<BenchCmd, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchCmd,
        }
        let argv = std::iter::once("bench").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.bench)
    }

    fn parse(args: &[&str]) -> BenchCmd {
        try_parse(args).unwrap()
    }

    #[test]
    fn target_bounds_out_of_range_are_refused() {
        for arg in [
            "--target-tokenize-ratio=1.5",
            "--target-detokenize-ratio=-0.1",
            "--target-tokenize-ratio=NaN",
        ] {
            let err = check_args(&parse(&[arg])).unwrap_err();
            assert!(err.contains("must be 0-1"), "{err}");
        }
        for arg in [
            "--target-p99-ms=0",
            "--target-p99-ms=-1",
            "--target-p99-ms=inf",
        ] {
            let err = check_args(&parse(&[arg])).unwrap_err();
            assert_eq!(err, "--target-p99-ms must be above 0");
        }
        assert_eq!(check_args(&parse(&["--target-p99-ms", "8"])), Ok(()));
    }

    #[test]
    fn rounds_out_of_range_are_refused_with_the_bound() {
        for bad in ["0", "51"] {
            assert_eq!(
                check_args(&parse(&["--rounds", bad])),
                Err("--rounds must be 1-50".to_owned())
            );
        }
        assert_eq!(check_args(&parse(&[])), Ok(()));
        assert_eq!(check_args(&parse(&["--rounds", "50"])), Ok(()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_vault_pid_whose_cpu_cannot_be_read_is_refused() {
        let own = std::process::id().to_string();
        assert_eq!(check_args(&parse(&["--vault-pid", &own])), Ok(()));
        assert_eq!(
            check_args(&parse(&["--vault-pid", "4294967295"])),
            Err("--vault-pid: cannot read the CPU time of process 4294967295 (/proc/4294967295/stat)".to_owned())
        );
    }

    #[test]
    fn new_cards_are_distinct_valid_test_numbers() {
        let cards: Vec<String> = (0..1000)
            .map(|n| new_card((u64::MAX - 500).wrapping_add(n)))
            .collect();
        for pan in &cards {
            assert_eq!(pan.len(), 16, "{}", pan.len());
            assert!(pan.starts_with(NEW_CARD_PREFIX));
            assert!(cardvault::card::Pan::parse(pan).is_ok());
        }
        let distinct: std::collections::HashSet<_> = cards.iter().collect();
        assert_eq!(distinct.len(), cards.len());
    }

    #[test]
    fn tokenize_requests_carry_new_cards_only_when_asked() {
        let load = |new_cards| Load {
            tenant: "demo".into(),
            tokens: Vec::new(),
            exp_year: 2031,
            new_cards,
        };
        let pans = |l: &Load| [0, 1, 2].map(|n| l.tokenize_request(n).pan);
        let repeated = pans(&load(None));
        assert_eq!(repeated[0], repeated[2]);
        assert!(repeated.iter().all(|p| TEST_PANS.contains(&p.as_str())));
        let new = pans(&load(Some(7)));
        assert!(new[0] != new[1] && new[1] != new[2] && new[0] != new[2]);
        assert!(new.iter().all(|p| p.starts_with(NEW_CARD_PREFIX)));
    }

    #[test]
    fn a_round_whose_baseline_did_nothing_ranks_lowest() {
        let failed = Round {
            vault: stats(90_000.0),
            baseline: Some(stats(0.0)),
            ratio: None,
            durable_baseline: None,
            durable_ratio: None,
        };
        let r = OpResult::of(
            BenchOp::Detokenize,
            vec![failed, round(50.0, Some(100.0)), round(60.0, Some(100.0))],
        );
        assert_eq!(r.ratio, Some(0.5));
        assert_eq!((r.ratio_min, r.ratio_max), (Some(0.5), Some(0.6)));
    }

    #[test]
    fn without_a_baseline_the_median_throughput_is_reported() {
        let r = OpResult::of(
            BenchOp::Metadata,
            vec![round(30.0, None), round(10.0, None), round(20.0, None)],
        );
        assert_eq!(r.vault.ops_per_s, 20.0);
        assert_eq!((r.ratio, r.ratio_min, r.ratio_max), (None, None, None));
    }
}
