//! Per-principal token buckets for detokenize: a leaked processor
//! credential can drain cards only as fast as its budget allows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::policy::RateLimit;

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

    fn take_at(
        &self,
        principal: &str,
        limit: RateLimit,
        cards: u32,
        now: Instant,
    ) -> Result<(), f64> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(principal.to_owned()).or_insert(Bucket {
            tokens: limit.burst,
            last: now,
            limit,
        });
        if b.limit != limit {
            // Policy reloaded with a new budget: keep the level, clamp to the new size.
            b.limit = limit;
            b.tokens = b.tokens.min(limit.burst);
        }
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
        b.last = now;
        let want = cards as f64;
        if b.tokens >= want {
            b.tokens -= want;
            Ok(())
        } else {
            Err((want - b.tokens) / limit.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
