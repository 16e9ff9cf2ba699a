//! Request fields that name or describe, other than card data and
//! tokens: the tenant a call acts for, the purpose of a read, and the
//! checks on free text that is logged and audited in clear (no control
//! characters, no card number).

use crate::card::luhn_valid;
use crate::error::{Error, Result};

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
mod tests {
    use super::*;

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
