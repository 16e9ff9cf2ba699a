//! Cardholder name.

use std::fmt;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

const FIELD: &str = "cardholder_name";

/// Longest accepted name, in characters (not bytes). Generous compared with
/// the 26 characters embossed on a card, but bounded so storage is too.
const MAX_CHARS: usize = 100;

/// A cardholder name. Personal data, so it is wiped on drop and redacted in
/// `Debug` and `Display`.
#[derive(Clone)]
pub struct CardholderName(Zeroizing<String>);

impl CardholderName {
    /// Parses an optional name: surrounding whitespace is trimmed, and an
    /// empty or all-whitespace input means "no name" (`Ok(None)`).
    ///
    /// Control characters are rejected because they have no place in a name
    /// and would let a caller forge lines in logs or exports. Errors (field
    /// `cardholder_name`) never include the input.
    pub fn parse(input: &str) -> Result<Option<CardholderName>> {
        let name = input.trim();
        if name.is_empty() {
            return Ok(None);
        }
        if name.chars().count() > MAX_CHARS {
            return Err(Error::invalid(FIELD, "must be at most 100 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::invalid(FIELD, "must not contain control characters"));
        }
        Ok(Some(CardholderName(Zeroizing::new(name.to_owned()))))
    }

    /// The name as given, trimmed.
    ///
    /// **This is personal data.** Return it only to authorised callers; never
    /// log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardholderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted name>")
    }
}

impl fmt::Display for CardholderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted name>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect_err(input: &str, reason: &str) {
        let err = CardholderName::parse(input).expect_err(input);
        assert_eq!(err, Error::invalid("cardholder_name", reason));
        assert!(!err.to_string().contains(input.trim()));
        assert!(!format!("{err:?}").contains(input.trim()));
    }

    #[test]
    fn accepts_and_trims() {
        let n = CardholderName::parse("  Jane Q. Public \t")
            .unwrap()
            .unwrap();
        assert_eq!(n.expose(), "Jane Q. Public");
        let n = CardholderName::parse("José Müller-Łukasik")
            .unwrap()
            .unwrap();
        assert_eq!(n.expose(), "José Müller-Łukasik");
        assert_eq!(n.clone().expose(), n.expose());
    }

    #[test]
    fn empty_is_none() {
        for input in ["", " ", "\t\n ", "\u{3000}"] {
            assert!(CardholderName::parse(input).unwrap().is_none(), "{input:?}");
        }
    }

    #[test]
    fn length_limit_counts_characters() {
        let max = "é".repeat(100);
        assert_eq!(
            CardholderName::parse(&max).unwrap().unwrap().expose(),
            max.as_str()
        );
        // Surrounding whitespace does not count against the limit.
        assert!(CardholderName::parse(&format!("  {max}  ")).is_ok());
        expect_err(&"é".repeat(101), "must be at most 100 characters");
        expect_err(&"A".repeat(10_000), "must be at most 100 characters");
    }

    #[test]
    fn rejects_control_characters() {
        for input in [
            "Jane\nDoe",
            "Jane\rDoe",
            "Jane\tDoe",
            "Jane\0Doe",
            "Jane\u{1b}[31mDoe",
            "Jane\u{7f}Doe",
            "Jane\u{85}Doe",
        ] {
            expect_err(input, "must not contain control characters");
        }
    }

    #[test]
    fn debug_and_display_are_redacted() {
        let n = CardholderName::parse("Jane Doe").unwrap().unwrap();
        assert_eq!(format!("{n:?}"), "<redacted name>");
        assert_eq!(format!("{n}"), "<redacted name>");
        assert!(!format!("{:?}", Some(&n)).contains("Jane"));
    }
}
