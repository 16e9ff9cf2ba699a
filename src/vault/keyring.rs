//! The unsealed key state: the KEK and the per-tenant keys it unwraps.
//!
//! Key-table names (in the store):
//! * `vault/kek-check`: KEK check value (detects a wrong KEK at unseal).
//! * `tenant/{tenant}/dek/{version:010}`: data key, wrapped by the KEK.
//! * `tenant/{tenant}/fpk`: fingerprint (HMAC) key, wrapped by the KEK.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use ring::signature::Ed25519KeyPair;

use crate::crypto::fingerprint::FingerprintKey;
use crate::crypto::keys::{Aead, SecretKey, unwrap_key, wrap_key};
use crate::error::{Error, Result};
use crate::store::Store;

/// Name of the KEK check value in the key table.
pub const KEK_CHECK_NAME: &str = "vault/kek-check";

fn dek_prefix(tenant: &str) -> String {
    format!("tenant/{tenant}/dek/")
}

fn dek_name(tenant: &str, version: u32) -> String {
    format!("tenant/{tenant}/dek/{version:010}")
}

fn fpk_name(tenant: &str) -> String {
    format!("tenant/{tenant}/fpk")
}

/// One tenant's unwrapped keys.
pub struct TenantKeys {
    /// Version used for new encryptions (the newest).
    pub active: u32,
    /// Every version that can still decrypt, by version number.
    pub deks: BTreeMap<u32, Aead>,
    /// The tenant's fingerprint key.
    pub fingerprint: FingerprintKey,
}

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
}

fn corrupt_key(name: &str) -> Error {
    Error::DataLoss(format!("wrapped key {name} failed to unwrap under the KEK"))
}

impl Keyring {
    /// Holds a KEK that has already been checked against the store, and the
    /// audit signing key it unwrapped.
    pub fn new(kek: Aead, audit_key: Ed25519KeyPair) -> Self {
        Keyring {
            kek,
            audit_key,
            tenants: RwLock::new(HashMap::new()),
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
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Forgets a tenant's cached keys so the next use reloads them from the
    /// store (another replica may have added a version).
    pub fn invalidate(&self, tenant: &str) {
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
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
            let fresh = wrap_key(&self.kek, &name, &SecretKey::generate());
            let dek = store
                .put_key_if_absent(&name, &fresh)
                .await?
                .unwrap_or(fresh);
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
            let version: u32 = name
                .rsplit('/')
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| corrupt_key(name))?;
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
        let keys = Arc::new(TenantKeys {
            active: *deks
                .keys()
                .next_back()
                .ok_or_else(|| corrupt_key(&dek_prefix(tenant)))?,
            deks,
            fingerprint: FingerprintKey::new(&fpk),
        });
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), keys.clone());
        Ok(keys)
    }
}
