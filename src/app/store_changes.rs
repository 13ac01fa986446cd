//! Keeping the keys held in memory in step with the store: other replicas' changes, and a
//! periodic re-validation that bounds the effect of a missed notification.

use std::{sync::Arc, time::Duration};

use super::Services;
use crate::{
    auth::cache::CachedKey,
    store::{StoreChange, StoreError},
};

/// How soon a re-validation that failed (the store unreachable) is tried again.
const REVALIDATE_RETRY: Duration = Duration::from_secs(1);

/// Applies other replicas' changes (Postgres LISTEN/NOTIFY) and re-validates every cached key
/// periodically and after the change feed reconnects. A re-validation that fails is retried
/// every `REVALIDATE_RETRY` until one succeeds: the one after a reconnect is what catches up on
/// the notifications the feed missed, so it must not be lost to a store error.
pub(super) async fn apply_store_changes(services: Arc<Services>, revalidate_every: Duration) {
    let mut changes = services.store.subscribe().await;
    let mut ticker = tokio::time::interval(revalidate_every);
    ticker.tick().await;
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        let change = async {
            match changes.as_mut() {
                Some(feed) => feed.recv().await,
                None => std::future::pending().await,
            }
        };
        let retry = async {
            match failing_since {
                Some(_) => tokio::time::sleep(REVALIDATE_RETRY).await,
                None => std::future::pending().await,
            }
        };
        let revalidation = tokio::select! {
            _ = ticker.tick() => revalidate(&services).await,
            _ = retry => revalidate(&services).await,
            change = change => match change {
                // Counted once applied: a reader of the counter may rely on the change.
                Some(StoreChange::Key(id)) => {
                    services.cache.invalidate_key(id);
                    services.metrics.store_changes.inc();
                    continue;
                }
                Some(StoreChange::AuthMode) => {
                    services.lockout.note();
                    services.metrics.store_changes.inc();
                    continue;
                }
                Some(StoreChange::Resync) => revalidate(&services).await,
                None => {
                    changes = None;
                    continue;
                }
            },
        };
        match (revalidation, failing_since) {
            (Ok(()), Some(since)) => {
                tracing::info!(failed_for = ?since.elapsed(), "re-validated the cached keys");
                failing_since = None;
            }
            (Ok(()), None) => {}
            (Err(error), None) => {
                tracing::warn!(%error, retry_in = ?REVALIDATE_RETRY, "cannot re-validate cached keys; keeping them");
                failing_since = Some(tokio::time::Instant::now());
            }
            (Err(error), Some(_)) => {
                tracing::debug!(%error, "cannot re-validate cached keys yet")
            }
        }
    }
}

/// Compares every cached key with the store and drops the entries that changed. On a store
/// error the entries stay: while the database is down nobody can change a key anyway.
async fn revalidate(services: &Services) -> Result<(), StoreError> {
    let ids = services.cache.cached_key_ids();
    for chunk in ids.chunks(1000) {
        let current = services.store.get_keys(chunk).await?;
        for id in chunk {
            let fresh = current.iter().find(|record| record.id == *id);
            let Some(entry) = services.cache.key(*id) else {
                continue;
            };
            let unchanged = match (&*entry, fresh) {
                (CachedKey::Known(cached), Some(fresh)) => {
                    cached.record.enabled == fresh.enabled
                        && cached.record.expires_at == fresh.expires_at
                        && cached.record.name == fresh.name
                        && cached.record.secret == fresh.secret
                }
                (CachedKey::Unknown { .. }, None) => true,
                _ => false,
            };
            if !unchanged {
                tracing::info!(id, "cached key changed without a notification; dropping it");
                services.cache.invalidate_key(*id);
            }
        }
    }
    Ok(())
}
