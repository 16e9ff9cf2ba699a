//! The domain core: tokenize, detokenize, metadata, delete, the audit log,
//! and the sealed / unsealed key state. No gRPC, no TLS, no files: callers
//! hand in validated domain types and get domain results or an [`Error`].
//!
//! Every operation appends an audit record, and reads fail closed: if the
//! record of a detokenize or metadata read cannot be written, nothing is
//! returned.

pub mod audit_log;
pub mod collect;
pub mod custody;
pub mod cvv;
pub mod guard;
pub mod keyring;
pub mod keys;

use crate::audit::AuditAction;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use ring::signature::Ed25519KeyPair;

use self::cvv::CvvHolder;
use crate::audit::AuditBody;
use crate::card::{Brand, CardholderName, Cvv, Expiry, Pan};
use crate::crypto::envelope::{self, CardSecret};
use crate::crypto::keys::{Aead, SecretKey, kek_check_value, kek_matches, unwrap_key, wrap_key};
use crate::error::{Error, Result};
use crate::fields::{Purpose, Tenant};
use crate::store::{AuditLink, InsertOutcome, Store, StoredRecord};
use crate::sync::Recover;
use crate::token::{Token, TokenFormat};
use audit_log::AuditSink;
use keyring::{AUDIT_KEY_NAME, KEK_CHECK_NAME, Keyring};
use keys::Rotation;

/// Most items one batch call may carry.
pub const MAX_BATCH: usize = 1000;
/// Attempts to find an unused token before giving up (only format-preserving
/// tokens of short PANs can realistically collide).
const TOKEN_ATTEMPTS: usize = 16;
/// Default of [`VaultConfig::retire_grace`]: far longer than the key
/// cache's 2 s and than any request should take.
pub const DEFAULT_RETIRE_GRACE: Duration = Duration::from_secs(60);
/// Rotations one tokenize may make itself before it gives up. Making one
/// needs the new key used up by others before this request's next try, so
/// more than a few means a fault (a count that never resets), and the cap
/// keeps such a fault from making versions without end.
const MAX_ROTATIONS_MADE_PER_CALL: usize = 8;
/// Rotations by others one tokenize may wait through before it gives up.
/// Each means a whole key's limit was used by requests in flight, so a
/// request sees about (requests in flight / limit) of them: a handful for
/// a small test limit, 1,000 for a 1,000-card batch at a limit of 1.
const MAX_ROTATIONS_SEEN_PER_CALL: usize = 1024;

/// Vault tunables.
#[derive(Clone)]
pub struct VaultConfig {
    /// This replica's name in audit records (`AuditBody::replica`).
    pub replica: String,
    /// How long a CVV stays readable (capped at one hour).
    pub cvv_ttl: Duration,
    /// Most CVVs held at once.
    pub cvv_max_entries: usize,
    /// Most CVVs held at once for one tenant.
    pub cvv_max_per_tenant: usize,
    /// Sign an audit checkpoint every this many records.
    pub checkpoint_every: u64,
    /// Optional copy of every audit record as a JSON line (SIEM feed).
    pub audit_sink: Option<Arc<AuditSink>>,
    /// Rotate a tenant's data key after this many encryptions (AES-GCM with
    /// random 96-bit nonces must stay far below 2^32 per key).
    pub dek_max_encryptions: u64,
    /// Rotate a tenant's data key when it is this old (cryptoperiod), ms.
    pub dek_max_age_ms: i64,
    /// How the vault gets its KEK: `shamir`, `kek-file` or `dev` (status only).
    pub seal_mode: String,
    /// Pause between rewrap pages of 500 records (throttle).
    pub rewrap_pause: Duration,
    /// How long after a data key version stops being active it may be
    /// retired: requests that loaded the keys before the rotation (and
    /// replicas whose key cache is a little older) may still write with it.
    pub retire_grace: Duration,
    /// The enumeration guard's window and threshold.
    pub guard: guard::GuardConfig,
    /// How long a rekey may take from its start to its last share.
    pub rekey_timeout: Duration,
    /// Collect sessions' default life and limits.
    pub collect: collect::CollectConfig,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            replica: String::new(),
            cvv_ttl: Duration::from_secs(300),
            cvv_max_entries: 100_000,
            cvv_max_per_tenant: 50_000,
            checkpoint_every: 1000,
            audit_sink: None,
            dek_max_encryptions: 1 << 30,
            dek_max_age_ms: 365 * 24 * 3600 * 1000,
            seal_mode: "kek-file".into(),
            rewrap_pause: Duration::ZERO,
            retire_grace: DEFAULT_RETIRE_GRACE,
            guard: guard::GuardConfig::default(),
            rekey_timeout: custody::DEFAULT_REKEY_TIMEOUT,
            collect: collect::CollectConfig::default(),
        }
    }
}

/// Who is calling and which request this is, for logs and the audit log.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Unique id of the request, echoed in logs.
    pub request_id: String,
    /// The authenticated principal (certificate identity).
    pub principal: String,
    /// Roles the principal holds.
    pub roles: Vec<String>,
    /// Peer network address.
    pub peer: String,
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

impl NewCard {
    /// Validates one card's fields, naming the field and the reason on
    /// failure, never the value. `cvv: Some("")` counts as absent, since
    /// many clients send empty strings for unset fields.
    pub fn parse(
        pan: &str,
        exp_month: u32,
        exp_year: u32,
        name: Option<&str>,
        cvv: Option<&str>,
        today: crate::card::YearMonth,
    ) -> Result<NewCard> {
        let pan = Pan::parse(pan)?;
        let expiry = Expiry::new(exp_month, exp_year, today)?;
        let name = match name {
            Some(n) => CardholderName::parse(n)?,
            None => None,
        };
        let cvv = match cvv {
            Some(c) if !c.is_empty() => Some(Cvv::parse(c, pan.brand())?),
            _ => None,
        };
        Ok(NewCard {
            pan,
            expiry,
            name,
            cvv,
        })
    }

    /// A card expiring in two years, without name or CVV, from a card
    /// number known to be valid (tests and examples; panics otherwise).
    #[doc(hidden)]
    pub fn sample(pan: &str) -> NewCard {
        let today = crate::card::YearMonth::now_utc();
        NewCard {
            pan: Pan::parse(pan).expect("a valid sample card number"),
            expiry: Expiry::new(12, today.year + 2, today).expect("a valid expiry"),
            name: None,
            cvv: None,
        }
    }
}

/// A caller's tokenize budget, asked once per card after the enumeration
/// guard has classified it (see [`guard`]). The gRPC layer implements it
/// from the caller's policy grant; the core knows no principals' limits.
pub trait TokenizeBudget: Send + Sync {
    /// `Err` once the budget is spent, whatever the card, so a refusal
    /// tells no card from another; otherwise charges one card to the
    /// collision budget if `collision` (a card new to a bucket that holds
    /// another one: what a guess at a stored card is).
    fn admit(&self, collision: bool) -> Result<()>;
}

/// No budget: for callers inside the process (tests, tools), never for a
/// network caller.
pub struct Unmetered;

impl TokenizeBudget for Unmetered {
    fn admit(&self, _collision: bool) -> Result<()> {
        Ok(())
    }
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
    /// Where records, wrapped keys and the audit log live.
    store: Arc<dyn Store>,
    /// `None` while sealed. A `std` lock: held only to clone the `Arc`.
    keys: RwLock<Option<Arc<Keyring>>>,
    /// Memory-only CVVs.
    cvv: CvvHolder,
    /// Checkpoint cadence and SIEM sink.
    config: VaultConfig,
    /// Highest audit seq covered by a signed checkpoint (cache).
    last_checkpoint: AtomicU64,
    /// Custodians' shares entered towards the next unseal (wiped when used).
    pending_shares: std::sync::Mutex<Vec<(String, crate::crypto::shamir::ShareText)>>,
    /// The rekey in progress, if any.
    rekey: std::sync::Mutex<Option<custody::RekeyState>>,
    /// Held shared while tenant keys are created or rotated, exclusively
    /// while the master key is replaced, so no key is wrapped under a KEK
    /// that is being retired.
    key_lock: tokio::sync::RwLock<()>,
    /// Only one rewrap at a time.
    rewrap_running: std::sync::atomic::AtomicBool,
    /// Copy of `config.seal_mode` for status.
    seal_mode: String,
    /// Audit appends that failed (metric).
    audit_failures: AtomicU64,
    /// Buckets the enumeration guard locked (metric).
    guard_locks: AtomicU64,
    /// Tokenizes refused by a locked bucket (metric).
    guard_refusals: AtomicU64,
    /// Memory-only collect session keys.
    collect: collect::CollectSessions,
}

pub(crate) fn now_ms() -> i64 {
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

/// The clear metadata of a record, as its envelope binds it.
fn meta_of(rec: &StoredRecord) -> envelope::RecordMeta<'_> {
    envelope::RecordMeta {
        bin: &rec.bin,
        last4: &rec.last4,
        brand: &rec.brand,
        exp_month: rec.exp_month,
        exp_year: rec.exp_year,
        fingerprint: &rec.fingerprint,
    }
}

fn integrity(what: &str) -> Error {
    Error::DataLoss(format!(
        "the stored record for this token {what}; it may have been tampered with or moved"
    ))
}

/// Builds an audit body for an operation and its outcome.
pub fn audit_body(
    ctx: &CallContext,
    action: AuditAction,
    tenant: &str,
    token: &str,
    outcome: Result<(), &Error>,
) -> AuditBody {
    let (outcome, error) = match outcome {
        Ok(()) => ("OK".to_owned(), String::new()),
        Err(e) => (e.code_name().to_owned(), e.to_string()),
    };
    AuditBody {
        time_ms: now_ms(),
        principal: ctx.principal.clone(),
        roles: ctx.roles.clone(),
        tenant: tenant.to_owned(),
        action: action.as_str().to_owned(),
        token: token.to_owned(),
        purpose: String::new(),
        outcome,
        error,
        request_id: ctx.request_id.clone(),
        peer: ctx.peer.clone(),
        detail: String::new(),
        // Set when the record is written (`Vault::stamp`).
        replica: String::new(),
    }
}

fn audit_unavailable(e: &Error) -> Error {
    Error::Unavailable(format!(
        "the audit log could not be written ({e}); nothing was returned"
    ))
}

impl Vault {
    /// A sealed vault over `store`.
    pub fn new(store: Arc<dyn Store>, config: VaultConfig) -> Self {
        Vault {
            store,
            keys: RwLock::new(None),
            cvv: CvvHolder::new(
                config.cvv_ttl,
                config.cvv_max_entries,
                config.cvv_max_per_tenant,
            ),
            seal_mode: config.seal_mode.clone(),
            collect: collect::CollectSessions::new(config.collect),
            config,
            last_checkpoint: AtomicU64::new(0),
            pending_shares: std::sync::Mutex::new(Vec::new()),
            rekey: std::sync::Mutex::new(None),
            key_lock: tokio::sync::RwLock::new(()),
            rewrap_running: std::sync::atomic::AtomicBool::new(false),
            audit_failures: AtomicU64::new(0),
            guard_locks: AtomicU64::new(0),
            guard_refusals: AtomicU64::new(0),
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
        self.keys.read().recover().is_none()
    }

    /// `Err(Sealed)` while sealed. Data calls check it before their input,
    /// so a sealed vault answers UNAVAILABLE whatever it is sent.
    pub fn check_unsealed(&self) -> Result<()> {
        self.keyring().map(drop)
    }

    fn keyring(&self) -> Result<Arc<Keyring>> {
        self.keys.read().recover().clone().ok_or(Error::Sealed)
    }

    /// Unseals with the key-encrypting key. The first KEK a store sees is
    /// recorded (as a check value); any other KEK is refused afterwards.
    pub async fn unseal(&self, kek: SecretKey) -> Result<()> {
        let kek = Aead::new(&kek);
        let check = kek_check_value(&kek);
        let stored = match self.store.put_key_if_absent(KEK_CHECK_NAME, &check).await? {
            None => check,
            Some(existing) => existing,
        };
        if !kek_matches(&kek, &stored) {
            return Err(Error::invalid(
                "key",
                "does not match the key-encrypting key this vault's data was written with",
            ));
        }
        let checkpoints = self.store.checkpoints().await?;
        let wrapped = match self.store.get_key(AUDIT_KEY_NAME).await? {
            Some(w) => w,
            // Checkpoints signed by a key that is gone: a new key would sign
            // whatever the log now holds (a rewrite behind the deleted key
            // and checkpoints included), so refuse instead.
            None if !checkpoints.is_empty() => {
                return Err(Error::DataLoss(format!(
                    "the audit signing key is missing, but {} audit checkpoints were signed with it",
                    checkpoints.len()
                )));
            }
            // First unseal (or a crash during it): make one.
            None => {
                let fresh = wrap_key(&kek, AUDIT_KEY_NAME, &SecretKey::generate());
                self.store
                    .put_key_if_absent(AUDIT_KEY_NAME, &fresh)
                    .await?
                    .unwrap_or(fresh)
            }
        };
        let seed = unwrap_key(&kek, AUDIT_KEY_NAME, &wrapped)
            .map_err(|_| Error::DataLoss("the audit signing key failed to unwrap".into()))?;
        let audit_key = Ed25519KeyPair::from_seed_unchecked(seed.expose())
            .map_err(|_| Error::Internal("bad audit signing key".into()))?;
        let last_cp = checkpoints.last().map_or(0, |c| c.seq);
        self.last_checkpoint.fetch_max(last_cp, Ordering::Relaxed);
        *self.keys.write().recover() = Some(Arc::new(Keyring::new(
            kek,
            audit_key,
            self.config.dek_max_encryptions,
        )));
        Ok(())
    }

    /// Drops every key, pending key share, rekey, CVV and collect session
    /// from memory. Data
    /// calls then fail `Sealed`.
    pub fn seal(&self) {
        self.keys.write().recover().take();
        self.reset_unseal();
        // A rekey needs the unsealed vault; its shares go with the keys.
        self.rekey.lock().recover().take();
        self.cvv.clear();
        self.collect.clear();
    }

    /// Audit appends that have failed since start.
    pub fn audit_write_failures(&self) -> u64 {
        self.audit_failures.load(Ordering::Relaxed)
    }

    /// SIEM lines dropped because the sink could not keep up (0 without one).
    pub fn audit_sink_dropped(&self) -> u64 {
        self.config.audit_sink.as_ref().map_or(0, |s| s.dropped())
    }

    /// Writes out what the SIEM sink still holds and closes it (shutdown).
    pub fn close_audit_sink(&self) {
        if let Some(s) = &self.config.audit_sink {
            s.close();
        }
    }

    /// Appends an audit record (and signs a checkpoint when one is due).
    pub async fn record(&self, body: AuditBody) -> Result<AuditLink> {
        self.record_with(body, true).await
    }

    /// Appends an audit record; `durable` says whether to wait for it to
    /// reach disk (always for anything that returns card data).
    async fn record_with(&self, mut body: AuditBody, durable: bool) -> Result<AuditLink> {
        self.stamp(&mut body);
        let appended = if durable {
            self.store.append_audit(&body).await
        } else {
            self.store.append_audit_buffered(&body).await
        };
        let link = appended.inspect_err(|_| {
            self.audit_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        self.after_append(&link, &body).await;
        Ok(link)
    }

    /// Names this replica in an audit record about to be written (every
    /// write of one goes through `record_with`, `insert` or `delete`).
    fn stamp(&self, body: &mut AuditBody) {
        body.replica.clone_from(&self.config.replica);
    }

    /// Records a call refused before it reached the vault (authorisation or
    /// validation). Best effort: the call is failing anyway.
    pub async fn audit_rejected(
        &self,
        ctx: &CallContext,
        action: AuditAction,
        tenant: &str,
        token: &str,
        err: &Error,
    ) {
        let body = audit_body(ctx, action, tenant, token, Err(err));
        if let Err(e) = self.record(body).await {
            tracing::error!(request_id = %ctx.request_id, error = %e, "audit append failed for a refused call");
        }
    }

    async fn after_append(&self, link: &AuditLink, body: &AuditBody) {
        if let Some(sink) = &self.config.audit_sink {
            sink.write(link, body);
        }
        if self.config.checkpoint_every > 0
            && link.seq.is_multiple_of(self.config.checkpoint_every)
            && let Err(e) = self.sign_checkpoint(link.seq, &link.hash).await
        {
            tracing::warn!(seq = link.seq, error = %e, "audit checkpoint not signed");
        }
    }

    async fn sign_checkpoint(&self, seq: u64, hash: &[u8]) -> Result<()> {
        let keyring = self.keyring()?;
        let cp = crate::audit::sign_checkpoint(keyring.audit_key(), seq, hash, now_ms());
        self.store.put_checkpoint(&cp).await?;
        self.last_checkpoint.fetch_max(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Signs a checkpoint at the current head if the head has moved since
    /// the last one (called every few seconds, so a quiet log is sealed
    /// too). Returns the seq signed, if any.
    pub async fn checkpoint_now(&self) -> Result<Option<u64>> {
        let Some((seq, hash)) = self.store.audit_head().await? else {
            return Ok(None);
        };
        if seq <= self.last_checkpoint.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.sign_checkpoint(seq, &hash).await?;
        Ok(Some(seq))
    }

    /// Counts one encryption under the tenant's active key and returns the
    /// keys to make it with. Each encryption counts against the key that
    /// makes it: after a rotation (this call's or another's) the new key
    /// is counted too, so no version encrypts past the limit uncounted.
    pub(crate) async fn counted_keys(
        &self,
        tenant: &str,
        mut keys: Arc<keyring::TenantKeys>,
    ) -> Result<Arc<keyring::TenantKeys>> {
        let (mut made, mut seen) = (0, 0);
        loop {
            match self.maybe_auto_rotate(tenant, &keys).await? {
                Rotation::NotDue => return Ok(keys),
                Rotation::Made => made += 1,
                Rotation::Overtaken => seen += 1,
            }
            if made > MAX_ROTATIONS_MADE_PER_CALL || seen > MAX_ROTATIONS_SEEN_PER_CALL {
                return Err(Error::Unavailable(
                    "data key rotation is contended; retry".into(),
                ));
            }
            keys = (self.keyring()?)
                .tenant(&*self.store, tenant, false)
                .await?;
        }
    }

    /// Stores a card and returns its token. The card passes the
    /// enumeration guard first, and `budget` is asked for it.
    pub async fn tokenize(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        card: NewCard,
        opts: TokenizeOptions,
        budget: &dyn TokenizeBudget,
    ) -> Result<CardMetadata> {
        let result = self
            .tokenize_inner(ctx, AuditAction::Tokenize, tenant, card, opts, budget, "")
            .await;
        self.audit_failure(ctx, AuditAction::Tokenize, tenant.as_str(), result)
            .await
    }

    /// Tokenizes a card that came sealed through collect session
    /// `session_id` (opened by [`Vault::open_sealed`]): the same guard,
    /// budget and answer as [`Vault::tokenize`], audited as
    /// `TokenizeSealed` with the session id.
    pub async fn tokenize_sealed(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        session_id: &str,
        card: NewCard,
        opts: TokenizeOptions,
        budget: &dyn TokenizeBudget,
    ) -> Result<CardMetadata> {
        let detail = format!("session {session_id}");
        let result = self
            .tokenize_inner(
                ctx,
                AuditAction::TokenizeSealed,
                tenant,
                card,
                opts,
                budget,
                &detail,
            )
            .await;
        if let Err(e) = &result {
            self.audit_sealed_refusal(ctx, tenant, session_id, e).await;
        }
        result
    }

    /// Passes `result` through, recording a failure under `action` (and
    /// `tenant`, or `""` for a call not scoped to one).
    pub(crate) async fn audit_failure<T>(
        &self,
        ctx: &CallContext,
        action: AuditAction,
        tenant: &str,
        result: Result<T>,
    ) -> Result<T> {
        if let Err(e) = &result {
            self.audit_rejected(ctx, action, tenant, "", e).await;
        }
        result
    }

    /// `detail` goes into the audit record (e.g. the collect session).
    #[allow(clippy::too_many_arguments)]
    async fn tokenize_inner(
        &self,
        ctx: &CallContext,
        action: AuditAction,
        tenant: &Tenant,
        card: NewCard,
        opts: TokenizeOptions,
        budget: &dyn TokenizeBudget,
        detail: &str,
    ) -> Result<CardMetadata> {
        if matches!(
            opts.format,
            TokenFormat::FormatPreserving { keep_bin: true }
        ) && !card.pan.shows_bin()
        {
            // The token would show first six and last four: too much of a
            // short number (see `Pan::shown_head`).
            return Err(Error::invalid(
                "format",
                "keeping the BIN needs a card number of at least 15 digits",
            ));
        }
        self.check_unsealed()?;
        let keys = {
            let _guard = self.key_lock.read().await;
            // The keyring is taken under the lock, not before it: a master
            // key rotation holding the lock replaces the KEK, and a tenant's
            // first keys wrapped under the replaced one would be lost.
            let keyring = self.keyring()?;
            keyring.tenant(&*self.store, tenant.as_str(), true).await?
        };
        let fingerprint = keys.fingerprint.fingerprint(card.pan.expose());
        // Before anything is encrypted, counted or looked up by
        // fingerprint: a refused card must leave no trace an answer shows.
        let bucket = self
            .check_enumeration(
                ctx,
                tenant,
                &keys.fingerprint,
                &card.pan,
                &fingerprint,
                budget,
            )
            .await?;
        let keys = self.counted_keys(tenant.as_str(), keys).await?;
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
        // A place for the CVV is reserved before the record is written, so
        // a full holder fails the call before it leaves a token behind; it
        // is filled only once the token is known to be this card's (a
        // candidate token may belong to another card, whose CVV must stay).
        let mut cvv_slot = match &card.cvv {
            Some(_) => Some(self.cvv.reserve(tenant.as_str())?),
            None => None,
        };
        for _ in 0..TOKEN_ATTEMPTS {
            let token = Token::generate(opts.format, &card.pan);
            let mut record = StoredRecord {
                tenant: tenant.as_str().to_owned(),
                token: token.as_str().to_owned(),
                brand: card.pan.brand().as_str().to_owned(),
                last4: card.pan.last4().to_owned(),
                bin: card.pan.shown_head().to_owned(),
                exp_month: card.expiry.month(),
                exp_year: card.expiry.year(),
                fingerprint: fingerprint.to_vec(),
                created_at_ms: now_ms(),
                key_version: keys.active,
                envelope: Vec::new(),
                bucket: bucket.0.to_vec(),
            };
            record.envelope = envelope::seal(
                dek,
                keys.active,
                tenant.as_str(),
                token.as_str(),
                &meta_of(&record),
                &secret,
            );
            let mut body = audit_body(ctx, action, tenant.as_str(), token.as_str(), Ok(()));
            body.detail = match (detail.is_empty(), card.cvv.is_some()) {
                (true, true) => "cvv held".into(),
                (true, false) => String::new(),
                (false, true) => format!("{detail}; cvv held"),
                (false, false) => detail.to_owned(),
            };
            self.stamp(&mut body);
            let outcome = self.store.insert(&record, opts.dedupe, &body).await;
            let (rec, existing) = match outcome {
                Ok(InsertOutcome::Inserted(link)) => {
                    if let (Some(slot), Some(cvv)) = (cvv_slot.take(), &card.cvv) {
                        slot.fill(token.as_str(), cvv.clone());
                    }
                    self.after_append(&link, &body).await;
                    (record, false)
                }
                Ok(InsertOutcome::TokenTaken) => {
                    // That candidate's record was encrypted too: count it.
                    self.count_encryptions(tenant.as_str(), &keys, 1).await?;
                    continue;
                }
                Ok(InsertOutcome::Deduplicated(existing)) => {
                    // The index and the record are outside input to the
                    // vault (a database writer can change them): the card
                    // the index points at must be this one, and its
                    // metadata its own, or another card's token would be
                    // handed out for this card.
                    if existing.fingerprint != fingerprint {
                        return Err(Error::DataLoss(
                            "the card index points at a record of another card; it may have been tampered with".into(),
                        ));
                    }
                    self.check_record(&*self.keyring()?, &existing).await?;
                    body.token = existing.token.clone();
                    body.detail = format!("deduplicated to an existing token; {}", body.detail);
                    self.record(body).await.map_err(|e| audit_unavailable(&e))?;
                    // The same card again: its fresh CVV replaces the old one.
                    if let (Some(slot), Some(cvv)) = (cvv_slot.take(), &card.cvv) {
                        slot.fill(&existing.token, cvv.clone());
                    }
                    (existing, true)
                }
                Err(e) => return Err(e),
            };
            let cvv_held = self.cvv.is_held(tenant.as_str(), &rec.token);
            // debug, not info: every operation is already in the audit log,
            // and a log line per request is measurable at thousands per second.
            tracing::debug!(
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
        budget: &dyn TokenizeBudget,
    ) -> Result<Vec<Result<CardMetadata>>> {
        check_batch_size(items.len())?;
        self.check_unsealed()?;
        Ok(join_all(items.into_iter().map(|item| async move {
            match item {
                // Audited as the batch's action, so that a query by action
                // finds every item.
                Ok(card) => {
                    let result = self
                        .tokenize_inner(
                            ctx,
                            AuditAction::TokenizeBatch,
                            tenant,
                            card,
                            opts,
                            budget,
                            "",
                        )
                        .await;
                    self.audit_failure(ctx, AuditAction::TokenizeBatch, tenant.as_str(), result)
                        .await
                }
                Err(e) => {
                    self.audit_rejected(ctx, AuditAction::TokenizeBatch, tenant.as_str(), "", &e)
                        .await;
                    Err(e)
                }
            }
        }))
        .await)
    }

    /// Returns the card behind a token. The token of another tenant is
    /// `NotFound`, exactly like a token that does not exist. The audit
    /// record is durable before the card is returned; if it cannot be
    /// written, the call fails `Unavailable` and the card is wiped.
    pub async fn detokenize(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        token: &Token,
        purpose: &Purpose,
        include_cvv: bool,
    ) -> Result<Card> {
        self.detokenize_as(
            ctx,
            AuditAction::Detokenize,
            tenant,
            token,
            purpose,
            include_cvv,
        )
        .await
    }

    async fn detokenize_as(
        &self,
        ctx: &CallContext,
        action: AuditAction,
        tenant: &Tenant,
        token: &Token,
        purpose: &Purpose,
        include_cvv: bool,
    ) -> Result<Card> {
        let result = match self.keyring() {
            Ok(keyring) => {
                match self.read_card(&keyring, tenant, token).await {
                    // The master key was rotated during the read: keys
                    // wrapped under the new KEK do not unwrap under the old
                    // one. Not tampering; read again with the new keyring.
                    Err(Error::DataLoss(why)) => match self.keyring() {
                        Ok(now) if !Arc::ptr_eq(&now, &keyring) => {
                            self.read_card(&now, tenant, token).await
                        }
                        _ => Err(Error::DataLoss(why)),
                    },
                    read => read,
                }
            }
            Err(e) => Err(e),
        };
        let recorded = token.recorded(holds_a_card(&result));
        let mut body = audit_body(
            ctx,
            action,
            tenant.as_str(),
            &recorded,
            result.as_ref().map(|_| ()),
        );
        body.purpose = purpose.as_str().to_owned();
        if include_cvv {
            body.detail = "cvv requested".into();
        }
        tracing::debug!(
            request_id = %ctx.request_id,
            principal = %ctx.principal,
            tenant = %tenant,
            token = %recorded,
            purpose = purpose.as_str(),
            include_cvv,
            outcome = %body.outcome,
            "detokenize"
        );
        if let Err(e) = self.record(body).await {
            // Fail closed: `result` (the PAN) is dropped, and wiped, here.
            tracing::error!(request_id = %ctx.request_id, error = %e, "audit append failed; card withheld");
            return Err(audit_unavailable(&e));
        }
        let mut card = result?;
        // Taken only after the audit record is durable, so a failed audit
        // write cannot consume the CVV.
        if include_cvv {
            card.cvv = match self.cvv.take(tenant.as_str(), token.as_str()) {
                Some(c) => CvvOutcome::Returned(c),
                None => CvvOutcome::NotAvailable,
            };
        }
        Ok(card)
    }

    async fn read_card(&self, keyring: &Keyring, tenant: &Tenant, token: &Token) -> Result<Card> {
        let rec = self
            .store
            .get(tenant.as_str(), token.as_str())
            .await?
            .ok_or(Error::NotFound)?;
        let secret = self.open_record(keyring, &rec).await?;
        let pan = Pan::parse(&secret.pan).map_err(|_| integrity("holds an invalid card number"))?;
        let name =
            CardholderName::parse(&secret.name).map_err(|_| integrity("holds an invalid name"))?;
        Ok(Card {
            token: token.clone(),
            brand: pan.brand(),
            pan,
            exp_month: secret.exp_month,
            exp_year: secret.exp_year,
            name,
            cvv: CvvOutcome::NotRequested,
        })
    }

    /// Decrypts a stored record, checking that its clear metadata is its
    /// own (envelope version 2; version 1 did not bind it).
    async fn open_record(&self, keyring: &Keyring, rec: &StoredRecord) -> Result<CardSecret> {
        let kid = envelope::key_id(&rec.envelope).map_err(|_| integrity("is malformed"))?;
        let mut keys = keyring.tenant(&*self.store, &rec.tenant, false).await?;
        if !keys.deks.contains_key(&kid) {
            // Another replica may have rotated since we cached the tenant.
            keyring.invalidate(&rec.tenant);
            keys = keyring.tenant(&*self.store, &rec.tenant, false).await?;
        }
        let dek = keys
            .deks
            .get(&kid)
            .ok_or_else(|| integrity("names a data key version that does not exist"))?;
        envelope::open(dek, &rec.tenant, &rec.token, &meta_of(rec), &rec.envelope)
            .map_err(|_| integrity("failed authentication"))
    }

    /// Checks that a record's clear metadata (what `GetMetadata` shows and
    /// dedupe matches on) is its card's, by opening its envelope; the
    /// decrypted card is wiped at once. A version 1 envelope binds no
    /// metadata and passes; a rewrap rewrites it as version 2.
    async fn check_record(&self, keyring: &Keyring, rec: &StoredRecord) -> Result<()> {
        self.open_record(keyring, rec).await.map(drop)
    }

    /// Detokenizes many tokens; one result (and one audit record) per item,
    /// in order.
    pub async fn detokenize_batch(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        tokens: Vec<Result<Token>>,
        purpose: &Purpose,
        include_cvv: bool,
    ) -> Result<Vec<Result<Card>>> {
        check_batch_size(tokens.len())?;
        self.check_unsealed()?;
        Ok(join_all(tokens.into_iter().map(|t| async move {
            match t {
                Ok(t) => {
                    self.detokenize_as(
                        ctx,
                        AuditAction::DetokenizeBatch,
                        tenant,
                        &t,
                        purpose,
                        include_cvv,
                    )
                    .await
                }
                Err(e) => {
                    self.audit_rejected(ctx, AuditAction::DetokenizeBatch, tenant.as_str(), "", &e)
                        .await;
                    Err(e)
                }
            }
        }))
        .await)
    }

    /// Non-sensitive facts about a token; no decryption. Audited, fail closed.
    pub async fn metadata(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        token: &Token,
    ) -> Result<CardMetadata> {
        let result = match self.keyring() {
            Ok(keyring) => match self.store.get(tenant.as_str(), token.as_str()).await {
                // Shown only if it is the card's own (see `check_record`).
                Ok(Some(rec)) => self.check_record(&keyring, &rec).await.map(|()| rec),
                Ok(None) => Err(Error::NotFound),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let body = audit_body(
            ctx,
            AuditAction::GetMetadata,
            tenant.as_str(),
            &token.recorded(holds_a_card(&result)),
            result.as_ref().map(|_| ()),
        );
        // Metadata returns no card data, so its record is appended (in chain
        // order, failing the call if it cannot be) but not waited on for
        // durability; it reaches disk with the next flush.
        self.record_with(body, false)
            .await
            .map_err(|e| audit_unavailable(&e))?;
        let rec = result?;
        Ok(metadata_of(
            &rec,
            self.cvv.is_held(tenant.as_str(), token.as_str()),
            false,
        ))
    }

    /// Deletes (redacts) a token: the record, its index entry and any held
    /// CVV; the audit record is written in the same transaction. Returns
    /// whether it existed; deleting twice is not an error.
    pub async fn delete(&self, ctx: &CallContext, tenant: &Tenant, token: &Token) -> Result<bool> {
        if let Err(e) = self.keyring() {
            // Sealed: whether a card is under it is unknown, so a digit
            // token is recorded masked (see `Token::recorded`).
            self.audit_rejected(
                ctx,
                AuditAction::DeleteToken,
                tenant.as_str(),
                &token.recorded(false),
                &e,
            )
            .await;
            return Err(e);
        }
        self.cvv.remove(tenant.as_str(), token.as_str());
        // The record is written with the delete, so whether a card is there
        // (for how the token is recorded) is read first; only digit tokens
        // need it.
        let found = token.is_digits()
            && self
                .store
                .get(tenant.as_str(), token.as_str())
                .await?
                .is_some();
        let recorded = token.recorded(found);
        let mut body = audit_body(
            ctx,
            AuditAction::DeleteToken,
            tenant.as_str(),
            &recorded,
            Ok(()),
        );
        self.stamp(&mut body);
        let (deleted, link) = self
            .store
            .delete(tenant.as_str(), token.as_str(), &body)
            .await?;
        // Again: a deduplicating tokenize of the same card may have filled
        // a CVV under this token while the delete was being written.
        self.cvv.remove(tenant.as_str(), token.as_str());
        self.after_append(&link, &body).await;
        tracing::info!(request_id = %ctx.request_id, principal = %ctx.principal, tenant = %tenant, token = %recorded, deleted, "delete");
        Ok(deleted)
    }
}

/// Whether a call's result shows a card stored under its token: found, or
/// found and failing its integrity check (see [`Token::recorded`]).
fn holds_a_card<T>(result: &Result<T>) -> bool {
    matches!(result, Ok(_) | Err(Error::DataLoss(_)))
}

/// Checks the item count of a batch call (1 to [`MAX_BATCH`]); the gRPC
/// layer checks it before it parses any item, the core again.
pub fn check_batch_size(n: usize) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    /// An unsealed vault (random KEK) on a sled store in `dir`.
    async fn unsealed(dir: &std::path::Path) -> Vault {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).unwrap());
        let v = Vault::new(store, VaultConfig::default());
        v.unseal(SecretKey::generate()).await.unwrap();
        v
    }

    /// Records written before the envelope bound the metadata (version 1)
    /// still read, and a rewrap rewrites them as version 2, after which a
    /// changed expiry is refused.
    #[tokio::test]
    async fn records_of_the_earlier_envelope_read_and_migrate_on_rewrap() {
        let dir = tempfile::tempdir().unwrap();
        let v = unsealed(dir.path()).await;
        let (ctx, tenant) = (CallContext::default(), Tenant::parse("a").unwrap());
        let m = v
            .tokenize(
                &ctx,
                &tenant,
                NewCard::sample("4111111111111111"),
                TokenizeOptions::default(),
                &Unmetered,
            )
            .await
            .unwrap();
        let token = Token::parse(&m.token).unwrap();
        // Rewrite the stored record as the earlier code wrote it.
        let rec = v.store.get("a", &m.token).await.unwrap().unwrap();
        let keys = v
            .keyring()
            .unwrap()
            .tenant(&*v.store, "a", false)
            .await
            .unwrap();
        let dek = keys.deks.get(&rec.key_version).unwrap();
        let secret = envelope::open(dek, "a", &m.token, &meta_of(&rec), &rec.envelope).unwrap();
        let mut legacy = rec.clone();
        legacy.envelope = envelope::seal_legacy(dek, rec.key_version, "a", &m.token, &secret);
        assert!(v.store.update(&rec, &legacy).await.unwrap());
        let purpose = crate::fields::Purpose::parse("test").unwrap();
        let card = v
            .detokenize(&ctx, &tenant, &token, &purpose, false)
            .await
            .unwrap();
        assert_eq!(card.pan.expose(), "4111111111111111");
        assert_eq!(
            v.metadata(&ctx, &tenant, &token).await.unwrap().exp_month,
            12
        );

        let (tx, _rx) = tokio::sync::mpsc::channel(64);
        let done = v.rewrap(&ctx, None, tx).await.unwrap();
        assert_eq!((done.total, done.done), (1, 1));
        let migrated = v.store.get("a", &m.token).await.unwrap().unwrap();
        assert_eq!(
            envelope::version(&migrated.envelope),
            Ok(envelope::ENVELOPE_VERSION)
        );
        let mut forged = migrated.clone();
        forged.exp_month = 1;
        assert!(v.store.update(&migrated, &forged).await.unwrap());
        assert!(matches!(
            v.metadata(&ctx, &tenant, &token).await,
            Err(Error::DataLoss(_))
        ));
    }

    /// A candidate token that turns out to be another card's must leave
    /// that card's CVV alone: the new card's CVV goes only under the token
    /// the store takes as new. (Before, it replaced the other card's CVV,
    /// then wiped it when the candidate was refused.)
    #[tokio::test]
    async fn a_colliding_candidate_token_leaves_the_other_cards_cvv_alone() {
        let dir = tempfile::tempdir().unwrap();
        let v = unsealed(dir.path()).await;
        let (ctx, tenant) = (CallContext::default(), Tenant::parse("a").unwrap());
        let card = |pan: &str, code: &str| {
            let mut card = NewCard::sample(pan);
            card.cvv = Some(Cvv::parse(code, card.pan.brand()).unwrap());
            card
        };
        let opts = TokenizeOptions::default();
        let first = v
            .tokenize(
                &ctx,
                &tenant,
                card("4111111111111111", "111"),
                opts,
                &Unmetered,
            )
            .await
            .unwrap();
        // The next tokenize's first candidate is the first card's token.
        crate::token::FORCED_TOKENS.with(|f| f.borrow_mut().push(first.token.clone()));
        let second = v
            .tokenize(
                &ctx,
                &tenant,
                card("5555555555554444", "222"),
                opts,
                &Unmetered,
            )
            .await
            .unwrap();
        assert_ne!(second.token, first.token);
        // Three records were encrypted (the refused candidate's too).
        let keys = v.keyring().unwrap();
        let keys = keys.tenant(&*v.store, "a", false).await.unwrap();
        assert_eq!(keys.active_encryptions.own.load(Ordering::Relaxed), 3);
        let purpose = Purpose::parse("authorization").unwrap();
        let cvv_of = |token: &str| {
            let token = Token::parse(token).unwrap();
            let (v, ctx, tenant, purpose) = (&v, &ctx, &tenant, &purpose);
            async move {
                let card = v
                    .detokenize(ctx, tenant, &token, purpose, true)
                    .await
                    .unwrap();
                match card.cvv {
                    CvvOutcome::Returned(c) => c.expose().to_owned(),
                    _ => "none".to_owned(),
                }
            }
        };
        assert_eq!(cvv_of(&first.token).await, "111");
        assert_eq!(cvv_of(&second.token).await, "222");
        assert!(v.cvv_holder().is_empty());
    }

    /// A short card number shows at most its first four and last four
    /// digits: metadata keeps only the first four, and a token that keeps
    /// the BIN (first six) is refused, naming the field.
    #[tokio::test]
    async fn short_card_numbers_keep_four_digits_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let v = unsealed(dir.path()).await;
        let (ctx, tenant) = (CallContext::default(), Tenant::parse("a").unwrap());
        let card = NewCard::sample;
        // 12 digits, Luhn-valid.
        let short = crate::card::with_check_digit("50180000001");
        let keep_bin = TokenizeOptions {
            format: TokenFormat::FormatPreserving { keep_bin: true },
            dedupe: false,
        };
        let err = v
            .tokenize(&ctx, &tenant, card(&short), keep_bin, &Unmetered)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::invalid(
                "format",
                "keeping the BIN needs a card number of at least 15 digits"
            )
        );
        let fp = TokenizeOptions {
            format: TokenFormat::FormatPreserving { keep_bin: false },
            dedupe: false,
        };
        let m = v
            .tokenize(&ctx, &tenant, card(&short), fp, &Unmetered)
            .await
            .unwrap();
        assert_eq!(
            (m.bin.as_str(), m.last4.as_str()),
            (&short[..4], &short[8..])
        );
        // 15 digits and more: the BIN is shown and may be kept.
        let amex = "378282246310005";
        let m = v
            .tokenize(&ctx, &tenant, card(amex), keep_bin, &Unmetered)
            .await
            .unwrap();
        assert_eq!(m.bin, "378282");
        assert!(m.token.starts_with("378282") && m.token.ends_with("0005"));
    }
}
