//! End to end through a real Envoy running `examples/envoy.yaml` (ext_authz → keygate's Check)
//! in front of the `demo-upstream` binary, and a real Prometheus running
//! `examples/prometheus.yml` through it: what an HTTP client sees on allow and deny (SPEC
//! section 3), what the upstream receives, and that Envoy fails closed when keygate is gone.

use std::time::Duration;

use keygate::{domain::key::checksum, grpc::proto::DeleteKeyRequest};
use rand::{Rng, distr::Alphanumeric};
use tokio::time::Instant;

use crate::{
    both_backends,
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, TestApp, TestBackend, basic, bearer, spawn_app, spawn_app_with,
        timestamp_in,
    },
    http::{HttpResponse, curl},
    processes::{DemoUpstream, EnvoyProcess, PrometheusProcess},
};

/// keygate (in-process, so the test can stop it), the demo upstream, and Envoy in front.
struct Stack {
    app: TestApp,
    envoy: EnvoyProcess,
    _upstream: DemoUpstream,
}

async fn stack(app: TestApp) -> Stack {
    let upstream = DemoUpstream::start().await;
    let envoy = EnvoyProcess::start_example(app.main_addr, upstream.addr).await;
    Stack {
        app,
        envoy,
        _upstream: upstream,
    }
}

impl Stack {
    async fn get_headers(&self, headers: &[(&str, &str)]) -> HttpResponse {
        self.envoy.get("/headers", headers).await
    }

    /// GET /headers with this Authorization header; the status.
    async fn status_with(&self, authorization: &str) -> u16 {
        self.get_headers(&[("authorization", authorization)])
            .await
            .status
    }
}

/// A well-formed key for `id` (valid checksum) with a random secret: only argon2 can tell it is
/// wrong.
fn wrong_key_for(id: i64) -> String {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(34)
        .map(char::from)
        .collect();
    let body = format!("uk{id}_{random}");
    let check = checksum(&body);
    format!("{body}{check}")
}

#[track_caller]
fn assert_challenged(response: &HttpResponse, realm: &str) {
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(
        response.header("www-authenticate"),
        Some(format!("Basic realm=\"{realm}\"").as_str()),
        "{response:?}"
    );
}

/// The headers the upstream received, as `/headers` echoes them.
#[track_caller]
fn upstream_saw(response: &HttpResponse) -> serde_json::Value {
    assert_eq!(response.status, 200, "{response:?}");
    response.json()
}

#[track_caller]
fn assert_key_identity(seen: &serde_json::Value, id: i64, name: &str) {
    // First, so that the messages below never print a key.
    assert!(
        seen.get("authorization").is_none(),
        "the key reached the upstream"
    );
    assert_eq!(seen["x-keygate-key-id"], id.to_string(), "{seen}");
    assert_eq!(seen["x-keygate-key-name"], name, "{seen}");
    assert!(seen.get("x-keygate-user").is_none(), "{seen}");
}

/// The whole life of a key as an HTTP client behind Envoy sees it, from the operator's
/// password before the lockout to keygate going away.
async fn key_lifecycle_through_envoy(backend: TestBackend) {
    let stack = stack(spawn_app(&backend).await).await;
    let (app, envoy) = (&stack.app, &stack.envoy);
    let url = envoy.url("/headers");

    // No credentials: the Basic challenge, as `curl -i` shows it.
    assert_challenged(&curl(&[&url]).await, "keygate");

    // Before the first key the operator's password passes; the upstream learns the user and
    // never a key id the client made up, nor the password.
    let operator = basic(ADMIN_USER, ADMIN_PASSWORD);
    let seen = upstream_saw(
        &stack
            .get_headers(&[("authorization", &operator), ("x-keygate-key-id", "7")])
            .await,
    );
    assert!(seen.get("authorization").is_none(), "the password went up");
    assert_eq!(seen["x-keygate-user"], ADMIN_USER, "{seen}");
    assert!(seen.get("x-keygate-key-id").is_none(), "{seen}");

    // The first key locks username/password out for good.
    let (key, secret) = app.create_key("prometheus scraper").await;
    assert_challenged(
        &stack.get_headers(&[("authorization", &operator)]).await,
        "keygate",
    );

    // The README's curl commands: Basic with an empty user, and Bearer.
    let empty_user = format!(":{secret}");
    let bearer_header = format!("Authorization: Bearer {secret}");
    for args in [["-u", &empty_user, &url], ["-H", &bearer_header, &url]] {
        let seen = upstream_saw(&curl(&args).await);
        assert_key_identity(&seen, key.id, "prometheus scraper");
    }

    // Identity headers a client sends itself do not reach the upstream as sent.
    let seen = upstream_saw(
        &stack
            .get_headers(&[
                ("authorization", &bearer(&secret)),
                ("x-keygate-key-id", "999999"),
                ("x-keygate-key-name", "forged"),
                ("x-keygate-user", "root"),
            ])
            .await,
    );
    assert_key_identity(&seen, key.id, "prometheus scraper");
    // Nor in the spellings that CGI, WSGI and Rack read as the same names (SPEC section 3).
    let seen = upstream_saw(
        &stack
            .get_headers(&[
                ("authorization", &bearer(&secret)),
                ("x_keygate_user", "root"),
                ("X_Keygate_Key_Id", "999"),
                ("x-keygate_key-name", "forged"),
            ])
            .await,
    );
    assert_key_identity(&seen, key.id, "prometheus scraper");
    let smuggled: Vec<_> = seen
        .as_object()
        .expect("a JSON object")
        .keys()
        .filter(|name| name.contains('_'))
        .collect();
    assert!(smuggled.is_empty(), "reached the upstream: {smuggled:?}");

    // A wrong secret for a real id.
    assert_challenged(
        &stack
            .get_headers(&[("authorization", &basic("", &wrong_key_for(key.id)))])
            .await,
        "keygate",
    );

    // The toggle, then deletion.
    app.set_enabled(key.id, false).await;
    assert_eq!(stack.status_with(&bearer(&secret)).await, 401);
    app.set_enabled(key.id, true).await;
    assert_eq!(stack.status_with(&bearer(&secret)).await, 200);
    app.admin
        .clone()
        .delete_key(DeleteKeyRequest { id: key.id })
        .await
        .expect("DeleteKey");
    assert_challenged(
        &stack
            .get_headers(&[("authorization", &bearer(&secret))])
            .await,
        "keygate",
    );

    // keygate gone: Envoy's status_on_error (fail closed), even for a key it had cached.
    let (_, other) = app.create_key("other").await;
    assert_eq!(stack.status_with(&bearer(&other)).await, 200);
    let Stack {
        app,
        envoy,
        _upstream,
    } = stack;
    app.stop().await;
    let response = envoy
        .get("/headers", &[("authorization", &bearer(&other))])
        .await;
    assert_eq!(response.status, 503, "{response:?}");
}

both_backends!(key_lifecycle_through_envoy);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_challenge_names_the_configured_realm() {
    let backend = TestBackend::sqlite();
    let stack =
        stack(spawn_app_with(&backend, |settings| settings.realm = "metrics".into()).await).await;
    assert_challenged(&stack.get_headers(&[]).await, "metrics");
    assert_challenged(
        &stack
            .get_headers(&[("authorization", &basic(ADMIN_USER, "wrong"))])
            .await,
        "metrics",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_refused_from_its_expiry_on() {
    let backend = TestBackend::sqlite();
    let stack = stack(spawn_app(&backend).await).await;
    let (key, secret) = stack
        .app
        .create_key_expiring("short-lived", Some(timestamp_in(3)))
        .await;
    let expires_at = key.expires_at.expect("expires_at");
    let header = bearer(&secret);
    assert_eq!(
        stack.status_with(&header).await,
        200,
        "refused before its expiry"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let response = loop {
        let response = stack.get_headers(&[("authorization", &header)]).await;
        if response.status != 200 {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "an expired key still let through"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = chrono::Utc::now().timestamp();
    assert!(
        now >= expires_at.seconds,
        "refused at {now}, before its expiry at {}",
        expires_at.seconds
    );
    assert_challenged(&response, "keygate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_throttled_but_a_cached_key_still_passes() {
    const BURST: usize = 3;
    let backend = TestBackend::sqlite();
    let app = spawn_app_with(&backend, |settings| {
        settings.rate_limit_burst = BURST as u32;
        // One failure regained per minute: nothing refills during the test.
        settings.rate_limit_per_minute = 1;
    })
    .await;
    let stack = stack(app).await;
    let (key, secret) = stack.app.create_key("good").await;
    let (_, never_used) = stack.app.create_key("never used").await;
    // Verified once, so cached.
    assert_eq!(stack.status_with(&bearer(&secret)).await, 200);

    // Every request comes from 127.0.0.1, one client address for keygate.
    let mut refused = 0;
    let throttled = loop {
        let response = stack
            .get_headers(&[("authorization", &bearer(&wrong_key_for(key.id)))])
            .await;
        if response.status == 429 {
            break response;
        }
        assert_challenged(&response, "keygate");
        refused += 1;
        assert!(refused <= 3 * BURST, "never throttled");
    };
    assert_eq!(refused, BURST, "failures allowed before throttling");
    let retry_after: u64 = throttled
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a Retry-After in seconds: {throttled:?}"));
    assert!((1..=60).contains(&retry_after), "{throttled:?}");
    assert!(throttled.header("www-authenticate").is_none());

    // A verified key costs no argon2 and is never throttled; one not verified yet would.
    assert_eq!(stack.status_with(&bearer(&secret)).await, 200);
    assert_eq!(stack.status_with(&bearer(&never_used)).await, 429);
}

/// Prometheus with `examples/prometheus.yml` and a real key scrapes `/metrics` through Envoy;
/// the same target with a mistyped key is down with a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_through_envoy_with_a_key() {
    const PROTECTED: &str = "keygate-protected-metrics";
    const MISTYPED: &str = "mistyped-key";
    let backend = TestBackend::sqlite();
    let stack = stack(spawn_app(&backend).await).await;
    let (_, secret) = stack.app.create_key("prometheus").await;
    let mut config =
        PrometheusProcess::render_example(stack.envoy.addr, stack.app.metrics_addr, &secret);
    let mut mistyped = secret.clone();
    mistyped.pop();
    mistyped.push(if secret.ends_with('x') { 'y' } else { 'x' });
    assert!(config.ends_with('\n'));
    config.push_str(&format!(
        "\n  - job_name: {MISTYPED}\n    metrics_path: /metrics\n    static_configs:\n      \
         - targets: [\"{}\"]\n    basic_auth:\n      password: {mistyped}\n",
        stack.envoy.addr
    ));
    let prometheus = PrometheusProcess::start(&config).await;

    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let targets = prometheus.active_targets().await;
        let job = |name: &str| {
            targets
                .iter()
                .find(|t| t["labels"]["job"] == name)
                .cloned()
                .unwrap_or_default()
        };
        let (protected, keygate, wrong) = (job(PROTECTED), job("keygate"), job(MISTYPED));
        if protected["health"] == "up"
            && keygate["health"] == "up"
            && wrong["health"] == "down"
            && wrong["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("401"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets not as expected: {targets:#?}\nprometheus log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let up = prometheus.query("up").await;
    let value_of = |job: &str| {
        up.as_array()
            .and_then(|series| series.iter().find(|s| s["metric"]["job"] == job))
            .map(|s| s["value"][1].clone())
    };
    assert_eq!(value_of(PROTECTED), Some("1".into()), "{up}");
    assert_eq!(value_of(MISTYPED), Some("0".into()), "{up}");
    // The upstream's own series came through Envoy.
    let demo = prometheus.query("demo_up").await;
    assert!(
        demo.as_array()
            .is_some_and(|series| series.iter().any(|s| s["metric"]["job"] == PROTECTED)),
        "{demo}"
    );
}
