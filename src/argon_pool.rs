//! argon2 work off the async runtime, on a bounded number of blocking threads. A flood of wrong
//! secrets queues here instead of starving the runtime threads that serve cached credentials.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::{domain::hashing::SecretHasher, metrics::Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many argon2 jobs are queued")]
pub struct Overloaded;

#[derive(Clone)]
pub struct ArgonPool {
    hasher: SecretHasher,
    workers: Arc<Semaphore>,
    max_queued: usize,
    metrics: Arc<Metrics>,
}

impl ArgonPool {
    pub fn new(
        hasher: SecretHasher,
        workers: usize,
        max_queued: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            hasher,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            max_queued,
            metrics,
        }
    }

    pub async fn hash(&self, secret: SecretString) -> Result<String, Overloaded> {
        let hasher = self.hasher.clone();
        self.run(move || hasher.hash(secret.expose_secret())).await
    }

    pub async fn verify(
        &self,
        stored_phc: String,
        secret: SecretString,
    ) -> Result<bool, Overloaded> {
        let hasher = self.hasher.clone();
        let matched = self
            .run(move || hasher.verify(&stored_phc, secret.expose_secret()))
            .await?;
        if matched {
            self.metrics.argon2_matches.inc();
        } else {
            self.metrics.argon2_mismatches.inc();
        }
        Ok(matched)
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Overloaded> {
        let depth = self.metrics.argon2_queue_depth.inc() + 1;
        let _depth = scopeguard(&self.metrics);
        if depth as usize > self.max_queued {
            return Err(Overloaded);
        }
        let permit = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Overloaded)?;
        // The permit moves into the job, so a caller that gives up (a cancelled RPC) does not
        // free a worker slot while its argon2 run is still burning CPU.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        // A panic inside argon2 would be a bug; surface it as overload rather than crash.
        .map_err(|_| Overloaded)
    }
}

/// Decrements the queue-depth gauge however `run` exits (including cancellation).
fn scopeguard(metrics: &Arc<Metrics>) -> impl Drop + '_ {
    struct Guard<'a>(&'a Metrics);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.argon2_queue_depth.dec();
        }
    }
    Guard(metrics)
}
