//! The record envelope: how one card is encrypted at rest.
//!
//! Layout: `version(1) | key_id(4, big-endian) | nonce(12) | ciphertext | tag(16)`.
//! Associated data (version 2): `"cardvault.record.v2" | len(tenant) |
//! tenant | len(token) | token | key_id | len(bin) | bin | len(last4) |
//! last4 | len(brand) | brand | exp_month(1) | exp_year(2) |
//! len(fingerprint) | fingerprint`, lengths as 4-byte big-endian. So a
//! ciphertext moved to another row, token or tenant, relabelled with
//! another key id, or stored beside metadata other than its card's (the
//! clear copy that `GetMetadata` shows and dedupe matches on), fails
//! authentication instead of decrypting. Version 1, written before the
//! metadata was bound, had only the first five fields (and the label
//! `cardvault.record.v1`); it is still read, and a rewrap rewrites it as
//! version 2.
//!
//! The plaintext holds everything secret about the card: the PAN, the
//! expiry (authoritative copy; the clear copy is for metadata) and the
//! cardholder name.

use zeroize::Zeroizing;

use super::keys::{Aead, NONCE_LEN, TAG_LEN};

/// Envelope format version written by this code.
pub const ENVELOPE_VERSION: u8 = 2;
/// The earlier version, without the metadata in its associated data.
pub const LEGACY_VERSION: u8 = 1;
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

/// The clear metadata stored beside an envelope, which version 2 binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta<'a> {
    /// First digits shown (six, or four for short numbers).
    pub bin: &'a str,
    /// Last four digits.
    pub last4: &'a str,
    /// Brand name.
    pub brand: &'a str,
    /// Expiry month.
    pub exp_month: u32,
    /// Expiry year.
    pub exp_year: u32,
    /// The keyed fingerprint (dedupe matches on it).
    pub fingerprint: &'a [u8],
}

/// Why an envelope could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Too short, or an unknown version byte.
    Malformed,
    /// Authentication failed: tampered, swapped, or wrong key.
    Authentication,
}

/// Reads the format version from an envelope header.
pub fn version(envelope: &[u8]) -> Result<u8, EnvelopeError> {
    match envelope.first() {
        Some(&v @ (LEGACY_VERSION | ENVELOPE_VERSION))
            if envelope.len() >= HEADER_LEN + NONCE_LEN + TAG_LEN =>
        {
            Ok(v)
        }
        _ => Err(EnvelopeError::Malformed),
    }
}

/// Reads the key id from an envelope header without decrypting.
pub fn key_id(envelope: &[u8]) -> Result<u32, EnvelopeError> {
    version(envelope)?;
    Ok(u32::from_be_bytes([
        envelope[1],
        envelope[2],
        envelope[3],
        envelope[4],
    ]))
}

/// Encrypts `secret` for (`tenant`, `token`) under data key `key_id`,
/// bound to the record's clear `meta`.
pub fn seal(
    dek: &Aead,
    key_id: u32,
    tenant: &str,
    token: &str,
    meta: &RecordMeta<'_>,
    secret: &CardSecret,
) -> Vec<u8> {
    seal_as(ENVELOPE_VERSION, dek, key_id, tenant, token, meta, secret)
}

fn seal_as(
    version: u8,
    dek: &Aead,
    key_id: u32,
    tenant: &str,
    token: &str,
    meta: &RecordMeta<'_>,
    secret: &CardSecret,
) -> Vec<u8> {
    let plain = encode_secret(secret);
    let sealed = dek.seal(&aad(version, tenant, token, key_id, meta), &plain);
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.push(version);
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// An envelope of the earlier version (no metadata bound), as records
/// written before it were: for tests of reading and migrating them.
#[cfg(test)]
pub(crate) fn seal_legacy(
    dek: &Aead,
    key_id: u32,
    tenant: &str,
    token: &str,
    secret: &CardSecret,
) -> Vec<u8> {
    let none = RecordMeta {
        bin: "",
        last4: "",
        brand: "",
        exp_month: 0,
        exp_year: 0,
        fingerprint: &[],
    };
    seal_as(LEGACY_VERSION, dek, key_id, tenant, token, &none, secret)
}

/// Decrypts an envelope stored beside `meta`; a version 2 envelope whose
/// metadata is not `meta` fails authentication. The caller picks `dek`
/// by [`key_id`].
pub fn open(
    dek: &Aead,
    tenant: &str,
    token: &str,
    meta: &RecordMeta<'_>,
    envelope: &[u8],
) -> Result<CardSecret, EnvelopeError> {
    let v = version(envelope)?;
    let kid = key_id(envelope)?;
    let plain = dek
        .open(&aad(v, tenant, token, kid, meta), &envelope[HEADER_LEN..])
        .map_err(|_| EnvelopeError::Authentication)?;
    decode_secret(&plain).ok_or(EnvelopeError::Malformed)
}

fn aad(version: u8, tenant: &str, token: &str, key_id: u32, meta: &RecordMeta<'_>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(96 + tenant.len() + token.len());
    aad.extend_from_slice(if version == LEGACY_VERSION {
        b"cardvault.record.v1"
    } else {
        b"cardvault.record.v2"
    });
    // Length prefixes keep the encoding unambiguous ("ab"+"c" != "a"+"bc").
    // Tenants and tokens are validated to at most 64 bytes elsewhere.
    aad.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&(token.len() as u32).to_be_bytes());
    aad.extend_from_slice(token.as_bytes());
    aad.extend_from_slice(&key_id.to_be_bytes());
    if version != LEGACY_VERSION {
        for field in [
            meta.bin.as_bytes(),
            meta.last4.as_bytes(),
            meta.brand.as_bytes(),
        ] {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field);
        }
        aad.push(meta.exp_month as u8);
        aad.extend_from_slice(&(meta.exp_year as u16).to_be_bytes());
        aad.extend_from_slice(&(meta.fingerprint.len() as u32).to_be_bytes());
        aad.extend_from_slice(meta.fingerprint);
    }
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

    const FP: [u8; 32] = [7; 32];

    fn meta() -> RecordMeta<'static> {
        RecordMeta {
            bin: "411111",
            last4: "1111",
            brand: "VISA",
            exp_month: 12,
            exp_year: 2031,
            fingerprint: &FP,
        }
    }

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
        let env = seal(&dek, 7, "acme", "tok_x", &meta(), &secret());
        assert_eq!(key_id(&env), Ok(7));
        let s = open(&dek, "acme", "tok_x", &meta(), &env).unwrap();
        assert_eq!(s.pan.as_str(), "4111111111111111");
        assert_eq!((s.exp_month, s.exp_year), (12, 2031));
        assert_eq!(s.name.as_str(), "Ada Lovelace");
        // The PAN is not in the ciphertext in clear.
        assert!(!env.windows(16).any(|w| w == b"4111111111111111"));
    }

    #[test]
    fn bound_to_tenant_token_and_key_id() {
        let dek = Aead::new(&SecretKey::generate());
        let env = seal(&dek, 1, "acme", "tok_x", &meta(), &secret());
        assert_eq!(
            open(&dek, "other", "tok_x", &meta(), &env).err(),
            Some(EnvelopeError::Authentication)
        );
        assert_eq!(
            open(&dek, "acme", "tok_y", &meta(), &env).err(),
            Some(EnvelopeError::Authentication)
        );
        // Ambiguity check: moving a byte between tenant and token changes the AAD.
        assert!(open(&dek, "acm", "etok_x", &meta(), &env).is_err());
        let mut relabelled = env.clone();
        relabelled[4] = 2;
        assert_eq!(
            open(&dek, "acme", "tok_x", &meta(), &relabelled).err(),
            Some(EnvelopeError::Authentication)
        );
    }

    /// The clear metadata beside the envelope is bound: any change to it
    /// fails authentication. A version 1 envelope still opens, whatever
    /// metadata is beside it.
    #[test]
    fn bound_to_the_clear_metadata() {
        let dek = Aead::new(&SecretKey::generate());
        let env = seal(&dek, 1, "acme", "tok_x", &meta(), &secret());
        assert_eq!(version(&env), Ok(ENVELOPE_VERSION));
        let other_fp = [8u8; 32];
        for m in [
            RecordMeta {
                bin: "411112",
                ..meta()
            },
            RecordMeta {
                last4: "1112",
                ..meta()
            },
            RecordMeta {
                brand: "MASTERCARD",
                ..meta()
            },
            RecordMeta {
                exp_month: 11,
                ..meta()
            },
            RecordMeta {
                exp_year: 2032,
                ..meta()
            },
            RecordMeta {
                fingerprint: &other_fp,
                ..meta()
            },
            // Moving bytes between fields changes the associated data too.
            RecordMeta {
                bin: "41111",
                last4: "11111",
                ..meta()
            },
        ] {
            assert_eq!(
                open(&dek, "acme", "tok_x", &m, &env).err(),
                Some(EnvelopeError::Authentication),
                "{m:?}"
            );
        }
        let legacy = seal_legacy(&dek, 1, "acme", "tok_x", &secret());
        assert_eq!(version(&legacy), Ok(LEGACY_VERSION));
        let forged = RecordMeta {
            exp_month: 1,
            ..meta()
        };
        assert!(open(&dek, "acme", "tok_x", &forged, &legacy).is_ok());
        assert!(open(&dek, "other", "tok_x", &meta(), &legacy).is_err());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let dek = Aead::new(&SecretKey::generate());
        let env = seal(&dek, 1, "acme", "tok_x", &meta(), &secret());
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(
                open(&dek, "acme", "tok_x", &meta(), &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert_eq!(key_id(&env[..10]), Err(EnvelopeError::Malformed));
    }
}
