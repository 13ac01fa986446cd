//! Upgrading a version-1 database in place (SPEC section 6): keys that version 1 stored as an
//! argon2id hash of their 34 random characters keep working with no operator action, and the
//! first successful use of each one replaces its hash with the digest, once.

use keygate::domain::{
    digest::SecretDigest,
    hashing::{HashParams, SecretHasher},
    key::{RANDOM_LEN, checksum},
};
use sqlx::{Connection, Row};

use crate::{
    both_backends,
    helpers::{TestApp, TestBackend, bearer, spawn_app_with},
};
use keygate::grpc::proto::DenyReason;

/// The first migration of version 2: everything before it is version 1's schema.
const FIRST_VERSION_2_MIGRATION: i64 = 20261202000001;

const ARGON2_MATCHES: &str = r#"keygate_argon2_verifications_total{result="match"}"#;
const UPGRADES: &str = "keygate_key_digest_upgrades_total";

/// A key as version 1 wrote it: its row, and the clear key its operator was given.
struct Version1Key {
    id: i64,
    clear: String,
}

/// Applies version 1's migrations only, then writes keys exactly as version 1 did (argon2id of
/// the random part, PHC string in `secret_hash`) and sets the lockout flag, as its first
/// CreateKey would have. The last key is deleted again, so the highest id ever handed out is one
/// that no row holds.
async fn version_1_database(backend: &TestBackend, keys: usize) -> Vec<Version1Key> {
    let hasher = SecretHasher::new(HashParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    })
    .unwrap();
    let mut made = Vec::new();
    let placeholder = |sql: &str| match backend {
        TestBackend::Postgres(_) => sql.to_owned(),
        TestBackend::Sqlite(_) => sql.replace('$', "?"),
    };
    macro_rules! with_connection {
        ($conn:ident => $body:block) => {
            match backend {
                TestBackend::Postgres(pool) => {
                    let mut migrator = sqlx::migrate!("migrations/postgres");
                    version_1_only(&mut migrator);
                    migrator.run(pool).await.expect("version 1's migrations");
                    let mut pooled = pool.acquire().await.unwrap();
                    let $conn: &mut sqlx::PgConnection = &mut pooled;
                    $body
                }
                TestBackend::Sqlite(_) => {
                    let url = backend.url();
                    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
                    let mut connection =
                        sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
                            .await
                            .unwrap();
                    let mut migrator = sqlx::migrate!("migrations/sqlite");
                    version_1_only(&mut migrator);
                    migrator
                        .run(&mut connection)
                        .await
                        .expect("version 1's migrations");
                    let $conn = &mut connection;
                    $body
                }
            }
        };
    }
    with_connection!(conn => {
        for n in 0..=keys {
            let random: String = format!("{n:0>8}V1secretVersion1secretVersion1")[..RANDOM_LEN].to_owned();
            let hash = hasher.hash(&random);
            let row = sqlx::query(&placeholder(
                "INSERT INTO api_keys (name, secret_hash, created_at, enabled, created_by) \
                 VALUES ($1, $2, $3, TRUE, 'admin') RETURNING id",
            ))
            .bind(format!("v1 key {n}"))
            .bind(&hash)
            .bind(chrono::Utc::now())
            .fetch_one(&mut *conn)
            .await
            .expect("insert a version-1 key");
            let id: i64 = row.get(0);
            let signed = format!("uk{id}_{random}");
            let clear = format!("{signed}{}", checksum(&signed));
            made.push(Version1Key { id, clear });
        }
        let deleted = made.pop().expect("one key more than asked for");
        sqlx::query(&placeholder("DELETE FROM api_keys WHERE id = $1"))
            .bind(deleted.id)
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(&placeholder(
            "UPDATE auth_mode SET api_keys_enabled = TRUE, locked_at = $1",
        ))
        .bind(chrono::Utc::now())
        .execute(&mut *conn)
        .await
        .unwrap();
    });
    made
}

fn version_1_only(migrator: &mut sqlx::migrate::Migrator) {
    let version_1: Vec<_> = migrator
        .migrations
        .iter()
        .filter(|migration| migration.version < FIRST_VERSION_2_MIGRATION)
        .cloned()
        .collect();
    assert!(!version_1.is_empty() && version_1.len() < migrator.migrations.len());
    migrator.migrations = version_1.into();
}

/// (digest, hash) columns of a key's row, read with SQL.
async fn stored_secret(backend: &TestBackend, id: i64) -> (Option<Vec<u8>>, Option<String>) {
    let sql = "SELECT secret_digest, secret_hash FROM api_keys WHERE id = ";
    match backend {
        TestBackend::Postgres(pool) => sqlx::query_as(&format!("{sql}$1"))
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap(),
        TestBackend::Sqlite(_) => {
            let mut conn = sqlx::SqliteConnection::connect(&backend.url())
                .await
                .unwrap();
            sqlx::query_as(&format!("{sql}?1"))
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
    }
}

async fn counter(app: &TestApp, series: &str) -> f64 {
    app.metric(series).await
}

async fn a_version_1_database_keeps_every_key_working(backend: TestBackend) {
    let keys = version_1_database(&backend, 3).await;
    let app = spawn_app_with(&backend, |settings| settings.rate_limit_per_minute = 0).await;
    let (first, second, untouched) = (&keys[0], &keys[1], &keys[2]);

    // A wrong secret for a version-1 key costs one argon2 run and upgrades nothing.
    let wrong = {
        let signed = format!("uk{}_{}", untouched.id, "W".repeat(RANDOM_LEN));
        format!("{signed}{}", checksum(&signed))
    };
    let answer = app.authorize(&bearer(&wrong)).await;
    assert_eq!(
        answer.reason(),
        DenyReason::InvalidCredentials,
        "{answer:?}"
    );
    let (digest, hash) = stored_secret(&backend, untouched.id).await;
    assert!(digest.is_none() && hash.is_some_and(|h| h.starts_with("$argon2id$")));

    for key in [first, second] {
        let matches_before = counter(&app, ARGON2_MATCHES).await;
        let answer = app.authorize(&bearer(&key.clear)).await;
        assert!(answer.allowed, "version-1 key {}: {answer:?}", key.id);
        assert_eq!(answer.key_id, key.id);
        assert_eq!(counter(&app, ARGON2_MATCHES).await, matches_before + 1.0);
        let (digest, hash) = stored_secret(&backend, key.id).await;
        assert_eq!(hash, None, "the argon2id hash is gone after the first use");
        assert_eq!(
            digest.as_deref(),
            Some(SecretDigest::of(&key.clear).as_bytes().as_slice()),
            "the digest of the whole clear key is stored"
        );
        // From now on: no argon2, from memory or from the store.
        for _ in 0..3 {
            assert!(app.authorize(&bearer(&key.clear)).await.allowed);
        }
        assert_eq!(counter(&app, ARGON2_MATCHES).await, matches_before + 1.0);
    }
    assert_eq!(counter(&app, UPGRADES).await, 2.0);

    // A replica that never saw the old hash (a restart) verifies the upgraded keys by digest.
    app.stop().await;
    let app = spawn_app_with(&backend, |_| {}).await;
    for key in [first, second, untouched] {
        assert!(
            app.authorize(&bearer(&key.clear)).await.allowed,
            "key {}",
            key.id
        );
    }
    assert_eq!(
        counter(&app, ARGON2_MATCHES).await,
        1.0,
        "only the key still holding its hash cost an argon2 run"
    );
    assert_eq!(stored_secret(&backend, untouched.id).await.1, None);

    // The id of version 1's deleted key is never handed out again.
    let (created, secret) = app.create_key("after the upgrade").await;
    assert!(
        created.id > keys.last().unwrap().id + 1,
        "new id {} reuses a deleted key's id",
        created.id
    );
    assert!(app.authorize(&bearer(&secret)).await.allowed);
}

both_backends!(a_version_1_database_keeps_every_key_working);
