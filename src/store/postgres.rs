//! The production store: Postgres through sqlx, with a LISTEN/NOTIFY change feed so replicas
//! sharing the database hear about each other's key changes within milliseconds.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::sync::mpsc;

use super::{
    DigestForId, KEY_COLUMNS, KeyRow, NewKey, Store, StoreChange, StoreError, UserRow, redact_url,
};
use crate::domain::{
    digest::SecretDigest,
    model::{AuthMode, KeyRecord, UserRecord},
};

/// Postgres channel that the schema's triggers notify.
const CHANGES_CHANNEL: &str = "keygate_changes";

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    description: String,
    breaker: Arc<Breaker>,
}

/// While the database is unreachable, each query would wait out the pool's acquire timeout
/// (sqlx retries refused connections until then): 2 s for every uncached key, every KeyAdmin
/// call. After a query finds the database unreachable, the others fail at once instead, and
/// one query every `PROBE_EVERY` goes through to find out whether it is back.
#[derive(Default)]
struct Breaker {
    /// When a query last tried the database while it was known to be down; `None` when up.
    down: Mutex<Option<Instant>>,
}

const PROBE_EVERY: Duration = Duration::from_millis(250);

impl Breaker {
    fn admit(&self) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match *down {
            None => true,
            Some(last) if last.elapsed() >= PROBE_EVERY => {
                *down = Some(Instant::now());
                true
            }
            Some(_) => false,
        }
    }

    fn record<T>(&self, result: &Result<T, StoreError>) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        *down = match result {
            Err(StoreError::Unavailable(_)) => Some(Instant::now()),
            _ => None,
        };
    }
}

impl PostgresStore {
    /// Connects lazily, so keygate can start (NOT_SERVING) before its database is up, then
    /// applies migrations. Queries fail fast when the database is gone: a gateway waiting on us
    /// has its own, short, timeout.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Internal(format!("invalid database URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options);
        let store = Self::from_pool(pool, redact_url(url));
        Ok(store)
    }

    /// Wraps an existing pool (tests use the per-test database `#[sqlx::test]` creates).
    pub fn from_pool(pool: PgPool, description: String) -> Self {
        Self {
            pool,
            description,
            breaker: Arc::default(),
        }
    }

    /// Runs a query unless the database is known to be down (see `Breaker`).
    async fn guarded<T>(
        &self,
        query: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.breaker.admit() {
            return Err(StoreError::Unavailable(
                "the database was unreachable moments ago; waiting before the next attempt".into(),
            ));
        }
        let result = query.await;
        self.breaker.record(&result);
        result
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn describe(&self) -> String {
        format!("postgres ({})", self.description)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(super::migrate_error)
    }

    /// Always tries (readiness probes it every second), and tells the breaker what it found.
    async fn ping(&self) -> Result<(), StoreError> {
        let result = sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::from);
        self.breaker.record(&result);
        result
    }

    async fn create_key(
        &self,
        key: NewKey,
        digest_for: DigestForId<'_>,
    ) -> Result<KeyRecord, StoreError> {
        self.guarded(async {
            let mut tx = self.pool.begin().await?;
            // The digest covers the id, so the id is drawn first. BIGSERIAL's sequence never
            // hands it out again, even if this transaction rolls back.
            let (id,): (i64,) =
                sqlx::query_as("SELECT nextval(pg_get_serial_sequence('api_keys', 'id'))")
                    .fetch_one(&mut *tx)
                    .await?;
            let digest = digest_for(id);
            let row: KeyRow = sqlx::query_as(&format!(
                "INSERT INTO api_keys (id, name, secret_digest, created_at, expires_at, enabled, created_by)
                 VALUES ($1, $2, $3, $4, $5, TRUE, $6) RETURNING {KEY_COLUMNS}"
            ))
            .bind(id)
            .bind(&key.name)
            .bind(digest.as_bytes().as_slice())
            .bind(key.created_at)
            .bind(key.expires_at)
            .bind(&key.created_by)
            .fetch_one(&mut *tx)
            .await?;
            // The first key locks basic auth out, in the same transaction. Concurrent creators
            // serialise on the row lock; the loser's WHERE no longer matches, so locked_at is the
            // first key's time.
            sqlx::query(
                "UPDATE auth_mode SET api_keys_enabled = TRUE, locked_at = $1 WHERE NOT api_keys_enabled",
            )
            .bind(key.created_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            row.try_into()
        })
        .await
    }

    async fn get_key(&self, id: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.guarded(async {
            let row: Option<KeyRow> =
                sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            row.map(KeyRecord::try_from).transpose()
        })
        .await
    }

    async fn get_keys(&self, ids: &[i64]) -> Result<Vec<KeyRecord>, StoreError> {
        self.guarded(async {
            let rows: Vec<KeyRow> = sqlx::query_as(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ANY($1)"
            ))
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
            super::key_records(rows)
        })
        .await
    }

    async fn list_keys(&self, after_id: i64, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        self.guarded(async {
            let rows: Vec<KeyRow> = sqlx::query_as(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .bind(after_id)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
            super::key_records(rows)
        })
        .await
    }

    async fn set_key_enabled(
        &self,
        id: i64,
        enabled: bool,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.guarded(async {
            let row: Option<KeyRow> = sqlx::query_as(&format!(
                "UPDATE api_keys SET enabled = $2 WHERE id = $1 RETURNING {KEY_COLUMNS}"
            ))
            .bind(id)
            .bind(enabled)
            .fetch_optional(&self.pool)
            .await?;
            row.map(KeyRecord::try_from).transpose()
        })
        .await
    }

    async fn delete_key(&self, id: i64) -> Result<bool, StoreError> {
        self.guarded(async {
            let result = sqlx::query("DELETE FROM api_keys WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(result.rows_affected() > 0)
        })
        .await
    }

    async fn upgrade_key_secret(
        &self,
        id: i64,
        argon2_hash: &str,
        digest: &SecretDigest,
    ) -> Result<bool, StoreError> {
        self.guarded(async {
            let result = sqlx::query(
                "UPDATE api_keys SET secret_digest = $3, secret_hash = NULL
                 WHERE id = $1 AND secret_hash = $2",
            )
            .bind(id)
            .bind(argon2_hash)
            .bind(digest.as_bytes().as_slice())
            .execute(&self.pool)
            .await?;
            Ok(result.rows_affected() > 0)
        })
        .await
    }

    async fn record_key_usage(&self, uses: &[(i64, DateTime<Utc>)]) -> Result<(), StoreError> {
        self.guarded(async {
            if uses.is_empty() {
                return Ok(());
            }
            let (ids, times): (Vec<i64>, Vec<DateTime<Utc>>) = uses.iter().copied().unzip();
            sqlx::query(
                "UPDATE api_keys AS k SET last_used_at = GREATEST(k.last_used_at, u.used_at)
                 FROM UNNEST($1::BIGINT[], $2::TIMESTAMPTZ[]) AS u(id, used_at)
                 WHERE k.id = u.id",
            )
            .bind(&ids)
            .bind(&times)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn auth_mode(&self) -> Result<AuthMode, StoreError> {
        self.guarded(async {
            let (api_keys_enabled, locked_at): (bool, Option<DateTime<Utc>>) =
                sqlx::query_as("SELECT api_keys_enabled, locked_at FROM auth_mode")
                    .fetch_one(&self.pool)
                    .await?;
            Ok(AuthMode {
                api_keys_enabled,
                locked_at,
            })
        })
        .await
    }

    async fn find_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        self.guarded(async {
            let row: Option<UserRow> = sqlx::query_as(
                "SELECT username, password_hash, active FROM users WHERE username = $1",
            )
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.map(Into::into))
        })
        .await
    }

    async fn create_user(&self, username: &str, password_hash: &str) -> Result<(), StoreError> {
        self.guarded(async {
            sqlx::query("INSERT INTO users (username, password_hash) VALUES ($1, $2)")
                .bind(username)
                .bind(password_hash)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn set_user_password(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        self.guarded(async {
            let result = sqlx::query("UPDATE users SET password_hash = $2 WHERE username = $1")
                .bind(username)
                .bind(password_hash)
                .execute(&self.pool)
                .await?;
            Ok(result.rows_affected() > 0)
        })
        .await
    }

    async fn count_users(&self) -> Result<i64, StoreError> {
        self.guarded(async {
            let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM users")
                .fetch_one(&self.pool)
                .await?;
            Ok(count)
        })
        .await
    }

    async fn subscribe(&self) -> Option<mpsc::Receiver<StoreChange>> {
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(listen_for_changes(self.pool.clone(), sender));
        Some(receiver)
    }
}

/// Keeps a LISTEN connection open for as long as anyone receives. After every (re)connect it
/// emits `Resync`: notifications sent while it was away are lost, so its subscriber must
/// re-validate what it holds.
async fn listen_for_changes(pool: PgPool, sender: mpsc::Sender<StoreChange>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if sender.is_closed() {
            return;
        }
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANGES_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot LISTEN for key changes");
                tokio::time::sleep(backoff).await;
                // Capped at 1 s: each attempt also waits out the pool's 2 s acquire timeout
                // while the database is down, so the change feed is back (and re-validates the
                // cache) within about 3 s of the database, however long it was away.
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        tracing::info!("listening for key changes");
        if sender.send(StoreChange::Resync).await.is_err() {
            return;
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    let Some(change) = parse_change(notification.payload()) else {
                        tracing::warn!(
                            payload = notification.payload(),
                            "unknown change notification"
                        );
                        continue;
                    };
                    if sender.send(change).await.is_err() {
                        return;
                    }
                }
                // The connection dropped: reconnect ourselves, so the Resync is sent only once
                // the new connection is listening.
                Ok(None) => {
                    tracing::warn!("lost the LISTEN connection; reconnecting");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}

fn parse_change(payload: &str) -> Option<StoreChange> {
    if payload == "auth_mode" {
        return Some(StoreChange::AuthMode);
    }
    payload
        .strip_prefix("key:")?
        .parse()
        .ok()
        .map(StoreChange::Key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_fails_fast_while_down_and_lets_a_probe_through() {
        let breaker = Breaker::default();
        assert!(
            breaker.admit() && breaker.admit(),
            "up: everything goes through"
        );
        breaker.record::<()>(&Err(StoreError::Unavailable("refused".into())));
        assert!(!breaker.admit(), "down: fail fast");
        std::thread::sleep(PROBE_EVERY);
        assert!(breaker.admit(), "one probe after the interval");
        assert!(!breaker.admit(), "only one");
        breaker.record::<()>(&Err(StoreError::Internal("a bad query".into())));
        assert!(breaker.admit(), "the database answered: up again");
        breaker.record(&Ok(()));
        assert!(breaker.admit());
    }

    #[test]
    fn change_payloads() {
        assert_eq!(parse_change("key:42"), Some(StoreChange::Key(42)));
        assert_eq!(parse_change("auth_mode"), Some(StoreChange::AuthMode));
        assert_eq!(parse_change("key:x"), None);
        assert_eq!(parse_change("other"), None);
    }
}
