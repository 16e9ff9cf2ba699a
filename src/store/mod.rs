//! Storage behind one trait, so the vault core does not know which database
//! it runs on. Every backend must pass [`conformance`], the same suite.
//!
//! A store only ever sees ciphertext envelopes, keyed fingerprints, wrapped
//! keys and non-sensitive metadata; it never sees a PAN or CVV.

pub mod conformance;
pub mod disk;
pub mod postgres;
pub mod sled;
/// The embedded store's write-ahead log (lives beside it, its only user).
pub use sled::wal;

use async_trait::async_trait;

use crate::audit::{AuditBody, AuditRecord, Checkpoint};
use crate::error::Result;

/// Position of a record in the audit chain, returned by every write that
/// appends one (the vault signs checkpoints from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLink {
    /// Sequence number of the appended audit record.
    pub seq: u64,
    /// Its chain hash.
    pub hash: Vec<u8>,
}

/// One card as stored: non-sensitive metadata in clear (what metadata
/// reads show and dedupe matches on) and the secret part as an encrypted
/// envelope, whose associated data binds that metadata.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredRecord {
    /// Owning tenant.
    #[prost(string, tag = "1")]
    pub tenant: String,
    /// The token (primary key within the tenant).
    #[prost(string, tag = "2")]
    pub token: String,
    /// Card brand name, e.g. `VISA`.
    #[prost(string, tag = "3")]
    pub brand: String,
    /// Last four PAN digits.
    #[prost(string, tag = "4")]
    pub last4: String,
    /// First six PAN digits.
    #[prost(string, tag = "5")]
    pub bin: String,
    /// Expiry month (clear copy for metadata).
    #[prost(uint32, tag = "6")]
    pub exp_month: u32,
    /// Expiry year (clear copy for metadata).
    #[prost(uint32, tag = "7")]
    pub exp_year: u32,
    /// Keyed fingerprint (HMAC-SHA256) of the PAN.
    #[prost(bytes = "vec", tag = "8")]
    pub fingerprint: Vec<u8>,
    /// Creation time, milliseconds since the Unix epoch.
    #[prost(int64, tag = "9")]
    pub created_at_ms: i64,
    /// Data key version the envelope is encrypted under.
    #[prost(uint32, tag = "10")]
    pub key_version: u32,
    /// The record envelope (see `crypto::envelope`).
    #[prost(bytes = "vec", tag = "11")]
    pub envelope: Vec<u8>,
    /// The card's enumeration-guard bucket (`vault::guard::BucketId`,
    /// keyed, no digits): the store indexes the card by it, for
    /// [`Store::bucket_card`]. Empty on records written before buckets
    /// were indexed.
    #[prost(bytes = "vec", tag = "12")]
    pub bucket: Vec<u8>,
}

/// What [`Store::bucket_card`] tells of a card in a bucket: what the
/// enumeration guard needs to count it, nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketCard {
    /// The card's keyed fingerprint.
    pub fingerprint: Vec<u8>,
    /// When its record was created, ms since the epoch.
    pub created_at_ms: i64,
}

/// Result of [`Store::insert`].
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// The record (and, if absent, its fingerprint index entry) was written,
    /// together with the audit record.
    Inserted(AuditLink),
    /// The token already exists in the tenant; nothing was written. The
    /// caller generates another token and retries.
    TokenTaken,
    /// `dedupe` was requested and the tenant already has a record with this
    /// fingerprint; nothing was written. Carries the existing record.
    Deduplicated(StoredRecord),
}

/// Persistence for the vault. Every method is atomic, and a write is durable
/// (survives `kill -9` and power loss, as far as the backend can promise)
/// when the method returns `Ok`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for logs and status, e.g. `sled`.
    fn backend(&self) -> &'static str;

    /// Inserts a new record, its fingerprint index entry and its audit
    /// record in one atomic step.
    ///
    /// * If `dedupe` and the index already maps this fingerprint to a live
    ///   record, returns [`InsertOutcome::Deduplicated`] with that record.
    /// * If the token exists, returns [`InsertOutcome::TokenTaken`].
    /// * Otherwise writes the record and appends `audit`; the index entry is
    ///   written only if the fingerprint has none yet (the first token for a
    ///   PAN stays canonical).
    ///
    /// Nothing (not even the audit record) is written in the first two cases.
    async fn insert(
        &self,
        record: &StoredRecord,
        dedupe: bool,
        audit: &AuditBody,
    ) -> Result<InsertOutcome>;

    /// A live card of the tenant indexed under `bucket` (see
    /// [`StoredRecord::bucket`]), or `None` if there is none. The
    /// enumeration guard asks this when a bucket has no guard state, to
    /// tell a bucket's first card (which then needs no state written:
    /// its index entry marks the bucket) from a collision. A store may
    /// answer `None` once the first card indexed in a bucket is deleted
    /// even if later ones remain: that costs the guard one uncounted card,
    /// never a wrong answer to a caller.
    async fn bucket_card(&self, tenant: &str, bucket: &[u8]) -> Result<Option<BucketCard>>;

    /// Reads one record.
    async fn get(&self, tenant: &str, token: &str) -> Result<Option<StoredRecord>>;

    /// Replaces the record with `record`'s tenant and token (e.g. after
    /// re-encryption) if it is still exactly `current`, the record the
    /// caller read. Returns `false` if it is gone or changed: a record
    /// deleted meanwhile, and above all one deleted and its token issued
    /// again to another card, must not be overwritten with the old card.
    async fn update(&self, current: &StoredRecord, record: &StoredRecord) -> Result<bool>;

    /// Deletes a record and, if it points at this token, its fingerprint
    /// index entry, and appends `audit`, atomically. Returns whether the
    /// record existed (the audit record is appended either way).
    async fn delete(
        &self,
        tenant: &str,
        token: &str,
        audit: &AuditBody,
    ) -> Result<(bool, AuditLink)>;

    /// Number of records, for one tenant or all.
    async fn count(&self, tenant: Option<&str>) -> Result<u64>;

    /// Reads a key-table entry (wrapped keys, KEK check value, ...).
    async fn get_key(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Writes a key-table entry unless one exists. Returns `None` if written,
    /// or the existing value, so concurrent creators (several vault replicas)
    /// all end up using the same key.
    async fn put_key_if_absent(&self, name: &str, value: &[u8]) -> Result<Option<Vec<u8>>>;

    /// All key-table entries whose name starts with `prefix`, sorted by name.
    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// Writes (overwrites) several key-table entries in one atomic step:
    /// after a crash either all of them or none are in place.
    async fn put_keys(&self, entries: &[(String, Vec<u8>)]) -> Result<()>;

    /// Removes a key-table entry (destroying a retired key).
    async fn delete_key(&self, name: &str) -> Result<()>;

    /// Up to `limit` records after position `after` (`(tenant, token)`,
    /// exclusive; `None` = from the start), in `(tenant, token)` order, so a
    /// full scan can be resumed from its last position.
    async fn scan_records(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>>;

    /// Appends one audit record to the chain; durable when it returns.
    async fn append_audit(&self, audit: &AuditBody) -> Result<AuditLink>;

    /// Appends one audit record that need not be durable when this returns
    /// (it is written, in chain order, and becomes durable with the next
    /// flush). For records of operations that return no card data, where
    /// a crash losing the last instant of records is acceptable; backends
    /// whose every commit is durable simply append.
    async fn append_audit_buffered(&self, audit: &AuditBody) -> Result<AuditLink> {
        self.append_audit(audit).await
    }

    /// The chain head `(seq, hash)` as the store records it; `None` when empty.
    async fn audit_head(&self) -> Result<Option<(u64, Vec<u8>)>>;

    /// Up to `limit` audit records with seq greater than `after_seq`, in
    /// storage-key order, each with the seq its storage key says.
    async fn audit_records(&self, after_seq: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>>;

    /// Up to `limit` of `tenant`'s audit records (those whose body names
    /// it) numbered above `after`, in order, as `(tenant seq, record)`.
    /// A tenant's records are numbered 1, 2, 3... in chain order, so this
    /// view tells nothing of other tenants' activity, and it is read
    /// through an index, not by scanning the log. Every record
    /// acknowledged before the call is in it.
    async fn tenant_audit_records(
        &self,
        tenant: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord)>>;

    /// Reads the enumeration-guard state of one bucket of a tenant (see
    /// `vault::guard`); `None` if the bucket has none.
    async fn guard_get(&self, tenant: &str, bucket: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Writes a bucket's guard state if it is still `expected` (`None`:
    /// absent), a compare-and-swap, so that concurrent tokenizes on every
    /// replica count each card once. Returns `false`, writing nothing, if
    /// the state changed meanwhile. With `durable` false the write need not
    /// be durable on return; it becomes durable with the next durable write.
    async fn guard_swap(
        &self,
        tenant: &str,
        bucket: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        durable: bool,
    ) -> Result<bool>;

    /// Removes the guard state of one bucket of a tenant, or with `None`
    /// of all its buckets. Returns how many buckets had state.
    async fn guard_clear(&self, tenant: &str, bucket: Option<&[u8]>) -> Result<u64>;

    /// Stores a signed checkpoint.
    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()>;

    /// Every stored checkpoint, by seq.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>>;
}
