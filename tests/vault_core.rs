//! The Vault core without gRPC: sealing, KEK checks and tenant binding.

use std::sync::Arc;

use cardvault::crypto::keys::SecretKey;
use cardvault::fields::{Purpose, Tenant};
use cardvault::store::Store;
use cardvault::store::sled::SledStore;
use cardvault::token::Token;
use cardvault::vault::{CallContext, NewCard, TokenizeOptions, Unmetered, Vault, VaultConfig};
use cardvault::{Error, card::Cvv};

fn new_card(pan: &str) -> NewCard {
    NewCard::sample(pan)
}

fn vault(dir: &std::path::Path) -> (Vault, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).unwrap());
    (Vault::new(store.clone(), VaultConfig::default()), store)
}

fn t(name: &str) -> Tenant {
    Tenant::parse(name).unwrap()
}

#[tokio::test]
async fn sealed_vault_refuses_every_data_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _) = vault(dir.path());
    let ctx = CallContext::default();
    assert!(v.is_sealed());
    let tok = Token::parse("tok_AAAAAAAAAAAAAAAAAAAAAA").unwrap();
    let purpose = Purpose::parse("test").unwrap();
    assert_eq!(
        v.tokenize(
            &ctx,
            &t("a"),
            new_card("4111111111111111"),
            TokenizeOptions::default(),
            &Unmetered
        )
        .await
        .err(),
        Some(Error::Sealed)
    );
    assert!(matches!(
        v.detokenize(&ctx, &t("a"), &tok, &purpose, false).await,
        Err(Error::Sealed)
    ));
    assert_eq!(
        v.metadata(&ctx, &t("a"), &tok).await.err(),
        Some(Error::Sealed)
    );
    assert_eq!(
        v.delete(&ctx, &t("a"), &tok).await.err(),
        Some(Error::Sealed)
    );
    assert_eq!(
        v.tokenize_batch(
            &ctx,
            &t("a"),
            vec![Ok(new_card("4111111111111111"))],
            TokenizeOptions::default(),
            &Unmetered
        )
        .await
        .err(),
        Some(Error::Sealed)
    );
    // The audit service too (its queries are audited like any call).
    let filter = cardvault::audit::query::AuditFilter::default();
    assert!(matches!(
        v.query_audit(&ctx, &filter, 0, 10).await,
        Err(Error::Sealed)
    ));
    assert!(matches!(
        v.blast_radius(&ctx, "someone", 0, 0).await,
        Err(Error::Sealed)
    ));
}

#[tokio::test]
async fn a_different_kek_is_refused_and_seal_wipes_cvvs() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _) = vault(dir.path());
    let kek = SecretKey::generate();
    v.unseal(kek.clone()).await.unwrap();
    let ctx = CallContext::default();
    let mut card = new_card("4111111111111111");
    card.cvv = Some(Cvv::parse("123", cardvault::card::Brand::Visa).unwrap());
    v.tokenize(&ctx, &t("a"), card, TokenizeOptions::default(), &Unmetered)
        .await
        .unwrap();
    assert_eq!(v.cvv_holder().len(), 1);
    v.seal();
    assert!(v.is_sealed());
    assert!(v.cvv_holder().is_empty(), "seal must wipe held CVVs");
    let err = v.unseal(SecretKey::generate()).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref field, .. } if field == "key"),
        "{err:?}"
    );
    assert!(v.is_sealed());
    v.unseal(kek).await.unwrap();
    assert!(!v.is_sealed());
}

/// Even if the policy layer were bypassed and a record were copied under
/// another tenant's storage key, the AEAD associated data (tenant | token |
/// key id) and the per-tenant data key make decryption fail.
#[tokio::test]
async fn a_record_copied_into_another_tenant_does_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = vault(dir.path());
    v.unseal(SecretKey::generate()).await.unwrap();
    let ctx = CallContext::default();
    let a = v
        .tokenize(
            &ctx,
            &t("alpha"),
            new_card("4111111111111111"),
            TokenizeOptions::default(),
            &Unmetered,
        )
        .await
        .unwrap();
    // Give tenant beta keys of its own.
    v.tokenize(
        &ctx,
        &t("beta"),
        new_card("5555555555554444"),
        TokenizeOptions::default(),
        &Unmetered,
    )
    .await
    .unwrap();
    let mut copied = store.get("alpha", &a.token).await.unwrap().unwrap();
    copied.tenant = "beta".into();
    store
        .insert(&copied, false, &Default::default())
        .await
        .unwrap();
    let tok = Token::parse(&a.token).unwrap();
    let purpose = Purpose::parse("attack").unwrap();
    let err = v
        .detokenize(&ctx, &t("beta"), &tok, &purpose, false)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::DataLoss(_)), "{err}");
    // The original still reads in its own tenant.
    let card = v
        .detokenize(&ctx, &t("alpha"), &tok, &purpose, false)
        .await
        .unwrap();
    assert_eq!(card.pan.expose(), "4111111111111111");
    // And a tenant that never had keys cannot own a record at all.
    let err = v
        .detokenize(&ctx, &t("gamma"), &tok, &purpose, false)
        .await
        .err()
        .unwrap();
    assert_eq!(err, Error::NotFound);
}

#[tokio::test]
async fn concurrent_first_use_of_a_tenant_agrees_on_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let (v, store) = vault(dir.path());
    v.unseal(SecretKey::generate()).await.unwrap();
    let v = Arc::new(v);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            v.tokenize(
                &CallContext::default(),
                &t("fresh"),
                new_card("4111111111111111"),
                TokenizeOptions::default(),
                &Unmetered,
            )
            .await
            .unwrap()
        }));
    }
    let mut fps = std::collections::HashSet::new();
    for task in tasks {
        fps.insert(task.await.unwrap().fingerprint);
    }
    assert_eq!(fps.len(), 1, "one fingerprint key per tenant");
    assert_eq!(store.list_keys("tenant/fresh/dek/").await.unwrap().len(), 1);
}

/// Sealing wipes every collect session key: a seal made before it opens
/// nothing after the next unseal, and a sealed vault makes no sessions.
#[tokio::test]
async fn sealing_wipes_collect_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _) = vault(dir.path());
    let ctx = CallContext::default();
    assert_eq!(
        v.create_collect_session(&ctx, &t("a"), None).await.err(),
        Some(Error::Sealed)
    );
    let kek = || SecretKey::from_bytes(&[7; 32]).unwrap();
    v.unseal(kek()).await.unwrap();
    let s = v.create_collect_session(&ctx, &t("a"), None).await.unwrap();
    let json = br#"{"pan":"4111111111111111","exp_month":12,"exp_year":2099}"#;
    let blob = cardvault::crypto::sealed::seal(&s.public_key, "a", &s.id, json).unwrap();
    assert_eq!(v.collect_sessions().len(), 1);
    v.seal();
    assert!(v.collect_sessions().is_empty());
    assert!(matches!(
        v.open_sealed(&ctx, &t("a"), &s.id, &blob).await,
        Err(Error::Sealed)
    ));
    v.unseal(kek()).await.unwrap();
    assert!(matches!(
        v.open_sealed(&ctx, &t("a"), &s.id, &blob).await,
        Err(Error::FailedPrecondition(_))
    ));
}
