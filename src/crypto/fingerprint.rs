//! Keyed card fingerprints. A plain hash of a PAN can be reversed by brute
//! force (about 10^9 candidates per BIN), so fingerprints are HMAC-SHA256
//! under a per-tenant key that lives only inside the vault.

use ring::hmac;

use super::keys::SecretKey;

/// Length of a fingerprint in bytes.
pub const FINGERPRINT_LEN: usize = 32;

/// A per-tenant fingerprint key.
pub struct FingerprintKey(hmac::Key);

impl FingerprintKey {
    /// Builds the HMAC key. `ring` keeps its own copy of the key schedule,
    /// which it does not wipe; the raw bytes (`key`) are wiped by the caller.
    pub fn new(key: &SecretKey) -> Self {
        FingerprintKey(hmac::Key::new(hmac::HMAC_SHA256, key.expose()))
    }

    /// The fingerprint of a card number (its digits).
    pub fn fingerprint(&self, pan_digits: &str) -> [u8; FINGERPRINT_LEN] {
        let tag = hmac::sign(&self.0, pan_digits.as_bytes());
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_key_and_different_across_keys() {
        let a = FingerprintKey::new(&SecretKey::generate());
        let b = FingerprintKey::new(&SecretKey::generate());
        assert_eq!(
            a.fingerprint("4111111111111111"),
            a.fingerprint("4111111111111111")
        );
        assert_ne!(
            a.fingerprint("4111111111111111"),
            a.fingerprint("4012888888881881")
        );
        assert_ne!(
            a.fingerprint("4111111111111111"),
            b.fingerprint("4111111111111111")
        );
    }
}
