//! The conformance suite every [`Store`] backend must pass, unchanged.
//!
//! Each check is a plain `async fn(&dyn Store)` that panics on failure; the
//! [`store_conformance_tests!`](crate::store_conformance_tests) macro turns
//! them into one `#[tokio::test]` per check for a given backend factory.
//! Each check gets a fresh, empty store.

use std::collections::HashSet;
use std::sync::Arc;

use super::{BucketCard, InsertOutcome, Store, StoredRecord};
use crate::audit::{AuditBody, Verifier};

/// A record with recognisable, non-secret contents.
pub fn sample(tenant: &str, token: &str, fingerprint: u8) -> StoredRecord {
    StoredRecord {
        tenant: tenant.into(),
        token: token.into(),
        brand: "VISA".into(),
        last4: "1111".into(),
        bin: "411111".into(),
        exp_month: 12,
        exp_year: 2031,
        fingerprint: vec![fingerprint; 32],
        created_at_ms: 1_700_000_000_000,
        key_version: 1,
        envelope: vec![1, 2, 3, fingerprint],
        // One bucket per card, so every check also runs the path of a
        // bucket's first card; `bucket_index` puts several in one.
        bucket: vec![fingerprint; 16],
    }
}

/// An audit body for conformance writes.
pub fn audit_body(action: &str) -> AuditBody {
    AuditBody {
        time_ms: 1_700_000_000_000,
        principal: "spiffe://test/principal".into(),
        action: action.into(),
        outcome: "OK".into(),
        ..Default::default()
    }
}

/// Inserts `record` and checks it went in as a new record.
pub async fn assert_inserted(store: &dyn Store, record: &StoredRecord, dedupe: bool) {
    let out = store
        .insert(record, dedupe, &audit_body("Tokenize"))
        .await
        .unwrap();
    assert!(matches!(out, InsertOutcome::Inserted(_)));
}

/// Reads the whole audit chain and checks its links (no checkpoints).
pub async fn assert_chain_intact(store: &dyn Store) -> u64 {
    let mut v = Verifier::new(Vec::new(), Vec::new());
    let mut after = 0;
    loop {
        let page = store.audit_records(after, 500).await.unwrap();
        if page.is_empty() {
            break;
        }
        for (k, r) in &page {
            v.record(*k, r);
            after = *k;
        }
    }
    let report = v.finish(store.audit_head().await.unwrap());
    assert!(report.ok(), "{report:?}");
    report.records
}

/// Insert then get returns the same record; a missing token reads as `None`.
pub async fn insert_and_get(store: &dyn Store) {
    let r = sample("acme", "tok_a", 1);
    assert_inserted(store, &r, false).await;
    assert_eq!(store.get("acme", "tok_a").await.unwrap(), Some(r));
    assert_eq!(store.get("acme", "tok_missing").await.unwrap(), None);
}

/// The same token in another tenant is a different record: tenants never see
/// each other's rows.
pub async fn tenants_are_isolated(store: &dyn Store) {
    let a = sample("acme", "tok_same", 1);
    let mut b = sample("globex", "tok_same", 1);
    b.last4 = "4444".into();
    assert_inserted(store, &a, false).await;
    assert!(
        matches!(
            store
                .insert(&b, true, &audit_body("Tokenize"))
                .await
                .unwrap(),
            InsertOutcome::Inserted(_)
        ),
        "dedupe must not cross tenants"
    );
    assert_eq!(
        store.get("acme", "tok_same").await.unwrap().unwrap().last4,
        "1111"
    );
    assert_eq!(
        store
            .get("globex", "tok_same")
            .await
            .unwrap()
            .unwrap()
            .last4,
        "4444"
    );
    assert_eq!(store.count(Some("acme")).await.unwrap(), 1);
    assert_eq!(store.count(Some("globex")).await.unwrap(), 1);
    assert_eq!(store.count(None).await.unwrap(), 2);
    assert!(
        store
            .delete("acme", "tok_same", &audit_body("DeleteToken"))
            .await
            .unwrap()
            .0
    );
    assert!(store.get("globex", "tok_same").await.unwrap().is_some());
    // A tenant whose name is a prefix of another's must not see its rows.
    assert_eq!(store.get("glob", "tok_same").await.unwrap(), None);
    assert_eq!(store.count(Some("glob")).await.unwrap(), 0);
}

/// Inserting an existing token reports `TokenTaken` and changes nothing.
pub async fn duplicate_token_is_refused(store: &dyn Store) {
    let r = sample("acme", "tok_a", 1);
    store
        .insert(&r, false, &audit_body("Tokenize"))
        .await
        .unwrap();
    let other = sample("acme", "tok_a", 2);
    assert_eq!(
        store
            .insert(&other, false, &audit_body("Tokenize"))
            .await
            .unwrap(),
        InsertOutcome::TokenTaken
    );
    assert_eq!(store.get("acme", "tok_a").await.unwrap(), Some(r));
}

/// With dedupe, the same fingerprint returns the first record; without it a
/// second token is created and the index keeps pointing at the first.
pub async fn dedupe_by_fingerprint(store: &dyn Store) {
    let first = sample("acme", "tok_first", 7);
    store
        .insert(&first, true, &audit_body("Tokenize"))
        .await
        .unwrap();
    let again = sample("acme", "tok_second", 7);
    assert_eq!(
        store
            .insert(&again, true, &audit_body("Tokenize"))
            .await
            .unwrap(),
        InsertOutcome::Deduplicated(first.clone())
    );
    assert_eq!(store.get("acme", "tok_second").await.unwrap(), None);
    let third = sample("acme", "tok_third", 7);
    assert_inserted(store, &third, false).await;
    let fourth = sample("acme", "tok_fourth", 7);
    assert_eq!(
        store
            .insert(&fourth, true, &audit_body("Tokenize"))
            .await
            .unwrap(),
        InsertOutcome::Deduplicated(first)
    );
}

/// Deleting the indexed record frees the fingerprint for dedupe.
pub async fn delete_removes_record_and_index(store: &dyn Store) {
    let first = sample("acme", "tok_first", 9);
    store
        .insert(&first, true, &audit_body("Tokenize"))
        .await
        .unwrap();
    assert!(
        store
            .delete("acme", "tok_first", &audit_body("DeleteToken"))
            .await
            .unwrap()
            .0
    );
    assert!(
        !store
            .delete("acme", "tok_first", &audit_body("DeleteToken"))
            .await
            .unwrap()
            .0,
        "delete is idempotent"
    );
    assert_eq!(store.get("acme", "tok_first").await.unwrap(), None);
    let next = sample("acme", "tok_next", 9);
    assert_inserted(store, &next, true).await;
}

/// Cards are found by bucket: a bucket's card, whichever of several; none
/// for an empty bucket, another tenant's or a record without a bucket;
/// dedupe and delete work for every card of a shared bucket, the first
/// included, and for records without a bucket.
pub async fn bucket_index(store: &dyn Store) {
    let bucket = vec![0xb0; 16];
    let card = |r: &StoredRecord| BucketCard {
        fingerprint: r.fingerprint.clone(),
        created_at_ms: r.created_at_ms,
    };
    let in_bucket = |token: &str, fp: u8| StoredRecord {
        bucket: bucket.clone(),
        ..sample("acme", token, fp)
    };
    assert_eq!(store.bucket_card("acme", &bucket).await.unwrap(), None);
    let (a, b, c) = (
        in_bucket("tok_a", 1),
        in_bucket("tok_b", 2),
        in_bucket("tok_c", 3),
    );
    assert_inserted(store, &a, true).await;
    assert_eq!(
        store.bucket_card("acme", &bucket).await.unwrap(),
        Some(card(&a))
    );
    assert_inserted(store, &b, true).await;
    assert_inserted(store, &c, false).await;
    let found = store.bucket_card("acme", &bucket).await.unwrap().unwrap();
    assert!([&a, &b, &c].iter().any(|r| card(r) == found), "{found:?}");
    assert_eq!(store.bucket_card("other", &bucket).await.unwrap(), None);
    assert_eq!(store.bucket_card("acme", &[0xb1; 16]).await.unwrap(), None);

    // Each card of the bucket deduplicates to its own first token, with
    // or without dedupe on its first insert.
    for (first, fp) in [(&a, 1), (&b, 2), (&c, 3)] {
        let again = in_bucket(&format!("{}_again", first.token), fp);
        let out = store
            .insert(&again, true, &audit_body("Tokenize"))
            .await
            .unwrap();
        assert_eq!(out, InsertOutcome::Deduplicated(first.clone()));
    }
    // A second token without dedupe leaves the index on the first.
    assert_inserted(store, &in_bucket("tok_a2", 1), false).await;
    let out = store
        .insert(&in_bucket("tok_a3", 1), true, &audit_body("Tokenize"))
        .await
        .unwrap();
    assert_eq!(out, InsertOutcome::Deduplicated(a.clone()));

    // Deleting a card frees its fingerprint, the bucket's first card's too.
    for (gone, fp) in [(&a, 1), (&b, 2)] {
        let body = audit_body("DeleteToken");
        assert!(store.delete("acme", &gone.token, &body).await.unwrap().0);
        let next = in_bucket(&format!("{}_next", gone.token), fp);
        assert_inserted(store, &next, true).await;
        let found = store.bucket_card("acme", &bucket).await.unwrap();
        assert!(found.is_some(), "the bucket still holds cards");
    }
    // With every card of the bucket gone, none is found.
    for token in ["tok_a_next", "tok_b_next", "tok_c", "tok_a2"] {
        assert!(
            store
                .delete("acme", token, &audit_body("DeleteToken"))
                .await
                .unwrap()
                .0
        );
    }
    assert_eq!(store.bucket_card("acme", &bucket).await.unwrap(), None);

    // A record without a bucket (written before buckets were indexed) is
    // indexed and deduplicated by fingerprint alone.
    let old = StoredRecord {
        bucket: Vec::new(),
        ..sample("acme", "tok_old", 4)
    };
    assert_inserted(store, &old, true).await;
    let again = StoredRecord {
        bucket: Vec::new(),
        ..sample("acme", "tok_old_again", 4)
    };
    let out = store
        .insert(&again, true, &audit_body("Tokenize"))
        .await
        .unwrap();
    assert_eq!(out, InsertOutcome::Deduplicated(old.clone()));
    assert!(
        store
            .delete("acme", "tok_old", &audit_body("DeleteToken"))
            .await
            .unwrap()
            .0
    );
    assert_inserted(store, &again, true).await;
}

/// Update replaces a record that is still the one read, and refuses a
/// missing one or one that changed since (deleted and its token issued
/// again to another card: the old card must not come back).
pub async fn update_replaces(store: &dyn Store) {
    let read = sample("acme", "tok_a", 1);
    store
        .insert(&read, false, &audit_body("Tokenize"))
        .await
        .unwrap();
    let mut r = read.clone();
    r.key_version = 2;
    r.envelope = vec![9, 9, 9];
    assert!(store.update(&read, &r).await.unwrap());
    assert_eq!(store.get("acme", "tok_a").await.unwrap(), Some(r.clone()));
    let none = sample("acme", "tok_none", 1);
    assert!(!store.update(&none, &none).await.unwrap());
    assert_eq!(store.get("acme", "tok_none").await.unwrap(), None);

    // Read, then deleted and the token issued again to another card.
    store
        .delete("acme", "tok_a", &audit_body("DeleteToken"))
        .await
        .unwrap();
    let reissued = sample("acme", "tok_a", 7);
    assert_inserted(store, &reissued, false).await;
    let mut stale = r.clone();
    stale.envelope = vec![8, 8, 8];
    assert!(
        !store.update(&r, &stale).await.unwrap(),
        "changed since read"
    );
    assert_eq!(store.get("acme", "tok_a").await.unwrap(), Some(reissued));
}

/// Key table: first writer wins, later writers get the winner's value;
/// listing is by prefix and sorted.
pub async fn key_table(store: &dyn Store) {
    assert_eq!(
        store.get_key("tenant/a/dek/0000000001").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .put_key_if_absent("tenant/a/dek/0000000001", b"one")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .put_key_if_absent("tenant/a/dek/0000000001", b"two")
            .await
            .unwrap(),
        Some(b"one".to_vec())
    );
    store
        .put_key_if_absent("tenant/a/dek/0000000002", b"2")
        .await
        .unwrap();
    store
        .put_key_if_absent("tenant/ab/dek/0000000001", b"x")
        .await
        .unwrap();
    let listed = store.list_keys("tenant/a/").await.unwrap();
    assert_eq!(
        listed,
        vec![
            ("tenant/a/dek/0000000001".to_string(), b"one".to_vec()),
            ("tenant/a/dek/0000000002".to_string(), b"2".to_vec()),
        ]
    );
    assert_eq!(
        store.get_key("tenant/ab/dek/0000000001").await.unwrap(),
        Some(b"x".to_vec())
    );
}

/// Many concurrent inserts (the group-commit path) all land, each exactly once;
/// racing dedupe inserts of one fingerprint agree on a single token.
pub async fn concurrent_writers(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let r = sample("acme", &format!("tok_{i:05}"), (i % 250) as u8);
            s.insert(&r, false, &audit_body("Tokenize")).await.unwrap()
        }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap(), InsertOutcome::Inserted(_)));
    }
    assert_eq!(store.count(Some("acme")).await.unwrap(), 200);

    let mut racers = Vec::new();
    for i in 0..32u32 {
        let s = store.clone();
        racers.push(tokio::spawn(async move {
            let r = sample("race", &format!("tok_r{i:03}"), 42);
            match s.insert(&r, true, &audit_body("Tokenize")).await.unwrap() {
                InsertOutcome::Inserted(_) => r.token,
                InsertOutcome::Deduplicated(existing) => existing.token,
                InsertOutcome::TokenTaken => panic!("distinct tokens cannot collide"),
            }
        }));
    }
    let mut winners = HashSet::new();
    for t in racers {
        winners.insert(t.await.unwrap());
    }
    assert_eq!(
        winners.len(),
        1,
        "dedupe race produced several tokens: {winners:?}"
    );
    assert_eq!(store.count(Some("race")).await.unwrap(), 1);
}

/// Writes that succeed append exactly one linked audit record; writes that
/// do not happen (token taken, deduplicated) append none; delete appends one
/// even for a missing token.
pub async fn audit_is_written_with_the_operation(store: &dyn Store) {
    assert_eq!(store.audit_head().await.unwrap(), None);
    let first = sample("acme", "tok_a", 1);
    let InsertOutcome::Inserted(l1) = store
        .insert(&first, true, &audit_body("Tokenize"))
        .await
        .unwrap()
    else {
        panic!("not inserted")
    };
    assert_eq!(l1.seq, 1);
    store
        .insert(&first, false, &audit_body("Tokenize"))
        .await
        .unwrap();
    store
        .insert(&sample("acme", "tok_b", 1), true, &audit_body("Tokenize"))
        .await
        .unwrap();
    assert_eq!(
        store.audit_head().await.unwrap(),
        Some((1, l1.hash.clone()))
    );
    let l2 = store.append_audit(&audit_body("Detokenize")).await.unwrap();
    assert_eq!(l2.seq, 2);
    let (deleted, l3) = store
        .delete("acme", "tok_a", &audit_body("DeleteToken"))
        .await
        .unwrap();
    assert!(deleted);
    let (deleted, l4) = store
        .delete("acme", "tok_a", &audit_body("DeleteToken"))
        .await
        .unwrap();
    assert!(!deleted);
    assert_eq!((l3.seq, l4.seq), (3, 4));
    let recs = store.audit_records(0, 100).await.unwrap();
    let actions: Vec<String> = recs
        .iter()
        .map(|(_, r)| r.decode_body().unwrap().action)
        .collect();
    assert_eq!(
        actions,
        ["Tokenize", "Detokenize", "DeleteToken", "DeleteToken"]
    );
    assert_eq!(
        store.audit_records(2, 1).await.unwrap()[0].0,
        3,
        "paging by seq"
    );
    assert_eq!(assert_chain_intact(store).await, 4);
}

/// Checkpoints are stored and listed by seq.
pub async fn checkpoints_round_trip(store: &dyn Store) {
    for seq in [20u64, 10, 30] {
        let cp = crate::audit::Checkpoint {
            seq,
            hash: vec![seq as u8; 32],
            time_ms: 1,
            signature: vec![1; 64],
        };
        store.put_checkpoint(&cp).await.unwrap();
    }
    let seqs: Vec<u64> = store
        .checkpoints()
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [10, 20, 30]);
}

/// Concurrent appends from many tasks still form one unbroken chain.
pub async fn concurrent_audit_appends_form_one_chain(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let r = sample("acme", &format!("tok_c{i:04}"), i as u8);
                s.insert(&r, false, &audit_body("Tokenize")).await.unwrap();
            } else {
                s.append_audit(&audit_body("Detokenize")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(assert_chain_intact(&*store).await, 100);
}

/// Each tenant's audit records come back numbered 1, 2, 3... in chain
/// order, exactly those naming the tenant (not those of a tenant whose name
/// it begins, nor those of no tenant), paged by that number.
pub async fn tenant_audit_view(store: Arc<dyn Store>) {
    let body = |tenant: &str| AuditBody {
        tenant: tenant.into(),
        ..audit_body("Detokenize")
    };
    let mut tasks = Vec::new();
    for i in 0..90u32 {
        let s = store.clone();
        let tenant = ["a", "ab", ""][i as usize % 3];
        let b = body(tenant);
        tasks.push(tokio::spawn(async move {
            if i % 5 == 0 && !tenant.is_empty() {
                let r = sample(tenant, &format!("tok_t{i:04}"), i as u8);
                s.insert(&r, false, &b).await.unwrap();
            } else {
                s.append_audit(&b).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = store.audit_records(0, 1000).await.unwrap();
    for tenant in ["a", "ab"] {
        let expected: Vec<u64> = all
            .iter()
            .filter(|(_, r)| r.decode_body().unwrap().tenant == tenant)
            .map(|(seq, _)| *seq)
            .collect();
        assert_eq!(expected.len(), 30);
        let view = store.tenant_audit_records(tenant, 0, 1000).await.unwrap();
        let numbers: Vec<u64> = view.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, (1..=30).collect::<Vec<u64>>(), "{tenant}");
        let seqs: Vec<u64> = view.iter().map(|(_, r)| r.seq).collect();
        assert_eq!(seqs, expected, "{tenant}: chain order, nothing else");
        let page = store.tenant_audit_records(tenant, 2, 3).await.unwrap();
        let numbers: Vec<u64> = page.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, vec![3, 4, 5]);
        assert_eq!(page[0].1.seq, expected[2]);
        let past = store.tenant_audit_records(tenant, 30, 10).await.unwrap();
        assert!(past.is_empty());
    }
    assert!(
        store
            .tenant_audit_records("b", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Written later, numbered on.
    store.append_audit(&body("a")).await.unwrap();
    let next = store.tenant_audit_records("a", 30, 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0, 31);
    assert_eq!(next[0].1.decode_body().unwrap().tenant, "a");
}

/// Key batches are written whole; deleted keys are gone; record scans
/// resume from a position and see every record once, in order.
pub async fn key_batches_and_record_scans(store: &dyn Store) {
    store.put_key_if_absent("a/1", b"old").await.unwrap();
    store
        .put_keys(&[
            ("a/1".into(), b"new".to_vec()),
            ("a/2".into(), b"two".to_vec()),
        ])
        .await
        .unwrap();
    assert_eq!(store.get_key("a/1").await.unwrap(), Some(b"new".to_vec()));
    assert_eq!(store.get_key("a/2").await.unwrap(), Some(b"two".to_vec()));
    store.delete_key("a/1").await.unwrap();
    assert_eq!(store.get_key("a/1").await.unwrap(), None);

    for (tenant, n) in [("b", 7u8), ("a", 5), ("ab", 3)] {
        for i in 0..n {
            let r = sample(tenant, &format!("tok_{i:02}"), i);
            store
                .insert(&r, false, &audit_body("Tokenize"))
                .await
                .unwrap();
        }
    }
    let mut seen = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = store
            .scan_records(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 4)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        for r in &page {
            seen.push((r.tenant.clone(), r.token.clone()));
        }
        let last = page.last().unwrap();
        after = Some((last.tenant.clone(), last.token.clone()));
    }
    assert_eq!(seen.len(), 15);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        seen, sorted,
        "scan order is (tenant, token) without repeats"
    );
}

/// Enumeration-guard state: a compare-and-swap per (tenant, bucket),
/// tenants apart, cleared by bucket or by tenant.
pub async fn guard_state(store: &dyn Store) {
    let (b1, b2) = (b"bucket-1".as_slice(), b"bucket-2".as_slice());
    assert_eq!(store.guard_get("acme", b1).await.unwrap(), None);
    // Created only if absent.
    assert!(
        store
            .guard_swap("acme", b1, None, b"v1", false)
            .await
            .unwrap()
    );
    assert!(
        !store
            .guard_swap("acme", b1, None, b"vX", true)
            .await
            .unwrap()
    );
    assert_eq!(
        store.guard_get("acme", b1).await.unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    // Replaced only if unchanged.
    assert!(
        !store
            .guard_swap("acme", b1, Some(b"v0"), b"vX", false)
            .await
            .unwrap()
    );
    assert!(
        store
            .guard_swap("acme", b1, Some(b"v1"), b"v2", true)
            .await
            .unwrap()
    );
    assert_eq!(
        store.guard_get("acme", b1).await.unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    // Another tenant's bucket of the same name is its own.
    assert_eq!(store.guard_get("other", b1).await.unwrap(), None);
    assert!(
        store
            .guard_swap("other", b1, None, b"o1", false)
            .await
            .unwrap()
    );
    assert!(
        store
            .guard_swap("acme", b2, None, b"w1", false)
            .await
            .unwrap()
    );
    assert_eq!(store.guard_clear("acme", Some(b1)).await.unwrap(), 1);
    assert_eq!(store.guard_get("acme", b1).await.unwrap(), None);
    assert_eq!(store.guard_clear("acme", Some(b1)).await.unwrap(), 0);
    assert!(
        store
            .guard_swap("acme", b1, None, b"v3", false)
            .await
            .unwrap()
    );
    assert_eq!(store.guard_clear("acme", None).await.unwrap(), 2);
    assert_eq!(store.guard_get("acme", b2).await.unwrap(), None);
    assert_eq!(
        store.guard_get("other", b1).await.unwrap().as_deref(),
        Some(&b"o1"[..])
    );
}

/// Concurrent swaps of one bucket: each value read is replaced by exactly
/// one writer, so no increment is lost (every replica counts each card).
pub async fn concurrent_guard_swaps(store: Arc<dyn Store>) {
    let tasks = (0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut done = 0;
            while done < 25 {
                let old = store.guard_get("acme", b"hot").await.unwrap();
                let n = old
                    .as_deref()
                    .map_or(0, |v| u32::from_be_bytes(v.try_into().unwrap()));
                let new = (n + 1).to_be_bytes();
                if store
                    .guard_swap("acme", b"hot", old.as_deref(), &new, false)
                    .await
                    .unwrap()
                {
                    done += 1;
                }
            }
        })
    });
    for t in tasks.collect::<Vec<_>>() {
        t.await.unwrap();
    }
    let v = store.guard_get("acme", b"hot").await.unwrap().unwrap();
    assert_eq!(u32::from_be_bytes(v.try_into().unwrap()), 100);
}

/// Generates one `#[tokio::test]` per conformance check.
///
/// `$factory` is an async function returning `Option<(Arc<dyn Store>, G)>`,
/// where `G` is a guard kept alive for the test (a temporary directory, a
/// database); `None` means the backend is not available on this machine,
/// and the test says so and passes (the factory prints why).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        mod store_conformance {
            use super::*;
            use $crate::store::conformance as c;

            #[tokio::test]
            async fn insert_and_get() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::insert_and_get(&*s).await;
            }
            #[tokio::test]
            async fn tenants_are_isolated() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::tenants_are_isolated(&*s).await;
            }
            #[tokio::test]
            async fn duplicate_token_is_refused() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::duplicate_token_is_refused(&*s).await;
            }
            #[tokio::test]
            async fn dedupe_by_fingerprint() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::dedupe_by_fingerprint(&*s).await;
            }
            #[tokio::test]
            async fn delete_removes_record_and_index() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::delete_removes_record_and_index(&*s).await;
            }
            #[tokio::test]
            async fn bucket_index() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::bucket_index(&*s).await;
            }
            #[tokio::test]
            async fn update_replaces() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::update_replaces(&*s).await;
            }
            #[tokio::test]
            async fn key_table() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::key_table(&*s).await;
            }
            #[tokio::test]
            async fn audit_is_written_with_the_operation() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::audit_is_written_with_the_operation(&*s).await;
            }
            #[tokio::test]
            async fn key_batches_and_record_scans() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::key_batches_and_record_scans(&*s).await;
            }
            #[tokio::test]
            async fn checkpoints_round_trip() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::checkpoints_round_trip(&*s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_audit_appends_form_one_chain() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::concurrent_audit_appends_form_one_chain(s).await;
            }
            #[tokio::test]
            async fn guard_state() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::guard_state(&*s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_guard_swaps() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::concurrent_guard_swaps(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tenant_audit_view() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::tenant_audit_view(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writers() {
                let Some((s, _g)) = ($factory)().await else {
                    eprintln!("SKIPPED: store backend not available (see above)");
                    return;
                };
                c::concurrent_writers(s).await;
            }
        }
    };
}
