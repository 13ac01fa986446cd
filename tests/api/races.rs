//! Races (issue 6, item 7): many first keys at once set the lockout exactly once; and once a
//! disable or delete has returned, no Authorize that starts afterwards is allowed, on the same
//! replica at once, and on another replica once the change notification has been applied.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use keygate::grpc::proto::{
    AuthorizeRequest, CreateKeyRequest, DeleteKeyRequest, DenyReason, GetAuthModeRequest,
    SetKeyEnabledRequest, authorizer_client::AuthorizerClient,
};
use tonic::transport::Channel;

use crate::{
    both_backends,
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, TestApp, TestBackend, basic, bearer, spawn_app, spawn_app_with,
        wait_for,
    },
};

const CREATORS: usize = 16;

fn no_rate_limit(settings: &mut keygate::settings::Settings) {
    settings.rate_limit_per_minute = 0;
}

async fn concurrent_first_keys_on_two_replicas_set_the_lockout_once(backend: TestBackend) {
    let replicas = [spawn_app(&backend).await, spawn_app(&backend).await];
    let mut feed = match &backend {
        TestBackend::Postgres(pool) => {
            let mut listener = sqlx::postgres::PgListener::connect_with(pool)
                .await
                .unwrap();
            listener.listen("keygate_changes").await.unwrap();
            Some(listener)
        }
        TestBackend::Sqlite(_) => None,
    };
    let operator = basic(ADMIN_USER, ADMIN_PASSWORD);
    for replica in &replicas {
        assert!(replica.authorize(&operator).await.allowed, "before any key");
    }

    let creates: Vec<_> = (0..CREATORS)
        .map(|n| {
            let mut admin = replicas[n % 2].admin.clone();
            tokio::spawn(async move {
                admin
                    .create_key(CreateKeyRequest {
                        name: format!("racer {n}"),
                        expires_at: None,
                    })
                    .await
            })
        })
        .collect();
    let mut created_at = Vec::new();
    for create in creates {
        let key = create
            .await
            .unwrap()
            .expect("every concurrent CreateKey succeeds")
            .into_inner()
            .key
            .unwrap();
        created_at.push(key.created_at.unwrap());
    }

    for replica in &replicas {
        let mode = replica
            .admin
            .clone()
            .get_auth_mode(GetAuthModeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(mode.api_keys_enabled);
        let locked_at = mode.locked_at.expect("locked_at set");
        assert!(
            created_at.contains(&locked_at),
            "locked_at {locked_at:?} is no key's creation time"
        );
        let denied = replica.authorize(&operator).await;
        assert_eq!(
            denied.reason(),
            DenyReason::InvalidCredentials,
            "after the lockout"
        );
    }

    // On Postgres the flag's trigger notifies on every change of it: exactly one.
    if let Some(listener) = feed.as_mut() {
        let (mut keys, mut auth_mode) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Every key's notification, then a little longer for a late second flag change.
        let mut quiet_until = None;
        loop {
            let now = Instant::now();
            let until = quiet_until.unwrap_or(deadline);
            if now >= until {
                break;
            }
            match tokio::time::timeout(until - now, listener.recv()).await {
                Ok(Ok(notification)) => match notification.payload() {
                    "auth_mode" => auth_mode += 1,
                    payload if payload.starts_with("key:") => keys += 1,
                    other => panic!("unexpected notification {other}"),
                },
                Ok(Err(error)) => panic!("LISTEN failed: {error}"),
                Err(_) => break,
            }
            if keys == CREATORS && quiet_until.is_none() {
                quiet_until = Some(Instant::now() + Duration::from_millis(300));
            }
        }
        assert_eq!(keys, CREATORS, "a notification per key");
        assert_eq!(auth_mode, 1, "the lockout flag changed {auth_mode} times");
    }
}

/// One Authorize as a client saw it.
struct Observation {
    started: Instant,
    finished: Instant,
    allowed: bool,
    reason: DenyReason,
}

/// Authorize `key` back to back from `tasks` tasks until `stop` (bounded: 15 s, 20 000 calls
/// per task).
fn hammer(
    client: &AuthorizerClient<Channel>,
    key: &str,
    tasks: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Observation>>> {
    (0..tasks)
        .map(|_| {
            let (client, header, stop) = (client.clone(), bearer(key), stop.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && seen.len() < 20_000
                {
                    let started = Instant::now();
                    let response = client
                        .clone()
                        .authorize(AuthorizeRequest {
                            authorization: header.clone().into(),
                            client_address: "203.0.113.9".into(),
                        })
                        .await
                        .expect("Authorize")
                        .into_inner();
                    seen.push(Observation {
                        started,
                        finished: Instant::now(),
                        allowed: response.allowed,
                        reason: response.reason(),
                    });
                }
                seen
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Observation>>>) -> Vec<Observation> {
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Asserts that every call that started after `cutoff` was denied for `reason`; returns how
/// many calls were allowed before and denied after.
fn assert_denied_after(
    seen: &[Observation],
    cutoff: Instant,
    reasons: &[DenyReason],
    what: &str,
) -> (usize, usize) {
    let late_allows = seen
        .iter()
        .filter(|o| o.started > cutoff && o.allowed)
        .count();
    assert_eq!(
        late_allows, 0,
        "{what}: {late_allows} calls that started after it were allowed"
    );
    let after: Vec<_> = seen.iter().filter(|o| o.started > cutoff).collect();
    assert!(
        after.iter().all(|o| reasons.contains(&o.reason)),
        "{what}: wrong reason"
    );
    // The first deny anyone saw: nothing that started after it may be allowed either.
    if let Some(first_deny) = seen.iter().filter(|o| !o.allowed).map(|o| o.finished).min() {
        assert!(
            !seen.iter().any(|o| o.started > first_deny && o.allowed),
            "{what}: allowed again after a deny"
        );
    }
    (seen.iter().filter(|o| o.allowed).count(), after.len())
}

async fn no_allow_after_a_disable_or_delete_returned_on_the_same_replica(backend: TestBackend) {
    // Every caller shares one address, and a deleted key's id is a failure that spends the
    // failure budget: without the limiter, each answer after the delete names its reason.
    let app = spawn_app_with(&backend, no_rate_limit).await;
    let mut figures = Vec::new();
    for round in 0..4 {
        let (key, secret) = app.create_key(&format!("round {round}")).await;
        assert!(app.authorize(&bearer(&secret)).await.allowed);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = hammer(&app.authorizer, &secret, 6, &stop);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let disable = async {
            app.admin
                .clone()
                .set_key_enabled(SetKeyEnabledRequest {
                    id: key.id,
                    enabled: false,
                })
                .await
                .map(|_| Instant::now())
        };
        let delete = async {
            app.admin
                .clone()
                .delete_key(DeleteKeyRequest { id: key.id })
                .await
                .map(|_| Instant::now())
        };
        let (returned, reason, what): (_, &[DenyReason], _) = match round {
            0 | 1 => (
                disable.await.expect("SetKeyEnabled"),
                &[DenyReason::KeyDisabled],
                "SetKeyEnabled(false)",
            ),
            2 => (
                delete.await.expect("DeleteKey"),
                &[DenyReason::InvalidCredentials],
                "DeleteKey",
            ),
            _ => {
                // Both at once: the first to return successfully is the cutoff (a disable
                // that lands after the delete gets NOT_FOUND).
                let (disabled, deleted) = tokio::join!(disable, delete);
                let returned = [disabled.ok(), deleted.ok()].into_iter().flatten().min();
                (
                    returned.expect("the delete succeeds"),
                    &[DenyReason::KeyDisabled, DenyReason::InvalidCredentials],
                    "SetKeyEnabled(false) and DeleteKey together",
                )
            }
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, Ordering::Relaxed);
        let seen = collect(tasks).await;
        let (allowed, after) = assert_denied_after(&seen, returned, reason, what);
        assert!(
            allowed > 0 && after > 0,
            "{what}: the race did not happen ({allowed} allowed before, {after} after)"
        );
        figures.push(format!(
            "{what}: {allowed} allowed before, {after} denied after"
        ));
    }
    eprintln!("same-replica race figures: {}", figures.join("; "));
}

both_backends!(
    concurrent_first_keys_on_two_replicas_set_the_lockout_once,
    no_allow_after_a_disable_or_delete_returned_on_the_same_replica,
);

async fn applied_notifications(app: &TestApp) -> f64 {
    app.metric("keygate_store_change_notifications_total").await
}

#[sqlx::test(migrations = false)]
async fn no_allow_on_another_replica_after_the_notification_was_applied(pool: sqlx::PgPool) {
    let backend = TestBackend::postgres(pool);
    let (writer, reader) = (
        spawn_app_with(&backend, no_rate_limit).await,
        spawn_app_with(&backend, no_rate_limit).await,
    );
    let mut figures = Vec::new();
    for round in 0..3i64 {
        let (key, secret) = writer.create_key(&format!("round {round}")).await;
        // The reader has applied every notification so far: the lockout, then per round a
        // creation and a disable or delete.
        let expected = (2 + 2 * round) as f64;
        wait_for(
            "the reader hears of the new key",
            Duration::from_secs(10),
            || async { applied_notifications(&reader).await == expected },
        )
        .await;
        assert!(reader.authorize(&bearer(&secret)).await.allowed);

        let stop = Arc::new(AtomicBool::new(false));
        let tasks = hammer(&reader.authorizer, &secret, 6, &stop);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let sent = Instant::now();
        let (reason, what) = if round < 2 {
            writer.set_enabled(key.id, false).await;
            (
                DenyReason::KeyDisabled,
                "SetKeyEnabled(false) on the other replica",
            )
        } else {
            writer
                .admin
                .clone()
                .delete_key(DeleteKeyRequest { id: key.id })
                .await
                .expect("DeleteKey");
            (
                DenyReason::InvalidCredentials,
                "DeleteKey on the other replica",
            )
        };
        let returned = sent.elapsed();
        wait_for(
            "the reader applies the change",
            Duration::from_secs(10),
            || async { applied_notifications(&reader).await > expected },
        )
        .await;
        let applied = Instant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, Ordering::Relaxed);
        let seen = collect(tasks).await;
        let (allowed, after) = assert_denied_after(&seen, applied, &[reason], what);
        assert!(allowed > 0 && after > 0, "{what}: the race did not happen");
        let first_deny = seen
            .iter()
            .filter(|o| !o.allowed)
            .map(|o| o.finished)
            .min()
            .expect("a deny");
        figures.push(format!(
            "{what}: returned after {returned:?}, first deny on the reader {:?} after the call \
             was sent",
            first_deny.saturating_duration_since(sent)
        ));
    }
    eprintln!("cross-replica race figures: {}", figures.join("; "));
}
