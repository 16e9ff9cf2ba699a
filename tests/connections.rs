//! Connections that never finish a TLS handshake, or sit idle, must not
//! use up what legitimate clients need: file descriptors, handshake slots,
//! connection slots.

mod common;

use std::time::{Duration, Instant};

use cardvault::proto::TokenizeRequest;
use common::{Opts, VaultProcess, exp_year};

/// 2,000 TCP connections that send nothing, against a vault limited to
/// 1,024 open files (a common default): a client with a certificate
/// still connects and tokenizes at once.
#[tokio::test]
async fn two_thousand_idle_connects_do_not_stop_a_legitimate_client() {
    // The test itself holds thousands of sockets.
    cardvault::server::hardening::raise_open_files();
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        nofile: Some(1024),
        env: vec![("CARDVAULT_METRICS_LISTEN".into(), "127.0.0.1:0".into())],
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    // Connected before the attack, used after it.
    let mut before = v.client("merchant").await;
    // All at once, as an attacker would; a connect the kernel does not
    // complete within 3 s is given up (its SYN may still sit in the
    // listen queue).
    let t0 = Instant::now();
    let attempts: Vec<_> = (0..2000)
        .map(|_| {
            let addr = v.addr.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut idle = Vec::new();
    for a in attempts {
        if let Some(s) = a.await.unwrap() {
            idle.push(s);
        }
    }
    eprintln!(
        "{} of 2,000 idle connects made in {:?}",
        idle.len(),
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = || TokenizeRequest {
        tenant: "demo".into(),
        pan: "4111111111111111".into(),
        exp_month: 12,
        exp_year: exp_year(),
        ..Default::default()
    };
    let started = Instant::now();
    let fresh = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = v.client("merchant").await;
        c.tokenize(req()).await.map(|_| ())
    })
    .await;
    eprintln!("legitimate client served in {:?}", started.elapsed());
    assert!(
        matches!(fresh, Ok(Ok(()))),
        "a new legitimate client was stopped: {fresh:?} after {:?}",
        started.elapsed()
    );
    let old = tokio::time::timeout(Duration::from_secs(5), before.tokenize(req())).await;
    assert!(matches!(old, Ok(Ok(_))), "an existing client was stopped");
    // The idle connects were closed oldest first to make room.
    let metrics = v.http_get("/metrics").await;
    let evicted = metric(&metrics, "cardvault_handshakes_evicted_total");
    assert!(evicted >= 1000, "{evicted} handshakes evicted");
    drop(idle);
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Past the connection limit a new connection is closed at once; a
/// connection that sends nothing for the idle timeout is closed.
#[tokio::test]
async fn connections_are_capped_and_idle_ones_closed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![
            ("CARDVAULT_METRICS_LISTEN".into(), "127.0.0.1:0".into()),
            ("CARDVAULT_MAX_CONNECTIONS".into(), "2".into()),
            ("CARDVAULT_IDLE_TIMEOUT_SECS".into(), "2".into()),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let req = TokenizeRequest {
        tenant: "demo".into(),
        pan: "4111111111111111".into(),
        exp_month: 12,
        exp_year: exp_year(),
        ..Default::default()
    };
    let mut a = v.client("merchant").await;
    let mut b = v.client("merchant").await;
    a.tokenize(req.clone()).await.unwrap();
    b.tokenize(req.clone()).await.unwrap();
    assert_eq!(
        metric(&v.http_get("/metrics").await, "cardvault_connections_open"),
        2
    );
    // A third is closed before its handshake.
    let third = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = v.client_result("merchant").await?;
        c.tokenize(req.clone()).await.map_err(|e| e.to_string())
    })
    .await;
    assert!(!matches!(third, Ok(Ok(_))), "a third connection was served");
    assert!(
        metric(
            &v.http_get("/metrics").await,
            "cardvault_connections_refused_total"
        ) >= 1
    );
    // Silent for longer than the idle timeout: both are closed.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        metric(&v.http_get("/metrics").await, "cardvault_connections_open"),
        0
    );
}
