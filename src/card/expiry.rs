//! Card expiry date and the current month.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// How far ahead an expiry may be. Issuers use a few years; anything beyond
/// this is a typo or garbage, not a card.
const MAX_YEARS_AHEAD: u64 = 50;

/// A calendar month (UTC). Ordered chronologically: year first, then month.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct YearMonth {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// Month, 1 to 12.
    pub month: u32,
}

impl YearMonth {
    /// The current month in UTC, from the system clock. A clock set before
    /// 1970 yields 1970-01 rather than panicking.
    pub fn now_utc() -> YearMonth {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::from_unix_secs(secs)
    }

    /// The UTC month containing the Unix timestamp `secs`.
    ///
    /// Uses Howard Hinnant's `civil_from_days` algorithm, specialised to
    /// non-negative day counts so it can stay in unsigned arithmetic.
    pub fn from_unix_secs(secs: u64) -> YearMonth {
        let days = secs / 86_400;
        // Shift the epoch to 0000-03-01 so leap days fall at the end of the
        // (March-based) year.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097; // day of era, 0..=146096
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year
        let mp = (5 * doy + 2) / 153; // March = 0
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        YearMonth {
            year: u32::try_from(year).unwrap_or(u32::MAX),
            // `month` is 1..=12 by construction, so the conversion is exact.
            month: u32::try_from(month).unwrap_or(12),
        }
    }

    /// Months since year 0, for distance arithmetic that cannot overflow.
    fn index(self) -> u64 {
        u64::from(self.year) * 12 + u64::from(self.month)
    }
}

/// A validated card expiry (month and 4-digit year). Not secret: it may be
/// logged and returned with a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    month: u32,
    year: u32,
}

impl Expiry {
    /// Validates an expiry against `today` (pass [`YearMonth::now_utc`] in
    /// production; tests pass a fixed month).
    ///
    /// Two-digit years are taken as 20YY. A card is valid through the end of
    /// its expiry month, so `today` equal to the expiry is accepted.
    pub fn new(month: u32, year: u32, today: YearMonth) -> Result<Expiry> {
        if !(1..=12).contains(&month) {
            return Err(Error::invalid("exp_month", "must be 1 to 12"));
        }
        let year = match year {
            // proto3 sends an unset field as 0.
            0 => return Err(Error::invalid("exp_year", "is required")),
            1..=99 => 2000 + year,
            2000..=2099 => year,
            _ => return Err(Error::invalid("exp_year", "must be a 4-digit year")),
        };
        let expiry = YearMonth { year, month };
        if expiry < today {
            return Err(Error::invalid("exp_year", "card has expired"));
        }
        // Saturating: `today` has public fields, so its month is not
        // guaranteed to be 1..=12 and the index order may disagree with `<`.
        if expiry.index().saturating_sub(today.index()) > MAX_YEARS_AHEAD * 12 {
            return Err(Error::invalid("exp_year", "is too far in the future"));
        }
        Ok(Expiry { month, year })
    }

    /// Expiry month, 1 to 12.
    pub fn month(&self) -> u32 {
        self.month
    }

    /// Expiry year, four digits.
    pub fn year(&self) -> u32 {
        self.year
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODAY: YearMonth = YearMonth {
        year: 2026,
        month: 6,
    };

    fn ym(year: u32, month: u32) -> YearMonth {
        YearMonth { year, month }
    }

    #[test]
    fn unix_secs_known_dates() {
        let cases = [
            (0, ym(1970, 1)),
            (86_399, ym(1970, 1)),
            (2_678_399, ym(1970, 1)),     // 1970-01-31T23:59:59
            (2_678_400, ym(1970, 2)),     // 1970-02-01
            (951_782_400, ym(2000, 2)),   // 2000-02-29
            (951_868_800, ym(2000, 3)),   // 2000-03-01
            (946_684_799, ym(1999, 12)),  // 1999-12-31T23:59:59
            (946_684_800, ym(2000, 1)),   // 2000-01-01
            (1_709_164_800, ym(2024, 2)), // 2024-02-29
            (1_790_000_000, ym(2026, 9)),
            (4_107_542_400, ym(2100, 3)), // 2100-03-01 (not a leap year)
            (4_107_455_999, ym(2100, 2)), // 2100-02-28T23:59:59
        ];
        for (secs, expected) in cases {
            assert_eq!(YearMonth::from_unix_secs(secs), expected, "{secs}");
        }
    }

    #[test]
    fn unix_secs_extreme_does_not_panic() {
        let far = YearMonth::from_unix_secs(u64::MAX);
        assert!((1..=12).contains(&far.month));
    }

    #[test]
    fn now_is_plausible() {
        let now = YearMonth::now_utc();
        assert!(now >= ym(2024, 1));
        assert!((1..=12).contains(&now.month));
    }

    #[test]
    fn year_month_ordering() {
        assert!(ym(2026, 12) < ym(2027, 1));
        assert!(ym(2026, 5) < ym(2026, 6));
        assert_eq!(ym(2026, 6), TODAY);
    }

    #[test]
    fn accepts_valid() {
        let e = Expiry::new(12, 2030, TODAY).unwrap();
        assert_eq!((e.month(), e.year()), (12, 2030));
        let e = Expiry::new(1, 31, TODAY).unwrap();
        assert_eq!((e.month(), e.year()), (1, 2031));
    }

    #[test]
    fn current_month_is_still_valid() {
        let e = Expiry::new(6, 2026, TODAY).unwrap();
        assert_eq!((e.month(), e.year()), (6, 2026));
        assert!(Expiry::new(6, 26, TODAY).is_ok());
    }

    #[test]
    fn expired() {
        let err = Error::invalid("exp_year", "card has expired");
        assert_eq!(Expiry::new(5, 2026, TODAY), Err(err.clone()));
        assert_eq!(Expiry::new(12, 2025, TODAY), Err(err.clone()));
        assert_eq!(Expiry::new(12, 25, TODAY), Err(err.clone()));
        assert_eq!(
            Expiry::new(1, 0, TODAY),
            Err(Error::invalid("exp_year", "is required"))
        );
        assert_eq!(Expiry::new(1, 2000, TODAY), Err(err));
    }

    #[test]
    fn bad_month() {
        let err = Error::invalid("exp_month", "must be 1 to 12");
        for month in [0, 13, 99, u32::MAX] {
            assert_eq!(Expiry::new(month, 2030, TODAY), Err(err.clone()));
        }
    }

    #[test]
    fn bad_year() {
        let err = Error::invalid("exp_year", "must be a 4-digit year");
        for year in [100, 999, 1999, 2100, 9999, u32::MAX] {
            assert_eq!(Expiry::new(1, year, TODAY), Err(err.clone()), "{year}");
        }
        assert!(Expiry::new(1, 99, ym(2050, 1)).is_ok());
        assert!(Expiry::new(12, 2099, ym(2050, 1)).is_ok());
    }

    #[test]
    fn too_far_ahead() {
        let err = Error::invalid("exp_year", "is too far in the future");
        // Exactly 50 years ahead is fine, one month more is not.
        assert!(Expiry::new(6, 2076, TODAY).is_ok());
        assert_eq!(Expiry::new(7, 2076, TODAY), Err(err.clone()));
        assert_eq!(Expiry::new(1, 2099, TODAY), Err(err.clone()));
        assert_eq!(Expiry::new(1, 99, TODAY), Err(err));
    }

    #[test]
    fn odd_today_does_not_panic() {
        assert!(Expiry::new(1, 2027, ym(2026, 20)).is_ok());
        assert!(Expiry::new(1, 2027, ym(0, 0)).is_err());
        assert!(Expiry::new(1, 2027, ym(u32::MAX, u32::MAX)).is_err());
    }

    #[test]
    fn month_checked_before_year() {
        assert_eq!(
            Expiry::new(13, 1999, TODAY),
            Err(Error::invalid("exp_month", "must be 1 to 12"))
        );
    }
}
