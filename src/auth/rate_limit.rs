//! The failure rate limiter of SPEC section 3, step 5: a token bucket per client address that
//! only failures drain. It is consulted before costly work (a store lookup, an argon2 run),
//! never for a credential that is already verified and held in memory, so good keys keep
//! flowing from an address that a bad client shares.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
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

    /// A limiter that never limits, for processes in which nobody signs in (`keygate user`).
    pub fn unlimited() -> Self {
        Self::new(FailureBudget {
            burst: 0,
            per_minute: 0,
        })
    }

    fn refill_rate(&self) -> f64 {
        f64::from(self.budget.per_minute) / 60.0
    }

    /// The bucket, locked, with the tokens it has regained since it was last touched.
    fn refilled<'b>(&self, bucket: &'b Mutex<Bucket>) -> MutexGuard<'b, Bucket> {
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.refill_rate()).min(f64::from(self.budget.burst));
        bucket.updated = now;
        bucket
    }

    /// Whether the client has budget left for work that may fail; when it has none, how long
    /// until it has. Takes nothing: for cheap work whose failures are then charged with `fail`,
    /// so that many concurrent first uses of a good key from one address are never refused.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        if self.budget.is_unlimited() {
            return Ok(());
        }
        let Some(bucket) = self.buckets.get(&budget_holder(client)) else {
            return Ok(());
        };
        self.wait_for_token(&self.refilled(&bucket))
    }

    /// Charges one failure to the client; `Err` with the wait when its budget was already
    /// spent (the failure then counts as rate limited).
    pub fn fail(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        self.begin(client).map(Attempt::failed)
    }

    fn wait_for_token(&self, bucket: &Bucket) -> Result<(), Duration> {
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / self.refill_rate();
        Err(Duration::from_secs_f64(wait.max(0.001)))
    }

    /// Starts a verification that may fail: takes one token of the client's allowance up front,
    /// or returns how long to wait when none is left. Taking it before argon2 runs (not after
    /// it failed) is what bounds the work of a client with many requests in flight: with a
    /// check-then-record limiter, every concurrent request would pass the check before the
    /// first failure is recorded. The token comes back unless the attempt is marked `failed`.
    pub fn begin(&self, client: Option<IpAddr>) -> Result<Attempt<'_>, Duration> {
        let client = budget_holder(client);
        if self.budget.is_unlimited() {
            return Ok(Attempt {
                limiter: self,
                client,
                settled: true,
            });
        }
        let burst = f64::from(self.budget.burst);
        let bucket = self.buckets.get_with(client, || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                updated: Instant::now(),
            }))
        });
        let mut bucket = self.refilled(&bucket);
        self.wait_for_token(&bucket)?;
        bucket.tokens -= 1.0;
        Ok(Attempt {
            limiter: self,
            client,
            settled: false,
        })
    }

    fn refund(&self, client: Option<IpAddr>) {
        if let Some(bucket) = self.buckets.get(&client) {
            let mut bucket = self.refilled(&bucket);
            bucket.tokens = (bucket.tokens + 1.0).min(f64::from(self.budget.burst));
        }
    }
}

/// Whose budget a client address spends: its own for IPv4, its /64 for IPv6 (one host is
/// routinely given a whole /64, so a budget per address would be no limit at all).
fn budget_holder(client: Option<IpAddr>) -> Option<IpAddr> {
    match client?.to_canonical() {
        IpAddr::V6(v6) => Some(IpAddr::V6(std::net::Ipv6Addr::from_bits(
            v6.to_bits() & !((1u128 << 64) - 1),
        ))),
        v4 => Some(v4),
    }
}

/// A verification in progress that holds one token of its client's allowance: spent if the
/// attempt is marked `failed`, given back when it is dropped otherwise (a match, or no verdict
/// at all because the work could not be done).
#[must_use = "dropping the attempt gives its token back"]
pub struct Attempt<'a> {
    limiter: &'a FailureLimiter,
    client: Option<IpAddr>,
    settled: bool,
}

impl Attempt<'_> {
    /// The credential was wrong: the token stays spent.
    pub fn failed(mut self) {
        self.settled = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.limiter.refund(self.client);
        }
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
            limiter.begin(ip(1)).expect("within the burst").failed();
        }
        let retry = limiter.begin(ip(1)).err().expect("limited after the burst");
        assert!(
            retry > Duration::from_secs(50) && retry <= Duration::from_secs(60),
            "{retry:?}"
        );
        assert!(limiter.begin(ip(2)).is_ok(), "other clients are unaffected");
        assert!(limiter.begin(None).is_ok());
    }

    #[test]
    fn checking_takes_nothing_and_failing_spends() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 2,
            per_minute: 1,
        });
        for _ in 0..10 {
            assert!(limiter.check(ip(1)).is_ok(), "a check takes no token");
        }
        assert!(limiter.fail(ip(1)).is_ok());
        assert!(limiter.fail(ip(1)).is_ok());
        assert!(limiter.check(ip(1)).is_err(), "the burst is spent");
        assert!(
            limiter.fail(ip(1)).is_err(),
            "a failure past the burst is limited"
        );
        assert!(limiter.check(ip(2)).is_ok(), "other clients are unaffected");
    }

    #[test]
    fn an_ipv6_64_shares_one_budget() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 2,
            per_minute: 1,
        });
        let v6 = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        assert!(limiter.fail(v6("2001:db8:1:2::1")).is_ok());
        assert!(limiter.fail(v6("2001:db8:1:2:ffff::9")).is_ok());
        assert!(limiter.fail(v6("2001:db8:1:2:abcd::")).is_err());
        assert!(limiter.check(v6("2001:db8:1:2::77")).is_err());
        assert!(
            limiter.check(v6("2001:db8:1:3::1")).is_ok(),
            "the next /64 is apart"
        );
        // An IPv4 client seen through an IPv6 socket is the same client.
        assert!(limiter.fail(v6("::ffff:10.0.0.1")).is_ok());
        assert!(limiter.fail(ip(1)).is_ok());
        assert!(limiter.check(v6("::ffff:10.0.0.1")).is_err());
    }

    #[test]
    fn refills_over_time() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 1,
            per_minute: 60_000,
        });
        limiter.begin(ip(1)).unwrap().failed();
        assert!(limiter.begin(ip(1)).is_err());
        std::thread::sleep(Duration::from_millis(5));
        assert!(limiter.begin(ip(1)).is_ok());
    }

    #[test]
    fn zero_rate_disables_limiting() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 0,
            per_minute: 0,
        });
        for _ in 0..100 {
            limiter.begin(ip(1)).unwrap().failed();
        }
        assert!(limiter.begin(ip(1)).is_ok());
    }

    #[test]
    fn attempts_in_flight_hold_tokens_and_successes_give_them_back() {
        let limiter = FailureLimiter::new(FailureBudget {
            burst: 2,
            per_minute: 1,
        });
        let first = limiter.begin(ip(1)).unwrap();
        let second = limiter.begin(ip(1)).unwrap();
        assert!(limiter.begin(ip(1)).is_err(), "two in flight use the burst");
        drop(first);
        let third = limiter
            .begin(ip(1))
            .expect("a success gives its token back");
        second.failed();
        third.failed();
        assert!(limiter.begin(ip(1)).is_err());
    }
}
