//! End-to-end tests of TokenService over real gRPC + mTLS against the
//! `cardvault` binary.

mod common;

use cardvault::card::luhn_valid;
use cardvault::proto::{
    CvvStatus, DeleteTokenRequest, DetokenizeBatchItem, DetokenizeBatchRequest, DetokenizeRequest,
    GetMetadataRequest, TokenFormat, TokenizeBatchItem, TokenizeBatchRequest, TokenizeRequest,
    detokenize_batch_result, tokenize_batch_result,
};
use common::{Opts, VaultProcess, exp_year};
use tonic::Code;

fn start() -> (tempfile::TempDir, VaultProcess) {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    (dir, v)
}

fn card(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        tenant: "demo".into(),
        pan: pan.into(),
        exp_month: 12,
        exp_year: exp_year(),
        ..Default::default()
    }
}

fn detok(token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        tenant: "demo".into(),
        token: token.into(),
        purpose: "authorization".into(),
        include_cvv: false,
    }
}

const BRANDS: &[(&str, &str, &str)] = &[
    ("4111111111111111", "VISA", "123"),
    ("4012888888881881", "VISA", "123"),
    ("5555555555554444", "MASTERCARD", "123"),
    ("2223003122003222", "MASTERCARD", "123"),
    ("378282246310005", "AMEX", "1234"),
    ("6011111111111117", "DISCOVER", "123"),
    ("3530111333300000", "JCB", "123"),
    ("36227206271667", "DINERS_CLUB", "123"),
    ("6200000000000005", "UNIONPAY", "123"),
];

#[tokio::test]
async fn round_trip_for_every_brand() {
    let (_d, v) = start();
    let mut merchant = v.client("merchant").await;
    let mut processor = v.client("processor").await;
    for (pan, brand, cvv) in BRANDS {
        let mut req = card(pan);
        req.cvv = Some(cvv.to_string());
        req.cardholder_name = Some("Grace Hopper".into());
        let t = merchant.tokenize(req).await.unwrap().into_inner();
        assert_eq!(t.brand, *brand);
        assert_eq!(t.last4, pan[pan.len() - 4..]);
        // The BIN for 15+ digits; only 4 leading digits of shorter numbers
        // (Diners Club's 14), so that 4 digits stay hidden.
        let shown = if pan.len() >= 15 { 6 } else { 4 };
        assert_eq!(t.bin, pan[..shown]);
        assert!(t.token.starts_with("tok_"));
        assert!(t.cvv_held);
        assert_eq!(t.fingerprint.len(), 64);
        let mut r = detok(&t.token);
        r.include_cvv = true;
        let c = processor.detokenize(r).await.unwrap().into_inner();
        assert_eq!(c.pan, *pan);
        assert_eq!(c.brand, *brand);
        assert_eq!((c.exp_month, c.exp_year), (12, exp_year()));
        assert_eq!(c.cardholder_name, "Grace Hopper");
        assert_eq!(c.cvv.as_deref(), Some(*cvv));
        assert_eq!(c.cvv_status, CvvStatus::CvvReturned as i32);
    }
}

#[tokio::test]
async fn spaces_and_dashes_are_accepted() {
    let (_d, v) = start();
    let t = v
        .client("merchant")
        .await
        .tokenize(card("4111 1111-1111 1111"))
        .await
        .unwrap()
        .into_inner();
    let c = v
        .client("processor")
        .await
        .detokenize(detok(&t.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.pan, "4111111111111111");
}

/// Each bad field gives INVALID_ARGUMENT naming the field, without the value.
#[tokio::test]
async fn validation_errors_name_the_field_and_never_echo_it() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let y = exp_year();
    let cases: Vec<(TokenizeRequest, &str)> = vec![
        (card(""), "pan: is required"),
        (card("4111111111111112"), "pan: fails the Luhn check"),
        (card("4111x11111111111"), "pan: must contain only"),
        (card("41111111111"), "pan: must be 12 to 19 digits"),
        (card("41111111111111111111"), "pan: must be 12 to 19 digits"),
        (
            TokenizeRequest {
                exp_month: 13,
                ..card("4111111111111111")
            },
            "exp_month: must be 1 to 12",
        ),
        (
            TokenizeRequest {
                exp_month: 0,
                ..card("4111111111111111")
            },
            "exp_month: must be 1 to 12",
        ),
        (
            TokenizeRequest {
                exp_year: 2020,
                ..card("4111111111111111")
            },
            "exp_year: card has expired",
        ),
        (
            TokenizeRequest {
                exp_year: 0,
                ..card("4111111111111111")
            },
            "exp_year: is required",
        ),
        (
            TokenizeRequest {
                exp_year: 12345,
                ..card("4111111111111111")
            },
            "exp_year: must be a 4-digit year",
        ),
        (
            TokenizeRequest {
                cvv: Some("12".into()),
                ..card("4111111111111111")
            },
            "cvv: must be 3 digits",
        ),
        (
            TokenizeRequest {
                cvv: Some("1234".into()),
                ..card("4111111111111111")
            },
            "cvv: must be 3 digits",
        ),
        (
            TokenizeRequest {
                cvv: Some("123".into()),
                ..card("378282246310005")
            },
            "cvv: must be 4 digits for AMEX",
        ),
        (
            TokenizeRequest {
                cvv: Some("12a".into()),
                ..card("4111111111111111")
            },
            "cvv: must contain only digits",
        ),
        (
            TokenizeRequest {
                cardholder_name: Some("x".repeat(101)),
                ..card("4111111111111111")
            },
            "cardholder_name: must be at most 100",
        ),
        (
            TokenizeRequest {
                tenant: "Bad Tenant".into(),
                ..card("4111111111111111")
            },
            "tenant: must match",
        ),
        (
            TokenizeRequest {
                format: 99,
                ..card("4111111111111111")
            },
            "format: unknown token format",
        ),
    ];
    for (req, expected) in cases {
        let secret_bits: Vec<String> = [Some(req.pan.clone()), req.cvv.clone()]
            .into_iter()
            .flatten()
            .filter(|s| s.len() >= 3)
            .collect();
        let err = m.tokenize(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err:?}");
        assert!(
            err.message().starts_with(expected),
            "expected {expected:?}, got {:?}",
            err.message()
        );
        for s in secret_bits {
            assert!(
                !err.message().contains(&s),
                "error echoes input: {}",
                err.message()
            );
        }
    }
    let _ = y;
    let mut p = v.client("processor").await;
    let dcases: Vec<(DetokenizeRequest, &str)> = vec![
        (detok(""), "token: is required"),
        (detok("tok_short"), "token: is not a valid cardvault token"),
        (detok("4111111111111111"), "token: looks like a card number"),
        (
            DetokenizeRequest {
                purpose: "".into(),
                ..detok("tok_AAAAAAAAAAAAAAAAAAAAAA")
            },
            "purpose: is required",
        ),
        (
            DetokenizeRequest {
                purpose: "card 4111111111111111".into(),
                ..detok("tok_AAAAAAAAAAAAAAAAAAAAAA")
            },
            "purpose: must not contain a card number",
        ),
        (
            DetokenizeRequest {
                purpose: "refund 4111/1111/1111/1111".into(),
                ..detok("tok_AAAAAAAAAAAAAAAAAAAAAA")
            },
            "purpose: must not contain a card number",
        ),
        // A card number in the tenant field (fields swapped by a client)
        // goes no further: not into the error, a log or the audit record.
        (
            DetokenizeRequest {
                tenant: "4111111111111111".into(),
                ..detok("tok_AAAAAAAAAAAAAAAAAAAAAA")
            },
            "tenant: must not contain a card number",
        ),
    ];
    for (req, expected) in dcases {
        let err = p.detokenize(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err:?}");
        assert!(
            err.message().starts_with(expected),
            "expected {expected:?}, got {:?}",
            err.message()
        );
        assert!(!err.message().contains("4111111111111111"));
    }
    let err = p
        .detokenize(detok("tok_AAAAAAAAAAAAAAAAAAAAAA"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn batch_with_mixed_items() {
    let (_d, v) = start();
    let y = exp_year();
    let item = |r: &str, pan: &str, m: u32| TokenizeBatchItem {
        reference: r.into(),
        pan: pan.into(),
        exp_month: m,
        exp_year: y,
        ..Default::default()
    };
    let req = TokenizeBatchRequest {
        tenant: "demo".into(),
        items: vec![
            item("a", "4111111111111111", 1),
            item("b", "4111111111111112", 1),
            item("c", "5555555555554444", 13),
            TokenizeBatchItem {
                cvv: Some("1234".into()),
                ..item("d", "378282246310005", 2)
            },
        ],
        ..Default::default()
    };
    let res = v
        .client("merchant")
        .await
        .tokenize_batch(req)
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        res.iter().map(|r| r.reference.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c", "d"]
    );
    let ok = |i: usize| match &res[i].result {
        Some(tokenize_batch_result::Result::Ok(t)) => t.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let err = |i: usize| match &res[i].result {
        Some(tokenize_batch_result::Result::Error(e)) => e.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let a = ok(0);
    let d = ok(3);
    assert!(d.cvv_held);
    assert_eq!(err(1).code, "INVALID_ARGUMENT");
    assert_eq!(err(1).field, "items[1].pan");
    assert_eq!(err(2).field, "items[2].exp_month");
    // Every item has its record under the batch's action, stored or not.
    let items: Vec<(String, String)> = v
        .audit_events("TokenizeBatch")
        .await
        .into_iter()
        .map(|e| (e.outcome, e.token))
        .collect();
    assert_eq!(items.len(), 4, "{items:?}");
    for token in [&a.token, &d.token] {
        assert!(items.contains(&("OK".into(), token.clone())), "{items:?}");
    }
    assert!(v.audit_events("Tokenize").await.is_empty());

    let dreq = DetokenizeBatchRequest {
        tenant: "demo".into(),
        purpose: "settlement".into(),
        include_cvv: true,
        items: vec![
            DetokenizeBatchItem {
                reference: "x".into(),
                token: a.token.clone(),
            },
            DetokenizeBatchItem {
                reference: "y".into(),
                token: "tok_AAAAAAAAAAAAAAAAAAAAAA".into(),
            },
            DetokenizeBatchItem {
                reference: "z".into(),
                token: "garbage".into(),
            },
            DetokenizeBatchItem {
                reference: "w".into(),
                token: d.token.clone(),
            },
        ],
    };
    let res = v
        .client("processor")
        .await
        .detokenize_batch(dreq)
        .await
        .unwrap()
        .into_inner()
        .results;
    match &res[0].result {
        Some(detokenize_batch_result::Result::Ok(c)) => {
            assert_eq!(c.pan, "4111111111111111");
            assert_eq!(c.cvv_status, CvvStatus::CvvNotAvailable as i32);
        }
        other => panic!("{other:?}"),
    }
    match &res[1].result {
        Some(detokenize_batch_result::Result::Error(e)) => assert_eq!(e.code, "NOT_FOUND"),
        other => panic!("{other:?}"),
    }
    match &res[2].result {
        Some(detokenize_batch_result::Result::Error(e)) => assert_eq!(e.field, "items[2].token"),
        other => panic!("{other:?}"),
    }
    match &res[3].result {
        Some(detokenize_batch_result::Result::Ok(c)) => assert_eq!(c.cvv.as_deref(), Some("1234")),
        other => panic!("{other:?}"),
    }
    assert_eq!(res[3].reference, "w");
}

#[tokio::test]
async fn batch_size_limits() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let err = m
        .tokenize_batch(TokenizeBatchRequest {
            tenant: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let items = (0..1001)
        .map(|i| TokenizeBatchItem {
            reference: i.to_string(),
            ..Default::default()
        })
        .collect();
    let err = m
        .tokenize_batch(TokenizeBatchRequest {
            tenant: "demo".into(),
            items,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    // The same for a detokenize batch, before any token is read or any
    // budget charged; the refusals are audited (checked before the items
    // are parsed: a 4 MiB request of empty items is millions of them).
    let mut p = v.client("processor").await;
    for n in [0, 1001] {
        let err = p
            .detokenize_batch(DetokenizeBatchRequest {
                tenant: "demo".into(),
                items: (0..n)
                    .map(|i| DetokenizeBatchItem {
                        reference: i.to_string(),
                        token: "x".into(),
                    })
                    .collect(),
                purpose: "test".into(),
                include_cvv: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{n}: {err:?}");
        assert!(err.message().starts_with("items:"), "{}", err.message());
    }
    for action in ["TokenizeBatch", "DetokenizeBatch"] {
        let refused = v
            .audit_events(action)
            .await
            .into_iter()
            .filter(|e| e.outcome == "INVALID_ARGUMENT")
            .count();
        assert_eq!(refused, 2, "{action}");
    }
    // Exactly 1000 is allowed.
    let items = (0..1000)
        .map(|i| TokenizeBatchItem {
            reference: i.to_string(),
            pan: "4111111111111111".into(),
            exp_month: 1,
            exp_year: exp_year(),
            ..Default::default()
        })
        .collect();
    let res = m
        .tokenize_batch(TokenizeBatchRequest {
            tenant: "demo".into(),
            items,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(res.into_inner().results.len(), 1000);
}

#[tokio::test]
async fn dedupe_returns_the_existing_token_per_tenant() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let a = m
        .tokenize(TokenizeRequest {
            dedupe: true,
            ..card("5555555555554444")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!a.existing);
    let b = m
        .tokenize(TokenizeRequest {
            dedupe: true,
            ..card("5555 5555 5555 4444")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.token, b.token);
    assert!(b.existing);
    assert_eq!(a.fingerprint, b.fingerprint);
    // Without dedupe a new token is issued, with the same fingerprint.
    let c = m
        .tokenize(card("5555555555554444"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(c.token, a.token);
    assert_eq!(c.fingerprint, a.fingerprint);
    // Another tenant gets its own token and a different (tenant-keyed) fingerprint.
    let mut om = v.client("other-merchant").await;
    let o = om
        .tokenize(TokenizeRequest {
            tenant: "other".into(),
            dedupe: true,
            ..card("5555555555554444")
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(o.token, a.token);
    assert_ne!(o.fingerprint, a.fingerprint);
    // A different PAN is not deduplicated.
    let d = m
        .tokenize(TokenizeRequest {
            dedupe: true,
            ..card("4111111111111111")
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(d.token, a.token);
}

#[tokio::test]
async fn format_preserving_tokens() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let mut p = v.client("processor").await;
    for (pan, _, _) in BRANDS {
        for (format, keep_bin) in [
            (TokenFormat::FormatPreserving, false),
            (TokenFormat::FormatPreservingKeepBin, true),
        ] {
            let res = m
                .tokenize(TokenizeRequest {
                    format: format as i32,
                    ..card(pan)
                })
                .await;
            if keep_bin && pan.len() < 15 {
                // First six and last four would leave too few digits hidden.
                let e = res.unwrap_err();
                assert_eq!(e.code(), tonic::Code::InvalidArgument);
                assert!(e.message().starts_with("format: "), "{}", e.message());
                continue;
            }
            let t = res.unwrap().into_inner();
            assert_eq!(t.token.len(), pan.len());
            assert!(t.token.bytes().all(|b| b.is_ascii_digit()));
            assert!(t.token.ends_with(&pan[pan.len() - 4..]));
            assert!(!luhn_valid(&t.token), "token {} passes Luhn", t.token);
            assert_ne!(t.token, *pan);
            if keep_bin {
                assert!(t.token.starts_with(&pan[..6]));
            }
            let c = p.detokenize(detok(&t.token)).await.unwrap().into_inner();
            assert_eq!(c.pan, *pan);
        }
    }
}

/// A card number with one digit mistyped fails Luhn, so it parses as a
/// format-preserving token; nothing is stored under it, and the audit
/// records and logs of the calls that tried it write it masked, not whole.
/// A real digit token is still recorded whole.
#[tokio::test]
async fn a_mistyped_card_number_sent_as_a_token_is_recorded_masked() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![("CARDVAULT_LOG".into(), "debug".into())],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let typo = "4111111111111112";
    let mut p = v.client("processor").await;
    let mut m = v.client("merchant").await;
    let err = p.detokenize(detok(typo)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let meta = GetMetadataRequest {
        tenant: "demo".into(),
        token: typo.into(),
    };
    assert_eq!(
        m.get_metadata(meta).await.unwrap_err().code(),
        Code::NotFound
    );
    let del = DeleteTokenRequest {
        tenant: "demo".into(),
        token: typo.into(),
    };
    assert!(!m.delete_token(del).await.unwrap().into_inner().deleted);
    // A real format-preserving token, found: recorded whole.
    let real = m
        .tokenize(TokenizeRequest {
            format: TokenFormat::FormatPreserving as i32,
            ..card("5555555555554444")
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    p.detokenize(detok(&real)).await.unwrap();
    for action in ["Detokenize", "GetMetadata", "DeleteToken"] {
        let tokens: Vec<String> = v
            .audit_events(action)
            .await
            .into_iter()
            .map(|e| e.token)
            .collect();
        assert!(
            tokens.iter().any(|t| t == "411111******1112"),
            "{action}: {tokens:?}"
        );
        assert!(
            !tokens.iter().any(|t| t.contains(typo)),
            "{action}: {tokens:?}"
        );
        if action == "Detokenize" {
            assert!(tokens.contains(&real), "{tokens:?}");
        }
    }
    // An auditor searching for it: the query's own record masks it too.
    cardvault::proto::audit_service_client::AuditServiceClient::new(v.channel("auditor").await)
        .query(cardvault::proto::AuditQueryRequest {
            token: typo.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let queries: Vec<String> = v
        .audit_events("AuditQuery")
        .await
        .into_iter()
        .map(|e| e.token)
        .collect();
    assert!(
        queries.iter().any(|t| t == "411111******1112"),
        "{queries:?}"
    );
    assert!(!queries.iter().any(|t| t.contains(typo)), "{queries:?}");
    let logs = v.logs();
    assert!(
        logs.contains("411111******1112"),
        "the debug lines name it masked"
    );
    assert!(
        !logs.contains(typo),
        "a log line names the mistyped number whole"
    );
}

#[tokio::test]
async fn cvv_is_single_use() {
    let (_d, v) = start();
    let t = v
        .client("merchant")
        .await
        .tokenize(TokenizeRequest {
            cvv: Some("737".into()),
            ..card("4111111111111111")
        })
        .await
        .unwrap()
        .into_inner();
    let mut p = v.client("processor").await;
    // Reading without include_cvv does not consume it.
    let c = p.detokenize(detok(&t.token)).await.unwrap().into_inner();
    assert_eq!(c.cvv_status, CvvStatus::CvvNotRequested as i32);
    assert!(c.cvv.is_none());
    let meta = p
        .get_metadata(GetMetadataRequest {
            tenant: "demo".into(),
            token: t.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(meta.cvv_held);
    let first = p
        .detokenize(DetokenizeRequest {
            include_cvv: true,
            ..detok(&t.token)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.cvv.as_deref(), Some("737"));
    let second = p
        .detokenize(DetokenizeRequest {
            include_cvv: true,
            ..detok(&t.token)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.cvv, None);
    assert_eq!(second.cvv_status, CvvStatus::CvvNotAvailable as i32);
    assert_eq!(second.pan, "4111111111111111", "the card still detokenizes");
}

#[tokio::test]
async fn cvv_expires_after_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![("CARDVAULT_CVV_TTL_SECS".into(), "1".into())],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let t = v
        .client("merchant")
        .await
        .tokenize(TokenizeRequest {
            cvv: Some("737".into()),
            ..card("4111111111111111")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.cvv_held);
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let c = v
        .client("processor")
        .await
        .detokenize(DetokenizeRequest {
            include_cvv: true,
            ..detok(&t.token)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.cvv, None);
    assert_eq!(c.cvv_status, CvvStatus::CvvNotAvailable as i32);
}

#[tokio::test]
async fn metadata_and_delete() {
    let (_d, v) = start();
    let mut m = v.client("merchant").await;
    let t = m
        .tokenize(TokenizeRequest {
            cvv: Some("1234".into()),
            ..card("378282246310005")
        })
        .await
        .unwrap()
        .into_inner();
    let meta = m
        .get_metadata(GetMetadataRequest {
            tenant: "demo".into(),
            token: t.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (meta.brand.as_str(), meta.last4.as_str(), meta.bin.as_str()),
        ("AMEX", "0005", "378282")
    );
    assert_eq!(meta.fingerprint, t.fingerprint);
    assert_eq!(meta.key_version, 1);
    let del = |tok: &str| DeleteTokenRequest {
        tenant: "demo".into(),
        token: tok.into(),
    };
    assert!(
        m.delete_token(del(&t.token))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(
        !m.delete_token(del(&t.token))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    let err = v
        .client("processor")
        .await
        .detokenize(detok(&t.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = m
        .get_metadata(GetMetadataRequest {
            tenant: "demo".into(),
            token: t.token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Another tenant's token answers exactly like a missing one.
#[tokio::test]
async fn other_tenants_token_is_not_found() {
    let (_d, v) = start();
    let t = v
        .client("merchant")
        .await
        .tokenize(card("4111111111111111"))
        .await
        .unwrap()
        .into_inner();
    let mut op = v.client("other-processor").await;
    let cross = op
        .detokenize(DetokenizeRequest {
            tenant: "other".into(),
            ..detok(&t.token)
        })
        .await
        .unwrap_err();
    let missing = op
        .detokenize(DetokenizeRequest {
            tenant: "other".into(),
            ..detok("tok_AAAAAAAAAAAAAAAAAAAAAA")
        })
        .await
        .unwrap_err();
    assert_eq!(cross.code(), Code::NotFound);
    assert_eq!(
        (cross.code(), cross.message()),
        (missing.code(), missing.message())
    );
    let meta = op
        .get_metadata(GetMetadataRequest {
            tenant: "other".into(),
            token: t.token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(meta.code(), Code::NotFound);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let (_d, v) = start();
    let ch = v.channel("merchant").await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cardvault.v1.TokenService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"cardvault.v1.TokenService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let (_d, v) = start();
    let ca = std::fs::read(v.data_dir.join("certs/ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    let ch = tonic::transport::Channel::from_shared(format!("https://{}", v.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    // Depending on timing the handshake failure surfaces at connect or first call.
    if let Ok(ch) = ch {
        let mut c = cardvault::proto::token_service_client::TokenServiceClient::new(ch);
        assert!(c.tokenize(card("4111111111111111")).await.is_err());
    }
}

/// A request without a tenant acts for the caller's only tenant.
#[tokio::test]
async fn empty_tenant_means_the_callers_tenant() {
    let (_d, v) = start();
    let t = v
        .client("merchant")
        .await
        .tokenize(TokenizeRequest {
            tenant: String::new(),
            ..card("4111111111111111")
        })
        .await
        .unwrap()
        .into_inner();
    let c = v
        .client("processor")
        .await
        .detokenize(DetokenizeRequest {
            tenant: String::new(),
            ..detok(&t.token)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.pan, "4111111111111111");
}

/// One tenant tokenizing with CVVs as fast as it can fills its own share
/// of the CVV holder, not the holder: another tenant's CVV still fits.
#[tokio::test]
async fn one_tenant_cannot_fill_the_cvv_holder_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        env: vec![
            ("CARDVAULT_CVV_MAX_ENTRIES".into(), "4".into()),
            ("CARDVAULT_CVV_MAX_PER_TENANT".into(), "2".into()),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let with_cvv = |pan: &str, tenant: &str| TokenizeRequest {
        tenant: tenant.into(),
        cvv: Some("123".into()),
        ..card(pan)
    };
    let mut busy = v.client("merchant").await;
    let mut refused = 0;
    for pan in BRANDS.iter().map(|b| b.0).filter(|p| p.len() == 16).take(4) {
        if let Err(s) = busy.tokenize(with_cvv(pan, "demo")).await {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 2, "the busy tenant keeps to its share");
    let other = v
        .client("other-merchant")
        .await
        .tokenize(with_cvv("4111111111111111", "other"))
        .await
        .expect("another tenant's CVV still fits")
        .into_inner();
    assert!(other.cvv_held);
}
