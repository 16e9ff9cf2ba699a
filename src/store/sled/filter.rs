//! An in-memory filter of the record and fingerprint keys ever written, so
//! that tokenize's two checks ("is this token taken?", "is this card
//! already here?") can skip sled when the answer is certainly no.
//!
//! Why: a new token is almost never taken and a new card has no index
//! entry, yet each check cost a sled read (about 14% of the vault's CPU per
//! tokenize, measured). A Bloom filter answers "certainly absent" or
//! "maybe present"; only the latter still reads sled.
//!
//! * It only ever gains keys. A removed key leaves its bits, which costs a
//!   sled read later (a false positive), never a wrong answer.
//! * It grows in layers: when the newest layer holds its capacity, a layer
//!   twice as large is added, so the false-positive rate stays bounded
//!   (about 1% per layer) without rebuilding.
//! * At open it is filled from sled on a background thread; until that
//!   scan is done, every check reads sled (`ready` is false). Keys written
//!   meanwhile are added by their writers, so the scan only needs the keys
//!   that were there at open.
//! * Hashes are keyed per process (std's `RandomState`), so a client
//!   cannot choose tokens or cards that collide on purpose.

use crate::sync::Recover;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Keys the first layer is sized for.
const FIRST_CAPACITY: u64 = 1 << 20;
/// Bits per key (10 with 7 probes: about 0.8% false positives when full).
const BITS_PER_KEY: u64 = 10;
/// Probes per key.
const PROBES: u64 = 7;

/// One Bloom filter of a fixed size.
struct Layer {
    bits: Vec<AtomicU64>,
    /// Bit count minus one (the bit count is a power of two).
    mask: u64,
    /// Keys added; the layer is full at `capacity`.
    added: AtomicU64,
    capacity: u64,
}

impl Layer {
    fn new(capacity: u64) -> Layer {
        let nbits = (capacity * BITS_PER_KEY).next_power_of_two().max(64);
        Layer {
            bits: (0..nbits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: nbits - 1,
            added: AtomicU64::new(0),
            capacity,
        }
    }

    /// The probed bit positions of a key hashed to `(h1, h2)` (double hashing).
    fn positions(&self, (h1, h2): (u64, u64)) -> impl Iterator<Item = u64> + '_ {
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2 | 1)) & self.mask)
    }

    fn add(&self, h: (u64, u64)) {
        for p in self.positions(h) {
            self.bits[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    fn may_contain(&self, h: (u64, u64)) -> bool {
        self.positions(h)
            .all(|p| self.bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
    }
}

/// The filter: layers, the per-process hash keys, and whether the scan of
/// the keys present at open is complete.
pub(super) struct KeyFilter {
    layers: RwLock<Vec<Layer>>,
    hash: (RandomState, RandomState),
    /// Set (with release ordering) once every key present at open was added.
    ready: AtomicBool,
}

impl KeyFilter {
    /// An empty filter, not yet ready.
    pub(super) fn new() -> KeyFilter {
        KeyFilter {
            layers: RwLock::new(vec![Layer::new(FIRST_CAPACITY)]),
            hash: (RandomState::new(), RandomState::new()),
            ready: AtomicBool::new(false),
        }
    }

    fn hashes(&self, tree: u8, key: &[u8]) -> (u64, u64) {
        let one = |s: &RandomState| {
            let mut h = s.build_hasher();
            h.write_u8(tree);
            h.write(key);
            h.finish()
        };
        (one(&self.hash.0), one(&self.hash.1))
    }

    /// Adds a key of tree number `tree`.
    pub(super) fn add(&self, tree: u8, key: &[u8]) {
        let h = self.hashes(tree, key);
        let layers = self.layers.read().recover();
        let last = layers.last().expect("there is always a layer");
        if last.added.load(Ordering::Relaxed) < last.capacity {
            last.add(h);
            return;
        }
        drop(layers);
        let mut layers = self.layers.write().recover();
        let last = layers.last().expect("there is always a layer");
        // Another writer may have grown it meanwhile.
        if last.added.load(Ordering::Relaxed) >= last.capacity {
            let next = Layer::new(last.capacity * 2);
            layers.push(next);
        }
        layers.last().expect("just checked").add(h);
    }

    /// False only if the key was certainly never added and the filter is
    /// ready; true means "read sled".
    pub(super) fn may_contain(&self, tree: u8, key: &[u8]) -> bool {
        if !self.ready.load(Ordering::Acquire) {
            return true;
        }
        let h = self.hashes(tree, key);
        let layers = self.layers.read().recover();
        layers.iter().any(|l| l.may_contain(h))
    }

    /// Marks the scan of the keys present at open as done.
    pub(super) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the scan is done (for tests and logs).
    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Layers in use (for tests).
    #[cfg(test)]
    fn layer_count(&self) -> usize {
        self.layers.read().recover().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_means_maybe_and_added_keys_are_always_found() {
        let f = KeyFilter::new();
        assert!(f.may_contain(0, b"anything"), "not ready: must read sled");
        f.set_ready();
        assert!(!f.may_contain(0, b"never added"));
        for i in 0..10_000u32 {
            f.add(0, &i.to_be_bytes());
        }
        for i in 0..10_000u32 {
            assert!(f.may_contain(0, &i.to_be_bytes()), "added key {i} lost");
        }
        // The tree number is part of the key.
        let misses = (0..10_000u32)
            .filter(|i| !f.may_contain(1, &i.to_be_bytes()))
            .count();
        assert!(
            misses > 9_900,
            "tree numbers do not separate keys: {misses}"
        );
    }

    #[test]
    fn grows_in_layers_and_keeps_a_low_false_positive_rate() {
        let f = KeyFilter::new();
        f.set_ready();
        let n = FIRST_CAPACITY + FIRST_CAPACITY / 2;
        for i in 0..n {
            f.add(1, &i.to_le_bytes());
        }
        assert_eq!(f.layer_count(), 2, "a full first layer, a second half full");
        for i in (0..n).step_by(997) {
            assert!(f.may_contain(1, &i.to_le_bytes()));
        }
        let probes = 100_000u64;
        let false_pos = (n..n + probes)
            .filter(|i| f.may_contain(1, &i.to_le_bytes()))
            .count();
        // Two layers at most ~1% each.
        assert!(
            (false_pos as f64) < probes as f64 * 0.025,
            "false positives {false_pos} of {probes}"
        );
    }
}
