//! argon2 work off the async runtime, on a bounded number of dedicated threads. A flood of wrong
//! secrets queues here instead of starving the runtime threads that serve cached credentials.
//!
//! The threads can run at a lower scheduling priority (`KEYGATE_ARGON2_NICE`, Linux) than the
//! runtime's: when a flood keeps them busy, a runtime thread that wakes up for a cached good key
//! then gets a CPU at once instead of waiting out an argon2 thread's time slice. The default is 0,
//! not lower: on a CPU-saturated replica a niced argon2 thread starves, and a first use of a good
//! key then outlasts the gateway's ext_authz timeout (seen as 503s in tests/api/restarts.rs, where
//! restarted replicas must verify keys under load).

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex, mpsc},
};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Semaphore, oneshot};

use crate::{domain::hashing::SecretHasher, metrics::Metrics};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many argon2 jobs are queued")]
pub struct Overloaded;

#[derive(Clone)]
pub struct ArgonPool {
    hasher: SecretHasher,
    /// One permit per worker thread: a job holds one from before it is handed to a thread
    /// until it finishes, so the threads' queue never holds more than they can start.
    workers: Arc<Semaphore>,
    /// To the worker threads; they exit when every clone of the pool is gone.
    jobs: mpsc::Sender<Job>,
    max_queued: usize,
    metrics: Arc<Metrics>,
}

impl ArgonPool {
    pub fn new(
        hasher: SecretHasher,
        workers: usize,
        max_queued: usize,
        nice_increment: i32,
        metrics: Arc<Metrics>,
    ) -> Self {
        let workers = workers.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    if nice_increment > 0 {
                        lower_priority(nice_increment);
                    }
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        let Ok(job) = job else { return };
                        // A panic inside argon2 would be a bug; it costs that job (its caller
                        // sees `Overloaded`), not the thread.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .expect("cannot start an argon2 worker thread");
        }
        Self {
            hasher,
            workers: Arc::new(Semaphore::new(workers)),
            jobs,
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
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _permit = permit;
                let _ = done.send(job());
            }))
            .map_err(|_| Overloaded)?;
        result.await.map_err(|_| Overloaded)
    }
}

#[cfg(target_os = "linux")]
fn lower_priority(increment: i32) {
    // On Linux the nice value belongs to the thread, and glibc's nice() changes the calling
    // thread's only. Raising it needs no privilege.
    // SAFETY: nice() has no memory-safety preconditions.
    let changed = unsafe {
        *libc::__errno_location() = 0;
        libc::nice(increment) != -1 || *libc::__errno_location() == 0
    };
    if !changed {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the argon2 threads' scheduling priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_increment: i32) {
    // Elsewhere the nice value is per process: leave it alone.
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
