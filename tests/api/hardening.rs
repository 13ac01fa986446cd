//! Hostile peers (issue 23, SPEC sections 3 and 7): what one peer can hold on a listener, whose
//! client address is believed, and requests that tonic's own client would never send. Each
//! test drives a real server over real sockets, with HTTP/2 frames written by hand where a
//! well-behaved client library would refuse to misbehave.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response::HttpResponse,
};
use keygate::{
    domain::credentials::TrustedProxies,
    grpc::proto::{
        AuthorizeRequest, CreateKeyRequest, DenyReason, authorizer_client::AuthorizerClient,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

use crate::{
    helpers::{
        ADMIN_PASSWORD, ADMIN_USER, TestApp, TestBackend, admin_client, basic, bearer, channel,
        check_request, spawn_app_with,
    },
    processes::{KeygateProcess, free_addr},
};

const BURST: u32 = 5;
const PER_MINUTE: u32 = 6;

// --- HTTP/2 by hand -------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK header block of literal fields without indexing (no table, no Huffman): every
/// name and value here is shorter than 127 bytes.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// A gRPC call's headers, for `path`.
fn grpc_headers(path: &str) -> Vec<u8> {
    header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

const AUTHORIZE: &str = "/keygate.v1.Authorizer/Authorize";

/// The client's preface and an empty SETTINGS frame.
fn client_preface() -> Vec<u8> {
    [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()
}

/// What a connection's server sent, read by `read_frames`.
#[derive(Debug, Default)]
struct ServerFrames {
    max_concurrent_streams: Option<u32>,
    refused_streams: u64,
    goaway: Option<u32>,
    closed_after: Option<Duration>,
}

/// Reads frames until the server closes the connection (or `limit` passes). A peer that sent
/// the whole preface acknowledges the server's SETTINGS, as a real client does.
async fn read_frames(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    writer: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    settings_seen: tokio::sync::oneshot::Sender<()>,
    acknowledge: bool,
    limit: Duration,
) -> ServerFrames {
    let started = Instant::now();
    let mut seen = ServerFrames::default();
    let mut settings_seen = Some(settings_seen);
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if reader.read_exact(&mut head).await.is_err() {
                return;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0; len];
            if reader.read_exact(&mut payload).await.is_err() {
                return;
            }
            match head[3] {
                SETTINGS if head[4] & ACK == 0 => {
                    for setting in payload.chunks_exact(6) {
                        if u16::from_be_bytes([setting[0], setting[1]])
                            == SETTINGS_MAX_CONCURRENT_STREAMS
                        {
                            seen.max_concurrent_streams = Some(u32::from_be_bytes([
                                setting[2], setting[3], setting[4], setting[5],
                            ]));
                        }
                    }
                    if acknowledge {
                        let _ = writer
                            .lock()
                            .await
                            .write_all(&frame(SETTINGS, ACK, 0, &[]))
                            .await;
                    }
                    if let Some(sender) = settings_seen.take() {
                        let _ = sender.send(());
                    }
                }
                RST_STREAM if payload[..] == REFUSED_STREAM.to_be_bytes() => {
                    seen.refused_streams += 1;
                }
                GOAWAY if payload.len() >= 8 => {
                    seen.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                _ => {}
            }
        }
    };
    if tokio::time::timeout(limit, read).await.is_ok() {
        seen.closed_after = Some(started.elapsed());
    }
    seen
}

/// A connection whose frames `read_frames` reads in the background.
struct RawConnection {
    writer: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    frames: tokio::task::JoinHandle<ServerFrames>,
    settings_seen: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl RawConnection {
    /// Connects and sends `first` (the preface, part of it, or nothing), reading what the
    /// server sends for at most `limit`.
    async fn open(addr: SocketAddr, first: &[u8], limit: Duration) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (reader, mut writer) = stream.into_split();
        writer.write_all(first).await.expect("write");
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let (sender, settings_seen) = tokio::sync::oneshot::channel();
        let acknowledge = first.starts_with(PREFACE);
        let frames = tokio::spawn(read_frames(
            reader,
            writer.clone(),
            sender,
            acknowledge,
            limit,
        ));
        Self {
            writer,
            frames,
            settings_seen: Some(settings_seen),
        }
    }

    async fn wait_for_settings(&mut self) {
        let seen = self.settings_seen.take().expect("once");
        tokio::time::timeout(Duration::from_secs(10), seen)
            .await
            .expect("the server's SETTINGS within 10 s")
            .expect("the server's SETTINGS");
    }

    /// Writes `bytes`; false once the server has closed the connection.
    async fn send(&self, bytes: &[u8]) -> bool {
        self.writer.lock().await.write_all(bytes).await.is_ok()
    }

    async fn finish(self) -> ServerFrames {
        self.frames.await.expect("the reader")
    }
}

// --- keygate as a process, to measure its memory --------------------------------------------

/// `keygate serve` on `url` in `dir` on free loopback ports, once it reports SERVING.
async fn serving_keygate(dir: &std::path::Path, name: &str, url: &str) -> KeygateProcess {
    let mut keygate =
        KeygateProcess::serve(dir, name, url, [free_addr(), free_addr(), free_addr()], &[]);
    keygate.wait_serving().await;
    keygate
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

const MIB: f64 = 1024.0 * 1024.0;
const FLOOD_CONNECTIONS: usize = 8;
const STREAMS_PER_CONNECTION: u32 = 5_000;

/// Tens of thousands of streams opened (headers, never a body) on a few connections: beyond
/// the advertised SETTINGS_MAX_CONCURRENT_STREAMS each is refused, keygate's memory stays
/// bounded and comes back down, and a good key is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_is_refused_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    let mut keygate = serving_keygate(dir.path(), "keygate", &url).await;
    let pid = keygate.process.id();
    let mut admin = admin_client(keygate.admin, Some((ADMIN_USER, ADMIN_PASSWORD))).await;
    let secret = admin
        .create_key(CreateKeyRequest {
            name: "scraper".into(),
            ..Default::default()
        })
        .await
        .expect("CreateKey")
        .into_inner()
        .secret;
    let mut authorizer = AuthorizerClient::new(channel(keygate.main).await);
    let good = AuthorizeRequest {
        authorization: bearer(&secret).into(),
        client_address: "127.0.0.1".into(),
    };
    assert!(
        authorizer
            .authorize(good.clone())
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let baseline = rss_bytes(pid);

    // The good key, every 50 ms, for as long as the flood lasts.
    let flooding = Arc::new(AtomicBool::new(true));
    let good_answers = {
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let (mut allowed, mut other) = (0u32, Vec::new());
            while flooding.load(Ordering::Relaxed) {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    authorizer.authorize(good.clone()),
                )
                .await
                {
                    Ok(Ok(response)) if response.get_ref().allowed => allowed += 1,
                    outcome => other.push(format!("{outcome:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (allowed, other)
        })
    };
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (flooding, peak) = (flooding.clone(), peak.clone());
        tokio::spawn(async move {
            while flooding.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let started = Instant::now();
    let mut connections = Vec::new();
    for _ in 0..FLOOD_CONNECTIONS {
        let mut connection =
            RawConnection::open(keygate.main, &client_preface(), Duration::from_secs(30)).await;
        connection.wait_for_settings().await;
        connections.push(connection);
    }
    let headers = grpc_headers(AUTHORIZE);
    for connection in &connections {
        for batch in (0..STREAMS_PER_CONNECTION).collect::<Vec<_>>().chunks(250) {
            let bytes: Vec<u8> = batch
                .iter()
                .flat_map(|n| frame(HEADERS, END_HEADERS, 2 * n + 1, &headers))
                .collect();
            if !connection.send(&bytes).await {
                break;
            }
        }
    }
    let flood_written = started.elapsed();
    // Held for a while, as an attacker would, then let go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for connection in &connections {
        let _ = connection.writer.lock().await.shutdown().await;
    }
    let mut frames = Vec::new();
    for connection in connections {
        // The server closes a connection whose peer has shut its side.
        frames.push(connection.finish().await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    flooding.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let (allowed, other) = good_answers.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let after = rss_bytes(pid);

    let refused: u64 = frames.iter().map(|seen| seen.refused_streams).sum();
    let goaways = frames.iter().filter(|seen| seen.goaway.is_some()).count();
    eprintln!(
        "stream flood figures: {FLOOD_CONNECTIONS} connections x {STREAMS_PER_CONNECTION} \
         streams written in {flood_written:?}; {refused} refused, {goaways} GOAWAY; RSS \
         {:.1} MiB before, {:.1} MiB peak, {:.1} MiB after; the good key allowed {allowed} \
         times, {} other answers",
        baseline as f64 / MIB,
        peak as f64 / MIB,
        after as f64 / MIB,
        other.len()
    );
    for seen in &frames {
        assert_eq!(seen.max_concurrent_streams, Some(256), "{seen:?}");
    }
    assert!(
        refused + goaways as u64 > 0,
        "streams beyond the bound were neither refused nor the connection closed: {frames:?}"
    );
    assert!(other.is_empty(), "the good key was not allowed: {other:?}");
    assert!(allowed > 0);
    // Before the bound, this flood took keygate from ~60 MB to ~1.8 GB.
    assert!(
        (peak - baseline) as f64 / MIB < 100.0,
        "RSS grew by {:.1} MiB",
        (peak - baseline) as f64 / MIB
    );
    assert!(
        after.saturating_sub(baseline) as f64 / MIB < 50.0,
        "RSS stayed {:.1} MiB above where it was",
        after.saturating_sub(baseline) as f64 / MIB
    );
    keygate.stop().await;
}

// --- connection deadlines -------------------------------------------------------------------

async fn metric(app: &TestApp, sample: &str) -> f64 {
    app.metric(sample).await
}

/// Peers that connect and send nothing, half a preface, an unfinished header block, or pings
/// and never a request are closed at the handshake deadline; one that made a request and then
/// went quiet at the idle timeout. A good key is answered the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_closed_by_their_deadline() {
    const HANDSHAKE: Duration = Duration::from_millis(800);
    const IDLE: Duration = Duration::from_secs(2);
    let backend = TestBackend::sqlite();
    let app = spawn_app_with(&backend, |settings| {
        settings.handshake_timeout_ms = HANDSHAKE.as_millis() as u64;
        settings.idle_timeout_secs = IDLE.as_secs();
    })
    .await;
    let (_, secret) = app.create_key("scraper").await;
    assert!(app.authorize(&bearer(&secret)).await.allowed);

    let limit = Duration::from_secs(15);
    let one_request = [
        client_preface(),
        frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &grpc_headers(AUTHORIZE),
        ),
    ]
    .concat();
    let opened = Instant::now();
    let silent = RawConnection::open(app.main_addr, &[], limit).await;
    let half_preface = RawConnection::open(app.main_addr, &PREFACE[..12], limit).await;
    let mut unfinished = RawConnection::open(app.main_addr, &client_preface(), limit).await;
    // HEADERS without END_HEADERS: a header block that never ends (sent after the SETTINGS
    // acknowledgement, which may not come in the middle of a block).
    unfinished.wait_for_settings().await;
    assert!(
        unfinished
            .send(&frame(HEADERS, 0, 1, &grpc_headers(AUTHORIZE)[..20]))
            .await
    );
    let chatty = RawConnection::open(app.main_addr, &client_preface(), limit).await;
    let after_request = RawConnection::open(app.main_addr, &one_request, limit).await;
    let metrics_silent = RawConnection::open(app.metrics_addr, &[], limit).await;
    let admin_silent = RawConnection::open(app.admin_addr, &[], limit).await;

    // The pinging peer and the good key, until every raw connection has been closed.
    let deadline = Instant::now() + limit;
    let mut allowed = 0;
    while Instant::now() < deadline {
        if !chatty.send(&frame(PING, 0, 0, &[0; 8])).await && opened.elapsed() > HANDSHAKE * 3 {
            break;
        }
        let response = app.authorize(&bearer(&secret)).await;
        assert!(response.allowed, "{response:?}");
        allowed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handshakes = [
        ("silent", silent),
        ("half a preface", half_preface),
        ("an unfinished header block", unfinished),
        ("pings only", chatty),
        ("silent, on the metrics listener", metrics_silent),
        ("silent, on the admin listener", admin_silent),
    ];
    for (what, connection) in handshakes {
        let seen = connection.finish().await;
        let closed = seen
            .closed_after
            .unwrap_or_else(|| panic!("{what}: still open"));
        eprintln!("connection deadline figures: {what} closed after {closed:?}");
        assert!(
            closed >= HANDSHAKE - Duration::from_millis(100),
            "{what}: {closed:?}"
        );
        assert!(
            closed < HANDSHAKE + Duration::from_secs(3),
            "{what}: {closed:?}"
        );
    }
    let seen = after_request.finish().await;
    let closed = seen.closed_after.expect("the idle connection is closed");
    eprintln!("connection deadline figures: idle after a request closed after {closed:?}");
    assert!(closed >= IDLE - Duration::from_millis(100), "{closed:?}");
    assert!(closed < IDLE + Duration::from_secs(3), "{closed:?}");
    assert!(allowed > 0);

    let closed = |listener: &str, reason: &str| {
        format!("keygate_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}")
    };
    assert!(metric(&app, &closed("main", "handshake_timeout")).await >= 4.0);
    assert!(metric(&app, &closed("main", "idle_timeout")).await >= 1.0);
    assert!(metric(&app, &closed("admin", "handshake_timeout")).await >= 1.0);
    assert!(metric(&app, &closed("metrics", "handshake_timeout")).await >= 1.0);
}

/// Beyond `max_connections` a listener closes new connections at once (and counts them), and
/// keeps answering the ones it holds; the admin listener has its own slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_bound_are_refused_and_held_ones_still_answered() {
    const MAX: u32 = 4;
    let backend = TestBackend::sqlite();
    let app = spawn_app_with(&backend, |settings| settings.max_connections = MAX).await;
    let (_, secret) = app.create_key("scraper").await;
    // The test's own client holds one slot.
    assert!(app.authorize(&bearer(&secret)).await.allowed);
    let limit = Duration::from_secs(5);
    let mut held = Vec::new();
    for _ in 1..MAX {
        held.push(RawConnection::open(app.main_addr, &client_preface(), limit).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let extra = RawConnection::open(app.main_addr, &client_preface(), limit).await;
    let seen = extra.finish().await;
    let closed = seen.closed_after.expect("the extra connection is closed");
    assert!(closed < Duration::from_secs(2), "{closed:?}");
    assert!(app.authorize(&bearer(&secret)).await.allowed);
    assert!(metric(&app, "keygate_connections_refused_total{listener=\"main\"}").await >= 1.0);
    assert_eq!(
        metric(&app, "keygate_connections_open{listener=\"main\"}").await,
        f64::from(MAX)
    );
    // The admin listener is not full.
    app.create_key("another").await;

    // A slot given back is a slot for the next peer.
    held.pop().unwrap().frames.abort();
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = RawConnection::open(app.main_addr, &client_preface(), Duration::from_secs(2)).await;
    assert!(
        next.finish().await.closed_after.is_none(),
        "a free slot was refused"
    );
}

// --- whose client address counts -----------------------------------------------------------

fn forged(id: i64, n: usize) -> String {
    let body = format!("uk{id}_{:0>34}", format!("Y{n}"));
    format!("{body}{}", keygate::domain::key::checksum(&body))
}

async fn limited_app(backend: &TestBackend, trusted: &str) -> TestApp {
    let trusted = TrustedProxies::parse(trusted).unwrap();
    spawn_app_with(backend, |settings| {
        settings.rate_limit_burst = BURST;
        settings.rate_limit_per_minute = PER_MINUTE;
        settings.trusted_proxies = trusted;
    })
    .await
}

/// `(INVALID_CREDENTIALS, RATE_LIMITED)` answered to `attempts` forged secrets, the n-th sent
/// with `client_address(n)`.
async fn spray(
    app: &TestApp,
    id: i64,
    attempts: usize,
    client_address: impl Fn(usize) -> String,
) -> (usize, usize) {
    let (mut invalid, mut limited) = (0, 0);
    for n in 0..attempts {
        let response = app
            .try_authorize(&bearer(&forged(id, n)), &client_address(n))
            .await
            .expect("Authorize");
        match response.reason() {
            DenyReason::InvalidCredentials => invalid += 1,
            DenyReason::RateLimited => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    (invalid, limited)
}

/// 30 failures answered as one client's would be: the burst, then RATE_LIMITED.
#[track_caller]
fn assert_one_budget((invalid, limited): (usize, usize)) {
    assert!(invalid <= BURST as usize + 1, "{invalid} failures answered");
    assert!(limited >= 20, "{limited} rate limited");
}

/// A Check as a direct caller (no Envoy) would send it, claiming `source` as the client.
async fn check_status(app: &TestApp, authorization: &str, source: &str) -> u32 {
    let request = check_request(authorization, Some(source));
    let response = AuthorizationClient::new(channel(app.main_addr).await)
        .check(request)
        .await
        .expect("Check")
        .into_inner();
    match response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            denied.status.map_or(0, |status| status.code as u32)
        }
        _ => 200,
    }
}

/// From a caller that is not a trusted proxy, the client address it reports is ignored: a
/// spray that names a new client for every attempt spends the caller's own budget, through
/// Authorize and through a direct Check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_address_from_an_untrusted_caller_is_not_believed() {
    let backend = TestBackend::sqlite();
    // Nobody is trusted: the test's loopback connection is a direct caller.
    let app = limited_app(&backend, "").await;
    let (key, _) = app.create_key("target").await;
    assert_one_budget(spray(&app, key.id, 30, |n| format!("203.0.113.{n}")).await);
    let statuses: Vec<u32> = direct_check_statuses(&app, key.id).await;
    assert!(statuses.iter().all(|status| *status == 429), "{statuses:?}");

    // The same spray through a trusted proxy: every reported client has its own budget.
    let backend = TestBackend::sqlite();
    let app = limited_app(&backend, "127.0.0.0/8,::1").await;
    let (key, _) = app.create_key("target").await;
    let (invalid, limited) = spray(&app, key.id, 30, |n| format!("203.0.113.{n}")).await;
    assert_eq!((invalid, limited), (30, 0));
}

/// Direct Checks with rotating source addresses, after the caller's budget is spent.
async fn direct_check_statuses(app: &TestApp, id: i64) -> Vec<u32> {
    let mut statuses = Vec::new();
    for n in 0..5 {
        statuses
            .push(check_status(app, &bearer(&forged(id, 100 + n)), &format!("192.0.2.{n}")).await);
    }
    statuses
}

/// IPv6 clients share one budget per /64: rotating the interface identifier buys nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_slash_64_is_one_client() {
    let backend = TestBackend::sqlite();
    let app = limited_app(&backend, "127.0.0.0/8,::1").await;
    let (key, _) = app.create_key("target").await;
    assert_one_budget(spray(&app, key.id, 30, |n| format!("2001:db8:7:1::{n:x}")).await);
    // The next /64 is another client.
    let (invalid, _) = spray(&app, key.id, 1, |_| "2001:db8:7:2::1".into()).await;
    assert_eq!(invalid, 1);
}

/// Keys with a valid checksum and ids that do not exist spend the budget like wrong secrets,
/// and once it is spent they no longer reach the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_limited_and_stop_reaching_the_store() {
    let backend = TestBackend::sqlite();
    let app = limited_app(&backend, "127.0.0.0/8,::1").await;
    app.create_key("the lockout").await;
    let misses = "keygate_credential_cache_lookups_total{result=\"miss\"}";
    let before = metric(&app, misses).await;
    let started = Instant::now();
    let (mut invalid, mut limited) = (0, 0);
    for n in 0..40 {
        let response = app
            .try_authorize(&bearer(&forged(1_000_000 + n, 0)), "198.51.100.9")
            .await
            .unwrap();
        match response.reason() {
            DenyReason::InvalidCredentials => invalid += 1,
            DenyReason::RateLimited => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    let reads = metric(&app, misses).await - before;
    let refilled = (started.elapsed().as_secs_f64() * f64::from(PER_MINUTE) / 60.0).ceil();
    let bound = f64::from(BURST) + refilled;
    eprintln!(
        "unknown id figures: 40 unknown ids: {invalid} invalid, {limited} limited, {reads} store reads"
    );
    assert!(f64::from(invalid) <= bound, "{invalid} > {bound}");
    assert!(
        reads <= bound,
        "{reads} store reads for a spent budget (bound {bound})"
    );
    assert!(limited >= 30);
}

// --- operators ------------------------------------------------------------------------------

/// Failed KeyAdmin sign-ins spend a budget per address: past it the answer is still
/// UNAUTHENTICATED, saying so, with no argon2 run. An operator already signed in keeps
/// working, and a key's first use from the same address is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_failed_sign_ins_are_limited_per_address() {
    let backend = TestBackend::sqlite();
    let app = limited_app(&backend, "127.0.0.0/8,::1").await;
    // The operator signs in (and is held as verified) before the guessing starts.
    let (key, secret) = app.create_key("scraper").await;
    let mut guesser = admin_client(app.admin_addr, Some((ADMIN_USER, "not-the-password"))).await;
    let (mut wrong, mut limited) = (0, 0);
    for _ in 0..20 {
        let status = guesser
            .get_key(keygate::grpc::proto::GetKeyRequest { id: key.id })
            .await
            .expect_err("a wrong password");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        if status.message().contains("too many failed sign-ins") {
            limited += 1;
        } else {
            wrong += 1;
        }
    }
    assert!(wrong <= BURST as usize + 1, "{wrong} guesses checked");
    assert!(limited >= 10, "{limited} limited");
    // Other operators' guesses from here do not lock the signed-in operator out.
    app.admin
        .clone()
        .get_key(keygate::grpc::proto::GetKeyRequest { id: key.id })
        .await
        .expect("the operator signed in before");
    // Keys have a budget of their own: the key's first use from the guesser's address.
    let response = app
        .try_authorize(&bearer(&secret), "127.0.0.1")
        .await
        .unwrap();
    assert!(response.allowed, "{response:?}");
}

// --- files ----------------------------------------------------------------------------------

/// The SQLite database holds password hashes: keygate creates its directory 0700 and its
/// files 0600, and warns at start-up about an existing file other users can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new").join("data");
    let db = data.join("keygate.db");
    let url = format!("sqlite://{}", db.display());
    let mut keygate = serving_keygate(dir.path(), "keygate", &url).await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&dir.path().join("new")), 0o700);
    for file in ["keygate.db", "keygate.db-wal", "keygate.db-shm"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    let log = keygate.stop().await;
    assert!(!log.contains("other users have access"), "{log}");

    // Made readable by everyone: keygate still opens it, and says so.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut keygate = serving_keygate(dir.path(), "again", &url).await;
    let log = keygate.stop().await;
    assert!(
        log.contains("other users have access to the database file"),
        "{log}"
    );
    assert_eq!(mode(&db), 0o644, "the operator's choice is kept");
}

// --- requests tonic's client would not send -------------------------------------------------

/// One gRPC call sent with `h2`, the message bytes as they are (`None`: no body at all);
/// the grpc-status and grpc-message of the answer.
async fn h2_call(
    addr: SocketAddr,
    path: &str,
    body: Option<&'static [u8]>,
    authorization: Option<&str>,
) -> (String, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let (response, mut stream) = client
        .send_request(request.body(()).unwrap(), body.is_none())
        .unwrap();
    if let Some(body) = body {
        stream.send_data(body.into(), true).unwrap();
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer within 10 s")
        .expect("a response");
    let (parts, mut body) = response.into_parts();
    let mut status = parts.headers.get("grpc-status").cloned();
    let mut message = parts.headers.get("grpc-message").cloned();
    while let Some(chunk) = body.data().await {
        let _ = chunk;
    }
    if status.is_none()
        && let Ok(Some(trailers)) = body.trailers().await
    {
        status = trailers.get("grpc-status").cloned();
        message = trailers.get("grpc-message").cloned();
    }
    let text = |value: Option<http::HeaderValue>| {
        value
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (text(status), text(message))
}

/// A request with no message, and a message flagged compressed without `grpc-encoding`, are
/// the client's errors (INVALID_ARGUMENT, saying what is wrong) on every RPC, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_requests_are_invalid_arguments() {
    let backend = TestBackend::sqlite();
    let app = limited_app(&backend, "127.0.0.0/8,::1").await;
    let operator = basic(ADMIN_USER, ADMIN_PASSWORD);
    let calls = [
        (app.main_addr, AUTHORIZE, None),
        (
            app.main_addr,
            "/envoy.service.auth.v3.Authorization/Check",
            None,
        ),
        (
            app.admin_addr,
            "/keygate.v1.KeyAdmin/CreateKey",
            Some(operator.as_str()),
        ),
        (
            app.admin_addr,
            "/keygate.v1.KeyAdmin/GetAuthMode",
            Some(operator.as_str()),
        ),
    ];
    // A compressed flag, then a zero length.
    const COMPRESSED: &[u8] = &[1, 0, 0, 0, 0];
    for (addr, path, authorization) in calls {
        for (what, body) in [("no message", None), ("compressed flag", Some(COMPRESSED))] {
            let (status, message) = h2_call(addr, path, body, authorization).await;
            assert_eq!(status, "3", "{path} with {what}: {status} {message}");
            assert!(!message.is_empty(), "{path} with {what}: no message");
        }
    }
}
