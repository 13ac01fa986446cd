//! Correctness stays exact under the verified-credential cache: a change made on one replica is
//! honoured by the others after its notification (and after a dropped LISTEN connection), a
//! cached key still expires on time, a wrong secret is never allowed from the cache, and a
//! cached good key is never rate limited.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate::{
    domain::key::{CHECKSUM_LEN, RANDOM_LEN, checksum},
    grpc::proto::{
        AuthorizeRequest, AuthorizeResponse, DeleteKeyRequest, DenyReason,
        authorizer_client::AuthorizerClient,
    },
};
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::{
    both_backends,
    helpers::{TestApp, TestBackend, bearer, spawn_app, spawn_app_with, timestamp_in},
};

/// Far beyond any test's runtime: when a replica configured with it drops a stale entry, the
/// change feed (or its reconnect re-validation) did it, not the periodic re-validation.
const NO_PERIODIC_REVALIDATION_SECS: u64 = 86_400;
/// How long a change may take to reach the other replica before a test fails. Generous for a
/// loaded CI machine; the benchmark measures the real figure (milliseconds).
const PROPAGATION_BOUND: Duration = Duration::from_secs(15);

/// The answer `app` gives for `header`, polled until `wanted` accepts it or `PROPAGATION_BOUND`
/// passes (then the test fails with the last answer).
async fn eventually(
    app: &TestApp,
    header: &str,
    what: &str,
    wanted: impl Fn(&AuthorizeResponse) -> bool,
) -> AuthorizeResponse {
    let started = Instant::now();
    loop {
        let answer = app.authorize(header).await;
        if wanted(&answer) {
            return answer;
        }
        assert!(
            started.elapsed() < PROPAGATION_BOUND,
            "not {what} within {PROPAGATION_BOUND:?}; last answer: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn denied_with(reason: DenyReason) -> impl Fn(&AuthorizeResponse) -> bool {
    move |answer| !answer.allowed && answer.reason() == reason
}

fn allowed(answer: &AuthorizeResponse) -> bool {
    answer.allowed
}

/// A key for `id` with the given 34 random characters and a valid checksum: only the digest
/// can tell it from the real one.
fn forge(id: i64, random: &str) -> String {
    assert_eq!(random.len(), RANDOM_LEN);
    let signed = format!("uk{id}_{random}");
    let sum = checksum(&signed);
    format!("{signed}{sum}")
}

/// The 34 random characters of a clear key `uk<id>_<random><checksum>`.
fn random_part(clear_key: &str) -> &str {
    let (_, secret) = clear_key.split_once('_').expect("a key has an underscore");
    &secret[..RANDOM_LEN]
}

/// A value from keygate's /metrics text, by the exact series name with labels.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
}

const CACHE_HITS: &str = r#"keygate_credential_cache_lookups_total{result="hit"}"#;
const ARGON2_MISMATCHES: &str = r#"keygate_argon2_verifications_total{result="mismatch"}"#;
const ARGON2_MATCHES: &str = r#"keygate_argon2_verifications_total{result="match"}"#;

async fn cache_hits(app: &TestApp) -> f64 {
    metric(&app.metrics().await, CACHE_HITS)
}

/// Waits (at most 5 s) until the count of applied change notifications has not moved for
/// 300 ms.
async fn settled_notifications(app: &TestApp) {
    let count = || async {
        metric(
            &app.metrics().await,
            "keygate_store_change_notifications_total",
        )
    };
    let started = std::time::Instant::now();
    let mut last = count().await;
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count().await;
        if now == last && now > 0.0 {
            return;
        }
        last = now;
    }
}

/// Two replicas on one Postgres database. Only `b`'s periodic re-validation is switched off:
/// `a` makes the changes, `b` must learn of them from the change feed.
async fn two_replicas(pool: &PgPool) -> (TestBackend, TestApp, TestApp) {
    let backend = TestBackend::postgres(pool.clone());
    let a = spawn_app(&backend).await;
    let b = spawn_app_with(&backend, |settings| {
        settings.revalidate_secs = NO_PERIODIC_REVALIDATION_SECS;
    })
    .await;
    wait_for_listeners(pool, 2, &[]).await;
    (backend, a, b)
}

/// Backend pids of this database's LISTEN connections (the replicas' change feeds). Filtered
/// by database: other tests run beside this one on the same server.
async fn listener_pids(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(pool)
    .await
    .expect("read pg_stat_activity")
}

/// Waits until at least `count` LISTEN connections that are not in `excluded` exist.
async fn wait_for_listeners(pool: &PgPool, count: usize, excluded: &[i32]) -> Vec<i32> {
    let started = Instant::now();
    loop {
        let pids: Vec<i32> = listener_pids(pool)
            .await
            .into_iter()
            .filter(|pid| !excluded.contains(pid))
            .collect();
        if pids.len() >= count {
            return pids;
        }
        assert!(
            started.elapsed() < PROPAGATION_BOUND,
            "only {} new LISTEN connection(s) after {PROPAGATION_BOUND:?}, wanted {count}",
            pids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Holds `header` on `app` (one store read, then from memory) and checks it is allowed there.
async fn warm(app: &TestApp, header: &str) {
    for _ in 0..2 {
        let answer = app.authorize(header).await;
        assert!(answer.allowed, "{answer:?}");
    }
}

#[sqlx::test(migrations = false)]
async fn a_key_disabled_on_one_replica_is_denied_by_the_other(pool: PgPool) {
    let (_backend, a, b) = two_replicas(&pool).await;
    let (key, secret) = a.create_key("shared").await;
    let header = bearer(&secret);
    warm(&b, &header).await;
    let hits = cache_hits(&b).await;
    warm(&b, &header).await;
    assert!(
        cache_hits(&b).await >= hits + 2.0,
        "replica b answers a known good key from its cache"
    );

    a.set_enabled(key.id, false).await;
    eventually(
        &b,
        &header,
        "KEY_DISABLED on b",
        denied_with(DenyReason::KeyDisabled),
    )
    .await;
    // An enable travels the same way: b does not keep the disabled state either.
    a.set_enabled(key.id, true).await;
    eventually(&b, &header, "allowed again on b", allowed).await;
}

#[sqlx::test(migrations = false)]
async fn a_key_deleted_on_one_replica_is_denied_by_the_other(pool: PgPool) {
    let (_backend, a, b) = two_replicas(&pool).await;
    let (key, secret) = a.create_key("doomed").await;
    let header = bearer(&secret);
    warm(&b, &header).await;

    a.admin
        .clone()
        .delete_key(DeleteKeyRequest { id: key.id })
        .await
        .expect("DeleteKey");
    eventually(
        &b,
        &header,
        "INVALID_CREDENTIALS on b",
        denied_with(DenyReason::InvalidCredentials),
    )
    .await;
    // And it stays denied: the unknown id is not re-admitted from anything cached.
    for _ in 0..5 {
        let answer = b.authorize(&header).await;
        assert_eq!(
            answer.reason(),
            DenyReason::InvalidCredentials,
            "{answer:?}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn an_expiry_edited_in_the_database_reaches_every_replica(pool: PgPool) {
    let (_backend, a, b) = two_replicas(&pool).await;
    let (key, secret) = a.create_key("edited").await;
    let header = bearer(&secret);
    warm(&a, &header).await;
    warm(&b, &header).await;

    // No RPC edits an expiry; an operator's psql UPDATE must still reach every replica (the
    // trigger raises the notification, so neither replica made this change itself).
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(key.id)
        .execute(&pool)
        .await
        .expect("expire the key in SQL");
    for replica in [&a, &b] {
        eventually(
            replica,
            &header,
            "KEY_EXPIRED",
            denied_with(DenyReason::KeyExpired),
        )
        .await;
    }
    sqlx::query("UPDATE api_keys SET expires_at = NULL WHERE id = $1")
        .bind(key.id)
        .execute(&pool)
        .await
        .expect("un-expire the key in SQL");
    for replica in [&a, &b] {
        eventually(replica, &header, "allowed again", allowed).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_dropped_listen_connection_is_recovered(pool: PgPool) {
    let (_backend, a, b) = two_replicas(&pool).await;
    let (key, secret) = a.create_key("resilient").await;
    let header = bearer(&secret);
    warm(&b, &header).await;

    let killed: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND query ILIKE 'LISTEN%' AND pg_terminate_backend(pid)",
    )
    .fetch_all(&pool)
    .await
    .expect("terminate the LISTEN connections");
    assert!(
        killed.len() >= 2,
        "both replicas' LISTEN connections are terminated: {killed:?}"
    );

    // A change made while b may still be reconnecting: b's re-validation after reconnecting
    // (notifications sent while it was away are lost) must catch it.
    a.set_enabled(key.id, false).await;
    eventually(
        &b,
        &header,
        "KEY_DISABLED on b after its LISTEN connection was dropped",
        denied_with(DenyReason::KeyDisabled),
    )
    .await;

    // Once both replicas listen again, changes flow through the new connections.
    wait_for_listeners(&pool, 2, &killed).await;
    a.set_enabled(key.id, true).await;
    eventually(&b, &header, "allowed again on b", allowed).await;
    a.set_enabled(key.id, false).await;
    eventually(
        &b,
        &header,
        "KEY_DISABLED on b through the new LISTEN connection",
        denied_with(DenyReason::KeyDisabled),
    )
    .await;
}

fn to_system_time(timestamp: &prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(timestamp.seconds as u64, timestamp.nanos as u32)
}

async fn a_cached_key_still_expires_on_time(backend: TestBackend) {
    let app = spawn_app(&backend).await;
    let (key, secret) = app
        .create_key_expiring("short-lived", Some(timestamp_in(2)))
        .await;
    let expires_at = to_system_time(key.expires_at.as_ref().expect("expires_at is set"));
    let header = bearer(&secret);
    if backend.is_postgres() {
        // CreateKey's own change notifications drop the key from the cache when they arrive:
        // let them arrive before counting what the cache answers.
        settled_notifications(&app).await;
    }
    let hits_before = cache_hits(&app).await;

    let deadline = expires_at + Duration::from_secs(10);
    let mut allowed_count = 0u32;
    loop {
        let sent = SystemTime::now();
        assert!(sent < deadline, "still allowed 10 s after its expiry");
        let answer = app.authorize(&header).await;
        let received = SystemTime::now();
        if answer.allowed {
            // The server decided between `sent` and `received`; an allow means its clock was
            // before the expiry, so the request must have been sent before it.
            assert!(
                sent < expires_at,
                "allowed a request sent {:?} after the expiry",
                sent.duration_since(expires_at).unwrap_or_default()
            );
            allowed_count += 1;
        } else {
            assert_eq!(answer.reason(), DenyReason::KeyExpired, "{answer:?}");
            assert!(
                received >= expires_at,
                "denied as expired {:?} before the expiry",
                expires_at.duration_since(received).unwrap_or_default()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        allowed_count >= 3,
        "the key was used (and cached) before it expired: {allowed_count} allows"
    );
    assert!(
        cache_hits(&app).await >= hits_before + f64::from(allowed_count - 1),
        "the allows after the first came from the cache"
    );
    // Expired stays expired, however warm the cache is.
    for _ in 0..5 {
        assert_eq!(
            app.authorize(&header).await.reason(),
            DenyReason::KeyExpired
        );
    }
}

/// One Authorize call on its own client (so calls can run as concurrent tasks).
async fn authorize_on(
    mut client: AuthorizerClient<Channel>,
    header: String,
    client_address: &str,
) -> AuthorizeResponse {
    client
        .authorize(AuthorizeRequest {
            authorization: header.into(),
            client_address: client_address.to_owned(),
        })
        .await
        .expect("Authorize")
        .into_inner()
}

async fn a_wrong_secret_is_never_allowed_from_the_cache(backend: TestBackend) {
    // No rate limiting here: every wrong secret must be compared with the digest, not stop at
    // the limiter.
    let app = spawn_app_with(&backend, |settings| settings.rate_limit_per_minute = 0).await;
    let (key, secret) = app.create_key("good").await;
    let (other, other_secret) = app.create_key("other").await;
    let good = random_part(&secret).to_owned();
    warm(&app, &bearer(&secret)).await;

    // Wrong secrets with valid checksums for real ids, so each one gets past the cheap checks.
    let mut wrong: Vec<String> = Vec::new();
    // Sharing a prefix of every length class with the good secret, down to all but one char.
    for shared in [33, 32, 30, 24, 17, 8, 1, 0] {
        let tail: String = good[shared..]
            .chars()
            .map(|c| if c == 'Z' { 'Y' } else { 'Z' })
            .collect();
        wrong.push(forge(key.id, &format!("{}{tail}", &good[..shared])));
    }
    // The good secret's characters in another order, and constant ones.
    let mut rotated = good[1..].to_owned();
    rotated.push_str(&good[..1]);
    wrong.push(forge(key.id, &rotated));
    wrong.push(forge(key.id, &"A".repeat(RANDOM_LEN)));
    wrong.push(forge(key.id, &"0".repeat(RANDOM_LEN)));
    // The good secret presented under the other key's id, and the other key's under this one.
    wrong.push(forge(other.id, &good));
    wrong.push(forge(key.id, random_part(&other_secret)));
    wrong.sort();
    wrong.dedup();
    let distinct_wrong = wrong.len();
    let before = app.metrics().await;
    let argon2_before = metric(&before, ARGON2_MISMATCHES) + metric(&before, ARGON2_MATCHES);
    let hits_before = cache_hits(&app).await;

    // Every wrong secret three times and the good keys between them, all in flight at once:
    // none may be let in beside a good key of the same id.
    let mut calls = tokio::task::JoinSet::new();
    let mut warm_key_calls = 0u32;
    for round in 0..3 {
        for (i, forged) in wrong.iter().enumerate() {
            let client = app.authorizer.clone();
            let forged = forged.clone();
            calls.spawn(async move {
                let answer = authorize_on(client, bearer(&forged), "").await;
                (None, round, i, answer)
            });
            for (id, clear) in [(key.id, &secret), (other.id, &other_secret)] {
                let client = app.authorizer.clone();
                let header = bearer(clear);
                if id == key.id {
                    warm_key_calls += 1;
                }
                calls.spawn(async move {
                    let answer = authorize_on(client, header, "").await;
                    (Some(id), round, i, answer)
                });
            }
        }
    }
    while let Some(joined) = calls.join_next().await {
        let (good_id, round, i, answer) = joined.expect("call task");
        match good_id {
            Some(id) => {
                assert!(answer.allowed, "good key {id} (round {round}): {answer:?}");
                assert_eq!(answer.key_id, id);
            }
            None => {
                assert!(!answer.allowed, "wrong secret #{i} allowed: {answer:?}");
                assert_eq!(
                    answer.reason(),
                    DenyReason::InvalidCredentials,
                    "wrong secret #{i}"
                );
            }
        }
    }
    // Once more, one by one, now that everything is cached: still denied, good still allowed.
    for forged in &wrong {
        let answer = app.authorize(&bearer(forged)).await;
        assert_eq!(answer.reason(), DenyReason::InvalidCredentials);
        assert!(app.authorize(&bearer(&secret)).await.allowed);
    }

    let text = app.metrics().await;
    let argon2_runs =
        metric(&text, ARGON2_MISMATCHES) + metric(&text, ARGON2_MATCHES) - argon2_before;
    assert_eq!(
        argon2_runs, 0.0,
        "{distinct_wrong} distinct wrong secrets for keys cost argon2 runs: keys are digests"
    );
    // The warmed key was answered from memory every time (the other key's first uses may each
    // have read the store).
    let hits = metric(&text, CACHE_HITS) - hits_before;
    let expected = f64::from(warm_key_calls) + wrong.len() as f64;
    assert!(
        hits >= expected,
        "{hits} cache hits, expected at least {expected}"
    );
}

/// The hot path compares the digest, which covers the checksum; everything else must
/// still meet it, before the store, and before the key's state.
async fn a_broken_checksum_is_refused_even_for_a_cached_key(backend: TestBackend) {
    let app = spawn_app_with(&backend, |settings| settings.rate_limit_per_minute = 0).await;
    let (key, secret) = app.create_key("cached").await;
    warm(&app, &bearer(&secret)).await;
    let (signed, sum) = secret.split_at(secret.len() - CHECKSUM_LEN);
    let flip = |c: char| if c == 'Q' { 'R' } else { 'Q' };
    let mut broken: Vec<String> = (0..CHECKSUM_LEN)
        .map(|i| {
            let mut chars: Vec<char> = sum.chars().collect();
            chars[i] = flip(chars[i]);
            format!("{signed}{}", chars.into_iter().collect::<String>())
        })
        .collect();
    // A typo in the random part, the checksum left as it was.
    let last = signed.chars().last().expect("a key is not empty");
    broken.push(format!(
        "{}{}{sum}",
        &signed[..signed.len() - 1],
        flip(last)
    ));
    let argon2_runs = |text: &str| metric(text, ARGON2_MISMATCHES) + metric(text, ARGON2_MATCHES);
    let runs_before = argon2_runs(&app.metrics().await);

    for text in &broken {
        let answer = app.authorize(&bearer(text)).await;
        assert!(!answer.allowed, "{answer:?}");
        assert_eq!(answer.reason(), DenyReason::InvalidCredentials);
        assert!(app.authorize(&bearer(&secret)).await.allowed);
    }
    // Disabled: the checksum is checked first, so a broken one is still invalid, not disabled.
    app.set_enabled(key.id, false).await;
    for text in &broken {
        let answer = app.authorize(&bearer(text)).await;
        assert_eq!(
            answer.reason(),
            DenyReason::InvalidCredentials,
            "{answer:?}"
        );
    }
    assert_eq!(
        app.authorize(&bearer(&secret)).await.reason(),
        DenyReason::KeyDisabled
    );
    app.set_enabled(key.id, true).await;
    assert!(app.authorize(&bearer(&secret)).await.allowed);

    assert_eq!(
        argon2_runs(&app.metrics().await),
        runs_before,
        "a broken checksum must cost no argon2 run"
    );
}

async fn rate_limiting_never_blocks_a_cached_good_key(backend: TestBackend) {
    const BURST: u32 = 3;
    const CLIENT: &str = "192.0.2.7";
    let app = spawn_app_with(&backend, |settings| {
        settings.rate_limit_burst = BURST;
        settings.rate_limit_per_minute = 1;
    })
    .await;
    let (key, secret) = app.create_key("shared-gateway").await;
    let (_, unverified_secret) = app.create_key("not-yet-used").await;
    let good = bearer(&secret);
    let call = |header: String| authorize_on(app.authorizer.clone(), header, CLIENT);

    let first = call(good.clone()).await;
    assert!(first.allowed, "{first:?}");

    // A bad client behind the same address exhausts its failure budget.
    let mut failures = 0;
    loop {
        let forged = forge(key.id, &format!("{failures:0>34}"));
        let answer = call(bearer(&forged)).await;
        if answer.reason() == DenyReason::RateLimited {
            break;
        }
        assert_eq!(
            answer.reason(),
            DenyReason::InvalidCredentials,
            "{answer:?}"
        );
        failures += 1;
        assert!(
            failures <= BURST,
            "not rate limited after {failures} failures"
        );
    }

    // The cached good key from the very same address keeps flowing, interleaved with the bad
    // client, which stays limited.
    let hits_before = cache_hits(&app).await;
    for i in 0..20 {
        let answer = call(good.clone()).await;
        assert!(
            answer.allowed,
            "cached good key limited on call {i}: {answer:?}"
        );
        assert_eq!(answer.key_id, key.id);
        let forged = forge(key.id, &format!("{:z>34}", i));
        assert_eq!(
            call(bearer(&forged)).await.reason(),
            DenyReason::RateLimited
        );
    }
    assert!(cache_hits(&app).await >= hits_before + 20.0);

    // The limiter still guards real work: a key this process has never verified needs argon2,
    // which the exhausted address does not get; another address does.
    assert_eq!(
        call(bearer(&unverified_secret)).await.reason(),
        DenyReason::RateLimited
    );
    let elsewhere = authorize_on(
        app.authorizer.clone(),
        bearer(&unverified_secret),
        "192.0.2.8",
    )
    .await;
    assert!(elsewhere.allowed, "{elsewhere:?}");
}

both_backends!(
    a_broken_checksum_is_refused_even_for_a_cached_key,
    a_cached_key_still_expires_on_time,
    a_wrong_secret_is_never_allowed_from_the_cache,
    rate_limiting_never_blocks_a_cached_good_key,
);
