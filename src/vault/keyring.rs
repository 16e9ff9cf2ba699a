//! The unsealed key state: the KEK and the per-tenant keys it unwraps.
//!
//! Key-table names (in the store):
//! * `vault/kek-check`: KEK check value (detects a wrong KEK at unseal).
//! * `tenant/{tenant}/dek/{version:010}`: data key, wrapped by the KEK.
//! * `tenant/{tenant}/fpk`: fingerprint (HMAC) key, wrapped by the KEK.
//! * `tenant/{tenant}/dekmeta/{version:010}`: a data key's creation time
//!   (and, from before per-keyring counts, a use count).
//! * `tenant/{tenant}/dekcount/{version:010}/{keyring id}`: encryptions
//!   one keyring (one replica since its unseal) made with a data key
//!   version; the sum over all keyrings is the version's use count.
//! * `tenant/{tenant}/dekretired/{version:010}`: when a retired version
//!   was created and retired (its key is gone).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use prost::Message;

use ring::signature::Ed25519KeyPair;

use crate::crypto::fingerprint::FingerprintKey;
use crate::crypto::keys::{Aead, SecretKey, unwrap_key, wrap_key};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::sync::Recover;

/// Name of the KEK check value in the key table.
pub const KEK_CHECK_NAME: &str = "vault/kek-check";

/// Prefix of a tenant's wrapped data keys.
pub fn dek_prefix(tenant: &str) -> String {
    format!("tenant/{tenant}/dek/")
}

/// Name of one wrapped data key version.
pub fn dek_name(tenant: &str, version: u32) -> String {
    format!("tenant/{tenant}/dek/{version:010}")
}

/// Name of a data key version's metadata (creation time, use count).
pub fn dek_meta_name(tenant: &str, version: u32) -> String {
    format!("tenant/{tenant}/dekmeta/{version:010}")
}

/// Name of the record that a data key version was retired (its key
/// destroyed): kept so that `status` and a second retire can say when.
pub fn dek_retired_name(tenant: &str, version: u32) -> String {
    format!("tenant/{tenant}/dekretired/{version:010}")
}

/// Prefix of a tenant's retired-version records.
pub fn dek_retired_prefix(tenant: &str) -> String {
    format!("tenant/{tenant}/dekretired/")
}

/// Prefix of the use counts of one data key version, one per keyring.
pub fn dek_count_prefix(tenant: &str, version: u32) -> String {
    format!("tenant/{tenant}/dekcount/{version:010}/")
}

/// Name of a tenant's wrapped fingerprint key.
pub fn fpk_name(tenant: &str) -> String {
    format!("tenant/{tenant}/fpk")
}

/// Whether a key-table entry is a key wrapped by the KEK (as opposed to
/// metadata), i.e. one that master key rotation must re-wrap. Matched by
/// the whole shape of the name, not a part of it: a tenant may be called
/// `dek` or `fpk`, and its metadata must not pass for a key.
pub fn is_wrapped_key(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    name == AUDIT_KEY_NAME
        || matches!(parts.as_slice(), ["tenant", _, "fpk"])
        || matches!(parts.as_slice(), ["tenant", _, "dek", v] if v.parse::<u32>().is_ok())
}

/// The version number at the end of a data key name.
pub fn version_of(name: &str) -> Option<u32> {
    name.rsplit('/').next().and_then(|v| v.parse().ok())
}

/// Most encryptions between two writes of a keyring's use count: up to
/// this many of another keyring's encryptions may not be written yet, so
/// each other keyring's count is taken as this much higher.
pub const ENCRYPTION_COUNT_SLACK: u64 = 1000;

/// How often a keyring writes its use count, for a data key limited to
/// `limit` encryptions: every [`ENCRYPTION_COUNT_SLACK`], or more often
/// for small limits so that the slack stays well below the limit.
pub fn count_every(limit: u64) -> u64 {
    (limit / 16).clamp(1, ENCRYPTION_COUNT_SLACK)
}

/// The use count taken for a count that cannot be read: past any limit,
/// far from overflowing when added to.
const USED_UP: u64 = u64::MAX / 4;

/// Encryptions under one data key version, for the random-nonce bound of
/// AES-GCM. Shared by every load of that version in one keyring.
#[derive(Default)]
pub struct UseCount {
    /// This keyring's own encryptions.
    pub own: AtomicU64,
    /// Every other keyring's, as last read (plus each one's unwritten slack).
    pub others: AtomicU64,
    /// The count written before per-keyring counts (in the version's
    /// metadata), read at load.
    pub legacy: AtomicU64,
    /// This keyring's count as last written. Held across the write, so
    /// writes of one count go one at a time and a slow one cannot land
    /// after a newer one and move the stored count back (taken only every
    /// [`TenantKeys::count_every`] encryptions).
    pub written: tokio::sync::Mutex<u64>,
}

/// A written use count, or `None` if it is not 8 bytes.
pub fn decode_count(value: &[u8]) -> Option<u64> {
    value.try_into().ok().map(u64::from_le_bytes)
}

/// Metadata of one data key version, stored in clear (it is not secret).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DekMeta {
    /// Creation time, ms since the epoch.
    #[prost(int64, tag = "1")]
    pub created_at_ms: i64,
    /// Encryptions counted before per-keyring counts (no longer written;
    /// still added to the use count).
    #[prost(uint64, tag = "2")]
    pub encryptions: u64,
}

/// What is kept of a retired data key version (no key material).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetiredDek {
    /// When the version was created, ms since the epoch (0 if unknown).
    #[prost(int64, tag = "1")]
    pub created_at_ms: i64,
    /// When it was retired and its key destroyed, ms since the epoch.
    #[prost(int64, tag = "2")]
    pub retired_at_ms: i64,
}

/// The metadata of a tenant's data key version, as the key paths use it.
///
/// A crash between writing a new version and writing its metadata leaves
/// the version without one; it is then written now (unless another writer
/// is first), so the version's cryptoperiod starts and a retire of its
/// predecessor waits the full grace, instead of both being skipped for
/// want of a creation time. Metadata that cannot be decoded is replaced by
/// a key created now and used up (its count is unknown), so the next
/// tokenize moves to a new key and the grace runs once, from now.
pub async fn version_meta(store: &dyn Store, tenant: &str, version: u32) -> Result<DekMeta> {
    let name = dek_meta_name(tenant, version);
    let stored = match store.get_key(&name).await? {
        Some(b) => b,
        None => {
            let fresh = DekMeta {
                created_at_ms: super::now_ms(),
                encryptions: 0,
            };
            tracing::warn!(
                tenant,
                version,
                "data key version without metadata; written now"
            );
            match store
                .put_key_if_absent(&name, &fresh.encode_to_vec())
                .await?
            {
                None => return Ok(fresh),
                Some(existing) => existing,
            }
        }
    };
    if let Ok(meta) = DekMeta::decode(stored.as_slice()) {
        return Ok(meta);
    }
    tracing::warn!(
        tenant,
        version,
        "unreadable data key metadata; taking the key as used up"
    );
    let used_up = DekMeta {
        created_at_ms: super::now_ms(),
        encryptions: USED_UP,
    };
    store.put_keys(&[(name, used_up.encode_to_vec())]).await?;
    Ok(used_up)
}

/// One tenant's unwrapped keys.
pub struct TenantKeys {
    /// Version used for new encryptions (the newest).
    pub active: u32,
    /// Every version that can still decrypt, by version number.
    pub deks: BTreeMap<u32, Aead>,
    /// The tenant's fingerprint key.
    pub fingerprint: FingerprintKey,
    /// When the active version was created (ms), for the cryptoperiod.
    pub active_created_ms: i64,
    /// Encryptions under the active version (lower bound), by this keyring
    /// and the others. Shared by every load of the same version (see
    /// [`Keyring`]'s `counters`).
    pub active_encryptions: Arc<UseCount>,
    /// Where this keyring writes its own count of the active version.
    pub count_name: String,
    /// How often it writes it.
    pub count_every: u64,
    /// When these keys were read from the store.
    pub loaded_at: std::time::Instant,
}

impl TenantKeys {
    /// Reads every other keyring's use count of the active version into
    /// `active_encryptions.others`: the written counts (each taken as
    /// [`TenantKeys::count_every`] higher, for what it may not have
    /// written yet) plus any count from before per-keyring counts.
    pub async fn read_others(&self, store: &dyn Store, tenant: &str) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut total = 0u64;
        for (name, value) in store
            .list_keys(&dek_count_prefix(tenant, self.active))
            .await?
        {
            if name == self.count_name {
                continue;
            }
            // Unreadable, a count is taken as the limit reached: the next
            // tokenize moves to a new version, and reads (which need no
            // count) are not failed for it.
            let n = decode_count(&value).unwrap_or_else(|| {
                tracing::warn!(count = %name, "unreadable data key use count; taking the key as used up");
                USED_UP
            });
            total = total.saturating_add(n).saturating_add(self.count_every);
        }
        let legacy = self.active_encryptions.legacy.load(Relaxed);
        if legacy > 0 {
            total = total.saturating_add(legacy + ENCRYPTION_COUNT_SLACK);
        }
        self.active_encryptions.others.fetch_max(total, Relaxed);
        Ok(())
    }
}

/// How long a tenant's unwrapped keys are used before the key table is
/// read again, so a rotation made by another replica is picked up for new
/// writes within this time (reads of newer versions reload at once).
pub const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Name of the wrapped Ed25519 seed that signs audit checkpoints.
pub const AUDIT_KEY_NAME: &str = "vault/audit-signing-key";

/// Keys held while the vault is unsealed. Dropping it (seal) wipes them.
pub struct Keyring {
    /// The key-encrypting key.
    kek: Aead,
    /// Signs audit checkpoints. (`ring` does not wipe this key pair on drop;
    /// its seed is wrapped at rest and core dumps are disabled.)
    audit_key: Ed25519KeyPair,
    /// Tenants whose keys have been unwrapped, loaded lazily on first use.
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
    /// Encryption counters by (tenant, version). Kept apart from the
    /// cached keys because requests that miss the cache together (a
    /// tenant's first use, a reload after a rotation) each load their own
    /// keys: with a counter per load, each would count from the same start
    /// and the version could encrypt far past its limit.
    counters: std::sync::Mutex<HashMap<(String, u32), Arc<UseCount>>>,
    /// Names this keyring's use counts in the store (random per unseal, so
    /// replicas, and one replica before and after a restart, never
    /// overwrite each other's counts).
    id: String,
    /// How often this keyring writes its use counts.
    count_every: u64,
}

fn corrupt_key(name: &str) -> Error {
    Error::DataLoss(format!("wrapped key {name} failed to unwrap under the KEK"))
}

impl Keyring {
    /// Holds a KEK that has already been checked against the store, and the
    /// audit signing key it unwrapped; data keys are limited to `limit`
    /// encryptions each.
    pub fn new(kek: Aead, audit_key: Ed25519KeyPair, limit: u64) -> Self {
        Keyring {
            kek,
            audit_key,
            tenants: RwLock::new(HashMap::new()),
            counters: Default::default(),
            id: hex::encode(crate::crypto::random_array::<8>()),
            count_every: count_every(limit),
        }
    }

    /// The audit checkpoint signing key.
    pub fn audit_key(&self) -> &Ed25519KeyPair {
        &self.audit_key
    }

    /// The KEK cipher (for check values and wrapping).
    pub fn kek(&self) -> &Aead {
        &self.kek
    }

    fn cached(&self, tenant: &str) -> Option<Arc<TenantKeys>> {
        self.tenants
            .read()
            .recover()
            .get(tenant)
            .filter(|k| k.loaded_at.elapsed() < KEY_CACHE_TTL)
            .cloned()
    }

    /// Forgets a tenant's cached keys so the next use reloads them from the
    /// store (another replica may have added a version).
    pub fn invalidate(&self, tenant: &str) {
        self.tenants.write().recover().remove(tenant);
    }

    /// Creates data key `version` for `tenant` unless it exists (several
    /// replicas may race; all adopt the first writer's key). Returns the
    /// wrapped key now stored under that name, and whether this call made
    /// it (only the maker audits a rotation).
    pub async fn create_version(
        &self,
        store: &dyn Store,
        tenant: &str,
        version: u32,
    ) -> Result<(Vec<u8>, bool)> {
        let name = dek_name(tenant, version);
        let fresh = wrap_key(&self.kek, &name, &SecretKey::generate());
        match store.put_key_if_absent(&name, &fresh).await? {
            Some(existing) => Ok((existing, false)),
            None => {
                let meta = DekMeta {
                    created_at_ms: super::now_ms(),
                    encryptions: 0,
                };
                store
                    .put_keys(&[(dek_meta_name(tenant, version), meta.encode_to_vec())])
                    .await?;
                Ok((fresh, true))
            }
        }
    }

    /// The tenant's keys. With `create`, a tenant without keys gets its first
    /// data key and fingerprint key; without it, such a tenant is `NotFound`
    /// (it cannot own any record).
    pub async fn tenant(
        &self,
        store: &dyn Store,
        tenant: &str,
        create: bool,
    ) -> Result<Arc<TenantKeys>> {
        if let Some(k) = self.cached(tenant) {
            return Ok(k);
        }
        let mut wrapped = store.list_keys(&dek_prefix(tenant)).await?;
        let mut wrapped_fpk = store.get_key(&fpk_name(tenant)).await?;
        if wrapped.is_empty() || wrapped_fpk.is_none() {
            if !create {
                return Err(Error::NotFound);
            }
            // First use of this tenant. Several requests (or replicas) may
            // race here; put_key_if_absent makes them all adopt the winner's key.
            let name = dek_name(tenant, 1);
            let (dek, _) = self.create_version(store, tenant, 1).await?;
            let fname = fpk_name(tenant);
            let fresh = wrap_key(&self.kek, &fname, &SecretKey::generate());
            let fpk = store
                .put_key_if_absent(&fname, &fresh)
                .await?
                .unwrap_or(fresh);
            if wrapped.is_empty() {
                wrapped.push((name, dek));
            }
            wrapped_fpk = Some(fpk);
        }
        let mut deks = BTreeMap::new();
        for (name, value) in &wrapped {
            let version = version_of(name).ok_or_else(|| corrupt_key(name))?;
            let key = unwrap_key(&self.kek, name, value).map_err(|_| corrupt_key(name))?;
            deks.insert(version, Aead::new(&key));
        }
        let fname = fpk_name(tenant);
        let fpk = unwrap_key(
            &self.kek,
            &fname,
            wrapped_fpk.as_deref().unwrap_or_default(),
        )
        .map_err(|_| corrupt_key(&fname))?;
        let active = *deks
            .keys()
            .next_back()
            .ok_or_else(|| corrupt_key(&dek_prefix(tenant)))?;
        let meta = version_meta(store, tenant, active).await?;
        let counter = self
            .counters
            .lock()
            .recover()
            .entry((tenant.to_owned(), active))
            .or_default()
            .clone();
        counter
            .legacy
            .store(meta.encryptions, std::sync::atomic::Ordering::Relaxed);
        let keys = Arc::new(TenantKeys {
            active,
            deks,
            fingerprint: FingerprintKey::new(&fpk),
            active_created_ms: meta.created_at_ms,
            active_encryptions: counter,
            count_name: format!("{}{}", dek_count_prefix(tenant, active), self.id),
            count_every: self.count_every,
            loaded_at: std::time::Instant::now(),
        });
        // Our own count is in memory; the others' are read at each load
        // (and each time ours is written, see `Vault::count_encryptions`).
        keys.read_others(store, tenant).await?;
        self.tenants
            .write()
            .recover()
            .insert(tenant.to_owned(), keys.clone());
        Ok(keys)
    }
}
