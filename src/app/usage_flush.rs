//! Writing the batched `last_used_at` updates, off the request path.

use std::sync::Arc;

use tokio::sync::watch;

use super::Services;
use crate::auth::usage::FLUSH_INTERVAL;

pub(super) async fn flush_usage(services: Arc<Services>, mut stopping: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
            _ = stopping.changed() => return,
        }
        if services.usage.flush(&services.store).await {
            services.metrics.usage_flushes.inc();
        }
    }
}
