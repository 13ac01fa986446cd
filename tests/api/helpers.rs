//! The test harness: a real keygate on random ports against a real store (a fresh Postgres
//! database per test from `#[sqlx::test]`, or a SQLite file in a temporary directory), and real
//! tonic clients talking to it over TCP.

// Each feature file uses a different subset of the harness.
#![allow(dead_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use base64::Engine as _;
use keygate::{
    app::Application,
    grpc::proto::{
        self, ApiKey, AuthorizeRequest, AuthorizeResponse, CreateKeyRequest,
        authorizer_client::AuthorizerClient, key_admin_client::KeyAdminClient,
    },
    settings::{BootstrapOperator, Settings},
    store::{DynStore, PostgresStore, SqliteStore},
};
use secrecy::SecretString;
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Request, Status, metadata::MetadataValue, service::interceptor::InterceptedService,
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// Runs one test body against both stores: the cases are written once.
///
/// ```ignore
/// async fn some_case(backend: TestBackend) { ... }
/// both_backends!(some_case);
/// ```
#[macro_export]
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[sqlx::test(migrations = false)]
                async fn $case(pool: sqlx::PgPool) {
                    super::$case($crate::helpers::TestBackend::postgres(pool)).await
                }
            )*
        }
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::helpers::TestBackend::sqlite()).await
                }
            )*
        }
    };
}

/// A database that outlives the apps started on it (so a test can restart keygate).
pub enum TestBackend {
    Postgres(sqlx::PgPool),
    Sqlite(TempDir),
}

impl TestBackend {
    pub fn postgres(pool: sqlx::PgPool) -> Self {
        Self::Postgres(pool)
    }

    pub fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().expect("temporary directory"))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// The URL a separate keygate process (or a second store) would use.
    pub fn url(&self) -> String {
        match self {
            Self::Postgres(pool) => {
                let options = pool.connect_options();
                let base = std::env::var("DATABASE_URL")
                    .expect("DATABASE_URL must name the Postgres server for the tests");
                let database = options.get_database().expect("test database name");
                let server = base
                    .rsplit_once('/')
                    .map(|(server, _)| server)
                    .unwrap_or(&base);
                format!("{server}/{database}")
            }
            Self::Sqlite(dir) => format!("sqlite://{}", self.sqlite_path(dir).display()),
        }
    }

    fn sqlite_path(&self, dir: &TempDir) -> PathBuf {
        dir.path().join("keygate.db")
    }

    pub async fn store(&self) -> DynStore {
        match self {
            Self::Postgres(pool) => Arc::new(PostgresStore::from_pool(pool.clone(), "test".into())),
            Self::Sqlite(_) => Arc::new(
                SqliteStore::connect(&self.url())
                    .await
                    .expect("open the SQLite test database"),
            ),
        }
    }
}

/// Settings for a test server: random loopback ports, the bootstrap operator, production
/// argon2 parameters.
pub fn test_settings() -> Settings {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Settings {
        listen: any_port,
        admin_listen: any_port,
        metrics_listen: any_port,
        bootstrap_operator: Some(BootstrapOperator {
            username: ADMIN_USER.to_owned(),
            password: SecretString::from(ADMIN_PASSWORD.to_owned()),
        }),
        shutdown_grace_secs: 5,
        ..Settings::default()
    }
}

pub struct TestApp {
    pub main_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub authorizer: AuthorizerClient<Channel>,
    pub admin: AdminClient,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

pub type AdminClient = KeyAdminClient<InterceptedService<Channel, BasicAuth>>;

/// Adds `authorization: Basic …` metadata to every call.
#[derive(Clone)]
pub struct BasicAuth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BasicAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

pub async fn spawn_app(backend: &TestBackend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Starts keygate on `backend` with adjusted settings and waits until it reports SERVING.
pub async fn spawn_app_with(backend: &TestBackend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    adjust(&mut settings);
    let app = Application::build_with_store(settings, backend.store().await)
        .await
        .expect("build keygate");
    let (main_addr, admin_addr, metrics_addr) =
        (app.main_addr(), app.admin_addr(), app.metrics_addr());
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        app.run_until_stopped(async move {
            let _ = stopped.await;
        })
        .await
        .expect("keygate stopped cleanly");
    });
    wait_until_serving(admin_addr).await;
    let authorizer = AuthorizerClient::new(channel(main_addr).await);
    let admin = admin_client(admin_addr, Some((ADMIN_USER, ADMIN_PASSWORD))).await;
    TestApp {
        main_addr,
        admin_addr,
        metrics_addr,
        authorizer,
        admin,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to keygate")
}

/// A KeyAdmin client with the given credentials (`None`: no authorization metadata).
pub async fn admin_client(addr: SocketAddr, credentials: Option<(&str, &str)>) -> AdminClient {
    let value = credentials.map(|(user, password)| basic(user, password).parse().unwrap());
    KeyAdminClient::with_interceptor(channel(addr).await, BasicAuth(value))
}

/// A KeyAdmin client sending an arbitrary `authorization` value.
pub async fn admin_client_with_header(addr: SocketAddr, header: &str) -> AdminClient {
    KeyAdminClient::with_interceptor(
        channel(addr).await,
        BasicAuth(Some(header.parse().unwrap())),
    )
}

/// Waits until keygate at `addr` reports SERVING.
pub async fn wait_until_serving(addr: SocketAddr) {
    wait_for(
        &format!("keygate at {addr} SERVING"),
        Duration::from_secs(30),
        || async move { health(addr, "").await == Some(ServingStatus::Serving) },
    )
    .await;
}

/// The health of `service` at `addr`, or `None` when nothing answers.
pub async fn health(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()
        .map(|response| response.into_inner().status())
}

/// Polls `probe` every 50 ms until it returns `Some`; returns the value and how long that
/// took, or `None` once `limit` has passed (a probe still running then is cut off).
pub async fn poll<T, F, Fut>(limit: Duration, mut probe: F) -> Option<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    loop {
        if let Ok(Some(value)) = tokio::time::timeout_at(deadline, probe()).await {
            return Some((value, started.elapsed()));
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `probe` until it returns true; returns how long that took. Fails the test after
/// `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let polled = poll(limit, || {
        let ready = probe();
        async move { ready.await.then_some(()) }
    })
    .await;
    polled
        .unwrap_or_else(|| panic!("{what}: not within {limit:?}"))
        .1
}

/// Polls `probe` until it returns `Some`; returns the value. Fails the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(limit, probe)
        .await
        .unwrap_or_else(|| panic!("{what}: not within {limit:?}"))
        .0
}

/// Asserts the call failed with `code` and a message containing each of `needles`; returns
/// the error.
#[track_caller]
pub fn assert_error<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needles: &[&str],
) -> Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message {:?} should mention {needle:?}",
            status.message()
        );
    }
    status
}

/// The value of a sample in Prometheus text (`name` with its labels, exactly as written), or 0
/// when it is absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

impl TestApp {
    /// Creates a key as the bootstrap operator; returns its record and the clear key.
    pub async fn create_key(&self, name: &str) -> (ApiKey, String) {
        self.create_key_expiring(name, None).await
    }

    pub async fn create_key_expiring(
        &self,
        name: &str,
        expires_at: Option<prost_types::Timestamp>,
    ) -> (ApiKey, String) {
        let created = self
            .admin
            .clone()
            .create_key(CreateKeyRequest {
                name: name.to_owned(),
                expires_at,
            })
            .await
            .expect("CreateKey")
            .into_inner();
        (
            created.key.expect("key in CreateKeyResponse"),
            created.secret,
        )
    }

    /// Calls Authorize with a raw Authorization header value.
    pub async fn authorize(&self, header: &str) -> AuthorizeResponse {
        self.try_authorize(header, "").await.expect("Authorize")
    }

    pub async fn try_authorize(
        &self,
        header: &str,
        client_address: &str,
    ) -> Result<AuthorizeResponse, Status> {
        self.authorizer
            .clone()
            .authorize(AuthorizeRequest {
                authorization: header.into(),
                client_address: client_address.to_owned(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn set_enabled(&self, id: i64, enabled: bool) -> ApiKey {
        self.admin
            .clone()
            .set_key_enabled(proto::SetKeyEnabledRequest { id, enabled })
            .await
            .expect("SetKeyEnabled")
            .into_inner()
    }

    /// Fetches keygate's own /metrics text.
    pub async fn metrics(&self) -> String {
        let response = crate::http::http_get(self.metrics_addr, "/metrics", &[]).await;
        assert_eq!(response.status, 200, "{response:?}");
        response.body
    }

    /// The value of one sample of keygate's own metrics (see `metric_value`).
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        self.stop_in_place().await;
    }

    async fn stop_in_place(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

pub fn timestamp_in(seconds: i64) -> prost_types::Timestamp {
    let at = chrono::Utc::now() + chrono::Duration::seconds(seconds);
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// The path of an external tool the tests drive for real (envoy, grpcurl, prometheus,
/// promtool, wrk, h2load). Looked up in `KEYGATE_TEST_<NAME>`, then `.tools/bin/` (where
/// `scripts/install-test-tools.sh` links them), then PATH. A missing tool fails the test
/// loudly: it is never a silent skip.
pub fn tool(name: &str) -> PathBuf {
    let variable = format!("KEYGATE_TEST_{}", name.to_uppercase().replace('-', "_"));
    if let Ok(path) = std::env::var(&variable) {
        return PathBuf::from(path);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".tools/bin")
        .join(name);
    if local.exists() {
        return local;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    }) {
        return found;
    }
    panic!("the tests need `{name}`: run `bash scripts/install-test-tools.sh` (or set {variable})");
}

/// The release or debug `keygate` binary cargo built for these tests.
pub fn keygate_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keygate"))
}

/// A free TCP port on 127.0.0.1 for a child process that cannot report the port it bound
/// (Envoy, Prometheus) or that is restarted on the same address.
///
/// Drawn at random from below the kernel's ephemeral range, the range `bind(0)` and outgoing
/// connections take ports from: a port given up for a restart is then not handed to another
/// test's connection in the meantime (CI once saw a restarted replica find its port taken that
/// way). The check listener is dropped before returning, and the child binds the port only
/// later, so a port once handed out is never handed out again in this process: CI once saw a
/// bare keygate find the port it was given taken, most likely by another test's draw of it.
pub fn free_port() -> u16 {
    use rand::Rng as _;
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const LOWEST: u16 = 10_000;
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut unused_and_free = |port: u16| {
        !handed_out.contains(&port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && handed_out.insert(port)
    };
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_start > LOWEST + 1_000 {
        let mut rng = rand::rng();
        for _ in 0..1_000 {
            let port = rng.random_range(LOWEST..ephemeral_start);
            if unused_and_free(port) {
                return port;
            }
        }
    }
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port");
        if unused_and_free(port) {
            return port;
        }
    }
}

/// A Check as Envoy sends it, as far as keygate reads it: the `Authorization` header (if any)
/// and, for a direct caller, the source address it claims.
pub fn check_request(
    authorization: &str,
    source: Option<&str>,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    use envoy_types::pb::envoy::{
        config::core::v3::{Address, SocketAddress, address, socket_address::PortSpecifier},
        service::auth::v3::{
            AttributeContext, CheckRequest,
            attribute_context::{HttpRequest, Peer, Request as AttributeRequest},
        },
    };
    let source = source.map(|source| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: source.into(),
                port_specifier: Some(PortSpecifier::PortValue(40000)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    CheckRequest {
        attributes: Some(AttributeContext {
            source,
            request: Some(AttributeRequest {
                http: Some(HttpRequest {
                    headers: [("authorization".to_owned(), authorization.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}
