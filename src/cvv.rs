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
}

impl CvvHolder {
    /// A holder with the given TTL (clamped to [`MAX_TTL`]) and capacity.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        CvvHolder {
            held: Mutex::new(Held::default()),
            ttl: ttl.min(MAX_TTL),
            max_entries,
        }
    }

    /// The effective TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock cannot leave a half-written entry
        // (all updates are single map operations), so poisoning is ignored.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether one more entry fits, after dropping expired ones if not.
    fn has_room(&self, held: &mut Held) -> bool {
        if held.entries.len() + held.reserved >= self.max_entries {
            let now = Instant::now();
            held.entries.retain(|_, e| e.expires_at > now);
        }
        held.entries.len() + held.reserved < self.max_entries
    }

    /// Holds `cvv` for the token, replacing (and wiping) any earlier one.
    /// Fails with `RESOURCE_EXHAUSTED` when the holder is full of live entries.
    pub fn put(&self, tenant: &str, token: &str, cvv: Cvv) -> Result<()> {
        let mut held = self.lock();
        let key = (tenant.to_owned(), token.to_owned());
        if !held.entries.contains_key(&key) && !self.has_room(&mut held) {
            return Err(full());
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
    /// when the holder is full.
    pub fn reserve(&self) -> Result<Reservation<'_>> {
        let mut held = self.lock();
        if !self.has_room(&mut held) {
            return Err(full());
        }
        held.reserved += 1;
        Ok(Reservation {
            holder: self,
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
        let entry = self
            .lock()
            .entries
            .remove(&(tenant.to_owned(), token.to_owned()))?;
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
        self.lock()
            .entries
            .remove(&(tenant.to_owned(), token.to_owned()));
    }

    /// Wipes every expired entry; returns how many were removed. Called
    /// periodically so expired CVVs do not linger in memory until read.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let map = &mut self.lock().entries;
        let before = map.len();
        map.retain(|_, e| e.expires_at > now);
        before - map.len()
    }

    /// Wipes everything (seal, shutdown), and what reserved places would
    /// still bring.
    pub fn clear(&self) {
        let mut held = self.lock();
        held.entries.clear();
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

fn full() -> Error {
    Error::ResourceExhausted("CVV holder is full; retry later or tokenize without cvv".into())
}

/// A place in the holder promised by [`CvvHolder::reserve`].
pub struct Reservation<'a> {
    /// Where the place is.
    holder: &'a CvvHolder,
    /// The holder's epoch when the place was promised.
    epoch: u64,
}

impl Reservation<'_> {
    /// Holds `cvv` for the token in the reserved place, replacing (and
    /// wiping) any earlier one for that token; never fails for capacity.
    /// If the holder was cleared since the place was reserved (the vault
    /// sealed meanwhile), `cvv` is wiped instead of held.
    pub fn fill(self, tenant: &str, token: &str, cvv: Cvv) {
        let mut held = self.holder.lock();
        if held.epoch != self.epoch {
            return;
        }
        let entry = self.holder.entry(cvv);
        held.entries
            .insert((tenant.to_owned(), token.to_owned()), entry);
        // `drop` gives the reserved place back, now that the entry has it.
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut held = self.holder.lock();
        held.reserved = held.reserved.saturating_sub(1);
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
        let h = CvvHolder::new(Duration::from_secs(60), 10);
        h.put("t", "tok", cvv("123")).unwrap();
        assert!(h.is_held("t", "tok"));
        assert_eq!(h.take("t", "tok").unwrap().expose(), "123");
        assert!(h.take("t", "tok").is_none());
        assert!(!h.is_held("t", "tok"));
    }

    #[test]
    fn tenant_is_part_of_the_key() {
        let h = CvvHolder::new(Duration::from_secs(60), 10);
        h.put("a", "tok", cvv("123")).unwrap();
        assert!(h.take("b", "tok").is_none());
        assert!(h.take("a", "tok").is_some());
    }

    #[test]
    fn expiry() {
        let h = CvvHolder::new(Duration::from_millis(30), 10);
        h.put("t", "tok", cvv("123")).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.is_held("t", "tok"));
        assert_eq!(h.purge_expired(), 1);
        assert!(h.take("t", "tok").is_none());
    }

    #[test]
    fn bounded() {
        let h = CvvHolder::new(Duration::from_secs(60), 2);
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
        let h = CvvHolder::new(Duration::from_secs(60), 2);
        let a = h.reserve().unwrap();
        h.put("t", "x", cvv("111")).unwrap();
        // One place reserved, one held: full for new tokens and reservations.
        assert!(matches!(h.reserve(), Err(Error::ResourceExhausted(_))));
        assert!(matches!(
            h.put("t", "y", cvv("222")),
            Err(Error::ResourceExhausted(_))
        ));
        a.fill("t", "z", cvv("333"));
        assert_eq!(h.len(), 2);
        assert_eq!(h.take("t", "z").unwrap().expose(), "333");
        // A dropped reservation gives its place back.
        drop(h.reserve().unwrap());
        let b = h.reserve().unwrap();
        assert!(matches!(h.reserve(), Err(Error::ResourceExhausted(_))));
        drop(b);
        h.put("t", "y", cvv("222")).unwrap();
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn an_unfilled_reservation_leaves_existing_cvvs_alone() {
        let h = CvvHolder::new(Duration::from_secs(60), 10);
        h.put("t", "tok", cvv("111")).unwrap();
        drop(h.reserve().unwrap());
        assert_eq!(h.take("t", "tok").unwrap().expose(), "111");
    }

    /// A tokenize under way when the vault seals fills its place after the
    /// seal cleared the holder: the CVV must not outlive the seal (it would
    /// be readable again after the next unseal, within its TTL).
    #[test]
    fn a_place_reserved_before_a_clear_is_not_filled_after_it() {
        let h = CvvHolder::new(Duration::from_secs(60), 2);
        let before = h.reserve().unwrap();
        h.clear();
        before.fill("t", "tok", cvv("111"));
        assert!(!h.is_held("t", "tok") && h.is_empty());
        // Its place is given back, and places reserved after work.
        let after = h.reserve().unwrap();
        h.reserve().unwrap().fill("t", "b", cvv("222"));
        after.fill("t", "a", cvv("333"));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn ttl_is_clamped() {
        let h = CvvHolder::new(Duration::from_secs(10 * 3600), 1);
        assert_eq!(h.ttl(), MAX_TTL);
    }
}
