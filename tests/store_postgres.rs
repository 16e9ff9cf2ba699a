//! The Store conformance suite, unchanged, against PostgreSQL (a throwaway
//! cluster; skipped with a message where PostgreSQL is not installed).

mod common;

use std::sync::Arc;

use cardvault::error::Error;
use cardvault::store::Store;
use cardvault::store::conformance::{assert_chain_intact, assert_inserted, audit_body, sample};
use cardvault::store::postgres::PostgresStore;

/// A store on a fresh database, and the database's connection string;
/// `None` where PostgreSQL is not available.
async fn fresh_store() -> Option<(Arc<PostgresStore>, String)> {
    let cluster = common::pg::cluster()?;
    let url = cluster.fresh_database().await;
    let store = PostgresStore::connect(&url, 8, None).await.unwrap();
    Some((Arc::new(store), url))
}

async fn postgres_store() -> Option<(Arc<dyn Store>, ())> {
    let (store, _) = fresh_store().await?;
    Some((store, ()))
}

cardvault::store_conformance_tests!(postgres_store);

/// Migrations are idempotent and safe to race: several stores connecting to
/// one new database at once all succeed.
#[tokio::test]
async fn concurrent_first_connections_migrate_once() {
    let Some(cluster) = common::pg::cluster() else {
        return;
    };
    let url = cluster.fresh_database().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            PostgresStore::connect(&url, 2, None).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// A direct connection to `url`, for inspecting and sabotaging the schema.
async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}

/// Concurrent writes are group-committed: far fewer transactions than
/// operations wrote the audit log (rows a transaction inserts share its
/// `xmin`), and the chain is still one unbroken chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_transactions() {
    let Some((store, url)) = fresh_store().await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let r = sample("acme", &format!("tok_g{i:04}"), (i % 250) as u8);
                assert_inserted(&*s, &r, false).await;
            } else {
                s.append_audit(&audit_body("Detokenize")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(assert_chain_intact(&*store).await, 200);
    let db = admin(&url).await;
    let row = db
        .query_one("SELECT count(DISTINCT xmin::text) FROM audit_log", &[])
        .await
        .unwrap();
    let transactions: i64 = row.get(0);
    // One per operation without group commit; a handful with it.
    assert!(
        transactions < 100,
        "200 operations took {transactions} transactions"
    );
}

/// A group commit that fails fails every operation in it, and none of them
/// happened: no record without its audit record, no audit record at all.
/// The store works again once the cause is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_commit_fails_every_operation_in_it() {
    let Some((store, url)) = fresh_store().await else {
        return;
    };
    let db = admin(&url).await;
    db.batch_execute(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'audit refused by the test'; END $$;
         CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log
             FOR EACH STATEMENT EXECUTE FUNCTION refuse_audit();",
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let r = sample("acme", &format!("tok_f{i:04}"), i as u8);
                s.insert(&r, i % 4 == 0, &audit_body("Tokenize"))
                    .await
                    .map(|_| ())
            } else {
                s.append_audit(&audit_body("Detokenize")).await.map(|_| ())
            }
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            Err(Error::Unavailable(why)) => {
                assert!(why.contains("audit refused by the test"), "{why}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert_eq!(store.count(None).await.unwrap(), 0);
    assert_eq!(store.audit_head().await.unwrap(), None);

    db.batch_execute("DROP TRIGGER refuse_audit ON audit_log")
        .await
        .unwrap();
    assert_inserted(&*store, &sample("acme", "tok_after", 1), false).await;
    store.append_audit(&audit_body("Detokenize")).await.unwrap();
    assert_eq!(assert_chain_intact(&*store).await, 2);
}

/// With a database CA configured, TLS is required: a server that answers
/// "no TLS" (as this test cluster does, or anyone in the path could) is
/// refused instead of being spoken to in clear, password included.
#[tokio::test]
async fn a_configured_database_ca_makes_tls_required() {
    let Some(cluster) = common::pg::cluster() else {
        return;
    };
    let url = cluster.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("db-ca.pem");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&ca, cert.pem()).unwrap();
    let tls = cardvault::server::tls::client_config(&ca).unwrap();
    match PostgresStore::connect(&url, 2, Some(tls)).await {
        Err(Error::Unavailable(m)) => assert!(m.to_lowercase().contains("tls"), "{m}"),
        Err(e) => panic!("expected UNAVAILABLE, got {e}"),
        Ok(_) => panic!("connected in clear although a database CA is configured"),
    }
    // Without a CA configured, the same server is used in clear (local
    // development), as before.
    PostgresStore::connect(&url, 2, None).await.unwrap();
}

/// One job's own failure (a dedupe that finds its card's stored record
/// undecodable) fails that job only: the other writes of its group commit,
/// other tenants' included, still commit.
#[tokio::test]
async fn one_jobs_damaged_record_does_not_fail_its_batch() {
    let Some((store, url)) = fresh_store().await else {
        return;
    };
    assert_inserted(&*store, &sample("acme", "tok_damaged", 7), false).await;
    admin(&url)
        .await
        .execute(
            "UPDATE records SET data = '\\x00ff'::bytea WHERE token = 'tok_damaged'",
            &[],
        )
        .await
        .unwrap();
    for round in 0..5 {
        let bad = {
            let store = store.clone();
            tokio::spawn(async move {
                let again = sample("acme", &format!("tok_again_{round}"), 7);
                store.insert(&again, true, &audit_body("Tokenize")).await
            })
        };
        let good: Vec<_> = (0..20)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let r = sample("globex", &format!("tok_{round}_{i}"), 100 + i);
                    store.insert(&r, false, &audit_body("Tokenize")).await
                })
            })
            .collect();
        match bad.await.unwrap() {
            Err(Error::DataLoss(_)) => {}
            other => panic!("round {round}: expected DATA_LOSS, got {other:?}"),
        }
        for g in good {
            let out = g.await.unwrap();
            assert!(
                matches!(out, Ok(cardvault::store::InsertOutcome::Inserted(_))),
                "round {round}: {out:?}"
            );
        }
    }
    assert_eq!(store.count(Some("globex")).await.unwrap(), 100);
    assert_chain_intact(&*store).await;
}

/// The fingerprint index never keeps a card unindexed for dedupe: an entry
/// naming a token whose record is gone (a delete that raced a dedupe, or a
/// damaged record deleted) is taken over by the next deduplicating
/// tokenize, and a damaged record's delete removes its entry too.
#[tokio::test]
async fn dedupe_takes_over_an_entry_whose_record_is_gone() {
    let Some((store, url)) = fresh_store().await else {
        return;
    };
    let db = admin(&url).await;
    let body = audit_body("Tokenize");
    let token_of = |out: cardvault::store::InsertOutcome| match out {
        cardvault::store::InsertOutcome::Inserted(_) => None,
        cardvault::store::InsertOutcome::Deduplicated(r) => Some(r.token),
        other => panic!("{other:?}"),
    };
    // An entry left naming a record that is no longer there.
    assert_inserted(&*store, &sample("acme", "tok_gone", 5), true).await;
    db.execute("DELETE FROM records WHERE token = 'tok_gone'", &[])
        .await
        .unwrap();
    let b = store
        .insert(&sample("acme", "tok_b", 5), true, &body)
        .await
        .unwrap();
    assert_eq!(
        token_of(b),
        None,
        "a new token, indexed in place of the gone one"
    );
    let c = store
        .insert(&sample("acme", "tok_c", 5), true, &body)
        .await
        .unwrap();
    assert_eq!(token_of(c).as_deref(), Some("tok_b"), "the same card again");

    // A damaged record's delete leaves no entry behind.
    assert_inserted(&*store, &sample("acme", "tok_damaged", 6), true).await;
    db.execute(
        "UPDATE records SET data = '\\x00ff'::bytea WHERE token = 'tok_damaged'",
        &[],
    )
    .await
    .unwrap();
    assert!(
        store
            .delete("acme", "tok_damaged", &audit_body("DeleteToken"))
            .await
            .unwrap()
            .0
    );
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM fingerprints WHERE token = 'tok_damaged'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let d = store
        .insert(&sample("acme", "tok_d", 6), true, &body)
        .await
        .unwrap();
    assert_eq!(token_of(d), None);
    let e = store
        .insert(&sample("acme", "tok_e", 6), true, &body)
        .await
        .unwrap();
    assert_eq!(token_of(e).as_deref(), Some("tok_d"));
}

/// A store that cannot be opened says why: the database's own message, or
/// the connection's cause, not only "db error" or "error connecting to
/// server".
#[tokio::test]
async fn a_store_that_cannot_be_opened_says_why() {
    let Some(cluster) = common::pg::cluster() else {
        return;
    };
    let missing = match PostgresStore::connect(&cluster.url("no_such_db"), 2, None).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing database opened"),
    };
    assert!(missing.contains("does not exist"), "{missing}");
    let refused =
        match PostgresStore::connect("host=127.0.0.1 port=1 user=x dbname=x", 2, None).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("nothing listens on port 1"),
        };
    assert!(refused.to_lowercase().contains("refused"), "{refused}");
}

/// Audit records written before the tenant view existed (no tenant number
/// yet, as after the schema migration that added it) are numbered in chain
/// order when a store connects, and later records are numbered on.
#[tokio::test]
async fn old_audit_records_are_numbered_by_tenant_at_start() {
    let Some((store, url)) = fresh_store().await else {
        return;
    };
    for i in 0..12 {
        let body = cardvault::audit::AuditBody {
            tenant: ["acme", "globex", ""][i % 3].into(),
            ..audit_body("Detokenize")
        };
        store.append_audit(&body).await.unwrap();
    }
    drop(store);
    admin(&url)
        .await
        .execute("UPDATE audit_log SET tenant = NULL, tenant_seq = NULL", &[])
        .await
        .unwrap();
    let store = PostgresStore::connect(&url, 2, None).await.unwrap();
    let view = store.tenant_audit_records("acme", 0, 100).await.unwrap();
    let got: Vec<(u64, u64)> = view.iter().map(|(n, r)| (*n, r.seq)).collect();
    assert_eq!(got, vec![(1, 1), (2, 4), (3, 7), (4, 10)]);
    let body = cardvault::audit::AuditBody {
        tenant: "acme".into(),
        ..audit_body("Detokenize")
    };
    store.append_audit(&body).await.unwrap();
    let next = store.tenant_audit_records("acme", 4, 100).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].0, next[0].1.seq), (5, 13));
}
