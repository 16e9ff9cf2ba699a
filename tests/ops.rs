//! Operability: Prometheus metrics, structured JSON logs, redaction.

mod common;

use cardvault::proto::{DetokenizeRequest, TokenizeRequest};
use common::{Opts, VaultProcess, exp_year};
use tonic::Code;

const CANARY_PAN: &str = "6011000990139424";
const CANARY_CVV: &str = "914";

fn card(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        tenant: "demo".into(),
        pan: pan.into(),
        exp_month: 2,
        exp_year: exp_year(),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_count_requests_by_rpc_code_and_role_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![
            ("CARDVAULT_METRICS_LISTEN".into(), "127.0.0.1:0".into()),
            // Asked for: per-tenant gauges carry the tenant's name.
            ("CARDVAULT_METRICS_TENANT_LABELS".into(), "true".into()),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let mut m = v.client("merchant").await;
    let t = m
        .tokenize(TokenizeRequest {
            cvv: Some(CANARY_CVV.into()),
            ..card(CANARY_PAN)
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    m.tokenize(card("4111111111111112")).await.unwrap_err();
    let req = DetokenizeRequest {
        tenant: "demo".into(),
        token: t.clone(),
        purpose: "p".into(),
        include_cvv: true,
    };
    assert_eq!(
        m.detokenize(req.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    v.client("processor").await.detokenize(req).await.unwrap();

    // Gauges read from the store are refreshed in the background.
    let mut resp = v.http_get("/metrics").await;
    for _ in 0..40 {
        if resp.contains("cardvault_data_key_active_version{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        resp = v.http_get("/metrics").await;
    }
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    for line in [
        r#"cardvault_requests_total{rpc="cardvault.v1.TokenService/Tokenize",code="OK",role="merchant"} 1"#,
        r#"cardvault_requests_total{rpc="cardvault.v1.TokenService/Tokenize",code="INVALID_ARGUMENT",role="merchant"} 1"#,
        r#"cardvault_requests_total{rpc="cardvault.v1.TokenService/Detokenize",code="PERMISSION_DENIED",role="merchant"} 1"#,
        r#"cardvault_requests_total{rpc="cardvault.v1.TokenService/Detokenize",code="OK",role="processor"} 1"#,
        r#"cardvault_request_duration_seconds_count{rpc="cardvault.v1.TokenService/Detokenize"} 2"#,
        "cardvault_sealed 0",
        "cardvault_cvv_held 0",
        "cardvault_collect_sessions 0",
        "cardvault_rate_limited_total 0",
        "cardvault_audit_write_failures_total 0",
        "cardvault_audit_sink_dropped_total 0",
        r#"cardvault_data_key_active_version{tenant="demo"} 1"#,
    ] {
        assert!(resp.lines().any(|l| l == line), "missing {line}\n{resp}");
    }
    assert!(resp.contains("cardvault_audit_records "));
    assert!(
        !resp.contains(CANARY_PAN) && !resp.contains(&t),
        "no PAN or token in metrics"
    );
    assert!(!resp.contains("spiffe://"), "no principal in labels");
    assert!(v.http_get("/other").await.starts_with("HTTP/1.1 404"));
}

/// By default no tenant name is in any label (they are customer names);
/// the per-tenant gauges are summed up. Scrapes beyond the concurrent cap
/// are turned away at once, and a scrape does not wait on the store.
#[tokio::test]
async fn metrics_name_no_tenant_by_default_and_cap_scrapes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![("CARDVAULT_METRICS_LISTEN".into(), "127.0.0.1:0".into())],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    v.client("merchant")
        .await
        .tokenize(card("4111111111111111"))
        .await
        .unwrap();
    let mut resp = v.http_get("/metrics").await;
    for _ in 0..40 {
        if resp.contains("cardvault_tenants_with_keys 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        resp = v.http_get("/metrics").await;
    }
    assert!(resp.contains("cardvault_tenants_with_keys 1"), "{resp}");
    assert!(resp.contains("cardvault_data_key_versions_max 1"), "{resp}");
    assert!(
        !resp.contains("tenant=") && !resp.contains("demo"),
        "{resp}"
    );

    // Many scrapers that connect and hold their connections without
    // finishing the request: past the cap, the next is turned away.
    let addr = v.metrics_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let turned_away = v.http_get("/metrics").await;
    assert!(turned_away.starts_with("HTTP/1.1 503"), "{turned_away}");
    drop(held);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(v.http_get("/metrics").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn json_logs_carry_request_ids_and_no_secrets_on_any_error_path() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![("CARDVAULT_LOG_FORMAT".into(), "json".into())],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let mut m = v.client("merchant").await;
    let mut p = v.client("processor").await;
    let ok = m
        .tokenize(TokenizeRequest {
            cvv: Some(CANARY_CVV.into()),
            ..card(CANARY_PAN)
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // Every kind of failure, each carrying the canary somewhere.
    let bad_tokenize = [
        TokenizeRequest {
            exp_month: 0,
            ..card(CANARY_PAN)
        },
        TokenizeRequest {
            exp_year: 1999,
            ..card(CANARY_PAN)
        },
        TokenizeRequest {
            cvv: Some("12".into()),
            ..card(CANARY_PAN)
        },
        TokenizeRequest {
            cvv: Some(format!("{CANARY_CVV}x")),
            ..card(CANARY_PAN)
        },
        TokenizeRequest {
            tenant: "other".into(),
            ..card(CANARY_PAN)
        },
        TokenizeRequest {
            format: 42,
            cvv: Some(CANARY_CVV.into()),
            ..card(CANARY_PAN)
        },
        card(&format!("{CANARY_PAN}0")),
        card(&CANARY_PAN[..15]),
    ];
    for r in bad_tokenize {
        m.tokenize(r).await.unwrap_err();
    }
    let bad_detokenize = [
        DetokenizeRequest {
            tenant: "demo".into(),
            token: CANARY_PAN.into(),
            purpose: "x".into(),
            include_cvv: true,
        },
        DetokenizeRequest {
            tenant: "demo".into(),
            token: ok.clone(),
            purpose: CANARY_PAN.into(),
            include_cvv: true,
        },
        DetokenizeRequest {
            tenant: "other".into(),
            token: ok.clone(),
            purpose: "x".into(),
            include_cvv: true,
        },
    ];
    for r in bad_detokenize {
        p.detokenize(r.clone()).await.unwrap_err();
        m.detokenize(r).await.unwrap_err();
    }
    // A caller-supplied request id is carried into the log lines.
    let mut req = tonic::Request::new(DetokenizeRequest {
        tenant: "demo".into(),
        token: ok.clone(),
        purpose: "traced".into(),
        include_cvv: true,
    });
    req.metadata_mut()
        .insert("x-request-id", "trace-abc-123".parse().unwrap());
    let c = p.detokenize(req).await.unwrap().into_inner();
    assert_eq!(c.cvv.as_deref(), Some(CANARY_CVV));
    drop((m, p));
    let logs = std::fs::read_to_string(&v.stderr_log).unwrap();
    v.stop().await;
    let mut parsed = 0;
    let mut traced = false;
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        let j: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {e}: {line}"));
        parsed += 1;
        if j["fields"]["request_id"] == "trace-abc-123" {
            traced = true;
        }
    }
    assert!(parsed > 10, "JSON log lines: {parsed}");
    assert!(traced, "request id in logs");
    assert!(!logs.contains(CANARY_PAN), "PAN in logs");
    assert!(
        !common::contains_standalone(&logs, CANARY_CVV),
        "CVV in logs"
    );
}

/// The running vault cannot write a core file (keys live in its memory):
/// its core-size limit is 0, soft and hard.
#[tokio::test]
async fn the_running_vault_writes_no_core_dumps() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", v.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core size line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    v.stop().await;
}

/// A SIGTERM sent as soon as the vault prints its listening line drains
/// and exits cleanly: the handler is in place by then, rather than
/// installed when the server first polls for it (the default action would
/// kill the process). Repeated, since the old window was short.
#[tokio::test]
async fn a_sigterm_right_after_the_listening_line_is_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10 {
        let v = VaultProcess::start(&dir.path().join(format!("data{i}")), &Opts::default());
        v.stop().await;
    }
}

/// A KEK file its group or others can read is reported at start (the KEK
/// unlocks every card); an owner-only one is not.
#[tokio::test]
async fn a_kek_file_readable_by_others_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    for (mode, reported) in [(0o644, true), (0o600, false)] {
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek.hex");
        std::fs::write(
            &kek,
            cardvault::crypto::keys::SecretKey::generate()
                .to_hex()
                .as_str(),
        )
        .unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(mode)).unwrap();
        let opts = Opts {
            env: vec![("CARDVAULT_KEK_FILE".into(), kek.display().to_string())],
            ..Default::default()
        };
        let v = VaultProcess::start_serve(&dir.path().join("data"), &opts);
        // Unsealed at start from the file: it was read.
        v.client("merchant")
            .await
            .tokenize(cardvault::proto::TokenizeRequest {
                tenant: "demo".into(),
                pan: "4111111111111111".into(),
                exp_month: 12,
                exp_year: common::exp_year(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            v.logs().contains("readable by its group or others"),
            reported,
            "mode {mode:o}"
        );
        v.stop().await;
    }
}

/// With swap on and memory unlocked, secrets in memory (PANs, CVVs,
/// collect session keys, data keys) could be written to disk: production
/// start refuses, unless `keys.allow_swap` accepts it (then it warns).
/// Dev mode warns. The swaps table is a stand-in (`CARDVAULT_PROC_SWAPS`).
#[tokio::test]
async fn production_refuses_to_start_with_swap_on_and_memory_unlocked() {
    let dir = tempfile::tempdir().unwrap();
    let swaps = dir.path().join("swaps");
    std::fs::write(
        &swaps,
        "Filename\tType\tSize\tUsed\tPriority\n/swapfile                               file\t\t1048572\t\t0\t\t-2\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let config = VaultProcess::serve_config(&data);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cardvault"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("CARDVAULT_PROC_SWAPS", &swaps)
        .env_remove("CARDVAULT_ALLOW_SWAP")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let Some(status) = status else {
        child.kill().unwrap();
        panic!("serve started with swap on and memory unlocked");
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(
        err.contains("swap is on (/swapfile)") && err.contains("keys.allow_swap"),
        "{err}"
    );

    // Accepted explicitly: it starts, and says why it should not have to.
    let opts = Opts {
        env: vec![
            ("CARDVAULT_PROC_SWAPS".into(), swaps.display().to_string()),
            ("CARDVAULT_ALLOW_SWAP".into(), "true".into()),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start_serve(&data, &opts);
    assert!(v.logs().contains("swap is on (/swapfile)"));
    v.stop().await;

    // Dev mode warns and runs.
    let dev = dir.path().join("dev");
    let opts = Opts {
        env: vec![("CARDVAULT_PROC_SWAPS".into(), swaps.display().to_string())],
        ..Default::default()
    };
    let v = VaultProcess::start(&dev, &opts);
    assert!(v.logs().contains("swap is on (/swapfile)"));
}
