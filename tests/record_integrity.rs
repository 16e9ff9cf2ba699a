//! A database writer (the breach this vault answers began with SQL
//! injection) changes what the vault stores in clear: the card index and a
//! record's metadata. The vault must not act on it: dedupe must not hand
//! out another card's token for a card, and metadata must not show an
//! expiry or brand that is not the card's. Run against PostgreSQL with
//! plain SQL, as such a writer would (skipped where PostgreSQL is not
//! installed, unless CI requires it).

mod common;

use std::sync::Arc;

use cardvault::crypto::keys::SecretKey;
use cardvault::error::Error;
use cardvault::fields::Tenant;
use cardvault::store::postgres::PostgresStore;
use cardvault::store::{Store, StoredRecord};
use cardvault::token::Token;
use cardvault::vault::{CallContext, NewCard, TokenizeOptions, Unmetered, Vault, VaultConfig};
use prost::Message;

const A: &str = "4111111111111111";
const B: &str = "5555555555554444";

async fn setup() -> Option<(Vault, tokio_postgres::Client)> {
    let cluster = common::pg::cluster()?;
    let url = cluster.fresh_database().await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url, 4, None).await.unwrap());
    let v = Vault::new(store, VaultConfig::default());
    v.unseal(SecretKey::from_bytes(&[3; 32]).unwrap())
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    Some((v, client))
}

fn tenant() -> Tenant {
    Tenant::parse("acme").unwrap()
}

async fn tokenize(
    v: &Vault,
    pan: &str,
    dedupe: bool,
) -> Result<cardvault::vault::CardMetadata, Error> {
    let opts = TokenizeOptions {
        dedupe,
        ..Default::default()
    };
    v.tokenize(
        &CallContext::default(),
        &tenant(),
        NewCard::sample(pan),
        opts,
        &Unmetered,
    )
    .await
}

async fn record(db: &tokio_postgres::Client, token: &str) -> StoredRecord {
    let row = db
        .query_one(
            "SELECT data FROM records WHERE tenant = 'acme' AND token = $1",
            &[&token],
        )
        .await
        .unwrap();
    StoredRecord::decode(row.get::<_, Vec<u8>>(0).as_slice()).unwrap()
}

async fn write(db: &tokio_postgres::Client, rec: &StoredRecord) {
    db.execute(
        "UPDATE records SET data = $1 WHERE tenant = 'acme' AND token = $2",
        &[&rec.encode_to_vec(), &rec.token],
    )
    .await
    .unwrap();
}

/// The index entry of card A pointed at card B's record: a dedupe of A
/// must not return B's token (a merchant would charge B for A).
#[tokio::test]
async fn dedupe_is_not_pointed_at_another_card() {
    let Some((v, db)) = setup().await else { return };
    let a = tokenize(&v, A, true).await.unwrap();
    let b = tokenize(&v, B, true).await.unwrap();
    let fp_a = hex::decode(&a.fingerprint).unwrap();
    db.execute(
        "UPDATE fingerprints SET token = $1 WHERE tenant = 'acme' AND fingerprint = $2",
        &[&b.token, &fp_a],
    )
    .await
    .unwrap();
    match tokenize(&v, A, true).await {
        Ok(m) => assert_ne!(m.token, b.token, "dedupe of card A returned card B's token"),
        Err(e) => assert!(matches!(e, Error::DataLoss(_)), "{e}"),
    }

    // And with B's record relabelled as A's card as well.
    let mut rec = record(&db, &b.token).await;
    rec.fingerprint = fp_a.clone();
    rec.bin = "411111".into();
    rec.last4 = "1111".into();
    rec.brand = "VISA".into();
    write(&db, &rec).await;
    match tokenize(&v, A, true).await {
        Ok(m) => assert_ne!(m.token, b.token, "dedupe of card A returned card B's token"),
        Err(e) => assert!(matches!(e, Error::DataLoss(_)), "{e}"),
    }
}

/// A record's clear expiry (or brand) changed: metadata must not show it.
#[tokio::test]
async fn metadata_does_not_show_a_changed_expiry() {
    let Some((v, db)) = setup().await else { return };
    let a = tokenize(&v, A, false).await.unwrap();
    let token = Token::parse(&a.token).unwrap();
    let ctx = CallContext::default();
    assert_eq!(
        v.metadata(&ctx, &tenant(), &token).await.unwrap().exp_month,
        12
    );
    let mut rec = record(&db, &a.token).await;
    rec.exp_month = 1;
    write(&db, &rec).await;
    match v.metadata(&ctx, &tenant(), &token).await {
        Ok(m) => assert_eq!(m.exp_month, 12, "metadata showed the forged expiry"),
        Err(e) => assert!(matches!(e, Error::DataLoss(_)), "{e}"),
    }
    // Detokenize refuses the record as well (its envelope no longer fits).
    let purpose = cardvault::fields::Purpose::parse("test").unwrap();
    assert!(matches!(
        v.detokenize(&ctx, &tenant(), &token, &purpose, false).await,
        Err(Error::DataLoss(_))
    ));
}
