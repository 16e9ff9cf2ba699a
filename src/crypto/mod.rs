//! Cryptography: secret keys, AES-256-GCM sealing, the record envelope and
//! keyed fingerprints. Pure functions over bytes: nothing here does I/O, so
//! the vault decides where keys come from and where ciphertext goes.

pub mod custody;
pub mod envelope;
pub mod fingerprint;
pub mod keys;
pub mod sealed;
pub mod shamir;

use ring::rand::{SecureRandom, SystemRandom};

/// Fills a fixed-size array from the operating system's CSPRNG.
///
/// A failing system RNG leaves no safe way to make keys, nonces or tokens,
/// so it aborts the request with a panic rather than returning weak bytes.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("operating system CSPRNG failed");
    out
}

/// A uniformly random integer in `0..bound` (rejection sampling, no modulo bias).
pub fn random_below(bound: u8) -> u8 {
    assert!(bound > 0, "random_below(0)");
    // Largest multiple of `bound` that fits in a byte; bytes above it are redrawn.
    let limit = 256 - (256 % bound as u16);
    loop {
        let [b] = random_array::<1>();
        if (b as u16) < limit {
            return b % bound;
        }
    }
}
