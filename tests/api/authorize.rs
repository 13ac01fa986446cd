//! Authorize over real gRPC: SPEC section 3, end to end through the store, the cache and argon2.

use std::collections::BTreeMap;

use envoy_types::pb::{
    envoy::service::auth::v3::{
        CheckResponse, authorization_client::AuthorizationClient, check_response::HttpResponse,
    },
    google::protobuf::value::Kind,
};
use keygate::grpc::proto::DenyReason;

use crate::{
    both_backends,
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, TestBackend, basic, bearer, channel, check_request,
        metric_value, spawn_app, spawn_app_with,
    },
};

async fn basic_auth_works_until_the_first_key_then_never_again(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let operator = basic(ADMIN_USER, ADMIN_PASSWORD);
    let before = app.authorize(&operator).await;
    assert!(before.allowed, "{before:?}");
    assert_eq!(before.username, ADMIN_USER);

    let (key, secret) = app.create_key("prometheus").await;
    let after = app.authorize(&operator).await;
    assert!(!after.allowed);
    assert_eq!(after.reason(), DenyReason::InvalidCredentials);

    for header in [
        bearer(&secret),
        basic("", &secret),
        basic("anything", &secret),
    ] {
        let allowed = app.authorize(&header).await;
        assert!(allowed.allowed, "{header}: {allowed:?}");
        assert_eq!(allowed.key_id, key.id);
        assert_eq!(allowed.key_name, "prometheus");
        assert_eq!(allowed.reason(), DenyReason::Unspecified);
    }
}

async fn deny_reasons_follow_the_decision_order(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (key, secret) = app.create_key("k").await;
    assert_eq!(
        app.authorize("").await.reason(),
        DenyReason::MissingCredentials
    );
    assert_eq!(
        app.authorize("Digest abc").await.reason(),
        DenyReason::MalformedCredentials
    );
    assert_eq!(
        app.authorize("Basic !!").await.reason(),
        DenyReason::MalformedCredentials
    );
    // Right id, wrong secret with a valid checksum: only argon2 can tell.
    let forged = {
        let prefix = format!("uk{}_", key.id);
        let random: String = "A".repeat(34);
        let checksummed = format!("{prefix}{random}");
        format!(
            "{checksummed}{}",
            keygate::domain::key::checksum(&checksummed)
        )
    };
    assert_eq!(
        app.authorize(&bearer(&forged)).await.reason(),
        DenyReason::InvalidCredentials
    );
    // A typo breaks the checksum.
    let typo = format!(
        "{}{}",
        &secret[..secret.len() - 1],
        if secret.ends_with('x') { 'y' } else { 'x' }
    );
    assert_eq!(
        app.authorize(&bearer(&typo)).await.reason(),
        DenyReason::InvalidCredentials
    );
    app.set_enabled(key.id, false).await;
    assert_eq!(
        app.authorize(&bearer(&secret)).await.reason(),
        DenyReason::KeyDisabled
    );
    app.set_enabled(key.id, true).await;
    assert!(app.authorize(&bearer(&secret)).await.allowed);
}

async fn check(app_addr: std::net::SocketAddr, authorization: &str) -> CheckResponse {
    let request = check_request(authorization, None);
    AuthorizationClient::new(channel(app_addr).await)
        .check(request)
        .await
        .expect("Check")
        .into_inner()
}

/// The dynamic metadata's string fields.
fn metadata(response: &CheckResponse) -> BTreeMap<String, String> {
    let Some(metadata) = &response.dynamic_metadata else {
        return BTreeMap::new();
    };
    metadata
        .fields
        .iter()
        .map(|(name, value)| match &value.kind {
            Some(Kind::StringValue(text)) => (name.clone(), text.clone()),
            other => panic!("metadata field {name} is {other:?}"),
        })
        .collect()
}

/// What Envoy is told to do to the upstream request: headers set, headers removed.
fn mutations(response: &CheckResponse) -> (BTreeMap<String, String>, Vec<String>) {
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not an OK response: {response:?}");
    };
    let set = ok
        .headers
        .iter()
        .map(|option| {
            let header = option.header.as_ref().expect("a header");
            (header.key.clone(), header.value.clone())
        })
        .collect();
    let mut removed = ok.headers_to_remove.clone();
    removed.sort();
    (set, removed)
}

/// SPEC section 3: on allow, identity headers for the upstream and no Authorization; on deny,
/// the reason in dynamic metadata. Allows carry metadata only when configured to.
async fn check_answers_with_headers_and_reasons(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (key, secret) = app.create_key("grafana scraper").await;

    let allowed = check(app.main_addr, &bearer(&secret)).await;
    assert_eq!(allowed.status.as_ref().map(|s| s.code), Some(0));
    let (set, removed) = mutations(&allowed);
    assert_eq!(
        set,
        BTreeMap::from([
            ("x-keygate-key-id".to_owned(), key.id.to_string()),
            (
                "x-keygate-key-name".to_owned(),
                "grafana scraper".to_owned()
            ),
        ])
    );
    assert_eq!(removed, ["authorization", "x-keygate-user"]);
    assert_eq!(
        metadata(&allowed),
        BTreeMap::new(),
        "no metadata by default"
    );

    app.set_enabled(key.id, false).await;
    let denied = check(app.main_addr, &bearer(&secret)).await;
    assert_eq!(
        denied.status.as_ref().map(|s| s.code),
        Some(tonic::Code::Unauthenticated as i32)
    );
    assert_eq!(
        metadata(&denied),
        BTreeMap::from([("decision".to_owned(), "KEY_DISABLED".to_owned())])
    );
    let missing = check(app.main_addr, "").await;
    assert_eq!(
        metadata(&missing),
        BTreeMap::from([("decision".to_owned(), "MISSING_CREDENTIALS".to_owned())])
    );
    drop(app);

    // Opted in: allows are described too.
    let app = spawn_app_with(&backend, |settings| settings.envoy_allow_metadata = true).await;
    let denied = check(app.main_addr, &bearer(&secret)).await;
    assert_eq!(
        metadata(&denied),
        BTreeMap::from([("decision".to_owned(), "KEY_DISABLED".to_owned())])
    );
    app.set_enabled(key.id, true).await;
    let allowed = check(app.main_addr, &bearer(&secret)).await;
    assert_eq!(
        metadata(&allowed),
        BTreeMap::from([
            ("decision".to_owned(), "ALLOWED".to_owned()),
            ("key_id".to_owned(), key.id.to_string()),
            ("key_name".to_owned(), "grafana scraper".to_owned()),
        ])
    );
}

/// SPEC section 6 / issue #4: decisions are counted by transport and outcome, and each one is
/// timed in the decision histogram (hits of the cache included: they are most decisions).
async fn decisions_are_counted_by_transport_and_reason(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (key, secret) = app.create_key("metered").await;
    let sample = |transport: &str, decision: &str| {
        format!(r#"keygate_decisions_total{{transport="{transport}",decision="{decision}"}}"#)
    };
    let before = app.metrics().await;
    for _ in 0..3 {
        assert!(app.authorize(&bearer(&secret)).await.allowed);
    }
    assert_eq!(
        app.authorize("").await.reason(),
        DenyReason::MissingCredentials
    );
    let answer = check(app.main_addr, &bearer(&secret)).await;
    assert_eq!(
        answer.status.map(|s| s.code),
        Some(0),
        "Check allows the key"
    );
    app.set_enabled(key.id, false).await;
    let answer = check(app.main_addr, &bearer(&secret)).await;
    assert_ne!(
        answer.status.map(|s| s.code),
        Some(0),
        "Check denies it once disabled"
    );

    let after = app.metrics().await;
    let moved = |sample: &str| metric_value(&after, sample) - metric_value(&before, sample);
    assert_eq!(moved(&sample("authorize", "ALLOWED")), 3.0, "{after}");
    assert_eq!(
        moved(&sample("authorize", "MISSING_CREDENTIALS")),
        1.0,
        "{after}"
    );
    assert_eq!(moved(&sample("envoy", "ALLOWED")), 1.0, "{after}");
    assert_eq!(moved(&sample("envoy", "KEY_DISABLED")), 1.0, "{after}");
    assert_eq!(moved(&sample("authorize", "KEY_DISABLED")), 0.0, "{after}");
    assert_eq!(
        moved("keygate_decision_duration_seconds_count"),
        6.0,
        "{after}"
    );
    assert!(
        moved("keygate_decision_duration_seconds_sum") > 0.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"keygate_decision_duration_seconds_bucket{le="+Inf"}"#),
        6.0,
        "{after}"
    );
}

both_backends!(
    check_answers_with_headers_and_reasons,
    decisions_are_counted_by_transport_and_reason,
    basic_auth_works_until_the_first_key_then_never_again,
    deny_reasons_follow_the_decision_order,
);
