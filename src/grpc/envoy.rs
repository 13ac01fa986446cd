//! `envoy.service.auth.v3.Authorization/Check`: the decision for Envoy's ext_authz filter.
//!
//! A deny is an OK RPC carrying a `DeniedHttpResponse` (401 with the Basic challenge, or 429
//! with `Retry-After`); the precise reason goes to Envoy's dynamic metadata, not to the HTTP
//! client. A decision that cannot be made is an RPC error (`UNAVAILABLE`), so Envoy's own
//! `failure_mode_allow` / `status_on_error` decide.

use std::{collections::HashMap, sync::Arc};

use envoy_types::{
    ext_authz::v3::{
        CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
        pb::{CheckResponse, HeaderAppendAction, HttpStatusCode},
    },
    pb::{
        envoy::service::auth::v3::check_response::HttpResponse,
        google::protobuf::{Struct, Value, value::Kind},
    },
};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use prost::{Message, bytes::Bytes};
use tonic::{Request, Response, Status};

use super::{
    check_request::CheckRequestView,
    check_server::{CheckAnswer, CheckFuture, CheckHandler},
};

use crate::{
    auth::authorizer::Authorizer,
    domain::{
        credentials::TrustedProxies,
        decision::{Decision, DenyReason, Principal},
    },
    metrics::Transport,
};

pub const KEY_ID_HEADER: &str = "x-keygate-key-id";
pub const KEY_NAME_HEADER: &str = "x-keygate-key-name";
pub const USER_HEADER: &str = "x-keygate-user";

/// Whether a request header is not one of keygate's identity headers but would be read as one
/// by an upstream that treats `_` as `-` (CGI, WSGI, Rack): Envoy removes headers by exact
/// name, so such a spelling must be named too.
fn is_identity_lookalike(name: &[u8]) -> bool {
    name.contains(&b'_')
        && [KEY_ID_HEADER, KEY_NAME_HEADER, USER_HEADER]
            .iter()
            .any(|header| {
                header.len() == name.len()
                    && name.iter().zip(header.bytes()).all(|(&byte, expected)| {
                        let byte = if byte == b'_' { b'-' } else { byte };
                        byte.eq_ignore_ascii_case(&expected)
                    })
            })
}

/// How Check answers, from configuration.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The `WWW-Authenticate: Basic realm="..."` challenge's realm.
    pub realm: String,
    /// Remove the `Authorization` header before the request goes upstream.
    pub strip_authorization: bool,
    /// Also describe allows in dynamic metadata (the identity is in the headers either way).
    pub allow_metadata: bool,
    /// Keys whose encoded allow answer is kept (the key cache's capacity).
    pub answer_capacity: usize,
    /// Peers whose `attributes.source.address` is believed.
    pub trusted_proxies: TrustedProxies,
}

/// A key's allow answer, encoded once. A key's id and name never change, and neither does the
/// configuration the answer depends on, so every allow of a key sends the same bytes. Neither
/// store hands out an id twice (BIGSERIAL, AUTOINCREMENT), but the name is kept and checked on
/// every use anyway: the bytes name the key in a header, and a store restored from an older
/// backup could give an id to a second key.
struct EncodedAllow {
    name: Arc<str>,
    bytes: Bytes,
}

pub struct EnvoyAuthorizationService {
    authorizer: Arc<Authorizer>,
    challenge: String,
    strip_authorization: bool,
    allow_metadata: bool,
    trusted_proxies: TrustedProxies,
    /// Bounded like the key cache; S3-FIFO keeps it from being flushed by one-off keys.
    encoded_allows: quick_cache::sync::Cache<i64, Arc<EncodedAllow>>,
}

impl EnvoyAuthorizationService {
    pub fn new(authorizer: Arc<Authorizer>, options: CheckOptions) -> Self {
        let realm = options.realm.replace(['\\', '"'], "");
        Self {
            authorizer,
            challenge: format!("Basic realm=\"{realm}\""),
            strip_authorization: options.strip_authorization,
            allow_metadata: options.allow_metadata,
            trusted_proxies: options.trusted_proxies,
            encoded_allows: quick_cache::sync::Cache::new(options.answer_capacity.max(1)),
        }
    }

    /// The answer for a decision: an allowed key's from its encoding kept before (made now if
    /// there is none), anything else built for this request.
    fn answer(&self, decision: Decision, lookalikes: Vec<String>) -> CheckAnswer {
        match decision {
            Decision::Allow(principal) if !lookalikes.is_empty() => {
                let mut response = self.allowed(&principal);
                if let Some(HttpResponse::OkResponse(ok)) = response.http_response.as_mut() {
                    ok.headers_to_remove.extend(lookalikes);
                }
                CheckAnswer::Message(Box::new(response))
            }
            Decision::Allow(principal) => match &principal {
                Principal::Key { id, name } => {
                    if let Some(kept) = self.encoded_allows.get(id)
                        && kept.name == *name
                    {
                        return CheckAnswer::Encoded(kept.bytes.clone());
                    }
                    let bytes = Bytes::from(self.allowed(&principal).encode_to_vec());
                    self.encoded_allows.insert(
                        *id,
                        Arc::new(EncodedAllow {
                            name: name.clone(),
                            bytes: bytes.clone(),
                        }),
                    );
                    CheckAnswer::Encoded(bytes)
                }
                Principal::User { .. } => CheckAnswer::Message(Box::new(self.allowed(&principal))),
            },
            Decision::Deny {
                reason,
                retry_after_secs,
            } => CheckAnswer::Message(Box::new(self.denied(reason, retry_after_secs))),
        }
    }

    fn allowed(&self, principal: &Principal) -> CheckResponse {
        let mut http = OkHttpResponseBuilder::new();
        let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        // Headers keygate did not set are removed, so a client cannot forge an identity by
        // sending them itself.
        match principal {
            Principal::Key { id, name } => {
                http.add_header(KEY_ID_HEADER, id.to_string(), overwrite, false)
                    .add_header(KEY_NAME_HEADER, header_safe(name), overwrite, true)
                    .remove_header(USER_HEADER);
            }
            Principal::User { username } => {
                http.add_header(USER_HEADER, header_safe(username), overwrite, true)
                    .remove_header(KEY_ID_HEADER)
                    .remove_header(KEY_NAME_HEADER);
            }
        }
        if self.strip_authorization {
            http.remove_header("authorization");
        }
        let mut response = CheckResponse::with_status(Status::ok(""));
        response.set_http_response(http);
        // Off by default: Envoy parses and merges the metadata on every allowed request, which
        // costs it about as much as the two identity headers do, for information the upstream
        // request already carries.
        if self.allow_metadata {
            response.set_dynamic_metadata(Some(metadata(None, Some(principal))));
        }
        response
    }

    fn denied(&self, reason: DenyReason, retry_after_secs: Option<u64>) -> CheckResponse {
        let mut http = DeniedHttpResponseBuilder::new();
        let status = if reason == DenyReason::RateLimited {
            http.set_http_status(HttpStatusCode::TooManyRequests)
                .add_header(
                    "retry-after",
                    retry_after_secs.unwrap_or(1).max(1).to_string(),
                    None,
                    false,
                );
            Status::resource_exhausted("")
        } else {
            http.set_http_status(HttpStatusCode::Unauthorized)
                .add_header("www-authenticate", self.challenge.clone(), None, false);
            Status::unauthenticated("")
        };
        let mut response = CheckResponse::with_status(status);
        response
            .set_http_response(http)
            .set_dynamic_metadata(Some(metadata(Some(reason), None)));
        response
    }
}

impl CheckHandler for EnvoyAuthorizationService {
    fn check(self: &Arc<Self>, request: Request<CheckRequestView>) -> CheckFuture {
        let peer = request.remote_addr().map(|addr| addr.ip());
        let request = request.into_inner();
        let client = self.trusted_proxies.client(request.client_address(), peer);
        let header = request.authorization_header();
        let lookalikes = lookalikes(&request);
        // A cached key is decided here and now; everything else in a future that owns the
        // request (and reads the header and address from it again: they borrow from it).
        if let Some(decision) = self
            .authorizer
            .authorize_cached(Transport::Envoy, header, &client)
        {
            return Box::pin(std::future::ready(Ok(Response::new(
                self.answer(decision, lookalikes),
            ))));
        }
        let this = self.clone();
        Box::pin(async move {
            let client = this.trusted_proxies.client(request.client_address(), peer);
            let decision = this
                .authorizer
                .authorize(Transport::Envoy, request.authorization_header(), client)
                .await?;
            Ok(Response::new(this.answer(decision, lookalikes)))
        })
    }
}

/// The request's headers that `is_identity_lookalike`; none (and no allocation) usually.
fn lookalikes(request: &CheckRequestView) -> Vec<String> {
    request
        .header_names()
        .filter(|name| is_identity_lookalike(name))
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect()
}

/// Key names are printable UTF-8, but a header value should be visible ASCII: other bytes
/// (and `%` itself) are percent-encoded, so upstreams get a stable, decodable value.
fn header_safe(value: &str) -> String {
    const UNSAFE: &AsciiSet = &CONTROLS.add(b'%');
    utf8_percent_encode(value, UNSAFE).to_string()
}

/// Envoy files these fields under the ext_authz filter's namespace, so access logs can say
/// `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision)%`.
fn metadata(reason: Option<DenyReason>, principal: Option<&Principal>) -> Struct {
    let text = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let mut fields = HashMap::with_capacity(3);
    fields.insert(
        "decision".to_owned(),
        text(reason.map_or("ALLOWED", DenyReason::as_str).to_owned()),
    );
    match principal {
        Some(Principal::Key { id, name }) => {
            fields.insert("key_id".to_owned(), text(id.to_string()));
            fields.insert("key_name".to_owned(), text(name.to_string()));
        }
        Some(Principal::User { username }) => {
            fields.insert("user".to_owned(), text(username.clone()));
        }
        None => {}
    }
    Struct { fields }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{app::Services, settings::Settings, store::SqliteStore};

    async fn service() -> EnvoyAuthorizationService {
        let store = Arc::new(SqliteStore::connect("sqlite::memory:").await.unwrap());
        let services = Services::build(&Settings::default(), store).unwrap();
        EnvoyAuthorizationService::new(
            services.authorizer.clone(),
            CheckOptions {
                realm: "keygate".into(),
                strip_authorization: true,
                allow_metadata: false,
                answer_capacity: 16,
                trusted_proxies: TrustedProxies::parse("127.0.0.1").unwrap(),
            },
        )
    }

    fn allowed_bytes(service: &EnvoyAuthorizationService, id: i64, name: &str) -> Bytes {
        let decision = Decision::Allow(Principal::Key {
            id,
            name: name.into(),
        });
        match service.answer(decision, Vec::new()) {
            CheckAnswer::Encoded(bytes) => bytes,
            CheckAnswer::Message(_) => panic!("an allowed key's answer is sent encoded"),
        }
    }

    fn key_name_header(bytes: Bytes) -> String {
        let response = CheckResponse::decode(bytes).unwrap();
        let Some(http_response) = response.http_response else {
            panic!("no http_response")
        };
        let envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse::OkResponse(ok) =
            http_response
        else {
            panic!("not an OK answer")
        };
        ok.headers
            .into_iter()
            .filter_map(|option| option.header)
            .find(|header| header.key == KEY_NAME_HEADER)
            .map(|header| header.value)
            .unwrap()
    }

    #[tokio::test]
    async fn an_allowed_key_is_answered_with_the_bytes_encoded_for_it() {
        let service = service().await;
        let first = allowed_bytes(&service, 7, "scraper");
        let built = service.allowed(&Principal::Key {
            id: 7,
            name: "scraper".into(),
        });
        assert_eq!(first, built.encode_to_vec(), "the same answer, encoded");
        let again = allowed_bytes(&service, 7, "scraper");
        assert_eq!(again.as_ptr(), first.as_ptr(), "encoded once, then reused");
        // Should a second key ever get a kept key's id (a store restored from an older
        // backup), it is answered with its own name.
        let reused_id = allowed_bytes(&service, 7, "backup job");
        assert_eq!(key_name_header(reused_id), "backup job");
        assert_eq!(key_name_header(first), "scraper");
    }

    #[tokio::test]
    async fn denies_and_operators_are_answered_with_a_message() {
        let service = service().await;
        let denied = service.answer(Decision::deny(DenyReason::KeyDisabled), Vec::new());
        assert!(matches!(denied, CheckAnswer::Message(_)));
        let operator = service.answer(
            Decision::Allow(Principal::User {
                username: "admin".into(),
            }),
            Vec::new(),
        );
        assert!(matches!(operator, CheckAnswer::Message(_)));
    }

    #[tokio::test]
    async fn underscore_spellings_of_identity_headers_are_removed_too() {
        for name in ["x_keygate_user", "X_Keygate_Key_Id", "x-keygate_key-name"] {
            assert!(is_identity_lookalike(name.as_bytes()), "{name}");
        }
        for name in [
            "x-keygate-user",
            "x_keygate_users",
            "x_forwarded_for",
            "authorization",
        ] {
            assert!(!is_identity_lookalike(name.as_bytes()), "{name}");
        }
        let service = service().await;
        let allow = Decision::Allow(Principal::Key {
            id: 1,
            name: "k".into(),
        });
        let CheckAnswer::Message(response) =
            service.answer(allow, vec!["x_keygate_user".to_owned()])
        else {
            panic!("an answer with extra removals is built for the request");
        };
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("an allow");
        };
        assert!(ok.headers_to_remove.contains(&"x_keygate_user".to_owned()));
        assert!(ok.headers_to_remove.contains(&USER_HEADER.to_owned()));
    }

    #[test]
    fn header_values_are_visible_ascii() {
        let encoded = header_safe;
        assert_eq!(encoded("prometheus scraper"), "prometheus scraper");
        assert_eq!(encoded("100%"), "100%25");
        assert_eq!(encoded("clé"), "cl%C3%A9");
        assert_eq!(encoded("tab\there"), "tab%09here");
    }
}
