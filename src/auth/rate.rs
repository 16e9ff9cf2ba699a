//! Per-principal token buckets: a leaked processor credential can drain
//! cards only as fast as its detokenize budget allows, and a leaked
//! merchant credential can guess at stored cards only as fast as its
//! tokenize budgets allow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::policy::RateLimit;
use crate::sync::Recover;

struct Bucket {
    tokens: f64,
    last: Instant,
    limit: RateLimit,
}

/// Token buckets keyed by principal name.
#[derive(Default)]
pub struct RateLimiter {
    /// Buckets by principal; a short critical section, no I/O.
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes `cards` from the principal's bucket. `Err(wait_secs)` when the
    /// budget does not cover them (nothing is taken then).
    pub fn take(&self, principal: &str, limit: RateLimit, cards: u32) -> Result<(), f64> {
        self.take_at(principal, limit, cards, Instant::now())
    }

    /// Refuses while less than one unit is left, whatever `charge` says,
    /// and otherwise takes one if `charge`: the refusal does not depend on
    /// what is being charged for. `Err(wait_secs)` when refused.
    pub fn admit(&self, principal: &str, limit: RateLimit, charge: bool) -> Result<(), f64> {
        self.admit_at(principal, limit, charge, Instant::now())
    }

    fn admit_at(
        &self,
        principal: &str,
        limit: RateLimit,
        charge: bool,
        now: Instant,
    ) -> Result<(), f64> {
        self.with_bucket(principal, limit, now, |b| {
            if b.tokens < 1.0 {
                Err((1.0 - b.tokens) / limit.per_second)
            } else {
                if charge {
                    b.tokens -= 1.0;
                }
                Ok(())
            }
        })
    }

    fn take_at(
        &self,
        principal: &str,
        limit: RateLimit,
        cards: u32,
        now: Instant,
    ) -> Result<(), f64> {
        self.with_bucket(principal, limit, now, |b| {
            let want = cards as f64;
            if b.tokens >= want {
                b.tokens -= want;
                Ok(())
            } else {
                Err((want - b.tokens) / limit.per_second)
            }
        })
    }

    /// Runs `f` on the principal's bucket, refilled up to `now`.
    fn with_bucket<T>(
        &self,
        principal: &str,
        limit: RateLimit,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> T,
    ) -> T {
        let mut map = self.buckets.lock().recover();
        // The principal's name is copied only the first time: every tokenize
        // and detokenize passes here, some twice.
        if !map.contains_key(principal) {
            let fresh = Bucket {
                tokens: limit.burst,
                last: now,
                limit,
            };
            map.insert(principal.to_owned(), fresh);
        }
        let b = map.get_mut(principal).expect("inserted above");
        if b.limit != limit {
            // Policy reloaded with a new budget: keep the level, clamp to the new size.
            b.limit = limit;
            b.tokens = b.tokens.min(limit.burst);
        }
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
        b.last = now;
        f(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn admission_refuses_alike_once_spent_and_charges_only_when_told() {
        let r = RateLimiter::default();
        let lim = RateLimit {
            per_second: 1.0,
            burst: 2.0,
        };
        let t0 = Instant::now();
        // Uncharged admissions cost nothing.
        for _ in 0..10 {
            r.admit_at("p", lim, false, t0).unwrap();
        }
        r.admit_at("p", lim, true, t0).unwrap();
        r.admit_at("p", lim, true, t0).unwrap();
        // Spent: refused whether or not it would be charged.
        assert!(r.admit_at("p", lim, true, t0).is_err());
        assert!(r.admit_at("p", lim, false, t0).is_err());
        // One second refills one.
        r.admit_at("p", lim, true, t0 + Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn bucket_trips_and_refills() {
        let r = RateLimiter::default();
        let lim = RateLimit {
            per_second: 10.0,
            burst: 5.0,
        };
        let t0 = Instant::now();
        for _ in 0..5 {
            r.take_at("p", lim, 1, t0).unwrap();
        }
        assert!(r.take_at("p", lim, 1, t0).is_err());
        // Another principal has its own bucket.
        r.take_at("q", lim, 5, t0).unwrap();
        // 0.3 s later three cards have been refilled.
        let t1 = t0 + Duration::from_millis(300);
        r.take_at("p", lim, 3, t1).unwrap();
        assert!(r.take_at("p", lim, 1, t1).is_err());
        // A batch bigger than the burst can never pass.
        assert!(
            r.take_at("p", lim, 6, t1 + Duration::from_secs(60))
                .is_err()
        );
    }
}
