//! `keygate.v1.KeyAdmin`: key management for operators. Every call first authenticates the
//! operator from the `authorization` metadata.

use std::sync::Arc;

use chrono::Utc;
use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use super::{
    convert::{api_key, from_timestamp, timestamp},
    proto::{
        ApiKey, AuthMode, CreateKeyRequest, CreateKeyResponse, DeleteKeyRequest, DeleteKeyResponse,
        GetAuthModeRequest, GetKeyRequest, ListKeysRequest, ListKeysResponse, SetKeyEnabledRequest,
        key_admin_server,
    },
};
use crate::admin::{keys::KeyManager, operators::Operators};

pub struct KeyAdminService {
    keys: Arc<KeyManager>,
    operators: Arc<Operators>,
}

impl KeyAdminService {
    pub fn new(keys: Arc<KeyManager>, operators: Arc<Operators>) -> Self {
        Self { keys, operators }
    }

    async fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        let peer = request.remote_addr().map(|addr| addr.ip());
        Ok(self.operators.authenticate(header, peer).await?)
    }
}

#[tonic::async_trait]
impl key_admin_server::KeyAdmin for KeyAdminService {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let operator = self.operator(&request).await?;
        let request = request.into_inner();
        let expires_at = request
            .expires_at
            .as_ref()
            .map(|ts| from_timestamp("expires_at", ts))
            .transpose()
            .map_err(|e| Status::invalid_argument(e.0))?;
        let created = self
            .keys
            .create_key(&operator, &request.name, expires_at)
            .await?;
        Ok(Response::new(CreateKeyResponse {
            key: Some(api_key(&created.record, Utc::now())),
            secret: created.clear_key.expose_secret().to_owned(),
        }))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<ApiKey>, Status> {
        self.operator(&request).await?;
        let record = self.keys.get_key(request.into_inner().id).await?;
        Ok(Response::new(api_key(&record, Utc::now())))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        self.operator(&request).await?;
        let request = request.into_inner();
        let page = self
            .keys
            .list_keys(request.page_size, &request.page_token)
            .await?;
        let now = Utc::now();
        Ok(Response::new(ListKeysResponse {
            keys: page.keys.iter().map(|key| api_key(key, now)).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn set_key_enabled(
        &self,
        request: Request<SetKeyEnabledRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let operator = self.operator(&request).await?;
        let request = request.into_inner();
        let record = self
            .keys
            .set_key_enabled(&operator, request.id, request.enabled)
            .await?;
        Ok(Response::new(api_key(&record, Utc::now())))
    }

    async fn delete_key(
        &self,
        request: Request<DeleteKeyRequest>,
    ) -> Result<Response<DeleteKeyResponse>, Status> {
        let operator = self.operator(&request).await?;
        self.keys
            .delete_key(&operator, request.into_inner().id)
            .await?;
        Ok(Response::new(DeleteKeyResponse {}))
    }

    async fn get_auth_mode(
        &self,
        request: Request<GetAuthModeRequest>,
    ) -> Result<Response<AuthMode>, Status> {
        self.operator(&request).await?;
        let mode = self.keys.auth_mode().await?;
        Ok(Response::new(AuthMode {
            api_keys_enabled: mode.api_keys_enabled,
            locked_at: mode.locked_at.map(timestamp),
        }))
    }
}
