//! keygate-bench: the measuring half of `bench/run.sh`. A gRPC load client (Check or Authorize,
//! N requests in flight over HTTP/2 for a fixed time, RPC/s and latency percentiles) and the
//! scenario drivers that need more than a load (first use, wrong-secret flood, revocation across
//! replicas, start-up time, touching many keys). Every loop is bounded in time and in count, and
//! it talks only to the addresses it is given (the script passes 127.0.0.1 ports).
//!
//! Results go to stdout as one line of `name=value` pairs per measurement; progress to stderr.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::{
    config::core::v3::{Address, SocketAddress, address, socket_address::PortSpecifier},
    service::auth::v3::{AttributeContext, CheckRequest, attribute_context},
};
use keygate::{
    domain::{
        digest::SecretDigest,
        key::{RANDOM_LEN, checksum},
    },
    grpc::proto::{
        AuthorizeRequest, CreateKeyRequest, DenyReason, SetKeyEnabledRequest,
        authorizer_client::AuthorizerClient, key_admin_client::KeyAdminClient,
    },
};
use rand::{Rng, distr::Alphanumeric, seq::SliceRandom};
use tokio::task::JoinSet;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

/// No measurement runs longer than this, whatever the flags say.
const MAX_DURATION: Duration = Duration::from_secs(120);

#[derive(Parser)]
#[command(about = "keygate's benchmark client (driven by bench/run.sh)")]
struct Cli {
    /// Runtime threads for the client (keep it small: the server shares the machine).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop load: `concurrency` calls in flight over `connections` HTTP/2 connections.
    Load(LoadArgs),
    /// Creates a key through KeyAdmin and prints the clear key (for the script's set-up).
    CreateKey(AdminArgs),
    /// CreateKey throughput: `count` keys, `concurrency` calls in flight.
    CreateKeys(CreateKeysArgs),
    /// After a restart: each key of an id range presented once by concurrent callers (first
    /// uses, one store read each), then once more (held in memory), timed alike.
    ColdStart(TouchArgs),
    /// Good-key latency with and without a flood of wrong secrets for real key ids.
    Flood(FloodArgs),
    /// Disable a key on replica A while replica B is under load; time until B denies it.
    Revocation(RevocationArgs),
    /// Inserts keys 1..=count into a Postgres database (migrated first), all sharing one random
    /// part, each with its own digest, and sets the lockout flag; prints the random part.
    BulkKeys(BulkKeysArgs),
    /// Polls grpc.health.v1 until SERVING; prints the time since `--since-unix-ns`.
    WaitServing(WaitArgs),
    /// Authorizes each key of an id range once (to fill the cache).
    Touch(TouchArgs),
    /// Unloaded HTTP latency through several endpoints (Envoys), one request at a time,
    /// alternating between them request by request so the machine's drift hits all alike.
    Alternate(AlternateArgs),
    /// Applies keygate's migrations to a database (for the script's bulk inserts).
    Migrate {
        #[arg(long)]
        database_url: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rpc {
    Check,
    Authorize,
}

/// Which keys the load presents: explicit clear keys, or `uk<id>_<random><checksum>` for a
/// range of ids that all share one random part (bulk-inserted keys).
#[derive(Args, Clone)]
struct KeySet {
    /// A clear key (repeatable); calls cycle through them.
    #[arg(long = "key")]
    keys: Vec<String>,
    /// First and last id (inclusive), with --random.
    #[arg(long, num_args = 2, value_names = ["FIRST", "LAST"])]
    ids: Option<Vec<i64>>,
    /// The random part shared by the keys of --ids.
    #[arg(long)]
    random: Option<String>,
    #[arg(long, default_value = "uk")]
    prefix: String,
}

impl KeySet {
    fn headers(&self) -> Vec<String> {
        let mut keys = self.keys.clone();
        if let (Some(ids), Some(random)) = (&self.ids, &self.random) {
            keys.extend((ids[0]..=ids[1]).map(|id| clear_key(&self.prefix, id, random)));
        }
        assert!(
            !keys.is_empty(),
            "no keys given (--key, or --ids with --random)"
        );
        keys.into_iter()
            .map(|key| format!("Bearer {key}"))
            .collect()
    }
}

fn clear_key(prefix: &str, id: i64, random: &str) -> String {
    let signed = format!("{prefix}{id}_{random}");
    let sum = checksum(&signed);
    format!("{signed}{sum}")
}

fn random_secret() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(RANDOM_LEN)
        .map(char::from)
        .collect()
}

#[derive(Args)]
struct LoadArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value_t = Rpc::Check)]
    rpc: Rpc,
    #[command(flatten)]
    keys: KeySet,
    #[arg(long, default_value_t = 2)]
    connections: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Stop after this many calls even if the duration has not passed.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Printed first on the result line.
    #[arg(long, default_value = "load")]
    label: String,
}

#[derive(Args)]
struct AdminArgs {
    #[arg(long)]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "admin")]
    user: String,
    #[arg(long, env = "KEYGATE_BENCH_PASSWORD")]
    password: String,
    #[arg(long, default_value = "bench")]
    name: String,
}

#[derive(Args)]
struct CreateKeysArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Keys to create (bounded to 100,000).
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[derive(Args)]
struct BulkKeysArgs {
    #[arg(long)]
    database_url: String,
    #[arg(long)]
    count: i64,
    /// Keys with a higher id are inserted disabled.
    #[arg(long)]
    enabled_up_to: Option<i64>,
    /// The random part to share (default: a new one).
    #[arg(long)]
    random: Option<String>,
    #[arg(long, default_value = "uk")]
    prefix: String,
}

#[derive(Args)]
struct FloodArgs {
    #[arg(long)]
    addr: SocketAddr,
    /// The good key, already used once (cached).
    #[arg(long)]
    key: String,
    /// Ids of real keys the flood forges secrets for.
    #[arg(long, num_args = 1.., required = true)]
    flood_ids: Vec<i64>,
    /// Good-key calls in flight, back to back.
    #[arg(long, default_value_t = 2)]
    good_concurrency: usize,
    /// Wrong-secret calls in flight during a flood phase.
    #[arg(long, default_value_t = 64)]
    flood_concurrency: usize,
    #[arg(long, default_value_t = 5.0)]
    phase_secs: f64,
    /// Quiet/flood phase pairs, interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Args)]
struct RevocationArgs {
    /// Replica A's KeyAdmin address (where the key is disabled).
    #[arg(long)]
    a_admin: SocketAddr,
    /// Replica B's main address (where the deny is awaited).
    #[arg(long)]
    b_addr: SocketAddr,
    #[arg(long, default_value = "admin")]
    user: String,
    #[arg(long, env = "KEYGATE_BENCH_PASSWORD")]
    password: String,
    #[arg(long, default_value_t = 100)]
    trials: usize,
    /// Closed-loop Authorize calls in flight on B during the trials (another key).
    #[arg(long, default_value_t = 8)]
    load_concurrency: usize,
}

#[derive(Args)]
struct WaitArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    since_unix_ns: Option<u128>,
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
}

#[derive(Args)]
struct TouchArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[command(flatten)]
    keys: KeySet,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

#[derive(Args)]
struct AlternateArgs {
    /// `name=127.0.0.1:port`, repeatable: the endpoints to compare.
    #[arg(long = "target", value_parser = parse_target, required = true)]
    targets: Vec<(String, SocketAddr)>,
    #[arg(long, default_value = "/metrics")]
    path: String,
    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    key: String,
    /// Requests per endpoint.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Consecutive requests to one endpoint before moving on to the next. 1 interleaves request
    /// by request, so every request finds its chain's caches cooled by the other chains; a
    /// block of tens keeps a chain warm as a lone wrk connection does, while switching every
    /// few tens of milliseconds still spreads the machine's drift over all endpoints alike.
    #[arg(long, default_value_t = 1)]
    block: usize,
    #[arg(long, default_value_t = 60.0)]
    duration_secs: f64,
}

fn parse_target(value: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = value
        .split_once('=')
        .ok_or_else(|| format!("expected name=addr, got {value}"))?;
    Ok((
        name.to_owned(),
        addr.parse().map_err(|e| format!("{addr}: {e}"))?,
    ))
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Load(args) => load(args).await,
            Command::CreateKey(args) => {
                let mut admin = admin_client(&args).await?;
                let (_, clear) = create_key(&mut admin, &args.name).await?;
                println!("{clear}");
                Ok(())
            }
            Command::CreateKeys(args) => create_keys(args).await,
            Command::ColdStart(args) => cold_start(args).await,
            Command::Flood(args) => flood(args).await,
            Command::Revocation(args) => revocation(args).await,
            Command::BulkKeys(args) => bulk_keys(args).await,
            Command::WaitServing(args) => wait_serving(args).await,
            Command::Touch(args) => touch(args).await,
            Command::Alternate(args) => tokio::task::spawn_blocking(move || alternate(args))
                .await
                .map_err(|e| e.to_string())?,
            Command::Migrate { database_url } => keygate::store::connect(&database_url)
                .await
                .map_err(|e| e.to_string())?
                .migrate()
                .await
                .map_err(|e| e.to_string()),
        }
    });
    if let Err(error) = result {
        eprintln!("keygate-bench: {error}");
        std::process::exit(1);
    }
}

type BenchResult = Result<(), String>;

async fn connect(addr: SocketAddr) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

type AddCredentials = Box<dyn FnMut(Request<()>) -> Result<Request<()>, tonic::Status> + Send>;
type Admin =
    KeyAdminClient<tonic::service::interceptor::InterceptedService<Channel, AddCredentials>>;

async fn admin_client_for(addr: SocketAddr, user: &str, password: &str) -> Result<Admin, String> {
    let value: MetadataValue<_> = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
    .parse()
    .map_err(|_| "credentials are not a valid header value".to_owned())?;
    let interceptor: AddCredentials = Box::new(move |mut request: Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
        Ok(request)
    });
    Ok(KeyAdminClient::with_interceptor(
        connect(addr).await?,
        interceptor,
    ))
}

async fn admin_client(args: &AdminArgs) -> Result<Admin, String> {
    admin_client_for(args.admin_addr, &args.user, &args.password).await
}

async fn create_key(admin: &mut Admin, name: &str) -> Result<(i64, String), String> {
    let created = admin
        .create_key(CreateKeyRequest {
            name: name.to_owned(),
            expires_at: None,
        })
        .await
        .map_err(|e| format!("CreateKey: {e}"))?
        .into_inner();
    let id = created
        .key
        .map(|k| k.id)
        .ok_or("CreateKey returned no key")?;
    Ok((id, created.secret))
}

/// A Check request shaped like Envoy's with the example configuration (pseudo-headers plus
/// `authorization`).
fn check_request(header: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "127.0.0.1"),
        (":method", "GET"),
        (":path", "/metrics"),
        (":scheme", "http"),
        ("authorization", header),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let peer = |port| attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".to_owned(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(40000)),
            destination: Some(peer(10000)),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "1".to_owned(),
                    method: "GET".to_owned(),
                    headers,
                    path: "/metrics".to_owned(),
                    host: "127.0.0.1".to_owned(),
                    scheme: "http".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The one field of a Check answer the load needs, `status.code`: prost skips the rest (an
/// allow's identity headers, a deny's HTTP response) without building it. h2load, which the
/// issue suggests, reads no answer at all; decoding every answer in full would charge the
/// larger one (keygate's allow against the no-op's bare OK) to the client, which shares the
/// servers' two cores.
#[derive(Clone, PartialEq, prost::Message)]
struct CheckStatusOnly {
    #[prost(message, optional, tag = "1")]
    status: Option<StatusCodeOnly>,
}

/// `google.rpc.Status`, its code only.
#[derive(Clone, PartialEq, prost::Message)]
struct StatusCodeOnly {
    #[prost(int32, tag = "1")]
    code: i32,
}

/// One call; `Ok(true)` when allowed.
#[derive(Clone)]
enum Caller {
    /// `envoy.service.auth.v3.Authorization/Check`, its answer read as `CheckStatusOnly`.
    Check(tonic::client::Grpc<Channel>),
    Authorize(AuthorizerClient<Channel>),
}

enum Prepared {
    Check(Box<CheckRequest>),
    Authorize(AuthorizeRequest),
}

impl Caller {
    fn new(rpc: Rpc, channel: Channel) -> Self {
        match rpc {
            Rpc::Check => Self::Check(tonic::client::Grpc::new(channel)),
            Rpc::Authorize => Self::Authorize(AuthorizerClient::new(channel)),
        }
    }

    fn prepare(&self, header: &str) -> Prepared {
        match self {
            Self::Check(_) => Prepared::Check(Box::new(check_request(header))),
            Self::Authorize(_) => Prepared::Authorize(AuthorizeRequest {
                authorization: header.into(),
                client_address: "127.0.0.1".to_owned(),
            }),
        }
    }

    async fn call(&mut self, request: &Prepared) -> Result<bool, tonic::Status> {
        match (self, request) {
            (Self::Check(client), Prepared::Check(request)) => {
                client
                    .ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let codec = tonic_prost::ProstCodec::<CheckRequest, CheckStatusOnly>::default();
                let response = client
                    .unary(
                        tonic::Request::new(request.as_ref().clone()),
                        tonic::codegen::http::uri::PathAndQuery::from_static(
                            keygate::grpc::check_server::CHECK_PATH,
                        ),
                        codec,
                    )
                    .await?
                    .into_inner();
                Ok(response.status.is_some_and(|s| s.code == 0))
            }
            (Self::Authorize(client), Prepared::Authorize(request)) => Ok(client
                .authorize(request.clone())
                .await?
                .into_inner()
                .allowed),
            _ => unreachable!("a request prepared for another RPC"),
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    allowed: u64,
    denied: u64,
    errors: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_ns.extend(other.latencies_ns);
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.errors += other.errors;
    }
}

/// Percentile of sorted nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[index] as f64 / 1000.0
}

fn bounded(duration_secs: f64) -> Duration {
    Duration::from_secs_f64(duration_secs.max(0.0)).min(MAX_DURATION)
}

async fn load(args: LoadArgs) -> BenchResult {
    let headers = Arc::new(args.keys.headers());
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(args.addr).await?);
    }
    let duration = bounded(args.duration_secs);
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for worker in 0..args.concurrency.max(1) {
        let mut caller = Caller::new(args.rpc, channels[worker % channels.len()].clone());
        let prepared: Vec<Prepared> = headers.iter().map(|h| caller.prepare(h)).collect();
        let issued = issued.clone();
        let max_requests = args.max_requests;
        tasks.spawn(async move {
            let mut tally = Tally {
                latencies_ns: Vec::with_capacity(1 << 14),
                ..Default::default()
            };
            let mut next = worker;
            loop {
                let now = Instant::now();
                if now >= deadline || issued.fetch_add(1, Ordering::Relaxed) >= max_requests {
                    break;
                }
                let request = &prepared[next % prepared.len()];
                next += 1;
                match caller.call(request).await {
                    Ok(true) => tally.allowed += 1,
                    Ok(false) => tally.denied += 1,
                    Err(_) => tally.errors += 1,
                }
                tally.latencies_ns.push(now.elapsed().as_nanos() as u64);
            }
            tally
        });
    }
    let mut total = Tally::default();
    while let Some(tally) = tasks.join_next().await {
        total.merge(tally.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    total.latencies_ns.sort_unstable();
    let calls = total.latencies_ns.len();
    println!(
        "{} rps={:.0} p50_us={:.1} p99_us={:.1} calls={calls} allowed={} denied={} errors={}",
        args.label,
        calls as f64 / elapsed,
        percentile_us(&total.latencies_ns, 0.50),
        percentile_us(&total.latencies_ns, 0.99),
        total.allowed,
        total.denied,
        total.errors
    );
    if total.denied + total.errors > 0 {
        return Err(format!(
            "{} denied and {} failed calls: the load must use good keys",
            total.denied, total.errors
        ));
    }
    Ok(())
}

async fn authorize_once(
    client: &mut AuthorizerClient<Channel>,
    header: &str,
    client_address: &str,
) -> Result<keygate::grpc::proto::AuthorizeResponse, String> {
    client
        .authorize(AuthorizeRequest {
            authorization: header.into(),
            client_address: client_address.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("Authorize: {e}"))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn create_keys(args: CreateKeysArgs) -> BenchResult {
    let count = args.count.clamp(1, 100_000);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let mut admin = admin_client(&args.admin).await?;
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count || started.elapsed() > MAX_DURATION {
                    return Ok::<_, String>(());
                }
                create_key(&mut admin, &format!("bench-create-{i}")).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    let done = next.load(Ordering::Relaxed).min(count as u64);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "create_keys count={done} concurrency={} secs={secs:.2} rps={:.0}",
        args.concurrency.max(1),
        done as f64 / secs
    );
    Ok(())
}

async fn bulk_keys(args: BulkKeysArgs) -> BenchResult {
    let store = keygate::store::connect(&args.database_url)
        .await
        .map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .map_err(|e| e.to_string())?;
    let random = args.random.clone().unwrap_or_else(random_secret);
    let enabled_up_to = args.enabled_up_to.unwrap_or(i64::MAX);
    let mut first = 1;
    while first <= args.count {
        let last = (first + 9_999).min(args.count);
        let ids: Vec<i64> = (first..=last).collect();
        let digests: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| {
                SecretDigest::of(&clear_key(&args.prefix, *id, &random))
                    .as_bytes()
                    .to_vec()
            })
            .collect();
        // The replication role skips the change-feed triggers: nobody listens yet.
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query(
            "INSERT INTO api_keys (id, name, secret_digest, created_at, enabled, created_by)
             SELECT id, 'bulk-' || id, digest, now(), id <= $3, 'bench'
             FROM UNNEST($1::BIGINT[], $2::BYTEA[]) AS k(id, digest)",
        )
        .bind(&ids)
        .bind(&digests)
        .bind(enabled_up_to)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        first = last + 1;
    }
    for statement in [
        "SELECT setval(pg_get_serial_sequence('api_keys', 'id'), GREATEST((SELECT max(id) FROM api_keys), 1))",
        "UPDATE auth_mode SET api_keys_enabled = TRUE, locked_at = now() WHERE NOT api_keys_enabled",
        "ANALYZE api_keys",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .map_err(|e| e.to_string())?;
    }
    println!("{random}");
    Ok(())
}

/// Each header once, `concurrency` calls in flight: every call's latency (ns), how long the
/// whole pass took, and the calls that failed or were denied.
async fn present_each_once(
    channel: Channel,
    headers: Arc<Vec<String>>,
    concurrency: usize,
) -> Result<(Vec<u64>, Duration, u64), String> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (headers, next) = (headers.clone(), next.clone());
        let mut client = AuthorizerClient::new(channel.clone());
        tasks.spawn(async move {
            let (mut latencies, mut failed) = (Vec::new(), 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= headers.len() || started.elapsed() > MAX_DURATION {
                    return (latencies, failed);
                }
                let sent = Instant::now();
                let answer = authorize_once(&mut client, &headers[i], "127.0.0.1").await;
                latencies.push(sent.elapsed().as_nanos() as u64);
                if !answer.is_ok_and(|answer| answer.allowed) {
                    failed += 1;
                }
            }
        });
    }
    let (mut latencies, mut failed) = (Vec::new(), 0);
    while let Some(joined) = tasks.join_next().await {
        let (l, f) = joined.map_err(|e| e.to_string())?;
        latencies.extend(l);
        failed += f;
    }
    let elapsed = started.elapsed();
    if latencies.len() < headers.len() {
        return Err(format!(
            "presented {} of {} keys within {MAX_DURATION:?}",
            latencies.len(),
            headers.len()
        ));
    }
    latencies.sort_unstable();
    Ok((latencies, elapsed, failed))
}

async fn cold_start(args: TouchArgs) -> BenchResult {
    let headers = Arc::new(args.keys.headers());
    let channel = connect(args.addr).await?;
    let mut figures = Vec::new();
    for pass in ["first", "warm"] {
        let (latencies, elapsed, failed) =
            present_each_once(channel.clone(), headers.clone(), args.concurrency).await?;
        if failed > 0 {
            return Err(format!("{pass} pass: {failed} keys not allowed"));
        }
        let rps = latencies.len() as f64 / elapsed.as_secs_f64();
        figures.push((
            pass,
            rps,
            percentile_us(&latencies, 0.50),
            percentile_us(&latencies, 0.99),
        ));
    }
    let line: Vec<String> = figures
        .iter()
        .map(|(pass, rps, p50, p99)| {
            format!("{pass}_rps={rps:.0} {pass}_p50_us={p50:.0} {pass}_p99_us={p99:.0}")
        })
        .collect();
    println!(
        "cold_start keys={} concurrency={} {} ratio={:.3}",
        headers.len(),
        args.concurrency.max(1),
        line.join(" "),
        figures[0].1 / figures[1].1
    );
    Ok(())
}

/// Good-key calls, `concurrency` in flight back to back (a gateway's steady traffic); the
/// latency of each. Closed loop on purpose: paced calls with idle gaps between them would
/// mostly measure how fast this VM's idle CPUs wake up, not keygate.
async fn good_key_load(
    channel: Channel,
    header: String,
    concurrency: usize,
    duration: Duration,
) -> Result<Vec<u64>, String> {
    let deadline = Instant::now() + duration;
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let mut client = AuthorizerClient::new(channel.clone());
        let request = AuthorizeRequest {
            authorization: header.clone().into(),
            client_address: "127.0.0.1".to_owned(),
        };
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            while Instant::now() < deadline && latencies.len() < 2_000_000 {
                let sent = Instant::now();
                match client.authorize(request.clone()).await {
                    Ok(answer) if answer.get_ref().allowed => {}
                    Ok(_) => return Err("the good key was denied during the flood test".into()),
                    Err(status) => return Err(format!("good-key call failed: {status}")),
                }
                latencies.push(sent.elapsed().as_nanos() as u64);
            }
            Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(joined) = workers.join_next().await {
        latencies.extend(joined.map_err(|e| e.to_string())??);
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// Wrong secrets with valid checksums for real ids, each from its own address (so the failure
/// limiter, which is per address, cannot stop them): every one costs an argon2 run.
async fn wrong_secret_flood(
    channel: Channel,
    ids: Arc<Vec<i64>>,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> (u64, u64, u64) {
    let mut tasks = JoinSet::new();
    let max_calls = 100_000u64;
    for worker in 0..concurrency {
        let mut client = AuthorizerClient::new(channel.clone());
        let ids = ids.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let (mut invalid, mut other, mut errors) = (0u64, 0u64, 0u64);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < max_calls {
                let id = ids[(worker + n as usize) % ids.len()];
                let header = format!("Bearer {}", clear_key("uk", id, &random_secret()));
                let address = format!("10.{}.{}.{}", worker % 250, (n / 250) % 250, n % 250);
                n += 1;
                match client
                    .authorize(AuthorizeRequest {
                        authorization: header.into(),
                        client_address: address,
                    })
                    .await
                {
                    Ok(answer) if answer.get_ref().reason() == DenyReason::InvalidCredentials => {
                        invalid += 1
                    }
                    Ok(_) => other += 1,
                    Err(_) => errors += 1,
                }
            }
            (invalid, other, errors)
        });
    }
    let mut totals = (0, 0, 0);
    while let Some(Ok((invalid, other, errors))) = tasks.join_next().await {
        totals.0 += invalid;
        totals.1 += other;
        totals.2 += errors;
    }
    totals
}

async fn flood(args: FloodArgs) -> BenchResult {
    let good_channel = connect(args.addr).await?;
    let flood_channel = connect(args.addr).await?;
    let header = format!("Bearer {}", args.key);
    let phase = bounded(args.phase_secs);
    let ids = Arc::new(args.flood_ids.clone());
    let (mut quiet_p99, mut flood_p99) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.clamp(1, 10) {
        let quiet = good_key_load(
            good_channel.clone(),
            header.clone(),
            args.good_concurrency,
            phase,
        )
        .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let flooding = tokio::spawn(wrong_secret_flood(
            flood_channel.clone(),
            ids.clone(),
            args.flood_concurrency,
            stop.clone(),
        ));
        // Let the flood fill the argon2 queue before measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let flooded = good_key_load(
            good_channel.clone(),
            header.clone(),
            args.good_concurrency,
            phase,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let (invalid, other, errors) = flooding.await.map_err(|e| e.to_string())?;
        let flooded = flooded?;
        let (q, f) = (percentile_us(&quiet, 0.99), percentile_us(&flooded, 0.99));
        eprintln!(
            "flood round {round}: good p50/p99 quiet {:.0}/{q:.0} µs, flooded {:.0}/{f:.0} µs; \
             flood answers: {invalid} INVALID_CREDENTIALS, {other} other, {errors} errors",
            percentile_us(&quiet, 0.5),
            percentile_us(&flooded, 0.5),
        );
        if other > 0 {
            return Err(format!(
                "{other} flood calls were not denied INVALID_CREDENTIALS"
            ));
        }
        quiet_p99.push(q);
        flood_p99.push(f);
        // Let queued argon2 work drain before the next quiet phase.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "flood quiet_p99_us={:.0} flood_p99_us={:.0} rounds={}",
        median(&mut quiet_p99),
        median(&mut flood_p99),
        args.rounds.clamp(1, 10)
    );
    Ok(())
}

async fn revocation(args: RevocationArgs) -> BenchResult {
    let mut admin = admin_client_for(args.a_admin, &args.user, &args.password).await?;
    let (_, load_key) = create_key(&mut admin, "revocation-load").await?;
    let (trial_id, trial_key) = create_key(&mut admin, "revocation-trial").await?;
    let b = connect(args.b_addr).await?;
    let load_header = format!("Bearer {load_key}");
    let trial_header = format!("Bearer {trial_key}");

    // Background load on B for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let load_calls = Arc::new(AtomicU64::new(0));
    let mut load = JoinSet::new();
    for _ in 0..args.load_concurrency {
        let mut client = AuthorizerClient::new(b.clone());
        let (stop, calls, header) = (stop.clone(), load_calls.clone(), load_header.clone());
        load.spawn(async move {
            let deadline = Instant::now() + MAX_DURATION;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = authorize_once(&mut client, &header, "127.0.0.1").await;
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let mut probe = AuthorizerClient::new(b.clone());
    let overall = Instant::now() + MAX_DURATION;
    let mut delays_ms = Vec::new();
    // How long A took to answer SetKeyEnabled (its commit), per trial.
    let mut acknowledged_ms = Vec::new();
    let mut set_enabled = async |enabled: bool| {
        admin
            .set_key_enabled(SetKeyEnabledRequest {
                id: trial_id,
                enabled,
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("SetKeyEnabled: {e}"))
    };
    for trial in 0..args.trials.clamp(1, 1000) {
        if Instant::now() > overall {
            return Err(format!("only {trial} trials within {MAX_DURATION:?}"));
        }
        // B allows the trial key (from its cache) before each trial.
        let ready = Instant::now();
        while !authorize_once(&mut probe, &trial_header, "127.0.0.1")
            .await?
            .allowed
        {
            if ready.elapsed() > Duration::from_secs(10) {
                return Err(format!("trial {trial}: B never allowed the re-enabled key"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A random offset, so trials do not line up with anything periodic.
        tokio::time::sleep(Duration::from_micros(rand::rng().random_range(0..10_000))).await;

        let mut watcher = AuthorizerClient::new(b.clone());
        let header = trial_header.clone();
        let watching = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let answer = authorize_once(&mut watcher, &header, "127.0.0.1").await?;
                if !answer.allowed {
                    if answer.reason() != DenyReason::KeyDisabled {
                        return Err(format!("B denied with {:?}", answer.reason()));
                    }
                    return Ok(Instant::now());
                }
                if Instant::now() > deadline {
                    return Err("B still allowed the key 10 s after it was disabled".to_owned());
                }
            }
        });
        let disabled_at = Instant::now();
        set_enabled(false).await?;
        let acknowledged_at = Instant::now();
        let denied_at = watching.await.map_err(|e| e.to_string())??;
        acknowledged_ms.push(
            acknowledged_at
                .saturating_duration_since(disabled_at)
                .as_secs_f64()
                * 1e3,
        );
        delays_ms.push(
            denied_at
                .saturating_duration_since(disabled_at)
                .as_secs_f64()
                * 1e3,
        );
        set_enabled(true).await?;
    }
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let mut slowest: Vec<_> = delays_ms.iter().zip(&acknowledged_ms).collect();
    slowest.sort_by(|a, b| b.0.total_cmp(a.0));
    eprintln!(
        "slowest trials (ms to B's deny / ms to A's answer): {}",
        slowest
            .iter()
            .take(10)
            .map(|(d, a)| format!("{d:.1}/{a:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    delays_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| delays_ms[((delays_ms.len() as f64 * q) as usize).min(delays_ms.len() - 1)];
    eprintln!(
        "revocation delays (ms, sorted): {}",
        delays_ms
            .iter()
            .map(|d| format!("{d:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "revocation trials={} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2} load_calls={}",
        delays_ms.len(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        delays_ms[delays_ms.len() - 1],
        load_calls.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn wait_serving(args: WaitArgs) -> BenchResult {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + bounded(args.timeout_secs);
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{}", args.addr))
            .map_err(|e| e.to_string())?
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel);
            while Instant::now() < deadline {
                let status = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status());
                match status {
                    Ok(ServingStatus::Serving) => {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_err(|e| e.to_string())?
                            .as_nanos();
                        match args.since_unix_ns {
                            Some(since) => println!(
                                "serving after_ms={:.1}",
                                now.saturating_sub(since) as f64 / 1e6
                            ),
                            None => println!("serving"),
                        }
                        return Ok(());
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(_) => break,
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("{} never became SERVING", args.addr));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn touch(args: TouchArgs) -> BenchResult {
    let headers = Arc::new(args.keys.headers());
    let channel = connect(args.addr).await?;
    let (latencies, elapsed, _) = present_each_once(channel, headers, args.concurrency).await?;
    println!(
        "touch keys={} secs={:.1}",
        latencies.len(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// One HTTP/1.1 keep-alive connection, blocking: the least client-side noise between the
/// requests that are timed.
struct HttpConnection {
    stream: std::net::TcpStream,
    request: Vec<u8>,
    buffer: Vec<u8>,
}

impl HttpConnection {
    fn open(addr: SocketAddr, path: &str, key: &str) -> Result<Self, String> {
        let stream = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\r\n")
                .into_bytes();
        Ok(Self {
            stream,
            request,
            buffer: Vec::with_capacity(4096),
        })
    }

    /// Sends the request, reads the whole response; returns its status code.
    fn get(&mut self) -> Result<u16, String> {
        use std::io::{Read, Write};
        self.stream
            .write_all(&self.request)
            .map_err(|e| e.to_string())?;
        self.buffer.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let read = self.stream.read(&mut chunk).map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("connection closed mid-response".to_owned());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
            let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or("a response without content-length")?;
            if self.buffer.len() >= end + 4 + length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|code| code.parse().ok())
                    .ok_or("no status line")?;
                return Ok(status);
            }
        }
    }
}

fn alternate(args: AlternateArgs) -> BenchResult {
    let mut connections = args
        .targets
        .iter()
        .map(|(_, addr)| HttpConnection::open(*addr, &args.path, &args.key))
        .collect::<Result<Vec<_>, _>>()?;
    let n = connections.len();
    // Warm-up: every connection once, and caches along each chain.
    for connection in &mut connections {
        for _ in 0..200 {
            connection.get()?;
        }
    }
    let requests = args.requests.min(1_000_000);
    let block = args.block.clamp(1, requests.max(1));
    let mut latencies: Vec<Vec<u64>> = vec![Vec::with_capacity(requests); n];
    let deadline = Instant::now() + bounded(args.duration_secs);
    let mut round = 0;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rng();
    while round * block < requests && Instant::now() < deadline {
        // A fresh order every round: a block's first requests feel what the chain before it
        // left in the caches, so no endpoint may keep the same predecessor. (A fixed cyclic
        // order, rotated per round, kept each endpoint's predecessor in n - 1 of n blocks,
        // which showed as a steady 3 µs between two identical no-op chains.)
        order.shuffle(&mut rng);
        for &target in &order {
            for _ in 0..block {
                let started = Instant::now();
                let status = connections[target].get()?;
                let elapsed = started.elapsed();
                if status != 200 {
                    return Err(format!("{} answered {status}", args.targets[target].0));
                }
                latencies[target].push(elapsed.as_nanos() as u64);
            }
        }
        round += 1;
    }
    let mut line = format!("alternate rounds={round} block={block}");
    for ((name, _), samples) in args.targets.iter().zip(&mut latencies) {
        samples.sort_unstable();
        line.push_str(&format!(
            " {name}_p50_us={:.1} {name}_p90_us={:.1}",
            percentile_us(samples, 0.5),
            percentile_us(samples, 0.9)
        ));
    }
    println!("{line}");
    Ok(())
}
