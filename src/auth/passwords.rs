//! Operators' passwords: argon2id, because people choose them (SPEC section 1). Used by KeyAdmin
//! sign-ins and, before the basic-auth lockout, by Authorize.
//!
//! A password that matched once is recognised afterwards by its fingerprint, an HMAC-SHA256
//! under a per-process random key of (stored hash, password), so a signed-in operator's every
//! call does not cost an argon2 run. Concurrent checks of the same pair share one run, and a
//! wrong pair is remembered briefly, so repeating it costs no argon2 either.

use std::{
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use moka::Expiry;
use rand::{TryRngCore, rngs::OsRng};
use secrecy::SecretString;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{
    argon_pool::{ArgonPool, Overloaded},
    rate_limit::FailureLimiter,
};
use crate::{
    domain::model::UserRecord,
    store::{DynStore, StoreError},
};

/// Users have no change feed of their own; this bounds how long a password change or
/// deactivation made by `keygate user passwd` in another process takes to apply.
pub const USER_TTL: Duration = Duration::from_secs(30);
/// How long a wrong pair is remembered as wrong, so repeating it costs no argon2.
const REJECTED_TTL: Duration = Duration::from_secs(60);
/// How long a verdict is kept for concurrent waiters (a match is also kept in its user's entry).
const ACCEPTED_TTL: Duration = Duration::from_secs(600);

/// HMAC-SHA256 output identifying one (stored hash, password) pair.
type Fingerprint = [u8; 32];

/// The outcome of checking a username/password pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Valid,
    Invalid,
    /// The client's failure budget is spent: no argon2 for it until this long has passed.
    RateLimited(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordCheckError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("too many argon2 verifications are queued")]
    Overloaded,
}

impl From<Overloaded> for PasswordCheckError {
    fn from(_: Overloaded) -> Self {
        Self::Overloaded
    }
}

/// A user as cached: the record (or none) and the fingerprint of the password that matched.
struct CachedUser {
    record: Option<UserRecord>,
    verified: OnceLock<Fingerprint>,
}

/// Why one shared argon2 run gave no verdict.
#[derive(Debug, Clone, Copy)]
enum Unverified {
    RateLimited(Duration),
    Overloaded,
}

struct VerdictExpiry;

impl Expiry<Fingerprint, bool> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _: &Fingerprint,
        accepted: &bool,
        _: Instant,
    ) -> Option<Duration> {
        Some(if *accepted {
            ACCEPTED_TTL
        } else {
            REJECTED_TTL
        })
    }
}

pub struct Passwords {
    store: DynStore,
    argon: ArgonPool,
    users: moka::sync::Cache<String, Arc<CachedUser>>,
    verdicts: moka::future::Cache<Fingerprint, bool>,
    keyed_mac: Hmac<Sha256>,
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl Passwords {
    pub fn new(store: DynStore, argon: ArgonPool) -> Self {
        let mut mac_key = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut mac_key)
            .expect("the operating system's random source failed");
        Self {
            store,
            argon,
            users: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(USER_TTL)
                .build(),
            verdicts: moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(VerdictExpiry)
                .build(),
            keyed_mac: <Hmac<Sha256> as Mac>::new_from_slice(&mac_key)
                .expect("HMAC accepts any key length"),
            dummy_hash: tokio::sync::OnceCell::new(),
        }
    }

    /// A new password's argon2id hash, with the configured parameters.
    pub async fn hash(&self, password: SecretString) -> Result<String, Overloaded> {
        self.argon.hash(password).await
    }

    /// Checks an operator's username and password: from memory when this exact pair matched
    /// before, otherwise with argon2, if `limiter` (with the client's address) allows that work.
    /// Unknown and inactive users cost a dummy argon2 run, so timing does not tell them apart.
    ///
    /// With a `limiter`, a request that would start an argon2 run first takes a token of the
    /// client's failure budget (so its wrong guesses in flight are bounded by its burst, not by
    /// its concurrency); the token is spent only if the password was wrong. Requests that join
    /// a run in flight for the same pair, or find its verdict remembered, take none up front,
    /// and a wrong pair still costs each of them a failure.
    pub async fn check(
        &self,
        username: &str,
        password: &str,
        limiter: Option<(&FailureLimiter, Option<IpAddr>)>,
    ) -> Result<PasswordCheck, PasswordCheckError> {
        let user = match self.users.get(username) {
            Some(user) => user,
            None => {
                let record = self.store.find_user(username).await?;
                let user = Arc::new(CachedUser {
                    record,
                    verified: OnceLock::new(),
                });
                self.users.insert(username.to_owned(), user.clone());
                user
            }
        };
        let Some(record) = user.record.as_ref().filter(|record| record.active) else {
            return self.check_nobody(password, limiter).await;
        };
        let fingerprint = self.fingerprint(&record.password_hash, password);
        if user
            .verified
            .get()
            .is_some_and(|known| bool::from(known.ct_eq(&fingerprint)))
        {
            return Ok(PasswordCheck::Valid);
        }
        let phc = record.password_hash.clone();
        let presented = SecretString::from(password.to_owned());
        // Only the request whose `init` runs (moka's leader) takes a token up front.
        let led = AtomicBool::new(false);
        let init = async {
            led.store(true, Ordering::Relaxed);
            let attempt = match limiter {
                Some((limiter, client)) => {
                    Some(limiter.begin(client).map_err(Unverified::RateLimited)?)
                }
                None => None,
            };
            let matched = self
                .argon
                .verify(phc, presented)
                .await
                .map_err(|Overloaded| Unverified::Overloaded)?;
            if !matched && let Some(attempt) = attempt {
                attempt.failed();
            }
            Ok(matched)
        };
        let matched = match self.verdicts.try_get_with(fingerprint, init).await {
            Ok(matched) => matched,
            Err(shared) => {
                return match *shared {
                    Unverified::RateLimited(wait) => Ok(PasswordCheck::RateLimited(wait)),
                    Unverified::Overloaded => Err(PasswordCheckError::Overloaded),
                };
            }
        };
        if matched {
            let _ = user.verified.set(fingerprint);
            return Ok(PasswordCheck::Valid);
        }
        if !led.load(Ordering::Relaxed)
            && let Some((limiter, client)) = limiter
            && let Err(wait) = limiter.begin(client).map(|attempt| attempt.failed())
        {
            return Ok(PasswordCheck::RateLimited(wait));
        }
        Ok(PasswordCheck::Invalid)
    }

    /// An unknown or inactive user: a dummy argon2 run, paid for with a token like any other.
    async fn check_nobody(
        &self,
        password: &str,
        limiter: Option<(&FailureLimiter, Option<IpAddr>)>,
    ) -> Result<PasswordCheck, PasswordCheckError> {
        let attempt = match limiter.map(|(limiter, client)| limiter.begin(client)) {
            None => None,
            Some(Ok(attempt)) => Some(attempt),
            Some(Err(wait)) => return Ok(PasswordCheck::RateLimited(wait)),
        };
        // A real hash with the configured parameters, made once, so the dummy costs exactly
        // what a real verification costs.
        let dummy = self
            .dummy_hash
            .get_or_try_init(|| {
                self.argon
                    .hash(SecretString::from("keygate dummy password".to_owned()))
            })
            .await?;
        self.argon
            .verify(dummy.clone(), SecretString::from(password.to_owned()))
            .await?;
        if let Some(attempt) = attempt {
            attempt.failed();
        }
        Ok(PasswordCheck::Invalid)
    }

    /// Forgets every cached user, after this process changed a password.
    pub fn invalidate_users(&self) {
        self.users.invalidate_all();
    }

    /// HMAC(per-process key, stored hash || 0 || password).
    fn fingerprint(&self, phc: &str, password: &str) -> Fingerprint {
        let mut mac = self.keyed_mac.clone();
        mac.update(phc.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::hashing::{HashParams, SecretHasher},
        metrics::Metrics,
        store::SqliteStore,
    };

    async fn passwords() -> Passwords {
        let store = Arc::new(SqliteStore::connect("sqlite::memory:").await.unwrap());
        let hasher = SecretHasher::new(HashParams {
            memory_kib: 8,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap();
        Passwords::new(store, ArgonPool::new(hasher, 1, 4, 0, Metrics::new()))
    }

    #[tokio::test]
    async fn fingerprints_bind_the_stored_hash_and_the_password() {
        let passwords = passwords().await;
        let first = passwords.fingerprint("$argon2id$a", "password");
        assert_eq!(passwords.fingerprint("$argon2id$a", "password"), first);
        assert_ne!(passwords.fingerprint("$argon2id$a", "passworD"), first);
        assert_ne!(passwords.fingerprint("$argon2id$b", "password"), first);
        // The separator keeps (hash, password) pairs from running into each other.
        assert_ne!(passwords.fingerprint("$argon2id$ap", "assword"), first);
        // Another process (another random key) fingerprints differently.
        assert_ne!(
            self::passwords()
                .await
                .fingerprint("$argon2id$a", "password"),
            first
        );
    }
}
