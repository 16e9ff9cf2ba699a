//! Key shares for custodians, encrypted with `age` (X25519 recipients).
//!
//! Why age: custodians decrypt their share with a standard, audited tool
//! they can get anywhere (`age -d -i key.txt share.age`), the format has a
//! specification and several interoperable implementations, and the
//! `age` crate is the reference Rust one (by the format's co-author). The
//! vault only ever encrypts: it never holds a custodian's private key.

use std::str::FromStr;

use zeroize::Zeroizing;

/// A custodian's public key: an age X25519 recipient (`age1...`).
#[derive(Clone)]
pub struct Recipient(age::x25519::Recipient);

impl Recipient {
    /// Parses `age1...` (as `age-keygen` prints after "public key:").
    pub fn parse(text: &str) -> Result<Recipient, String> {
        age::x25519::Recipient::from_str(text.trim())
            .map(Recipient)
            .map_err(|_| "is not an age X25519 public key (age1...)".to_string())
    }

    /// Encrypts `plaintext` to this recipient, as an ASCII-armoured age
    /// file (`-----BEGIN AGE ENCRYPTED FILE-----`) that `age -d` reads.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<String, String> {
        age::encrypt_and_armor(&self.0, plaintext)
            .map_err(|e| format!("age encryption failed: {e}"))
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Decrypts an age file (armoured or binary) with the identities of an
/// age key file (the custodian side: the CLI, never the vault).
pub fn decrypt_with_key_file(
    key_file: &str,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, String> {
    let identities = age::IdentityFile::from_buffer(key_file.as_bytes())
        .map_err(|e| format!("not an age key file: {e}"))?
        .into_identities()
        .map_err(|e| format!("not an age key file: {e}"))?;
    let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(ciphertext))
        .map_err(|e| format!("not an age file: {e}"))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| format!("cannot decrypt the share with this key: {e}"))?;
    let mut out = Zeroizing::new(Vec::new());
    std::io::Read::read_to_end(&mut reader, &mut out)
        .map_err(|e| format!("cannot read the share: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    #[test]
    fn a_share_encrypted_to_a_recipient_opens_only_with_its_key_file() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let r = Recipient::parse(&id.to_public().to_string()).unwrap();
        let armored = r.encrypt(b"cvs2-secret").unwrap();
        assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert!(!armored.contains("secret"));
        let key_file = format!(
            "# created: now\n# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        );
        let plain = decrypt_with_key_file(&key_file, armored.as_bytes()).unwrap();
        assert_eq!(plain.as_slice(), b"cvs2-secret");
        let wrong = format!("{}\n", other.to_string().expose_secret());
        assert!(decrypt_with_key_file(&wrong, armored.as_bytes()).is_err());
    }

    #[test]
    fn only_x25519_recipients_are_taken() {
        for bad in ["", "age1", "ssh-ed25519 AAAA", "AGE-SECRET-KEY-1XYZ"] {
            assert!(Recipient::parse(bad).is_err(), "{bad}");
        }
    }
}
