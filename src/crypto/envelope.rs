//! The record envelope: how one card is encrypted at rest.
//!
//! Layout: `version(1) | key_id(4, big-endian) | nonce(12) | ciphertext | tag(16)`.
//! Associated data: `"cardvault.record.v1" | len(tenant) | tenant | len(token) | token | key_id`,
//! so a ciphertext moved to another row, token or tenant, or relabelled with
//! another key id, fails authentication instead of decrypting.
//!
//! The plaintext holds everything secret about the card: the PAN, the
//! expiry (authoritative copy; the clear copy is for metadata) and the
//! cardholder name.

use zeroize::Zeroizing;

use super::keys::{Aead, NONCE_LEN, TAG_LEN};

/// Envelope format version written by this code.
pub const ENVELOPE_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4;

/// The secret part of a card record, before encryption / after decryption.
pub struct CardSecret {
    /// PAN digits.
    pub pan: Zeroizing<String>,
    /// Expiry month 1-12.
    pub exp_month: u32,
    /// Four-digit expiry year.
    pub exp_year: u32,
    /// Cardholder name, possibly empty.
    pub name: Zeroizing<String>,
}

/// Why an envelope could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Too short, or an unknown version byte.
    Malformed,
    /// Authentication failed: tampered, swapped, or wrong key.
    Authentication,
}

/// Reads the key id from an envelope header without decrypting.
pub fn key_id(envelope: &[u8]) -> Result<u32, EnvelopeError> {
    if envelope.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || envelope[0] != ENVELOPE_VERSION {
        return Err(EnvelopeError::Malformed);
    }
    Ok(u32::from_be_bytes([
        envelope[1],
        envelope[2],
        envelope[3],
        envelope[4],
    ]))
}

/// Encrypts `secret` for (`tenant`, `token`) under data key `key_id`.
pub fn seal(dek: &Aead, key_id: u32, tenant: &str, token: &str, secret: &CardSecret) -> Vec<u8> {
    let plain = encode_secret(secret);
    let sealed = dek.seal(&aad(tenant, token, key_id), &plain);
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// Decrypts an envelope. The caller picks `dek` by [`key_id`].
pub fn open(
    dek: &Aead,
    tenant: &str,
    token: &str,
    envelope: &[u8],
) -> Result<CardSecret, EnvelopeError> {
    let kid = key_id(envelope)?;
    let plain = dek
        .open(&aad(tenant, token, kid), &envelope[HEADER_LEN..])
        .map_err(|_| EnvelopeError::Authentication)?;
    decode_secret(&plain).ok_or(EnvelopeError::Malformed)
}

fn aad(tenant: &str, token: &str, key_id: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(24 + tenant.len() + token.len());
    aad.extend_from_slice(b"cardvault.record.v1");
    // Length prefixes keep the encoding unambiguous ("ab"+"c" != "a"+"bc").
    // Tenants and tokens are validated to at most 64 bytes elsewhere.
    aad.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&(token.len() as u32).to_be_bytes());
    aad.extend_from_slice(token.as_bytes());
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad
}

/// `pan_len(1) | pan | exp_month(1) | exp_year(2) | name`
fn encode_secret(s: &CardSecret) -> Zeroizing<Vec<u8>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(4 + s.pan.len() + s.name.len()));
    buf.push(s.pan.len() as u8);
    buf.extend_from_slice(s.pan.as_bytes());
    buf.push(s.exp_month as u8);
    buf.extend_from_slice(&(s.exp_year as u16).to_be_bytes());
    buf.extend_from_slice(s.name.as_bytes());
    buf
}

fn decode_secret(b: &[u8]) -> Option<CardSecret> {
    let pan_len = *b.first()? as usize;
    let pan = b.get(1..1 + pan_len)?;
    let rest = b.get(1 + pan_len..)?;
    if rest.len() < 3 {
        return None;
    }
    let pan = Zeroizing::new(std::str::from_utf8(pan).ok()?.to_owned());
    let name = Zeroizing::new(std::str::from_utf8(&rest[3..]).ok()?.to_owned());
    Some(CardSecret {
        pan,
        exp_month: rest[0] as u32,
        exp_year: u16::from_be_bytes([rest[1], rest[2]]) as u32,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::SecretKey;

    fn secret() -> CardSecret {
        CardSecret {
            pan: Zeroizing::new("4111111111111111".into()),
            exp_month: 12,
            exp_year: 2031,
            name: Zeroizing::new("Ada Lovelace".into()),
        }
    }

    #[test]
    fn round_trip() {
        let dek = Aead::new(&SecretKey::generate());
        let env = seal(&dek, 7, "acme", "tok_x", &secret());
        assert_eq!(key_id(&env), Ok(7));
        let s = open(&dek, "acme", "tok_x", &env).unwrap();
        assert_eq!(s.pan.as_str(), "4111111111111111");
        assert_eq!((s.exp_month, s.exp_year), (12, 2031));
        assert_eq!(s.name.as_str(), "Ada Lovelace");
        // The PAN is not in the ciphertext in clear.
        assert!(!env.windows(16).any(|w| w == b"4111111111111111"));
    }

    #[test]
    fn bound_to_tenant_token_and_key_id() {
        let dek = Aead::new(&SecretKey::generate());
        let env = seal(&dek, 1, "acme", "tok_x", &secret());
        assert_eq!(
            open(&dek, "other", "tok_x", &env).err(),
            Some(EnvelopeError::Authentication)
        );
        assert_eq!(
            open(&dek, "acme", "tok_y", &env).err(),
            Some(EnvelopeError::Authentication)
        );
        // Ambiguity check: moving a byte between tenant and token changes the AAD.
        assert!(open(&dek, "acm", "etok_x", &env).is_err());
        let mut relabelled = env.clone();
        relabelled[4] = 2;
        assert_eq!(
            open(&dek, "acme", "tok_x", &relabelled).err(),
            Some(EnvelopeError::Authentication)
        );
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let dek = Aead::new(&SecretKey::generate());
        let env = seal(&dek, 1, "acme", "tok_x", &secret());
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(
                open(&dek, "acme", "tok_x", &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert_eq!(key_id(&env[..10]), Err(EnvelopeError::Malformed));
    }
}
