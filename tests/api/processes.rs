//! Real child processes for the end-to-end tests: Envoy with `examples/envoy.yaml`, Prometheus
//! with `examples/prometheus.yml`, and the `demo-upstream` binary behind Envoy; plus a minimal
//! HTTP/1.1 client to talk to them. Each process is killed (and reaped) when its guard drops,
//! so a failing test leaves nothing running. The configs are the example files themselves,
//! rewritten textually (hostnames and ports as whole words), so the examples stay tested.

// Each feature file uses a different subset of the harness.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

use crate::helpers::{free_port, tool};

/// How long a child process gets to come up on a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts to start a process that must be given a port up front (a race on the port is
/// possible, see `helpers::free_port`).
const START_ATTEMPTS: usize = 3;

/// The text of `examples/<name>`.
pub fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Replaces `word` by `replacement` where it stands as a whole word (not inside a longer run of
/// letters, digits or `_`, so `upstream` leaves `upstreams` alone), and insists that it occurs
/// exactly once: a test must notice when the example it renders changes shape.
pub fn replace_word(text: &str, word: &str, replacement: &str) -> String {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let hits: Vec<usize> = text
        .match_indices(word)
        .map(|(at, _)| at)
        .filter(|&at| {
            !is_word(text[..at].chars().next_back())
                && !is_word(text[at + word.len()..].chars().next())
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "`{word}` should appear exactly once as a whole word in the template"
    );
    let at = hits[0];
    format!("{}{replacement}{}", &text[..at], &text[at + word.len()..])
}

/// A child process that is killed and reaped on drop; its stdout and stderr go to a log file
/// that failure messages quote.
pub struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create the log file");
        let err = out.try_clone().expect("clone the log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { name, child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(description)` once the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status}):\n{}", self.name, self.log())),
            Ok(None) => None,
            Err(e) => Some(format!("{}: wait failed: {e}", self.name)),
        }
    }

    /// Panics with the process log if it died or `deadline` passed.
    fn still_starting(&mut self, deadline: Instant, what: &str) {
        if let Some(exit) = self.exited() {
            panic!("{what}: {exit}");
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} not ready after {START_TIMEOUT:?}; log:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repo's `demo-upstream` binary on a random loopback port: `/metrics` and `/headers`.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    _process: ChildGuard,
    _dir: TempDir,
}

impl DemoUpstream {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut command = Command::new(env!("CARGO_BIN_EXE_demo-upstream"));
        command
            .env_remove("DEMO_UPSTREAM_LISTEN")
            .args(["--listen", "127.0.0.1:0"]);
        let mut process = ChildGuard::spawn("demo-upstream", command, dir.path().join("log"));
        // It binds port 0 and prints the address it got: no port race.
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = loop {
            // Whole lines only: stderr is unbuffered, a line may arrive in pieces.
            if let Some(addr) = process
                .log()
                .split_inclusive('\n')
                .filter_map(|line| line.strip_suffix('\n'))
                .find_map(|line| line.strip_prefix("demo-upstream listening on "))
            {
                break addr.trim().parse().expect("demo-upstream's address");
            }
            process.still_starting(deadline, "demo-upstream");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            addr,
            _process: process,
            _dir: dir,
        }
    }
}

/// A real Envoy. Started with the flags the README gives (`--disable-hot-restart`, so parallel
/// tests share no shared memory, `-l warning`, `--concurrency 1`) plus `--admin-address-path`:
/// the listener and the admin interface bind port 0 and the test asks Envoy what it got.
pub struct EnvoyProcess {
    /// The HTTP listener clients talk to.
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    process: ChildGuard,
    _dir: TempDir,
}

impl EnvoyProcess {
    /// `examples/envoy.yaml` pointed at keygate's Check on `authorizer` and at `upstream`.
    pub fn render_example(authorizer: SocketAddr, upstream: SocketAddr) -> String {
        let text = example("envoy.yaml");
        let text = replace_word(&text, "keygate", &authorizer.ip().to_string());
        let text = replace_word(&text, "50051", &authorizer.port().to_string());
        let text = replace_word(&text, "upstream", &upstream.ip().to_string());
        let text = replace_word(&text, "8080", &upstream.port().to_string());
        // Loopback only, and ports Envoy picks itself.
        let text = replace_word(&text, "0.0.0.0", "127.0.0.1");
        let text = replace_word(&text, "10000", "0");
        let text = replace_word(&text, "9901", "0");
        // The example's 0.25 s Check timeout is a production value; on a loaded 2-core CI
        // machine a first argon2 verification can exceed it and turn an allow into a 503.
        // The error path is tested by stopping keygate instead.
        replace_word(&text, "0.25s", "10s")
    }

    /// Envoy with `examples/envoy.yaml` in front of `upstream`, asking keygate at `authorizer`.
    pub async fn start_example(authorizer: SocketAddr, upstream: SocketAddr) -> Self {
        Self::start(&Self::render_example(authorizer, upstream)).await
    }

    /// Envoy with this config, whose listener and admin ports must be 0. Returns once the
    /// admin interface reports LIVE and the listener accepts connections.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write the Envoy config");
        let admin_path = dir.path().join("admin-address");
        let mut command = Command::new(tool("envoy"));
        command
            .arg("-c")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "-l",
                "warning",
                "--concurrency",
                "1",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path);
        let mut process = ChildGuard::spawn("envoy", command, dir.path().join("envoy.log"));
        let deadline = Instant::now() + START_TIMEOUT;

        // The file is re-read until its address answers, in case a read caught half of it.
        let (admin_addr, addr) = loop {
            let admin = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok());
            if let Some(admin) = admin
                && let Some(listener) = ready_listener(admin).await
            {
                break (admin, listener);
            }
            process.still_starting(deadline, "envoy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Self {
            addr,
            admin_addr,
            process,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// GET `path` through Envoy with these extra request headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_get(self.addr, path, headers).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The `ingress` listener's address once Envoy is LIVE and it accepts connections.
async fn ready_listener(admin: SocketAddr) -> Option<SocketAddr> {
    let ready = try_http_get(admin, "/ready", &[]).await.ok()?;
    if ready.status != 200 || ready.body.trim() != "LIVE" {
        return None;
    }
    let listeners = try_http_get(admin, "/listeners?format=json", &[])
        .await
        .ok()?
        .json();
    let socket = listeners["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "ingress")?["local_address"]["socket_address"]
        .clone();
    let addr = SocketAddr::new(
        socket["address"].as_str()?.parse().ok()?,
        u16::try_from(socket["port_value"].as_u64()?).ok()?,
    );
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(addr)
}

/// A real Prometheus server on a loopback port with its own temporary TSDB.
pub struct PrometheusProcess {
    pub addr: SocketAddr,
    process: ChildGuard,
    _dir: TempDir,
}

impl PrometheusProcess {
    /// `examples/prometheus.yml` scraping `/metrics` through Envoy at `envoy` with `api_key`,
    /// and keygate's own metrics at `keygate_metrics`.
    pub fn render_example(envoy: SocketAddr, keygate_metrics: SocketAddr, api_key: &str) -> String {
        let text = example("prometheus.yml");
        let text = replace_word(&text, "envoy:10000", &envoy.to_string());
        let text = replace_word(&text, "keygate:9464", &keygate_metrics.to_string());
        replace_word(&text, "KEYGATE_API_KEY", api_key)
    }

    /// Prometheus with this config. Returns once `/-/ready` answers 200.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the Prometheus config");
        for attempt in 1..=START_ATTEMPTS {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut command = Command::new(tool("prometheus"));
            command
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"));
            let mut process = ChildGuard::spawn(
                "prometheus",
                command,
                dir.path().join(format!("prometheus-{attempt}.log")),
            );
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(exit) = process.exited() {
                    // Someone took the port between free_port() and the bind: try another.
                    if exit.contains("address already in use") && attempt < START_ATTEMPTS {
                        break;
                    }
                    panic!("prometheus: {exit}");
                }
                if try_http_get(addr, "/-/ready", &[])
                    .await
                    .is_ok_and(|r| r.status == 200)
                {
                    return Self {
                        addr,
                        process,
                        _dir: dir,
                    };
                }
                process.still_starting(deadline, "prometheus");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        unreachable!("the last attempt panics instead of retrying")
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// `GET /api/v1/targets`: the active targets.
    pub async fn active_targets(&self) -> Vec<serde_json::Value> {
        let response = http_get(self.addr, "/api/v1/targets?state=active", &[]).await;
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `GET /api/v1/query` of a PromQL expression without spaces or reserved URL characters.
    pub async fn query(&self, expression: &str) -> serde_json::Value {
        let response = http_get(self.addr, &format!("/api/v1/query?query={expression}"), &[]).await;
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()["data"]["result"].clone()
    }
}

/// An HTTP response as the tests need it.
pub struct HttpResponse {
    pub status: u16,
    /// Names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Failure messages quote responses; a body that echoes an Authorization header (the upstream's
/// `/headers` when stripping failed) is withheld, so no credential reaches the test output.
impl std::fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.body.to_ascii_lowercase().contains("authorization") {
            "<withheld: it mentions an Authorization header>"
        } else {
            self.body.as_str()
        };
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("a JSON body ({e}): {:?}", self.body))
    }

    /// Parses a response as curl prints it with `-i`, or as read off the wire (`dechunk`).
    pub fn parse(raw: &[u8], dechunk: bool) -> Result<Self, String> {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no end of headers in {text:?}"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let body = if dechunk && chunked {
            decode_chunked(body)?
        } else {
            body.to_owned()
        };
        Ok(Self {
            status,
            headers,
            body,
        })
    }
}

fn decode_chunked(mut rest: &str) -> Result<String, String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("truncated chunk size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = after.get(..size).ok_or("truncated chunk")?;
        body.push_str(chunk);
        rest = after[size..]
            .strip_prefix("\r\n")
            .ok_or("no CRLF after chunk")?;
    }
}

/// One HTTP/1.1 GET on a fresh connection (`Connection: close`), with a 30 s budget. Enough
/// for Envoy, Prometheus and the admin interfaces, and cheaper to build than a client crate.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    try_http_get(addr, path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

pub async fn try_http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, String> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "no response within 30 s".to_owned())?
        .map_err(|e| e.to_string())?;
    HttpResponse::parse(&raw, true)
}

/// Runs the real `curl` with these arguments plus `-sS -i` (status and headers on stdout),
/// as a README reader would.
pub async fn curl(args: &[&str]) -> HttpResponse {
    let mut command = Command::new(tool("curl"));
    command
        .args(["-sS", "-i", "--max-time", "20"])
        .args(args)
        // Loopback requests must not go through a proxy the environment may configure.
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null());
    // Bounded by --max-time; tokio's process support is not enabled, so a blocking thread.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("curl thread")
        .expect("run curl");
    assert!(
        output.status.success(),
        "curl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    HttpResponse::parse(&output.stdout, false).expect("curl -i output")
}
