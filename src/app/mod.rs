//! Wiring: the store, the use cases, three listeners (main, admin, metrics), health, the
//! background tasks, and graceful shutdown.

pub mod listener;
mod metrics_server;
mod readiness;
mod services;
mod store_changes;
mod tls;
mod usage_flush;

use metrics_server::serve_metrics;
use readiness::{readiness, set_every_service};
pub use services::Services;
use store_changes::apply_store_changes;
use tls::ListenerTls;
use usage_flush::flush_usage;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{
    service::Routes,
    transport::{Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    domain::hashing::InvalidHashParams,
    grpc::{
        authorizer::AuthorizerService,
        check_server::AuthorizationServer,
        envoy::{CheckOptions, EnvoyAuthorizationService},
        key_admin::KeyAdminService,
        proto::{authorizer_server::AuthorizerServer, key_admin_server::KeyAdminServer},
        reflection::{ENVOY_AUTHORIZATION_SERVICE, add_reflection, envoy_ext_authz_descriptors},
    },
    settings::Settings,
    store::{self, DynStore, StoreError},
};
use listener::{ConnectionBounds, TrackRequestsLayer, bounded_incoming};

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
    #[error("server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    TlsFile(#[from] crate::pem::PemError),
    #[error("invalid TLS settings for the {listener} listener: {message}")]
    Tls {
        listener: &'static str,
        message: String,
    },
}

/// Request headers an HTTP/2 peer may send at once: gRPC metadata is small, and a credential
/// is at most 4 KiB (SPEC section 3).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// A bound, not yet running keygate. Binding happens in `build`, so tests can ask for port 0
/// and read the real ports before running it.
pub struct Application {
    settings: Settings,
    services: Services,
    tls: ListenerTls,
    main_listener: TcpListener,
    admin_listener: TcpListener,
    metrics_listener: TcpListener,
}

impl Application {
    /// Opens the store the settings name (without waiting for it to answer) and binds.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let store = store::connect(&settings.database_url).await?;
        Self::build_with_store(settings, store).await
    }

    pub async fn build_with_store(
        settings: Settings,
        store: DynStore,
    ) -> Result<Self, StartupError> {
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
        self.run(Box::pin(shutdown)).await
    }

    /// `run_until_stopped` without its type parameter, so that the whole server is compiled
    /// once, here, and not again in every crate that starts one.
    async fn run(
        self,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
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
        let background = BackgroundTasks {
            readiness: tokio::spawn(readiness(
                services.clone(),
                settings.clone(),
                health.clone(),
                stopping.clone(),
            )),
            store_changes: tokio::spawn(apply_store_changes(
                services.clone(),
                settings.revalidate_interval(),
            )),
            usage_flush: tokio::spawn(flush_usage(services.clone(), stopping.clone())),
        };

        let bounds = ConnectionBounds {
            max_connections: settings.max_connections as usize,
            handshake_timeout: Duration::from_millis(settings.handshake_timeout_ms),
            idle_timeout: Duration::from_secs(settings.idle_timeout_secs),
        };
        listener::raise_open_files_limit(settings.max_connections);
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
                        message: crate::telemetry::error_chain(&error),
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
        // request a few allocations. Its decisions are logged with their transport.
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
        background.abort();
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

/// The tasks that run beside the listeners for the life of the process, each in its own
/// module. They stop on `stopping` where they have work to finish, and are aborted once the
/// listeners have drained.
struct BackgroundTasks {
    readiness: JoinHandle<()>,
    store_changes: JoinHandle<()>,
    usage_flush: JoinHandle<()>,
}

impl BackgroundTasks {
    fn abort(&self) {
        self.readiness.abort();
        self.store_changes.abort();
        self.usage_flush.abort();
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a SIGTERM that arrives while the server is still starting (its
/// health may already say SERVING) must stop it gracefully, not kill it.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("install a SIGINT handler");
    async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
}
