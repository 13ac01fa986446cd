//! What a keygate process is built from: plain values, already parsed and checked. The command
//! line (`cli::args`) produces them from flags and `KEYGATE_*` variables; tests construct them
//! directly, from `Settings::default()`, so nothing reads the environment behind their back.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use secrecy::SecretString;

use crate::domain::{credentials::TrustedProxies, hashing::HashParams, key::KeyPrefix};

/// The documented defaults, shared by `Settings::default()` and the command line's help
/// (argon2id's are `HashParams::default()`).
pub mod defaults {
    pub const DATABASE_FILE: &str = "keygate.db";
    pub const LISTEN: &str = "0.0.0.0:50051";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:50052";
    pub const METRICS_LISTEN: &str = "127.0.0.1:9464";
    pub const TRUSTED_PROXIES: &str = "127.0.0.0/8,::1";
    pub const MAX_CONNECTIONS: u32 = 4096;
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    pub const IDLE_TIMEOUT_SECS: u64 = 300;
    pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
    pub const KEY_PREFIX: &str = "uk";
    pub const REALM: &str = "keygate";
    pub const ARGON2_MAX_QUEUE: usize = 1024;
    pub const CACHE_CAPACITY: u64 = 100_000;
    pub const REVALIDATE_SECS: u64 = 30;
    pub const RATE_LIMIT_BURST: u32 = 20;
    pub const RATE_LIMIT_PER_MINUTE: u32 = 30;
    pub const SHUTDOWN_GRACE_SECS: u64 = 10;
}

/// The operator created at start-up when the store has no user at all.
#[derive(Debug, Clone)]
pub struct BootstrapOperator {
    pub username: String,
    pub password: SecretString,
}

/// The service's settings (SPEC section 7; README, Configuration, says what each one does).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `postgres://…` or `sqlite://…`.
    pub database_url: String,
    /// argon2id cost of new operator password hashes.
    pub hashing: HashParams,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub bootstrap_operator: Option<BootstrapOperator>,
    pub trusted_proxies: TrustedProxies,
    pub max_connections: u32,
    pub max_streams_per_connection: u32,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_secs: u64,
    pub request_timeout_ms: u64,
    pub key_prefix: KeyPrefix,
    pub realm: String,
    pub strip_authorization: bool,
    pub envoy_allow_metadata: bool,
    pub argon2_workers: usize,
    pub argon2_max_queue: usize,
    pub argon2_nice: i32,
    pub cache_capacity: u64,
    pub revalidate_secs: u64,
    pub rate_limit_burst: u32,
    pub rate_limit_per_minute: u32,
    pub shutdown_delay_secs: u64,
    pub shutdown_grace_secs: u64,
    /// The main and admin listeners' certificate chain and key (TLS only, when both are set).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA of the client certificates the admin listener then requires (mTLS).
    pub admin_tls_client_ca: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        let addr = |text: &str| text.parse().expect("a default address");
        Self {
            database_url: format!("sqlite://{}", defaults::DATABASE_FILE),
            hashing: HashParams::default(),
            listen: addr(defaults::LISTEN),
            admin_listen: addr(defaults::ADMIN_LISTEN),
            metrics_listen: addr(defaults::METRICS_LISTEN),
            bootstrap_operator: None,
            trusted_proxies: TrustedProxies::parse(defaults::TRUSTED_PROXIES)
                .expect("the default trusted proxies"),
            max_connections: defaults::MAX_CONNECTIONS,
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            handshake_timeout_ms: defaults::HANDSHAKE_TIMEOUT_MS,
            idle_timeout_secs: defaults::IDLE_TIMEOUT_SECS,
            request_timeout_ms: defaults::REQUEST_TIMEOUT_MS,
            key_prefix: KeyPrefix::parse(defaults::KEY_PREFIX).expect("the default prefix"),
            realm: defaults::REALM.to_owned(),
            strip_authorization: true,
            envoy_allow_metadata: false,
            argon2_workers: default_argon2_workers(),
            argon2_max_queue: defaults::ARGON2_MAX_QUEUE,
            argon2_nice: 0,
            cache_capacity: defaults::CACHE_CAPACITY,
            revalidate_secs: defaults::REVALIDATE_SECS,
            rate_limit_burst: defaults::RATE_LIMIT_BURST,
            rate_limit_per_minute: defaults::RATE_LIMIT_PER_MINUTE,
            shutdown_delay_secs: 0,
            shutdown_grace_secs: defaults::SHUTDOWN_GRACE_SECS,
            tls_cert: None,
            tls_key: None,
            admin_tls_client_ca: None,
        }
    }
}

impl Settings {
    pub fn revalidate_interval(&self) -> Duration {
        Duration::from_secs(self.revalidate_secs)
    }
}

/// Half the CPUs, at least one: argon2 must leave the other half to the requests it does not
/// concern.
pub fn default_argon2_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() / 2).max(1))
        .unwrap_or(1)
}
