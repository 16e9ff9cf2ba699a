//! The domain core: tokenize, detokenize, metadata, delete, and the sealed /
//! unsealed key state. No gRPC, no TLS, no files: callers hand in validated
//! domain types and get domain results or an [`Error`].

pub mod keyring;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;

use crate::card::{Brand, CardholderName, Cvv, Expiry, Pan};
use crate::crypto::envelope::{self, CardSecret};
use crate::crypto::keys::{SecretKey, kek_check_value, kek_matches};
use crate::cvv::CvvHolder;
use crate::error::{Error, Result};
use crate::store::{InsertOutcome, Store, StoredRecord};
use crate::token::{Purpose, Tenant, Token, TokenFormat};
use keyring::{KEK_CHECK_NAME, Keyring};

/// Most items one batch call may carry.
pub const MAX_BATCH: usize = 1000;
/// Attempts to find an unused token before giving up (only format-preserving
/// tokens of short PANs can realistically collide).
const TOKEN_ATTEMPTS: usize = 16;

/// Vault tunables.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// How long a CVV stays readable (capped at one hour).
    pub cvv_ttl: Duration,
    /// Most CVVs held at once.
    pub cvv_max_entries: usize,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            cvv_ttl: Duration::from_secs(300),
            cvv_max_entries: 100_000,
        }
    }
}

/// Who is calling and which request this is, for logs (and, later, audit).
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Unique id of the request, echoed in logs.
    pub request_id: String,
    /// The authenticated principal (certificate identity).
    pub principal: String,
}

/// A card to tokenize, already validated.
pub struct NewCard {
    /// The card number.
    pub pan: Pan,
    /// The expiry.
    pub expiry: Expiry,
    /// Optional cardholder name.
    pub name: Option<CardholderName>,
    /// Optional CVV, held in memory only.
    pub cvv: Option<Cvv>,
}

/// Options of a tokenize call.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenizeOptions {
    /// Token shape.
    pub format: TokenFormat,
    /// Return the tenant's existing token for this PAN, if any.
    pub dedupe: bool,
}

/// Non-sensitive facts about a token (tokenize result and metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardMetadata {
    /// The token.
    pub token: String,
    /// Brand name, e.g. `VISA`.
    pub brand: String,
    /// Last four digits.
    pub last4: String,
    /// First six digits.
    pub bin: String,
    /// Expiry month.
    pub exp_month: u32,
    /// Expiry year.
    pub exp_year: u32,
    /// Keyed fingerprint, hex.
    pub fingerprint: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Data key version of the stored envelope.
    pub key_version: u32,
    /// Whether a CVV is held for the token (on this node).
    pub cvv_held: bool,
    /// Whether dedupe returned an existing token.
    pub existing: bool,
}

/// What happened to the CVV on a detokenize.
pub enum CvvOutcome {
    /// The caller did not ask for it.
    NotRequested,
    /// Returned, and wiped from the holder.
    Returned(Cvv),
    /// None held: never given, already read, expired, or on another node.
    NotAvailable,
}

/// A detokenized card. Secret fields wipe themselves on drop.
pub struct Card {
    /// The token that was read.
    pub token: Token,
    /// The card number.
    pub pan: Pan,
    /// Expiry month.
    pub exp_month: u32,
    /// Expiry year.
    pub exp_year: u32,
    /// Cardholder name, if one was stored.
    pub name: Option<CardholderName>,
    /// Brand.
    pub brand: Brand,
    /// The CVV, if requested and held.
    pub cvv: CvvOutcome,
}

/// The vault. Cheap to share behind an `Arc`; every method is `&self`.
pub struct Vault {
    /// Where records and wrapped keys live.
    store: Arc<dyn Store>,
    /// `None` while sealed. A `std` lock: held only to clone the `Arc`.
    keys: RwLock<Option<Arc<Keyring>>>,
    /// Memory-only CVVs.
    cvv: CvvHolder,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn metadata_of(rec: &StoredRecord, cvv_held: bool, existing: bool) -> CardMetadata {
    CardMetadata {
        token: rec.token.clone(),
        brand: rec.brand.clone(),
        last4: rec.last4.clone(),
        bin: rec.bin.clone(),
        exp_month: rec.exp_month,
        exp_year: rec.exp_year,
        fingerprint: hex::encode(&rec.fingerprint),
        created_at_ms: rec.created_at_ms,
        key_version: rec.key_version,
        cvv_held,
        existing,
    }
}

fn integrity(what: &str) -> Error {
    Error::DataLoss(format!(
        "the stored record for this token {what}; it may have been tampered with or moved"
    ))
}

impl Vault {
    /// A sealed vault over `store`.
    pub fn new(store: Arc<dyn Store>, config: VaultConfig) -> Self {
        Vault {
            store,
            keys: RwLock::new(None),
            cvv: CvvHolder::new(config.cvv_ttl, config.cvv_max_entries),
        }
    }

    /// The storage backend.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The CVV holder (for the periodic purge and for status).
    pub fn cvv_holder(&self) -> &CvvHolder {
        &self.cvv
    }

    /// Whether the vault holds no keys.
    pub fn is_sealed(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    fn keyring(&self) -> Result<Arc<Keyring>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Sealed)
    }

    /// Unseals with the key-encrypting key. The first KEK a store sees is
    /// recorded (as a check value); any other KEK is refused afterwards.
    pub async fn unseal(&self, kek: SecretKey) -> Result<()> {
        let keyring = Keyring::new(kek);
        let check = kek_check_value(keyring.kek());
        let stored = match self.store.put_key_if_absent(KEK_CHECK_NAME, &check).await? {
            None => check,
            Some(existing) => existing,
        };
        if !kek_matches(keyring.kek(), &stored) {
            return Err(Error::invalid(
                "key",
                "does not match the key-encrypting key this vault's data was written with",
            ));
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(keyring));
        Ok(())
    }

    /// Drops every key and CVV from memory. Data calls then fail `Sealed`.
    pub fn seal(&self) {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).take();
        self.cvv.clear();
    }

    /// Stores a card and returns its token.
    pub async fn tokenize(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        card: NewCard,
        opts: TokenizeOptions,
    ) -> Result<CardMetadata> {
        let keyring = self.keyring()?;
        let keys = keyring.tenant(&*self.store, tenant.as_str(), true).await?;
        let fingerprint = keys.fingerprint.fingerprint(card.pan.expose());
        let dek = keys
            .deks
            .get(&keys.active)
            .ok_or_else(|| Error::Internal("active data key missing".into()))?;
        let secret = CardSecret {
            pan: zeroize::Zeroizing::new(card.pan.expose().to_owned()),
            exp_month: card.expiry.month(),
            exp_year: card.expiry.year(),
            name: zeroize::Zeroizing::new(
                card.name
                    .as_ref()
                    .map(|n| n.expose().to_owned())
                    .unwrap_or_default(),
            ),
        };
        for _ in 0..TOKEN_ATTEMPTS {
            let token = Token::generate(opts.format, &card.pan);
            let record = StoredRecord {
                tenant: tenant.as_str().to_owned(),
                token: token.as_str().to_owned(),
                brand: card.pan.brand().as_str().to_owned(),
                last4: card.pan.last4().to_owned(),
                bin: card.pan.bin().to_owned(),
                exp_month: card.expiry.month(),
                exp_year: card.expiry.year(),
                fingerprint: fingerprint.to_vec(),
                created_at_ms: now_ms(),
                key_version: keys.active,
                envelope: envelope::seal(
                    dek,
                    keys.active,
                    tenant.as_str(),
                    token.as_str(),
                    &secret,
                ),
            };
            // The CVV is held before the record is written, so a full holder
            // fails the call before it leaves a token behind.
            if let Some(cvv) = &card.cvv {
                self.cvv.put(tenant.as_str(), token.as_str(), cvv.clone())?;
            }
            let outcome = self.store.insert(&record, opts.dedupe).await;
            let (rec, existing) = match outcome {
                Ok(InsertOutcome::Inserted) => (record, false),
                Ok(InsertOutcome::TokenTaken) => {
                    self.cvv.remove(tenant.as_str(), token.as_str());
                    continue;
                }
                Ok(InsertOutcome::Deduplicated(existing)) => {
                    self.cvv.remove(tenant.as_str(), token.as_str());
                    if let Some(cvv) = card.cvv {
                        self.cvv.put(tenant.as_str(), &existing.token, cvv)?;
                    }
                    (existing, true)
                }
                Err(e) => {
                    self.cvv.remove(tenant.as_str(), token.as_str());
                    return Err(e);
                }
            };
            let cvv_held = self.cvv.is_held(tenant.as_str(), &rec.token);
            tracing::info!(
                request_id = %ctx.request_id,
                principal = %ctx.principal,
                tenant = %tenant,
                token = %rec.token,
                existing,
                cvv_held,
                "tokenize"
            );
            return Ok(metadata_of(&rec, cvv_held, existing));
        }
        Err(Error::ResourceExhausted(
            "could not allocate an unused token; use a longer token format".into(),
        ))
    }

    /// Tokenizes many cards; items that failed validation are passed in as
    /// errors and come back unchanged. One result per item, in order.
    pub async fn tokenize_batch(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        items: Vec<Result<NewCard>>,
        opts: TokenizeOptions,
    ) -> Result<Vec<Result<CardMetadata>>> {
        check_batch_size(items.len())?;
        self.keyring()?;
        Ok(join_all(
            items
                .into_iter()
                .map(|item| async move { self.tokenize(ctx, tenant, item?, opts).await }),
        )
        .await)
    }

    /// Returns the card behind a token. The token of another tenant is
    /// `NotFound`, exactly like a token that does not exist.
    pub async fn detokenize(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        token: &Token,
        purpose: &Purpose,
        include_cvv: bool,
    ) -> Result<Card> {
        let keyring = self.keyring()?;
        let result = self.read_card(&keyring, tenant, token, include_cvv).await;
        tracing::info!(
            request_id = %ctx.request_id,
            principal = %ctx.principal,
            tenant = %tenant,
            token = %token,
            purpose = purpose.as_str(),
            include_cvv,
            outcome = match &result { Ok(_) => "ok".to_string(), Err(e) => e.to_string() },
            "detokenize"
        );
        result
    }

    async fn read_card(
        &self,
        keyring: &Keyring,
        tenant: &Tenant,
        token: &Token,
        include_cvv: bool,
    ) -> Result<Card> {
        let rec = self
            .store
            .get(tenant.as_str(), token.as_str())
            .await?
            .ok_or(Error::NotFound)?;
        let kid = envelope::key_id(&rec.envelope).map_err(|_| integrity("is malformed"))?;
        let mut keys = keyring.tenant(&*self.store, tenant.as_str(), false).await?;
        if !keys.deks.contains_key(&kid) {
            // Another replica may have rotated since we cached the tenant.
            keyring.invalidate(tenant.as_str());
            keys = keyring.tenant(&*self.store, tenant.as_str(), false).await?;
        }
        let dek = keys
            .deks
            .get(&kid)
            .ok_or_else(|| integrity("names a data key version that does not exist"))?;
        let secret = envelope::open(dek, tenant.as_str(), token.as_str(), &rec.envelope)
            .map_err(|_| integrity("failed authentication"))?;
        let pan = Pan::parse(&secret.pan).map_err(|_| integrity("holds an invalid card number"))?;
        let name =
            CardholderName::parse(&secret.name).map_err(|_| integrity("holds an invalid name"))?;
        let cvv = if include_cvv {
            match self.cvv.take(tenant.as_str(), token.as_str()) {
                Some(c) => CvvOutcome::Returned(c),
                None => CvvOutcome::NotAvailable,
            }
        } else {
            CvvOutcome::NotRequested
        };
        Ok(Card {
            token: token.clone(),
            brand: pan.brand(),
            pan,
            exp_month: secret.exp_month,
            exp_year: secret.exp_year,
            name,
            cvv,
        })
    }

    /// Detokenizes many tokens; one result per item, in order.
    pub async fn detokenize_batch(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        tokens: Vec<Result<Token>>,
        purpose: &Purpose,
        include_cvv: bool,
    ) -> Result<Vec<Result<Card>>> {
        check_batch_size(tokens.len())?;
        self.keyring()?;
        Ok(join_all(tokens.into_iter().map(|t| async move {
            self.detokenize(ctx, tenant, &t?, purpose, include_cvv)
                .await
        }))
        .await)
    }

    /// Non-sensitive facts about a token; no decryption.
    pub async fn metadata(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        token: &Token,
    ) -> Result<CardMetadata> {
        self.keyring()?;
        let rec = self
            .store
            .get(tenant.as_str(), token.as_str())
            .await?
            .ok_or(Error::NotFound)?;
        tracing::debug!(request_id = %ctx.request_id, principal = %ctx.principal, tenant = %tenant, token = %token, "metadata");
        Ok(metadata_of(
            &rec,
            self.cvv.is_held(tenant.as_str(), token.as_str()),
            false,
        ))
    }

    /// Deletes (redacts) a token: the record, its index entry and any held
    /// CVV. Returns whether it existed; deleting twice is not an error.
    pub async fn delete(&self, ctx: &CallContext, tenant: &Tenant, token: &Token) -> Result<bool> {
        self.keyring()?;
        self.cvv.remove(tenant.as_str(), token.as_str());
        let deleted = self.store.delete(tenant.as_str(), token.as_str()).await?;
        tracing::info!(request_id = %ctx.request_id, principal = %ctx.principal, tenant = %tenant, token = %token, deleted, "delete");
        Ok(deleted)
    }
}

fn check_batch_size(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("items", "must not be empty"));
    }
    if n > MAX_BATCH {
        return Err(Error::invalid(
            "items",
            format!("at most {MAX_BATCH} items per call, got {n}"),
        ));
    }
    Ok(())
}
