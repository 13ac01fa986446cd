//! The one place that decides allow or deny (SPEC section 3), shared by every transport: the
//! `Authorizer` RPC and Envoy's `Check` are thin adapters around `Authorizer::decide`.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use chrono::{DateTime, Utc};

use crate::{
    argon_pool::Overloaded,
    cache::{CachedKey, CredentialCache, KnownKey, Unverified},
    domain::{
        credentials::{ClientAddress, CredentialsError, parse_authorization},
        decision::{Decision, DenyReason, Principal, check_key_state},
        key::{KeyPrefix, PresentedKey, parse_key_shape},
    },
    metrics::{Metrics, Transport},
    rate_limit::FailureLimiter,
    store::{DynStore, StoreError},
    usage::UsageRecorder,
};

/// The decision could not be made: the gateway's own failure policy applies (an error, never a
/// deny and never an allow).
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("the key store is unavailable")]
    StoreUnavailable(#[source] StoreError),
    #[error("keygate is overloaded: too many argon2 verifications queued")]
    Overloaded,
}

impl From<StoreError> for DecideError {
    fn from(error: StoreError) -> Self {
        Self::StoreUnavailable(error)
    }
}

impl From<Overloaded> for DecideError {
    fn from(_: Overloaded) -> Self {
        Self::Overloaded
    }
}

pub struct Authorizer {
    store: DynStore,
    cache: Arc<CredentialCache>,
    limiter: FailureLimiter,
    prefix: KeyPrefix,
    /// Once the store has said the lockout flag is set, it is set forever: no need to ask again.
    api_keys_enabled: AtomicBool,
    usage: Arc<UsageRecorder>,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    pub fn new(
        store: DynStore,
        cache: Arc<CredentialCache>,
        limiter: FailureLimiter,
        prefix: KeyPrefix,
        usage: Arc<UsageRecorder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            cache,
            limiter,
            prefix,
            api_keys_enabled: AtomicBool::new(false),
            usage,
            metrics,
        }
    }

    /// Decides one request from its raw `Authorization` header value and client address, and
    /// records the outcome in the metrics and the log (reason only, never the credential).
    pub async fn authorize(
        &self,
        transport: Transport,
        header: Option<&[u8]>,
        client: ClientAddress<'_>,
    ) -> Result<Decision, DecideError> {
        let started = Instant::now();
        let result = self.decide(header, &client).await;
        self.record(transport, &result, &client, started);
        result
    }

    /// `authorize` for the requests the hot path allows (a cached key presented again, once
    /// API keys are on), without a future; `None` for every other request, which `authorize`
    /// then decides in full (running the same checks again, so the outcome is the same).
    pub fn authorize_cached(
        &self,
        transport: Transport,
        header: Option<&[u8]>,
        client: &ClientAddress<'_>,
    ) -> Option<Decision> {
        let started = Instant::now();
        if !self.api_keys_enabled.load(Ordering::Acquire) {
            return None;
        }
        let credentials = parse_authorization(header).ok()?;
        let key_text = parse_key_shape(&self.prefix, credentials.secret()).ok()?;
        let decision = self.cached_allow(&key_text)?;
        let result = Ok(decision);
        self.record(transport, &result, client, started);
        result.ok()
    }

    /// The outcome in the metrics and the log (reason only, never the credential).
    fn record(
        &self,
        transport: Transport,
        result: &Result<Decision, DecideError>,
        client: &ClientAddress<'_>,
        started: Instant,
    ) {
        let elapsed = started.elapsed().as_secs_f64();
        match result {
            Ok(decision) => {
                self.metrics.record_decision(transport, decision, elapsed);
                match decision {
                    Decision::Allow(principal) => {
                        tracing::debug!(?transport, ?client, ?principal, "allowed")
                    }
                    Decision::Deny { reason, .. } => {
                        tracing::info!(?transport, ?client, reason = reason.as_str(), "denied")
                    }
                }
            }
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(?transport, ?client, %error, "no decision")
            }
        }
    }

    async fn decide(
        &self,
        header: Option<&[u8]>,
        client: &ClientAddress<'_>,
    ) -> Result<Decision, DecideError> {
        // Steps 1 and 2: the header itself.
        let credentials = match parse_authorization(header) {
            Ok(credentials) => credentials,
            Err(CredentialsError::Missing) => {
                return Ok(Decision::deny(DenyReason::MissingCredentials));
            }
            Err(CredentialsError::Malformed(_)) => {
                return Ok(Decision::deny(DenyReason::MalformedCredentials));
            }
        };
        // Step 3: before the lockout, operators' username/password pairs.
        if !self.api_keys_enabled().await? {
            let Some(username) = credentials.username() else {
                // A bearer token carries no username/password pair.
                return Ok(Decision::deny(DenyReason::InvalidCredentials));
            };
            // Boxed for the same reason as the key verification: a rare path, a big future.
            return Box::pin(self.decide_user(username, credentials.secret(), client.ip())).await;
        }
        // Step 4: API keys only.
        self.decide_key(credentials.secret(), client).await
    }

    async fn decide_key(
        &self,
        presented: &str,
        client: &ClientAddress<'_>,
    ) -> Result<Decision, DecideError> {
        let Ok(key_text) = parse_key_shape(&self.prefix, presented) else {
            return Ok(Decision::deny(DenyReason::InvalidCredentials));
        };
        if let Some(allowed) = self.cached_allow(&key_text) {
            return Ok(allowed);
        }
        // Everything else, in SPEC order. Wrong checksum: no store lookup, no argon2.
        if !key_text.checksum_matches() {
            return Ok(Decision::deny(DenyReason::InvalidCredentials));
        }
        loop {
            let generation = self.cache.generation();
            let entry = self.key_entry(key_text.id).await?;
            let CachedKey::Known(key) = &*entry else {
                return Ok(Decision::deny(DenyReason::InvalidCredentials));
            };
            let now = Utc::now();
            // Expired and disabled are decided before any argon2 work.
            if let Err(reason) = check_key_state(key.record.expires_at, key.record.enabled, now) {
                return Ok(Decision::deny(reason));
            }
            // The fingerprint covers the checksum too, so that the hot path above recognises
            // only text that passed it; argon2 covers the random part (SPEC section 2).
            let fingerprint = self.cache.fingerprint(&key.secret, key_text.secret);
            if !self.cache.is_verified(&key.secret, &fingerprint) {
                // Step 5: only uncached verification work is rate limited (inside `verify`).
                // Boxed: the verification's future (moka's coalescing, the argon2 pool) is
                // kilobytes, and inline it would make every request's future that big.
                let verified = Box::pin(self.cache.verify(
                    &key.secret,
                    key_text.random(),
                    fingerprint,
                    Some((&self.limiter, client.ip())),
                ))
                .await;
                match verified {
                    Ok(true) => {}
                    Ok(false) => return Ok(Decision::deny(DenyReason::InvalidCredentials)),
                    Err(Unverified::RateLimited(retry_after)) => {
                        return Ok(rate_limited(retry_after));
                    }
                    Err(Unverified::Overloaded) => return Err(DecideError::Overloaded),
                }
                // The key may have been disabled or deleted while argon2 ran; decide on its
                // current state rather than on what it was when this request arrived.
                if self.cache.generation() != generation {
                    continue;
                }
            }
            return Ok(self.allow(key, now));
        }
    }

    /// The hot path: a cached key, usable now, presented with the exact 40 characters that
    /// were verified for it before. Those passed the checksum before they were verified
    /// (`decide_key`), and the checksum covers only the prefix, the id and those characters,
    /// so recomputing it could not change the outcome.
    fn cached_allow(&self, key_text: &PresentedKey<'_>) -> Option<Decision> {
        let entry = self.cache.key(key_text.id)?;
        let CachedKey::Known(key) = &*entry else {
            return None;
        };
        let now = Utc::now();
        (check_key_state(key.record.expires_at, key.record.enabled, now).is_ok()
            && self.cache.recognises(&key.secret, key_text.secret))
        .then(|| self.allow(key, now))
    }

    /// Lets a verified key in, queueing its use for `last_used_at`.
    fn allow(&self, key: &KnownKey, now: DateTime<Utc>) -> Decision {
        if key.should_record_use(now.timestamp(), crate::usage::RECORD_INTERVAL_SECS) {
            self.usage.record(key.record.id, now);
        }
        Decision::Allow(Principal::Key {
            id: key.record.id,
            name: key.name.clone(),
        })
    }

    async fn decide_user(
        &self,
        username: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<Decision, DecideError> {
        let verified = verify_user(
            &self.store,
            &self.cache,
            username,
            password,
            Some((&self.limiter, client)),
        )
        .await?;
        Ok(match verified {
            UserCheck::Valid => Decision::Allow(Principal::User {
                username: username.to_owned(),
            }),
            UserCheck::Invalid => Decision::deny(DenyReason::InvalidCredentials),
            UserCheck::Refused(decision) => decision,
        })
    }

    async fn key_entry(&self, id: i64) -> Result<Arc<CachedKey>, DecideError> {
        if let Some(entry) = self.cache.key(id) {
            return Ok(entry);
        }
        let read_at = self.cache.generation();
        let record = self.store.get_key(id).await?;
        let entry = Arc::new(CachedKey::from(record));
        self.cache.insert_key(id, entry.clone(), read_at);
        Ok(entry)
    }

    async fn api_keys_enabled(&self) -> Result<bool, DecideError> {
        if self.api_keys_enabled.load(Ordering::Acquire) {
            return Ok(true);
        }
        let mode = self.store.auth_mode().await?;
        if mode.api_keys_enabled {
            self.note_lockout();
        }
        Ok(mode.api_keys_enabled)
    }

    /// Called when this process created the first key or heard that another did.
    pub fn note_lockout(&self) {
        self.api_keys_enabled.store(true, Ordering::Release);
    }
}

fn rate_limited(retry_after: std::time::Duration) -> Decision {
    Decision::Deny {
        reason: DenyReason::RateLimited,
        retry_after_secs: Some(retry_after.as_secs_f64().ceil() as u64),
    }
}

/// The outcome of checking a username/password pair.
pub enum UserCheck {
    Valid,
    Invalid,
    /// The failure limiter refused to pay for argon2.
    Refused(Decision),
}

/// Checks an operator's username and password: from the cache when this exact pair was verified
/// before, otherwise with argon2, if `limiter` (with the client's address) allows that work.
/// Unknown and inactive users cost a dummy argon2 run, so timing does not tell them apart.
pub async fn verify_user(
    store: &DynStore,
    cache: &CredentialCache,
    username: &str,
    password: &str,
    limiter: Option<(&FailureLimiter, Option<IpAddr>)>,
) -> Result<UserCheck, DecideError> {
    let entry = match cache.user(username) {
        Some(entry) => entry,
        None => {
            let record = store.find_user(username).await?;
            cache.insert_user(username, record)
        }
    };
    let active = entry.record.as_ref().is_some_and(|user| user.active);
    let fingerprint = cache.fingerprint(&entry.secret, password);
    if active && cache.is_verified(&entry.secret, &fingerprint) {
        return Ok(UserCheck::Valid);
    }
    let valid = if active {
        match cache
            .verify(&entry.secret, password, fingerprint, limiter)
            .await
        {
            Ok(valid) => valid,
            Err(Unverified::RateLimited(retry_after)) => {
                return Ok(UserCheck::Refused(rate_limited(retry_after)));
            }
            Err(Unverified::Overloaded) => return Err(DecideError::Overloaded),
        }
    } else {
        // Nothing to share here: every unknown name costs its own dummy run, paid for with a
        // token like any other argon2 run.
        let attempt = match limiter.map(|(limiter, client)| limiter.begin(client)) {
            None => None,
            Some(Ok(attempt)) => Some(attempt),
            Some(Err(retry_after)) => return Ok(UserCheck::Refused(rate_limited(retry_after))),
        };
        cache.burn_dummy_verify(password).await?;
        if let Some(attempt) = attempt {
            attempt.failed();
        }
        false
    };
    Ok(if valid {
        UserCheck::Valid
    } else {
        UserCheck::Invalid
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{config::ServeArgs, metrics::Transport, startup::Services, store::SqliteStore};

    /// Every request's future is allocated (tonic boxes the handler's) and moved; the argon2
    /// path's future is kilobytes (moka's coalescing, the worker pool), so it is boxed and only
    /// a miss pays for it. Above 1 KiB an allocation also leaves glibc's fast per-thread cache.
    #[tokio::test]
    async fn the_hot_path_future_stays_small() {
        let store = Arc::new(SqliteStore::connect("sqlite::memory:").await.unwrap());
        let services = Services::build(&ServeArgs::from_env(), store).unwrap();
        let future = services
            .authorizer
            .authorize(Transport::Envoy, None, Default::default());
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= 512,
            "Authorizer::authorize's future is {size} bytes"
        );
    }
}
