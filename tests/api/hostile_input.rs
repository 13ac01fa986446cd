//! Hostile input at the gRPC level (issue 6, item 3): oversized and malformed messages to every
//! RPC. Each gets INVALID_ARGUMENT or NOT_FOUND with a message (Authorize and Check: a deny),
//! never INTERNAL or UNKNOWN, and the store is unchanged afterwards.

use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    service::auth::v3::{
        AttributeContext, CheckRequest,
        attribute_context::{HttpRequest, Request as AttributeRequest},
        authorization_client::AuthorizationClient,
    },
};
use keygate::grpc::proto::{
    AuthorizeResponse, CreateKeyRequest, DeleteKeyRequest, DenyReason, GetAuthModeRequest,
    GetKeyRequest, ListKeysRequest, SetKeyEnabledRequest,
};
use prost::{
    Message,
    bytes::{Buf, BufMut},
};
use prost_types::Timestamp;
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

use crate::{
    both_backends,
    helpers::{ADMIN_PASSWORD, ADMIN_USER, TestApp, TestBackend, basic, channel, spawn_app},
};

const MIB: usize = 1 << 20;

/// What a client-caused failure may be: a client error code with a message saying what is
/// wrong. INTERNAL and UNKNOWN would mean keygate has no answer for the input.
fn assert_rejected(what: &str, status: &Status, allowed: &[Code]) {
    assert!(
        allowed.contains(&status.code()),
        "{what}: {:?} {:?}",
        status.code(),
        status.message()
    );
    assert!(!status.message().is_empty(), "{what}: no message");
    assert!(
        status.message().len() < 1024,
        "{what}: the message echoes the input: {} bytes",
        status.message().len()
    );
}

/// The store as KeyAdmin sees it: every key and the auth mode.
async fn snapshot(app: &TestApp) -> String {
    let keys = app
        .admin
        .clone()
        .list_keys(ListKeysRequest::default())
        .await
        .expect("ListKeys")
        .into_inner();
    let mode = app
        .admin
        .clone()
        .get_auth_mode(GetAuthModeRequest {})
        .await
        .expect("GetAuthMode")
        .into_inner();
    format!("{keys:?} {mode:?}")
}

fn ts(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

async fn oversized_and_malformed_messages_are_refused_with_a_reason(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    // A fresh store: no key, basic auth not locked out. A CreateKey that got through would
    // change both.
    let before = snapshot(&app).await;
    let mut admin = app.admin.clone();
    let invalid = &[Code::InvalidArgument][..];
    let invalid_or_missing = &[Code::InvalidArgument, Code::NotFound][..];

    // --- CreateKey: names and expiry times.
    let huge_name = "n".repeat(MIB);
    let names = [
        huge_name.as_str(),
        "",
        "   ",
        "a\u{0}b",
        "line\nbreak",
        &"é".repeat(129),
        // Only invisible characters: zero-width space, word joiner.
        "\u{200B}",
        "\u{2060}\u{200B}",
    ];
    for name in names {
        let status = admin
            .create_key(CreateKeyRequest {
                name: name.to_owned(),
                expires_at: None,
            })
            .await
            .expect_err("a bad name");
        assert_rejected(
            &format!("CreateKey name of {} bytes", name.len()),
            &status,
            invalid,
        );
    }
    let now = chrono::Utc::now().timestamp();
    for expires_at in [
        ts(i64::MAX, 0),
        ts(i64::MIN, 0),
        ts(now + 3600, -1),
        ts(now + 3600, 1_000_000_000),
        ts(now + 3600, i32::MIN),
        ts(0, 0),
        ts(now - 1, 0),
        ts(253_402_300_800, 0),
    ] {
        let status = admin
            .create_key(CreateKeyRequest {
                name: "valid name".into(),
                expires_at,
            })
            .await
            .expect_err("a bad expiry");
        assert_rejected(
            &format!("CreateKey expires_at {expires_at:?}"),
            &status,
            invalid,
        );
    }

    // --- Ids: zero, negative, extremes.
    for id in [0, -1, i64::MIN, i64::MAX, i64::MAX - 1, 1] {
        let allowed = if id > 0 { invalid_or_missing } else { invalid };
        let get = admin
            .get_key(GetKeyRequest { id })
            .await
            .expect_err("no such key");
        assert_rejected(&format!("GetKey {id}"), &get, allowed);
        for enabled in [true, false] {
            let set = admin
                .set_key_enabled(SetKeyEnabledRequest { id, enabled })
                .await
                .expect_err("no such key");
            assert_rejected(&format!("SetKeyEnabled {id}"), &set, allowed);
        }
        let delete = admin
            .delete_key(DeleteKeyRequest { id })
            .await
            .expect_err("no such key");
        assert_rejected(&format!("DeleteKey {id}"), &delete, allowed);
        if id > 0 {
            assert_eq!(get.code(), Code::NotFound, "GetKey {id}");
        }
    }

    // --- ListKeys: page sizes and tokens.
    for page_size in [i32::MIN, -1] {
        let status = admin
            .list_keys(ListKeysRequest {
                page_size,
                page_token: String::new(),
            })
            .await
            .expect_err("a negative page size");
        assert_rejected(&format!("ListKeys page_size {page_size}"), &status, invalid);
    }
    // Absurdly large is capped (API guidelines), not refused.
    let capped = admin
        .list_keys(ListKeysRequest {
            page_size: i32::MAX,
            page_token: String::new(),
        })
        .await
        .expect("page_size i32::MAX is capped");
    assert!(capped.into_inner().keys.is_empty());
    let token = |text: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    };
    for page_token in [
        "t".repeat(MIB),
        "!!not base64!!".into(),
        token("after:-1"),
        token("after:0"),
        token("after:99999999999999999999"),
        token("before:5"),
        token("after:\u{0}"),
    ] {
        let status = admin
            .list_keys(ListKeysRequest {
                page_size: 10,
                page_token: page_token.clone(),
            })
            .await
            .expect_err("a bad page token");
        assert_rejected(
            &format!("ListKeys page_token of {} bytes", page_token.len()),
            &status,
            invalid,
        );
    }
    let last_page = admin
        .list_keys(ListKeysRequest {
            page_size: 10,
            page_token: token(&format!("after:{}", i64::MAX)),
        })
        .await
        .expect("a cursor past every id")
        .into_inner();
    assert!(last_page.keys.is_empty() && last_page.next_page_token.is_empty());

    // --- Authorize: huge and hostile headers are denied, never an error.
    let huge = "A".repeat(MIB);
    for (authorization, client_address) in [
        (huge.clone(), String::new()),
        (format!("Bearer {huge}"), String::new()),
        (format!("Basic {huge}"), huge.clone()),
        ("Bearer \u{0}\u{1}".into(), "not an address".into()),
        ("Basic Og==".into(), "::ffff:999.1.1.1".into()),
        ("Basic".into(), "[::1]:80".into()),
        (" \t ".into(), String::new()),
    ] {
        let response = app
            .try_authorize(&authorization, &client_address)
            .await
            .unwrap_or_else(|status| {
                panic!("Authorize of {} bytes: {status:?}", authorization.len())
            });
        assert!(!response.allowed);
        assert!(
            matches!(
                response.reason(),
                DenyReason::MalformedCredentials
                    | DenyReason::MissingCredentials
                    | DenyReason::InvalidCredentials
            ),
            "{response:?}"
        );
    }

    // --- Check: requests with nothing, huge and non-UTF-8 headers are denied.
    let mut check = AuthorizationClient::new(channel(app.main_addr).await);
    let http = |headers: Vec<(&str, String)>, raw: Vec<(&str, Vec<u8>)>| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttributeRequest {
                http: Some(HttpRequest {
                    headers: headers
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    header_map: (!raw.is_empty()).then(|| HeaderMap {
                        headers: raw
                            .into_iter()
                            .map(|(key, raw_value)| HeaderValue {
                                key: key.to_owned(),
                                raw_value,
                                ..Default::default()
                            })
                            .collect(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    for request in [
        CheckRequest::default(),
        http(vec![("authorization", huge.clone())], vec![]),
        http(vec![("authorization", format!("Bearer {huge}"))], vec![]),
        http(
            vec![],
            vec![("authorization", vec![0xff, 0xfe, b' ', 0x80])],
        ),
        http(
            vec![],
            vec![(
                "authorization",
                [b"Bearer ".as_slice(), &[0xc3, 0x28]].concat(),
            )],
        ),
        http(vec![("x-other", huge.clone())], vec![]),
    ] {
        let response = check
            .check(request)
            .await
            .expect("Check answers hostile requests with a deny")
            .into_inner();
        let code = response.status.as_ref().map_or(0, |status| status.code);
        assert_eq!(code, Code::Unauthenticated as i32, "{response:?}");
    }

    // --- Bytes that are no protobuf message at all, to every RPC.
    let channel = channel(app.main_addr).await;
    let admin_channel = crate::helpers::channel(app.admin_addr).await;
    let garbage: [&[u8]; 4] = [
        &[0xff; 64],
        &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        // Field 1 (a string) holding bytes that are not UTF-8.
        &[0x0a, 0x02, 0xc3, 0x28],
        &[
            0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
        ],
    ];
    let methods = [
        (&channel, "/keygate.v1.Authorizer/Authorize"),
        (&channel, "/envoy.service.auth.v3.Authorization/Check"),
        (&admin_channel, "/keygate.v1.KeyAdmin/CreateKey"),
        (&admin_channel, "/keygate.v1.KeyAdmin/GetKey"),
        (&admin_channel, "/keygate.v1.KeyAdmin/ListKeys"),
        (&admin_channel, "/keygate.v1.KeyAdmin/SetKeyEnabled"),
        (&admin_channel, "/keygate.v1.KeyAdmin/DeleteKey"),
        (&admin_channel, "/keygate.v1.KeyAdmin/GetAuthMode"),
    ];
    for (channel, method) in methods {
        for bytes in garbage {
            match raw_call(channel, method, bytes.to_vec()).await {
                Err(status) => {
                    assert_rejected(&format!("{method} with {bytes:?}"), &status, invalid)
                }
                // GetAuthModeRequest has no field: a well-formed field it does not know is
                // skipped, as protobuf requires.
                Ok(_) if method.ends_with("/GetAuthMode") && bytes[..2] == [0x0a, 0x02] => {}
                // An Authorization header that is not UTF-8 is a malformed credential, denied
                // like any other (SPEC section 3, step 2).
                Ok(answer) if method.ends_with("/Authorize") && bytes[..2] == [0x0a, 0x02] => {
                    let response = AuthorizeResponse::decode(answer.as_slice()).unwrap();
                    assert!(!response.allowed);
                    assert_eq!(response.reason(), DenyReason::MalformedCredentials);
                }
                Ok(answer) => panic!("{method} accepted {bytes:?}: {answer:?}"),
            }
        }
    }

    assert_eq!(snapshot(&app).await, before, "the store changed");
}

both_backends!(oversized_and_malformed_messages_are_refused_with_a_reason);

/// Calls `method` with `body` as the message bytes, whatever they are.
async fn raw_call(
    channel: &Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    // Authenticated, so that KeyAdmin's answer is about the message, not the caller.
    let mut request = Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        basic(ADMIN_USER, ADMIN_PASSWORD).parse().unwrap(),
    );
    grpc.unary(request, PathAndQuery::from_static(method), RawCodec)
        .await
        .map(|response| response.into_inner())
}

/// Sends and receives message bytes as they are.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}
