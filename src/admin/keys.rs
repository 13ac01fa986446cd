//! Key management (the use cases behind KeyAdmin): validation, key generation and its digest,
//! the store, and keeping this process's cache in step with what it changed.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    admin::AdminError,
    auth::{cache::KeyCache, lockout::Lockout},
    domain::{
        digest::SecretDigest,
        key::{KeyMaterial, KeyPrefix},
        model::{AuthMode, KeyRecord},
        validation::{KeyName, PageRequest, encode_page_token, parse_expiry, parse_key_id},
    },
    store::{DynStore, NewKey},
};

/// A key as just created: its record and the clear key, which exists only here and in the
/// CreateKey response.
pub struct CreatedKey {
    pub record: KeyRecord,
    pub clear_key: SecretString,
}

pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    pub next_page_token: String,
}

pub struct KeyManager {
    store: DynStore,
    cache: Arc<KeyCache>,
    lockout: Arc<Lockout>,
    prefix: KeyPrefix,
}

impl KeyManager {
    pub fn new(
        store: DynStore,
        cache: Arc<KeyCache>,
        lockout: Arc<Lockout>,
        prefix: KeyPrefix,
    ) -> Self {
        Self {
            store,
            cache,
            lockout,
            prefix,
        }
    }

    pub async fn create_key(
        &self,
        operator: &str,
        name: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<CreatedKey, AdminError> {
        let now = Utc::now();
        let name = KeyName::parse(name)?;
        let expires_at = parse_expiry(expires_at, now)?;
        let material = KeyMaterial::generate();
        let digest_for =
            |id| SecretDigest::of(material.clear_key(&self.prefix, id).expose_secret());
        let record = self
            .store
            .create_key(
                NewKey {
                    name: name.into_inner(),
                    created_at: now.trunc_subsecs_micros(),
                    expires_at,
                    created_by: operator.to_owned(),
                },
                &digest_for,
            )
            .await?;
        // An id the cache had seen as unknown (someone probing ids) is unknown no longer.
        self.cache.invalidate_key(record.id);
        self.lockout.note();
        let clear_key = material.clear_key(&self.prefix, record.id);
        tracing::info!(id = record.id, name = %record.name, operator, "API key created");
        Ok(CreatedKey { record, clear_key })
    }

    pub async fn get_key(&self, id: i64) -> Result<KeyRecord, AdminError> {
        let id = parse_key_id(id)?;
        self.store
            .get_key(id)
            .await?
            .ok_or(AdminError::KeyNotFound(id))
    }

    pub async fn list_keys(&self, page_size: i32, page_token: &str) -> Result<KeyPage, AdminError> {
        let page = PageRequest::parse(page_size, page_token)?;
        // One more than asked tells whether another page follows.
        let mut keys = self.store.list_keys(page.after_id, page.size + 1).await?;
        let next_page_token = if keys.len() > page.size {
            keys.truncate(page.size);
            keys.last()
                .map(|key| encode_page_token(key.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(KeyPage {
            keys,
            next_page_token,
        })
    }

    pub async fn set_key_enabled(
        &self,
        operator: &str,
        id: i64,
        enabled: bool,
    ) -> Result<KeyRecord, AdminError> {
        let id = parse_key_id(id)?;
        let record = self.store.set_key_enabled(id, enabled).await?;
        // Invalidate before answering: once the caller hears "disabled", no request decided
        // by this process afterwards can use the old state.
        self.cache.invalidate_key(id);
        let record = record.ok_or(AdminError::KeyNotFound(id))?;
        tracing::info!(
            id,
            enabled,
            operator,
            "API key {}",
            if enabled { "enabled" } else { "disabled" }
        );
        Ok(record)
    }

    pub async fn delete_key(&self, operator: &str, id: i64) -> Result<(), AdminError> {
        let id = parse_key_id(id)?;
        let deleted = self.store.delete_key(id).await?;
        self.cache.invalidate_key(id);
        if !deleted {
            return Err(AdminError::KeyNotFound(id));
        }
        tracing::info!(id, operator, "API key deleted");
        Ok(())
    }

    pub async fn auth_mode(&self) -> Result<AuthMode, AdminError> {
        Ok(self.store.auth_mode().await?)
    }
}

trait TruncMicros {
    fn trunc_subsecs_micros(self) -> Self;
}

impl TruncMicros for DateTime<Utc> {
    /// Both stores keep microseconds; truncating first makes the returned record equal the
    /// stored one.
    fn trunc_subsecs_micros(self) -> Self {
        chrono::SubsecRound::trunc_subsecs(self, 6)
    }
}
