//! The primary account number (PAN) and the Luhn check.

use std::fmt;

use zeroize::Zeroizing;

use super::Brand;
use crate::error::{Error, Result};

const FIELD: &str = "pan";

/// Luhn (mod 10) check over a string of ASCII digits. Returns `false` for an
/// empty string or one containing anything other than ASCII digits.
pub fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() {
        return false;
    }
    let mut sum = 0u32;
    // Walk from the check digit leftwards, doubling every second digit.
    for (i, b) in digits.bytes().rev().enumerate() {
        if !b.is_ascii_digit() {
            return false;
        }
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        // Only the residue matters; reducing keeps arbitrarily long input
        // from overflowing.
        sum = (sum + d) % 10;
    }
    sum == 0
}

/// `body` followed by the one check digit that makes it pass the Luhn
/// check (test card numbers: the bench's new cards, tests).
pub fn with_check_digit(body: &str) -> String {
    (0..=9)
        .map(|d| format!("{body}{d}"))
        .find(|s| luhn_valid(s))
        .expect("one check digit always fits")
}

/// A validated card number: 12 to 19 ASCII digits that pass the Luhn check
/// and a brand-specific length rule.
///
/// The digits are wiped from memory on drop. `Debug` and `Display` show only
/// [`Pan::masked`], so a `Pan` can't leak through logging by accident.
#[derive(Clone)]
pub struct Pan(Zeroizing<String>);

impl Pan {
    /// Parses a PAN, ignoring ASCII spaces and dashes used as separators.
    ///
    /// Errors (field `pan`) never include the input or any of its digits.
    pub fn parse(input: &str) -> Result<Pan> {
        // Reserve up front so the buffer never reallocates: a reallocation
        // would leave an un-wiped copy of the digits in freed memory.
        let mut digits = Zeroizing::new(String::with_capacity(input.len()));
        for c in input.chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => digits.push(c),
                _ => {
                    return Err(Error::invalid(
                        FIELD,
                        "must contain only digits, spaces or dashes",
                    ));
                }
            }
        }
        let len = digits.len();
        if len == 0 {
            return Err(Error::invalid(FIELD, "is required"));
        }
        if !(12..=19).contains(&len) {
            return Err(Error::invalid(
                FIELD,
                format!("must be 12 to 19 digits, got {len}"),
            ));
        }
        if !luhn_valid(&digits) {
            return Err(Error::invalid(FIELD, "fails the Luhn check"));
        }
        let brand = Brand::from_digits(&digits);
        if !brand.accepts_len(len) {
            return Err(Error::invalid(
                FIELD,
                format!("length {len} is not valid for {}", brand.as_str()),
            ));
        }
        Ok(Pan(digits))
    }

    /// The full card number, digits only.
    ///
    /// **This is the secret.** Use it only to encrypt, or to return it to a
    /// caller authorised to detokenise; never log it or put it in an error.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The card brand, from the BIN.
    pub fn brand(&self) -> Brand {
        Brand::from_digits(&self.0)
    }

    /// The last four digits, which PCI DSS allows to be shown.
    pub fn last4(&self) -> &str {
        // Construction guarantees at least 12 ASCII digits.
        &self.0[self.0.len() - 4..]
    }

    /// The first six digits (the BIN / IIN), which identify the issuer.
    pub fn bin(&self) -> &str {
        &self.0[..6]
    }

    /// Number of digits (12 to 19).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false` for a parsed PAN; present because `len` is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The PAN with its middle digits replaced by `*`, in the PCI DSS
    /// "first six, last four" form, e.g. `411111******1111`. Numbers shorter
    /// than 15 digits show only the first four, so that at least four digits
    /// stay hidden.
    pub fn masked(&self) -> String {
        mask_digits(&self.0)
    }

    /// The leading digits that may be shown beside the last four: the BIN
    /// (first six) for numbers of 15 digits or more, only the first four
    /// for shorter ones, so that at least four digits stay hidden (first
    /// six and last four of a 12-digit number leave two, which the Luhn
    /// check narrows to about ten candidates).
    pub fn shown_head(&self) -> &str {
        &self.0[..shown_head_len(self.0.len())]
    }

    /// Whether the BIN (first six digits) may be shown beside the last
    /// four: only for numbers of 15 digits or more (see [`Pan::shown_head`]).
    pub fn shows_bin(&self) -> bool {
        shown_head_len(self.0.len()) == 6
    }
}

/// How many leading digits of a `len`-digit card number may be shown (see
/// [`Pan::shown_head`]).
fn shown_head_len(len: usize) -> usize {
    if len >= 15 { 6 } else { 4 }
}

/// A string of digits masked as a card number is shown ([`Pan::masked`]):
/// the leading digits [`Pan::shown_head`] allows, `*` for the middle, the
/// last four. Also for digit strings that may be a card number without
/// being a valid one (e.g. a mistyped number sent as a token).
pub fn mask_digits(digits: &str) -> String {
    let len = digits.len();
    let head = shown_head_len(len).min(len);
    let tail = len.saturating_sub(4).max(head);
    let mut out = String::with_capacity(len);
    out.push_str(&digits[..head]);
    out.extend(std::iter::repeat_n('*', tail - head));
    out.push_str(&digits[tail..]);
    out
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers_show_four_leading_digits_long_ones_six() {
        let pan = Pan::parse("378282246310005").unwrap();
        assert_eq!(
            (pan.shown_head(), pan.masked().as_str()),
            ("378282", "378282*****0005")
        );
        let short = with_check_digit("50180000001");
        let pan = Pan::parse(&short).unwrap();
        assert_eq!(pan.shown_head(), "5018");
        assert_eq!(pan.masked(), format!("5018****{}", &short[8..]));
    }

    const TEST_CARDS: &[(&str, Brand)] = &[
        ("4111111111111111", Brand::Visa),
        ("4012888888881881", Brand::Visa),
        ("5555555555554444", Brand::Mastercard),
        ("2223003122003222", Brand::Mastercard),
        ("378282246310005", Brand::Amex),
        ("371449635398431", Brand::Amex),
        ("6011111111111117", Brand::Discover),
        ("3530111333300000", Brand::Jcb),
        ("36227206271667", Brand::DinersClub),
        ("3056930009020004", Brand::DinersClub),
        ("6200000000000005", Brand::UnionPay),
    ];

    /// Parses `input`, expects an `InvalidArgument` on `pan` with `reason`,
    /// and checks the message leaks neither the input nor any 4-digit run of it.
    fn expect_err(input: &str, reason: &str) {
        let err = Pan::parse(input).expect_err(input);
        assert_eq!(err, Error::invalid("pan", reason), "input {input:?}");
        assert_no_leak(&err.to_string(), input);
        assert_no_leak(&format!("{err:?}"), input);
    }

    fn assert_no_leak(message: &str, input: &str) {
        // Inputs made only of separators are trivially "contained" in any
        // message with a space; there is nothing to leak in them.
        if input.chars().any(|c| !matches!(c, ' ' | '-')) {
            assert!(!message.contains(input), "{message:?} leaks {input:?}");
        }
        let digits: Vec<u8> = input.bytes().filter(u8::is_ascii_digit).collect();
        for w in digits.windows(4) {
            let run = std::str::from_utf8(w).unwrap();
            assert!(!message.contains(run), "{message:?} leaks {run:?}");
        }
    }

    #[test]
    fn luhn_vectors() {
        for (pan, _) in TEST_CARDS {
            assert!(luhn_valid(pan), "{pan}");
        }
        assert!(luhn_valid("79927398713"));
        assert!(luhn_valid("0"));
        assert!(luhn_valid("18"));
        assert!(!luhn_valid("79927398710"));
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid("1"));
        assert!(!luhn_valid(""));
        assert!(!luhn_valid("4111 1111 1111 1111"));
        assert!(!luhn_valid("41111111111111a1"));
        assert!(!luhn_valid("٤"));
        // Long input must not overflow.
        assert!(luhn_valid(&"0".repeat(100_000)));
    }

    #[test]
    fn test_cards_round_trip() {
        for &(input, brand) in TEST_CARDS {
            let pan = Pan::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(pan.expose(), input);
            assert_eq!(pan.brand(), brand, "{input}");
            assert_eq!(pan.len(), input.len());
            assert!(!pan.is_empty());
            assert_eq!(pan.last4(), &input[input.len() - 4..]);
            assert_eq!(pan.bin(), &input[..6]);
            let again = Pan::parse(pan.expose()).unwrap();
            assert_eq!(again.expose(), input);
        }
    }

    #[test]
    fn separators_are_stripped() {
        for input in [
            "4111 1111-1111 1111",
            "4111-1111-1111-1111",
            " 4111111111111111 ",
            "4-1-1-1 1 1 1 1 1 1 1 1 1 1 1 1",
        ] {
            let pan = Pan::parse(input).unwrap();
            assert_eq!(pan.expose(), "4111111111111111");
            assert_eq!(pan.brand(), Brand::Visa);
        }
    }

    #[test]
    fn clone_keeps_digits() {
        let pan = Pan::parse("5555555555554444").unwrap();
        let copy = pan.clone();
        drop(pan);
        assert_eq!(copy.expose(), "5555555555554444");
    }

    #[test]
    fn rejects_bad_characters() {
        let reason = "must contain only digits, spaces or dashes";
        for input in [
            "4111x11111111111",
            "4111.1111.1111.1111",
            "4111\t1111111111111",
            "4111_1111_1111_1111",
            "+4111111111111111",
            "４１１１１１１１１１１１１１１１",
            "٤١١١١١١١١١١١١١١١",
            "4111111111111111\0",
        ] {
            expect_err(input, reason);
        }
    }

    #[test]
    fn rejects_empty() {
        for input in ["", " ", "- -", "----"] {
            expect_err(input, "is required");
        }
    }

    #[test]
    fn rejects_bad_length() {
        expect_err("4111111111", "must be 12 to 19 digits, got 10");
        expect_err("42424242424", "must be 12 to 19 digits, got 11");
        expect_err("41111111111111111111", "must be 12 to 19 digits, got 20");
        expect_err("4", "must be 12 to 19 digits, got 1");
        // Very long input is rejected without trouble.
        let long = "7".repeat(10_000);
        let err = Pan::parse(&long).unwrap_err();
        assert!(!err.to_string().contains("7777"));
    }

    #[test]
    fn rejects_luhn_failure() {
        for input in [
            "4111111111111112",
            "5555555555554443",
            "378282246310006",
            "4111 1111 1111 1112",
        ] {
            expect_err(input, "fails the Luhn check");
        }
    }

    #[test]
    fn brand_length_rules() {
        // Luhn-valid numbers whose length the brand does not issue.
        let visa14 = with_check_digit("4111111111111");
        let visa17 = with_check_digit("4111111111111111");
        let mc15 = with_check_digit("55555555555544");
        let mc19 = with_check_digit("555555555555444455");
        let amex16 = with_check_digit("378282246310005");
        let diners13 = with_check_digit("362272062716");
        let jcb15 = with_check_digit("35301113333000");
        expect_err(&visa14, "length 14 is not valid for VISA");
        expect_err(&visa17, "length 17 is not valid for VISA");
        expect_err(&mc15, "length 15 is not valid for MASTERCARD");
        expect_err(&mc19, "length 19 is not valid for MASTERCARD");
        expect_err(&amex16, "length 16 is not valid for AMEX");
        expect_err(&diners13, "length 13 is not valid for DINERS_CLUB");
        expect_err(&jcb15, "length 15 is not valid for JCB");

        // Lengths each brand does accept.
        for body in ["411111111111", "411111111111111", "411111111111111111"] {
            let pan = Pan::parse(&with_check_digit(body)).unwrap();
            assert_eq!(pan.brand(), Brand::Visa);
        }
        // Unknown brands pass on length and Luhn alone, down to 12 digits.
        for body in ["99999999999", "999999999999999999"] {
            let pan = Pan::parse(&with_check_digit(body)).unwrap();
            assert_eq!(pan.brand(), Brand::Unknown);
        }
    }

    #[test]
    fn mastercard_two_series_boundaries() {
        for (prefix, brand) in [
            ("2221", Brand::Mastercard),
            ("2720", Brand::Mastercard),
            ("2220", Brand::Unknown),
            ("2721", Brand::Unknown),
        ] {
            let input = with_check_digit(&format!("{prefix}00000000000"));
            assert_eq!(input.len(), 16);
            let pan = Pan::parse(&input).unwrap();
            assert_eq!(pan.brand(), brand, "{prefix}");
        }
    }

    #[test]
    fn masking() {
        let cases = [
            ("4111111111111111", "411111******1111"),
            ("378282246310005", "378282*****0005"),
            ("36227206271667", "3622******1667"),
            ("4222222222222", "4222*****2222"),
        ];
        for (input, masked) in cases {
            assert_eq!(Pan::parse(input).unwrap().masked(), masked);
        }
        let nineteen = with_check_digit("411111111111111111");
        let pan = Pan::parse(&nineteen).unwrap();
        assert_eq!(pan.masked(), format!("411111*********{}", &nineteen[15..]));
        let twelve = with_check_digit("99999999999");
        let pan = Pan::parse(&twelve).unwrap();
        assert_eq!(pan.masked(), format!("9999****{}", &twelve[8..]));
    }

    #[test]
    fn debug_and_display_are_masked() {
        for &(input, _) in TEST_CARDS {
            let pan = Pan::parse(input).unwrap();
            let debug = format!("{pan:?}");
            let display = format!("{pan}");
            assert_eq!(debug, pan.masked());
            assert_eq!(display, pan.masked());
            assert!(!debug.contains(input));
            assert!(!display.contains(input));
            // Hidden middle digits never show up, even pretty-printed.
            let pretty = format!("{pan:#?}");
            assert!(!pretty.contains(input));
            assert!(!format!("{:?}", Some(&pan)).contains(input));
        }
    }
}
