//! What this process holds in memory about keys: each key's record (state, name and the digest
//! of its secret), read from the store on first use and checked on every request, and the ids
//! the store did not know, for a few seconds.
//!
//! An entry is dropped on every change this process makes, on every change notification from
//! the store, and when a periodic re-validation finds it changed (a notification was missed).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::domain::model::KeyRecord;

/// How long an unknown key id is remembered as unknown. Short: an id that becomes valid is
/// announced by a change notification anyway, this only bounds a missed one.
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(5);

/// What the cache knows about a key id.
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
                name: Arc::from(record.name.as_str()),
                record,
                last_use_queued: AtomicI64::new(i64::MIN / 2),
            }),
        }
    }
}

pub struct KeyCache {
    /// Key records by id: read on every request. quick_cache rather than moka here: a hit is
    /// a shard read lock, one probe and a reference bit (S3-FIFO keeps it scan resistant),
    /// while moka's also records the read for its admission sketch and access order. No TTL:
    /// known keys stay until evicted by size, invalidated by a change or replaced by
    /// re-validation, never by time, so an outage of the store does not take good keys with
    /// it; unknown ids carry their own deadline (`key`).
    keys: quick_cache::sync::Cache<i64, Arc<CachedKey>>,
    /// Bumped before every invalidation; see `insert_key`.
    generation: AtomicU64,
}

impl KeyCache {
    pub fn new(capacity: u64) -> Self {
        Self {
            keys: quick_cache::sync::Cache::new(
                usize::try_from(capacity).expect("the cache capacity fits in memory"),
            ),
            generation: AtomicU64::new(0),
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{digest::SecretDigest, model::StoredSecret};

    fn known(id: i64) -> Arc<CachedKey> {
        Arc::new(CachedKey::from(Some(KeyRecord {
            id,
            name: format!("key {id}"),
            created_at: chrono::Utc::now(),
            expires_at: None,
            enabled: true,
            last_used_at: None,
            created_by: "test".to_owned(),
            secret: StoredSecret::Digest(SecretDigest::of("uk1_test")),
        })))
    }

    #[test]
    fn unknown_ids_are_believed_for_their_ttl_only() {
        let cache = KeyCache::new(10);
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
        let cache = KeyCache::new(10);
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
        let cache = KeyCache::new(10);
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
