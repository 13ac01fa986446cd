//! `last_used_at`, written in batches off the request path: a use is queued at most once per
//! key per `RECORD_INTERVAL_SECS`, and a background task flushes the queue every second.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};

use crate::store::DynStore;

/// A key's use is queued at most this often. With the one-second flush, `last_used_at` lags the
/// truth by at most about a minute, as SPEC section 1 allows.
pub const RECORD_INTERVAL_SECS: i64 = 55;
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct UsageRecorder {
    pending: Mutex<HashMap<i64, DateTime<Utc>>>,
    /// One flush at a time: the final flush at shutdown must wait for a periodic one that has
    /// already taken the queue, or that one's batch could be cut off mid-write and lost.
    flushing: tokio::sync::Mutex<()>,
}

impl UsageRecorder {
    pub fn record(&self, id: i64, at: DateTime<Utc>) {
        // Microseconds, like every other timestamp: Postgres keeps no more, and SQLite (which
        // would keep nanoseconds as text) must report the same value.
        let at = chrono::SubsecRound::trunc_subsecs(at, 6);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let slot = pending.entry(id).or_insert(at);
        if *slot < at {
            *slot = at;
        }
    }

    /// Writes what is queued. On failure the uses go back into the queue for the next flush.
    pub async fn flush(&self, store: &DynStore) -> bool {
        let _flushing = self.flushing.lock().await;
        let batch: Vec<(i64, DateTime<Utc>)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return false;
        }
        if let Err(error) = store.record_key_usage(&batch).await {
            tracing::warn!(%error, keys = batch.len(), "could not write last_used_at; will retry");
            for (id, at) in batch {
                self.record(id, at);
            }
            return false;
        }
        true
    }
}
