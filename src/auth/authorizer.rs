//! The one place that decides allow or deny (SPEC section 3), shared by every transport: the
//! `Authorizer` RPC and Envoy's `Check` are thin adapters around `Authorizer::decide`.

use std::{net::IpAddr, sync::Arc, time::Instant};

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::{
    argon_pool::{ArgonPool, Overloaded},
    cache::{CachedKey, KeyCache, KnownKey},
    key_reads::KeyReads,
    lockout::Lockout,
    passwords::{PasswordCheck, PasswordCheckError, Passwords},
    rate_limit::FailureLimiter,
    usage::UsageRecorder,
};
use crate::{
    domain::{
        credentials::{ClientAddress, CredentialsError, parse_authorization},
        decision::{Decision, DenyReason, Principal, check_key_state},
        digest::SecretDigest,
        key::{KeyPrefix, PresentedKey, parse_key_shape},
        model::StoredSecret,
    },
    metrics::{Metrics, Transport},
    store::{DynStore, StoreError},
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

impl From<PasswordCheckError> for DecideError {
    fn from(error: PasswordCheckError) -> Self {
        match error {
            PasswordCheckError::Store(error) => Self::StoreUnavailable(error),
            PasswordCheckError::Overloaded => Self::Overloaded,
        }
    }
}

pub struct Authorizer {
    store: DynStore,
    cache: Arc<KeyCache>,
    reads: Arc<KeyReads>,
    passwords: Arc<Passwords>,
    /// For version-1 keys' argon2id hashes, until their first use replaces them.
    argon: ArgonPool,
    limiter: FailureLimiter,
    prefix: KeyPrefix,
    lockout: Arc<Lockout>,
    usage: Arc<UsageRecorder>,
    metrics: Arc<Metrics>,
}

/// What the authorizer is built from.
pub struct AuthorizerParts {
    pub store: DynStore,
    pub cache: Arc<KeyCache>,
    pub passwords: Arc<Passwords>,
    pub argon: ArgonPool,
    pub limiter: FailureLimiter,
    pub prefix: KeyPrefix,
    pub lockout: Arc<Lockout>,
    pub usage: Arc<UsageRecorder>,
    pub metrics: Arc<Metrics>,
}

impl Authorizer {
    pub fn new(parts: AuthorizerParts) -> Self {
        let AuthorizerParts {
            store,
            cache,
            passwords,
            argon,
            limiter,
            prefix,
            lockout,
            usage,
            metrics,
        } = parts;
        Self {
            reads: KeyReads::new(store.clone(), cache.clone()),
            store,
            cache,
            passwords,
            argon,
            limiter,
            prefix,
            lockout,
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

    /// `authorize` for the requests the hot path allows (a key held in memory presented again,
    /// once API keys are on), without a future; `None` for every other request, which
    /// `authorize` then decides in full (running the same checks again, so the outcome is the
    /// same).
    pub fn authorize_cached(
        &self,
        transport: Transport,
        header: Option<&[u8]>,
        client: &ClientAddress<'_>,
    ) -> Option<Decision> {
        let started = Instant::now();
        if !self.lockout.is_known() {
            return None;
        }
        let credentials = parse_authorization(header).ok()?;
        let presented = credentials.secret();
        let key_text = parse_key_shape(&self.prefix, presented).ok()?;
        let decision = self.cached_allow(&key_text, presented)?;
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
            // Boxed: a rare path with a big future (moka's coalescing, the argon2 pool), which
            // inline would make every request's future that big.
            return Box::pin(self.decide_user(username, credentials.secret(), client.ip())).await;
        }
        // Step 4: API keys only.
        self.decide_key(credentials.secret(), client.ip()).await
    }

    /// Step 4 and the failure budget of step 5. A spent budget refuses every credential that is
    /// not a verified key held in memory, before the store is asked; failures spend it, unknown
    /// ids included. Expired and disabled keys are decided before the secret is compared, and
    /// do not count as failures: whoever presents them holds (or held) a real key.
    async fn decide_key(
        &self,
        presented: &str,
        client: Option<IpAddr>,
    ) -> Result<Decision, DecideError> {
        let Ok(key_text) = parse_key_shape(&self.prefix, presented) else {
            return Ok(Decision::deny(DenyReason::InvalidCredentials));
        };
        if let Some(allowed) = self.cached_allow(&key_text, presented) {
            return Ok(allowed);
        }
        // Everything else, in SPEC order. Wrong checksum: no store lookup.
        if !key_text.checksum_matches() {
            return Ok(Decision::deny(DenyReason::InvalidCredentials));
        }
        let entry = match self.cache.key(key_text.id) {
            Some(entry) => entry,
            None => {
                if let Err(wait) = self.limiter.check(client) {
                    return Ok(rate_limited(wait));
                }
                self.read_key(key_text.id).await?
            }
        };
        let CachedKey::Known(key) = &*entry else {
            return Ok(self.failed(client));
        };
        let now = Utc::now();
        if let Err(reason) = check_key_state(key.record.expires_at, key.record.enabled, now) {
            return Ok(Decision::deny(reason));
        }
        match &key.record.secret {
            StoredSecret::Digest(digest) if digest.matches(presented) => Ok(self.allow(key, now)),
            StoredSecret::Digest(_) => Ok(self.failed(client)),
            StoredSecret::Argon2(hash) => {
                // Boxed for the same reason as the users' path.
                Box::pin(self.upgrade_version_1_key(key, hash, &key_text, presented, client)).await
            }
        }
    }

    /// A key made by version 1, presented for the first time since the upgrade: its argon2id
    /// hash (of the 34 random characters) decides, and a match replaces the hash by the digest
    /// for every replica, so the fleet pays this argon2 run once per key (SPEC section 6).
    async fn upgrade_version_1_key(
        &self,
        key: &KnownKey,
        hash: &str,
        key_text: &PresentedKey<'_>,
        presented: &str,
        client: Option<IpAddr>,
    ) -> Result<Decision, DecideError> {
        // argon2 is costly: the token is taken before it runs, and given back on a match.
        let attempt = match self.limiter.begin(client) {
            Ok(attempt) => attempt,
            Err(wait) => return Ok(rate_limited(wait)),
        };
        let matched = self
            .argon
            .verify(
                hash.to_owned(),
                SecretString::from(key_text.random().to_owned()),
            )
            .await?;
        if !matched {
            attempt.failed();
            return Ok(Decision::deny(DenyReason::InvalidCredentials));
        }
        drop(attempt);
        let id = key.record.id;
        match self
            .store
            .upgrade_key_secret(id, hash, &SecretDigest::of(presented))
            .await
        {
            Ok(true) => {
                self.metrics.key_digest_upgrades.inc();
                tracing::info!(id, "version-1 key upgraded to a SHA-256 digest");
            }
            Ok(false) => {}
            // The key is verified all the same; the next use tries the upgrade again.
            Err(error) => tracing::warn!(id, %error, "cannot store a version-1 key's digest"),
        }
        // The state may have changed while argon2 ran: decide on what it is now, from a read
        // that is kept (with the digest, if the upgrade was written), so the next use needs none.
        self.cache.invalidate_key(id);
        let now = Utc::now();
        match self.read_key(id).await.as_deref() {
            Ok(CachedKey::Known(current)) => {
                if let Err(reason) =
                    check_key_state(current.record.expires_at, current.record.enabled, now)
                {
                    return Ok(Decision::deny(reason));
                }
            }
            Ok(CachedKey::Unknown { .. }) => {
                return Ok(Decision::deny(DenyReason::InvalidCredentials));
            }
            Err(error) => tracing::warn!(id, %error, "cannot re-read a version-1 key"),
        }
        Ok(self.allow(key, now))
    }

    /// A failure outside the hot path: charged to the client's budget, and answered
    /// `RATE_LIMITED` once that is spent.
    fn failed(&self, client: Option<IpAddr>) -> Decision {
        match self.limiter.fail(client) {
            Ok(()) => Decision::deny(DenyReason::InvalidCredentials),
            Err(wait) => rate_limited(wait),
        }
    }

    /// The hot path: a key held in memory, usable now, presented with the clear key its digest
    /// was made from. The digest covers the checksum, so a match means the checksum holds too.
    fn cached_allow(&self, key_text: &PresentedKey<'_>, presented: &str) -> Option<Decision> {
        let entry = self.cache.key(key_text.id)?;
        let CachedKey::Known(key) = &*entry else {
            return None;
        };
        let StoredSecret::Digest(digest) = &key.record.secret else {
            return None;
        };
        let now = Utc::now();
        (check_key_state(key.record.expires_at, key.record.enabled, now).is_ok()
            && digest.matches(presented))
        .then(|| {
            self.metrics.cache_hits.inc();
            self.allow(key, now)
        })
    }

    /// Lets a verified key in, queueing its use for `last_used_at`.
    fn allow(&self, key: &KnownKey, now: DateTime<Utc>) -> Decision {
        if key.should_record_use(now.timestamp(), crate::auth::usage::RECORD_INTERVAL_SECS) {
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
        let checked = self
            .passwords
            .check(username, password, Some((&self.limiter, client)))
            .await?;
        Ok(match checked {
            PasswordCheck::Valid => Decision::Allow(Principal::User {
                username: username.to_owned(),
            }),
            PasswordCheck::Invalid => Decision::deny(DenyReason::InvalidCredentials),
            PasswordCheck::RateLimited(wait) => rate_limited(wait),
        })
    }

    /// One store read (shared with concurrent misses), remembered (an unknown id too, briefly).
    async fn read_key(&self, id: i64) -> Result<Arc<CachedKey>, DecideError> {
        self.metrics.cache_misses.inc();
        Ok(self.reads.read(id).await?)
    }

    async fn api_keys_enabled(&self) -> Result<bool, DecideError> {
        if self.lockout.is_known() {
            return Ok(true);
        }
        let mode = self.store.auth_mode().await?;
        if mode.api_keys_enabled {
            self.lockout.note();
        }
        Ok(mode.api_keys_enabled)
    }
}

fn rate_limited(retry_after: std::time::Duration) -> Decision {
    Decision::Deny {
        reason: DenyReason::RateLimited,
        retry_after_secs: Some(retry_after.as_secs_f64().ceil() as u64),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{app::Services, metrics::Transport, settings::Settings, store::SqliteStore};

    /// Every request's future is allocated (tonic boxes the handler's) and moved; the argon2
    /// paths' futures are kilobytes (moka's coalescing, the worker pool), so they are boxed and
    /// only those rare requests pay for them. Above 1 KiB an allocation also leaves glibc's
    /// fast per-thread cache.
    #[tokio::test]
    async fn the_hot_path_future_stays_small() {
        let store = Arc::new(SqliteStore::connect("sqlite::memory:").await.unwrap());
        let services = Services::build(&Settings::default(), store).unwrap();
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
