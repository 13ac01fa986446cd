//! Persistence behind one small trait, so the services never know which database they run on.
//! Postgres is the production store; SQLite is the embedded single-node default.

mod postgres;
mod sqlite;

use std::{fmt, sync::Arc};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::domain::{
    digest::SecretDigest,
    model::{AuthMode, KeyRecord, StoredSecret, UserRecord},
};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// What a caller of the store needs to tell apart. Details (SQL, driver messages) stay in the
/// `Unavailable` text, which is logged, never sent to clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("a user with that name already exists")]
    UserExists,
    #[error("store error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                Self::Unavailable(error.to_string())
            }
            E::Database(db) if db.is_unique_violation() => Self::UserExists,
            // A server shutting down, too many connections, a cancelled query: a
            // reconnect may succeed, so report them as unavailability, not as bugs.
            E::Database(db)
                if db.code().is_some_and(|code| {
                    code.starts_with("57") || code.starts_with("08") || code == "53300"
                }) =>
            {
                Self::Unavailable(error.to_string())
            }
            _ => Self::Internal(error.to_string()),
        }
    }
}

/// A key to insert. The store assigns the id; the digest covers the whole clear key, id
/// included, so the store asks for it once the id is known (`Store::create_key`).
pub struct NewKey {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: String,
}

/// The digest of the clear key that a new key gets with the id the store assigned.
pub type DigestForId<'a> = &'a (dyn Fn(i64) -> SecretDigest + Send + Sync);

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("name", &self.name)
            .field("expires_at", &self.expires_at)
            .field("created_by", &self.created_by)
            .finish_non_exhaustive()
    }
}

/// A change another process made, delivered by the store's change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreChange {
    /// The key was created, enabled, disabled, deleted or edited.
    Key(i64),
    /// The lockout flag was set.
    AuthMode,
    /// The feed lost events (its connection dropped and came back): re-validate everything.
    Resync,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which backend, and where, for start-up logs. Never contains a password.
    fn describe(&self) -> String;
    /// Applies the migrations in the repository that the database has not seen yet.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Succeeds when the database answers a trivial query.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts the key with the digest `digest_for` gives for its id and, in the same
    /// transaction, sets the lockout flag if it is not set.
    async fn create_key(
        &self,
        key: NewKey,
        digest_for: DigestForId<'_>,
    ) -> Result<KeyRecord, StoreError>;
    async fn get_key(&self, id: i64) -> Result<Option<KeyRecord>, StoreError>;
    /// Several keys at once, for cache re-validation; missing ids are simply absent.
    async fn get_keys(&self, ids: &[i64]) -> Result<Vec<KeyRecord>, StoreError>;
    /// Up to `limit` keys with `id > after_id`, by id.
    async fn list_keys(&self, after_id: i64, limit: usize) -> Result<Vec<KeyRecord>, StoreError>;
    async fn set_key_enabled(
        &self,
        id: i64,
        enabled: bool,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Returns whether a key was deleted.
    async fn delete_key(&self, id: i64) -> Result<bool, StoreError>;
    /// Replaces a version-1 key's argon2id hash by its digest, if the row still holds exactly
    /// that hash; returns whether it did. Idempotent: replicas upgrading the same key at once
    /// all succeed, and one of them writes.
    async fn upgrade_key_secret(
        &self,
        id: i64,
        argon2_hash: &str,
        digest: &SecretDigest,
    ) -> Result<bool, StoreError>;
    /// Records last use; each id at most once per call, newest time wins.
    async fn record_key_usage(&self, uses: &[(i64, DateTime<Utc>)]) -> Result<(), StoreError>;

    async fn auth_mode(&self) -> Result<AuthMode, StoreError>;

    async fn find_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError>;
    async fn create_user(&self, username: &str, password_hash: &str) -> Result<(), StoreError>;
    /// Returns whether the user exists.
    async fn set_user_password(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError>;
    async fn count_users(&self) -> Result<i64, StoreError>;

    /// Changes made by other processes sharing the database, or `None` where there can be none
    /// (the embedded store has a single process).
    async fn subscribe(&self) -> Option<mpsc::Receiver<StoreChange>>;
}

pub type DynStore = Arc<dyn Store>;

/// The columns of a `KeyRow`, in its order.
const KEY_COLUMNS: &str = "id, name, secret_digest, secret_hash, created_at, expires_at, enabled, \
                           last_used_at, created_by";

/// Row shapes shared by both backends.
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: i64,
    name: String,
    secret_digest: Option<Vec<u8>>,
    secret_hash: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    enabled: bool,
    last_used_at: Option<DateTime<Utc>>,
    created_by: String,
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    /// Both schemas require exactly one of digest and hash, the digest 32 bytes long; a row
    /// that breaks that was written around keygate and verifies nothing.
    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        let secret = match (row.secret_digest.as_deref(), row.secret_hash) {
            (Some(bytes), None) => SecretDigest::from_slice(bytes).map(StoredSecret::Digest),
            (None, Some(hash)) => Some(StoredSecret::Argon2(hash)),
            _ => None,
        }
        .ok_or_else(|| StoreError::Internal(format!("key {} has no usable secret", row.id)))?;
        Ok(Self {
            id: row.id,
            name: row.name,
            created_at: row.created_at,
            expires_at: row.expires_at,
            enabled: row.enabled,
            last_used_at: row.last_used_at,
            created_by: row.created_by,
            secret,
        })
    }
}

/// Rows to records, failing on the first unusable one.
fn key_records(rows: Vec<KeyRow>) -> Result<Vec<KeyRecord>, StoreError> {
    rows.into_iter().map(KeyRecord::try_from).collect()
}

#[derive(sqlx::FromRow)]
struct UserRow {
    username: String,
    password_hash: String,
    active: bool,
}

impl From<UserRow> for UserRecord {
    fn from(row: UserRow) -> Self {
        Self {
            username: row.username,
            password_hash: row.password_hash,
            active: row.active,
        }
    }
}

fn migrate_error(error: sqlx::migrate::MigrateError) -> StoreError {
    match error {
        sqlx::migrate::MigrateError::Execute(inner) => StoreError::from(inner),
        other => StoreError::Internal(format!("migration failed: {other}")),
    }
}

/// Opens the store a URL names. Migrations are applied separately (`Store::migrate`), so a
/// server can start and report NOT_SERVING while its database is still coming up.
pub async fn connect(url: &str) -> Result<DynStore, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::Internal(
            "database URL must start with postgres://, postgresql:// or sqlite:".into(),
        ))
    }
}

/// A URL safe to log: the password, if any, replaced.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                if userinfo.contains(':') {
                    format!("{scheme}://{user}:[REDACTED]@{host}")
                } else {
                    format!("{scheme}://{user}@{host}")
                }
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://kg:s3cret@db:5432/kg"),
            "postgres://kg:[REDACTED]@db:5432/kg"
        );
        assert_eq!(redact_url("postgres://kg@db/kg"), "postgres://kg@db/kg");
        assert_eq!(redact_url("sqlite://keygate.db"), "sqlite://keygate.db");
    }
}
