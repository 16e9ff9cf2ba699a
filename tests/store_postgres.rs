//! The Store conformance suite, unchanged, against PostgreSQL (a throwaway
//! cluster; skipped with a message where PostgreSQL is not installed).

mod common;

use std::sync::Arc;

use cardvault::store::Store;
use cardvault::store::postgres::PostgresStore;

async fn postgres_store() -> Option<(Arc<dyn Store>, ())> {
    let cluster = common::pg::cluster()?;
    let url = cluster.fresh_database().await;
    let store = PostgresStore::connect(&url, 8, None).await.unwrap();
    Some((Arc::new(store), ()))
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
