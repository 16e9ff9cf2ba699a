//! Secret key material and the AEAD built from it.

use aes_gcm::aead::{Aead as _, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use zeroize::Zeroizing;

use super::random_array;

/// Length of every symmetric key: AES-256 and HMAC-SHA256 keys are 32 bytes.
pub const KEY_LEN: usize = 32;
/// GCM nonce length: 96 random bits per encryption.
pub const NONCE_LEN: usize = 12;
/// GCM tag length.
pub const TAG_LEN: usize = 16;

/// 256 bits of secret key material, wiped from memory on drop.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Self {
        SecretKey(Zeroizing::new(random_array()))
    }

    /// Wraps existing key bytes (which the caller should wipe).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(SecretKey(Zeroizing::new(arr)))
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text.trim(), &mut buf[..]).ok()?;
        Some(SecretKey(buf))
    }

    /// Hex encoding, for writing a dev key file. The result is secret.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0[..]))
    }

    /// The raw key bytes. Secret: never log or persist them unwrapped.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// AES-256-GCM with random nonces. Everything derived from the key (the AES
/// round keys and the GHASH subkey) is wiped on drop.
///
/// Output layout of [`Aead::seal`]: `nonce(12) | ciphertext | tag(16)`.
pub struct Aead {
    cipher: Aes256Gcm,
}

/// AEAD decryption failed: wrong key, wrong associated data, or altered bytes.
/// Deliberately carries no detail: which of those it was must not leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenError;

impl Drop for Aead {
    fn drop(&mut self) {
        // The `aes` crate wipes the round keys it uses, but not the rest of
        // its CPU-dispatch union, and `polyval` keeps the GHASH subkey
        // H = AES_K(0) in such a union that it never drops at all; with H
        // anyone can forge tags under this key. Assigning in place drops the
        // old cipher and writes a new one, built from the all-zero (public)
        // key, over every byte of it; `black_box` keeps that store from being
        // optimised away as dead. tests/key_wipe.rs checks the result.
        self.cipher = Aes256Gcm::new(&[0u8; KEY_LEN].into());
        std::hint::black_box(&self.cipher);
    }
}

impl Aead {
    /// Builds the cipher for `key`.
    pub fn new(key: &SecretKey) -> Self {
        Aead {
            cipher: Aes256Gcm::new(key.expose().into()),
        }
    }

    /// Encrypts `plaintext` bound to `aad` under a fresh random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = random_array();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // Only fails for plaintexts over 64 GiB, which never reach here.
            .expect("AES-GCM plaintext too long");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts the output of [`Aead::seal`]; the plaintext is wiped on drop.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }
}

/// Wraps (encrypts) a key under the key-encrypting key. `label` names the
/// wrapped key (e.g. `tenant/acme/dek/1`) and is bound as associated data, so
/// a wrapped key copied to another name fails to unwrap.
pub fn wrap_key(kek: &Aead, label: &str, key: &SecretKey) -> Vec<u8> {
    kek.seal(&wrap_aad(label), key.expose())
}

/// Reverses [`wrap_key`].
pub fn unwrap_key(kek: &Aead, label: &str, wrapped: &[u8]) -> Result<SecretKey, OpenError> {
    let plain = kek.open(&wrap_aad(label), wrapped)?;
    SecretKey::from_bytes(&plain).ok_or(OpenError)
}

fn wrap_aad(label: &str) -> Vec<u8> {
    let mut aad = b"cardvault.wrap.v1\0".to_vec();
    aad.extend_from_slice(label.as_bytes());
    aad
}

/// Known plaintext sealed under the KEK and stored, so that a wrong KEK (or
/// wrong unseal shares) is detected before anything is written with it.
const KEK_CHECK_PLAINTEXT: &[u8] = b"cardvault kek check v1";

/// Produces the stored KEK check value.
pub fn kek_check_value(kek: &Aead) -> Vec<u8> {
    kek.seal(b"cardvault.kek-check.v1", KEK_CHECK_PLAINTEXT)
}

/// True when `check` was produced by [`kek_check_value`] under this KEK.
pub fn kek_matches(kek: &Aead, check: &[u8]) -> bool {
    kek.open(b"cardvault.kek-check.v1", check)
        .map(|p| p.as_slice() == KEK_CHECK_PLAINTEXT)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let aead = Aead::new(&SecretKey::generate());
        let sealed = aead.seal(b"aad", b"hello");
        assert_eq!(aead.open(b"aad", &sealed).unwrap().as_slice(), b"hello");
        assert_eq!(aead.open(b"other", &sealed), Err(OpenError));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(aead.open(b"aad", &bad), Err(OpenError));
        assert_eq!(aead.open(b"aad", &sealed[..10]), Err(OpenError));
    }

    #[test]
    fn nonces_are_fresh() {
        let aead = Aead::new(&SecretKey::generate());
        assert_ne!(aead.seal(b"", b"x"), aead.seal(b"", b"x"));
    }

    #[test]
    fn wrapped_key_is_bound_to_its_label() {
        let kek = Aead::new(&SecretKey::generate());
        let dek = SecretKey::generate();
        let w = wrap_key(&kek, "tenant/a/dek/1", &dek);
        assert_eq!(
            unwrap_key(&kek, "tenant/a/dek/1", &w).unwrap().expose(),
            dek.expose()
        );
        assert!(unwrap_key(&kek, "tenant/b/dek/1", &w).is_err());
        let other = Aead::new(&SecretKey::generate());
        assert!(unwrap_key(&other, "tenant/a/dek/1", &w).is_err());
    }

    #[test]
    fn kek_check_detects_wrong_key() {
        let kek = Aead::new(&SecretKey::generate());
        let check = kek_check_value(&kek);
        assert!(kek_matches(&kek, &check));
        assert!(!kek_matches(&Aead::new(&SecretKey::generate()), &check));
    }

    #[test]
    fn hex_round_trip_and_debug_redacts() {
        let k = SecretKey::generate();
        let h = k.to_hex();
        assert_eq!(SecretKey::from_hex(&h).unwrap().expose(), k.expose());
        assert!(SecretKey::from_hex("zz").is_none());
        assert!(!format!("{k:?}").contains(&h[..8]));
    }
}
