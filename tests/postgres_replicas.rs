//! Two vault processes on one PostgreSQL database: tokens, key rotations
//! and the audit chain are shared; CVVs stay node-local.

mod common;

use cardvault::proto::audit_service_client::AuditServiceClient;
use cardvault::proto::key_service_client::KeyServiceClient;
use cardvault::proto::token_service_client::TokenServiceClient;
use cardvault::proto::{
    AuditQueryRequest, CvvStatus, DetokenizeRequest, GetMetadataRequest, RotateDataKeyRequest,
    TokenizeRequest, VerifyAuditRequest,
};
use common::{Opts, VaultProcess, exp_year};
use tonic::transport::Channel;

fn card(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        tenant: "demo".into(),
        pan: pan.into(),
        exp_month: 9,
        exp_year: exp_year(),
        ..Default::default()
    }
}

fn detok(token: &str, include_cvv: bool) -> DetokenizeRequest {
    DetokenizeRequest {
        tenant: "demo".into(),
        token: token.into(),
        purpose: "replica test".into(),
        include_cvv,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_tokens_keys_and_one_audit_chain() {
    let Some(cluster) = common::pg::cluster() else {
        return;
    };
    let url = cluster.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let kek = cardvault::crypto::keys::SecretKey::generate()
        .to_hex()
        .to_string();
    let opts = Opts {
        env: vec![
            ("CARDVAULT_STORE_BACKEND".into(), "postgres".into()),
            ("CARDVAULT_STORE_URL".into(), url),
            ("CARDVAULT_KEK".into(), kek),
            ("CARDVAULT_AUDIT_CHECKPOINT_EVERY".into(), "25".into()),
        ],
        ..Default::default()
    };
    // Each names itself in the audit records it writes.
    let named = |id: &str| {
        let mut o = opts.clone();
        o.env.push(("CARDVAULT_AUDIT_REPLICA_ID".into(), id.into()));
        o
    };
    let a = VaultProcess::start_serve(&dir.path().join("a"), &named("replica-a"));
    let b = VaultProcess::start_serve(&dir.path().join("b"), &named("replica-b"));

    // A token made through A reads through B.
    let mut ma = a.client("merchant").await;
    let mut pb = b.client("processor").await;
    let t = ma
        .tokenize(TokenizeRequest {
            cvv: Some("321".into()),
            ..card("4111111111111111")
        })
        .await
        .unwrap()
        .into_inner();
    let c = pb
        .detokenize(detok(&t.token, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.pan, "4111111111111111");
    // The CVV lives in A's memory only: B returns the card without it.
    assert_eq!(c.cvv_status, CvvStatus::CvvNotAvailable as i32);
    let c = a
        .client("processor")
        .await
        .detokenize(detok(&t.token, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.cvv.as_deref(),
        Some("321"),
        "the node that holds the CVV returns it"
    );
    // The audit records of that token say which replica served each call.
    let events = AuditServiceClient::new(b.channel("auditor").await)
        .query(AuditQueryRequest {
            token: t.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let served: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.replica.as_str()))
        .collect();
    assert_eq!(
        served,
        [
            ("Tokenize", "replica-a"),
            ("Detokenize", "replica-b"),
            ("Detokenize", "replica-a")
        ]
    );

    // A rotation made on A: B decrypts A's new records at once and uses the
    // new version for its own writes within the key cache TTL.
    KeyServiceClient::new(a.channel("admin").await)
        .rotate_data_key(RotateDataKeyRequest {
            tenant: "demo".into(),
            all: false,
        })
        .await
        .unwrap();
    let t2 = ma
        .tokenize(card("5555555555554444"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pb.detokenize(detok(&t2.token, false))
            .await
            .unwrap()
            .into_inner()
            .pan,
        "5555555555554444"
    );
    tokio::time::sleep(
        cardvault::vault::keyring::KEY_CACHE_TTL + std::time::Duration::from_millis(300),
    )
    .await;
    let mut mb = b.client("merchant").await;
    let t3 = mb
        .tokenize(card("378282246310005"))
        .await
        .unwrap()
        .into_inner();
    let meta = mb
        .get_metadata(GetMetadataRequest {
            tenant: "demo".into(),
            token: t3.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.key_version, 2, "B writes with the version A created");

    // Concurrent writers on both replicas still form one valid chain.
    let mut tasks = Vec::new();
    for (i, v) in [&a, &b, &a, &b].into_iter().enumerate() {
        let m = TokenServiceClient::new(v.channel("merchant").await);
        let p = TokenServiceClient::new(v.channel("processor").await);
        tasks.push(tokio::spawn(worker(m, p, i)));
    }
    let mut made = 0;
    for t in tasks {
        made += t.await.unwrap();
    }
    assert_eq!(made, 4 * 40);
    for v in [&a, &b] {
        let report = AuditServiceClient::new(v.channel("auditor").await)
            .verify(VerifyAuditRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(report.ok, "{report:?}");
        assert!(report.records > 4 * 40 * 2, "{report:?}");
        assert!(report.checkpoints >= 10, "{report:?}");
    }
}

async fn worker(
    mut m: TokenServiceClient<Channel>,
    mut p: TokenServiceClient<Channel>,
    i: usize,
) -> usize {
    let pans = ["4111111111111111", "6011111111111117"];
    let mut n = 0;
    for _ in 0..40 {
        let t = m.tokenize(card(pans[i % 2])).await.unwrap().into_inner();
        let c = p
            .detokenize(detok(&t.token, false))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c.pan, pans[i % 2]);
        n += 1;
    }
    n
}

/// The enumeration guard counts the cards tokenized through every replica
/// in one place: a bucket filled half through A and half through B locks
/// for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enumeration_guard_counts_across_replicas() {
    let Some(cluster) = common::pg::cluster() else {
        return;
    };
    let url = cluster.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let kek = cardvault::crypto::keys::SecretKey::generate()
        .to_hex()
        .to_string();
    let opts = Opts {
        env: vec![
            ("CARDVAULT_STORE_BACKEND".into(), "postgres".into()),
            ("CARDVAULT_STORE_URL".into(), url),
            ("CARDVAULT_KEK".into(), kek),
        ],
        ..Default::default()
    };
    let a = VaultProcess::start_serve(&dir.path().join("a"), &opts);
    let b = VaultProcess::start_serve(&dir.path().join("b"), &opts);
    let (mut ma, mut mb) = (a.client("merchant").await, b.client("merchant").await);
    // Nine Luhn-valid cards with the same first six, last four and length.
    let cards: Vec<String> = (0..100_000)
        .map(|m| format!("411111{m:06}1111"))
        .filter(|p| cardvault::card::luhn_valid(p))
        .take(9)
        .collect();
    for (i, pan) in cards[..8].iter().enumerate() {
        let client = if i % 2 == 0 { &mut ma } else { &mut mb };
        client.tokenize(card(pan)).await.unwrap();
    }
    // The ninth locks the bucket, and then it is locked on both replicas.
    let s = mb.tokenize(card(&cards[8])).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    let sa = ma.tokenize(card(&cards[0])).await.unwrap_err();
    assert_eq!(sa.message(), s.message());
}

/// At `debug` (as these tests run the vault), PostgreSQL statement
/// parameters (record envelopes, wrapped keys) must not reach the log:
/// tokio-postgres logs them at debug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logging_prints_no_statement_parameters() {
    let Some(cluster) = common::pg::cluster() else {
        return;
    };
    let url = cluster.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let kek = cardvault::crypto::keys::SecretKey::generate()
        .to_hex()
        .to_string();
    let opts = Opts {
        env: vec![
            ("CARDVAULT_STORE_BACKEND".into(), "postgres".into()),
            ("CARDVAULT_STORE_URL".into(), url),
            ("CARDVAULT_KEK".into(), kek),
            // Even when asked for by name.
            ("CARDVAULT_LOG".into(), "debug,tokio_postgres=debug".into()),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start_serve(&dir.path().join("a"), &opts);
    let t = v
        .client("merchant")
        .await
        .tokenize(card("4111111111111111"))
        .await
        .unwrap()
        .into_inner();
    v.client("processor")
        .await
        .detokenize(detok(&t.token, false))
        .await
        .unwrap();
    let logs = v.logs();
    assert!(logs.contains("DEBUG"), "the vault logs at debug");
    for leak in ["with parameters", "executing statement"] {
        assert!(!logs.contains(leak), "{leak:?} in the log");
    }
}
