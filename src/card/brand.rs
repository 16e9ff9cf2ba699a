//! Card brand detection from the BIN (leading digits).

/// The card network, as far as it can be told from the leading digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Brand {
    /// Visa (leading 4).
    Visa,
    /// Mastercard (51–55 and the 2-series 2221–2720).
    Mastercard,
    /// American Express (34, 37).
    Amex,
    /// Discover (6011, 644–649, 65).
    Discover,
    /// JCB (3528–3589).
    Jcb,
    /// Diners Club (300–305, 3095, 36, 38–39).
    DinersClub,
    /// China UnionPay (62, 81).
    UnionPay,
    /// Any other prefix. Still accepted if length and Luhn check pass, since
    /// BIN tables change faster than this code.
    Unknown,
}

/// BIN ranges as `(prefix length, low, high, brand)`, inclusive. The ranges do
/// not overlap, so the order of the table does not matter.
const BIN_RANGES: &[(usize, u32, u32, Brand)] = &[
    (1, 4, 4, Brand::Visa),
    (2, 51, 55, Brand::Mastercard),
    (4, 2221, 2720, Brand::Mastercard),
    (2, 34, 34, Brand::Amex),
    (2, 37, 37, Brand::Amex),
    (4, 6011, 6011, Brand::Discover),
    (3, 644, 649, Brand::Discover),
    (2, 65, 65, Brand::Discover),
    (4, 3528, 3589, Brand::Jcb),
    (2, 36, 36, Brand::DinersClub),
    (3, 300, 305, Brand::DinersClub),
    (4, 3095, 3095, Brand::DinersClub),
    (2, 38, 39, Brand::DinersClub),
    (2, 62, 62, Brand::UnionPay),
    (2, 81, 81, Brand::UnionPay),
];

/// The first `n` characters of `digits` as a number, or `None` if there are
/// fewer than `n` or any of them is not an ASCII digit. Never panics.
fn prefix(digits: &str, n: usize) -> Option<u32> {
    digits
        .as_bytes()
        .get(..n)?
        .iter()
        .try_fold(0u32, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
        })
}

impl Brand {
    /// Stable upper-case name, used in storage, audit records and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Brand::Visa => "VISA",
            Brand::Mastercard => "MASTERCARD",
            Brand::Amex => "AMEX",
            Brand::Discover => "DISCOVER",
            Brand::Jcb => "JCB",
            Brand::DinersClub => "DINERS_CLUB",
            Brand::UnionPay => "UNIONPAY",
            Brand::Unknown => "UNKNOWN",
        }
    }

    /// Brand from the leading digits of a PAN. Only the prefix is examined, so
    /// a partial number works; anything unrecognised is [`Brand::Unknown`].
    pub fn from_digits(digits: &str) -> Brand {
        BIN_RANGES
            .iter()
            .find(|&&(n, lo, hi, _)| prefix(digits, n).is_some_and(|p| (lo..=hi).contains(&p)))
            .map_or(Brand::Unknown, |&(_, _, _, brand)| brand)
    }

    /// Number of CVV digits the brand uses: Amex prints 4 (the CID), the
    /// others 3.
    pub fn cvv_len(self) -> usize {
        match self {
            Brand::Amex => 4,
            _ => 3,
        }
    }

    /// Whether a PAN of `len` digits is plausible for this brand. Only
    /// well-defined network lengths are enforced; the overall 12..=19 bound is
    /// checked separately by [`super::Pan::parse`].
    pub(super) fn accepts_len(self, len: usize) -> bool {
        match self {
            Brand::Visa => matches!(len, 13 | 16 | 19),
            Brand::Mastercard => len == 16,
            Brand::Amex => len == 15,
            Brand::DinersClub => (14..=19).contains(&len),
            Brand::Discover | Brand::Jcb | Brand::UnionPay => (16..=19).contains(&len),
            Brand::Unknown => (12..=19).contains(&len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_names() {
        let all = [
            (Brand::Visa, "VISA"),
            (Brand::Mastercard, "MASTERCARD"),
            (Brand::Amex, "AMEX"),
            (Brand::Discover, "DISCOVER"),
            (Brand::Jcb, "JCB"),
            (Brand::DinersClub, "DINERS_CLUB"),
            (Brand::UnionPay, "UNIONPAY"),
            (Brand::Unknown, "UNKNOWN"),
        ];
        for (brand, name) in all {
            assert_eq!(brand.as_str(), name);
        }
    }

    #[test]
    fn bin_ranges() {
        let cases = [
            ("4", Brand::Visa),
            ("51", Brand::Mastercard),
            ("55", Brand::Mastercard),
            ("50", Brand::Unknown),
            ("56", Brand::Unknown),
            ("2221", Brand::Mastercard),
            ("2720", Brand::Mastercard),
            ("2220", Brand::Unknown),
            ("2721", Brand::Unknown),
            ("34", Brand::Amex),
            ("37", Brand::Amex),
            ("35", Brand::Unknown),
            ("6011", Brand::Discover),
            ("6012", Brand::Unknown),
            ("644", Brand::Discover),
            ("649", Brand::Discover),
            ("643", Brand::Unknown),
            ("65", Brand::Discover),
            ("3528", Brand::Jcb),
            ("3589", Brand::Jcb),
            ("3527", Brand::Unknown),
            ("3590", Brand::Unknown),
            ("36", Brand::DinersClub),
            ("300", Brand::DinersClub),
            ("305", Brand::DinersClub),
            ("306", Brand::Unknown),
            ("3095", Brand::DinersClub),
            ("3096", Brand::Unknown),
            ("38", Brand::DinersClub),
            ("39", Brand::DinersClub),
            ("62", Brand::UnionPay),
            ("81", Brand::UnionPay),
            ("1", Brand::Unknown),
            ("9", Brand::Unknown),
        ];
        for (digits, brand) in cases {
            assert_eq!(Brand::from_digits(digits), brand, "{digits}");
            // A full-length number with the same prefix gets the same brand.
            let long = format!("{digits}{}", "0".repeat(16 - digits.len()));
            assert_eq!(Brand::from_digits(&long), brand, "{long}");
        }
    }

    #[test]
    fn from_digits_tolerates_junk() {
        assert_eq!(Brand::from_digits(""), Brand::Unknown);
        assert_eq!(Brand::from_digits("x4"), Brand::Unknown);
        assert_eq!(Brand::from_digits("3a"), Brand::Unknown);
        assert_eq!(Brand::from_digits("é"), Brand::Unknown);
        assert_eq!(Brand::from_digits("4é"), Brand::Visa);
    }

    #[test]
    fn cvv_lengths() {
        assert_eq!(Brand::Amex.cvv_len(), 4);
        assert_eq!(Brand::Visa.cvv_len(), 3);
        assert_eq!(Brand::Unknown.cvv_len(), 3);
    }
}
