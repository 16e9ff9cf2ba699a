//! The Store conformance suite against the sled backend.

use std::sync::Arc;

use cardvault::store::Store;
use cardvault::store::sled::SledStore;

async fn sled_store() -> Option<(Arc<dyn Store>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    Some((Arc::new(store), dir))
}

cardvault::store_conformance_tests!(sled_store);
