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

/// A tenant: the merchant account that owns a set of cards. Lower-case
/// `[a-z0-9_-]`, 1-64 characters, so it is safe in storage keys, logs and
/// file names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Tenant(String);

impl Tenant {
    /// Validates a tenant name. Error field: `tenant`.
    pub fn parse(input: &str) -> Result<Tenant> {
        if input.is_empty() {
            return Err(Error::invalid("tenant", "is required"));
        }
        if input.len() > 64 {
            return Err(Error::invalid("tenant", "must be at most 64 characters"));
        }
        if !input
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(Error::invalid("tenant", "must match [a-z0-9_-]+"));
        }
        // A tenant is echoed in errors, logs, audit records, storage keys
        // and metric labels: a card number sent as one (fields swapped by a
        // client) must stop here.
        if contains_card_number(input) {
            return Err(Error::invalid("tenant", "must not contain a card number"));
        }
        Ok(Tenant(input.to_owned()))
    }

    /// The tenant name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a card is being read. Required on every detokenize and written to
/// the audit log in clear, so it is checked not to smuggle in a card number.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Purpose(String);

impl Purpose {
    /// Validates a purpose. Error field: `purpose`.
    pub fn parse(input: &str) -> Result<Purpose> {
        let t = input.trim();
        if t.is_empty() {
            return Err(Error::invalid(
                "purpose",
                "is required (e.g. \"authorization\")",
            ));
        }
        check_free_text("purpose", t, 200)?;
        Ok(Purpose(t.to_owned()))
    }

    /// The purpose text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks free text that will be logged and audited in clear (error field
/// `field`): at most `max` characters, no control characters, no card
/// number.
pub fn check_free_text(field: &str, text: &str, max: usize) -> Result<()> {
    if text.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    if contains_card_number(text) {
        return Err(Error::invalid(field, "must not contain a card number"));
    }
    Ok(())
}

/// True when `text` holds a run of 12-19 digits that passes Luhn: free
/// text that would leak a PAN into logs. The ways card numbers are written
/// are allowed between the digits (any white space, dashes of every
/// width, dots, underscores, slashes, commas, bars), and full-width
/// digits count as digits. Other characters (letters, colons) end a run,
/// so that a time like `2026-11-26 07:51:01` is not taken for one.
pub fn contains_card_number(text: &str) -> bool {
    let digit = |c: char| match c {
        '0'..='9' => Some(c),
        // Full-width digits, as some input methods type them.
        '\u{ff10}'..='\u{ff19}' => char::from_digit(c as u32 - 0xff10, 10),
        _ => None,
    };
    // Most texts (e.g. "authorization") hold too few digits to check.
    if text.chars().filter_map(digit).count() < 12 {
        return false;
    }
    let mut runs = vec![String::new()];
    for c in text.chars() {
        if let Some(d) = digit(c) {
            runs.last_mut().expect("never empty").push(d);
        } else if !is_digit_separator(c) {
            runs.push(String::new());
        }
    }
    runs.iter().any(|run| {
        (0..run.len()).any(|s| (12..=19).any(|l| s + l <= run.len() && luhn_valid(&run[s..s + l])))
    })
}

/// Whether `c` may stand between the digit groups of a written card number.
fn is_digit_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '.' | '_' | '/' | ',' | '|' | '\\'
            // Hyphens and dashes of other widths, the minus sign.
            | '\u{2010}'..='\u{2015}' | '\u{2212}'
            // Full-width hyphen, comma, full stop, solidus, low line.
            | '\u{ff0c}'..='\u{ff0f}' | '\u{ff3f}'
        )
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
    fn tenant_rules() {
        assert!(Tenant::parse("demo").is_ok());
        assert!(Tenant::parse("acme-eu_2").is_ok());
        for bad in ["", "Demo", "a b", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(Tenant::parse(bad), Err(Error::InvalidArgument { field, .. }) if field == "tenant")
            );
        }
    }

    #[test]
    fn purpose_rules() {
        assert_eq!(
            Purpose::parse(" authorization ").unwrap().as_str(),
            "authorization"
        );
        assert!(Purpose::parse("").is_err());
        assert!(Purpose::parse("a\nb").is_err());
        assert!(Purpose::parse(&"x".repeat(201)).is_err());
        let e = Purpose::parse("refund for 4111 1111 1111 1111").unwrap_err();
        assert_eq!(
            e,
            Error::invalid("purpose", "must not contain a card number")
        );
        assert!(
            Purpose::parse("order 123456789012").is_ok(),
            "non-Luhn digits are fine"
        );
        // The shortest number checked (12 digits) is still caught; short
        // numbers adding up to 12 digits or more are not one number.
        assert!(contains_card_number("ref 1234-5678-9015"));
        assert!(!contains_card_number("order 1234 item 5678x qty 9015"));
        // Other ways of writing one.
        for written in [
            "4111.1111.1111.1111",
            "4111_1111_1111_1111",
            "\u{ff14}\u{ff11}\u{ff11}\u{ff11}111111111111",
            "refund 4111/1111/1111/1111",
            "4111,1111,1111,1111",
            "4111 | 1111 | 1111 | 1111",
            // No-break, thin and narrow no-break spaces; en dash; full-width hyphen.
            "4111\u{a0}1111\u{a0}1111\u{a0}1111",
            "4111\u{2009}1111\u{2009}1111\u{2009}1111",
            "4111\u{202f}1111\u{202f}1111\u{202f}1111",
            "4111\u{2013}1111\u{2013}1111\u{2013}1111",
            "4111\u{ff0d}1111\u{ff0d}1111\u{ff0d}1111",
        ] {
            assert!(contains_card_number(written), "{written}");
            assert!(Purpose::parse(written).is_err(), "{written}");
        }
        assert!(!contains_card_number("2026-11-26 07:51:01 batch 42"));
        assert!(!contains_card_number("4111:1111:1111 and 1111"));
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

    #[test]
    fn a_card_number_is_not_a_tenant() {
        assert!(Tenant::parse("acme-eu-2").is_ok());
        assert!(Tenant::parse("123456789012").is_ok(), "non-Luhn digits");
        for pan in ["4111111111111111", "acme-4111-1111-1111-1111"] {
            assert_eq!(
                Tenant::parse(pan).unwrap_err(),
                Error::invalid("tenant", "must not contain a card number")
            );
        }
    }
}
