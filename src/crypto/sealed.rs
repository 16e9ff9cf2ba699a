//! Sealed cards: the wire format of a card encrypted in the shopper's
//! browser to a collect session's public key, so that the merchant's app
//! tier relays only ciphertext.
//!
//! The format, exactly (also in `TokenizeSealed`'s proto comment and in
//! `docs/collect.md`):
//!
//! * HPKE (RFC 9180) base mode (`mode_base`, 0x00), single shot, suite
//!   KEM 0x0010 DHKEM(P-256, HKDF-SHA256), KDF 0x0001 HKDF-SHA256,
//!   AEAD 0x0002 AES-256-GCM.
//! * `info` = the 20 ASCII bytes `cardvault-collect-v1`.
//! * `aad` = `cardvault-collect-v1` ‖ 0x00 ‖ tenant ‖ 0x00 ‖ session id
//!   (ASCII; neither a tenant nor a session id contains 0x00).
//! * sealed = `v1.` followed by base64url without padding of
//!   `enc` (the 65-byte uncompressed P-256 point) ‖ ciphertext (with its
//!   16-byte tag).
//! * The plaintext is a UTF-8 JSON object: `pan` (string), `exp_month`
//!   (integer), `exp_year` (integer), and optionally `cvv` (string) and
//!   `name` (string).
//!
//! Nothing here does I/O; the collect sessions that hold the private keys
//! live in the vault core.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The `info` string of every collect seal, and the head of its `aad`.
pub const INFO: &[u8] = b"cardvault-collect-v1";
/// Prefix of a sealed card's text form (format version).
pub const PREFIX: &str = "v1.";
/// The suite, as RFC 9180 names it (for responses and docs).
pub const SUITE: &str = "DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM";
/// RFC 9180 identifiers of the suite: KEM, KDF, AEAD.
pub const SUITE_IDS: (u16, u16, u16) = (0x0010, 0x0001, 0x0002);
/// Bytes of the encapsulated key (an uncompressed P-256 point).
pub const ENC_LEN: usize = 65;
/// Bytes of the AEAD tag.
const TAG_LEN: usize = 16;
/// Longest sealed text accepted: a card with a 200-character name and
/// every field padded is well under 2 KiB of JSON.
pub const MAX_SEALED_LEN: usize = 4096;

type Kem = DhP256HkdfSha256;

/// A collect session's private key. Wiped on drop (the curve crate's secret
/// key zeroizes itself); its `Debug` shows nothing.
pub struct SessionKey(<Kem as hpke::Kem>::PrivateKey);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(***)")
    }
}

impl SessionKey {
    /// A fresh key pair from the operating system's CSPRNG; returns the
    /// private key and the public key in its 65-byte uncompressed form.
    pub fn generate() -> (SessionKey, Vec<u8>) {
        let ikm = Zeroizing::new(super::random_array::<32>());
        Self::derive(&ikm[..])
    }

    /// RFC 9180 `DeriveKeyPair(ikm)`: the test vectors' recipient keys.
    pub fn derive(ikm: &[u8]) -> (SessionKey, Vec<u8>) {
        let (sk, pk) = Kem::derive_keypair(ikm);
        (SessionKey(sk), pk.to_bytes().to_vec())
    }

    /// Opens a sealed text for `tenant` and `session_id`. The plaintext is
    /// returned in a buffer that is wiped on drop. Errors never contain
    /// the input.
    pub fn open(&self, sealed: &str, tenant: &str, session_id: &str) -> Result<Zeroizing<Vec<u8>>> {
        let mut enc = split(sealed)?;
        // The ciphertext is opened in place, in a buffer wiped on drop.
        let mut buf = Zeroizing::new(enc.split_off(ENC_LEN));
        self.open_raw(&enc, &mut buf, INFO, &aad(tenant, session_id))?;
        Ok(buf)
    }

    /// Opens `buf` (ciphertext ‖ tag) in place with this key; on success
    /// it holds the plaintext.
    fn open_raw(
        &self,
        enc: &[u8],
        buf: &mut Zeroizing<Vec<u8>>,
        info: &[u8],
        aad: &[u8],
    ) -> Result<()> {
        let refused = || {
            Error::invalid(
                "sealed",
                "does not open: altered, or sealed for another session or tenant",
            )
        };
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| refused())?;
        if buf.len() < TAG_LEN {
            return Err(refused());
        }
        let split = buf.len() - TAG_LEN;
        let tag = AeadTag::<AesGcm256>::from_bytes(&buf[split..]).map_err(|_| refused())?;
        buf.truncate(split);
        let mut ctx =
            hpke::setup_receiver::<AesGcm256, HkdfSha256, Kem>(&OpModeR::Base, &self.0, &enc, info)
                .map_err(|_| refused())?;
        ctx.open_in_place_detached(buf, aad, &tag)
            .map_err(|_| refused())
    }
}

/// The associated data of a seal for `tenant` and `session_id`.
pub fn aad(tenant: &str, session_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(INFO.len() + 2 + tenant.len() + session_id.len());
    aad.extend_from_slice(INFO);
    aad.push(0);
    aad.extend_from_slice(tenant.as_bytes());
    aad.push(0);
    aad.extend_from_slice(session_id.as_bytes());
    aad
}

/// Decodes a sealed text into `enc ‖ ciphertext ‖ tag`, checking that it
/// is long enough to hold all three.
fn split(sealed: &str) -> Result<Vec<u8>> {
    let bad = || {
        Error::invalid(
            "sealed",
            "is not a sealed card: expected \"v1.\" and base64url (no padding) of the encapsulated key and ciphertext",
        )
    };
    if sealed.is_empty() {
        return Err(Error::invalid("sealed", "is required"));
    }
    if sealed.len() > MAX_SEALED_LEN {
        return Err(Error::invalid(
            "sealed",
            format!("must be at most {MAX_SEALED_LEN} characters"),
        ));
    }
    let body = sealed.strip_prefix(PREFIX).ok_or_else(bad)?;
    let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
    if raw.len() < ENC_LEN + TAG_LEN {
        return Err(bad());
    }
    Ok(raw)
}

/// Seals `plaintext` to a session's public key, as a browser does: for
/// clients written in Rust and for tests. `public_key` is the 65-byte
/// uncompressed point a collect session returns.
pub fn seal(public_key: &[u8], tenant: &str, session_id: &str, plaintext: &[u8]) -> Result<String> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(public_key)
        .map_err(|_| Error::invalid("public_key", "is not an uncompressed P-256 point"))?;
    let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        INFO,
        plaintext,
        &aad(tenant, session_id),
        &mut OsRng,
    )
    .map_err(|_| Error::Internal("HPKE seal failed".into()))?;
    let mut raw = enc.to_bytes().to_vec();
    raw.extend_from_slice(&ct);
    Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw)))
}

/// The operating system's CSPRNG (through `ring`) in the shape `hpke`'s
/// sender asks for.
struct OsRng;

impl hpke::rand_core::RngCore for OsRng {
    fn next_u32(&mut self) -> u32 {
        u32::from_le_bytes(super::random_array())
    }
    fn next_u64(&mut self) -> u64 {
        u64::from_le_bytes(super::random_array())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(dest)
            .expect("operating system CSPRNG failed");
    }
    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> std::result::Result<(), hpke::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl hpke::rand_core::CryptoRng for OsRng {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_opens_only_for_its_tenant_and_session() {
        let (sk, pk) = SessionKey::generate();
        assert_eq!(pk.len(), ENC_LEN);
        let sealed = seal(&pk, "demo", "cs_one", b"{\"pan\":\"x\"}").unwrap();
        assert!(sealed.starts_with("v1."));
        assert_eq!(
            &sk.open(&sealed, "demo", "cs_one").unwrap()[..],
            b"{\"pan\":\"x\"}"
        );
        for (t, s) in [("other", "cs_one"), ("demo", "cs_two")] {
            let e = sk.open(&sealed, t, s).unwrap_err().to_string();
            assert!(e.contains("does not open"), "{e}");
        }
        let (other, _) = SessionKey::generate();
        assert!(other.open(&sealed, "demo", "cs_one").is_err());
    }

    #[test]
    fn malformed_text_is_refused_without_echoing_it() {
        let (sk, pk) = SessionKey::generate();
        let good = seal(&pk, "demo", "s", b"4111111111111111").unwrap();
        let mut flipped = good.clone().into_bytes();
        let i = flipped.len() - 5;
        flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            "",
            "v1.",
            "v2.AAAA",
            "v1.!!!!",
            "4111111111111111",
            &good[..40],
            &flipped,
            &format!("{good}="),
        ] {
            let e = sk.open(bad, "demo", "s").unwrap_err().to_string();
            assert!(
                e.starts_with("invalid argument: sealed:") || e.contains("sealed"),
                "{e}"
            );
            assert!(!e.contains("4111"), "{e}");
        }
        let long = format!("v1.{}", "A".repeat(MAX_SEALED_LEN));
        assert!(sk.open(&long, "demo", "s").is_err());
    }

    /// RFC 9180's published vector for this suite (base mode): the key
    /// pair derived from `ikmR` is the vector's, and its ciphertexts open
    /// to its plaintexts.
    #[test]
    fn rfc9180_test_vectors() {
        let file: serde_json::Value =
            serde_json::from_str(include_str!("../../web/test/hpke-vectors.json")).unwrap();
        let h = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
        let vectors = file["vectors"].as_array().unwrap();
        assert!(!vectors.is_empty());
        for v in vectors {
            assert_eq!(
                (
                    v["mode"].as_u64(),
                    v["kem_id"].as_u64(),
                    v["kdf_id"].as_u64(),
                    v["aead_id"].as_u64()
                ),
                (
                    Some(0),
                    Some(SUITE_IDS.0 as u64),
                    Some(SUITE_IDS.1 as u64),
                    Some(SUITE_IDS.2 as u64)
                )
            );
            let (sk, pk) = SessionKey::derive(&h(&v["ikmR"]));
            assert_eq!(pk, h(&v["pkRm"]));
            // Single shot is sequence number 0: the first encryption.
            let first = &v["encryptions"][0];
            let mut buf = Zeroizing::new(h(&first["ct"]));
            sk.open_raw(&h(&v["enc"]), &mut buf, &h(&v["info"]), &h(&first["aad"]))
                .unwrap();
            assert_eq!(&buf[..], &h(&first["pt"])[..]);
            // The same ciphertext under other associated data is refused.
            let mut buf = Zeroizing::new(h(&first["ct"]));
            assert!(
                sk.open_raw(&h(&v["enc"]), &mut buf, &h(&v["info"]), b"other")
                    .is_err()
            );
        }
    }

    #[test]
    fn aad_is_info_tenant_and_session_separated_by_zero_bytes() {
        assert_eq!(
            aad("demo", "cs_x"),
            b"cardvault-collect-v1\0demo\0cs_x".to_vec()
        );
    }
}
