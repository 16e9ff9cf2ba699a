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

/// Bounded, expiring, single-read store of CVVs keyed by (tenant, token).
pub struct CvvHolder {
    /// Entries by `(tenant, token)`. A `Mutex` is enough: every operation is a
    /// short map access with no I/O.
    entries: Mutex<HashMap<(String, String), Entry>>,
    /// How long a CVV stays readable.
    ttl: Duration,
    /// Upper bound on held CVVs, so a flood of tokenize calls cannot exhaust memory.
    max_entries: usize,
}

impl CvvHolder {
    /// A holder with the given TTL (clamped to [`MAX_TTL`]) and capacity.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        CvvHolder {
            entries: Mutex::new(HashMap::new()),
            ttl: ttl.min(MAX_TTL),
            max_entries,
        }
    }

    /// The effective TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        // A panic while holding the lock cannot leave a half-written entry
        // (all updates are single map operations), so poisoning is ignored.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `cvv` for the token, replacing (and wiping) any earlier one.
    /// Fails with `RESOURCE_EXHAUSTED` when the holder is full of live entries.
    pub fn put(&self, tenant: &str, token: &str, cvv: Cvv) -> Result<()> {
        let now = Instant::now();
        let mut map = self.lock();
        let key = (tenant.to_owned(), token.to_owned());
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            map.retain(|_, e| e.expires_at > now);
            if map.len() >= self.max_entries {
                return Err(Error::ResourceExhausted(
                    "CVV holder is full; retry later or tokenize without cvv".into(),
                ));
            }
        }
        map.insert(
            key,
            Entry {
                cvv,
                expires_at: now + self.ttl,
            },
        );
        Ok(())
    }

    /// Removes and returns the CVV if it is still live. A second call returns `None`.
    pub fn take(&self, tenant: &str, token: &str) -> Option<Cvv> {
        let entry = self.lock().remove(&(tenant.to_owned(), token.to_owned()))?;
        (entry.expires_at > Instant::now()).then_some(entry.cvv)
    }

    /// Whether a live CVV is held for the token.
    pub fn is_held(&self, tenant: &str, token: &str) -> bool {
        self.lock()
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
        let now = Instant::now();
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| e.expires_at > now);
        before - map.len()
    }

    /// Wipes everything (seal, shutdown).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Number of entries held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn ttl_is_clamped() {
        let h = CvvHolder::new(Duration::from_secs(10 * 3600), 1);
        assert_eq!(h.ttl(), MAX_TTL);
    }
}
