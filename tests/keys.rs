//! Key rotation: data key rotation, online rewrap (including a SIGKILL
//! mid-way), retirement, and rekeys against a faulty or concurrent world.
//! The ceremonies themselves (init, unseal, rekey) are in `custody.rs`.

mod common;

use std::sync::Arc;

use cardvault::Error;
use cardvault::crypto::keys::SecretKey;
use cardvault::fields::{Purpose, Tenant};
use cardvault::proto::key_service_client::KeyServiceClient;
use cardvault::proto::{
    DetokenizeRequest, RetireKeyRequest, RewrapRequest, RotateDataKeyRequest, StatusRequest,
    TokenizeBatchItem, TokenizeBatchRequest,
};
use cardvault::store::Store;
use cardvault::store::sled::SledStore;
use cardvault::token::Token;
use cardvault::vault::keys::SealConfig;
use cardvault::vault::{
    CallContext, NewCard, TokenizeOptions, Unmetered, Vault, VaultConfig, custody,
};
use common::flaky::{Flaky, Pause};
use common::{Opts, VaultProcess, exp_year};
use tonic::Code;
use tonic::transport::Channel;

fn detok(token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        tenant: "demo".into(),
        token: token.into(),
        purpose: "auth".into(),
        include_cvv: false,
    }
}

async fn admin(v: &VaultProcess) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(v.channel("admin").await)
}

/// An unsealed vault (random KEK) on a sled store in `dir`.
async fn unsealed(dir: &std::path::Path, cfg: VaultConfig) -> (Vault, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).unwrap());
    let v = Vault::new(store.clone(), cfg);
    v.unseal(SecretKey::generate()).await.unwrap();
    (v, store)
}

/// A vault configuration whose data keys rotate after `n` encryptions.
fn limited(n: u64) -> VaultConfig {
    VaultConfig {
        dek_max_encryptions: n,
        ..Default::default()
    }
}

fn new_card(pan: &str) -> NewCard {
    NewCard::sample(pan)
}

fn ctx() -> CallContext {
    CallContext {
        principal: "test".into(),
        ..Default::default()
    }
}

/// Rotate, then rewrap 10k records while tokenize and detokenize keep
/// running; every record reads afterwards and the old key can be retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_10k_records_under_live_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaultConfig {
        retire_grace: std::time::Duration::ZERO,
        ..Default::default()
    };
    let (v, store) = unsealed(dir.path(), cfg).await;
    let v = Arc::new(v);
    let demo = Tenant::parse("demo").unwrap();
    let pans = [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
    ];
    let mut tokens = Vec::new();
    for chunk in 0..10 {
        let items = (0..1000)
            .map(|i| Ok(new_card(pans[(chunk + i) % 4])))
            .collect();
        for r in v
            .tokenize_batch(&ctx(), &demo, items, TokenizeOptions::default(), &Unmetered)
            .await
            .unwrap()
        {
            let m = r.unwrap();
            tokens.push(m.token);
        }
    }
    assert_eq!(tokens.len(), 10_000);
    let rotated = v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    assert_eq!(rotated, vec![("demo".to_string(), 2)]);
    // Retiring v1 now is refused: 10k records use it.
    let e = v.retire_key(&ctx(), &demo, 1).await.unwrap_err();
    assert!(
        matches!(e, Error::FailedPrecondition(ref m) if m.contains("10000 records")),
        "{e}"
    );

    // Live traffic during the rewrap.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for w in 0..2 {
        let (v, stop, sample) = (v.clone(), stop.clone(), tokens[w * 17].clone());
        traffic.push(tokio::spawn(async move {
            let purpose = Purpose::parse("live").unwrap();
            let demo = Tenant::parse("demo").unwrap();
            let mut created = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = v
                    .tokenize(
                        &ctx(),
                        &demo,
                        new_card("4111111111111111"),
                        TokenizeOptions::default(),
                        &Unmetered,
                    )
                    .await
                    .unwrap();
                assert_eq!(m.key_version, 2, "new writes use the new key");
                created.push(m.token);
                let c = v
                    .detokenize(
                        &ctx(),
                        &demo,
                        &Token::parse(&sample).unwrap(),
                        &purpose,
                        false,
                    )
                    .await
                    .unwrap();
                assert!(c.pan.expose().len() >= 15);
            }
            created
        }));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let progress = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(p) = rx.recv().await {
            seen.push(p);
        }
        seen
    });
    let done = v.rewrap(&ctx(), None, tx).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut created = Vec::new();
    for t in traffic {
        created.extend(t.await.unwrap());
    }
    let seen = progress.await.unwrap();
    assert_eq!((done.total, done.done, done.skipped), (10_000, 10_000, 0));
    assert!(
        seen.len() >= 3 && seen.last().unwrap().finished,
        "progress was streamed"
    );
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    let counts = v.version_counts().await.unwrap();
    assert_eq!(counts.get(&("demo".to_string(), 1)), None, "{counts:?}");
    assert_eq!(
        counts[&("demo".to_string(), 2)],
        10_000 + created.len() as u64
    );
    let purpose = Purpose::parse("check").unwrap();
    for (i, t) in tokens.iter().chain(created.iter()).enumerate() {
        let c = v
            .detokenize(&ctx(), &demo, &Token::parse(t).unwrap(), &purpose, false)
            .await
            .unwrap();
        if i < 10_000 {
            assert_eq!(c.pan.expose(), pans[(i / 1000 + i % 1000) % 4]);
        }
    }
    // Now v1 can be destroyed; the active key cannot.
    v.retire_key(&ctx(), &demo, 1).await.unwrap();
    assert!(matches!(
        v.retire_key(&ctx(), &demo, 2).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(
        store
            .get_key("tenant/demo/dek/0000000001")
            .await
            .unwrap()
            .is_none()
    );
    // A second rewrap finds nothing to do.
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    assert_eq!(v.rewrap(&ctx(), None, tx).await.unwrap().total, 0);
}

#[tokio::test]
async fn data_keys_rotate_automatically_at_the_encryption_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = limited(5);
    let (v, _) = unsealed(dir.path(), cfg).await;
    let demo = Tenant::parse("demo").unwrap();
    let mut tokens = Vec::new();
    for _ in 0..12 {
        tokens.push(tokenized(&v, "demo").await);
    }
    let versions: std::collections::BTreeSet<u32> = tokens.iter().map(|m| m.key_version).collect();
    // "Rotate after 5 encryptions": five per version, the limit'th
    // included, so 12 tokenizes fill versions 1 and 2 and start 3.
    assert_eq!(versions, (1..=3).collect(), "{versions:?}");
    assert_eq!(tokens.iter().filter(|m| m.key_version == 1).count(), 5);
    let purpose = Purpose::parse("check").unwrap();
    for m in &tokens {
        v.detokenize(
            &ctx(),
            &demo,
            &Token::parse(&m.token).unwrap(),
            &purpose,
            false,
        )
        .await
        .unwrap();
    }
    let rotations = rotation_records(&v).await;
    assert!(
        rotations
            .iter()
            .all(|h| h.body.detail.contains("automatic"))
    );
    assert_eq!(rotations.len(), versions.len() - 1);
}

/// A rewrap killed with SIGKILL half-way resumes to completion on restart,
/// with no record skipped or unreadable.
#[tokio::test]
async fn rewrap_survives_sigkill_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Slow the rewrap down (a production throttle) so the kill lands mid-way.
    // No retire grace: the old key is retired right after the rewrap.
    let opts = Opts {
        env: vec![
            ("CARDVAULT_REWRAP_PAUSE_MS".into(), "300".into()),
            ("CARDVAULT_RETIRE_GRACE_SECS".into(), "0".into()),
        ],
        ..Default::default()
    };
    let v = VaultProcess::start(&data, &opts);
    let mut m = v.client("merchant").await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let items = (0..1000)
            .map(|i| TokenizeBatchItem {
                reference: i.to_string(),
                pan: "6011111111111117".into(),
                exp_month: 1,
                exp_year: exp_year(),
                ..Default::default()
            })
            .collect();
        let r = m
            .tokenize_batch(TokenizeBatchRequest {
                tenant: "demo".into(),
                items,
                ..Default::default()
            })
            .await
            .unwrap();
        for res in r.into_inner().results {
            match res.result.unwrap() {
                cardvault::proto::tokenize_batch_result::Result::Ok(t) => tokens.push(t.token),
                other => panic!("{other:?}"),
            }
        }
    }
    let mut k = admin(&v).await;
    k.rotate_data_key(RotateDataKeyRequest {
        tenant: "demo".into(),
        all: false,
    })
    .await
    .unwrap();
    let mut stream = k
        .rewrap(RewrapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut first_done = 0;
    while let Some(p) = stream.message().await.unwrap() {
        if p.done > 0 {
            assert!(p.done < p.total, "rewrap finished before the kill: {p:?}");
            first_done = p.done;
            break;
        }
    }
    assert!(first_done > 0);
    drop((stream, k, m));
    v.kill9().await;

    let v = VaultProcess::start(&data, &opts);
    let mut k = admin(&v).await;
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    let demo = st.tenants.iter().find(|t| t.tenant == "demo").unwrap();
    let v1 = demo
        .versions
        .iter()
        .find(|x| x.version == 1)
        .unwrap()
        .records;
    assert!(
        v1 > 0 && v1 < 3000,
        "part done before the kill: v1 still has {v1}"
    );
    // Resume.
    let mut stream = k
        .rewrap(RewrapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await.unwrap() {
        last = Some(p);
    }
    let last = last.unwrap();
    assert!(last.finished);
    assert_eq!(
        last.total, v1,
        "the second run picks up exactly what was left"
    );
    assert_eq!(last.done, v1);
    let e = k
        .retire_key(RetireKeyRequest {
            tenant: "demo".into(),
            version: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "the active key cannot be retired"
    );
    k.retire_key(RetireKeyRequest {
        tenant: "demo".into(),
        version: 1,
    })
    .await
    .unwrap();
    let mut p = v.client("processor").await;
    for t in &tokens {
        let c = p.detokenize(detok(t)).await.unwrap().into_inner();
        assert_eq!(c.pan, "6011111111111117");
    }
    let st = k.status(StatusRequest {}).await.unwrap().into_inner();
    let demo = st.tenants.iter().find(|t| t.tenant == "demo").unwrap();
    assert_eq!((demo.active_version, demo.versions[1].records), (2, 3000));
    // The retired version is still listed, with when it was retired, and
    // retiring it again says so instead of "no such version".
    let v1 = &demo.versions[0];
    assert_eq!((v1.version, v1.records), (1, 0));
    assert!(v1.retired_at.is_some() && v1.created_at.is_some() && !v1.active);
    assert!(demo.versions[1].retired_at.is_none());
    let e = k
        .retire_key(RetireKeyRequest {
            tenant: "demo".into(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("version 1 was already retired at 20"),
        "{}",
        e.message()
    );
    let e = k
        .retire_key(RetireKeyRequest {
            tenant: "demo".into(),
            version: 7,
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("no such data key version"),
        "{}",
        e.message()
    );
}

// ---- master key rotation against a faulty or concurrent world ----

/// Three custodians for vault-level tests: principal and age key.
fn keyholders() -> Vec<(String, age::x25519::Identity)> {
    (1..=3)
        .map(|i| {
            (
                format!("spiffe://test/custodian-{i}"),
                age::x25519::Identity::generate(),
            )
        })
        .collect()
}

fn custodians(holders: &[(String, age::x25519::Identity)]) -> Vec<custody::Custodian> {
    holders
        .iter()
        .map(|(p, id)| custody::Custodian {
            principal: p.clone(),
            age_recipient: id.to_public().to_string(),
        })
        .collect()
}

/// Each custodian's share text, decrypted with their own key.
fn open_shares(
    cfg: &SealConfig,
    holders: &[(String, age::x25519::Identity)],
) -> Vec<(String, String)> {
    cfg.custodians
        .iter()
        .map(|c| {
            let (_, id) = holders.iter().find(|(p, _)| *p == c.principal).unwrap();
            let text = age::decrypt(id, c.age_share.as_bytes()).unwrap();
            (c.principal.clone(), String::from_utf8(text).unwrap())
        })
        .collect()
}

fn as_custodian(principal: &str) -> CallContext {
    CallContext {
        principal: principal.into(),
        ..Default::default()
    }
}

/// A vault on a [`Flaky`] store, initialised for 3 custodians (threshold
/// 2) and unsealed; returns the custodians' shares.
async fn initialised(dir: &std::path::Path) -> (Arc<Vault>, Arc<Flaky>, Vec<(String, String)>) {
    initialised_with(dir, VaultConfig::default()).await
}

/// [`initialised`] with `cfg`.
async fn initialised_with(
    dir: &std::path::Path,
    cfg: VaultConfig,
) -> (Arc<Vault>, Arc<Flaky>, Vec<(String, String)>) {
    let store = Arc::new(Flaky::open(dir));
    let v = Arc::new(Vault::new(store.clone() as Arc<dyn Store>, cfg));
    let holders = keyholders();
    let cfg = v.init(&ctx(), 2, &custodians(&holders)).await.unwrap();
    let shares = open_shares(&cfg, &holders);
    HOLDERS.with(|h| *h.borrow_mut() = holders);
    unseal_with(&v, &shares).await;
    (v, store, shares)
}

thread_local! {
    /// The custodians of the vault [`initialised`] made on this thread, for
    /// [`rekey`] to open the new shares with.
    static HOLDERS: std::cell::RefCell<Vec<(String, age::x25519::Identity)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The first two custodians enter their shares; the vault must then be
/// unsealed.
async fn unseal_with(v: &Vault, shares: &[(String, String)]) {
    v.reset_unseal();
    for (p, s) in &shares[..2] {
        v.submit_share(&as_custodian(p), s).await.unwrap();
    }
    assert!(!v.is_sealed(), "these shares unseal the vault");
}

/// A whole rekey to the same custodians: started, and the first two
/// custodians submit `shares`. Returns the new shares.
async fn rekey(v: &Vault, shares: &[(String, String)]) -> Result<Vec<(String, String)>, Error> {
    let holders = HOLDERS.with(|h| {
        h.borrow()
            .iter()
            .map(|(p, id)| (p.clone(), id.clone()))
            .collect::<Vec<_>>()
    });
    let nonce = v.start_rekey(&ctx(), 2, &custodians(&holders)).await?.nonce;
    let mut last = None;
    for (p, s) in &shares[..2] {
        last = Some(v.submit_rekey_share(&as_custodian(p), &nonce, s).await?);
    }
    let cfg = last
        .and_then(|l| l.completed)
        .expect("the second share completes it");
    Ok(open_shares(&cfg, &holders))
}

/// Tokenizes the Visa test card for `tenant` (opaque token, no dedupe).
async fn tokenized(v: &Vault, tenant: &str) -> cardvault::vault::CardMetadata {
    v.tokenize(
        &ctx(),
        &Tenant::parse(tenant).unwrap(),
        new_card("4111111111111111"),
        TokenizeOptions::default(),
        &Unmetered,
    )
    .await
    .unwrap()
}

async fn tokenize_in(v: &Vault, tenant: &str) -> Token {
    Token::parse(&tokenized(v, tenant).await.token).unwrap()
}

async fn reads(v: &Vault, tenant: &str, token: &Token) -> Result<String, Error> {
    let card = v
        .detokenize(
            &CallContext::default(),
            &Tenant::parse(tenant).unwrap(),
            token,
            &Purpose::parse("auth").unwrap(),
            false,
        )
        .await?;
    Ok(card.pan.expose().to_owned())
}

/// A rekey that cannot be audited does not start; once the new KEK is
/// committed, a completion whose audit record then fails is still
/// reported as done (its shares are in the seal configuration), and the
/// new shares unseal.
#[tokio::test]
async fn a_rekey_is_audited_before_it_starts_and_a_committed_one_is_reported_done() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store, old) = initialised(dir.path()).await;
    let token = tokenize_in(&v, "demo").await;

    store.set_failing(true);
    let err = rekey(&v, &old).await.err().unwrap();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    store.set_failing(false);
    v.seal();
    unseal_with(&v, &old).await;

    let s = store.clone();
    store.after_next_put_keys(move || s.set_failing(true));
    let new = rekey(&v, &old)
        .await
        .expect("a committed rekey is reported done");
    store.set_failing(false);
    v.seal();
    unseal_with(&v, &new).await;
    assert_eq!(reads(&v, "demo", &token).await.unwrap(), "4111111111111111");
}

/// A seal while the master key is being replaced is not undone by the
/// rotation: the vault stays sealed and opens with the new shares only.
#[tokio::test]
async fn a_seal_during_a_master_key_rotation_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store, old) = initialised(dir.path()).await;
    let token = tokenize_in(&v, "demo").await;
    let sealer = v.clone();
    store.after_next_put_keys(move || sealer.seal());
    let new = rekey(&v, &old).await.unwrap();
    assert!(v.is_sealed(), "the seal during the rotation was undone");
    for (p, s) in &old[..2] {
        let _ = v.submit_share(&as_custodian(p), s).await;
    }
    assert!(v.is_sealed(), "old shares must not unseal");
    unseal_with(&v, &new).await;
    assert_eq!(reads(&v, "demo", &token).await.unwrap(), "4111111111111111");
}

/// A tenant's first tokenize that waits for a master key rotation wraps
/// the tenant's new keys under the new KEK, not the replaced one (which
/// would make the tenant unreadable after the next unseal).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_first_keys_made_during_a_master_key_rotation_use_the_new_kek() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store, shares) = initialised(dir.path()).await;
    let holders = HOLDERS.with(|h| h.borrow().clone());
    // The rotation stops right after its commit, holding the key lock.
    let (mut pause, hook) = Pause::new();
    store.after_next_put_keys(hook);
    let rotation = tokio::spawn({
        let v = v.clone();
        async move {
            HOLDERS.with(|h| *h.borrow_mut() = holders);
            rekey(&v, &shares).await
        }
    });
    pause.reached().await;
    let first = tokio::spawn({
        let v = v.clone();
        async move { tokenize_in(&v, "fresh").await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!first.is_finished(), "waits for the rotation's key lock");
    pause.release();
    let new = rotation.await.unwrap().unwrap();
    let token = first.await.unwrap();
    v.seal();
    unseal_with(&v, &new).await;
    assert_eq!(
        reads(&v, "fresh", &token).await.unwrap(),
        "4111111111111111"
    );
}

/// A read that took the keyring just before a master key rotation, and
/// finds the tenant's keys already re-wrapped under the new KEK, reads
/// again with the new keyring instead of failing as if the data had been
/// tampered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_overtaken_by_a_master_key_rotation_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store, shares) = initialised(dir.path()).await;
    let token = tokenize_in(&v, "demo").await;
    // A fresh keyring, with no tenant keys cached yet.
    v.seal();
    unseal_with(&v, &shares).await;
    // The read stops just before it reads the record.
    let (mut pause, hook) = Pause::new();
    store.before_next_get(hook);
    let read = tokio::spawn({
        let (v, token) = (v.clone(), token.clone());
        async move { reads(&v, "demo", &token).await }
    });
    pause.reached().await;
    rekey(&v, &shares).await.unwrap();
    pause.release();
    assert_eq!(read.await.unwrap().unwrap(), "4111111111111111");
}

/// The vault's RotateDataKey audit records, oldest first.
async fn rotation_records(v: &Vault) -> Vec<cardvault::vault::audit_log::AuditHit> {
    v.query_audit(
        &ctx(),
        &cardvault::audit::query::AuditFilter {
            action: "RotateDataKey".into(),
            ..Default::default()
        },
        0,
        1000,
    )
    .await
    .unwrap()
    .0
}

/// At the smallest limit (one encryption per key) every tokenize gets a
/// key of its own, rather than each finding the next key used up by its
/// own count and giving up after a few rotations.
#[tokio::test]
async fn a_limit_of_one_gives_each_encryption_its_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = limited(1);
    let (v, _) = unsealed(dir.path(), cfg).await;
    let mut versions = Vec::new();
    for _ in 0..12 {
        versions.push(tokenized(&v, "demo").await.key_version);
    }
    assert_eq!(versions, (1..=12).collect::<Vec<u32>>());
    assert_eq!(rotation_records(&v).await.len(), 11);
}

/// Many requests in flight reach the encryption limit together (a batch
/// of 500 tokenizes its items concurrently): one of them rotates and
/// audits it, the others use the new key, rather than each making a
/// version (or an audit record) of its own. Ten keys' worth of requests
/// wait through up to ten rotations, and none of them gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_in_flight_at_the_limit_rotate_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = limited(50);
    let (v, _) = unsealed(dir.path(), cfg).await;
    let items = (0..500).map(|_| Ok(new_card("4111111111111111"))).collect();
    let demo = Tenant::parse("demo").unwrap();
    let results = v
        .tokenize_batch(&ctx(), &demo, items, TokenizeOptions::default(), &Unmetered)
        .await
        .unwrap();
    let mut per_version = std::collections::BTreeMap::<u32, u32>::new();
    for r in results {
        *per_version.entry(r.unwrap().key_version).or_default() += 1;
    }
    let made = v.status().await.unwrap().tenants[0].versions.len();
    // No version encrypts past the limit (the request that passes it
    // moves to the next key, and is counted there)...
    assert!(
        per_version.values().all(|&n| n <= 50),
        "encryptions per version: {per_version:?}"
    );
    // ...and 500 encryptions at 50 per key need 10 versions: one rotation
    // per request past the limit would make many more...
    assert!(made <= 12, "{made} versions made for {per_version:?}");
    // ...each audited once, by the request that made it.
    assert_eq!(rotation_records(&v).await.len(), made - 1);
}

/// A data key version is not retired while requests that loaded the keys
/// before its rotation may still write with it (keys.retire_grace_secs),
/// even with no record using it.
#[tokio::test]
async fn a_just_replaced_key_is_not_retired_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaultConfig {
        retire_grace: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let (v, store) = unsealed(dir.path(), cfg).await;
    let demo = Tenant::parse("demo").unwrap();
    tokenized(&v, "demo").await;
    // v2 is made and replaced by v3 at once; no record ever used it.
    v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    let rotated = v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    assert_eq!(rotated, vec![("demo".to_string(), 3)]);
    let e = v.retire_key(&ctx(), &demo, 2).await.unwrap_err();
    assert!(
        matches!(e, Error::FailedPrecondition(ref m)
            if m.contains("version 2 was replaced 0 s ago") && m.contains("retry in 3600 s")),
        "{e}"
    );
    // A version still in use is refused for that first.
    let e = v.retire_key(&ctx(), &demo, 1).await.unwrap_err();
    assert!(
        matches!(e, Error::FailedPrecondition(ref m) if m.contains("1 records still use")),
        "{e}"
    );
    // A crash between writing v4 and its metadata leaves v4 without a
    // creation time: the grace then counts from when that is noticed, and
    // is not skipped.
    v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    store
        .delete_key("tenant/demo/dekmeta/0000000004")
        .await
        .unwrap();
    let e = v.retire_key(&ctx(), &demo, 3).await.unwrap_err();
    assert!(
        matches!(e, Error::FailedPrecondition(ref m) if m.contains("version 3 was replaced 0 s ago")),
        "{e}"
    );
    assert!(
        store
            .get_key("tenant/demo/dekmeta/0000000004")
            .await
            .unwrap()
            .is_some(),
        "the missing metadata is written"
    );
}

/// Replicas on one database (here two vaults on one store) share a data
/// key's encryption limit: each writes its own use count and reads the
/// others', so their sum, not each one's, stays within the limit.
#[tokio::test]
async fn replicas_on_one_store_share_a_keys_encryption_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let kek = SecretKey::generate();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let cfg = limited(40);
        let v = Vault::new(store.clone(), cfg);
        v.unseal(kek.clone()).await.unwrap();
        replicas.push(v);
    }
    let mut per_version = std::collections::BTreeMap::<u32, u32>::new();
    for i in 0..120 {
        let m = tokenized(&replicas[i % 2], "demo").await;
        *per_version.entry(m.key_version).or_default() += 1;
    }
    assert!(
        per_version.values().all(|&n| n <= 40),
        "encryptions per version: {per_version:?}"
    );
    assert!(per_version.len() >= 3, "{per_version:?}");
    // Status adds up what every replica wrote.
    let status = replicas[0].status().await.unwrap();
    let v1 = &status.tenants[0].versions[0];
    assert!(v1.encryptions >= 30, "{v1:?}");
}

/// A replica that stops (crash, kill) before its first write point still
/// counts: its entry is written at its first encryption under a key, and
/// the others add a write interval for it, so the limit holds for the sum.
#[tokio::test]
async fn a_replica_gone_before_its_first_count_write_is_still_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let kek = SecretKey::generate();
    // A limit of 48 writes counts every 3 encryptions.
    let gone = Vault::new(store.clone(), limited(48));
    gone.unseal(kek.clone()).await.unwrap();
    tokenized(&gone, "demo").await;
    tokenized(&gone, "demo").await;
    // Dropped without a seal: nothing more is written, as after a crash.
    drop(gone);
    let v = Vault::new(store.clone(), limited(48));
    v.unseal(kek).await.unwrap();
    let mut on_v1 = 2;
    for _ in 0..60 {
        if tokenized(&v, "demo").await.key_version == 1 {
            on_v1 += 1;
        }
    }
    assert!(on_v1 <= 48, "{on_v1} encryptions under version 1");
}

/// A rewrap encrypts every record again: that counts against the new
/// key's limit like any tokenize.
#[tokio::test]
async fn rewrapped_records_count_against_the_new_keys_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = limited(100);
    let (v, _) = unsealed(dir.path(), cfg).await;
    for _ in 0..50 {
        tokenized(&v, "demo").await;
    }
    let demo = Tenant::parse("demo").unwrap();
    v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    assert_eq!(v.rewrap(&ctx(), None, tx).await.unwrap().done, 50);
    let status = v.status().await.unwrap();
    let v2 = &status.tenants[0].versions[1];
    assert_eq!(v2.version, 2);
    // Written every 6 at this limit: at least 48 of the 50.
    assert!(v2.encryptions >= 48, "{v2:?}");
}

/// A rewrap stops using a key at its limit like a tokenize does: it
/// rotates and goes on under the new key, rather than re-encrypting every
/// stale record under the one key active when it started.
#[tokio::test]
async fn a_rewrap_rotates_at_the_encryption_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = unsealed(dir.path(), limited(4)).await;
    for _ in 0..10 {
        tokenized(&v, "demo").await;
    }
    let demo = Tenant::parse("demo").unwrap();
    v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    let first_target = v.status().await.unwrap().tenants[0]
        .versions
        .last()
        .unwrap()
        .version;
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    assert_eq!(v.rewrap(&ctx(), None, tx).await.unwrap().done, 10);
    let mut per_version = std::collections::BTreeMap::new();
    for r in store.scan_records(None, 100).await.unwrap() {
        *per_version.entry(r.key_version).or_insert(0) += 1;
    }
    assert!(
        per_version.values().all(|n| *n <= 4),
        "a version holds more than its 4 encryptions: {per_version:?}"
    );
    assert!(
        per_version.keys().all(|v| *v >= first_target),
        "{per_version:?}"
    );
}

/// Two writes of one keyring's use count cannot land out of order: a
/// write that stalls (here: before the store commits it) holds back the
/// next one, which then writes the count as it is by then, so the stored
/// count never moves back below what this vault has encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_use_count_write_does_not_move_the_count_back() {
    let dir = tempfile::tempdir().unwrap();
    // A limit of 48 writes the count every 3 encryptions.
    let cfg = limited(48);
    let (v, store, _) = initialised_with(dir.path(), cfg).await;
    tokenized(&v, "demo").await;
    tokenized(&v, "demo").await;
    // The third encryption writes the count 3, and stalls before it lands.
    let (mut pause, hook) = Pause::new();
    store.before_next_put_keys(hook);
    let third = tokio::spawn({
        let v = v.clone();
        async move { tokenized(&v, "demo").await }
    });
    pause.reached().await;
    // Three more reach the next write point (6) meanwhile.
    let mut more = tokio::spawn({
        let v = v.clone();
        async move {
            for _ in 0..3 {
                tokenized(&v, "demo").await;
            }
        }
    });
    // Without ordering they finish and write 6 before the stalled write
    // lands; with it they wait for it. Either way, then let it land.
    let finished = tokio::time::timeout(std::time::Duration::from_millis(500), &mut more).await;
    pause.release();
    third.await.unwrap();
    match finished {
        Ok(done) => done.unwrap(),
        Err(_) => more.await.unwrap(),
    }
    let counts = store
        .list_keys("tenant/demo/dekcount/0000000001/")
        .await
        .unwrap();
    assert_eq!(counts.len(), 1, "one keyring, one count");
    let written = u64::from_le_bytes(counts[0].1.as_slice().try_into().unwrap());
    assert_eq!(written, 6, "the stored count moved back");
}

/// A data key whose metadata cannot be decoded is taken as used up: its
/// encryption count is unknown, so the next tokenize moves to a new key
/// rather than trusting a count of zero.
#[tokio::test]
async fn a_key_with_unreadable_metadata_is_taken_as_used_up() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store, shares) = initialised(dir.path()).await;
    assert_eq!(tokenized(&v, "demo").await.key_version, 1);
    store
        .put_keys(&[("tenant/demo/dekmeta/0000000001".into(), vec![0xff; 3])])
        .await
        .unwrap();
    // A fresh keyring loads the keys (and the metadata) again.
    v.seal();
    unseal_with(&v, &shares).await;
    assert_eq!(tokenized(&v, "demo").await.key_version, 2);
    assert_eq!(tokenized(&v, "demo").await.key_version, 2);
    // It is replaced by readable metadata of a used-up key, so a retire
    // of version 1 waits one grace from now, not one from every attempt.
    let meta = store
        .get_key("tenant/demo/dekmeta/0000000001")
        .await
        .unwrap()
        .unwrap();
    let meta = <cardvault::vault::keyring::DekMeta as prost::Message>::decode(meta.as_slice())
        .expect("readable again");
    assert!(
        meta.encryptions > 1 << 32 && meta.created_at_ms > 0,
        "{meta:?}"
    );
}

/// Tenants may be called `dek` or `fpk`: their key metadata must not pass
/// for wrapped keys, or every master key rotation fails trying to unwrap it.
#[tokio::test]
async fn a_tenant_named_like_a_key_kind_does_not_stop_master_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _store, shares) = initialised(dir.path()).await;
    let dek = tokenize_in(&v, "dek").await;
    let fpk = tokenize_in(&v, "fpk").await;
    let new_shares = rekey(&v, &shares).await.expect("the rotation goes through");
    v.seal();
    unseal_with(&v, &new_shares).await;
    assert_eq!(reads(&v, "dek", &dek).await.unwrap(), "4111111111111111");
    assert_eq!(reads(&v, "fpk", &fpk).await.unwrap(), "4111111111111111");
}

/// A retire that comes while a master key rotation is between reading
/// every key and writing them back re-wrapped waits for it: the destroyed
/// key is not written back (crypto-shredding silently undone).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_retired_during_a_master_key_rotation_stays_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaultConfig {
        retire_grace: std::time::Duration::ZERO,
        ..Default::default()
    };
    let (v, store, shares) = initialised_with(dir.path(), cfg).await;
    let holders = HOLDERS.with(|h| h.borrow().clone());
    let demo = Tenant::parse("demo").unwrap();
    tokenized(&v, "demo").await;
    // v2 is replaced by v3 at once: no record uses it, it may be retired.
    v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    v.rotate_data_key(&ctx(), Some(&demo)).await.unwrap();
    let (mut pause, hook) = Pause::new();
    store.before_next_put_keys(hook);
    let rotation = tokio::spawn({
        let v = v.clone();
        async move {
            HOLDERS.with(|h| *h.borrow_mut() = holders);
            rekey(&v, &shares).await
        }
    });
    pause.reached().await;
    let mut retire = tokio::spawn({
        let (v, demo) = (v.clone(), demo.clone());
        async move { v.retire_key(&ctx(), &demo, 2).await }
    });
    // Without the lock the retire finishes here, before the write-back.
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut retire).await;
    pause.release();
    rotation.await.unwrap().unwrap();
    match early {
        Ok(done) => done.unwrap().unwrap(),
        Err(_) => retire.await.unwrap().unwrap(),
    }
    assert_eq!(
        store.get_key("tenant/demo/dek/0000000002").await.unwrap(),
        None,
        "the retired key was written back"
    );
}

/// Init is audited before it writes anything; once the KEK is committed
/// the encrypted shares are in the seal configuration, so an outcome that
/// cannot be recorded loses nothing.
#[tokio::test]
async fn an_init_is_audited_first_and_its_shares_always_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky::open(dir.path()));
    let v = Arc::new(Vault::new(
        store.clone() as Arc<dyn Store>,
        VaultConfig::default(),
    ));
    let holders = keyholders();
    store.set_failing(true);
    let err = v
        .init(&ctx(), 2, &custodians(&holders))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    store.set_failing(false);
    assert!(!v.is_initialized().await.unwrap(), "nothing was written");

    let s = store.clone();
    store.after_next_put_keys(move || s.set_failing(true));
    let cfg = v
        .init(&ctx(), 2, &custodians(&holders))
        .await
        .expect("a committed KEK's shares are returned");
    store.set_failing(false);
    // The same shares, from the seal configuration.
    let kept = v.status().await.unwrap().seal_config.unwrap();
    assert_eq!(kept, cfg);
    unseal_with(&v, &open_shares(&kept, &holders)).await;
    tokenize_in(&v, "demo").await;
}

/// A rekey whose last share comes after its time limit changes nothing:
/// the share is refused, and the current shares still unseal.
#[tokio::test]
async fn a_rekey_that_times_out_leaves_the_old_shares_valid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = VaultConfig {
        // Room for the first share on a loaded machine; the second comes after.
        rekey_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let (v, _store, old) = initialised_with(dir.path(), cfg).await;
    let holders = HOLDERS.with(|h| h.borrow().clone());
    let token = tokenize_in(&v, "demo").await;
    let nonce = v
        .start_rekey(&ctx(), 2, &custodians(&holders))
        .await
        .unwrap()
        .nonce;
    let (p, s) = &old[0];
    v.submit_rekey_share(&as_custodian(p), &nonce, s)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (p, s) = &old[1];
    let err = v
        .submit_rekey_share(&as_custodian(p), &nonce, s)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("timed out")),
        "{err:?}"
    );
    assert!(v.status().await.unwrap().rekey.is_none());
    v.seal();
    unseal_with(&v, &old).await;
    assert_eq!(reads(&v, "demo", &token).await.unwrap(), "4111111111111111");
}

/// `init` and `rekey` on a vault whose KEK was given at start (dev mode,
/// a KEK file) say what they are for and what to run instead, not "the
/// vault is already initialised".
#[tokio::test]
async fn init_and_rekey_on_a_vault_started_with_a_kek_say_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vault::new(
        Arc::new(SledStore::open(dir.path()).unwrap()) as Arc<dyn Store>,
        VaultConfig::default(),
    );
    v.unseal(SecretKey::generate()).await.unwrap();
    let holders = keyholders();
    let said = |e: Error| match e {
        Error::FailedPrecondition(m) => m,
        other => panic!("{other:?}"),
    };
    let init = said(v.init(&ctx(), 2, &custodians(&holders)).await.unwrap_err());
    let rekey = said(
        v.start_rekey(&ctx(), 2, &custodians(&holders))
            .await
            .unwrap_err(),
    );
    for m in [init, rekey] {
        assert!(
            m.contains("given at start") && m.contains("cardvault serve"),
            "{m}"
        );
    }
}
