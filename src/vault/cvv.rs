//! The memory-only CVV holder.
//!
//! Card-brand rules forbid storing a security code after authorisation, and
//! the breach this project answers leaked CVVs from a database. So a CVV is
//! never written anywhere: it sits in this map for a short TTL, is returned
//! at most once, and is wiped (zeroized) on read, expiry, delete and
//! shutdown. A restart forgets every CVV; that is the intended behaviour.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::card::Cvv;
use crate::error::{Error, Result};
use crate::sync::Recover;

/// Longest TTL the holder accepts; payment flows read the CVV within seconds.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

struct Entry {
    cvv: Cvv,
    expires_at: Instant,
}

/// What the holder's lock guards.
#[derive(Default)]
struct Held {
    /// Entries by `(tenant, token)`.
    entries: HashMap<(String, String), Entry>,
    /// Places promised to tokenize calls whose token is not written yet
    /// (see [`CvvHolder::reserve`]); they count against the capacity.
    reserved: usize,
    /// Entries plus reserved places per tenant, for the per-tenant quota.
    per_tenant: HashMap<String, usize>,
    /// Bumped by every [`CvvHolder::clear`] (seal, shutdown): a place
    /// reserved before it is not filled after it, so a tokenize that was
    /// under way when the vault sealed cannot leave a CVV behind for the
    /// next unseal.
    epoch: u64,
}

/// Bounded, expiring, single-read store of CVVs keyed by (tenant, token).
pub struct CvvHolder {
    /// A `Mutex` is enough: every operation is a short map access with no I/O.
    held: Mutex<Held>,
    /// How long a CVV stays readable.
    ttl: Duration,
    /// Upper bound on held CVVs, so a flood of tokenize calls cannot exhaust memory.
    max_entries: usize,
    /// Upper bound per tenant, so one tenant's traffic cannot fill the
    /// holder and refuse every other tenant's CVVs.
    max_per_tenant: usize,
}

impl Held {
    fn count(&self, tenant: &str) -> usize {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }

    fn add(&mut self, tenant: &str) {
        *self.per_tenant.entry(tenant.to_owned()).or_default() += 1;
    }

    fn sub(&mut self, tenant: &str) {
        if let Some(n) = self.per_tenant.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }

    /// Removes one entry, keeping the tenant's count.
    fn remove(&mut self, key: &(String, String)) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.sub(&key.0);
        Some(e)
    }

    /// Wipes expired entries; returns how many.
    fn purge(&mut self, now: Instant) -> usize {
        let expired: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.remove(k);
        }
        expired.len()
    }
}

impl CvvHolder {
    /// A holder with the given TTL (clamped to [`MAX_TTL`]), capacity and
    /// capacity per tenant.
    pub fn new(ttl: Duration, max_entries: usize, max_per_tenant: usize) -> Self {
        CvvHolder {
            held: Mutex::new(Held::default()),
            ttl: ttl.min(MAX_TTL),
            max_entries,
            max_per_tenant,
        }
    }

    /// The effective TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock cannot leave a half-written entry
        // (all updates are single map operations), so poisoning is ignored.
        self.held.lock().recover()
    }

    /// Whether one more entry of `tenant` fits, after dropping expired
    /// ones if not; the error says which limit is reached.
    fn room(&self, held: &mut Held, tenant: &str) -> Result<()> {
        let full = |h: &Held| {
            h.entries.len() + h.reserved >= self.max_entries
                || h.count(tenant) >= self.max_per_tenant
        };
        if full(held) {
            held.purge(Instant::now());
        }
        if held.entries.len() + held.reserved >= self.max_entries {
            return Err(Error::ResourceExhausted(
                "CVV holder is full; retry later or tokenize without cvv".into(),
            ));
        }
        if held.count(tenant) >= self.max_per_tenant {
            return Err(Error::ResourceExhausted(
                "this tenant's share of the CVV holder is full; retry later or tokenize without cvv".into(),
            ));
        }
        Ok(())
    }

    /// Holds `cvv` for the token, replacing (and wiping) any earlier one.
    /// Fails with `RESOURCE_EXHAUSTED` when the holder, or the tenant's
    /// share of it, is full of live entries.
    pub fn put(&self, tenant: &str, token: &str, cvv: Cvv) -> Result<()> {
        let mut held = self.lock();
        let key = (tenant.to_owned(), token.to_owned());
        if !held.entries.contains_key(&key) {
            self.room(&mut held, tenant)?;
            held.add(tenant);
        }
        held.entries.insert(key, self.entry(cvv));
        Ok(())
    }

    /// Promises a place for one CVV whose token is not known yet.
    ///
    /// Tokenize reserves before it writes the record (so a full holder
    /// fails the call before a token exists) and fills the place only
    /// once the store has taken the token as new: putting the CVV under a
    /// candidate token first would, when that token turns out to be taken
    /// by another card, replace that card's CVV. Dropping the reservation
    /// unfilled gives the place back. Fails with `RESOURCE_EXHAUSTED`
    /// when the holder, or the tenant's share of it, is full.
    pub fn reserve(&self, tenant: &str) -> Result<Reservation<'_>> {
        let mut held = self.lock();
        self.room(&mut held, tenant)?;
        held.reserved += 1;
        held.add(tenant);
        Ok(Reservation {
            holder: self,
            tenant: tenant.to_owned(),
            epoch: held.epoch,
        })
    }

    fn entry(&self, cvv: Cvv) -> Entry {
        Entry {
            cvv,
            expires_at: Instant::now() + self.ttl,
        }
    }

    /// Removes and returns the CVV if it is still live. A second call returns `None`.
    pub fn take(&self, tenant: &str, token: &str) -> Option<Cvv> {
        let entry = self.lock().remove(&(tenant.to_owned(), token.to_owned()))?;
        (entry.expires_at > Instant::now()).then_some(entry.cvv)
    }

    /// Whether a live CVV is held for the token.
    pub fn is_held(&self, tenant: &str, token: &str) -> bool {
        self.lock()
            .entries
            .get(&(tenant.to_owned(), token.to_owned()))
            .is_some_and(|e| e.expires_at > Instant::now())
    }

    /// Wipes the CVV for a token, if any (used by delete).
    pub fn remove(&self, tenant: &str, token: &str) {
        self.lock().remove(&(tenant.to_owned(), token.to_owned()));
    }

    /// Wipes every expired entry; returns how many were removed. Called
    /// periodically so expired CVVs do not linger in memory until read.
    pub fn purge_expired(&self) -> usize {
        self.lock().purge(Instant::now())
    }

    /// Wipes everything (seal, shutdown), and what reserved places would
    /// still bring.
    pub fn clear(&self) {
        let mut held = self.lock();
        let keys: Vec<(String, String)> = held.entries.keys().cloned().collect();
        for k in &keys {
            held.remove(k);
        }
        held.epoch += 1;
    }

    /// Number of entries held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A place in the holder promised by [`CvvHolder::reserve`].
pub struct Reservation<'a> {
    /// Where the place is.
    holder: &'a CvvHolder,
    /// Whose place it is (counted against that tenant's quota).
    tenant: String,
    /// The holder's epoch when the place was promised.
    epoch: u64,
}

impl Reservation<'_> {
    /// Holds `cvv` for the token in the reserved place, replacing (and
    /// wiping) any earlier one for that token; never fails for capacity.
    /// If the holder was cleared since the place was reserved (the vault
    /// sealed meanwhile), `cvv` is wiped instead of held.
    pub fn fill(self, token: &str, cvv: Cvv) {
        let mut held = self.holder.lock();
        if held.epoch != self.epoch {
            return;
        }
        let entry = self.holder.entry(cvv);
        let key = (self.tenant.clone(), token.to_owned());
        if held.entries.insert(key, entry).is_none() {
            held.add(&self.tenant);
        }
        // `drop` gives the reserved place back, now that the entry has it.
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut held = self.holder.lock();
        held.reserved = held.reserved.saturating_sub(1);
        held.sub(&self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Brand;

    fn cvv(s: &str) -> Cvv {
        Cvv::parse(s, Brand::Visa).unwrap()
    }

    #[test]
    fn single_read() {
        let h = CvvHolder::new(Duration::from_secs(60), 10, 10);
        h.put("t", "tok", cvv("123")).unwrap();
        assert!(h.is_held("t", "tok"));
        assert_eq!(h.take("t", "tok").unwrap().expose(), "123");
        assert!(h.take("t", "tok").is_none());
        assert!(!h.is_held("t", "tok"));
    }

    #[test]
    fn tenant_is_part_of_the_key() {
        let h = CvvHolder::new(Duration::from_secs(60), 10, 10);
        h.put("a", "tok", cvv("123")).unwrap();
        assert!(h.take("b", "tok").is_none());
        assert!(h.take("a", "tok").is_some());
    }

    #[test]
    fn expiry() {
        let h = CvvHolder::new(Duration::from_millis(30), 10, 10);
        h.put("t", "tok", cvv("123")).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.is_held("t", "tok"));
        assert_eq!(h.purge_expired(), 1);
        assert!(h.take("t", "tok").is_none());
    }

    #[test]
    fn bounded() {
        let h = CvvHolder::new(Duration::from_secs(60), 2, 2);
        h.put("t", "a", cvv("111")).unwrap();
        h.put("t", "b", cvv("222")).unwrap();
        assert!(matches!(
            h.put("t", "c", cvv("333")),
            Err(Error::ResourceExhausted(_))
        ));
        // Replacing an existing entry is allowed when full.
        h.put("t", "a", cvv("444")).unwrap();
        h.remove("t", "b");
        h.put("t", "c", cvv("333")).unwrap();
        h.clear();
        assert!(h.is_empty());
    }

    #[test]
    fn reservations_count_against_capacity_until_filled_or_dropped() {
        let h = CvvHolder::new(Duration::from_secs(60), 2, 2);
        let a = h.reserve("t").unwrap();
        h.put("t", "x", cvv("111")).unwrap();
        // One place reserved, one held: full for new tokens and reservations.
        assert!(matches!(h.reserve("t"), Err(Error::ResourceExhausted(_))));
        assert!(matches!(
            h.put("t", "y", cvv("222")),
            Err(Error::ResourceExhausted(_))
        ));
        a.fill("z", cvv("333"));
        assert_eq!(h.len(), 2);
        assert_eq!(h.take("t", "z").unwrap().expose(), "333");
        // A dropped reservation gives its place back.
        drop(h.reserve("t").unwrap());
        let b = h.reserve("t").unwrap();
        assert!(matches!(h.reserve("t"), Err(Error::ResourceExhausted(_))));
        drop(b);
        h.put("t", "y", cvv("222")).unwrap();
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn an_unfilled_reservation_leaves_existing_cvvs_alone() {
        let h = CvvHolder::new(Duration::from_secs(60), 10, 10);
        h.put("t", "tok", cvv("111")).unwrap();
        drop(h.reserve("t").unwrap());
        assert_eq!(h.take("t", "tok").unwrap().expose(), "111");
    }

    /// A tokenize under way when the vault seals fills its place after the
    /// seal cleared the holder: the CVV must not outlive the seal (it would
    /// be readable again after the next unseal, within its TTL).
    #[test]
    fn a_place_reserved_before_a_clear_is_not_filled_after_it() {
        let h = CvvHolder::new(Duration::from_secs(60), 2, 2);
        let before = h.reserve("t").unwrap();
        h.clear();
        before.fill("tok", cvv("111"));
        assert!(!h.is_held("t", "tok") && h.is_empty());
        // Its place is given back, and places reserved after work.
        let after = h.reserve("t").unwrap();
        h.reserve("t").unwrap().fill("b", cvv("222"));
        after.fill("a", cvv("333"));
        assert_eq!(h.len(), 2);
    }

    /// One tenant at full speed fills its own share, not the holder: the
    /// others' CVVs still fit, and a tenant's places come back as its
    /// entries are read, removed, expire or are wiped.
    #[test]
    fn one_tenant_cannot_fill_the_holder_for_the_others() {
        let h = CvvHolder::new(Duration::from_secs(60), 10, 3);
        for tok in ["a", "b"] {
            h.put("busy", tok, cvv("111")).unwrap();
        }
        let r = h.reserve("busy").unwrap();
        let err = h.put("busy", "c", cvv("111")).unwrap_err();
        assert!(
            matches!(&err, Error::ResourceExhausted(m) if m.contains("tenant")),
            "{err:?}"
        );
        assert!(h.reserve("busy").is_err());
        // Replacing its own entry still works; other tenants are unaffected.
        h.put("busy", "a", cvv("222")).unwrap();
        for t in ["x", "y", "z"] {
            h.put(t, "tok", cvv("333")).unwrap();
            h.reserve(t).unwrap().fill("tok2", cvv("444"));
        }
        // Places come back.
        drop(r);
        h.reserve("busy").unwrap().fill("c", cvv("555"));
        assert!(h.put("busy", "d", cvv("111")).is_err());
        h.take("busy", "a").unwrap();
        h.put("busy", "d", cvv("111")).unwrap();
        h.remove("busy", "b");
        h.clear();
        for tok in ["a", "b", "c"] {
            h.put("busy", tok, cvv("111")).unwrap();
        }
        let short = CvvHolder::new(Duration::from_millis(20), 10, 1);
        short.put("t", "a", cvv("111")).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        short.put("t", "b", cvv("111")).unwrap();
    }

    #[test]
    fn ttl_is_clamped() {
        let h = CvvHolder::new(Duration::from_secs(10 * 3600), 1, 1);
        assert_eq!(h.ttl(), MAX_TTL);
    }
}
