//! Wiring: the store, the use cases, three listeners (main, admin, metrics), health, the
//! background tasks, and graceful shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tonic::{
    service::Routes,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    argon_pool::ArgonPool,
    authorizer::{Authorizer, AuthorizerParts},
    cache::{CachedKey, KeyCache},
    config::ServeArgs,
    domain::hashing::{InvalidHashParams, SecretHasher},
    grpc::{
        authorizer::AuthorizerService,
        check_server::AuthorizationServer,
        envoy::{CheckOptions, EnvoyAuthorizationService},
        key_admin::KeyAdminService,
        proto::{authorizer_server::AuthorizerServer, key_admin_server::KeyAdminServer},
        reflection::{ENVOY_AUTHORIZATION_SERVICE, add_reflection, envoy_ext_authz_descriptors},
    },
    keys::KeyManager,
    listener::{BoundedListener, ConnectionBounds, PeerInfo, TrackRequestsLayer, bounded_incoming},
    metrics::Metrics,
    operators::Operators,
    passwords::Passwords,
    rate_limit::{FailureBudget, FailureLimiter},
    store::{self, DynStore, StoreChange, StoreError},
    usage::{FLUSH_INTERVAL, UsageRecorder},
};

const AUTHORIZER_SERVICE: &str = "keygate.v1.Authorizer";
const KEY_ADMIN_SERVICE: &str = "keygate.v1.KeyAdmin";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    HashParams(#[from] InvalidHashParams),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot build server reflection: {0}")]
    Reflection(String),
    #[error("{0}")]
    Config(String),
    #[error("server failed: {0}")]
    Serve(String),
    #[error("cannot read {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    TlsPem {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("invalid TLS settings for the {listener} listener: {message}")]
    Tls {
        listener: &'static str,
        message: String,
    },
}

/// Request headers an HTTP/2 peer may send at once: gRPC metadata is small, and a credential
/// is at most 4 KiB (SPEC section 3).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS of the two gRPC listeners (`None`: plaintext), read and checked at build time.
#[derive(Clone, Default)]
struct ListenerTls {
    main: Option<ServerTlsConfig>,
    admin: Option<ServerTlsConfig>,
}

impl ListenerTls {
    fn load(settings: &ServeArgs) -> Result<Self, StartupError> {
        let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
            return Ok(Self::default());
        };
        // Each file must hold the PEM blocks it is for: the TLS library's own complaint about
        // a wrong file ("peer sent no certificates") would not say which file is wrong.
        let read = |path: &std::path::PathBuf, what: &'static str, marker: &str| {
            let pem = std::fs::read(path).map_err(|source| StartupError::TlsFile {
                path: path.clone(),
                source,
            })?;
            if String::from_utf8_lossy(&pem).contains(marker) {
                Ok(pem)
            } else {
                Err(StartupError::TlsPem {
                    path: path.clone(),
                    what,
                })
            }
        };
        const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";
        const PRIVATE_KEY: &str = "PRIVATE KEY-----";
        let identity = Identity::from_pem(
            read(cert, "certificate", CERTIFICATE)?,
            read(key, "private key", PRIVATE_KEY)?,
        );
        let main = ServerTlsConfig::new()
            .identity(identity)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        let mut admin = main.clone();
        if let Some(ca) = &settings.admin_tls_client_ca {
            admin = admin.client_ca_root(Certificate::from_pem(read(
                ca,
                "CA certificate",
                CERTIFICATE,
            )?));
        }
        // Parse now: a bad certificate, key or CA is a start-up error, not failed handshakes.
        for (listener, config) in [("main", &main), ("admin", &admin)] {
            Server::builder()
                .tls_config(config.clone())
                .map_err(|error| StartupError::Tls {
                    listener,
                    message: crate::cli::error_chain(&error),
                })?;
        }
        Ok(Self {
            main: Some(main),
            admin: Some(admin),
        })
    }
}

/// The use cases and shared state, built once per process.
pub struct Services {
    pub store: DynStore,
    pub cache: Arc<KeyCache>,
    pub authorizer: Arc<Authorizer>,
    pub keys: Arc<KeyManager>,
    pub operators: Arc<Operators>,
    pub usage: Arc<UsageRecorder>,
    pub metrics: Arc<Metrics>,
}

impl Services {
    pub fn build(settings: &ServeArgs, store: DynStore) -> Result<Self, StartupError> {
        let metrics = Metrics::new();
        let hasher = SecretHasher::new(settings.hashing.params())?;
        let argon = ArgonPool::new(
            hasher,
            settings.argon2_workers(),
            settings.argon2_max_queue,
            settings.argon2_nice,
            metrics.clone(),
        );
        // Version-1 keys' first uses get workers of their own: operators' sign-ins (a guesser
        // among them) never queue in front of a key, nor a key's upgrade in front of them.
        let key_argon = ArgonPool::new(
            SecretHasher::new(settings.hashing.params())?,
            settings.argon2_workers(),
            settings.argon2_max_queue,
            settings.argon2_nice,
            metrics.clone(),
        );
        let cache = Arc::new(KeyCache::new(settings.cache_capacity));
        let passwords = Arc::new(Passwords::new(store.clone(), argon));
        let usage = Arc::new(UsageRecorder::default());
        let budget = FailureBudget {
            burst: settings.rate_limit_burst,
            per_minute: settings.rate_limit_per_minute,
        };
        let limiter = FailureLimiter::new(budget);
        let authorizer = Arc::new(Authorizer::new(AuthorizerParts {
            store: store.clone(),
            cache: cache.clone(),
            passwords: passwords.clone(),
            argon: key_argon,
            limiter,
            prefix: settings.key_prefix.clone(),
            usage: usage.clone(),
            metrics: metrics.clone(),
        }));
        let keys = Arc::new(KeyManager::new(
            store.clone(),
            cache.clone(),
            authorizer.clone(),
            settings.key_prefix.clone(),
        ));
        let operators = Arc::new(Operators::new(
            store.clone(),
            passwords,
            FailureLimiter::new(budget),
        ));
        Ok(Self {
            store,
            cache,
            authorizer,
            keys,
            operators,
            usage,
            metrics,
        })
    }
}

/// A bound, not yet running keygate. Binding happens in `build`, so tests can ask for port 0
/// and read the real ports before running it.
pub struct Application {
    settings: ServeArgs,
    services: Services,
    tls: ListenerTls,
    main_listener: TcpListener,
    admin_listener: TcpListener,
    metrics_listener: TcpListener,
}

impl Application {
    /// Opens the store the settings name (without waiting for it to answer) and binds.
    pub async fn build(settings: ServeArgs) -> Result<Self, StartupError> {
        // Settings are checked before the store exists: a failed start-up creates no files.
        settings
            .bootstrap_operator()
            .map_err(StartupError::Config)?;
        let store = store::connect(&settings.database.resolved_url()).await?;
        Self::build_with_store(settings, store).await
    }

    pub async fn build_with_store(
        settings: ServeArgs,
        store: DynStore,
    ) -> Result<Self, StartupError> {
        settings
            .bootstrap_operator()
            .map_err(StartupError::Config)?;
        let tls = ListenerTls::load(&settings)?;
        let services = Services::build(&settings, store)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::Bind { addr, source })
        };
        Ok(Self {
            main_listener: bind(settings.listen).await?,
            admin_listener: bind(settings.admin_listen).await?,
            metrics_listener: bind(settings.metrics_listen).await?,
            settings,
            services,
            tls,
        })
    }

    pub fn main_addr(&self) -> SocketAddr {
        self.main_listener.local_addr().expect("bound listener")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("bound listener")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener.local_addr().expect("bound listener")
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING, waits the configured delay,
    /// stops accepting and lets in-flight RPCs finish (bounded by the grace period).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let Self {
            settings,
            services,
            tls,
            main_listener,
            admin_listener,
            metrics_listener,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        set_every_service(&health, ServingStatus::NotServing).await;
        let envoy_descriptors =
            envoy_ext_authz_descriptors().map_err(|e| StartupError::Reflection(e.to_string()))?;

        let main_routes = Routes::new(AuthorizerServer::new(AuthorizerService::new(
            services.authorizer.clone(),
            settings.trusted_proxies.clone(),
        )))
        .add_service(AuthorizationServer::new(EnvoyAuthorizationService::new(
            services.authorizer.clone(),
            CheckOptions {
                realm: settings.realm.clone(),
                strip_authorization: settings.strip_authorization,
                allow_metadata: settings.envoy_allow_metadata,
                trusted_proxies: settings.trusted_proxies.clone(),
                answer_capacity: usize::try_from(settings.cache_capacity)
                    .expect("the cache capacity fits in memory"),
            },
        )))
        .add_service(health_service.clone());
        let main_routes = add_reflection(
            main_routes,
            &[
                AUTHORIZER_SERVICE,
                ENVOY_AUTHORIZATION_SERVICE,
                HEALTH_SERVICE,
            ],
            Some(&envoy_descriptors),
        )
        .map_err(|e| StartupError::Reflection(e.to_string()))?;

        let admin_routes = Routes::new(KeyAdminServer::new(KeyAdminService::new(
            services.keys.clone(),
            services.operators.clone(),
        )))
        .add_service(health_service);
        let admin_routes = add_reflection(admin_routes, &[KEY_ADMIN_SERVICE, HEALTH_SERVICE], None)
            .map_err(|e| StartupError::Reflection(e.to_string()))?;

        let services = Arc::new(services);
        let (stopping_tx, stopping) = watch::channel(false);
        let mut background = JoinSet::new();
        background.spawn(readiness(
            services.clone(),
            settings.clone(),
            health.clone(),
            stopping.clone(),
        ));
        background.spawn(apply_store_changes(
            services.clone(),
            settings.revalidate_interval(),
        ));
        background.spawn(flush_usage(services.clone(), stopping.clone()));

        let bounds = ConnectionBounds {
            max_connections: settings.max_connections as usize,
            handshake_timeout: Duration::from_millis(settings.handshake_timeout_ms),
            idle_timeout: Duration::from_secs(settings.idle_timeout_secs),
        };
        match crate::listener::raise_open_files_limit() {
            Ok(limit) => {
                tracing::info!(limit, "open files limit");
                // Three listeners, each up to its bound, and the store's connections.
                let wanted = 3 * u64::from(settings.max_connections) + 256;
                if limit < wanted {
                    tracing::warn!(
                        limit,
                        max_connections = settings.max_connections,
                        "the open files limit is below what KEYGATE_MAX_CONNECTIONS allows: \
                         new connections will wait for a free descriptor; raise the hard limit \
                         (LimitNOFILE=, ulimit -Hn) or lower KEYGATE_MAX_CONNECTIONS"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
        }
        tracing::info!(
            store = %services.store.describe(),
            main = %main_listener.local_addr().expect("bound"),
            admin = %admin_listener.local_addr().expect("bound"),
            metrics = %metrics_listener.local_addr().expect("bound"),
            tls = tls.main.is_some(),
            ?bounds,
            admin_client_certificates = settings.admin_tls_client_ca.is_some(),
            "keygate listening"
        );

        let closing = || {
            let mut stopping = stopping.clone();
            async move {
                let _ = stopping.wait_for(|stopped| *stopped).await;
            }
        };
        let grpc_server = |listener: &'static str, tls: Option<ServerTlsConfig>| {
            // (`tcp_nodelay` here would only apply to sockets the server accepted itself; ours
            // come from `bounded_incoming`.) A peer that stops answering pings is dropped.
            let builder = Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .max_concurrent_streams(settings.max_streams_per_connection)
                .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
                .timeout(Duration::from_millis(settings.request_timeout_ms));
            let builder = match tls {
                Some(config) => builder
                    .tls_config(config)
                    .map_err(|error| StartupError::Tls {
                        listener,
                        message: crate::cli::error_chain(&error),
                    })?,
                None => builder,
            };
            Ok::<_, StartupError>(
                builder.layer(
                    tower::ServiceBuilder::new()
                        .layer(TrackRequestsLayer)
                        .layer(tower::util::MapResponseLayer::new(
                            crate::grpc::malformed::unreadable_is_invalid_argument,
                        )),
                ),
            )
        };
        // One span per RPC. On the main port (a call per gateway request) it is debug-level:
        // disabled at the default level, it costs nothing, where an enabled span costs every
        // request a few allocations (bench/). Its decisions are logged with their transport.
        let main_server = tokio::spawn(
            grpc_server("main", tls.main)?
                .trace_fn(|request| tracing::debug_span!("rpc", path = %request.uri().path()))
                .add_routes(main_routes)
                .serve_with_incoming_shutdown(
                    bounded_incoming(main_listener, bounds, services.metrics.listener("main")),
                    closing(),
                ),
        );
        let admin_server = tokio::spawn(
            grpc_server("admin", tls.admin)?
                .trace_fn(|request| tracing::info_span!("rpc", path = %request.uri().path()))
                .add_routes(admin_routes)
                .serve_with_incoming_shutdown(
                    bounded_incoming(admin_listener, bounds, services.metrics.listener("admin")),
                    closing(),
                ),
        );
        let metrics_server = tokio::spawn(serve_metrics(
            metrics_listener,
            bounds,
            services.metrics.clone(),
            closing(),
        ));

        shutdown.await;
        tracing::info!("shutting down: reporting NOT_SERVING");
        set_every_service(&health, ServingStatus::NotServing).await;
        tokio::time::sleep(Duration::from_secs(settings.shutdown_delay_secs)).await;
        let _ = stopping_tx.send(true);
        let grace = Duration::from_secs(settings.shutdown_grace_secs);
        let drained = tokio::time::timeout(grace, async {
            let main = main_server.await;
            let admin = admin_server.await;
            let _ = metrics_server.await;
            (main, admin)
        })
        .await;
        // Last writes of last_used_at.
        services.usage.flush(&services.store).await;
        background.abort_all();
        match drained {
            Ok((Ok(Ok(())), Ok(Ok(())))) => {
                tracing::info!("stopped");
                Ok(())
            }
            Ok((main, admin)) => Err(StartupError::Serve(format!("{main:?} {admin:?}"))),
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "in-flight requests did not finish within the grace period"
                );
                Ok(())
            }
        }
    }
}

/// Reports `status` for the whole server and for each service it can serve.
async fn set_every_service(health: &HealthReporter, status: ServingStatus) {
    for service in [
        "",
        AUTHORIZER_SERVICE,
        ENVOY_AUTHORIZATION_SERVICE,
        KEY_ADMIN_SERVICE,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Migrates (retrying until the database answers), creates the bootstrap user, reports
/// SERVING, then keeps KeyAdmin's health in step with the store's reachability.
async fn readiness(
    services: Arc<Services>,
    settings: ServeArgs,
    health: HealthReporter,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match prepare_store(&services, &settings).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "store not ready");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopping.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    if *stopping.borrow() {
        return;
    }
    set_every_service(&health, ServingStatus::Serving).await;
    tracing::info!(store = %services.store.describe(), "store ready; serving");
    // While the store is unreachable, Authorize keeps answering from its cache, so the process
    // stays SERVING; only KeyAdmin, which needs the store for every call, reports NOT_SERVING.
    let mut store_up = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.changed() => return,
        }
        let up = services.store.ping().await.is_ok();
        if up != store_up && !*stopping.borrow() {
            store_up = up;
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(KEY_ADMIN_SERVICE, status).await;
            if up {
                tracing::info!("store reachable again");
            } else {
                tracing::warn!(
                    "store unreachable: serving Authorize from cache, KeyAdmin NOT_SERVING"
                );
            }
        }
    }
}

async fn prepare_store(services: &Services, settings: &ServeArgs) -> Result<(), StartupError> {
    services.store.migrate().await?;
    if let Ok(Some((user, password))) = settings.bootstrap_operator() {
        match services.operators.bootstrap(user, password).await {
            Ok(true) => tracing::info!(user, "created the bootstrap operator"),
            Ok(false) => {}
            Err(crate::operators::UserAdminError::Store(error)) => return Err(error.into()),
            Err(error) => {
                tracing::error!(%error, "cannot create the bootstrap operator from KEYGATE_ADMIN_USER")
            }
        }
    }
    Ok(())
}

/// How soon a re-validation that failed (the store unreachable) is tried again.
const REVALIDATE_RETRY: Duration = Duration::from_secs(1);

/// Applies other replicas' changes (Postgres LISTEN/NOTIFY) and re-validates every cached key
/// periodically and after the change feed reconnects. A re-validation that fails is retried
/// every `REVALIDATE_RETRY` until one succeeds: the one after a reconnect is what catches up on
/// the notifications the feed missed, so it must not be lost to a store error.
async fn apply_store_changes(services: Arc<Services>, revalidate_every: Duration) {
    let mut changes = services.store.subscribe().await;
    let mut ticker = tokio::time::interval(revalidate_every);
    ticker.tick().await;
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        let change = async {
            match changes.as_mut() {
                Some(feed) => feed.recv().await,
                None => std::future::pending().await,
            }
        };
        let retry = async {
            match failing_since {
                Some(_) => tokio::time::sleep(REVALIDATE_RETRY).await,
                None => std::future::pending().await,
            }
        };
        let revalidation = tokio::select! {
            _ = ticker.tick() => revalidate(&services).await,
            _ = retry => revalidate(&services).await,
            change = change => match change {
                // Counted once applied: a reader of the counter may rely on the change.
                Some(StoreChange::Key(id)) => {
                    services.cache.invalidate_key(id);
                    services.metrics.store_changes.inc();
                    continue;
                }
                Some(StoreChange::AuthMode) => {
                    services.authorizer.note_lockout();
                    services.metrics.store_changes.inc();
                    continue;
                }
                Some(StoreChange::Resync) => revalidate(&services).await,
                None => {
                    changes = None;
                    continue;
                }
            },
        };
        match (revalidation, failing_since) {
            (Ok(()), Some(since)) => {
                tracing::info!(failed_for = ?since.elapsed(), "re-validated the cached keys");
                failing_since = None;
            }
            (Ok(()), None) => {}
            (Err(error), None) => {
                tracing::warn!(%error, retry_in = ?REVALIDATE_RETRY, "cannot re-validate cached keys; keeping them");
                failing_since = Some(tokio::time::Instant::now());
            }
            (Err(error), Some(_)) => {
                tracing::debug!(%error, "cannot re-validate cached keys yet")
            }
        }
    }
}

/// Compares every cached key with the store and drops the entries that changed. On a store
/// error the entries stay: while the database is down nobody can change a key anyway.
async fn revalidate(services: &Services) -> Result<(), StoreError> {
    let ids = services.cache.cached_key_ids();
    for chunk in ids.chunks(1000) {
        let current = services.store.get_keys(chunk).await?;
        for id in chunk {
            let fresh = current.iter().find(|record| record.id == *id);
            let Some(entry) = services.cache.key(*id) else {
                continue;
            };
            let unchanged = match (&*entry, fresh) {
                (CachedKey::Known(cached), Some(fresh)) => {
                    cached.record.enabled == fresh.enabled
                        && cached.record.expires_at == fresh.expires_at
                        && cached.record.name == fresh.name
                        && cached.record.secret == fresh.secret
                }
                (CachedKey::Unknown { .. }, None) => true,
                _ => false,
            };
            if !unchanged {
                tracing::info!(id, "cached key changed without a notification; dropping it");
                services.cache.invalidate_key(*id);
            }
        }
    }
    Ok(())
}

async fn flush_usage(services: Arc<Services>, mut stopping: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
            _ = stopping.changed() => return,
        }
        if services.usage.flush(&services.store).await {
            services.metrics.usage_flushes.inc();
        }
    }
}

async fn serve_metrics(
    listener: TcpListener,
    bounds: ConnectionBounds,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener_metrics = metrics.listener("metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    let app = app.layer(TrackRequestsLayer);
    axum::serve(
        BoundedListener::new(listener, bounds, listener_metrics)?,
        app.into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
