//! Brute force (SPEC section 3, step 5): a client spraying wrong secrets is rate limited once
//! its failure budget is spent, so the failures it is answered stay within the budget, while a
//! good key held in memory from the same address keeps working.

use std::time::Instant;

use keygate::grpc::proto::DenyReason;

use crate::{
    both_backends,
    helpers::{TestApp, TestBackend, bearer, spawn_app_with},
};

const BURST: u32 = 5;
const PER_MINUTE: u32 = 30;
const ATTEMPTS: usize = 200;
const CONCURRENCY: usize = 16;
const ATTACKER: &str = "198.51.100.7";

async fn argon2_runs(app: &TestApp) -> f64 {
    app.metric("keygate_argon2_verifications_total{result=\"mismatch\"}")
        .await
        + app
            .metric("keygate_argon2_verifications_total{result=\"match\"}")
            .await
}

/// A well-formed key for `id` (valid checksum) with a random part nobody was given: only the
/// digest can tell it is wrong.
fn forged(id: i64, n: usize) -> String {
    let body = format!("uk{id}_{:0>34}", format!("X{n}"));
    format!("{body}{}", keygate::domain::key::checksum(&body))
}

async fn a_secret_spray_is_throttled_and_good_keys_keep_working(backend: TestBackend) {
    let app = spawn_app_with(&backend, |settings| {
        settings.rate_limit_burst = BURST;
        settings.rate_limit_per_minute = PER_MINUTE;
    })
    .await;
    let (key, good) = app.create_key("shared gateway").await;
    // Verified once: from now on a cache hit.
    assert!(
        app.try_authorize(&bearer(&good), ATTACKER)
            .await
            .unwrap()
            .allowed
    );

    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let app_authorizer = app.authorizer.clone();
            let good = good.clone();
            let id = key.id;
            tokio::spawn(async move {
                let (mut invalid, mut limited, mut good_denied) = (0, 0, Vec::new());
                for n in (task..ATTEMPTS).step_by(CONCURRENCY) {
                    let response = app_authorizer
                        .clone()
                        .authorize(keygate::grpc::proto::AuthorizeRequest {
                            authorization: bearer(&forged(id, n)).into(),
                            client_address: ATTACKER.into(),
                        })
                        .await
                        .expect("Authorize")
                        .into_inner();
                    assert!(!response.allowed, "a forged secret was allowed");
                    match response.reason() {
                        DenyReason::InvalidCredentials => invalid += 1,
                        DenyReason::RateLimited => limited += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                    // The good key from the same address, in between.
                    let response = app_authorizer
                        .clone()
                        .authorize(keygate::grpc::proto::AuthorizeRequest {
                            authorization: bearer(&good).into(),
                            client_address: ATTACKER.into(),
                        })
                        .await
                        .expect("Authorize")
                        .into_inner();
                    if !response.allowed {
                        good_denied.push(response.reason());
                    }
                }
                (invalid, limited, good_denied)
            })
        })
        .collect();
    let (mut invalid, mut limited, mut good_denied) = (0, 0, Vec::new());
    for task in tasks {
        let (i, l, g) = task.await.unwrap();
        invalid += i;
        limited += l;
        good_denied.extend(g);
    }
    let elapsed = started.elapsed();

    // The bucket holds BURST failures and regains PER_MINUTE a minute.
    let refilled = elapsed.as_secs_f64() * f64::from(PER_MINUTE) / 60.0;
    let bound = f64::from(BURST) + refilled.ceil();
    eprintln!(
        "brute force figures: {ATTEMPTS} forged secrets from one address ({CONCURRENCY} \
         concurrent) in {elapsed:?}: {invalid} INVALID_CREDENTIALS (bound {bound}), {limited} \
         RATE_LIMITED; the good key from the same address \
         was allowed {} times out of {ATTEMPTS}",
        ATTEMPTS - good_denied.len()
    );
    assert!(good_denied.is_empty(), "good key denied: {good_denied:?}");
    assert!(
        invalid as f64 <= bound,
        "{invalid} failures answered to a client with a burst of {BURST} (bound {bound})"
    );
    assert!(
        invalid >= BURST as usize,
        "the whole burst ({BURST}) is answered before the limit: {invalid}"
    );
    assert_eq!(invalid + limited, ATTEMPTS);

    // Another address has its own budget.
    let other = app
        .try_authorize(&bearer(&forged(key.id, ATTEMPTS + 1)), "198.51.100.8")
        .await
        .unwrap();
    assert_eq!(other.reason(), DenyReason::InvalidCredentials);
}

/// Concurrent first uses of a good key from one address cost no argon2 run and take no
/// failure budget: none of them is rate limited, however small the burst.
async fn a_fresh_key_used_concurrently_by_one_client_is_never_rate_limited(backend: TestBackend) {
    const BURST: u32 = 2;
    const REQUESTS: usize = 48;
    let app = spawn_app_with(&backend, |settings| {
        settings.rate_limit_burst = BURST;
        settings.rate_limit_per_minute = 1;
    })
    .await;
    let (_, good) = app.create_key("fresh").await;
    let before = argon2_runs(&app).await;

    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let mut authorizer = app.authorizer.clone();
            let header = bearer(&good);
            tokio::spawn(async move {
                authorizer
                    .authorize(keygate::grpc::proto::AuthorizeRequest {
                        authorization: header.into(),
                        client_address: ATTACKER.into(),
                    })
                    .await
                    .expect("Authorize")
                    .into_inner()
            })
        })
        .collect();
    let mut denied = Vec::new();
    for request in requests {
        let response = request.await.unwrap();
        if !response.allowed {
            denied.push(response.reason());
        }
    }
    assert!(
        denied.is_empty(),
        "{} of {REQUESTS} concurrent first uses denied: {denied:?}",
        denied.len()
    );
    let runs = argon2_runs(&app).await - before;
    assert_eq!(
        runs, 0.0,
        "argon2 runs for one fresh key used {REQUESTS} times at once"
    );

    // The budget is untouched: the client can still fail BURST times before being limited.
    let (key, _) = app.create_key("other").await;
    for n in 0..BURST as usize {
        let response = app
            .try_authorize(&bearer(&forged(key.id, n)), ATTACKER)
            .await
            .unwrap();
        assert_eq!(
            response.reason(),
            DenyReason::InvalidCredentials,
            "failure {n}"
        );
    }
    let response = app
        .try_authorize(&bearer(&forged(key.id, BURST as usize)), ATTACKER)
        .await
        .unwrap();
    assert_eq!(response.reason(), DenyReason::RateLimited);
}

both_backends!(
    a_secret_spray_is_throttled_and_good_keys_keep_working,
    a_fresh_key_used_concurrently_by_one_client_is_never_rate_limited,
);
