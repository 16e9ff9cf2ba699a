//! Smoke test of `cardvault-bench`: it runs for a second against a real dev
//! vault (and the in-process baselines, no-op and durable) and reports work
//! done. No timing assertions: only that requests succeeded, that CPU time
//! was counted and that the durable baseline's scratch log is removed.
//!
//! The vault is served in this test's process, from the library, exactly
//! as `cardvault dev` serves it (the bench crate cannot run the other
//! package's binary); `--vault-pid` is then this process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use tokio::sync::oneshot;

/// A dev vault served from a temporary directory, and an empty directory
/// for the durable baseline's scratch log beside it.
struct Setup {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    data_dir: PathBuf,
    scratch: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<Result<(), cardvault::server::StartError>>,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("vault");
        let listen = "127.0.0.1:0".parse().unwrap();
        let cfg = cardvault::server::dev_config(None, &data_dir, listen).unwrap();
        let kek = cardvault::server::dev_kek(&data_dir).unwrap();
        let (ready, addr) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            cardvault::server::serve(
                &cfg,
                cardvault::server::KeySource::Dev(kek),
                move |addr| {
                    let _ = ready.send(addr);
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await
        });
        let addr = addr.await.expect("the vault starts");
        let scratch = dir.path().join("durable");
        std::fs::create_dir(&scratch).unwrap();
        Setup {
            _dir: dir,
            addr,
            data_dir,
            scratch,
            stop: Some(stop),
            served,
        }
    }

    /// `cardvault-bench` against the vault, with both baselines (the
    /// durable one's scratch log under `scratch`).
    fn bench(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cardvault-bench"));
        cmd.arg("--addr")
            .arg(format!("https://{}", self.addr))
            .arg("--dev-dir")
            .arg(&self.data_dir)
            .args(["--baseline", "--durable-baseline"])
            .arg(&self.scratch);
        cmd
    }

    /// The scratch log went into a directory of its own, removed at the end.
    fn assert_scratch_removed(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.scratch).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// Shuts the vault down and checks that it served without error.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let served = (&mut self.served).await.unwrap();
        assert!(
            served.is_ok(),
            "the vault failed: {:?}",
            served.err().map(|e| e.to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_and_reports_ops() {
    let setup = Setup::start().await;
    let out = setup
        .bench()
        .args([
            "--duration",
            "0.5",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--tokens",
            "8",
            "--op",
            "mix",
            "--json",
            "--new-cards",
            "--vault-pid",
        ])
        .arg(std::process::id().to_string())
        .output()
        .expect("run cardvault-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    // Never a card number in the bench's output: neither the two test
    // cards nor the new cards (`400000` and ten more digits).
    for pan in ["4111111111111111", "5555555555554444"] {
        assert!(!stdout.contains(pan) && !stderr.contains(pan));
    }
    for out in [&stdout, &stderr] {
        let leaked = out.match_indices("400000").any(|(i, _)| {
            let rest = &out.as_bytes()[i + 6..];
            rest.len() >= 10 && rest[..10].iter().all(u8::is_ascii_digit)
        });
        assert!(!leaked, "a new card number in the bench's output");
    }
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["op"], "mix");
    for server in ["vault", "baseline", "durable_baseline"] {
        let s = &r[server];
        assert!(s["ops"].as_u64().unwrap() > 0, "{server}: no ops: {s}");
        assert_eq!(s["errors"].as_u64().unwrap(), 0, "{server}: errors: {s}");
        assert!(s["p99_ms"].as_f64().unwrap() >= s["p50_ms"].as_f64().unwrap());
        // Thousands of requests: CPU time of whole 10 ms ticks on both sides
        // (the vault process, or the baseline's threads; and the client).
        for side in ["server_cpu_us", "client_cpu_us"] {
            let us = s[side].as_f64();
            assert!(us.is_some_and(|us| us > 0.0), "{server}: {side}: {s}");
        }
    }
    let ratio = r["ratio"].as_f64().unwrap();
    assert!(ratio > 0.0);
    assert!(r["durable_ratio"].as_f64().unwrap() > 0.0);
    setup.assert_scratch_removed();
    // Two rounds, each with both servers; the reported ratio is one of them.
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|x| {
        ["vault", "baseline", "durable_baseline"]
            .iter()
            .all(|s| x[*s]["ops"].as_u64().unwrap() > 0)
    }));
    assert!(rounds.iter().any(|x| x["ratio"].as_f64() == Some(ratio)));
    assert!(r["ratio_min"].as_f64().unwrap() <= ratio && ratio <= r["ratio_max"].as_f64().unwrap());
    assert!(r.get("targets").is_none() && report.get("targets").is_none());

    // --check-targets: three checks for tokenize (ratio, p99, errors),
    // the differing client count named, and the exit status says whether
    // one was missed (which this short run cannot predict).
    let out = setup
        .bench()
        .args(["--op", "tokenize", "--duration", "0.3", "--warmup", "0"])
        .args(["--concurrency", "4", "--connections", "1", "--tokens", "4"])
        .args(["--check-targets", "--json"])
        .output()
        .expect("run cardvault-bench --check-targets");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object, met or missed");
    let targets = &report["targets"];
    let checks = targets["checks"].as_array().unwrap();
    let measures: Vec<_> = checks
        .iter()
        .map(|c| c["measure"].as_str().unwrap())
        .collect();
    assert_eq!(measures, ["ratio", "p99_ms", "errors"]);
    assert!(checks.iter().all(|c| c["op"] == "tokenize"));
    assert!(
        targets["conditions"][0]
            .as_str()
            .unwrap()
            .contains("4 concurrent clients, not 64")
    );
    let missed = checks.iter().any(|c| c["met"] == false);
    assert_eq!(out.status.success(), !missed, "{stderr}");
    assert_eq!(stderr.contains("targets missed: "), missed, "{stderr}");
    setup.assert_scratch_removed();
    setup.stop().await;
}

/// Interrupted mid-run (Ctrl-C), the bench exits with an error, no report,
/// and removes the durable baseline's scratch log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_bench_removes_its_scratch_log() {
    let setup = Setup::start().await;
    let mut bench = setup
        .bench()
        .args(["--op", "detokenize", "--duration", "600", "--warmup", "0"])
        .args(["--concurrency", "4", "--connections", "1", "--tokens", "4"])
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cardvault-bench");
    // The scratch log exists once the durable baseline has started.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&setup.scratch).unwrap().next().is_none() {
        assert!(std::time::Instant::now() < deadline, "no scratch log");
        assert!(bench.try_wait().unwrap().is_none(), "bench exited early");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let kill = Command::new("kill")
        .args(["-INT", &bench.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = bench.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(out.stdout.is_empty(), "no report when interrupted");
    setup.assert_scratch_removed();
    setup.stop().await;
}
