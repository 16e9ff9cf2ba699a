//! Key ceremonies over the real binary: init with named custodians and
//! age-encrypted shares, unseal by distinct custodians, rekey with a
//! quorum, and what one admin identity alone can (not) do.

mod common;

use cardvault::crypto::shamir::{self, Binding};
use cardvault::proto::key_service_client::KeyServiceClient;
use cardvault::proto::{
    CancelRekeyRequest, DetokenizeRequest, InitRequest, SealRequest, StartRekeyRequest,
    StatusRequest, SubmitRekeyShareRequest, TokenizeRequest, UnsealRequest,
};
use common::custody::{self, Custodian};
use common::{Opts, VaultProcess, exp_year};
use tonic::Code;
use tonic::transport::Channel;

async fn admin(v: &VaultProcess) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(v.channel("admin").await)
}

fn init_req(custodians: &[Custodian], threshold: u32) -> InitRequest {
    InitRequest {
        threshold,
        custodians: custodians.iter().map(Custodian::proto).collect(),
    }
}

/// Each custodian's share text, opened with their own key, from the
/// encrypted shares the vault returned.
fn open_all(custodians: &[Custodian], shares: &[cardvault::proto::CustodianShare]) -> Vec<String> {
    custodians
        .iter()
        .map(|c| {
            let s = shares
                .iter()
                .find(|s| s.principal == c.principal)
                .expect("one share per custodian");
            c.open(&s.age_share)
        })
        .collect()
}

async fn submit(
    v: &VaultProcess,
    c: &Custodian,
    nonce: &str,
    share: &str,
) -> Result<cardvault::proto::RekeyStatus, tonic::Status> {
    c.keys(v)
        .await
        .submit_rekey_share(SubmitRekeyShareRequest {
            nonce: nonce.into(),
            share: share.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn unseal(
    c: &Custodian,
    v: &VaultProcess,
    share: &str,
) -> Result<cardvault::proto::UnsealResponse, tonic::Status> {
    c.keys(v)
        .await
        .unseal(UnsealRequest {
            share: share.into(),
            reset: false,
        })
        .await
        .map(|r| r.into_inner())
}

fn card(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        tenant: "demo".into(),
        pan: pan.into(),
        exp_month: 3,
        exp_year: exp_year(),
        ..Default::default()
    }
}

fn detok(token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        tenant: "demo".into(),
        token: token.into(),
        purpose: "auth".into(),
        include_cvv: false,
    }
}

/// The documented ceremony (docs/key-custody.md, deploy/README.md), as its commands run: three custodians with age
/// key files, threshold 2, through the CLI; one custodian tries to enter
/// two shares.
#[tokio::test]
async fn a_ceremony_for_three_custodians_with_threshold_two_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (v, custodians) = custody::start(&data, 3, 0, &Opts::default());
    let files: Vec<_> = custodians
        .iter()
        .enumerate()
        .map(|(i, c)| c.write_files(dir.path(), i + 1))
        .collect();
    let cli = |args: &[&str], identity: Option<(&std::path::Path, &std::path::Path)>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cardvault"));
        cmd.args(args)
            .args([
                "--addr",
                &format!("https://{}", v.addr),
                "--server-name",
                "localhost",
            ])
            .arg("--dev-dir")
            .arg(&data);
        if let Some((cert, key)) = identity {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // The admin initialises, naming the custodians.
    let shares_dir = dir.path().join("shares");
    let mut init: Vec<String> = vec!["init".into(), "--threshold".into(), "2".into()];
    for c in &custodians {
        init.push("--custodian".into());
        init.push(format!("{}={}", c.principal, c.recipient()));
    }
    init.push("--out-dir".into());
    init.push(shares_dir.display().to_string());
    let args: Vec<&str> = init.iter().map(String::as_str).collect();
    let (ok, out) = cli(&args, None);
    assert!(ok, "{out}");
    assert!(
        !out.contains("cvs2-"),
        "no plaintext share is printed: {out}"
    );
    let mut share_files: Vec<_> = std::fs::read_dir(&shares_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    share_files.sort();
    assert_eq!(share_files.len(), 3);
    for f in &share_files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"),
            "{text}"
        );
    }
    // `age -d -i key.txt share.age` opens a share (when the age tool is
    // installed; .ci/run installs it).
    if let Ok(out) = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&files[0].2)
        .arg(&share_files[0])
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("cvs2-"));
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI installs the age tool");
    }
    // Custodian 1 unseals with their file and key.
    let unseal_as = |n: usize, share: &std::path::Path| {
        let (cert, key, age_key) = &files[n];
        cli(
            &[
                "unseal",
                "--share-file",
                share.to_str().unwrap(),
                "--identity",
                age_key.to_str().unwrap(),
            ],
            Some((cert, key)),
        )
    };
    let (ok, out) = unseal_as(0, &share_files[0]);
    assert!(ok && out.contains("1 of 2"), "{out}");
    // ... and tries to enter a second share: their own again, or another's.
    let (ok, out) = unseal_as(0, &share_files[0]);
    assert!(!ok && out.contains("already entered"), "{out}");
    let other = custodians[1].open(&std::fs::read_to_string(&share_files[1]).unwrap());
    let plain = dir.path().join("other.txt");
    std::fs::write(&plain, &other).unwrap();
    let (cert, key, _) = &files[0];
    let (ok, out) = cli(
        &["unseal", "--share-file", plain.to_str().unwrap()],
        Some((cert, key)),
    );
    assert!(!ok && out.contains("another custodian"), "{out}");
    // A second custodian completes the unseal.
    let (ok, out) = unseal_as(2, &share_files[2]);
    assert!(ok, "{out}");
    assert!(out.contains("unsealed"), "{out}");
    let t = v
        .client("merchant")
        .await
        .tokenize(card("4111111111111111"))
        .await
        .expect("unsealed");
    assert!(!t.into_inner().token.is_empty());
    // Every unseal is audited by principal, the refused ones too, and no
    // record holds share bytes.
    let events = v.audit_events("Unseal").await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events.iter().filter(|e| e.outcome == "OK").count(), 2);
    assert!(events.iter().all(|e| e.principal.contains("custodian-")));
    let y = other.split('-').nth(6).unwrap();
    assert!(!format!("{events:?}").contains(y));
}

#[tokio::test]
async fn init_and_unseal_enforce_split_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (v, cs) = custody::start(&data, 3, 0, &Opts::default());
    let mut k = admin(&v).await;
    // Threshold at least 2 and at most the custodians; distinct principals;
    // real age keys. Errors name the field.
    for (req, field) in [
        (init_req(&cs, 1), "threshold"),
        (init_req(&cs, 4), "threshold"),
        (init_req(&cs[..1], 1), "custodians"),
        (
            InitRequest {
                threshold: 2,
                custodians: vec![cs[0].proto(), cs[0].proto()],
            },
            "custodians[1].principal",
        ),
        (
            InitRequest {
                threshold: 2,
                custodians: vec![
                    cs[0].proto(),
                    cardvault::proto::Custodian {
                        principal: "x".into(),
                        age_recipient: "ssh-ed25519 AAAA".into(),
                    },
                ],
            },
            "custodians[1].age_recipient",
        ),
    ] {
        let e = k.init(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{e:?}");
    }
    // Only admins initialise.
    let e = cs[0]
        .keys(&v)
        .await
        .init(init_req(&cs, 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let r = k.init(init_req(&cs, 2)).await.unwrap().into_inner();
    assert_eq!(r.shares.len(), 3);
    // No response holds a share its caller can read.
    assert!(!format!("{:?}", r.shares).contains("cvs2-"));
    let shares = open_all(&cs, &r.shares);
    assert_eq!(
        k.init(init_req(&cs, 2)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // Admins do not enter shares.
    let e = k
        .unseal(UnsealRequest {
            share: shares[0].clone(),
            reset: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Progress says who, not which share.
    let p = unseal(&cs[0], &v, &shares[0]).await.unwrap();
    assert_eq!((p.sealed, p.progress), (true, 1));
    assert_eq!(p.entered_by, vec![cs[0].principal.clone()]);
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.unseal_entered_by, vec![cs[0].principal.clone()]);
    // A reset forgets it, and says so.
    let r = cs[1]
        .keys(&v)
        .await
        .unseal(UnsealRequest {
            share: String::new(),
            reset: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.sealed, r.progress, r.threshold), (true, 0, 2));
    unseal(&cs[0], &v, &shares[0]).await.unwrap();
    assert_eq!(st.custodians.len(), 3);
    // A share for another vault, and a forged one (valid checksum, MAC made
    // without the KEK), are refused; the forgery once combined, by name.
    let real = shamir::decode_share(&shares[1]).unwrap();
    let other_vault = Binding {
        vault_id: "00000000000000ff".into(),
        ..real.binding.clone()
    };
    let e = unseal(
        &cs[1],
        &v,
        &shamir::encode_share(&[1; 32], &other_vault, &real.share),
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("another vault"), "{e:?}");
    let forged = shamir::encode_share(&[1; 32], &real.binding, &real.share);
    let e = unseal(&cs[1], &v, &forged).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("failed authentication") && e.message().contains(&cs[1].principal),
        "{e:?}"
    );
    // A wrong share value: the shares do not rebuild the key; progress reset.
    unseal(&cs[0], &v, &shares[0]).await.unwrap();
    let mut wrong = real.share.clone();
    wrong.y[0] ^= 1;
    let wrong = shamir::encode_share(&[1; 32], &real.binding, &wrong);
    let e = unseal(&cs[1], &v, &wrong).await.unwrap_err();
    assert!(e.message().contains("do not rebuild"), "{e:?}");
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.sealed && st.unseal_entered_by.is_empty());
    // Any two good shares unseal.
    unseal(&cs[2], &v, &shares[2]).await.unwrap();
    assert!(!unseal(&cs[0], &v, &shares[0]).await.unwrap().sealed);
    v.stop().await;

    // An altered seal configuration in the store (threshold lowered to 1)
    // is caught, never used.
    {
        use cardvault::store::Store;
        use prost::Message;
        let store = cardvault::store::sled::SledStore::open(&data.join("sled")).unwrap();
        let name = cardvault::vault::keys::SEAL_CONFIG_NAME;
        let mut cfg = cardvault::vault::keys::SealConfig::decode(
            store.get_key(name).await.unwrap().unwrap().as_slice(),
        )
        .unwrap();
        cfg.threshold = 1;
        store
            .put_keys(&[(name.to_owned(), cfg.encode_to_vec())])
            .await
            .unwrap();
    }
    let v = VaultProcess::start_serve(&data, &Opts::default());
    let e = unseal(&cs[0], &v, &shares[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("altered"), "{e:?}");
}

/// One admin identity, which is also the auditor, alone: whatever it calls
/// (init, unseal, rekey, status, audit query), nothing it gets back holds
/// a share it can read, and the vault stays sealed.
#[tokio::test]
async fn one_admin_identity_alone_cannot_rebuild_the_kek() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (v, cs) = custody::start(&data, 3, 0, &Opts::default());
    // The insider: admin and auditor in one certificate, with an age key.
    let insider = "spiffe://cardvault.test/insider";
    let policy = std::fs::read_to_string(data.join("policy.toml")).unwrap()
        + &format!(
            "\n[[principal]]\nname = \"{insider}\"\nroles = [\"admin\", \"auditor\"]\ntenants = [\"*\"]\n"
        );
    std::fs::write(data.join("policy.toml"), policy).unwrap();
    v.signal("HUP");
    v.wait_for_log("policy reloaded", 1).await;
    let cert = v.issue_client_cert(insider);
    let ch = v.channel_with(Some(cert)).await.unwrap();
    let mut k = KeyServiceClient::new(ch.clone());
    let mut a = cardvault::proto::audit_service_client::AuditServiceClient::new(ch);
    let own_key = age::x25519::Identity::generate();
    let mut seen = String::new();
    // Init, naming the custodians (a witnessed step of the ceremony).
    let r = k.init(init_req(&cs, 2)).await.unwrap().into_inner();
    seen += &format!("{r:?}{:?}", r.shares);
    let shares = open_all(&cs, &r.shares);
    // Everything it can try.
    for s in &r.shares {
        // The encrypted shares do not open with its own key.
        assert!(age::decrypt(&own_key, s.age_share.as_bytes()).is_err());
        let e = k
            .unseal(UnsealRequest {
                share: s.age_share.clone(),
                reset: false,
            })
            .await
            .unwrap_err();
        seen += e.message();
    }
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    seen += &format!("{st:?}");
    let e = k
        .start_rekey(StartRekeyRequest {
            threshold: 2,
            custodians: vec![
                cardvault::proto::Custodian {
                    principal: insider.into(),
                    age_recipient: own_key.to_public().to_string(),
                },
                cardvault::proto::Custodian {
                    principal: "spiffe://cardvault.test/insider-2".into(),
                    age_recipient: own_key.to_public().to_string(),
                },
            ],
        })
        .await
        .unwrap_err();
    // A rekey needs an unsealed vault, then a quorum of custodians.
    seen += e.message();
    let e = k
        .submit_rekey_share(SubmitRekeyShareRequest {
            nonce: "x".into(),
            share: r.shares[0].age_share.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Sealed, the log answers UNAVAILABLE; what it holds is checked below
    // once the custodians have unsealed.
    let q = a
        .query(cardvault::proto::AuditQueryRequest::default())
        .await;
    seen += &format!("{q:?}");
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.sealed);
    // Not one share's point or data appears in anything it got back.
    for s in &shares {
        let y = s.split('-').nth(6).unwrap();
        assert!(!seen.contains(y), "a share leaked to the insider");
        assert!(!seen.contains(s.as_str()));
    }
    // One custodian enters one share only: still sealed.
    unseal(&cs[0], &v, &shares[0]).await.unwrap();
    assert!(unseal(&cs[0], &v, &shares[0]).await.is_err());
    assert!(
        k.status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .sealed
    );
    // Unsealed by two custodians, the whole audit log as the insider
    // reads it holds no share either.
    unseal(&cs[1], &v, &shares[1]).await.unwrap();
    let q = a
        .query(cardvault::proto::AuditQueryRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(q.events.iter().any(|e| e.action == "Unseal"));
    let log = format!("{q:?}");
    for s in &shares {
        assert!(!log.contains(s.split('-').nth(6).unwrap()));
    }
}

/// A rekey needs a quorum of current custodians; it can hand the key to a
/// new set; cancelled, timed out or stopped by a crash it changes nothing.
#[tokio::test]
async fn rekey_needs_a_quorum_and_an_unfinished_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (v, cs) = custody::start(&data, 3, 1, &Opts::default());
    let (current, new_set) = (&cs[..3], [&cs[0], &cs[1], &cs[3]]);
    let mut k = admin(&v).await;
    let r = k.init(init_req(current, 2)).await.unwrap().into_inner();
    let shares = open_all(current, &r.shares);
    unseal(&cs[0], &v, &shares[0]).await.unwrap();
    unseal(&cs[1], &v, &shares[1]).await.unwrap();
    let token = v
        .client("merchant")
        .await
        .tokenize(card("4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let start = |k: &mut KeyServiceClient<Channel>| {
        let mut k = k.clone();
        let custodians = new_set.iter().map(|c| c.proto()).collect();
        async move {
            k.start_rekey(StartRekeyRequest {
                threshold: 2,
                custodians,
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    // Cancelled after one share: nothing changed.
    let r = start(&mut k).await.unwrap();
    assert_eq!(r.required, 2);
    let p = submit(&v, &cs[0], &r.nonce, &shares[0]).await.unwrap();
    assert!(!p.completed && p.entered_by == vec![cs[0].principal.clone()]);
    // One custodian, one share.
    let e = submit(&v, &cs[0], &r.nonce, &shares[0]).await.unwrap_err();
    assert!(e.message().contains("already submitted"), "{e:?}");
    // A second rekey waits for this one.
    assert_eq!(
        start(&mut k).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    cs[2]
        .keys(&v)
        .await
        .cancel_rekey(CancelRekeyRequest {
            nonce: r.nonce.clone(),
        })
        .await
        .unwrap();
    let e = submit(&v, &cs[1], &r.nonce, &shares[1]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Stopped by a crash after one share: nothing changed either.
    let r = start(&mut k).await.unwrap();
    submit(&v, &cs[1], &r.nonce, &shares[1]).await.unwrap();
    v.kill9().await;
    let v = VaultProcess::start_serve(&data, &Opts::default());
    unseal(&cs[0], &v, &shares[0]).await.unwrap();
    assert!(
        !unseal(&cs[2], &v, &shares[2]).await.unwrap().sealed,
        "old shares still work"
    );
    let mut k = admin(&v).await;
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.rekey.is_none(), "a restart abandons the rekey");

    // A completed rekey: two current custodians, to a new set.
    let r = start(&mut k).await.unwrap();
    submit(&v, &cs[2], &r.nonce, &shares[2]).await.unwrap();
    let done = submit(&v, &cs[0], &r.nonce, &shares[0]).await.unwrap();
    assert!(done.completed && done.key_generation == 2, "{done:?}");
    assert_eq!(done.shares.len(), 3);
    let new: Vec<String> = new_set
        .iter()
        .map(|c| {
            let s = done
                .shares
                .iter()
                .find(|s| s.principal == c.principal)
                .unwrap();
            c.open(&s.age_share)
        })
        .collect();
    k.seal(SealRequest {}).await.unwrap();
    // The old shares no longer work; the new custodian's does.
    let e = unseal(&cs[0], &v, &shares[0]).await.unwrap_err();
    assert!(e.message().contains("generation"), "{e:?}");
    unseal(&cs[3], &v, &new[2]).await.unwrap();
    assert!(!unseal(&cs[1], &v, &new[1]).await.unwrap().sealed);
    let pan = v
        .client("processor")
        .await
        .detokenize(detok(&token))
        .await
        .unwrap()
        .into_inner()
        .pan;
    assert_eq!(pan, "4111111111111111");
    // Each step is on the record, by principal.
    for action in ["RekeyStart", "RekeyShare", "RekeyCancel", "RekeyComplete"] {
        assert!(!v.audit_events(action).await.is_empty(), "{action}");
    }
}
