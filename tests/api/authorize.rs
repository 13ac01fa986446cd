//! Authorize over real gRPC: SPEC section 3, end to end through the store, the cache and argon2.

use keygate::grpc::proto::DenyReason;

use crate::{
    both_backends,
    helpers::{ADMIN_PASSWORD, ADMIN_USER, TestBackend, basic, bearer, spawn_app},
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

both_backends!(
    basic_auth_works_until_the_first_key_then_never_again,
    deny_reasons_follow_the_decision_order,
);
