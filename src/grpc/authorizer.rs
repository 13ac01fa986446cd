//! `keygate.v1.Authorizer`: the decision as an RPC, for gateways other than Envoy and for
//! debugging ("why was this key denied?").

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert::authorize_response,
    proto::{AuthorizeRequest, AuthorizeResponse, authorizer_server},
};
use crate::{
    auth::authorizer::Authorizer, domain::credentials::TrustedProxies, metrics::Transport,
};

pub struct AuthorizerService {
    authorizer: Arc<Authorizer>,
    trusted_proxies: TrustedProxies,
}

impl AuthorizerService {
    pub fn new(authorizer: Arc<Authorizer>, trusted_proxies: TrustedProxies) -> Self {
        Self {
            authorizer,
            trusted_proxies,
        }
    }
}

#[tonic::async_trait]
impl authorizer_server::Authorizer for AuthorizerService {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        // The caller's own address keys the rate limiter, unless it is a trusted proxy that
        // reports its client's.
        let peer = request.remote_addr().map(|addr| addr.ip());
        let request = request.into_inner();
        let client = self
            .trusted_proxies
            .client(Some(&request.client_address), peer);
        let header =
            (!request.authorization.is_empty()).then_some(request.authorization.as_slice());
        let decision = self
            .authorizer
            .authorize(Transport::Authorize, header, client)
            .await?;
        Ok(Response::new(authorize_response(&decision)))
    }
}
