//! Card verification value.

use std::fmt;

use zeroize::Zeroizing;

use super::Brand;
use crate::error::{Error, Result};

const FIELD: &str = "cvv";

/// A validated CVV (CVC, CID): 3 digits, or 4 for Amex.
///
/// PCI DSS forbids storing it after authorisation, so it is only ever held in
/// memory and wiped on drop. `Debug` and `Display` print `***` whatever the
/// length, so output does not even hint at the brand's CVV length.
#[derive(Clone)]
pub struct Cvv(Zeroizing<String>);

impl Cvv {
    /// Parses a CVV for a card of the given brand. No whitespace is accepted:
    /// a CVV is a short fixed-width field, so stray characters signal a bug.
    ///
    /// Errors (field `cvv`) never include the input.
    pub fn parse(input: &str, brand: Brand) -> Result<Cvv> {
        if !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid(FIELD, "must contain only digits"));
        }
        // All ASCII now, so byte length is digit count.
        if input.len() != brand.cvv_len() {
            let reason = match brand {
                Brand::Amex => "must be 4 digits for AMEX",
                _ => "must be 3 digits",
            };
            return Err(Error::invalid(FIELD, reason));
        }
        Ok(Cvv(Zeroizing::new(input.to_owned())))
    }

    /// The CVV digits.
    ///
    /// **This is a secret.** Pass it only to the authorisation path; never
    /// log, persist or put it in an error.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Cvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect_err(input: &str, brand: Brand, reason: &str) {
        let err = Cvv::parse(input, brand).expect_err(input);
        assert_eq!(err, Error::invalid("cvv", reason), "{input:?}");
        if !input.is_empty() {
            assert!(!err.to_string().contains(input));
            assert!(!format!("{err:?}").contains(input));
        }
    }

    #[test]
    fn accepts_valid() {
        assert_eq!(Cvv::parse("123", Brand::Visa).unwrap().expose(), "123");
        assert_eq!(Cvv::parse("000", Brand::Unknown).unwrap().expose(), "000");
        assert_eq!(Cvv::parse("1234", Brand::Amex).unwrap().expose(), "1234");
        let cvv = Cvv::parse("987", Brand::Mastercard).unwrap();
        assert_eq!(cvv.clone().expose(), "987");
    }

    #[test]
    fn rejects_non_digits() {
        for input in ["12a", " 123", "123 ", "1-2", "١٢٣", "12\n", "abcd"] {
            expect_err(input, Brand::Visa, "must contain only digits");
            expect_err(input, Brand::Amex, "must contain only digits");
        }
    }

    #[test]
    fn rejects_wrong_length() {
        for input in ["", "1", "12", "1234", "12345"] {
            expect_err(input, Brand::Visa, "must be 3 digits");
        }
        for input in ["", "123", "12345", "987"] {
            expect_err(input, Brand::Amex, "must be 4 digits for AMEX");
        }
    }

    #[test]
    fn debug_and_display_hide_value() {
        for (input, brand) in [("123", Brand::Visa), ("8642", Brand::Amex)] {
            let cvv = Cvv::parse(input, brand).unwrap();
            assert_eq!(format!("{cvv:?}"), "***");
            assert_eq!(format!("{cvv}"), "***");
            assert_eq!(format!("{cvv:#?}"), "***");
            assert!(!format!("{:?}", Some(&cvv)).contains(input));
        }
    }
}
