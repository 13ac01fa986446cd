//! The command line: every setting is a flag with a matching `KEYGATE_*` variable. Values are
//! parsed here, so a bad one is a clear start-up error, never a silent default; `ServeArgs`
//! then becomes the plain `Settings` the service is built from.

use std::{net::SocketAddr, path::PathBuf};

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

use crate::{
    domain::{credentials::TrustedProxies, hashing::HashParams, key::KeyPrefix},
    settings::{BootstrapOperator, Settings, default_argon2_workers, defaults},
    telemetry::LogFormat,
};

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key authorization for Envoy ext_authz and gRPC gateways",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `keygate` with no subcommand is `keygate serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve(Box<ServeArgs>),
    /// Manage operator accounts directly in the database.
    #[command(subcommand)]
    User(UserCommand),
    /// KeyAdmin client: manage API keys on a running keygate.
    Keys(KeysArgs),
    /// Exit 0 when the server at --addr reports SERVING over grpc.health.v1 (for containers).
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from stdin (or prompted for on a terminal).
    Add(UserArgs),
    /// Change a user's password; read from stdin (or prompted for on a terminal).
    Passwd(UserArgs),
}

#[derive(Debug, Args)]
pub struct UserArgs {
    pub name: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub hashing: HashingArgs,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// How a client command reaches a keygate whose listener has TLS (an `https://` address).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate that signed keygate's certificate (needed for an https:// address).
    #[arg(long, env = "KEYGATE_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for an admin listener that requires one (mTLS).
    #[arg(
        long,
        env = "KEYGATE_CLIENT_CERT",
        requires = "client_key",
        global = true
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        env = "KEYGATE_CLIENT_KEY",
        requires = "client_cert",
        global = true
    )]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `postgres://…` or `sqlite://…`. Falls back to DATABASE_URL, then to
    /// `sqlite://keygate.db` in --data-dir.
    #[arg(long, env = "KEYGATE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the default SQLite database lives.
    #[arg(long, env = "KEYGATE_DATA_DIR", default_value = ".")]
    pub data_dir: PathBuf,
}

impl DatabaseArgs {
    /// The URL to open: the flag or KEYGATE_DATABASE_URL, else DATABASE_URL, else the embedded
    /// SQLite file.
    pub fn resolved_url(&self) -> String {
        self.database_url
            .clone()
            .filter(|url| !url.is_empty())
            .or_else(|| {
                std::env::var("DATABASE_URL")
                    .ok()
                    .filter(|url| !url.is_empty())
            })
            .unwrap_or_else(|| {
                let file = self.data_dir.join(defaults::DATABASE_FILE);
                format!("sqlite://{}", file.display())
            })
    }
}

#[derive(Debug, Clone, Args)]
pub struct HashingArgs {
    /// argon2id memory cost of new hashes, in KiB (OWASP recommends 19456 with 2 iterations;
    /// 7168 with 5 iterations is its smallest configuration, and the smallest accepted).
    #[arg(long, env = "KEYGATE_ARGON2_MEMORY_KIB", default_value_t = HashParams::default().memory_kib, value_parser = clap::value_parser!(u32).range(7168..))]
    pub argon2_memory_kib: u32,
    /// argon2id iterations of new hashes.
    #[arg(long, env = "KEYGATE_ARGON2_ITERATIONS", default_value_t = HashParams::default().iterations, value_parser = clap::value_parser!(u32).range(1..))]
    pub argon2_iterations: u32,
    /// argon2id lanes of new hashes.
    #[arg(long, env = "KEYGATE_ARGON2_PARALLELISM", default_value_t = HashParams::default().parallelism, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub argon2_parallelism: u32,
}

impl HashingArgs {
    pub fn params(&self) -> HashParams {
        HashParams {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub hashing: HashingArgs,
    /// Authorizer, Envoy Check, health and reflection.
    #[arg(long, env = "KEYGATE_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// KeyAdmin, health and reflection.
    #[arg(long, env = "KEYGATE_ADMIN_LISTEN", default_value = defaults::ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// keygate's own Prometheus metrics, `GET /metrics`.
    #[arg(long, env = "KEYGATE_METRICS_LISTEN", default_value = defaults::METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// Created at start-up when the store has no user at all, with the password of
    /// KEYGATE_ADMIN_PASSWORD or --admin-password-file.
    #[arg(long, env = "KEYGATE_ADMIN_USER")]
    pub admin_user: Option<String>,
    /// A file whose first line is --admin-user's password. (There is no flag for the password
    /// itself: every local user can read a process's command line.)
    #[arg(long, env = "KEYGATE_ADMIN_PASSWORD_FILE", value_name = "FILE", value_parser = read_password_file)]
    pub admin_password_file: Option<SecretString>,
    /// KEYGATE_ADMIN_PASSWORD, read from the environment only.
    #[arg(skip = password_from_env())]
    pub admin_password: Option<SecretString>,
    /// Peers whose report of the client address (Authorize's `client_address`, Check's source
    /// address) is believed; from any other peer, the peer itself is the client.
    #[arg(long, env = "KEYGATE_TRUSTED_PROXIES", default_value = defaults::TRUSTED_PROXIES, value_parser = TrustedProxies::parse)]
    pub trusted_proxies: TrustedProxies,
    /// Open connections each listener holds; a peer connecting beyond it is disconnected at
    /// once.
    #[arg(long, env = "KEYGATE_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Concurrent requests (HTTP/2 streams) per connection; a gateway opens another connection
    /// beyond it.
    #[arg(long, env = "KEYGATE_MAX_STREAMS_PER_CONNECTION", default_value_t = defaults::MAX_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Milliseconds a new connection has to send its first complete request (TLS and HTTP/2
    /// handshakes included) before it is closed.
    #[arg(long, env = "KEYGATE_HANDSHAKE_TIMEOUT_MS", default_value_t = defaults::HANDSHAKE_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_ms: u64,
    /// Seconds a connection may go without a request before it is closed.
    #[arg(long, env = "KEYGATE_IDLE_TIMEOUT_SECS", default_value_t = defaults::IDLE_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,
    /// Milliseconds one request may take, its body included, before it fails with
    /// DEADLINE_EXCEEDED and its stream is released.
    #[arg(long, env = "KEYGATE_REQUEST_TIMEOUT_MS", default_value_t = defaults::REQUEST_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// Prefix of new API keys (and of the keys accepted).
    #[arg(long, env = "KEYGATE_KEY_PREFIX", default_value = defaults::KEY_PREFIX, value_parser = KeyPrefix::parse)]
    pub key_prefix: KeyPrefix,
    /// Realm of the `WWW-Authenticate: Basic` challenge sent through Envoy.
    #[arg(long, env = "KEYGATE_REALM", default_value = defaults::REALM)]
    pub realm: String,
    /// Remove the Authorization header from requests Envoy lets through.
    #[arg(long, env = "KEYGATE_STRIP_AUTHORIZATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub strip_authorization: bool,
    /// Also put allows in Envoy's dynamic metadata (`decision`, `key_id`, `key_name` or `user`);
    /// denies always carry their `decision`.
    #[arg(long, env = "KEYGATE_ENVOY_ALLOW_METADATA", default_value_t = false, action = clap::ArgAction::Set)]
    pub envoy_allow_metadata: bool,
    /// Threads that run argon2 (default: half the CPUs, at least one).
    #[arg(long, env = "KEYGATE_ARGON2_WORKERS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub argon2_workers: Option<u32>,
    /// argon2 jobs allowed to wait; beyond this a request gets UNAVAILABLE instead of queueing.
    #[arg(long, env = "KEYGATE_ARGON2_MAX_QUEUE", default_value_t = defaults::ARGON2_MAX_QUEUE)]
    pub argon2_max_queue: usize,
    /// Lower the argon2 threads' scheduling priority by this much (Linux nice, 0..=19): keeps
    /// cached keys fast under a flood of wrong secrets, but slows first uses on a busy CPU.
    #[arg(long, env = "KEYGATE_ARGON2_NICE", default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub argon2_nice: i32,
    /// Keys held in the verified-credential cache.
    #[arg(long, env = "KEYGATE_CACHE_CAPACITY", default_value_t = defaults::CACHE_CAPACITY, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_capacity: u64,
    /// Seconds between re-validations of every cached key against the store (bounds
    /// staleness when a change notification is missed).
    #[arg(long, env = "KEYGATE_REVALIDATE_SECS", default_value_t = defaults::REVALIDATE_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub revalidate_secs: u64,
    /// Failed verifications a client address may make in a burst before RATE_LIMITED.
    #[arg(long, env = "KEYGATE_RATE_LIMIT_BURST", default_value_t = defaults::RATE_LIMIT_BURST)]
    pub rate_limit_burst: u32,
    /// Failed verifications per minute a client address regains; 0 disables the limiter.
    #[arg(long, env = "KEYGATE_RATE_LIMIT_PER_MINUTE", default_value_t = defaults::RATE_LIMIT_PER_MINUTE)]
    pub rate_limit_per_minute: u32,
    /// On SIGTERM, seconds to report NOT_SERVING before closing listeners, so load balancers
    /// stop sending new requests first.
    #[arg(long, env = "KEYGATE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,
    /// On SIGTERM, seconds in-flight RPCs get to finish.
    #[arg(long, env = "KEYGATE_SHUTDOWN_GRACE_SECS", default_value_t = defaults::SHUTDOWN_GRACE_SECS)]
    pub shutdown_grace_secs: u64,
    /// PEM certificate chain: the main and admin listeners then speak TLS only (with
    /// --tls-key). The metrics listener stays plain HTTP.
    #[arg(long, env = "KEYGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "KEYGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): the admin listener then requires a client certificate signed by
    /// one of them (mTLS). Needs --tls-cert.
    #[arg(long, env = "KEYGATE_ADMIN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub admin_tls_client_ca: Option<PathBuf>,
}

impl ServeArgs {
    /// The settings these arguments name. Fails when only one half of the bootstrap operator
    /// is given.
    pub fn into_settings(self) -> Result<Settings, String> {
        let password = self.admin_password_file.or(self.admin_password);
        let bootstrap_operator = match (self.admin_user, password) {
            (Some(username), Some(password)) => Some(BootstrapOperator { username, password }),
            (None, None) => None,
            (Some(_), None) => {
                return Err("KEYGATE_ADMIN_USER needs KEYGATE_ADMIN_PASSWORD or \
                            --admin-password-file"
                    .into());
            }
            (None, Some(_)) => return Err("a bootstrap password needs KEYGATE_ADMIN_USER".into()),
        };
        Ok(Settings {
            database_url: self.database.resolved_url(),
            hashing: self.hashing.params(),
            listen: self.listen,
            admin_listen: self.admin_listen,
            metrics_listen: self.metrics_listen,
            bootstrap_operator,
            trusted_proxies: self.trusted_proxies,
            max_connections: self.max_connections,
            max_streams_per_connection: self.max_streams_per_connection,
            handshake_timeout_ms: self.handshake_timeout_ms,
            idle_timeout_secs: self.idle_timeout_secs,
            request_timeout_ms: self.request_timeout_ms,
            key_prefix: self.key_prefix,
            realm: self.realm,
            strip_authorization: self.strip_authorization,
            envoy_allow_metadata: self.envoy_allow_metadata,
            argon2_workers: self
                .argon2_workers
                .map_or_else(default_argon2_workers, |n| n as usize),
            argon2_max_queue: self.argon2_max_queue,
            argon2_nice: self.argon2_nice,
            cache_capacity: self.cache_capacity,
            revalidate_secs: self.revalidate_secs,
            rate_limit_burst: self.rate_limit_burst,
            rate_limit_per_minute: self.rate_limit_per_minute,
            shutdown_delay_secs: self.shutdown_delay_secs,
            shutdown_grace_secs: self.shutdown_grace_secs,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            admin_tls_client_ca: self.admin_tls_client_ca,
        })
    }
}

fn password_from_env() -> Option<SecretString> {
    std::env::var("KEYGATE_ADMIN_PASSWORD")
        .ok()
        .filter(|password| !password.is_empty())
        .map(SecretString::from)
}

fn read_password_file(path: &str) -> Result<SecretString, String> {
    let text =
        std::fs::read_to_string(path).map_err(|error| format!("cannot read {path}: {error}"))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(format!("{path} holds no password on its first line"));
    }
    Ok(SecretString::from(password.to_owned()))
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// KeyAdmin endpoint.
    #[arg(
        long,
        env = "KEYGATE_ADMIN_ADDR",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    pub admin_addr: String,
    /// Operator username; the password comes from KEYGATE_PASSWORD or a prompt.
    #[arg(long, env = "KEYGATE_USER", default_value = "admin", global = true)]
    pub user: String,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the clear key once.
    Create {
        #[arg(long)]
        name: String,
        /// RFC 3339, e.g. 2027-01-01T00:00:00Z; omit for a key that never expires.
        #[arg(long, value_parser = parse_rfc3339)]
        expires_at: Option<DateTime<Utc>>,
    },
    /// List every key, expired ones included.
    List,
    Get {
        id: i64,
    },
    Enable {
        id: i64,
    },
    Disable {
        id: i64,
    },
    Delete {
        id: i64,
    },
    /// Whether basic auth is locked out (API keys only) and since when.
    AuthMode,
}

fn parse_rfc3339(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e}); example: 2027-01-01T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_errors() {
        for args in [
            vec!["keygate", "--listen", "nowhere"],
            vec!["keygate", "--key-prefix", "a b"],
            vec!["keygate", "--log-format", "xml"],
            vec!["keygate", "--cache-capacity", "0"],
            vec!["keygate", "--admin-password", "hunter2hunter2"],
            vec!["keygate", "--admin-password-file", "/nonexistent/password"],
            vec!["keygate", "--argon2-memory-kib", "8"],
            vec!["keygate", "--trusted-proxies", "10.0.0.0/8,nowhere"],
            vec!["keygate", "--max-connections", "0"],
            vec!["keygate", "--tls-cert", "cert.pem"],
            vec!["keygate", "--tls-key", "key.pem"],
            vec!["keygate", "--admin-tls-client-ca", "ca.pem"],
            vec!["keygate", "keys", "--client-cert", "c.pem", "list"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?} parsed");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn client_tls_options_go_before_or_after_the_keys_subcommand() {
        for args in [
            vec!["keygate", "keys", "--ca-cert", "ca.pem", "list"],
            vec!["keygate", "keys", "list", "--ca-cert", "ca.pem"],
        ] {
            let cli = Cli::try_parse_from(&args).unwrap();
            let Some(Command::Keys(keys)) = cli.command else {
                panic!("{args:?}")
            };
            assert_eq!(keys.tls.ca_cert, Some(PathBuf::from("ca.pem")));
        }
    }

    #[test]
    fn no_subcommand_means_serve_with_flags() {
        let cli = Cli::try_parse_from(["keygate", "--listen", "127.0.0.1:1"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.port(), 1);
        let cli = Cli::try_parse_from(["keygate", "serve", "--realm", "r"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(ref s)) if s.realm == "r"));
    }

    #[test]
    fn the_bootstrap_password_comes_from_a_file_and_stays_out_of_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "hunter2hunter2\nignored\n").unwrap();
        let cli = Cli::try_parse_from([
            "keygate",
            "--admin-user",
            "admin",
            "--admin-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert!(!format!("{cli:?}").contains("hunter2"));
        let settings = cli.serve.into_settings().unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
        let operator = settings.bootstrap_operator.unwrap();
        assert_eq!(operator.username, "admin");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&operator.password),
            "hunter2hunter2"
        );
        let alone = Cli::try_parse_from(["keygate", "--admin-user", "admin"]).unwrap();
        if alone.serve.admin_password.is_none() {
            assert!(alone.serve.into_settings().is_err());
        }
    }
}
