//! The basic-auth lockout flag (SPEC sections 1 and 5): set by the transaction of the first
//! key, and then never cleared: not by deleting keys, not by a restart, not by SQL.

use chrono::{SubsecRound, Utc};
use keygate::grpc::proto::{AuthMode, DeleteKeyRequest, DenyReason, GetAuthModeRequest};

use crate::{
    both_backends,
    helpers::{ADMIN_PASSWORD, ADMIN_USER, AdminClient, TestBackend, basic, bearer, spawn_app},
    key_admin::{all_keys, to_time},
};

async fn auth_mode(admin: &AdminClient) -> AuthMode {
    admin
        .clone()
        .get_auth_mode(GetAuthModeRequest {})
        .await
        .expect("GetAuthMode")
        .into_inner()
}

async fn the_first_key_locks_basic_auth_out_for_good(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let fresh = auth_mode(&app.admin).await;
    assert!(!fresh.api_keys_enabled);
    assert_eq!(fresh.locked_at, None);
    let operator = basic(ADMIN_USER, ADMIN_PASSWORD);
    assert!(app.authorize(&operator).await.allowed);

    let before = Utc::now().trunc_subsecs(6);
    let (first, _) = app.create_key("first").await;
    let after = Utc::now();
    let locked = auth_mode(&app.admin).await;
    assert!(locked.api_keys_enabled);
    let locked_at = to_time(locked.locked_at.as_ref().expect("locked_at is set"));
    assert!((before..=after).contains(&locked_at), "{locked_at}");
    assert_eq!(
        app.authorize(&operator).await.reason(),
        DenyReason::InvalidCredentials
    );

    // A second key does not move locked_at; deleting every key does not clear the flag.
    let (second, second_secret) = app.create_key("second").await;
    assert_eq!(auth_mode(&app.admin).await, locked);
    for id in [first.id, second.id] {
        app.admin
            .clone()
            .delete_key(DeleteKeyRequest { id })
            .await
            .expect("DeleteKey");
    }
    assert!(all_keys(&app.admin).await.is_empty());
    assert_eq!(auth_mode(&app.admin).await, locked);
    assert_eq!(
        app.authorize(&operator).await.reason(),
        DenyReason::InvalidCredentials
    );
    assert_eq!(
        app.authorize(&bearer(&second_secret)).await.reason(),
        DenyReason::InvalidCredentials
    );

    // A new process on the same database, with no key at all, still knows.
    app.stop().await;
    let app = spawn_app(&backend).await;
    assert_eq!(auth_mode(&app.admin).await, locked);
    assert_eq!(
        app.authorize(&operator).await.reason(),
        DenyReason::InvalidCredentials
    );
}

/// Statements that try to clear the flag (or remove or duplicate its row) behind keygate's
/// back. Each must fail. Postgres also has TRUNCATE; SQLite has INSERT OR REPLACE, which
/// deletes the conflicting row without firing delete triggers.
fn tampering_statements(postgres: bool) -> Vec<&'static str> {
    let mut statements = vec![
        "UPDATE auth_mode SET api_keys_enabled = FALSE, locked_at = NULL",
        "UPDATE auth_mode SET api_keys_enabled = FALSE",
        "UPDATE auth_mode SET locked_at = NULL",
        "DELETE FROM auth_mode",
    ];
    if postgres {
        statements.extend([
            "UPDATE auth_mode SET locked_at = now()",
            "TRUNCATE auth_mode",
            "INSERT INTO auth_mode (singleton, api_keys_enabled, locked_at) VALUES (TRUE, FALSE, NULL)
             ON CONFLICT (singleton) DO UPDATE SET api_keys_enabled = FALSE, locked_at = NULL",
            "INSERT INTO auth_mode (singleton, api_keys_enabled, locked_at) VALUES (FALSE, FALSE, NULL)",
        ]);
    } else {
        statements.extend([
            "UPDATE auth_mode SET locked_at = '2000-01-01T00:00:00Z'",
            "INSERT OR REPLACE INTO auth_mode (singleton, api_keys_enabled, locked_at) VALUES (1, FALSE, NULL)",
            "REPLACE INTO auth_mode (singleton, api_keys_enabled, locked_at) VALUES (1, FALSE, NULL)",
            "INSERT INTO auth_mode (singleton, api_keys_enabled, locked_at) VALUES (2, FALSE, NULL)",
            "UPDATE OR REPLACE auth_mode SET api_keys_enabled = FALSE, locked_at = NULL",
        ]);
    }
    statements
}

/// Runs `sql` directly on the test database; returns the error text, or `None` if it worked.
async fn execute_directly(backend: &TestBackend, sql: &str) -> Option<String> {
    let result = match backend {
        TestBackend::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        TestBackend::Sqlite(_) => {
            let pool = sqlx::SqlitePool::connect(&backend.url())
                .await
                .expect("open the SQLite file");
            let result = sqlx::query(sql).execute(&pool).await.map(drop);
            pool.close().await;
            result
        }
    };
    result.err().map(|e| e.to_string())
}

async fn the_database_refuses_to_clear_the_flag(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    // Before the lockout the row cannot be removed either (keygate would then never record
    // the lockout).
    let removed = execute_directly(&backend, "DELETE FROM auth_mode").await;
    assert!(removed.is_some(), "DELETE FROM auth_mode worked");
    assert!(!auth_mode(&app.admin).await.api_keys_enabled);

    let (_, secret) = app.create_key("first").await;
    let locked = auth_mode(&app.admin).await;
    assert!(locked.api_keys_enabled);
    for sql in tampering_statements(backend.is_postgres()) {
        let error = execute_directly(&backend, sql).await;
        let Some(error) = error else {
            panic!(
                "{sql:?} worked; the flag is now {:?}",
                auth_mode(&app.admin).await
            );
        };
        assert!(
            error.contains("auth_mode")
                || error.contains("keygate")
                || error.contains("constraint"),
            "{sql:?}: unexpected error {error}"
        );
        assert_eq!(auth_mode(&app.admin).await, locked, "after {sql:?}");
    }
    // And a new process reads the same flag.
    app.stop().await;
    let app = spawn_app(&backend).await;
    assert_eq!(auth_mode(&app.admin).await, locked);
    assert_eq!(
        app.authorize(&basic(ADMIN_USER, ADMIN_PASSWORD))
            .await
            .reason(),
        DenyReason::InvalidCredentials
    );
    assert!(app.authorize(&bearer(&secret)).await.allowed);
}

async fn concurrent_first_keys_set_the_flag_once(backend: TestBackend) {
    // Two processes on one database, four creators each, all racing for the first key.
    let apps = [spawn_app(&backend).await, spawn_app(&backend).await];
    assert!(!auth_mode(&apps[0].admin).await.api_keys_enabled);
    let mut creators = tokio::task::JoinSet::new();
    for n in 0..8 {
        let mut admin = apps[n % 2].admin.clone();
        creators.spawn(async move {
            admin
                .create_key(keygate::grpc::proto::CreateKeyRequest {
                    name: format!("racer {n}"),
                    expires_at: None,
                })
                .await
                .expect("CreateKey")
                .into_inner()
        });
    }
    let mut created = Vec::new();
    while let Some(response) = creators.join_next().await {
        created.push(response.expect("creator task").key.expect("key"));
    }
    let mut ids: Vec<i64> = created.iter().map(|key| key.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 8, "distinct ids");
    let listed: Vec<i64> = all_keys(&apps[1].admin)
        .await
        .iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(listed, ids);

    let locked = auth_mode(&apps[0].admin).await;
    assert!(locked.api_keys_enabled);
    assert_eq!(auth_mode(&apps[1].admin).await, locked);
    // locked_at is the creation time of the key whose transaction set the flag.
    let locked_at = locked.locked_at.expect("locked_at");
    assert!(
        created.iter().any(|key| key.created_at == Some(locked_at)),
        "locked_at {locked_at:?} is no key's created_at"
    );
    let (_, _) = apps[1].create_key("latecomer").await;
    assert_eq!(auth_mode(&apps[0].admin).await, locked);
    for app in &apps {
        assert_eq!(
            app.authorize(&basic(ADMIN_USER, ADMIN_PASSWORD))
                .await
                .reason(),
            DenyReason::InvalidCredentials
        );
    }
}

both_backends!(
    the_first_key_locks_basic_auth_out_for_good,
    the_database_refuses_to_clear_the_flag,
    concurrent_first_keys_set_the_flag_once,
);
