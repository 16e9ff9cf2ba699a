//! The enumeration guard: a merchant identity must not be able to recover
//! a card number from a token by tokenizing candidates.
//!
//! Metadata shows a card's first six (or four) and last four digits, so a
//! stored card is one of about 100,000 Luhn-valid candidates (10,000 for a
//! 15-digit card). Tokenizing a candidate answers with its fingerprint, and
//! with `dedupe` with `existing` and the stored token: equality singles out
//! the card. Those answers stay (see `docs/security.md`), so what bounds the
//! attack is how many candidates anyone may try:
//!
//! * Per tenant and **bucket** (the digits a merchant can see: first
//!   digits, last four, length), the distinct cards tokenized in a window
//!   are counted. Past [`GuardConfig::threshold`] the bucket **locks** for
//!   the rest of the window, and while it is locked *every* tokenize into
//!   it gets the same refusal, the stored card's included: a refusal that
//!   spared the stored card would itself be the oracle.
//! * Across buckets, each card that is new to a bucket that already holds
//!   another card (a **collision**, which is what a guess is) is charged to
//!   the caller's [`TokenizeBudget`].
//!
//! The state lives in the store ([`Store::guard_swap`]), so it holds across
//! restarts and across replicas. A bucket's first card writes none: the
//! store indexes each card under its bucket ([`Store::bucket_card`]), and
//! the state is written from the second card on, starting from the first. Bucket ids are keyed (HMAC under the
//! tenant's fingerprint key), so the store learns no digits from them.
//!
//! [`Store::guard_swap`]: crate::store::Store::guard_swap
//! [`Store::bucket_card`]: crate::store::Store::bucket_card

use crate::audit::AuditAction;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;

use super::{CallContext, TokenizeBudget, Vault, audit_body, now_ms};
use crate::card::Pan;
use crate::crypto::fingerprint::FingerprintKey;
use crate::error::{Error, Result};
use crate::fields::Tenant;

/// Default [`GuardConfig::window`]: one hour.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);
/// Default [`GuardConfig::threshold`]: 8 distinct cards per bucket and
/// window. A legitimate bucket reaches 9 in an hour only when a tenant
/// sees about 10,000 distinct cards an hour of one BIN and length (see
/// `docs/security.md`), and an attacker gets at most 8 guesses a card.
pub const DEFAULT_THRESHOLD: u32 = 8;
/// Bytes of a bucket id.
pub const BUCKET_LEN: usize = 16;
/// Bytes of a card's tag in the state: a prefix of its keyed fingerprint.
const TAG_LEN: usize = 8;
/// Cards remembered per bucket to tell a returning card from a new one;
/// past this a bucket is *crowded* and every card not remembered counts as
/// a collision.
const RESIDENT_CAP: usize = 16;
/// Attempts at the compare-and-swap before giving up (each failure means
/// another tokenize into the same bucket won the race).
const SWAP_ATTEMPTS: usize = 32;

/// Guard settings (config `[enumeration_guard]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// Length of a bucket's counting window; a locked bucket stays locked
    /// until its window ends.
    pub window: Duration,
    /// Most distinct cards per bucket and window; the next one locks it.
    pub threshold: u32,
}

impl GuardConfig {
    /// The window in ms, saturating (the config bounds it far below).
    fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX)
    }
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            window: DEFAULT_WINDOW,
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

/// A bucket's id: keyed, so it shows no digits. Written as 32 letters
/// `a`-`p` (hex with other symbols), so that neither logs nor PAN scanners
/// read digits into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketId(pub [u8; BUCKET_LEN]);

impl BucketId {
    /// The bucket of a card in a tenant: what a merchant can see of it.
    pub fn of(key: &FingerprintKey, pan: &Pan) -> BucketId {
        // ':' never occurs in card digits, so this input is never a PAN's.
        let input = format!("bucket:{}:{}:{}", pan.shown_head(), pan.last4(), pan.len());
        let mac = key.fingerprint(&input);
        let mut id = [0u8; BUCKET_LEN];
        id.copy_from_slice(&mac[..BUCKET_LEN]);
        BucketId(id)
    }

    /// Parses the written form (field `bucket`).
    pub fn parse(text: &str) -> Result<BucketId> {
        let bad = || Error::invalid("bucket", "must be 32 letters a-p, as the refusal names it");
        let text = text.trim().as_bytes();
        if text.len() != 2 * BUCKET_LEN {
            return Err(bad());
        }
        let mut id = [0u8; BUCKET_LEN];
        for (i, pair) in text.chunks(2).enumerate() {
            let nibble = |c: u8| match c {
                b'a'..=b'p' => Ok(c - b'a'),
                _ => Err(bad()),
            };
            id[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(BucketId(id))
    }
}

impl fmt::Display for BucketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(
                f,
                "{}{}",
                char::from(b'a' + (b >> 4)),
                char::from(b'a' + (b & 15))
            )?;
        }
        Ok(())
    }
}

/// A bucket's stored state.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GuardState {
    /// Start of the current window, ms since the epoch.
    #[prost(int64, tag = "1")]
    pub window_start_ms: i64,
    /// Tags of the distinct cards seen in the window, concatenated.
    #[prost(bytes = "vec", tag = "2")]
    pub window: Vec<u8>,
    /// Locked until the window ends.
    #[prost(bool, tag = "3")]
    pub locked: bool,
    /// Tags of cards ever seen in the bucket (up to [`RESIDENT_CAP`]).
    #[prost(bytes = "vec", tag = "4")]
    pub residents: Vec<u8>,
    /// More cards than [`RESIDENT_CAP`] were seen.
    #[prost(bool, tag = "5")]
    pub crowded: bool,
}

/// A card's tag: the first bytes of its keyed fingerprint (zeroes for
/// a stored fingerprint too short, which only a database writer makes).
fn tag_of(fingerprint: &[u8]) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    if let Some(head) = fingerprint.get(..TAG_LEN) {
        tag.copy_from_slice(head);
    }
    tag
}

fn holds(tags: &[u8], tag: &[u8; TAG_LEN]) -> bool {
    tags.chunks_exact(TAG_LEN).any(|t| t == tag)
}

/// What the guard says of one card.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Already seen in this window: allowed, nothing to write.
    Seen,
    /// New in this window: allowed once `next` is written; `collision` if
    /// the bucket already held another card.
    New {
        /// Whether to charge the caller's collision budget.
        collision: bool,
        /// The state to write.
        next: GuardState,
    },
    /// Refused until `until_ms`; `lock` is the state to write if this card
    /// is the one that locks the bucket.
    Locked {
        /// End of the window.
        until_ms: i64,
        /// The locked state, when this call locks the bucket.
        lock: Option<GuardState>,
    },
}

/// The guard's rule, without I/O: `state` is the bucket's stored state,
/// `tag` the card's.
pub(crate) fn decide(
    state: Option<GuardState>,
    tag: &[u8; TAG_LEN],
    now_ms: i64,
    cfg: &GuardConfig,
) -> Verdict {
    let window_ms = cfg.window_ms();
    let mut st = state.unwrap_or_default();
    if now_ms >= st.window_start_ms.saturating_add(window_ms) || now_ms < st.window_start_ms {
        // A new window (or a clock that went back): counting starts over.
        st.window_start_ms = now_ms;
        st.window.clear();
        st.locked = false;
    }
    let until_ms = st.window_start_ms.saturating_add(window_ms);
    if st.locked {
        return Verdict::Locked {
            until_ms,
            lock: None,
        };
    }
    if holds(&st.window, tag) {
        return Verdict::Seen;
    }
    if st.window.len() / TAG_LEN >= cfg.threshold as usize {
        st.locked = true;
        return Verdict::Locked {
            until_ms,
            lock: Some(st),
        };
    }
    let resident = holds(&st.residents, tag);
    let collision = !resident && (st.crowded || !st.residents.is_empty());
    st.window.extend_from_slice(tag);
    if !resident {
        if st.residents.len() / TAG_LEN < RESIDENT_CAP {
            st.residents.extend_from_slice(tag);
        } else {
            st.crowded = true;
        }
    }
    Verdict::New {
        collision,
        next: st,
    }
}

/// The state a bucket without stored state has when the store already
/// holds a card of that bucket, tagged `tag` (see [`Store::bucket_card`]): a
/// bucket's first card writes no state, its index entry is the mark. It
/// is a resident, and in the window if it was stored within it.
///
/// [`Store::bucket_card`]: crate::store::Store::bucket_card
pub(crate) fn first_card_state(
    tag: &[u8; TAG_LEN],
    created_at_ms: i64,
    now_ms: i64,
    cfg: &GuardConfig,
) -> GuardState {
    let window_ms = cfg.window_ms();
    let recent = created_at_ms <= now_ms && now_ms - created_at_ms < window_ms;
    GuardState {
        window_start_ms: if recent { created_at_ms } else { now_ms },
        window: if recent { tag.to_vec() } else { Vec::new() },
        locked: false,
        residents: tag.to_vec(),
        crowded: false,
    }
}

/// The refusal every tokenize into a locked bucket gets: the same text for
/// every card in it, so it tells none of them apart.
fn locked_error(bucket: &BucketId, until_ms: i64) -> Error {
    Error::ResourceExhausted(format!(
        "tokenize refused by the enumeration guard: too many different cards with the same first and last digits were tokenized in this tenant recently (bucket {bucket}); retry after {}",
        crate::time::rfc3339(until_ms)
    ))
}

impl Vault {
    /// Runs the guard for one card about to be tokenized: refuses it if
    /// its bucket is locked (or locks now), asks `budget` otherwise, and
    /// records the card in the bucket. Returns the bucket, which the
    /// record is indexed under.
    ///
    /// A bucket's first card writes no state: the store indexes it under
    /// its bucket, and the next card into the bucket finds it there
    /// ([`first_card_state`]). So the guard costs a card of an empty bucket
    /// (most new cards) two lookups the key filter answers, and no write.
    pub(crate) async fn check_enumeration(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        key: &FingerprintKey,
        pan: &Pan,
        fingerprint: &[u8],
        budget: &dyn TokenizeBudget,
    ) -> Result<BucketId> {
        let cfg = &self.config.guard;
        let bucket = BucketId::of(key, pan);
        let tag = tag_of(fingerprint);
        let mut admitted = false;
        // The budget's refusal applies to every card alike (never its
        // charge): a refusal must not depend on the card.
        let admit = |admitted: bool, collision: bool| match admitted {
            true => Ok(()),
            false => budget.admit(collision),
        };
        for _ in 0..SWAP_ATTEMPTS {
            let raw = self.store.guard_get(tenant.as_str(), &bucket.0).await?;
            // Undecodable state (only a database writer could make it) is
            // replaced as if absent: refusing the bucket for good would be
            // worse, and such a writer could delete it anyway.
            let mut state = raw.as_deref().and_then(|r| GuardState::decode(r).ok());
            if raw.is_none() {
                match self.store.bucket_card(tenant.as_str(), &bucket.0).await? {
                    Some(first) if first.fingerprint != fingerprint => {
                        let first_tag = tag_of(&first.fingerprint);
                        state = Some(first_card_state(
                            &first_tag,
                            first.created_at_ms,
                            now_ms(),
                            cfg,
                        ));
                    }
                    // The bucket's first card, or its only card again:
                    // nothing to count or write.
                    _ => return admit(admitted, false).map(|()| bucket),
                }
            }
            match decide(state, &tag, now_ms(), cfg) {
                Verdict::Seen => return admit(admitted, false).map(|()| bucket),
                Verdict::New { collision, next } => {
                    admit(admitted, collision)?;
                    admitted = true;
                    let value = next.encode_to_vec();
                    if self
                        .store
                        .guard_swap(tenant.as_str(), &bucket.0, raw.as_deref(), &value, false)
                        .await?
                    {
                        return Ok(bucket);
                    }
                }
                Verdict::Locked { until_ms, lock } => {
                    let Some(lock) = lock else {
                        self.guard_refusals.fetch_add(1, Ordering::Relaxed);
                        return Err(locked_error(&bucket, until_ms));
                    };
                    let value = lock.encode_to_vec();
                    if self
                        .store
                        .guard_swap(tenant.as_str(), &bucket.0, raw.as_deref(), &value, true)
                        .await?
                    {
                        self.on_lock(ctx, tenant, &bucket, until_ms).await;
                        self.guard_refusals.fetch_add(1, Ordering::Relaxed);
                        return Err(locked_error(&bucket, until_ms));
                    }
                }
            }
        }
        Err(Error::Unavailable(
            "the enumeration guard is contended for this card's bucket; retry".into(),
        ))
    }

    /// A bucket just locked: a security event in the log (no digits, the
    /// bucket by its keyed id), a metric and an audit record naming the
    /// principal.
    async fn on_lock(&self, ctx: &CallContext, tenant: &Tenant, bucket: &BucketId, until_ms: i64) {
        self.guard_locks.fetch_add(1, Ordering::Relaxed);
        let until = crate::time::rfc3339(until_ms);
        tracing::warn!(
            security_event = "enumeration_lock",
            request_id = %ctx.request_id,
            principal = %ctx.principal,
            tenant = %tenant,
            bucket = %bucket,
            until = %until,
            "enumeration guard locked a bucket: more distinct cards with the same visible digits than the threshold within the window"
        );
        let mut body = audit_body(
            ctx,
            AuditAction::EnumerationLock,
            tenant.as_str(),
            "",
            Ok(()),
        );
        body.detail = format!(
            "bucket {bucket} locked until {until}: more than {} distinct cards in the window",
            self.config.guard.threshold
        );
        if let Err(e) = self.record(body).await {
            tracing::error!(request_id = %ctx.request_id, error = %e, "audit append failed for an enumeration lock");
        }
    }

    /// Clears the guard state of one bucket of a tenant, or of all its
    /// buckets (admin; audited). Returns how many buckets had state.
    pub async fn clear_enumeration_guard(
        &self,
        ctx: &CallContext,
        tenant: &Tenant,
        bucket: Option<BucketId>,
    ) -> Result<u64> {
        let detail = match &bucket {
            Some(b) => format!("bucket {b}"),
            None => "every bucket".to_owned(),
        };
        let result = self
            .store
            .guard_clear(tenant.as_str(), bucket.as_ref().map(|b| b.0.as_slice()))
            .await;
        let mut body = audit_body(
            ctx,
            AuditAction::ClearEnumerationGuard,
            tenant.as_str(),
            "",
            result.as_ref().map(|_| ()),
        );
        body.detail = detail;
        self.record(body).await?;
        let n = result?;
        tracing::warn!(principal = %ctx.principal, tenant = %tenant, buckets = n, "enumeration guard cleared");
        Ok(n)
    }

    /// Buckets locked since start (metric).
    pub fn enumeration_locks(&self) -> u64 {
        self.guard_locks.load(Ordering::Relaxed)
    }

    /// Tokenizes refused by a locked bucket since start (metric).
    pub fn enumeration_refusals(&self) -> u64 {
        self.guard_refusals.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever state the store holds (only a database writer could
        /// make it odd), deciding never panics and never lets a state
        /// grow past its bounds.
        #[test]
        fn fuzz_any_stored_state_decides_within_bounds(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            tag in proptest::prelude::any::<[u8; TAG_LEN]>(),
            now in proptest::prelude::any::<i64>(),
        ) {
            let state = GuardState::decode(bytes.as_slice()).ok();
            let before = state.as_ref().map_or(0, |s| s.residents.len());
            match decide(state, &tag, now, &cfg()) {
                Verdict::New { next, .. } => {
                    proptest::prop_assert!(next.window.len() <= (cfg().threshold as usize) * TAG_LEN + TAG_LEN);
                    proptest::prop_assert!(next.residents.len() <= (RESIDENT_CAP * TAG_LEN).max(before));
                }
                Verdict::Locked { .. } | Verdict::Seen => {}
            }
        }
    }

    fn cfg() -> GuardConfig {
        GuardConfig {
            window: Duration::from_secs(60),
            threshold: 3,
        }
    }

    /// Applies a verdict's write, as the vault does.
    fn step(state: &mut Option<GuardState>, tag: u8, now: i64) -> Verdict {
        let v = decide(state.clone(), &[tag; TAG_LEN], now, &cfg());
        match &v {
            Verdict::New { next, .. } => *state = Some(next.clone()),
            Verdict::Locked { lock: Some(l), .. } => *state = Some(l.clone()),
            _ => {}
        }
        v
    }

    #[test]
    fn a_first_card_found_in_the_store_is_a_resident_and_counts_while_recent() {
        let first = [1; TAG_LEN];
        // Stored 10 s ago: in the 60 s window, so two more cards reach
        // the threshold of 3 and a fourth locks.
        let mut st = Some(first_card_state(&first, 50_000, 60_000, &cfg()));
        assert!(matches!(
            step(&mut st, 2, 60_000),
            Verdict::New {
                collision: true,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 3, 60_000),
            Verdict::New {
                collision: true,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 4, 60_000),
            Verdict::Locked { lock: Some(_), .. }
        ));
        // Stored 2 minutes ago: still a resident (a new card is a
        // collision, the first card is not), but not in this window.
        let mut st = Some(first_card_state(&first, 0, 120_000, &cfg()));
        assert!(matches!(
            step(&mut st, 1, 120_000),
            Verdict::New {
                collision: false,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 2, 120_000),
            Verdict::New {
                collision: true,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 3, 120_000),
            Verdict::New {
                collision: true,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 4, 120_000),
            Verdict::Locked { lock: Some(_), .. }
        ));
        // A creation time in the future (a clock that went back) is not
        // trusted to open the window.
        let st = first_card_state(&first, 200_000, 120_000, &cfg());
        assert!(st.window.is_empty() && st.window_start_ms == 120_000);
    }

    #[test]
    fn a_bucket_locks_past_the_threshold_for_every_card_until_the_window_ends() {
        let mut st = None;
        assert!(matches!(
            step(&mut st, 1, 0),
            Verdict::New {
                collision: false,
                ..
            }
        ));
        assert_eq!(step(&mut st, 1, 1), Verdict::Seen);
        assert!(matches!(
            step(&mut st, 2, 2),
            Verdict::New {
                collision: true,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 3, 3),
            Verdict::New {
                collision: true,
                ..
            }
        ));
        // The fourth distinct card locks it ...
        assert!(matches!(
            step(&mut st, 4, 4),
            Verdict::Locked {
                until_ms: 60_000,
                lock: Some(_)
            }
        ));
        // ... and then every card is refused alike, the first one included.
        for tag in [1, 2, 3, 4, 5] {
            assert_eq!(
                step(&mut st, tag, 5),
                Verdict::Locked {
                    until_ms: 60_000,
                    lock: None
                }
            );
        }
        // A new window: counting starts over; cards seen before are residents.
        assert!(matches!(
            step(&mut st, 2, 60_000),
            Verdict::New {
                collision: false,
                ..
            }
        ));
        assert!(matches!(
            step(&mut st, 9, 60_001),
            Verdict::New {
                collision: true,
                ..
            }
        ));
    }

    #[test]
    fn a_crowded_bucket_counts_every_card_it_does_not_remember_as_a_collision() {
        let mut st = None;
        let cfg = GuardConfig {
            window: Duration::from_secs(1),
            threshold: 100,
        };
        for tag in 0..RESIDENT_CAP as u8 {
            let v = decide(st.clone(), &[tag; TAG_LEN], i64::from(tag) * 1000, &cfg);
            let Verdict::New { next, .. } = v else {
                panic!("{v:?}")
            };
            st = Some(next);
        }
        let v = decide(st.clone(), &[200; TAG_LEN], 100_000, &cfg);
        let Verdict::New {
            collision: true,
            next,
        } = v
        else {
            panic!("{v:?}")
        };
        assert!(next.crowded);
        // A remembered card is not a collision.
        let v = decide(Some(next), &[3; TAG_LEN], 200_000, &cfg);
        assert!(matches!(
            v,
            Verdict::New {
                collision: false,
                ..
            }
        ));
    }

    #[test]
    fn bucket_ids_are_written_without_digits_and_read_back() {
        let id = BucketId([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 0xff, 1, 2, 3, 4, 5, 6,
        ]);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert!(text.chars().all(|c| ('a'..='p').contains(&c)), "{text}");
        assert_eq!(BucketId::parse(&text).unwrap(), id);
        for bad in ["", "abc", &"q".repeat(32), &"0".repeat(32)] {
            assert!(matches!(
                BucketId::parse(bad),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }

    #[test]
    fn buckets_are_the_visible_digits_under_the_tenants_key() {
        let key = FingerprintKey::new(&crate::crypto::keys::SecretKey::generate());
        let other = FingerprintKey::new(&crate::crypto::keys::SecretKey::generate());
        let pan = |s: &str| Pan::parse(s).unwrap();
        let a = BucketId::of(&key, &pan("4111111111111111"));
        // Same first six, last four and length: same bucket.
        assert_eq!(a, BucketId::of(&key, &pan("4111110000091111")));
        assert_ne!(a, BucketId::of(&key, &pan("4111111111111129")));
        assert_ne!(a, BucketId::of(&other, &pan("4111111111111111")));
    }
}
