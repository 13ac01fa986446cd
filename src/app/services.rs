//! The composition root of the use cases: each built once per process, from the settings,
//! and shared by every listener.

use std::sync::Arc;

use super::StartupError;
use crate::{
    admin::{keys::KeyManager, operators::Operators},
    auth::{
        argon_pool::ArgonPool,
        authorizer::{Authorizer, AuthorizerParts},
        cache::KeyCache,
        lockout::Lockout,
        passwords::Passwords,
        rate_limit::{FailureBudget, FailureLimiter},
        usage::UsageRecorder,
    },
    domain::hashing::SecretHasher,
    metrics::Metrics,
    settings::Settings,
    store::DynStore,
};

/// The use cases and shared state, built once per process.
pub struct Services {
    pub store: DynStore,
    pub cache: Arc<KeyCache>,
    pub lockout: Arc<Lockout>,
    pub authorizer: Arc<Authorizer>,
    pub keys: Arc<KeyManager>,
    pub operators: Arc<Operators>,
    pub usage: Arc<UsageRecorder>,
    pub metrics: Arc<Metrics>,
}

impl Services {
    pub fn build(settings: &Settings, store: DynStore) -> Result<Self, StartupError> {
        let metrics = Metrics::new();
        let hasher = SecretHasher::new(settings.hashing)?;
        let argon = ArgonPool::new(
            hasher,
            settings.argon2_workers,
            settings.argon2_max_queue,
            settings.argon2_nice,
            metrics.clone(),
        );
        // Version-1 keys' first uses get workers of their own: operators' sign-ins (a guesser
        // among them) never queue in front of a key, nor a key's upgrade in front of them.
        let key_argon = ArgonPool::new(
            SecretHasher::new(settings.hashing)?,
            settings.argon2_workers,
            settings.argon2_max_queue,
            settings.argon2_nice,
            metrics.clone(),
        );
        let cache = Arc::new(KeyCache::new(settings.cache_capacity));
        let lockout = Arc::new(Lockout::default());
        let passwords = Arc::new(Passwords::new(store.clone(), argon));
        let usage = Arc::new(UsageRecorder::default());
        let budget = FailureBudget {
            burst: settings.rate_limit_burst,
            per_minute: settings.rate_limit_per_minute,
        };
        let limiter = FailureLimiter::new(budget);
        let authorizer = Arc::new(Authorizer::new(AuthorizerParts {
            store: store.clone(),
            cache: cache.clone(),
            passwords: passwords.clone(),
            argon: key_argon,
            limiter,
            prefix: settings.key_prefix.clone(),
            lockout: lockout.clone(),
            usage: usage.clone(),
            metrics: metrics.clone(),
        }));
        let keys = Arc::new(KeyManager::new(
            store.clone(),
            cache.clone(),
            lockout.clone(),
            settings.key_prefix.clone(),
        ));
        let operators = Arc::new(Operators::new(
            store.clone(),
            passwords,
            FailureLimiter::new(budget),
        ));
        Ok(Self {
            store,
            cache,
            lockout,
            authorizer,
            keys,
            operators,
            usage,
            metrics,
        })
    }
}
