//! Sealed card collection over gRPC: a card sealed to a collect session
//! (as the browser library does) is tokenized without the merchant's
//! backend ever holding it in the clear; sessions are single use, bound
//! to their tenant, and every unusable session gets one answer.

mod common;

use cardvault::crypto::sealed;
use cardvault::proto::{
    CreateCollectSessionRequest, CreateCollectSessionResponse, DetokenizeRequest,
    TokenizeSealedRequest, token_service_client::TokenServiceClient,
};
use common::{Opts, VaultProcess, exp_year};
use tonic::Code;
use tonic::transport::Channel;

const PAN: &str = "4111111111111111";

fn start() -> (tempfile::TempDir, VaultProcess) {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    (dir, v)
}

async fn session(
    c: &mut TokenServiceClient<Channel>,
    tenant: &str,
    ttl: Option<u32>,
) -> CreateCollectSessionResponse {
    c.create_collect_session(CreateCollectSessionRequest {
        tenant: tenant.into(),
        ttl_seconds: ttl,
    })
    .await
    .unwrap()
    .into_inner()
}

fn card_json(pan: &str, cvv: Option<&str>) -> String {
    let cvv = cvv.map(|c| format!(",\"cvv\":\"{c}\"")).unwrap_or_default();
    format!(
        "{{\"pan\":\"{pan}\",\"exp_month\":12,\"exp_year\":{}{cvv},\"name\":\"Ada Lovelace\"}}",
        exp_year()
    )
}

fn seal_for(s: &CreateCollectSessionResponse, tenant: &str, json: &str) -> String {
    sealed::seal(&s.public_key, tenant, &s.session_id, json.as_bytes()).unwrap()
}

fn sealed_request(tenant: &str, session_id: &str, blob: &str) -> TokenizeSealedRequest {
    TokenizeSealedRequest {
        tenant: tenant.into(),
        session_id: session_id.into(),
        sealed: blob.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_sealed_card_is_tokenized_and_reads_back_as_the_processor() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let s = session(&mut m, "demo", None).await;
    assert!(s.session_id.starts_with("cs_") && s.session_id.len() == 25);
    assert_eq!(s.public_key.len(), 65);
    assert_eq!((s.kem_id, s.kdf_id, s.aead_id), (0x10, 1, 2));
    assert_eq!(
        s.suite,
        "DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
    );
    let key = &s.session_key;
    assert!(
        key.starts_with(&format!("cvk1.demo.{}.", s.session_id)),
        "{key}"
    );
    let expires = s.expires_at.unwrap().seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now + 590..=now + 610).contains(&expires),
        "default life 600 s"
    );

    let blob = seal_for(&s, "demo", &card_json(PAN, Some("123")));
    let r = m
        .tokenize_sealed(sealed_request("demo", &s.session_id, &blob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.last4.as_str(), r.brand.as_str()), ("1111", "VISA"));
    assert!(r.cvv_held);

    let mut p = v.client("processor").await;
    let card = p
        .detokenize(DetokenizeRequest {
            tenant: "demo".into(),
            token: r.token.clone(),
            purpose: "authorization".into(),
            include_cvv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(card.pan, PAN);
    assert_eq!(card.cvv.as_deref(), Some("123"));
    assert_eq!(card.cardholder_name, "Ada Lovelace");

    // Audited as a sealed tokenize, with the session, without digits.
    let events = v.audit_events("TokenizeSealed").await;
    let ok: Vec<_> = events.iter().filter(|e| e.outcome == "OK").collect();
    assert_eq!(ok.len(), 1, "{events:?}");
    assert_eq!(ok[0].token, r.token);
    assert!(ok[0].detail.contains(&s.session_id), "{:?}", ok[0]);
    let created = v.audit_events("CreateCollectSession").await;
    assert!(created.iter().any(|e| e.detail.contains(&s.session_id)));
    assert!(!v.logs().contains(PAN));
}

#[tokio::test]
async fn every_unusable_session_gets_one_identical_answer() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let mut other = v.client("other-merchant").await;
    let answer = |r: Result<tonic::Response<cardvault::proto::TokenizeResponse>, tonic::Status>| {
        let s = r.unwrap_err();
        (s.code(), s.message().to_owned())
    };

    // Used: the second use of a session, with the very same seal (replay).
    let s = session(&mut m, "demo", None).await;
    let blob = seal_for(&s, "demo", &card_json(PAN, None));
    m.tokenize_sealed(sealed_request("demo", &s.session_id, &blob))
        .await
        .unwrap();
    let replayed = answer(
        m.tokenize_sealed(sealed_request("demo", &s.session_id, &blob))
            .await,
    );
    assert_eq!(replayed.0, Code::FailedPrecondition, "{replayed:?}");

    // Unknown.
    let unknown = answer(
        m.tokenize_sealed(sealed_request("demo", "cs_AAAAAAAAAAAAAAAAAAAAAA", &blob))
            .await,
    );

    // Another tenant's session, sealed correctly for this tenant.
    let theirs = session(&mut other, "other", None).await;
    let blob = seal_for(&theirs, "demo", &card_json(PAN, None));
    let foreign = answer(
        m.tokenize_sealed(sealed_request("demo", &theirs.session_id, &blob))
            .await,
    );
    // ...which stays usable by its owner.
    let blob = seal_for(&theirs, "other", &card_json(PAN, None));
    other
        .tokenize_sealed(sealed_request("other", &theirs.session_id, &blob))
        .await
        .unwrap();

    // Expired.
    let s = session(&mut m, "demo", Some(1)).await;
    let blob = seal_for(&s, "demo", &card_json(PAN, None));
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let expired = answer(
        m.tokenize_sealed(sealed_request("demo", &s.session_id, &blob))
            .await,
    );

    assert_eq!(replayed, unknown);
    assert_eq!(replayed, foreign);
    assert_eq!(replayed, expired);
}

#[tokio::test]
async fn altered_or_moved_seals_are_refused_as_such() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let mut refused = Vec::new();

    // A flipped bit in the ciphertext.
    let s = session(&mut m, "demo", None).await;
    let blob = seal_for(&s, "demo", &card_json(PAN, None));
    let mut bytes = blob.into_bytes();
    let i = bytes.len() - 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    refused.push((s.session_id.clone(), String::from_utf8(bytes).unwrap()));

    // Sealed for session A, sent with session B (moved between sessions).
    let a = session(&mut m, "demo", None).await;
    let b = session(&mut m, "demo", None).await;
    refused.push((
        b.session_id.clone(),
        seal_for(&a, "demo", &card_json(PAN, None)),
    ));

    // Sealed for another tenant's associated data (moved between tenants).
    let c = session(&mut m, "demo", None).await;
    refused.push((
        c.session_id.clone(),
        seal_for(&c, "other", &card_json(PAN, None)),
    ));

    for (id, blob) in refused {
        let e = m
            .tokenize_sealed(sealed_request("demo", &id, &blob))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("sealed: does not open"), "{e:?}");
    }

    // Not a seal at all (and never echoed).
    let d = session(&mut m, "demo", None).await;
    let e = m
        .tokenize_sealed(sealed_request("demo", &d.session_id, PAN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("sealed:") && !e.message().contains("4111"));
    assert!(!v.logs().contains(PAN));
}

#[tokio::test]
async fn a_bad_card_inside_is_named_by_field_without_its_digits() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let bad = "4111111111111112";
    for (json, want) in [
        (card_json(bad, None), "pan: "),
        (card_json(PAN, Some("12")), "cvv: "),
        (
            format!("{{\"pan\":\"{PAN}\",\"exp_month\":13,\"exp_year\":2030}}"),
            "exp_month: ",
        ),
    ] {
        let s = session(&mut m, "demo", None).await;
        let blob = seal_for(&s, "demo", &json);
        let e = m
            .tokenize_sealed(sealed_request("demo", &s.session_id, &blob))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(want), "{e:?}");
        assert!(!e.message().contains("4111"), "{e:?}");
    }
    let logs = v.logs();
    assert!(!logs.contains(bad) && !logs.contains(PAN));
    let refused = v.audit_events("TokenizeSealed").await;
    assert_eq!(refused.len(), 3);
    assert!(refused.iter().all(|e| e.outcome == "INVALID_ARGUMENT"));
    assert!(refused.iter().all(|e| e.detail.starts_with("session cs_")));
}

#[tokio::test]
async fn only_merchants_of_the_tenant_collect_and_ttls_are_bounded() {
    let (_d, v) = start();
    let mut p = v.client("processor").await;
    let e = p
        .create_collect_session(CreateCollectSessionRequest {
            tenant: "demo".into(),
            ttl_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut m = v.client("merchant").await;
    let e = m
        .create_collect_session(CreateCollectSessionRequest {
            tenant: "other".into(),
            ttl_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    for ttl in [0, 1801] {
        let e = m
            .create_collect_session(CreateCollectSessionRequest {
                tenant: "demo".into(),
                ttl_seconds: Some(ttl),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("ttl_seconds: "), "{e:?}");
    }
    let s = session(&mut m, "demo", Some(1800)).await;
    assert!(s.expires_at.is_some());
}

/// Sealed tokenizes pass through the enumeration guard like plain ones:
/// guessing candidates of one bucket through sealed sessions locks it.
#[tokio::test]
async fn sealed_tokenizes_count_in_the_enumeration_guard() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    // Nine distinct cards with the same first six, last four and length.
    let cards: Vec<String> = (0..200u32)
        .map(|i| format!("411111{:06}1111", i))
        .filter(|c| cardvault::card::luhn_valid(c))
        .take(9)
        .collect();
    assert_eq!(cards.len(), 9);
    let mut outcomes = Vec::new();
    for c in &cards {
        let s = session(&mut m, "demo", None).await;
        let blob = seal_for(&s, "demo", &card_json(c, None));
        outcomes.push(
            m.tokenize_sealed(sealed_request("demo", &s.session_id, &blob))
                .await
                .map_err(|e| e.code()),
        );
    }
    assert!(outcomes[..8].iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert_eq!(outcomes[8].as_ref().unwrap_err(), &Code::ResourceExhausted);
}
