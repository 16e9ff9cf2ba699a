//! Restart, crash and tamper behaviour, and the canary scan: a known PAN,
//! CVV and name pushed through every path must never appear in clear in
//! the data directory or the logs.

mod common;

use std::sync::Arc;

use cardvault::proto::{
    CvvStatus, DetokenizeRequest, TokenizeBatchItem, TokenizeBatchRequest, TokenizeRequest,
};
use cardvault::store::Store;
use cardvault::store::sled::SledStore;
use common::{Opts, VaultProcess, contains_bytes, contains_standalone, exp_year, files_under};
use tonic::Code;

fn card(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        tenant: "demo".into(),
        pan: pan.into(),
        exp_month: 6,
        exp_year: exp_year(),
        ..Default::default()
    }
}

fn detok(token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        tenant: "demo".into(),
        token: token.into(),
        purpose: "authorization".into(),
        include_cvv: true,
    }
}

#[tokio::test]
async fn graceful_restart_keeps_tokens_and_forgets_cvvs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v = VaultProcess::start(&data, &Opts::default());
    let mut m = v.client("merchant").await;
    let mut tokens = Vec::new();
    for _ in 0..20 {
        let t = m
            .tokenize(TokenizeRequest {
                cvv: Some("123".into()),
                ..card("5555555555554444")
            })
            .await
            .unwrap()
            .into_inner();
        tokens.push(t.token);
    }
    drop(m);
    v.stop().await;
    let v = VaultProcess::start(&data, &Opts::default());
    let mut p = v.client("processor").await;
    for t in &tokens {
        let c = p.detokenize(detok(t)).await.unwrap().into_inner();
        assert_eq!(c.pan, "5555555555554444");
        assert_eq!(
            c.cvv_status,
            CvvStatus::CvvNotAvailable as i32,
            "a restart must forget CVVs"
        );
    }
}

/// An acknowledged tokenize survives SIGKILL (group commit flushes before acking).
#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v = VaultProcess::start(&data, &Opts::default());
    let ch = v.channel("merchant").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut m = cardvault::proto::token_service_client::TokenServiceClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let pan = if i % 2 == 0 {
                "4111111111111111"
            } else {
                "6011111111111117"
            };
            (pan, m.tokenize(card(pan)).await.unwrap().into_inner().token)
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    v.kill9().await;
    let v = VaultProcess::start(&data, &Opts::default());
    let mut p = v.client("processor").await;
    for (pan, token) in &acked {
        let c = p.detokenize(detok(token)).await.unwrap().into_inner();
        assert_eq!(c.pan, *pan);
    }
}

/// Every acknowledged card read is in the audit log after SIGKILL: the
/// record is durable before the PAN leaves, so a crash cannot leave a read
/// that the blast-radius report does not count.
#[tokio::test]
async fn acknowledged_card_reads_stay_audited_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v = VaultProcess::start(&data, &Opts::default());
    let token = {
        let mut m = v.client("merchant").await;
        m.tokenize(card("4111111111111111"))
            .await
            .unwrap()
            .into_inner()
            .token
    };
    let ch = v.channel("processor").await;
    let mut tasks = Vec::new();
    for _ in 0..150 {
        let mut p = cardvault::proto::token_service_client::TokenServiceClient::new(ch.clone());
        let req = DetokenizeRequest {
            include_cvv: false,
            ..detok(&token)
        };
        tasks.push(tokio::spawn(async move { p.detokenize(req).await.is_ok() }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += u64::from(t.await.unwrap());
    }
    assert_eq!(acked, 150);
    v.kill9().await;

    let v = VaultProcess::start(&data, &Opts::default());
    let mut a =
        cardvault::proto::audit_service_client::AuditServiceClient::new(v.channel("auditor").await);
    let radius = a
        .blast_radius(cardvault::proto::BlastRadiusRequest {
            principal: "spiffe://cardvault.dev/demo/processor".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(radius.total_reads, acked, "{radius:?}");
    let report = a
        .verify(cardvault::proto::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
}

/// Flipping one ciphertext byte, or swapping two records' ciphertexts, makes
/// detokenize fail with DATA_LOSS (and no panic, no PAN in the message).
#[tokio::test]
async fn tampered_or_swapped_ciphertexts_fail_with_data_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v = VaultProcess::start(&data, &Opts::default());
    let mut m = v.client("merchant").await;
    let mut t = Vec::new();
    for pan in [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
    ] {
        t.push(m.tokenize(card(pan)).await.unwrap().into_inner().token);
    }
    drop(m);
    v.stop().await;
    {
        let store = SledStore::open(&data.join("sled")).unwrap();
        let read = |i: usize| {
            let store = &store;
            let token = t[i].clone();
            async move { store.get("demo", &token).await.unwrap().unwrap() }
        };
        let a0 = read(0).await;
        let mut a = a0.clone();
        let mid = a.envelope.len() / 2;
        a.envelope[mid] ^= 0x01;
        assert!(store.update(&a0, &a).await.unwrap());
        let (b0, c0) = (read(1).await, read(2).await);
        let (mut b, mut c) = (b0.clone(), c0.clone());
        std::mem::swap(&mut b.envelope, &mut c.envelope);
        assert!(store.update(&b0, &b).await.unwrap());
        assert!(store.update(&c0, &c).await.unwrap());
    }
    let v = VaultProcess::start(&data, &Opts::default());
    let mut p = v.client("processor").await;
    for tok in &t[..3] {
        let err = p.detokenize(detok(tok)).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{err:?}");
        assert!(
            err.message().contains("failed authentication"),
            "{}",
            err.message()
        );
        for pan in ["4111111111111111", "5555555555554444", "378282246310005"] {
            assert!(!err.message().contains(pan));
        }
    }
    // The untouched record still reads, and the server is still healthy.
    assert_eq!(
        p.detokenize(detok(&t[3])).await.unwrap().into_inner().pan,
        "6011111111111117"
    );
}

const CANARY_PAN: &str = "371449635398431";
const CANARY_CVV: &str = "8317";
const CANARY_NAME: &str = "Zebulon Canaryman";

#[tokio::test]
async fn canary_pan_cvv_and_name_never_reach_disk_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The SIEM copy of the audit log lives in the data dir, so it is scanned too.
    let siem = data.join("audit-siem.jsonl");
    let opts = Opts {
        env: vec![(
            "CARDVAULT_AUDIT_SIEM_FILE".into(),
            siem.display().to_string(),
        )],
        ..Default::default()
    };
    let v = VaultProcess::start(&data, &opts);
    let mut m = v.client("merchant").await;
    let mut p = v.client("processor").await;
    let with_secrets = || TokenizeRequest {
        cvv: Some(CANARY_CVV.into()),
        cardholder_name: Some(CANARY_NAME.into()),
        ..card(CANARY_PAN)
    };
    // Happy paths: single, dedupe, format-preserving, batch.
    let t = m.tokenize(with_secrets()).await.unwrap().into_inner();
    m.tokenize(TokenizeRequest {
        dedupe: true,
        ..with_secrets()
    })
    .await
    .unwrap();
    m.tokenize(TokenizeRequest {
        format: 3,
        ..with_secrets()
    })
    .await
    .unwrap();
    let batch = TokenizeBatchRequest {
        tenant: "demo".into(),
        items: vec![
            TokenizeBatchItem {
                reference: "ok".into(),
                pan: CANARY_PAN.into(),
                exp_month: 1,
                exp_year: exp_year(),
                cvv: Some(CANARY_CVV.into()),
                cardholder_name: Some(CANARY_NAME.into()),
            },
            TokenizeBatchItem {
                reference: "bad".into(),
                pan: CANARY_PAN.into(),
                exp_month: 13,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    m.tokenize_batch(batch).await.unwrap();
    // Error paths that carry the canary.
    let bad = [
        TokenizeRequest {
            exp_month: 13,
            ..with_secrets()
        },
        TokenizeRequest {
            exp_year: 2001,
            ..with_secrets()
        },
        TokenizeRequest {
            cvv: Some("837".into()),
            ..with_secrets()
        },
        TokenizeRequest {
            tenant: "BAD".into(),
            ..with_secrets()
        },
        TokenizeRequest {
            cardholder_name: Some(format!("{CANARY_NAME}\nJr")),
            ..with_secrets()
        },
        TokenizeRequest {
            cardholder_name: Some(format!("{CANARY_NAME}\u{7}")),
            ..with_secrets()
        },
    ];
    for req in bad {
        let e = m.tokenize(req).await.unwrap_err();
        assert!(!e.message().contains(CANARY_PAN) && !e.message().contains(CANARY_NAME));
    }
    for req in [
        DetokenizeRequest {
            token: CANARY_PAN.into(),
            ..detok("")
        },
        DetokenizeRequest {
            purpose: format!("refund {CANARY_PAN}"),
            ..detok(&t.token)
        },
    ] {
        let e = p.detokenize(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(!e.message().contains(CANARY_PAN));
    }
    // Reading it back, CVV included.
    let c = p.detokenize(detok(&t.token)).await.unwrap().into_inner();
    assert_eq!(
        (c.pan.as_str(), c.cvv.as_deref()),
        (CANARY_PAN, Some(CANARY_CVV))
    );
    let mut auditor =
        cardvault::proto::audit_service_client::AuditServiceClient::new(v.channel("auditor").await);
    // An auditor's filters go into the query's own audit record, so a card
    // number in them is refused too (naming the field, not echoing it).
    for (field, req) in [
        (
            "token",
            cardvault::proto::AuditQueryRequest {
                token: CANARY_PAN.into(),
                ..Default::default()
            },
        ),
        (
            "principal",
            cardvault::proto::AuditQueryRequest {
                principal: format!("cn={CANARY_PAN}"),
                ..Default::default()
            },
        ),
    ] {
        let e = auditor.query(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
        assert!(!e.message().contains(CANARY_PAN));
    }
    let e = auditor
        .blast_radius(cardvault::proto::BlastRadiusRequest {
            principal: CANARY_PAN.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(!e.message().contains(CANARY_PAN));
    // Every audit record, as the auditor sees it.
    let events = auditor
        .query(cardvault::proto::AuditQueryRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events.len() >= 10, "tokenize, errors and reads are audited");
    let audit_text = format!("{events:?}");
    assert!(!audit_text.contains(CANARY_PAN) && !audit_text.contains(CANARY_NAME));
    assert!(
        !contains_standalone(&audit_text, CANARY_CVV),
        "CVV in audit"
    );
    drop((m, p, auditor));
    let logs = v.logs();
    v.stop().await;

    assert!(logs.contains("detokenize"), "logs were captured");
    assert!(!logs.contains(CANARY_PAN), "PAN in logs");
    assert!(!contains_standalone(&logs, CANARY_CVV), "CVV in logs");
    assert!(!logs.contains(CANARY_NAME), "name in logs");
    let files = files_under(&data);
    assert!(files.iter().any(|f| f.to_string_lossy().contains("sled")));
    let siem_text = std::fs::read_to_string(&siem).unwrap();
    assert!(
        siem_text.contains("Detokenize"),
        "the SIEM copy was written"
    );
    assert!(
        !contains_standalone(&siem_text, CANARY_CVV),
        "CVV in the SIEM copy"
    );
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !contains_bytes(&bytes, CANARY_PAN.as_bytes()),
            "PAN in clear in {}",
            f.display()
        );
        assert!(
            !contains_bytes(&bytes, CANARY_NAME.as_bytes()),
            "name in clear in {}",
            f.display()
        );
        if f.components().any(|c| c.as_os_str() == "sled") {
            assert!(
                !contains_bytes(&bytes, CANARY_CVV.as_bytes()),
                "CVV in {}",
                f.display()
            );
        }
    }
}

/// The store conformance suite also holds for a store reopened from disk.
#[tokio::test]
async fn sled_store_reopens_with_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        cardvault::store::conformance::insert_and_get(&*s).await;
    }
    let s = SledStore::open(dir.path()).unwrap();
    assert!(s.get("acme", "tok_a").await.unwrap().is_some());
}
