//! Real child processes for the tests that drive real binaries: the `keygate` CLI and server,
//! grpcurl, Envoy and Prometheus on the repo's example configs. Every one is bounded in time and
//! killed (and reaped) when its guard drops, so a failing test leaves nothing running; and no wait
//! blocks the async runtime the in-process server under test runs on (`#[sqlx::test]` uses a
//! current-thread runtime).
//!
//! The configs are the example files themselves, rewritten textually (whole words, each
//! exactly once), so the examples stay tested.

// Each feature file uses a different subset of the harness.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use tempfile::TempDir;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    helpers::{ADMIN_PASSWORD, ADMIN_USER, free_port, health, keygate_binary, poll, tool},
    http::{HttpResponse, http_get, try_http_get},
};

/// How long a command may run, or a process take to come up, on a loaded 2-core CI machine.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts to start a process that must be given a port up front (a race on the port is
/// possible, see `helpers::free_port`).
const START_ATTEMPTS: usize = 3;

/// A running child process, killed (and reaped) when dropped. Its output goes to a log file
/// that failure messages quote, unless the caller set up its stdio itself (`run`).
pub struct ChildProcess {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl ChildProcess {
    /// Starts `command` with no stdin and its stdout and stderr appended to `log` (a restarted
    /// process adds to its predecessor's log).
    pub fn spawn_logged(name: &str, mut command: Command, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log file handle"))
            .stderr(file);
        let mut process = Self::spawn(name, command);
        process.log = Some(log.to_owned());
        process
    }

    /// Starts `command` with the stdio it was given.
    fn spawn(name: &str, mut command: Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log: None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What the process has written so far (empty without a log file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.name))
    }

    /// Fails the test, quoting the log, if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!("{} exited ({status}); log:\n{}", self.name, self.log());
        }
    }

    /// Polls `probe` until it yields a value, as long as the process runs; fails the test,
    /// quoting the log, if it exits first or `limit` passes.
    pub async fn wait_until<T, F, Fut>(&mut self, what: &str, limit: Duration, mut probe: F) -> T
    where
        F: FnMut(&Self) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let polled = poll(limit, || {
            self.assert_running();
            probe(self)
        })
        .await;
        match polled {
            Some((value, _)) => value,
            None => panic!(
                "{what}: not within {limit:?}; {} log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Waits for the process to exit by itself; fails the test after `limit`.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        match poll(limit, || std::future::ready(self.exited())).await {
            Some((status, _)) => status,
            None => panic!(
                "{} did not exit within {limit:?}; log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Sends SIGTERM, as an orchestrator stopping it would.
    pub fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(
            sent.success(),
            "kill -TERM {} ({}) failed",
            self.id(),
            self.name
        );
    }

    /// SIGTERM, then the exit (within `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.sigterm();
        self.wait(limit).await
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a finished command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with the command's output unless it exited with status 0.
    pub fn expect_success(self, what: &str) -> Self {
        assert!(self.success(), "{what} failed: {self}");
        self
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` to completion with `stdin` as its input, capturing its output; panics (and
/// kills it) if it runs longer than `COMMAND_TIMEOUT`.
pub async fn run(mut command: Command, stdin: Option<&str>) -> Finished {
    let name = format!("{:?}", command.get_program());
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = ChildProcess::spawn(&name, command);
    if let Some(input) = stdin {
        let mut pipe = process.child.stdin.take().expect("piped stdin");
        let input = input.to_owned();
        tokio::task::spawn_blocking(move || {
            // The child may exit without reading; that is its business.
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(process.child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(process.child.stderr.take().map(|p| Box::new(p) as _));
    let status = process.wait(COMMAND_TIMEOUT).await;
    Finished {
        status,
        stdout: stdout.await.expect("stdout reader"),
        stderr: stderr.await.expect("stderr reader"),
    }
}

/// A `keygate` command run in `working_dir` with a clean environment: no DATABASE_URL,
/// RUST_LOG or KEYGATE_* variable the test did not set itself.
pub fn keygate_command(working_dir: &Path) -> Command {
    let mut command = Command::new(keygate_binary());
    command.env_clear().current_dir(working_dir);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}

/// A loopback address on a free port, outside the ephemeral range (see `helpers::free_port`).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A `keygate` server child process on fixed loopback addresses (so it can be restarted on the
/// same ones), with the test operator bootstrapped.
pub struct KeygateProcess {
    pub process: ChildProcess,
    pub main: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

impl KeygateProcess {
    /// `keygate serve` on `database_url` in `dir` with `env` added, logging to
    /// `dir/<name>.log`.
    pub fn serve(
        dir: &Path,
        name: &str,
        database_url: &str,
        addrs: [SocketAddr; 3],
        env: &[(&str, &str)],
    ) -> Self {
        let args = ["serve", "--database-url", database_url];
        Self::start(dir, &dir.join(format!("{name}.log")), &args, addrs, env)
    }

    /// `keygate <args>` in `working_dir` with `env` added, listening on `addrs` (main, admin,
    /// metrics) and logging to `log`.
    pub fn start(
        working_dir: &Path,
        log: &Path,
        args: &[&str],
        addrs: [SocketAddr; 3],
        env: &[(&str, &str)],
    ) -> Self {
        let [main, admin, metrics] = addrs;
        let mut command = keygate_command(working_dir);
        command
            .args(args)
            .args(["--listen", &main.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .env("KEYGATE_ADMIN_USER", ADMIN_USER)
            .env("KEYGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .envs(env.iter().copied());
        let name = log.file_stem().unwrap_or_default().to_string_lossy();
        Self {
            process: ChildProcess::spawn_logged(&name, command, log),
            main,
            admin,
            metrics,
        }
    }

    /// Waits until the main and the admin listener report SERVING; returns how long it took.
    pub async fn wait_serving(&mut self) -> Duration {
        let (main, admin) = (self.main, self.admin);
        let started = tokio::time::Instant::now();
        self.process
            .wait_until("keygate SERVING", START_TIMEOUT, |_| async move {
                let serving = Some(ServingStatus::Serving);
                (health(main, "").await == serving && health(admin, "").await == serving)
                    .then_some(())
            })
            .await;
        started.elapsed()
    }

    /// SIGTERM, then a clean exit; returns the log.
    pub async fn stop(&mut self) -> String {
        let status = self.process.terminate(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "keygate exited with {status}:\n{}",
            self.process.log()
        );
        self.process.log()
    }
}

/// `examples/<name>` with each `(word, replacement)` applied by `replace_word`.
pub fn render_example<A: AsRef<str>, B: AsRef<str>>(name: &str, replacements: &[(A, B)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    replacements.iter().fold(text, |text, (word, replacement)| {
        replace_word(&text, word.as_ref(), replacement.as_ref())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    })
}

/// Replaces `word` by `replacement` where it stands as a whole word (not inside a longer run of
/// letters, digits, `_` or `-`, so `upstream` leaves `upstreams` alone and `keygate` leaves the
/// header name `x-keygate-key-id` alone), and insists that it occurs exactly once: a test must
/// notice when the example it renders changes shape.
pub fn replace_word(text: &str, word: &str, replacement: &str) -> Result<String, String> {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-');
    let hits: Vec<usize> = text
        .match_indices(word)
        .map(|(at, _)| at)
        .filter(|&at| {
            !is_word(text[..at].chars().next_back())
                && !is_word(text[at + word.len()..].chars().next())
        })
        .collect();
    match hits[..] {
        [at] => Ok(format!(
            "{}{replacement}{}",
            &text[..at],
            &text[at + word.len()..]
        )),
        _ => Err(format!(
            "`{word}` should appear exactly once as a whole word, not {} times",
            hits.len()
        )),
    }
}

/// `{ address: HOST, port_value: PORT }`, the form every socket in the Envoy examples has.
pub fn envoy_socket(host: &str, port: u16) -> String {
    format!("{{ address: {host}, port_value: {port} }}")
}

/// The repo's demo upstream (`tools/demo-upstream`) on a random loopback port, served in the
/// test process: `/metrics` and `/headers`. Stopped when dropped.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DemoUpstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the demo upstream");
        let addr = listener.local_addr().expect("its address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(demo_upstream::serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A real Envoy. Started with the flags the README gives (`--disable-hot-restart`, so parallel
/// tests share no shared memory, `-l warning`, `--concurrency 1`) plus `--admin-address-path`:
/// the listener and the admin interface bind port 0 and the test asks Envoy what it got.
pub struct EnvoyProcess {
    /// The `ingress` listener clients talk to.
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    process: ChildProcess,
    _dir: TempDir,
}

impl EnvoyProcess {
    /// `examples/envoy.yaml` pointed at keygate's Check on `authorizer` and at `upstream`.
    pub fn render_example(authorizer: SocketAddr, upstream: SocketAddr) -> String {
        render_example(
            "envoy.yaml",
            &[
                ("keygate", authorizer.ip().to_string()),
                ("50051", authorizer.port().to_string()),
                ("upstream", upstream.ip().to_string()),
                ("8080", upstream.port().to_string()),
                // Loopback only, and ports Envoy picks itself.
                ("0.0.0.0", "127.0.0.1".into()),
                ("10000", "0".into()),
                ("9901", "0".into()),
                // The example's 0.25 s Check timeout is a production value; on a loaded 2-core
                // CI machine a first argon2 verification can exceed it and turn an allow into a
                // 503. The error path is tested by stopping keygate instead.
                ("0.25s", "10s".into()),
            ],
        )
    }

    /// Envoy with `examples/envoy.yaml` in front of `upstream`, asking keygate at `authorizer`.
    pub async fn start_example(authorizer: SocketAddr, upstream: SocketAddr) -> Self {
        Self::start(&Self::render_example(authorizer, upstream)).await
    }

    /// Envoy with this config, whose `ingress` listener and admin ports must be 0. Returns once
    /// the admin interface reports LIVE and the listener accepts connections.
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
        let mut process =
            ChildProcess::spawn_logged("envoy", command, &dir.path().join("envoy.log"));
        // The file is re-read until its address answers, in case a read caught half of it.
        let (admin_addr, addr) = process
            .wait_until("envoy LIVE", START_TIMEOUT, |_| {
                let admin = std::fs::read_to_string(&admin_path)
                    .ok()
                    .and_then(|text| text.trim().parse::<SocketAddr>().ok());
                async move {
                    let admin = admin?;
                    Some((admin, ready_listener(admin).await?))
                }
            })
            .await;
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

    /// Envoy's view of a cluster's hosts: `(address, healthy)` from `/clusters`.
    pub async fn hosts(&self, cluster: &str) -> Vec<(String, bool)> {
        let Ok(response) = try_http_get(self.admin_addr, "/clusters", &[]).await else {
            return Vec::new();
        };
        if response.status != 200 {
            return Vec::new();
        }
        let prefix = format!("{cluster}::");
        response
            .body
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (host, flags) = rest.split_once("::health_flags::")?;
                Some((host.to_owned(), flags.trim() == "healthy"))
            })
            .collect()
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
    process: ChildProcess,
    _dir: TempDir,
}

impl PrometheusProcess {
    /// `examples/prometheus.yml` scraping `/metrics` through Envoy at `envoy` with `api_key`,
    /// and keygate's own metrics at `keygate_metrics`.
    pub fn render_example(envoy: SocketAddr, keygate_metrics: SocketAddr, api_key: &str) -> String {
        render_example(
            "prometheus.yml",
            &[
                ("envoy:10000", envoy.to_string()),
                ("keygate:9464", keygate_metrics.to_string()),
                ("KEYGATE_API_KEY", api_key.to_owned()),
            ],
        )
    }

    /// Prometheus with this config. Returns once `/-/ready` answers 200.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the Prometheus config");
        for attempt in 1..=START_ATTEMPTS {
            let addr = free_addr();
            let mut command = Command::new(tool("prometheus"));
            command
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"));
            let mut process = ChildProcess::spawn_logged(
                "prometheus",
                command,
                &dir.path().join(format!("prometheus-{attempt}.log")),
            );
            let ready = poll(START_TIMEOUT, || {
                let exited = process.exited();
                async move {
                    if exited.is_some() {
                        return Some(false);
                    }
                    let ready = try_http_get(addr, "/-/ready", &[]).await;
                    ready.is_ok_and(|r| r.status == 200).then_some(true)
                }
            })
            .await;
            match ready {
                Some((true, _)) => {
                    return Self {
                        addr,
                        process,
                        _dir: dir,
                    };
                }
                // Someone took the port between free_addr() and the bind: try another.
                Some((false, _))
                    if process.log().contains("address already in use")
                        && attempt < START_ATTEMPTS => {}
                Some((false, _)) => process.assert_running(),
                None => panic!(
                    "prometheus not ready after {START_TIMEOUT:?}; log:\n{}",
                    process.log()
                ),
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
