//! The failure rate limiter of SPEC section 3, step 5: a token bucket per client address that
//! only failed verifications drain. It is consulted just before argon2 work, never for a
//! credential that is already verified and cached, so good keys keep flowing from an address
//! that a bad client shares.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Failures a client may make in a burst, and how fast that allowance refills.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureBudget {
    pub burst: u32,
    pub per_minute: u32,
}

impl FailureBudget {
    pub fn is_unlimited(&self) -> bool {
        self.per_minute == 0
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct FailureLimiter {
    budget: FailureBudget,
    /// Keyed by client address; `None` collects requests that carried none. Bounded, so a
    /// spray of spoofed addresses cannot grow memory without limit.
    buckets: moka::sync::Cache<Option<IpAddr>, Arc<Mutex<Bucket>>>,
}

impl FailureLimiter {
    pub fn new(budget: FailureBudget) -> Self {
        Self {
            budget,
            buckets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    fn refill_rate(&self) -> f64 {
        f64::from(self.budget.per_minute) / 60.0
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.refill_rate()).min(f64::from(self.budget.burst));
        bucket.updated = now;
    }

    /// `Some(retry_after)` when the client has used up its failures and must wait.
    pub fn check(&self, client: Option<IpAddr>) -> Option<Duration> {
        if self.budget.is_unlimited() {
            return None;
        }
        let bucket = self.buckets.get(&client)?;
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.refill(&mut bucket, Instant::now());
        if bucket.tokens >= 1.0 {
            None
        } else {
            let wait = (1.0 - bucket.tokens) / self.refill_rate();
            Some(Duration::from_secs_f64(wait.max(0.001)))
        }
    }

    /// Spends one token of the client's allowance.
    pub fn record_failure(&self, client: Option<IpAddr>) {
        if self.budget.is_unlimited() {
            return;
        }
        let burst = f64::from(self.budget.burst);
        let bucket = self.buckets.get_with(client, || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                updated: Instant::now(),
            }))
        });
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.refill(&mut bucket, Instant::now());
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn allows_a_burst_then_limits_that_client_only() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 3,
            per_minute: 1,
        });
        for _ in 0..3 {
            assert_eq!(limiter.check(ip(1)), None);
            limiter.record_failure(ip(1));
        }
        let retry = limiter.check(ip(1)).expect("limited after the burst");
        assert!(
            retry > Duration::from_secs(50) && retry <= Duration::from_secs(60),
            "{retry:?}"
        );
        assert_eq!(limiter.check(ip(2)), None, "other clients are unaffected");
        assert_eq!(limiter.check(None), None);
    }

    #[test]
    fn refills_over_time() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 1,
            per_minute: 60_000,
        });
        limiter.record_failure(ip(1));
        assert!(limiter.check(ip(1)).is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(limiter.check(ip(1)), None);
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 0,
            per_minute: 0,
        });
        for _ in 0..100 {
            limiter.record_failure(ip(1));
        }
        assert_eq!(limiter.check(ip(1)), None);
    }
}
