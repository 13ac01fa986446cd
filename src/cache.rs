//! The verified-credential cache: what makes the hot path cost microseconds instead of an
//! argon2 run.
//!
//! After one successful argon2 verify, a presented secret is recognised by its fingerprint, an
//! HMAC-SHA256 under a per-process random key of (stored hash, presented secret), compared in
//! constant time. Metadata (enabled, expiry, name) is cached beside it and re-checked on every
//! request; it is dropped on every change this process makes, on every change notification
//! from the store, and re-validated periodically in case a notification was missed.

use std::{
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use moka::Expiry;
use rand::{TryRngCore, rngs::OsRng};
use secrecy::SecretString;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::{
    argon_pool::{ArgonPool, Overloaded},
    domain::model::{KeyRecord, UserRecord},
    metrics::Metrics,
    rate_limit::FailureLimiter,
};

/// Why a verification gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unverified {
    /// The client's failure budget is spent: retry after this long.
    RateLimited(Duration),
    /// Too many argon2 runs are queued.
    Overloaded,
}

/// HMAC-SHA256 output identifying one (stored hash, presented secret) pair.
pub type Fingerprint = [u8; 32];

/// How long an unknown key id is remembered as unknown. Short: an id that becomes valid is
/// announced by a change notification anyway, this only bounds a missed one.
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(5);
/// How long a wrong secret is remembered as wrong, so repeating it costs no argon2.
const REJECTED_SECRET_TTL: Duration = Duration::from_secs(60);
/// How long a verified secret's verdict is kept beside the per-entry copy (it only has to
/// outlive concurrent waiters; the entry keeps its own copy).
const ACCEPTED_SECRET_TTL: Duration = Duration::from_secs(600);
/// Users have no change feed of their own; this bounds how long a password change or
/// deactivation made by `keygate user passwd` in another process takes to apply.
pub const USER_TTL: Duration = Duration::from_secs(30);

/// A stored argon2 hash and, once a presented secret has matched it, that secret's fingerprint.
/// Only one secret can match a hash, so the slot is written at most once.
pub struct HashedSecret {
    pub phc: String,
    /// The owning cache's keyed HMAC state with `phc` already absorbed, made on first use: a
    /// fingerprint then only absorbs the presented secret and finalizes. (So an entry belongs
    /// to the one cache that fingerprints it, as every entry here does.)
    mac_with_phc: OnceLock<Box<Hmac<Sha256>>>,
    verified: OnceLock<Fingerprint>,
}

impl HashedSecret {
    pub fn new(phc: String) -> Self {
        Self {
            phc,
            mac_with_phc: OnceLock::new(),
            verified: OnceLock::new(),
        }
    }

    fn is_verified(&self, fingerprint: &Fingerprint) -> bool {
        self.verified
            .get()
            .is_some_and(|known| bool::from(known.ct_eq(fingerprint)))
    }
}

/// What the cache knows about a key id.
// Always held in an `Arc`, allocated once per entry: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum CachedKey {
    /// The store had no such key at `checked_at`; believed for `UNKNOWN_KEY_TTL`.
    Unknown {
        checked_at: Instant,
    },
    Known(KnownKey),
}

pub struct KnownKey {
    pub record: KeyRecord,
    /// `record.name`, shared with every allow that names the key.
    pub name: Arc<str>,
    pub secret: HashedSecret,
    /// Unix seconds of the last use queued for `last_used_at`, to queue at most one a minute.
    last_use_queued: AtomicI64,
}

impl KnownKey {
    /// Returns true when this use should be written to `last_used_at` (the first use, then at
    /// most once per `interval_secs`).
    pub fn should_record_use(&self, now_secs: i64, interval_secs: i64) -> bool {
        let previous = self.last_use_queued.load(Ordering::Relaxed);
        now_secs - previous >= interval_secs
            && self
                .last_use_queued
                .compare_exchange(previous, now_secs, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl From<Option<KeyRecord>> for CachedKey {
    fn from(record: Option<KeyRecord>) -> Self {
        match record {
            None => Self::Unknown {
                checked_at: Instant::now(),
            },
            Some(record) => Self::Known(KnownKey {
                secret: HashedSecret::new(record.secret_hash.clone()),
                name: Arc::from(record.name.as_str()),
                record,
                last_use_queued: AtomicI64::new(i64::MIN / 2),
            }),
        }
    }
}

/// A user as cached: the record (or none) and the verified password, if any.
pub struct CachedUser {
    pub record: Option<UserRecord>,
    pub secret: HashedSecret,
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
            ACCEPTED_SECRET_TTL
        } else {
            REJECTED_SECRET_TTL
        })
    }
}

pub struct CredentialCache {
    /// Key metadata by id: read on every request. quick_cache rather than moka here: a hit is
    /// a shard read lock, one probe and a reference bit (S3-FIFO keeps it scan resistant),
    /// while moka's also records the read for its admission sketch and access order, memory
    /// that other traffic has evicted from the CPU caches by the next request. No TTL: known
    /// keys stay until evicted by size, invalidated by a change or replaced by re-validation,
    /// never by time, so an outage of the store does not take good keys with it; unknown ids
    /// carry their own deadline (`key`).
    keys: quick_cache::sync::Cache<i64, Arc<CachedKey>>,
    users: moka::sync::Cache<String, Arc<CachedUser>>,
    /// argon2 verdicts by fingerprint: rejected secrets are remembered briefly, and concurrent
    /// verifications of the same pair share one argon2 run (moka coalesces `try_get_with`).
    verdicts: moka::future::Cache<Fingerprint, bool>,
    /// Bumped before every invalidation; see `insert_key`.
    generation: AtomicU64,
    /// HMAC-SHA256 keyed with a per-process random key (the key's pads already absorbed).
    keyed_mac: Hmac<Sha256>,
    dummy_hash: tokio::sync::OnceCell<String>,
    argon: ArgonPool,
    metrics: Arc<Metrics>,
}

impl CredentialCache {
    pub fn new(capacity: u64, argon: ArgonPool, metrics: Arc<Metrics>) -> Self {
        let mut mac_key = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut mac_key)
            .expect("the operating system's random source failed");
        let keyed_mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&mac_key).expect("HMAC accepts any key length");
        Self {
            keys: quick_cache::sync::Cache::new(
                usize::try_from(capacity).expect("the cache capacity fits in memory"),
            ),
            users: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(USER_TTL)
                .build(),
            verdicts: moka::future::Cache::builder()
                .max_capacity(capacity)
                .expire_after(VerdictExpiry)
                .build(),
            generation: AtomicU64::new(0),
            keyed_mac,
            dummy_hash: tokio::sync::OnceCell::new(),
            argon,
            metrics,
        }
    }

    /// HMAC(per-process key, stored hash || 0 || presented secret). On the hot path: the
    /// keyed state with the stored hash absorbed is kept per entry, so this costs two SHA-256
    /// blocks and no allocation.
    pub fn fingerprint(&self, secret: &HashedSecret, presented: &str) -> Fingerprint {
        let mut mac = secret
            .mac_with_phc
            .get_or_init(|| {
                let mut mac = self.keyed_mac.clone();
                mac.update(secret.phc.as_bytes());
                mac.update(&[0]);
                Box::new(mac)
            })
            .as_ref()
            .clone();
        mac.update(presented.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// True when `presented` was verified against this hash before, counted as a cache hit. A
    /// false answer is not counted: the caller goes on to the full check, which counts it.
    pub fn recognises(&self, secret: &HashedSecret, presented: &str) -> bool {
        let hit = secret.is_verified(&self.fingerprint(secret, presented));
        if hit {
            self.metrics.cache_hits.inc();
        }
        hit
    }

    /// True when `fingerprint` was verified against this hash before: no argon2 needed.
    pub fn is_verified(&self, secret: &HashedSecret, fingerprint: &Fingerprint) -> bool {
        let hit = secret.is_verified(fingerprint);
        if hit {
            self.metrics.cache_hits.inc();
        } else {
            self.metrics.cache_misses.inc();
        }
        hit
    }

    /// Runs (or joins, or skips thanks to a remembered verdict) the argon2 verification of
    /// `presented` against `secret`, and remembers a match in `secret`.
    ///
    /// With a `limiter`, the client's failure budget is charged as SPEC section 3, step 5 asks:
    /// a request that would start an argon2 run must first take a token (so a client's wrong
    /// secrets in flight are bounded by its burst, not by its concurrency), and that token is
    /// spent only if the secret was wrong. Requests that join a run already in flight for the
    /// same secret, or that find its verdict remembered, cost no argon2 and take no token up
    /// front; a wrong secret still costs each of them a failure. So a fresh good key used by
    /// many concurrent requests from one address is never rate limited.
    pub async fn verify(
        &self,
        secret: &HashedSecret,
        presented: &str,
        fingerprint: Fingerprint,
        limiter: Option<(&FailureLimiter, Option<IpAddr>)>,
    ) -> Result<bool, Unverified> {
        let phc = secret.phc.clone();
        let presented = SecretString::from(presented.to_owned());
        let argon = &self.argon;
        // Only the request whose `init` runs (moka's leader) pays the token up front.
        let led = AtomicBool::new(false);
        let init = async {
            led.store(true, Ordering::Relaxed);
            let attempt = match limiter {
                Some((limiter, client)) => {
                    Some(limiter.begin(client).map_err(Unverified::RateLimited)?)
                }
                None => None,
            };
            let matched = argon
                .verify(phc, presented)
                .await
                .map_err(|Overloaded| Unverified::Overloaded)?;
            if !matched && let Some(attempt) = attempt {
                attempt.failed();
            }
            Ok(matched)
        };
        let matched = self
            .verdicts
            .try_get_with(fingerprint, init)
            .await
            .map_err(|shared: Arc<Unverified>| *shared)?;
        if matched {
            let _ = secret.verified.set(fingerprint);
        } else if !led.load(Ordering::Relaxed)
            && let Some((limiter, client)) = limiter
        {
            limiter
                .begin(client)
                .map_err(Unverified::RateLimited)?
                .failed();
        }
        Ok(matched)
    }

    /// Runs argon2 against a hash nobody has, so that an unknown username costs the same time
    /// as a known one with a wrong password.
    pub async fn burn_dummy_verify(&self, presented: &str) -> Result<(), Overloaded> {
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
            .verify(dummy.clone(), SecretString::from(presented.to_owned()))
            .await
            .map(|_| ())
    }

    pub fn key(&self, id: i64) -> Option<Arc<CachedKey>> {
        let entry = self.keys.get(&id)?;
        if let CachedKey::Unknown { checked_at } = *entry
            && checked_at.elapsed() >= UNKNOWN_KEY_TTL
        {
            // Stale: ask the store again. (Only this entry: a fresher one may have replaced it.)
            self.keys
                .remove_if(&id, |current| Arc::ptr_eq(current, &entry));
            return None;
        }
        Some(entry)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches what the store said about `id`, read when the generation was `read_at`. If an
    /// invalidation happened since, the read may predate the change it announced, so the entry
    /// is dropped again rather than kept stale. (Insert first, check second: an invalidation
    /// bumps the generation before it removes, so one of the two always catches the entry.)
    pub fn insert_key(&self, id: i64, entry: Arc<CachedKey>, read_at: u64) {
        self.keys.insert(id, entry);
        if self.generation() != read_at {
            self.keys.remove(&id);
        }
    }

    pub fn invalidate_key(&self, id: i64) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.keys.remove(&id);
    }

    /// Ids of every cached known key, for re-validation.
    pub fn cached_key_ids(&self) -> Vec<i64> {
        self.keys
            .iter()
            .filter(|(_, entry)| matches!(**entry, CachedKey::Known(_)))
            .map(|(id, _)| id)
            .collect()
    }

    pub fn user(&self, username: &str) -> Option<Arc<CachedUser>> {
        self.users.get(username)
    }

    pub fn insert_user(&self, username: &str, record: Option<UserRecord>) -> Arc<CachedUser> {
        let secret = HashedSecret::new(
            record
                .as_ref()
                .map(|user| user.password_hash.clone())
                .unwrap_or_default(),
        );
        let entry = Arc::new(CachedUser { record, secret });
        self.users.insert(username.to_owned(), entry.clone());
        entry
    }

    pub fn invalidate_users(&self) {
        self.users.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::hashing::{HashParams, SecretHasher};

    fn cache() -> CredentialCache {
        let metrics = Metrics::new();
        let hasher = SecretHasher::new(HashParams {
            memory_kib: 8,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap();
        CredentialCache::new(
            10,
            ArgonPool::new(hasher, 1, 4, 0, metrics.clone()),
            metrics,
        )
    }

    #[test]
    fn fingerprints_bind_the_stored_hash_and_the_presented_secret() {
        let cache = cache();
        let phc = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".to_owned();
        let secret = HashedSecret::new(phc.clone());
        let first = cache.fingerprint(&secret, "presented");
        // The second call uses the state kept in the entry; a fresh entry recomputes it.
        assert_eq!(cache.fingerprint(&secret, "presented"), first);
        assert_eq!(
            cache.fingerprint(&HashedSecret::new(phc.clone()), "presented"),
            first
        );
        assert_ne!(cache.fingerprint(&secret, "presenteD"), first);
        assert_ne!(cache.fingerprint(&secret, "presented "), first);
        assert_ne!(
            cache.fingerprint(&HashedSecret::new(format!("{phc}x")), "presented"),
            first
        );
        // Another process (another random key) fingerprints differently.
        assert_ne!(
            self::cache().fingerprint(&HashedSecret::new(phc), "presented"),
            first
        );
    }

    fn known(id: i64) -> Arc<CachedKey> {
        Arc::new(CachedKey::from(Some(KeyRecord {
            id,
            name: format!("key {id}"),
            created_at: chrono::Utc::now(),
            expires_at: None,
            enabled: true,
            last_used_at: None,
            created_by: "test".to_owned(),
            secret_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".to_owned(),
        })))
    }

    #[test]
    fn unknown_ids_are_believed_for_their_ttl_only() {
        let cache = cache();
        cache.insert_key(5, Arc::new(CachedKey::from(None)), cache.generation());
        assert!(matches!(
            cache.key(5).as_deref(),
            Some(CachedKey::Unknown { .. })
        ));
        let Some(long_ago) = Instant::now().checked_sub(UNKNOWN_KEY_TTL) else {
            return; // the clock started less than a TTL ago: nothing to test
        };
        let stale = Arc::new(CachedKey::Unknown {
            checked_at: long_ago,
        });
        cache.insert_key(5, stale, cache.generation());
        assert!(cache.key(5).is_none(), "a stale unknown id is asked again");
        assert!(cache.key(5).is_none(), "and is gone from the cache");
        // Known keys have no deadline.
        cache.insert_key(6, known(6), cache.generation());
        assert!(matches!(cache.key(6).as_deref(), Some(CachedKey::Known(_))));
    }

    #[test]
    fn an_invalidation_during_a_read_drops_what_the_read_saw() {
        let cache = cache();
        let read_at = cache.generation();
        cache.invalidate_key(7);
        cache.insert_key(7, known(7), read_at);
        assert!(cache.key(7).is_none());
        cache.insert_key(7, known(7), cache.generation());
        assert!(cache.key(7).is_some());
        cache.invalidate_key(7);
        assert!(cache.key(7).is_none());
    }

    #[test]
    fn the_key_cache_stays_within_its_capacity() {
        let cache = cache(); // capacity 10
        for id in 1..=1000 {
            cache.insert_key(id, known(id), cache.generation());
        }
        let held = cache.cached_key_ids().len();
        assert!(held <= 10, "{held} keys held with a capacity of 10");
        // A key used again and again survives a scan of one-off ids.
        cache.insert_key(5000, known(5000), cache.generation());
        for id in 1..=1000 {
            assert!(
                cache.key(5000).is_some(),
                "the hot key was evicted by id {id}"
            );
            cache.insert_key(id, Arc::new(CachedKey::from(None)), cache.generation());
        }
    }
}
