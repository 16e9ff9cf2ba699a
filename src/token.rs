//! Tokens: the values merchants hold instead of card numbers.
//!
//! * Opaque (default): `tok_` + 22 URL-safe base64 characters = 128 bits
//!   from the OS CSPRNG. Recognisable in logs and code review, useless to a
//!   thief.
//! * Format-preserving: digits, the PAN's length, the PAN's last 4 (and
//!   optionally its first 6), the rest random, and adjusted to **fail** the
//!   Luhn check so it can never be mistaken for (or accepted as) a card.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::card::{Pan, luhn_valid};
use crate::crypto::{random_array, random_below};
use crate::error::{Error, Result};

/// Prefix of opaque tokens.
pub const OPAQUE_PREFIX: &str = "tok_";
const OPAQUE_RANDOM_BYTES: usize = 16;
const OPAQUE_LEN: usize = 4 + 22;

/// How a new token is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenFormat {
    /// `tok_` + 128 random bits.
    #[default]
    Opaque,
    /// Same length as the PAN, keeps the last 4, fails Luhn.
    FormatPreserving {
        /// Also keep the first 6 digits (the BIN), for routing systems that need it.
        keep_bin: bool,
    },
}

/// A token. Not secret (it is useless without the vault), but it is an
/// identifier of a card, so it never appears in metric labels.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(String);

impl Token {
    /// Validates a token received in a request. Error field: `token`.
    pub fn parse(input: &str) -> Result<Token> {
        if input.is_empty() {
            return Err(Error::invalid("token", "is required"));
        }
        if let Some(rest) = input.strip_prefix(OPAQUE_PREFIX) {
            let ok = input.len() == OPAQUE_LEN
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            return if ok {
                Ok(Token(input.to_owned()))
            } else {
                Err(Error::invalid("token", "is not a valid cardvault token"))
            };
        }
        if input.bytes().all(|b| b.is_ascii_digit()) && (12..=19).contains(&input.len()) {
            // A digit string that passes Luhn is a card number, never one of
            // our tokens: refuse it without saying more (it may be a real PAN).
            if luhn_valid(input) {
                return Err(Error::invalid(
                    "token",
                    "looks like a card number, not a token (passes the Luhn check)",
                ));
            }
            return Ok(Token(input.to_owned()));
        }
        Err(Error::invalid("token", "is not a valid cardvault token"))
    }

    /// The token as an audit record or a log line about a call writes it.
    /// `found`: whether a card is stored under it. A digit token under
    /// which nothing was found is masked like a card number (first six and
    /// last four digits at 15 digits or more, else first and last four): a
    /// card number with one digit mistyped fails Luhn too, so it passes for
    /// a format-preserving token, and written whole it would put most of a
    /// real PAN in the record. A token that names a card is that card's
    /// token, not a card number, and is written whole, as is an opaque one.
    pub fn recorded(&self, found: bool) -> std::borrow::Cow<'_, str> {
        if found || !self.is_digits() {
            return std::borrow::Cow::Borrowed(&self.0);
        }
        std::borrow::Cow::Owned(crate::card::mask_digits(&self.0))
    }

    /// Whether it is a digit (format-preserving) token, not an opaque one.
    pub fn is_digits(&self) -> bool {
        self.0.bytes().all(|b| b.is_ascii_digit())
    }

    /// Makes a new random token for `pan` in the given format.
    pub fn generate(format: TokenFormat, pan: &Pan) -> Token {
        #[cfg(test)]
        if let Some(t) = FORCED_TOKENS.with(|f| f.borrow_mut().pop()) {
            return Token(t);
        }
        match format {
            TokenFormat::Opaque => {
                let bytes: [u8; OPAQUE_RANDOM_BYTES] = random_array();
                Token(format!("{OPAQUE_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
            }
            TokenFormat::FormatPreserving { keep_bin } => format_preserving(pan, keep_bin),
        }
    }

    /// The token text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn format_preserving(pan: &Pan, keep_bin: bool) -> Token {
    let digits = pan.expose().as_bytes();
    let len = digits.len();
    let keep_front = if keep_bin { 6 } else { 0 };
    let random_range = keep_front..len - 4;
    let mut out: Vec<u8> = Vec::with_capacity(len);
    out.extend_from_slice(&digits[..keep_front]);
    for _ in random_range.clone() {
        out.push(b'0' + random_below(10));
    }
    out.extend_from_slice(&digits[len - 4..]);
    // Force a Luhn failure: changing any one digit changes the Luhn sum
    // modulo 10 (each position's contribution is a bijection on 0..9), so
    // bumping one random digit turns a valid string into an invalid one.
    let text = String::from_utf8(out).expect("ascii digits");
    let mut out = text.into_bytes();
    if luhn_valid(std::str::from_utf8(&out).expect("ascii digits")) {
        let i = random_range.start + random_below((random_range.len()) as u8) as usize;
        out[i] = b'0' + (out[i] - b'0' + 1) % 10;
    }
    Token(String::from_utf8(out).expect("ascii digits"))
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.0)
    }
}

#[cfg(test)]
thread_local! {
    /// Tokens [`Token::generate`] returns before random ones, last first:
    /// unit tests use it to make a candidate collide with a given token.
    pub(crate) static FORCED_TOKENS: std::cell::RefCell<Vec<String>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_tokens_are_unique_and_parse() {
        let pan = Pan::parse("4111111111111111").unwrap();
        let a = Token::generate(TokenFormat::Opaque, &pan);
        let b = Token::generate(TokenFormat::Opaque, &pan);
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("tok_"));
        assert_eq!(a.as_str().len(), OPAQUE_LEN);
        assert_eq!(Token::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn format_preserving_keeps_length_last4_and_fails_luhn() {
        for pan in [
            "4111111111111111",
            "378282246310005",
            "36227206271667",
            "6200000000000005",
        ] {
            let pan = Pan::parse(pan).unwrap();
            for keep_bin in [false, true] {
                for _ in 0..200 {
                    let t = Token::generate(TokenFormat::FormatPreserving { keep_bin }, &pan);
                    let s = t.as_str();
                    assert_eq!(s.len(), pan.len());
                    assert!(s.ends_with(pan.last4()));
                    assert!(!luhn_valid(s), "token passes Luhn");
                    if keep_bin {
                        assert!(s.starts_with(pan.bin()));
                    }
                    assert_eq!(Token::parse(s).unwrap(), t);
                }
            }
        }
    }

    #[test]
    fn token_parse_rejects_garbage_and_pans() {
        for bad in [
            "",
            "tok_",
            "tok_!!!!!!!!!!!!!!!!!!!!!!",
            "abc",
            "12345",
            "tok_aaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
        let e = Token::parse("4111111111111111").unwrap_err();
        assert!(e.to_string().contains("card number"));
        assert!(!e.to_string().contains("4111"));
    }

    #[test]
    fn an_unfound_digit_token_is_recorded_masked() {
        // A Visa test number with its last digit mistyped: fails Luhn.
        let typo = Token::parse("4111111111111112").unwrap();
        assert_eq!(typo.recorded(false), "411111******1112");
        assert_eq!(typo.recorded(true), "4111111111111112");
        let short = Token::parse("123456789012").unwrap();
        assert_eq!(short.recorded(false), "1234****9012");
        let opaque = Token::parse("tok_AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert_eq!(opaque.recorded(false), opaque.as_str());
    }
}
