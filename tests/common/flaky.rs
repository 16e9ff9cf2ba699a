//! A store wrapper for fault injection in vault-level tests.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use cardvault::Error;
use cardvault::Result;
use cardvault::audit::{AuditBody, AuditRecord, Checkpoint};
use cardvault::store::sled::SledStore;
use cardvault::store::{AuditLink, InsertOutcome, Store, StoredRecord};

/// Runs once, inside the store call it was set for.
pub type Hook = Box<dyn FnOnce() + Send>;

/// A sled store whose audit appends fail while `fail` is set (disk full,
/// database down...), and which can run a hook once before the next
/// record read, after the next audit head read, or before or after the
/// next `put_keys` (a key rotation's commit, a use count's write);
/// everything else works.
pub struct Flaky {
    pub inner: Arc<SledStore>,
    pub fail: AtomicBool,
    pub after_put_keys: std::sync::Mutex<Option<Hook>>,
    pub before_put_keys: std::sync::Mutex<Option<Hook>>,
    pub before_get: std::sync::Mutex<Option<Hook>>,
    pub after_audit_head: std::sync::Mutex<Option<Hook>>,
    /// Pages of the whole audit chain read so far.
    pub chain_pages: AtomicU64,
    /// Enumeration-guard state writes so far.
    pub guard_swaps: AtomicU64,
}

impl Flaky {
    /// A sled store in `dir`, working, with no hook.
    pub fn open(dir: &Path) -> Flaky {
        Flaky {
            inner: Arc::new(SledStore::open(dir).unwrap()),
            fail: false.into(),
            after_put_keys: Default::default(),
            before_put_keys: Default::default(),
            before_get: Default::default(),
            after_audit_head: Default::default(),
            chain_pages: Default::default(),
            guard_swaps: Default::default(),
        }
    }

    /// Sets or clears the audit failure.
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Runs `hook` once, before the next record read (`get`).
    pub fn before_next_get(&self, hook: impl FnOnce() + Send + 'static) {
        *self.before_get.lock().unwrap() = Some(Box::new(hook));
    }

    /// Runs `hook` once, after the next read of the audit head.
    pub fn after_next_audit_head(&self, hook: impl FnOnce() + Send + 'static) {
        *self.after_audit_head.lock().unwrap() = Some(Box::new(hook));
    }

    /// Runs `hook` once, before the next `put_keys` writes anything.
    pub fn before_next_put_keys(&self, hook: impl FnOnce() + Send + 'static) {
        *self.before_put_keys.lock().unwrap() = Some(Box::new(hook));
    }

    /// Runs `hook` once, after the next `put_keys` has committed.
    pub fn after_next_put_keys(&self, hook: impl FnOnce() + Send + 'static) {
        *self.after_put_keys.lock().unwrap() = Some(Box::new(hook));
    }
}

#[async_trait]
impl Store for Flaky {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    async fn insert(&self, r: &StoredRecord, d: bool, a: &AuditBody) -> Result<InsertOutcome> {
        self.inner.insert(r, d, a).await
    }
    async fn bucket_card(
        &self,
        tenant: &str,
        bucket: &[u8],
    ) -> Result<Option<cardvault::store::BucketCard>> {
        self.inner.bucket_card(tenant, bucket).await
    }
    async fn get(&self, tenant: &str, token: &str) -> Result<Option<StoredRecord>> {
        let hook = self.before_get.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.get(tenant, token).await
    }
    async fn update(&self, current: &StoredRecord, r: &StoredRecord) -> Result<bool> {
        self.inner.update(current, r).await
    }
    async fn delete(&self, tenant: &str, token: &str, a: &AuditBody) -> Result<(bool, AuditLink)> {
        self.inner.delete(tenant, token, a).await
    }
    async fn count(&self, tenant: Option<&str>) -> Result<u64> {
        self.inner.count(tenant).await
    }
    async fn get_key(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get_key(name).await
    }
    async fn put_key_if_absent(&self, name: &str, value: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.put_key_if_absent(name, value).await
    }
    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner.list_keys(prefix).await
    }
    async fn put_keys(&self, entries: &[(String, Vec<u8>)]) -> Result<()> {
        let hook = self.before_put_keys.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.put_keys(entries).await?;
        let hook = self.after_put_keys.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        Ok(())
    }
    async fn delete_key(&self, name: &str) -> Result<()> {
        self.inner.delete_key(name).await
    }
    async fn scan_records(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        self.inner.scan_records(after, limit).await
    }
    async fn append_audit(&self, a: &AuditBody) -> Result<AuditLink> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("audit disk full".into()));
        }
        self.inner.append_audit(a).await
    }
    async fn audit_head(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let head = self.inner.audit_head().await;
        let hook = self.after_audit_head.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        head
    }
    async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        self.chain_pages.fetch_add(1, Ordering::SeqCst);
        self.inner.audit_records(after, limit).await
    }

    async fn tenant_audit_records(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord)>> {
        self.inner.tenant_audit_records(tenant, after, limit).await
    }
    async fn guard_get(&self, tenant: &str, bucket: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.guard_get(tenant, bucket).await
    }
    async fn guard_swap(
        &self,
        tenant: &str,
        bucket: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        durable: bool,
    ) -> Result<bool> {
        self.guard_swaps.fetch_add(1, Ordering::SeqCst);
        self.inner
            .guard_swap(tenant, bucket, expected, value, durable)
            .await
    }
    async fn guard_clear(&self, tenant: &str, bucket: Option<&[u8]>) -> Result<u64> {
        self.inner.guard_clear(tenant, bucket).await
    }
    async fn put_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        self.inner.put_checkpoint(c).await
    }
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.inner.checkpoints().await
    }
}

/// Stops the store call whose hook it is (on that call's thread) until
/// released, and tells when it has stopped: to interleave another call at
/// an exact step. Needs a multi-threaded runtime.
pub struct Pause {
    reached: Option<tokio::sync::oneshot::Receiver<()>>,
    go: std::sync::mpsc::Sender<()>,
}

impl Pause {
    /// The pause, and the hook to give the store.
    pub fn new() -> (Pause, impl FnOnce() + Send + 'static) {
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let hook = move || {
            let _ = reached_tx.send(());
            let _ = go_rx.recv();
        };
        let pause = Pause {
            reached: Some(reached),
            go,
        };
        (pause, hook)
    }

    /// Waits until the store call has stopped at the hook.
    pub async fn reached(&mut self) {
        let reached = self.reached.take().expect("waited for once");
        reached.await.expect("the hook ran");
    }

    /// Lets the store call go on.
    pub fn release(&self) {
        let _ = self.go.send(());
    }
}
