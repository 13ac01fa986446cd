//! Key management (the use cases behind KeyAdmin): validation, key generation and its digest,
//! the store, and keeping this process's cache in step with what it changed.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    authorizer::Authorizer,
    cache::KeyCache,
    domain::{
        digest::SecretDigest,
        key::{KeyMaterial, KeyPrefix},
        model::{AuthMode, KeyRecord},
        validation::{
            InvalidArgument, KeyName, PageRequest, encode_page_token, parse_expiry, parse_key_id,
        },
    },
    store::{DynStore, NewKey, StoreError},
};

/// Everything a key-management call can fail with; `crate::grpc::status` maps each to one
/// gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no API key with id {0}")]
    NotFound(i64),
    #[error("the key store is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<InvalidArgument> for AdminError {
    fn from(error: InvalidArgument) -> Self {
        Self::InvalidArgument(error.0)
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => Self::Unavailable(error),
            other => Self::Internal(other),
        }
    }
}

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
    authorizer: Arc<Authorizer>,
    prefix: KeyPrefix,
}

impl KeyManager {
    pub fn new(
        store: DynStore,
        cache: Arc<KeyCache>,
        authorizer: Arc<Authorizer>,
        prefix: KeyPrefix,
    ) -> Self {
        Self {
            store,
            cache,
            authorizer,
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
        self.authorizer.note_lockout();
        let clear_key = material.clear_key(&self.prefix, record.id);
        tracing::info!(id = record.id, name = %record.name, operator, "API key created");
        Ok(CreatedKey { record, clear_key })
    }

    pub async fn get_key(&self, id: i64) -> Result<KeyRecord, AdminError> {
        let id = parse_key_id(id)?;
        self.store
            .get_key(id)
            .await?
            .ok_or(AdminError::NotFound(id))
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
        let record = record.ok_or(AdminError::NotFound(id))?;
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
            return Err(AdminError::NotFound(id));
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
