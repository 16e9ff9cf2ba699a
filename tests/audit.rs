//! The audit log: chain integrity at volume, tamper detection, blast
//! radius, fail-closed reads, and the AuditService over gRPC.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use cardvault::Error;
use cardvault::audit::{AuditBody, AuditRecord};
use cardvault::card::{Brand, Cvv};
use cardvault::crypto::keys::SecretKey;
use cardvault::fields::{Purpose, Tenant};
use cardvault::proto::audit_service_client::AuditServiceClient;
use cardvault::proto::{
    AuditQueryRequest, BlastRadiusRequest, DetokenizeRequest, TokenizeRequest, VerifyAuditRequest,
};
use cardvault::store::Store;
use cardvault::store::sled::{RawAudit, SledStore};
use cardvault::token::Token;
use cardvault::vault::keyring::AUDIT_KEY_NAME;
use cardvault::vault::{
    CallContext, CvvOutcome, NewCard, TokenizeOptions, Unmetered, Vault, VaultConfig,
};
use common::flaky::Flaky;
use common::{Opts, VaultProcess, exp_year};
use prost::Message;

fn card(pan: &str) -> NewCard {
    NewCard::sample(pan)
}

fn ctx(principal: &str) -> CallContext {
    CallContext {
        request_id: "req".into(),
        principal: principal.into(),
        roles: vec!["processor".into()],
        peer: "127.0.0.1:1".into(),
    }
}

fn t(name: &str) -> Tenant {
    Tenant::parse(name).unwrap()
}

async fn open_vault(dir: &std::path::Path, every: u64) -> (Arc<Vault>, Arc<SledStore>) {
    let store = Arc::new(SledStore::open(dir).unwrap());
    let cfg = VaultConfig {
        checkpoint_every: every,
        ..Default::default()
    };
    let v = Vault::new(store.clone() as Arc<dyn Store>, cfg);
    v.unseal(SecretKey::generate()).await.unwrap();
    (Arc::new(v), store)
}

/// Tokenizes the Visa test card for tenant `x`.
async fn tokenize_test_card(v: &Vault) {
    v.tokenize(
        &ctx("m"),
        &t("x"),
        card("4111111111111111"),
        TokenizeOptions::default(),
        &Unmetered,
    )
    .await
    .unwrap();
}

/// Runs `n` mixed operations (tokenize, detokenize, metadata, delete, failures).
async fn mixed_ops(v: &Arc<Vault>, n: usize) {
    let purpose = Purpose::parse("load").unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let v = v.clone();
        let purpose = purpose.clone();
        tasks.push(tokio::spawn(async move {
            let c = ctx(&format!("worker-{w}"));
            let mut ops = 0;
            let mut last: Option<Token> = None;
            while ops < n / 8 {
                let meta = v
                    .tokenize(
                        &c,
                        &t("load"),
                        card("4111111111111111"),
                        TokenizeOptions::default(),
                        &Unmetered,
                    )
                    .await
                    .unwrap();
                let tok = Token::parse(&meta.token).unwrap();
                v.detokenize(&c, &t("load"), &tok, &purpose, false)
                    .await
                    .unwrap();
                v.metadata(&c, &t("load"), &tok).await.unwrap();
                // A failed read is audited too.
                let missing = Token::parse("tok_AAAAAAAAAAAAAAAAAAAAAA").unwrap();
                assert_eq!(
                    v.detokenize(&c, &t("load"), &missing, &purpose, false)
                        .await
                        .err(),
                    Some(Error::NotFound)
                );
                if let Some(prev) = last.take() {
                    v.delete(&c, &t("load"), &prev).await.unwrap();
                    ops += 1;
                }
                last = Some(tok);
                ops += 4;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_verifies_after_10k_mixed_operations() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = open_vault(dir.path(), 1000).await;
    mixed_ops(&v, 10_000).await;
    v.checkpoint_now().await.unwrap();
    let report = v.verify_audit(&ctx("auditor")).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.records >= 10_000, "{report:?}");
    assert!(report.checkpoints >= 10, "{report:?}");
    let head = store.audit_head().await.unwrap().unwrap();
    assert_eq!(
        report.last_checkpoint_seq,
        head.0 - 1,
        "the final checkpoint covers the tail (verify appends after)"
    );
}

/// Builds a small log, then applies `tamper` to the stored records and
/// returns what verification says.
async fn tampered(tamper: impl FnOnce(&RawAudit)) -> cardvault::audit::VerifyReport {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = open_vault(dir.path(), 10).await;
    let c = ctx("p");
    for _ in 0..25 {
        v.tokenize(
            &c,
            &t("x"),
            card("5555555555554444"),
            TokenizeOptions::default(),
            &Unmetered,
        )
        .await
        .unwrap();
    }
    v.checkpoint_now().await.unwrap();
    assert!(v.verify_audit(&c).await.unwrap().ok());
    // The verify itself appended record 27 (25 tokenize + tenant-first-use has none; + verify).
    tamper(&store.raw_audit());
    v.verify_audit(&c).await.unwrap()
}

fn last_seq(raw: &RawAudit) -> u64 {
    raw.last_seq()
}

fn get(raw: &RawAudit, seq: u64) -> AuditRecord {
    raw.get(seq).unwrap()
}

fn put(raw: &RawAudit, seq: u64, r: &AuditRecord) {
    raw.put(seq, r).unwrap();
}

#[tokio::test]
async fn an_edited_record_is_located() {
    let rep = tampered(|tree| {
        let mut r = get(tree, 7);
        let mut b = r.decode_body().unwrap();
        b.principal = "someone-else".into();
        r.body = b.encode_to_vec();
        put(tree, 7, &r);
    })
    .await;
    assert_eq!((rep.first_bad_seq, rep.ok()), (7, false), "{rep:?}");
    assert!(rep.problem.contains("altered"), "{rep:?}");
}

#[tokio::test]
async fn a_deleted_record_is_located() {
    let rep = tampered(|tree| {
        tree.remove(12).unwrap();
    })
    .await;
    assert_eq!(rep.first_bad_seq, 12, "{rep:?}");
    assert!(rep.problem.contains("missing"), "{rep:?}");
}

#[tokio::test]
async fn reordered_records_are_located() {
    let rep = tampered(|tree| {
        let (a, b) = (get(tree, 15), get(tree, 16));
        put(tree, 15, &b);
        put(tree, 16, &a);
    })
    .await;
    assert_eq!(rep.first_bad_seq, 15, "{rep:?}");
}

#[tokio::test]
async fn an_inserted_record_is_located() {
    let rep = tampered(|tree| {
        // Shift records 5.. up by one and forge a well-linked record 5.
        let last = last_seq(tree);
        for seq in (5..=last).rev() {
            let r = get(tree, seq);
            put(tree, seq + 1, &r);
        }
        let prev = get(tree, 4);
        let forged = AuditRecord::next(
            4,
            &prev.hash,
            AuditBody {
                action: "Detokenize".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        put(tree, 5, &forged);
    })
    .await;
    assert_eq!(rep.first_bad_seq, 6, "{rep:?}");
}

#[tokio::test]
async fn a_rehashed_rewrite_is_caught_by_the_signed_checkpoint() {
    let rep = tampered(|tree| {
        // Rewrite record 13 and recompute every later link: the chain is
        // self-consistent again, but no longer matches the checkpoint at 20.
        let last = last_seq(tree);
        let mut prev = get(tree, 12).hash;
        for seq in 13..=last {
            let mut body = get(tree, seq).body;
            if seq == 13 {
                let mut b = AuditBody::decode(body.as_slice()).unwrap();
                b.token = "tok_forged".into();
                body = b.encode_to_vec();
            }
            let r = AuditRecord::next(seq - 1, &prev, body);
            prev = r.hash.clone();
            put(tree, seq, &r);
        }
    })
    .await;
    assert_eq!(rep.first_bad_seq, 11, "{rep:?}");
    assert!(
        rep.problem
            .contains("do not match the checkpoint signed at record 20"),
        "{rep:?}"
    );
}

#[tokio::test]
async fn reads_fail_closed_when_the_audit_log_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky::open(dir.path()));
    let v = Vault::new(store.clone() as Arc<dyn Store>, VaultConfig::default());
    v.unseal(SecretKey::generate()).await.unwrap();
    let mut c = card("4111111111111111");
    c.cvv = Some(Cvv::parse("123", Brand::Visa).unwrap());
    let token = v
        .tokenize(
            &ctx("m"),
            &t("demo"),
            c,
            TokenizeOptions::default(),
            &Unmetered,
        )
        .await
        .unwrap()
        .token;
    let tok = Token::parse(&token).unwrap();
    let purpose = Purpose::parse("auth").unwrap();

    store.set_failing(true);
    let err = v
        .detokenize(&ctx("p"), &t("demo"), &tok, &purpose, true)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::Unavailable(ref m) if m.contains("audit")),
        "{err}"
    );
    assert!(!err.to_string().contains("4111"));
    let err = v.metadata(&ctx("p"), &t("demo"), &tok).await.err().unwrap();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    let batch = v
        .detokenize_batch(&ctx("p"), &t("demo"), vec![Ok(tok.clone())], &purpose, true)
        .await
        .unwrap();
    assert!(matches!(batch[0], Err(Error::Unavailable(_))));

    // Once the log works again the card reads, and the CVV was not consumed
    // by the refused reads.
    store.set_failing(false);
    let card = v
        .detokenize(&ctx("p"), &t("demo"), &tok, &purpose, true)
        .await
        .unwrap();
    assert_eq!(card.pan.expose(), "4111111111111111");
    assert!(matches!(card.cvv, CvvOutcome::Returned(ref c) if c.expose() == "123"));
}

/// A verify while records are being appended reports the log intact:
/// records that arrive after it read the head are left to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_a_busy_log_reports_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky::open(dir.path()));
    let v = Vault::new(store.clone() as Arc<dyn Store>, VaultConfig::default());
    v.unseal(SecretKey::generate()).await.unwrap();
    for _ in 0..5 {
        v.tokenize(
            &ctx("m"),
            &t("demo"),
            card("4111111111111111"),
            TokenizeOptions::default(),
            &Unmetered,
        )
        .await
        .unwrap();
    }
    // A record lands right after the verify reads the head.
    let inner = store.inner.clone();
    store.after_next_audit_head(move || {
        let body = AuditBody {
            action: "Detokenize".into(),
            ..Default::default()
        };
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(inner.append_audit(&body))
                .unwrap();
        });
    });
    let report = v.verify_audit(&ctx("auditor")).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 5);
    let report = v.verify_audit(&ctx("auditor")).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 7, "the late record and the first verify's");
}

// ---- over gRPC ----

#[tokio::test]
async fn audit_service_query_blast_radius_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let siem = dir.path().join("siem.jsonl");
    let opts = Opts {
        env: vec![
            ("CARDVAULT_AUDIT_CHECKPOINT_EVERY".into(), "7".into()),
            (
                "CARDVAULT_AUDIT_SIEM_FILE".into(),
                siem.display().to_string(),
            ),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start(&data, &opts);
    let mut m = v.client("merchant").await;
    let mut om = v.client("other-merchant").await;
    let mut p = v.client("processor").await;
    let mut op = v.client("other-processor").await;
    let tok = |tenant: &str| TokenizeRequest {
        tenant: tenant.into(),
        pan: "4111111111111111".into(),
        exp_month: 1,
        exp_year: exp_year(),
        ..Default::default()
    };
    let mut demo = Vec::new();
    for _ in 0..10 {
        demo.push(m.tokenize(tok("demo")).await.unwrap().into_inner().token);
    }
    let mut other = Vec::new();
    for _ in 0..4 {
        other.push(om.tokenize(tok("other")).await.unwrap().into_inner().token);
    }
    let read = |tenant: &str, token: &str| DetokenizeRequest {
        tenant: tenant.into(),
        token: token.into(),
        purpose: "incident drill".into(),
        include_cvv: false,
    };
    // The processor reads tokens 0, 2, 4 (token 2 twice); decoys: other
    // tokens untouched, reads by another principal, a failed read, a refused call.
    let mut expected = BTreeSet::new();
    for i in [0, 2, 4, 2] {
        p.detokenize(read("demo", &demo[i])).await.unwrap();
        expected.insert(demo[i].clone());
    }
    op.detokenize(read("other", &other[0])).await.unwrap();
    p.detokenize(read("demo", "tok_AAAAAAAAAAAAAAAAAAAAAA"))
        .await
        .unwrap_err();
    p.detokenize(read("other", &other[1])).await.unwrap_err();
    m.detokenize(read("demo", &demo[5])).await.unwrap_err();

    let mut a = AuditServiceClient::new(v.channel("auditor").await);
    let radius = a
        .blast_radius(BlastRadiusRequest {
            principal: "spiffe://cardvault.dev/demo/processor".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(radius.distinct_tokens, 3);
    assert_eq!(radius.total_reads, 4);
    assert_eq!(radius.tenants.len(), 1);
    let got: BTreeSet<String> = radius.tenants[0]
        .tokens
        .iter()
        .map(|t| t.token.clone())
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        radius.tenants[0]
            .tokens
            .iter()
            .find(|t| t.token == demo[2])
            .unwrap()
            .reads,
        2
    );
    // A window that ends before the reads finds nothing.
    let none = a
        .blast_radius(BlastRadiusRequest {
            principal: "spiffe://cardvault.dev/demo/processor".into(),
            until: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.distinct_tokens, 0);

    // Query by principal and action, including denied attempts.
    let denied = a
        .query(AuditQueryRequest {
            principal: "spiffe://cardvault.dev/demo/merchant".into(),
            action: "Detokenize".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].outcome, "PERMISSION_DENIED");
    let reads = a
        .query(AuditQueryRequest {
            token: demo[2].clone(),
            action: "Detokenize".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(reads.len(), 2);
    assert!(reads.iter().all(|e| e.purpose == "incident drill"
        && e.roles == ["processor"]
        && e.peer.starts_with("127.0.0.1:")));
    // Paging.
    let page = a
        .query(AuditQueryRequest {
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 5);
    let next = a
        .query(AuditQueryRequest {
            limit: 5,
            after_seq: page.next_after_seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.events[0].seq, page.events[4].seq + 1);

    // A window that is no time at all is refused, naming the field, and
    // the refusal is on the record.
    let e = v.query_before_1970().await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("since: "), "{}", e.message());
    let refused = v.audit_events("AuditQuery").await;
    assert!(
        refused
            .iter()
            .any(|e| e.outcome != "OK" && e.error.contains("since")),
        "{refused:?}"
    );

    let report = a.verify(VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(report.ok, "{report:?}");
    assert!(report.checkpoints >= 3, "{report:?}");

    // Only auditors read the log; a processor is refused and that is audited.
    let mut pa = AuditServiceClient::new(v.channel("processor").await);
    let e = pa.verify(VerifyAuditRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // The SIEM copy has one JSON line per record (written on the sink's
    // own thread, so it may trail the calls a little).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let lines = loop {
        let lines = std::fs::read_to_string(&siem).unwrap();
        if lines.lines().count() as u64 >= report.records || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(lines.lines().count() as u64 >= report.records);
    assert!(lines.contains("\"action\":\"Detokenize\""));
}

/// The audit signing key deleted from the store: unseal refuses (DATA_LOSS)
/// rather than make a new key that would sign whatever the log now holds.
/// A store with no checkpoint yet (a crash during the first unseal) still
/// gets a key made.
#[tokio::test]
async fn a_missing_audit_signing_key_is_refused_once_checkpoints_exist() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let kek = SecretKey::generate();
    let v = Vault::new(store.clone() as Arc<dyn Store>, VaultConfig::default());
    v.unseal(kek.clone()).await.unwrap();
    store.delete_key(AUDIT_KEY_NAME).await.unwrap();
    v.seal();
    v.unseal(kek.clone())
        .await
        .expect("no checkpoint yet: a key is made");
    assert!(store.get_key(AUDIT_KEY_NAME).await.unwrap().is_some());

    tokenize_test_card(&v).await;
    v.checkpoint_now().await.unwrap();
    v.seal();
    store.delete_key(AUDIT_KEY_NAME).await.unwrap();
    match v.unseal(kek).await {
        Err(Error::DataLoss(m)) => {
            assert!(m.contains("audit signing key is missing"), "{m}")
        }
        other => panic!("expected DATA_LOSS, got {other:?}"),
    }
    assert!(
        store.get_key(AUDIT_KEY_NAME).await.unwrap().is_none(),
        "no new key made"
    );
}

/// An operator's seal is itself under the checkpoint signed as it seals.
#[tokio::test]
async fn the_checkpoint_signed_at_a_seal_covers_the_seal_record() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = open_vault(dir.path(), 1000).await;
    tokenize_test_card(&v).await;
    v.seal_by(&ctx("admin")).await.unwrap();
    let head = store.audit_head().await.unwrap().unwrap().0;
    let last = store.checkpoints().await.unwrap().last().unwrap().seq;
    assert_eq!(last, head, "the Seal record is the last one signed");
}

/// Deleting the newest checkpoints (the first step of rewriting the tail
/// undetected) is reported by the vault that signed or saw them.
#[tokio::test]
async fn deleted_checkpoints_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = open_vault(dir.path(), 10).await;
    for _ in 0..25 {
        tokenize_test_card(&v).await;
    }
    v.checkpoint_now().await.unwrap();
    let before = v.verify_audit(&ctx("auditor")).await.unwrap();
    assert!(before.ok() && before.checkpoints >= 3, "{before:?}");
    assert!(store.raw_remove_checkpoints_from(20).unwrap() >= 2);
    let after = v.verify_audit(&ctx("auditor")).await.unwrap();
    assert!(!after.ok(), "{after:?}");
    assert!(
        after.problem.contains("checkpoints were deleted"),
        "{after:?}"
    );
    assert_eq!(after.first_bad_seq, 11, "{after:?}");
}

/// A verify refused while sealed is recorded, like a refused query.
#[tokio::test]
async fn a_verify_refused_while_sealed_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = open_vault(dir.path(), 1000).await;
    v.seal();
    assert!(matches!(
        v.verify_audit(&ctx("auditor")).await,
        Err(Error::Sealed)
    ));
    let records = store.audit_records(0, 100).await.unwrap();
    let refused = records
        .iter()
        .filter_map(|(_, r)| r.decode_body())
        .filter(|b| b.action == "AuditVerify" && b.outcome == "UNAVAILABLE")
        .count();
    assert_eq!(refused, 1);
}

/// "Every read of this token" is one query: the action `Reads` matches
/// single and batch reads, and a read refused for its purpose is recorded
/// against the token it was for.
#[tokio::test]
async fn every_read_of_a_token_is_one_query() {
    use cardvault::proto::{DetokenizeBatchItem, DetokenizeBatchRequest};
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let token = v
        .client("merchant")
        .await
        .tokenize(TokenizeRequest {
            tenant: "demo".into(),
            pan: "4111111111111111".into(),
            exp_month: 12,
            exp_year: exp_year(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut p = v.client("processor").await;
    let detok = |purpose: &str| DetokenizeRequest {
        tenant: "demo".into(),
        token: token.clone(),
        purpose: purpose.into(),
        include_cvv: false,
    };
    p.detokenize(detok("authorization")).await.unwrap();
    p.detokenize_batch(DetokenizeBatchRequest {
        tenant: "demo".into(),
        items: vec![DetokenizeBatchItem {
            reference: "r".into(),
            token: token.clone(),
        }],
        purpose: "settlement".into(),
        include_cvv: false,
    })
    .await
    .unwrap();
    let bad = p.detokenize(detok("")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let events = AuditServiceClient::new(v.channel("auditor").await)
        .query(AuditQueryRequest {
            action: "Reads".into(),
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("Detokenize", "OK"),
            ("DetokenizeBatch", "OK"),
            ("Detokenize", "INVALID_ARGUMENT")
        ]
    );
}

/// An auditor whose grant names one tenant learns nothing from the log of
/// other tenants' activity: the same calls for its tenant, with no or with
/// 25 calls for another tenant between them, give it identical answers
/// (positions, paging cursors, events).
#[tokio::test]
async fn a_tenant_auditor_learns_nothing_of_other_tenants_activity() {
    const SCOPED: &str = "spiffe://cardvault.dev/demo/tenant-auditor";
    async fn what_it_sees(others: usize) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            data.join("policy.toml"),
            format!(
                r#"
[[principal]]
name = "spiffe://cardvault.dev/demo/merchant"
roles = ["merchant"]
tenants = ["demo", "other"]

[[principal]]
name = "{SCOPED}"
roles = ["auditor"]
tenants = ["demo"]
"#
            ),
        )
        .unwrap();
        let v = VaultProcess::start(&data, &Opts::default());
        let mut m = v.client("merchant").await;
        let tok = |tenant: &str| TokenizeRequest {
            tenant: tenant.into(),
            pan: "4111111111111111".into(),
            exp_month: 1,
            exp_year: exp_year(),
            ..Default::default()
        };
        let mut seen = Vec::new();
        let channel = v
            .channel_with(Some(v.issue_client_cert(SCOPED)))
            .await
            .unwrap();
        let mut a = AuditServiceClient::new(channel);
        let mut after = 0;
        for round in 0..3 {
            m.tokenize(tok("demo")).await.unwrap();
            for _ in 0..others {
                m.tokenize(tok("other")).await.unwrap();
            }
            let page = a
                .query(AuditQueryRequest {
                    tenant: "demo".into(),
                    after_seq: after,
                    limit: 2,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for e in &page.events {
                assert_eq!(e.tenant, "demo");
                seen.push(format!(
                    "round {round}: seq {} tenant_seq {} {} {}",
                    e.seq, e.tenant_seq, e.action, e.outcome
                ));
            }
            seen.push(format!("round {round}: next {}", page.next_after_seq));
            after = page.next_after_seq;
        }
        seen
    }
    let quiet = what_it_sees(0).await;
    let busy = what_it_sees(25).await;
    assert_eq!(quiet, busy, "the other tenant's activity shows");
    assert!(quiet.iter().any(|l| l.contains("Tokenize OK")), "{quiet:?}");
}

/// A query naming a tenant reads that tenant's index, not the chain, and
/// is paged by the tenant's numbering; a query across tenants reads the
/// chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_query_reads_the_tenant_index_not_the_whole_log() {
    use cardvault::audit::query::AuditFilter;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky::open(dir.path()));
    let v = Vault::new(store.clone() as Arc<dyn Store>, VaultConfig::default());
    v.unseal(SecretKey::generate()).await.unwrap();
    for i in 0..40 {
        let tenant = if i % 10 == 0 { "demo" } else { "other" };
        v.tokenize(
            &ctx("m"),
            &t(tenant),
            card("4111111111111111"),
            TokenizeOptions::default(),
            &Unmetered,
        )
        .await
        .unwrap();
    }
    store.chain_pages.store(0, Ordering::SeqCst);
    let filter = AuditFilter {
        tenant: "demo".into(),
        action: "Tokenize".into(),
        ..Default::default()
    };
    let (hits, next) = v.query_audit(&ctx("a"), &filter, 0, 3).await.unwrap();
    assert_eq!(store.chain_pages.load(Ordering::SeqCst), 0);
    let numbers: Vec<_> = hits.iter().map(|h| h.tenant_seq).collect();
    assert_eq!(numbers, vec![Some(1), Some(2), Some(3)]);
    assert_eq!(next, 3);
    let (rest, _) = v.query_audit(&ctx("a"), &filter, next, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].tenant_seq, Some(4));
    assert!(hits.iter().chain(&rest).all(|h| h.body.tenant == "demo"));
    assert_eq!(store.chain_pages.load(Ordering::SeqCst), 0);
    let across = AuditFilter {
        action: "Tokenize".into(),
        ..Default::default()
    };
    let (all, _) = v.query_audit(&ctx("a"), &across, 0, 100).await.unwrap();
    assert_eq!(all.len(), 40);
    assert!(store.chain_pages.load(Ordering::SeqCst) > 0);
}
