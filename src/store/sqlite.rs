//! The embedded store: one SQLite file, WAL mode, for a single keygate process. Same schema
//! guarantees as Postgres; no change feed, because no other process shares the file.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::mpsc;

use super::{DigestForId, KEY_COLUMNS, KeyRow, NewKey, Store, StoreChange, StoreError, UserRow};
use crate::domain::{
    digest::SecretDigest,
    model::{AuthMode, KeyRecord, UserRecord},
};

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    description: String,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database file a `sqlite:` URL names.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("invalid database URL: {e}")))?
            .create_if_missing(true)
            // WAL lets Authorize reads proceed while KeyAdmin writes; concurrent writers queue
            // on the busy timeout instead of failing with SQLITE_BUSY.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let filename = options.get_filename().to_owned();
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            owner_only_files(&filename)?;
        }
        let description = filename.display().to_string();
        let pool = if in_memory {
            // Every connection to `:memory:` is a database of its own: keep exactly one, forever.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(8)
        }
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
        Ok(Self { pool, description })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// The database holds operators' password hashes: a directory keygate creates for it is 0700
/// and a file it creates is 0600 (SQLite gives the `-wal` and `-shm` files the mode of the
/// database file). Files that exist already keep their mode, with a warning when other users
/// have access: changing an operator's choice silently would be worse.
fn owner_only_files(database: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

    let cannot = |what: &Path, error: std::io::Error| {
        StoreError::Internal(format!("cannot create {}: {error}", what.display()))
    };
    if let Some(parent) = database.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| cannot(parent, e))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(database)
    {
        Ok(_) => return Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(cannot(database, error)),
    }
    let mut files = vec![database.to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    for file in files {
        if let Ok(metadata) = std::fs::metadata(&file)
            && metadata.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                file = %file.display(),
                mode = format!("{:o}", metadata.permissions().mode() & 0o777),
                "other users have access to the database file (it holds password hashes): \
                 chmod 600 it"
            );
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite ({})", self.description)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(super::migrate_error)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_key(
        &self,
        key: NewKey,
        digest_for: DigestForId<'_>,
    ) -> Result<KeyRecord, StoreError> {
        // The insert comes first, so this transaction takes SQLite's write lock at its first
        // statement and concurrent creators queue instead of deadlocking on a lock upgrade.
        // The digest covers the id that the insert assigns: the row is written with a
        // placeholder that no clear key hashes to, and completed before anyone can read it.
        let mut tx = self.pool.begin().await?;
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO api_keys (name, secret_digest, created_at, expires_at, enabled, created_by)
             VALUES (?1, zeroblob(32), ?2, ?3, TRUE, ?4) RETURNING id",
        )
        .bind(&key.name)
        .bind(key.created_at)
        .bind(key.expires_at)
        .bind(&key.created_by)
        .fetch_one(&mut *tx)
        .await?;
        let digest = digest_for(id);
        let row: KeyRow = sqlx::query_as(&format!(
            "UPDATE api_keys SET secret_digest = ?2 WHERE id = ?1 RETURNING {KEY_COLUMNS}"
        ))
        .bind(id)
        .bind(digest.as_bytes().as_slice())
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE auth_mode SET api_keys_enabled = TRUE, locked_at = ?1 WHERE NOT api_keys_enabled",
        )
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        row.try_into()
    }

    async fn get_key(&self, id: i64) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> =
            sqlx::query_as(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(KeyRecord::try_from).transpose()
    }

    async fn get_keys(&self, ids: &[i64]) -> Result<Vec<KeyRecord>, StoreError> {
        // SQLite has no arrays: the ids go in as one JSON array, so every batch size shares
        // one prepared statement.
        let ids = serde_json::to_string(ids)
            .map_err(|error| StoreError::Internal(format!("cannot encode key ids: {error}")))?;
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        super::key_records(rows)
    }

    async fn list_keys(&self, after_id: i64, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))
        .bind(after_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        super::key_records(rows)
    }

    async fn set_key_enabled(
        &self,
        id: i64,
        enabled: bool,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "UPDATE api_keys SET enabled = ?2 WHERE id = ?1 RETURNING {KEY_COLUMNS}"
        ))
        .bind(id)
        .bind(enabled)
        .fetch_optional(&self.pool)
        .await?;
        row.map(KeyRecord::try_from).transpose()
    }

    async fn delete_key(&self, id: i64) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM api_keys WHERE id = ?1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn upgrade_key_secret(
        &self,
        id: i64,
        argon2_hash: &str,
        digest: &SecretDigest,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE api_keys SET secret_digest = ?3, secret_hash = NULL
             WHERE id = ?1 AND secret_hash = ?2",
        )
        .bind(id)
        .bind(argon2_hash)
        .bind(digest.as_bytes().as_slice())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn record_key_usage(&self, uses: &[(i64, DateTime<Utc>)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, used_at) in uses {
            // Timestamps are stored in one fixed-width RFC 3339 format, so text order is time
            // order and MAX keeps the newest.
            sqlx::query(
                "UPDATE api_keys SET last_used_at = ?2
                 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
            )
            .bind(id)
            .bind(used_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn auth_mode(&self) -> Result<AuthMode, StoreError> {
        let (api_keys_enabled, locked_at): (bool, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT api_keys_enabled, locked_at FROM auth_mode")
                .fetch_one(&self.pool)
                .await?;
        Ok(AuthMode {
            api_keys_enabled,
            locked_at,
        })
    }

    async fn find_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> =
            sqlx::query_as("SELECT username, password_hash, active FROM users WHERE username = ?1")
                .bind(username)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(Into::into))
    }

    async fn create_user(&self, username: &str, password_hash: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO users (username, password_hash) VALUES (?1, ?2)")
            .bind(username)
            .bind(password_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_user_password(
        &self,
        username: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query("UPDATE users SET password_hash = ?2 WHERE username = ?1")
            .bind(username)
            .bind(password_hash)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn count_users(&self) -> Result<i64, StoreError> {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM users")
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }

    async fn subscribe(&self) -> Option<mpsc::Receiver<StoreChange>> {
        None
    }
}
