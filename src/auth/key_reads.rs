//! Store reads of keys the cache does not hold, coalesced: the misses that arrive while a read
//! is in flight wait for the next one, which asks for all of them in one query. A lone miss
//! is read at once; after a restart, when every key is a miss, the queries grow with the
//! traffic instead of their number, so first uses are not held back by one round trip each.

use std::{
    collections::HashMap,
    mem,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::oneshot;

use super::cache::{CachedKey, KeyCache};
use crate::store::{DynStore, StoreError};

/// At most this many ids in one query; the rest wait for the next.
const MAX_IDS_PER_READ: usize = 500;

type Reply = oneshot::Sender<Result<Arc<CachedKey>, StoreError>>;

pub struct KeyReads {
    store: DynStore,
    cache: Arc<KeyCache>,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Who waits for which id; several callers may wait for one.
    waiting: HashMap<i64, Vec<Reply>>,
    /// Whether a task is reading (it then takes whatever is waiting when its query returns).
    reading: bool,
}

impl KeyReads {
    pub fn new(store: DynStore, cache: Arc<KeyCache>) -> Arc<Self> {
        Arc::new(Self {
            store,
            cache,
            queue: Mutex::default(),
        })
    }

    /// What the store says about `id`, now kept in the cache (an unknown id too, briefly).
    pub async fn read(self: &Arc<Self>, id: i64) -> Result<Arc<CachedKey>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let start_reading = {
            let mut queue = self.queue();
            queue.waiting.entry(id).or_default().push(reply);
            !mem::replace(&mut queue.reading, true)
        };
        if start_reading {
            tokio::spawn(self.clone().read_while_waiting());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Internal("a key read was abandoned".into())))
    }

    /// Reads batches until nobody waits. Callers that gave up have dropped their receivers;
    /// their ids are read anyway, which only warms the cache.
    async fn read_while_waiting(self: Arc<Self>) {
        let mut reading = Reading {
            reads: &self,
            done: false,
        };
        while let Some(batch) = reading.next_batch() {
            self.read_batch(batch).await;
        }
    }

    async fn read_batch(&self, batch: Vec<(i64, Vec<Reply>)>) {
        let read_at = self.cache.generation();
        let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
        let mut records = match self.store.get_keys(&ids).await {
            Ok(records) => records
                .into_iter()
                .map(|record| (record.id, record))
                .collect::<HashMap<_, _>>(),
            // One unusable row fails the query: read each id alone, so it fails only its own.
            Err(StoreError::Internal(_)) if batch.len() > 1 => {
                for (id, replies) in batch {
                    let result = self
                        .store
                        .get_key(id)
                        .await
                        .map(|record| self.keep(id, CachedKey::from(record), read_at));
                    answer(replies, &result);
                }
                return;
            }
            Err(error) => {
                let failed = Err(error);
                for (_, replies) in batch {
                    answer(replies, &failed);
                }
                return;
            }
        };
        for (id, replies) in batch {
            let entry = self.keep(id, CachedKey::from(records.remove(&id)), read_at);
            answer(replies, &Ok(entry));
        }
    }

    fn keep(&self, id: i64, entry: CachedKey, read_at: u64) -> Arc<CachedKey> {
        let entry = Arc::new(entry);
        self.cache.insert_key(id, entry.clone(), read_at);
        entry
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent between statements; a panic elsewhere does not corrupt it.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn answer(replies: Vec<Reply>, result: &Result<Arc<CachedKey>, StoreError>) {
    for reply in replies {
        // A caller that gave up no longer listens.
        let _ = reply.send(result.clone());
    }
}

/// The reading task's hold on the queue. If the task ends without emptying it (a panic), the
/// waiters are dropped, so they get an error rather than wait for a reader that is gone.
struct Reading<'a> {
    reads: &'a KeyReads,
    /// Set when the task found the queue empty and gave up its role (another may have it now).
    done: bool,
}

impl Reading<'_> {
    fn next_batch(&mut self) -> Option<Vec<(i64, Vec<Reply>)>> {
        let mut queue = self.reads.queue();
        if queue.waiting.is_empty() {
            queue.reading = false;
            self.done = true;
            return None;
        }
        let ids: Vec<i64> = queue
            .waiting
            .keys()
            .take(MAX_IDS_PER_READ)
            .copied()
            .collect();
        Some(
            ids.into_iter()
                .filter_map(|id| queue.waiting.remove_entry(&id))
                .collect(),
        )
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self.reads.queue();
            queue.waiting.clear();
            queue.reading = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{
            digest::SecretDigest,
            model::{KeyRecord, StoredSecret},
        },
        store::{NewKey, SqliteStore, Store},
    };

    async fn store_with_keys(count: usize) -> (DynStore, Vec<i64>) {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        store.migrate().await.unwrap();
        let mut ids = Vec::new();
        for n in 0..count {
            let key: KeyRecord = store
                .create_key(
                    NewKey {
                        name: format!("key {n}"),
                        created_at: chrono::Utc::now(),
                        expires_at: None,
                        created_by: "test".into(),
                    },
                    &|id| SecretDigest::of(&format!("uk1_{id}")),
                )
                .await
                .unwrap();
            assert!(matches!(key.secret, StoredSecret::Digest(_)));
            ids.push(key.id);
        }
        (Arc::new(store), ids)
    }

    #[tokio::test]
    async fn concurrent_misses_are_answered_and_cached() {
        let (store, ids) = store_with_keys(20).await;
        let cache = Arc::new(KeyCache::new(100));
        let reads = KeyReads::new(store, cache.clone());
        let unknown = 10_000;
        let all: Vec<i64> = ids.iter().copied().chain([unknown, unknown]).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for id in all {
            let reads = reads.clone();
            tasks.spawn(async move { (id, reads.read(id).await) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (id, answer) = joined.unwrap();
            match &*answer.unwrap() {
                CachedKey::Known(key) => assert_eq!(key.record.id, id),
                CachedKey::Unknown { .. } => assert_eq!(id, unknown),
            }
            assert!(cache.key(id).is_some(), "id {id} is cached");
        }
        assert!(
            !reads.queue().reading,
            "the reader stopped once nobody waited"
        );
        assert!(reads.queue().waiting.is_empty());
    }
}
