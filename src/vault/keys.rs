//! Key custody and rotation: Shamir init and unseal, seal, data key
//! rotation (manual and automatic), online rewrap, key retirement, master
//! key rotation, and status. Operators drive all of it without ever seeing
//! a PAN: rewrap decrypts and re-encrypts inside the vault.

use crate::audit::AuditAction;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use prost::Message;
use tokio::sync::mpsc;

use super::keyring::{
    DekMeta, KEK_CHECK_NAME, RetiredDek, dek_count_prefix, dek_meta_name, dek_name,
    dek_retired_name, version_meta, version_of,
};
use super::{CallContext, Vault, audit_body, now_ms};
use crate::crypto::envelope;
use crate::error::{Error, Result};
use crate::fields::Tenant;
use crate::store::StoredRecord;

/// What [`Vault::maybe_auto_rotate`] found for a request about to encrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rotation {
    /// The loaded key may encrypt: no trigger fired.
    NotDue,
    /// This request made the next version (and audited it).
    Made,
    /// Another request (or replica) made the next version first.
    Overtaken,
}

/// Name of the seal configuration in the key table.
pub const SEAL_CONFIG_NAME: &str = "vault/seal-config";

/// How the vault is sealed, stored at init (not secret).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SealConfig {
    /// Random id that binds shares to this vault.
    #[prost(string, tag = "1")]
    pub vault_id: String,
    /// KEK generation; master key rotation increments it.
    #[prost(uint32, tag = "2")]
    pub generation: u32,
    /// Shares needed to unseal.
    #[prost(uint32, tag = "3")]
    pub threshold: u32,
    /// Shares issued.
    #[prost(uint32, tag = "4")]
    pub shares: u32,
    /// Last rekey, ms (0 = never).
    #[prost(int64, tag = "5")]
    pub last_master_rotation_ms: i64,
    /// The custodians, each with their share encrypted to them.
    #[prost(message, repeated, tag = "6")]
    pub custodians: Vec<super::custody::IssuedShare>,
    /// HMAC of the rest under a key derived from the KEK: checked at every
    /// unseal, so an altered configuration is caught.
    #[prost(bytes = "vec", tag = "7")]
    pub mac: Vec<u8>,
}

/// One data key version in a status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    /// Version number.
    pub version: u32,
    /// Records encrypted under it.
    pub records: u64,
    /// Creation time, ms.
    pub created_at_ms: i64,
    /// Encryptions (persisted lower bound).
    pub encryptions: u64,
    /// When it was retired (its key destroyed), ms; `None` while live.
    pub retired_at_ms: Option<i64>,
}

/// One tenant in a status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatus {
    /// Tenant name.
    pub tenant: String,
    /// Versions that can still decrypt, oldest first; the last is active.
    pub versions: Vec<VersionStatus>,
}

/// The vault's key state, for `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultStatus {
    /// No keys in memory.
    pub sealed: bool,
    /// A KEK exists for this store.
    pub initialized: bool,
    /// `shamir`, `kek-file` or `dev`.
    pub seal_mode: String,
    /// Shamir configuration (absent outside shamir mode).
    pub seal_config: Option<SealConfig>,
    /// Custodians who entered a share towards the next unseal.
    pub unseal_entered_by: Vec<String>,
    /// The rekey in progress, if any.
    pub rekey: Option<super::custody::RekeyView>,
    /// Per-tenant key versions.
    pub tenants: Vec<TenantStatus>,
    /// Storage backend.
    pub store: String,
    /// CVVs currently held.
    pub cvvs_held: u64,
}

/// Progress of a rewrap, streamed to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RewrapProgress {
    /// Records re-encrypted so far.
    pub done: u64,
    /// Records that needed it when the run started.
    pub total: u64,
    /// Records deleted while the run was going.
    pub skipped: u64,
    /// The run is over.
    pub finished: bool,
}

impl Vault {
    /// Whether this store has a key-encrypting key yet.
    pub async fn is_initialized(&self) -> Result<bool> {
        Ok(self.store.get_key(KEK_CHECK_NAME).await?.is_some())
    }

    /// Seals on request of an operator (audited).
    pub async fn seal_by(&self, ctx: &CallContext) -> Result<()> {
        self.record(audit_body(ctx, AuditAction::Seal, "", "", Ok(())))
            .await?;
        // Signed after the Seal record, so the checkpoint covers it (what
        // is refused while sealed is covered by the first checkpoint after
        // the next unseal).
        self.checkpoint_now().await.ok();
        self.seal();
        tracing::warn!(principal = %ctx.principal, "vault sealed by operator");
        Ok(())
    }

    /// Every tenant that has keys, from the key table.
    pub async fn tenants(&self) -> Result<Vec<String>> {
        let names = self.store.list_keys("tenant/").await?;
        let set: BTreeSet<String> = names
            .iter()
            .filter_map(|(n, _)| {
                n.strip_prefix("tenant/")?
                    .split('/')
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        Ok(set.into_iter().collect())
    }

    /// Starts version `active + 1` for the tenant (one winner if several
    /// replicas race). Returns the new active version.
    ///
    /// With `from`, only if `from` is still the active version and this
    /// call makes the new one, and otherwise returns `None`: every request
    /// that finds the encryption limit reached asks for a rotation, and only
    /// the first of them may make (and audit) one, not one version or one
    /// audit record per request in flight.
    pub(crate) async fn rotate_tenant(
        &self,
        tenant: &str,
        from: Option<u32>,
    ) -> Result<Option<u32>> {
        let _guard = self.key_lock.read().await;
        // Taken under the lock: a keyring taken before it may hold a KEK
        // that a master key rotation has since replaced, and the new key
        // would be wrapped under it and lost with it.
        let keyring = self.keyring()?;
        keyring.invalidate(tenant);
        let keys = keyring.tenant(&*self.store, tenant, false).await?;
        if from.is_some_and(|v| v != keys.active) {
            return Ok(None);
        }
        let next = keys.active + 1;
        let (_, made) = keyring.create_version(&*self.store, tenant, next).await?;
        keyring.invalidate(tenant);
        // An operator's rotation is satisfied by a racing one (the version
        // is new either way); an automatic one is only reported by its maker.
        Ok((made || from.is_none()).then_some(next))
    }

    /// Rotates the data key of one tenant, or of every tenant.
    pub async fn rotate_data_key(
        &self,
        ctx: &CallContext,
        tenant: Option<&Tenant>,
    ) -> Result<Vec<(String, u32)>> {
        self.check_unsealed()?;
        let tenants = match tenant {
            Some(t) => vec![t.as_str().to_owned()],
            None => self.tenants().await?,
        };
        let mut out = Vec::new();
        for t in tenants {
            let v = self
                .rotate_tenant(&t, None)
                .await?
                .ok_or_else(|| Error::Internal("unconditional rotation did not rotate".into()))?;
            let mut body = audit_body(ctx, AuditAction::RotateDataKey, &t, "", Ok(()));
            body.detail = format!("new active version {v}");
            self.record(body).await?;
            tracing::info!(tenant = %t, version = v, "data key rotated");
            out.push((t, v));
        }
        Ok(out)
    }

    /// Counts `n` encryptions under the tenant's active key (a tokenize's,
    /// a rewrap's, a refused candidate token's). At this keyring's first
    /// encryption under the key, and each time the count passes a write
    /// point, ours is written and the other replicas' read: with several
    /// replicas on one database, the limit holds for their sum. The first
    /// write puts our entry in place at once, so that if this keyring dies
    /// before its first write point the others still add a write interval
    /// for it, rather than counting nothing.
    /// Returns our count after these. No rotation here (see
    /// [`Vault::maybe_auto_rotate`]).
    pub(crate) async fn count_encryptions(
        &self,
        tenant: &str,
        keys: &super::keyring::TenantKeys,
        n: u64,
    ) -> Result<u64> {
        let before = keys.active_encryptions.own.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        if before == 0 || after / keys.count_every > before / keys.count_every {
            let mut written = keys.active_encryptions.written.lock().await;
            // The count as it is now, not `after`: a write that waited for
            // the lock writes what the writes before it did not.
            let now = keys.active_encryptions.own.load(Ordering::Relaxed);
            if now > *written {
                self.store
                    .put_keys(&[(keys.count_name.clone(), now.to_le_bytes().to_vec())])
                    .await?;
                *written = now;
            }
            drop(written);
            keys.read_others(&*self.store, tenant).await?;
        }
        Ok(after)
    }

    /// Counts one encryption under the tenant's active key and rotates when
    /// a trigger fires: the GCM random-nonce budget or the cryptoperiod.
    /// Says whether the caller may encrypt with `keys` or must reload them.
    pub(crate) async fn maybe_auto_rotate(
        &self,
        tenant: &str,
        keys: &super::keyring::TenantKeys,
    ) -> Result<Rotation> {
        // Our count as this request made it (not as others have raised it
        // since), so only requests past the limit move to a new key. The
        // limit'th encryption is still allowed: "rotate after N" means N.
        let own = self.count_encryptions(tenant, keys, 1).await?;
        let others = keys.active_encryptions.others.load(Ordering::Relaxed);
        let too_many = own.saturating_add(others) > self.config.dek_max_encryptions;
        let too_old = keys.active_created_ms > 0
            && now_ms().saturating_sub(keys.active_created_ms) >= self.config.dek_max_age_ms;
        if too_many || too_old {
            let Some(v) = self.rotate_tenant(tenant, Some(keys.active)).await? else {
                // Another request rotated first: the caller reloads the keys.
                return Ok(Rotation::Overtaken);
            };
            let ctx = CallContext {
                principal: "cardvault".into(),
                ..Default::default()
            };
            let mut body = audit_body(&ctx, AuditAction::RotateDataKey, tenant, "", Ok(()));
            body.detail = format!(
                "automatic: {} -> version {v}",
                if too_many {
                    "encryption count limit"
                } else {
                    "cryptoperiod elapsed"
                }
            );
            self.record(body).await?;
            tracing::info!(tenant, version = v, "data key rotated automatically");
            return Ok(Rotation::Made);
        }
        Ok(Rotation::NotDue)
    }

    /// Re-encrypts every record under an older data key version with the
    /// tenant's active version. Progress goes to `progress` (best effort).
    /// Interrupted runs are resumed by running again: every pass rescans
    /// and each record is replaced atomically, so none is skipped or lost.
    pub async fn rewrap(
        &self,
        ctx: &CallContext,
        tenant: Option<&Tenant>,
        progress: mpsc::Sender<RewrapProgress>,
    ) -> Result<RewrapProgress> {
        if self.rewrap_running.swap(true, Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(
                "a rewrap is already running".into(),
            ));
        }
        let result = self.rewrap_inner(tenant, &progress).await;
        self.rewrap_running.store(false, Ordering::SeqCst);
        let mut body = audit_body(
            ctx,
            AuditAction::Rewrap,
            tenant.map_or("", |t| t.as_str()),
            "",
            result.as_ref().map(|_| ()),
        );
        if let Ok(p) = &result {
            body.detail = format!(
                "rewrapped {} of {} records ({} deleted meanwhile)",
                p.done, p.total, p.skipped
            );
        }
        self.record(body).await?;
        result
    }

    async fn rewrap_inner(
        &self,
        only: Option<&Tenant>,
        progress: &mpsc::Sender<RewrapProgress>,
    ) -> Result<RewrapProgress> {
        let keyring = self.keyring()?;
        // Fresh view of every tenant's active version (another replica may
        // have rotated).
        let mut active: BTreeMap<String, u32> = BTreeMap::new();
        for t in self.tenants().await? {
            if only.is_some_and(|o| o.as_str() != t) {
                continue;
            }
            keyring.invalidate(&t);
            active.insert(
                t.clone(),
                keyring.tenant(&*self.store, &t, false).await?.active,
            );
        }
        // Records under an older key, and records whose envelope does not
        // bind their metadata yet (version 1), which a rewrap rewrites.
        let stale = |r: &StoredRecord| {
            active.get(&r.tenant).is_some_and(|a| {
                r.key_version < *a || envelope::version(&r.envelope) == Ok(envelope::LEGACY_VERSION)
            })
        };
        let mut p = RewrapProgress::default();
        self.scan_all(|r| {
            if stale(r) {
                p.total += 1;
            }
        })
        .await?;
        let _ = progress.try_send(p);
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self
                .store
                .scan_records(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 500)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some((last.tenant.clone(), last.token.clone()));
            // A page is re-encrypted, then written concurrently, so the
            // store's group commit makes one flush serve many records.
            let mut updates = Vec::new();
            for rec in page.into_iter().filter(|r| stale(r)) {
                // The keyring as it is now: a master key rotation during the
                // rewrap replaces it (the old one cannot unwrap keys written
                // since, and would report them as damaged).
                let keys = self
                    .keyring()?
                    .tenant(&*self.store, &rec.tenant, false)
                    .await?;
                // Rewrapping encrypts too: counted, and rotated at the
                // limit, like a tokenize.
                let keys = self.counted_keys(&rec.tenant, keys).await?;
                let target = keys.active;
                let (Some(old), Some(new)) =
                    (keys.deks.get(&rec.key_version), keys.deks.get(&target))
                else {
                    return Err(Error::DataLoss(format!(
                        "tenant {}: data key version {} or {target} is missing",
                        rec.tenant, rec.key_version
                    )));
                };
                let secret = envelope::open(old, &rec.tenant, &rec.token, &super::meta_of(&rec), &rec.envelope).map_err(|_| {
                    Error::DataLoss(format!(
                        "tenant {}: a record failed authentication during rewrap; run audit verify and investigate",
                        rec.tenant
                    ))
                })?;
                let mut updated = rec.clone();
                updated.key_version = target;
                updated.envelope = envelope::seal(
                    new,
                    target,
                    &updated.tenant,
                    &updated.token,
                    &super::meta_of(&updated),
                    &secret,
                );
                updates.push((rec, updated));
            }
            // Only if unchanged since the scan: a record deleted meanwhile
            // (and its token perhaps issued again) is skipped, not revived.
            let results = futures::future::join_all(
                updates
                    .iter()
                    .map(|(read, new)| self.store.update(read, new)),
            )
            .await;
            for r in results {
                if r? {
                    p.done += 1;
                } else {
                    p.skipped += 1;
                }
            }
            let _ = progress.try_send(p);
            if !self.config.rewrap_pause.is_zero() {
                // Operators may slow a rewrap down so it does not compete
                // with live traffic for disk.
                tokio::time::sleep(self.config.rewrap_pause).await;
            }
        }
        p.finished = true;
        let _ = progress.send(p).await;
        Ok(p)
    }

    async fn scan_all(&self, mut f: impl FnMut(&StoredRecord)) -> Result<()> {
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self
                .store
                .scan_records(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 1000)
                .await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = Some((last.tenant.clone(), last.token.clone()));
            page.iter().for_each(&mut f);
        }
    }

    /// Records per (tenant, key version).
    pub async fn version_counts(&self) -> Result<BTreeMap<(String, u32), u64>> {
        let mut counts = BTreeMap::new();
        self.scan_all(|r| *counts.entry((r.tenant.clone(), r.key_version)).or_insert(0) += 1)
            .await?;
        Ok(counts)
    }

    /// Destroys an old data key version. Refused while it is active or any
    /// record still uses it (rewrap first): a destroyed key cannot come back.
    pub async fn retire_key(&self, ctx: &CallContext, tenant: &Tenant, version: u32) -> Result<()> {
        let result = self.retire_inner(tenant, version).await;
        let mut body = audit_body(
            ctx,
            AuditAction::RetireKey,
            tenant.as_str(),
            "",
            result.as_ref().map(|_| ()),
        );
        body.detail = format!("version {version}");
        self.record(body).await?;
        result
    }

    async fn retire_inner(&self, tenant: &Tenant, version: u32) -> Result<()> {
        // A master key rotation lists every key and writes them all back
        // re-wrapped: a retire in between would be undone by that write.
        let _guard = self.key_lock.read().await;
        let keyring = self.keyring()?;
        keyring.invalidate(tenant.as_str());
        let keys = keyring.tenant(&*self.store, tenant.as_str(), false).await?;
        if !keys.deks.contains_key(&version) {
            let retired = self
                .store
                .get_key(&dek_retired_name(tenant.as_str(), version))
                .await?
                .and_then(|b| RetiredDek::decode(b.as_slice()).ok());
            return Err(match retired {
                Some(r) => Error::FailedPrecondition(format!(
                    "version {version} was already retired at {}; its key is destroyed",
                    crate::time::rfc3339(r.retired_at_ms)
                )),
                None => Error::invalid("version", "no such data key version for this tenant"),
            });
        }
        if version == keys.active {
            return Err(Error::FailedPrecondition(format!(
                "version {version} is the active key; rotate first"
            )));
        }
        let in_use = self
            .version_counts()
            .await?
            .get(&(tenant.as_str().to_owned(), version))
            .copied()
            .unwrap_or(0);
        if in_use > 0 {
            return Err(Error::FailedPrecondition(format!(
                "{in_use} records still use version {version}; run rewrap first"
            )));
        }
        // When the version stopped being active: its successor's creation.
        let successor = keys.deks.range(version + 1..).next().map(|(v, _)| *v);
        if let Some(next) = successor {
            let replaced_ms = version_meta(&*self.store, tenant.as_str(), next)
                .await?
                .created_at_ms;
            let grace_ms = self.config.retire_grace.as_millis() as i64;
            let since = now_ms().saturating_sub(replaced_ms);
            if since < grace_ms {
                return Err(Error::FailedPrecondition(format!(
                    "version {version} was replaced {} s ago, and requests that loaded the keys \
                     before may still write with it; retry in {} s (keys.retire_grace_secs)",
                    since / 1000,
                    (grace_ms - since + 999) / 1000
                )));
            }
        }
        // The record of the retirement first: a crash before the key is
        // deleted leaves a live key (retired again next time), never a
        // version that vanished without a word.
        let created_at_ms = self
            .stored_meta(tenant.as_str(), version)
            .await?
            .created_at_ms;
        let retired = RetiredDek {
            created_at_ms,
            retired_at_ms: now_ms(),
        };
        self.store
            .put_keys(&[(
                dek_retired_name(tenant.as_str(), version),
                retired.encode_to_vec(),
            )])
            .await?;
        self.store
            .delete_key(&dek_name(tenant.as_str(), version))
            .await?;
        self.store
            .delete_key(&dek_meta_name(tenant.as_str(), version))
            .await?;
        for (name, _) in self
            .store
            .list_keys(&dek_count_prefix(tenant.as_str(), version))
            .await?
        {
            self.store.delete_key(&name).await?;
        }
        keyring.invalidate(tenant.as_str());
        tracing::info!(tenant = %tenant, version, "data key retired and destroyed");
        Ok(())
    }

    /// A data key version's metadata as stored, for reports (default if
    /// missing or unreadable; unlike `version_meta`, nothing is repaired).
    async fn stored_meta(&self, tenant: &str, version: u32) -> Result<DekMeta> {
        Ok(self
            .store
            .get_key(&dek_meta_name(tenant, version))
            .await?
            .and_then(|b| DekMeta::decode(b.as_slice()).ok())
            .unwrap_or_default())
    }

    /// The vault's key state. Works sealed (nothing here needs a key).
    pub async fn status(&self) -> Result<VaultStatus> {
        let counts = self.version_counts().await?;
        let mut tenants = Vec::new();
        for t in self.tenants().await? {
            let mut versions = Vec::new();
            for (name, _) in self
                .store
                .list_keys(&super::keyring::dek_prefix(&t))
                .await?
            {
                let Some(v) = version_of(&name) else { continue };
                let meta = self.stored_meta(&t, v).await?;
                // Written counts of every keyring (what is not written yet,
                // at most `count_every` each, is not included).
                let mut encryptions = meta.encryptions;
                for (_, n) in self.store.list_keys(&dek_count_prefix(&t, v)).await? {
                    let n = super::keyring::decode_count(&n).unwrap_or(0);
                    encryptions = encryptions.saturating_add(n);
                }
                versions.push(VersionStatus {
                    version: v,
                    records: counts.get(&(t.clone(), v)).copied().unwrap_or(0),
                    created_at_ms: meta.created_at_ms,
                    encryptions,
                    retired_at_ms: None,
                });
            }
            // Retired versions stay listed, with when, so that a version
            // does not vanish without a word. A live key wins over a
            // record of its retirement (a retire that crashed midway).
            for (name, value) in self
                .store
                .list_keys(&super::keyring::dek_retired_prefix(&t))
                .await?
            {
                let Some(v) = version_of(&name) else { continue };
                let Ok(r) = RetiredDek::decode(value.as_slice()) else {
                    continue;
                };
                if versions.iter().any(|x| x.version == v) {
                    continue;
                }
                versions.push(VersionStatus {
                    version: v,
                    records: 0,
                    created_at_ms: r.created_at_ms,
                    encryptions: 0,
                    retired_at_ms: Some(r.retired_at_ms),
                });
            }
            versions.sort_by_key(|x| x.version);
            tenants.push(TenantStatus {
                tenant: t,
                versions,
            });
        }
        Ok(VaultStatus {
            sealed: self.is_sealed(),
            initialized: self.is_initialized().await?,
            seal_mode: self.seal_mode.clone(),
            seal_config: self.seal_config().await?,
            unseal_entered_by: self.unseal_entered_by(),
            rekey: self.rekey_in_progress(),
            tenants,
            store: self.store.backend().to_owned(),
            cvvs_held: self.cvv.len() as u64,
        })
    }
}
