//! Role separation and tenant isolation over real gRPC + mTLS.
//!
//! The matrix below is the contract; docs/api.md shows the same table.

mod common;

use cardvault::proto::token_service_client::TokenServiceClient;
use cardvault::proto::{
    DeleteTokenRequest, DetokenizeBatchItem, DetokenizeBatchRequest, DetokenizeRequest,
    GetMetadataRequest, TokenizeBatchItem, TokenizeBatchRequest, TokenizeRequest,
    detokenize_batch_result, tokenize_batch_result,
};
use common::{Opts, VaultProcess, exp_year, foreign_client_cert};
use tonic::Code;
use tonic::transport::Channel;

const RPCS: [&str; 6] = [
    "Tokenize",
    "TokenizeBatch",
    "Detokenize",
    "DetokenizeBatch",
    "GetMetadata",
    "DeleteToken",
];

/// Caller identities (columns). `stranger` has a certificate from the right
/// CA that the policy does not name; `foreign-ca` one from another CA;
/// `no-cert` none at all.
const CALLERS: [&str; 9] = [
    "merchant",
    "processor",
    "other-merchant",
    "other-processor",
    "admin",
    "auditor",
    "stranger",
    "foreign-ca",
    "no-cert",
];

// Outcome abbreviations.
const OK: &str = "OK";
const PD: &str = "PERMISSION_DENIED";
const NF: &str = "NOT_FOUND";
const UA: &str = "UNAUTHENTICATED";
const HS: &str = "HANDSHAKE_REFUSED";
/// DeleteToken of a token the tenant does not have: OK with deleted=false,
/// the same answer as for a missing token.
const ABSENT: &str = "OK_NOT_DELETED";

/// Expected outcome per RPC, per caller, for a request naming tenant `demo`
/// (where the token lives) and tenant `other`. The token is always one of
/// tenant `demo`. Batch RPCs report their single item's outcome.
fn expected(rpc: &str) -> [[&'static str; 2]; 9] {
    match rpc {
        //                 merchant   processor  other-merchant other-processor admin     auditor   stranger  foreign   no-cert
        "Tokenize" | "TokenizeBatch" => [
            [OK, PD],
            [PD, PD],
            [PD, OK],
            [PD, PD],
            [PD, PD],
            [PD, PD],
            [UA, UA],
            [HS, HS],
            [HS, HS],
        ],
        "Detokenize" | "DetokenizeBatch" => [
            [PD, PD],
            [OK, PD],
            [PD, PD],
            [PD, NF],
            [PD, PD],
            [PD, PD],
            [UA, UA],
            [HS, HS],
            [HS, HS],
        ],
        "GetMetadata" => [
            [OK, PD],
            [OK, PD],
            [PD, NF],
            [PD, NF],
            [PD, PD],
            [PD, PD],
            [UA, UA],
            [HS, HS],
            [HS, HS],
        ],
        "DeleteToken" => [
            [OK, PD],
            [PD, PD],
            [PD, ABSENT],
            [PD, PD],
            [PD, PD],
            [PD, PD],
            [UA, UA],
            [HS, HS],
            [HS, HS],
        ],
        _ => unreachable!(),
    }
}

fn code_name(s: &tonic::Status) -> &'static str {
    match s.code() {
        tonic::Code::PermissionDenied => PD,
        tonic::Code::NotFound => NF,
        tonic::Code::Unauthenticated => UA,
        // TLS 1.3 clients learn of a refused certificate only after the
        // handshake, so it surfaces on the first call in one of these forms.
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::Cancelled => HS,
        other => panic!("unexpected status {other:?}: {}", s.message()),
    }
}

async fn channel_for(v: &VaultProcess, caller: &str) -> Option<Channel> {
    let ch = match caller {
        "stranger" => {
            v.channel_with(Some(
                v.issue_client_cert("spiffe://cardvault.dev/demo/stranger"),
            ))
            .await
        }
        "foreign-ca" => v.channel_with(Some(foreign_client_cert())).await,
        "no-cert" => v.channel_with(None).await,
        dev => Ok(v.channel(dev).await),
    };
    ch.ok()
}

async fn fresh_token(v: &VaultProcess) -> String {
    v.client("merchant")
        .await
        .tokenize(card("demo"))
        .await
        .unwrap()
        .into_inner()
        .token
}

fn card(tenant: &str) -> TokenizeRequest {
    TokenizeRequest {
        tenant: tenant.into(),
        pan: "4111111111111111".into(),
        exp_month: 1,
        exp_year: exp_year(),
        ..Default::default()
    }
}

/// Runs one cell; returns its outcome name.
async fn call(
    c: &mut TokenServiceClient<Channel>,
    rpc: &str,
    tenant: &str,
    token: &str,
) -> &'static str {
    let t = tenant.to_string();
    let res = match rpc {
        "Tokenize" => c.tokenize(card(tenant)).await.map(|_| OK),
        "TokenizeBatch" => c
            .tokenize_batch(TokenizeBatchRequest {
                tenant: t,
                items: vec![TokenizeBatchItem {
                    reference: "1".into(),
                    pan: "4111111111111111".into(),
                    exp_month: 1,
                    exp_year: exp_year(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .map(|r| match &r.get_ref().results[0].result {
                Some(tokenize_batch_result::Result::Ok(_)) => OK,
                other => panic!("{other:?}"),
            }),
        "Detokenize" => c
            .detokenize(DetokenizeRequest {
                tenant: t,
                token: token.into(),
                purpose: "matrix".into(),
                include_cvv: false,
            })
            .await
            .map(|_| OK),
        "DetokenizeBatch" => c
            .detokenize_batch(DetokenizeBatchRequest {
                tenant: t,
                items: vec![DetokenizeBatchItem {
                    reference: "1".into(),
                    token: token.into(),
                }],
                purpose: "matrix".into(),
                include_cvv: true,
            })
            .await
            .map(|r| match &r.get_ref().results[0].result {
                Some(detokenize_batch_result::Result::Ok(_)) => OK,
                Some(detokenize_batch_result::Result::Error(e)) if e.code == "NOT_FOUND" => NF,
                other => panic!("{other:?}"),
            }),
        "GetMetadata" => c
            .get_metadata(GetMetadataRequest {
                tenant: t,
                token: token.into(),
            })
            .await
            .map(|_| OK),
        "DeleteToken" => c
            .delete_token(DeleteTokenRequest {
                tenant: t,
                token: token.into(),
            })
            .await
            .map(|r| if r.get_ref().deleted { OK } else { ABSENT }),
        _ => unreachable!(),
    };
    match res {
        Ok(o) => o,
        Err(s) => code_name(&s),
    }
}

#[tokio::test]
async fn authorisation_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let mut failures = Vec::new();
    let mut cells = 0;
    for (ci, caller) in CALLERS.iter().enumerate() {
        let channel = channel_for(&v, caller).await;
        for rpc in RPCS {
            for (ti, tenant) in ["demo", "other"].iter().enumerate() {
                let token = fresh_token(&v).await;
                let got = match &channel {
                    None => HS,
                    Some(ch) => {
                        call(
                            &mut TokenServiceClient::new(ch.clone()),
                            rpc,
                            tenant,
                            &token,
                        )
                        .await
                    }
                };
                let want = expected(rpc)[ci][ti];
                cells += 1;
                if got != want {
                    failures.push(format!(
                        "{rpc} as {caller} for tenant {tenant}: want {want}, got {got}"
                    ));
                }
                // Nothing but the demo merchant may remove a demo token.
                let still_there = v
                    .client("merchant")
                    .await
                    .get_metadata(GetMetadataRequest {
                        tenant: "demo".into(),
                        token: token.clone(),
                    })
                    .await
                    .is_ok();
                let removed_by_owner =
                    rpc == "DeleteToken" && *caller == "merchant" && *tenant == "demo";
                assert_eq!(
                    still_there, !removed_by_owner,
                    "{rpc} as {caller} for {tenant}"
                );
            }
        }
    }
    assert_eq!(cells, 6 * 9 * 2);
    assert!(
        failures.is_empty(),
        "authorisation matrix mismatches:\n{}",
        failures.join("\n")
    );
}

/// The credential a compromised app tier holds can never read a PAN, by
/// any path, even with a valid token of its own tenant.
#[tokio::test]
async fn merchant_credential_cannot_detokenize_by_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let mut m = v.client("merchant").await;
    let t = m
        .tokenize(TokenizeRequest {
            cvv: Some("123".into()),
            ..card("demo")
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    for include_cvv in [false, true] {
        let e = m
            .detokenize(DetokenizeRequest {
                tenant: "demo".into(),
                token: t.clone(),
                purpose: "x".into(),
                include_cvv,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = m
            .detokenize_batch(DetokenizeBatchRequest {
                tenant: "demo".into(),
                items: vec![DetokenizeBatchItem {
                    reference: "r".into(),
                    token: t.clone(),
                }],
                purpose: "x".into(),
                include_cvv,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
    // Denied calls did not consume the CVV: the processor still gets it.
    let c = v
        .client("processor")
        .await
        .detokenize(DetokenizeRequest {
            tenant: "demo".into(),
            token: t,
            purpose: "auth".into(),
            include_cvv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.cvv.as_deref(), Some("123"));
    assert!(v.logs().contains("denied"), "denials are logged");
}

#[tokio::test]
async fn tls_1_2_is_refused() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let certs = v.data_dir.join("certs");
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(certs.join("ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(certs.join("merchant.pem")).unwrap()],
            PrivateKeyDer::from_pem_file(certs.join("merchant.key")).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(&v.addr).await.unwrap();
    let res = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(res.is_err(), "a TLS 1.2 handshake must fail");
}

fn write_policy(data: &std::path::Path, text: &str) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("policy.toml"), text).unwrap();
}

const BASE_POLICY: &str = r#"
[[principal]]
name = "spiffe://cardvault.dev/demo/merchant"
roles = ["merchant"]
tenants = ["demo"]

[[principal]]
name = "spiffe://cardvault.dev/demo/processor"
roles = ["processor"]
tenants = ["demo"]
detokenize_per_second = 5
detokenize_burst = 3
"#;

#[tokio::test]
async fn detokenize_budget_trips_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_policy(&data, BASE_POLICY);
    let v = VaultProcess::start(&data, &Opts::default());
    let t = v
        .client("merchant")
        .await
        .tokenize(card("demo"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut p = v.client("processor").await;
    let req = || DetokenizeRequest {
        tenant: "demo".into(),
        token: t.clone(),
        purpose: "auth".into(),
        include_cvv: false,
    };
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..6 {
        match p.detokenize(req()).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("budget"), "{}", e.message());
                limited += 1;
            }
        }
    }
    // The burst is 3; a slow machine may refill at most one more meanwhile.
    assert!((3..=4).contains(&ok), "ok = {ok}");
    assert!(limited >= 2);
    // A batch larger than the burst is refused whole.
    let big = DetokenizeBatchRequest {
        tenant: "demo".into(),
        items: (0..4)
            .map(|i| DetokenizeBatchItem {
                reference: i.to_string(),
                token: t.clone(),
            })
            .collect(),
        purpose: "auth".into(),
        include_cvv: false,
    };
    assert_eq!(
        p.detokenize_batch(big).await.unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    // It recovers as the bucket refills (5 cards/s).
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    p.detokenize(req()).await.expect("budget refilled");
    assert!(v.logs().contains("rate limited"));
}

#[tokio::test]
async fn policy_reload_on_sighup_applies_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_policy(&data, BASE_POLICY);
    let v = VaultProcess::start(&data, &Opts::default());
    let mut m = v.client("merchant").await;
    m.tokenize(card("demo")).await.unwrap();
    assert_eq!(
        m.tokenize(card("other")).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    // Grant tenant "other" as well; same connection.
    write_policy(
        &data,
        &BASE_POLICY.replacen(r#"tenants = ["demo"]"#, r#"tenants = ["demo", "other"]"#, 1),
    );
    v.signal("HUP");
    v.wait_for_log("policy reloaded", 1).await;
    m.tokenize(card("other")).await.expect("new grant applies");

    // A broken file keeps the previous policy.
    write_policy(&data, "this is not toml [");
    v.signal("HUP");
    v.wait_for_log("policy reload failed", 1).await;
    m.tokenize(card("other"))
        .await
        .expect("previous policy still in force");

    // Revoking the role takes effect on the open connection.
    write_policy(
        &data,
        &BASE_POLICY.replacen(r#"roles = ["merchant"]"#, r#"roles = ["auditor"]"#, 1),
    );
    v.signal("HUP");
    v.wait_for_log("policy reloaded", 2).await;
    assert_eq!(
        m.tokenize(card("demo")).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
}

/// A leaked certificate is revoked by its SHA-256 in the policy: after the
/// reload its open connection is refused (UNAUTHENTICATED) on the next
/// call, and the denial audited under its principal, while another
/// certificate keeps working.
#[tokio::test]
async fn a_revoked_certificate_is_refused_on_its_open_connection() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    const AUDITOR: &str = "\n[[principal]]\nname = \"spiffe://cardvault.dev/auditor\"\nroles = [\"auditor\"]\ntenants = [\"*\"]\n";
    write_policy(&data, &format!("{BASE_POLICY}{AUDITOR}"));
    let v = VaultProcess::start(&data, &Opts::default());
    let mut m = v.client("merchant").await;
    m.tokenize(card("demo")).await.unwrap();
    let mut p = v.client("processor").await;
    let meta = || GetMetadataRequest {
        tenant: "demo".into(),
        token: "tok_AAAAAAAAAAAAAAAAAAAAAA".into(),
    };
    assert_eq!(
        m.get_metadata(meta()).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let der = CertificateDer::from_pem_file(data.join("certs/merchant.pem")).unwrap();
    let fp = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    let openssl_style = fp
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    write_policy(
        &data,
        &format!("revoked_certificates = [\"{openssl_style}\"]\n{BASE_POLICY}{AUDITOR}"),
    );
    v.signal("HUP");
    v.wait_for_log("policy reloaded", 1).await;
    let err = m.tokenize(card("demo")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());
    // A fresh connection with it fares no better; another certificate
    // (the processor's) is untouched.
    let err = v
        .client("merchant")
        .await
        .get_metadata(meta())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        p.get_metadata(meta()).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let denied: Vec<_> = v
        .audit_events("Tokenize")
        .await
        .into_iter()
        .filter(|e| e.outcome == "UNAUTHENTICATED")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].principal.contains("merchant"), "{denied:?}");
}

/// Identity and role are checked before a key RPC's input: a merchant
/// asking for a data key rotation with no tenant is denied, not told that
/// the tenant is missing.
#[tokio::test]
async fn key_rpcs_check_the_role_before_the_input() {
    use cardvault::proto::RotateDataKeyRequest;
    use cardvault::proto::key_service_client::KeyServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let empty = RotateDataKeyRequest {
        all: false,
        tenant: String::new(),
    };
    let err = KeyServiceClient::new(v.channel("merchant").await)
        .rotate_data_key(empty.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = KeyServiceClient::new(v.channel("admin").await)
        .rotate_data_key(empty)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("tenant:"), "{}", err.message());
}

/// AuditService: only auditors, for every tenant. Cells are for a Query
/// naming tenant `demo` / `other`; BlastRadius and Verify span all tenants.
#[tokio::test]
async fn audit_service_authorisation() {
    use cardvault::proto::audit_service_client::AuditServiceClient;
    use cardvault::proto::{AuditQueryRequest, BlastRadiusRequest, VerifyAuditRequest};
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let expect = |caller: &str| match caller {
        "auditor" => OK,
        "stranger" => UA,
        "foreign-ca" | "no-cert" => HS,
        _ => PD,
    };
    let mut failures = Vec::new();
    for caller in CALLERS {
        let want = expect(caller);
        let Some(ch) = channel_for(&v, caller).await else {
            assert_eq!(want, HS, "{caller}");
            continue;
        };
        let mut a = AuditServiceClient::new(ch);
        let outcome = |r: Result<(), tonic::Status>| match r {
            Ok(()) => OK,
            Err(s) => code_name(&s),
        };
        for tenant in ["demo", "other"] {
            let got = outcome(
                a.query(AuditQueryRequest {
                    tenant: tenant.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            );
            if got != want {
                failures.push(format!(
                    "Query({tenant}) as {caller}: want {want}, got {got}"
                ));
            }
        }
        let got = outcome(
            a.blast_radius(BlastRadiusRequest {
                principal: "x".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        );
        if got != want {
            failures.push(format!("BlastRadius as {caller}: want {want}, got {got}"));
        }
        let got = outcome(a.verify(VerifyAuditRequest {}).await.map(|_| ()));
        if got != want {
            failures.push(format!("Verify as {caller}: want {want}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Bytes that are not a valid message for the method: field 2 (`pan`, a
/// string) holding invalid UTF-8, plus optional padding in field 15.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "2")]
    pan: Vec<u8>,
    #[prost(bytes = "vec", tag = "15")]
    padding: Vec<u8>,
}

/// Sends `body` to `TokenService/Tokenize` as raw protobuf.
async fn raw_tokenize(channel: tonic::transport::Channel, body: Garbage) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/cardvault.v1.TokenService/Tokenize");
    let codec = tonic_prost::ProstCodec::<Garbage, Garbage>::default();
    grpc.unary(tonic::Request::new(body), path, codec)
        .await
        .map(|_| ())
        .unwrap_err()
}

/// A caller the policy does not know is refused before its request body is
/// decoded; a known caller's undecodable or oversized body is refused as
/// bad input, on the record, without echoing it.
#[tokio::test]
async fn bodies_are_decoded_only_for_known_callers_and_bad_ones_refused_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let garbage = || Garbage {
        pan: vec![0xff, 0xfe, 0x34, 0x31],
        padding: Vec::new(),
    };
    let stranger = v
        .channel_with(Some(v.issue_client_cert("spiffe://cardvault.dev/stranger")))
        .await
        .unwrap();
    let s = raw_tokenize(stranger, garbage()).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = raw_tokenize(v.channel("merchant").await, garbage()).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("request: "), "{s:?}");
    let big = Garbage {
        pan: Vec::new(),
        padding: vec![b'7'; 5 << 20],
    };
    let s = raw_tokenize(v.channel("merchant").await, big).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(!s.message().contains("777"), "{s:?}");
    let refused: Vec<_> = v
        .audit_events("Tokenize")
        .await
        .into_iter()
        .filter(|e| e.outcome != "OK")
        .collect();
    let outcomes: Vec<&str> = refused.iter().map(|e| e.outcome.as_str()).collect();
    assert!(outcomes.contains(&"UNAUTHENTICATED"), "{outcomes:?}");
    assert!(outcomes.contains(&"INVALID_ARGUMENT"), "{outcomes:?}");
    assert!(outcomes.contains(&"RESOURCE_EXHAUSTED"), "{outcomes:?}");
}

/// Each method takes at most what its largest real request needs: a
/// Tokenize is a few hundred bytes, so one of 200 KiB (a valid message,
/// well under the token service's 1 MiB for a full batch) is refused as
/// too large before it is decoded, not decoded and then refused for its
/// content. A full batch still fits.
#[tokio::test]
async fn each_method_takes_at_most_its_largest_real_request() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let mut m = v.client("merchant").await;
    let huge = TokenizeRequest {
        tenant: "demo".into(),
        pan: "4111111111111111".into(),
        exp_month: 12,
        exp_year: exp_year(),
        cardholder_name: Some("A".repeat(200 << 10)),
        ..Default::default()
    };
    let s = m.tokenize(huge).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message()
            .contains("request: larger than Tokenize accepts"),
        "{s:?}"
    );
    let s = m
        .get_metadata(GetMetadataRequest {
            tenant: "demo".into(),
            token: format!("tok_{}", "A".repeat(100 << 10)),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    // The largest real batch: 1,000 items with 100-character names.
    let items = (0..1000)
        .map(|i| TokenizeBatchItem {
            reference: format!("ref-{i:04}-{}", "r".repeat(50)),
            pan: "4111 1111 1111 1111".into(),
            exp_month: 12,
            exp_year: exp_year(),
            cardholder_name: Some("Ñ".repeat(100)),
            cvv: Some("123".into()),
        })
        .collect();
    let r = m
        .tokenize_batch(TokenizeBatchRequest {
            tenant: "demo".into(),
            items,
            dedupe: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 1000);
    let refused: Vec<_> = v.audit_events("Tokenize").await;
    assert!(refused.iter().any(|e| e.outcome == "RESOURCE_EXHAUSTED"));
}

/// A refused call is recorded under its method's name, never under the
/// caller's own path text: a stranger calling a path made of a card
/// number leaves no card number in the log, and a refusal at the gate goes
/// under the name the handler uses (`AuditQuery`, not `Query`).
#[tokio::test]
async fn a_refused_path_never_carries_its_text_into_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let stranger = v
        .channel_with(Some(v.issue_client_cert("spiffe://cardvault.dev/stranger")))
        .await
        .unwrap();
    let pan = "4111111111111111";
    for path in [
        format!("/cardvault.v1.TokenService/{pan}"),
        "/cardvault.v1.AuditService/Query".to_owned(),
    ] {
        let mut grpc = tonic::client::Grpc::new(stranger.clone());
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<Garbage, Garbage>::default();
        let s = grpc
            .unary(
                tonic::Request::new(Garbage {
                    pan: Vec::new(),
                    padding: Vec::new(),
                }),
                http::uri::PathAndQuery::try_from(path.as_str()).unwrap(),
                codec,
            )
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{path}: {s:?}");
    }
    let refused: Vec<_> = v
        .audit_events("")
        .await
        .into_iter()
        .filter(|e| e.outcome == "UNAUTHENTICATED")
        .collect();
    let actions: Vec<&str> = refused.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.contains(&"AuditQuery"), "{actions:?}");
    assert!(actions.contains(&"OtherMethod"), "{actions:?}");
    for e in &refused {
        assert!(!format!("{e:?}").contains(pan), "{e:?}");
    }
}

/// A SIGHUP as soon as the vault says it is listening reloads the policy:
/// the handler is in place by then. (It was installed by a task that might
/// not have run yet, and a SIGHUP before it terminated the vault.)
#[tokio::test]
async fn a_sighup_right_after_start_reloads_and_does_not_kill_the_vault() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        write_policy(&data, BASE_POLICY);
        let mut v = VaultProcess::start(&data, &Opts::default());
        v.signal("HUP");
        v.wait_for_log("policy reloaded", 1).await;
        assert!(v.child.try_wait().unwrap().is_none(), "the vault died");
        v.stop().await;
    }
}
