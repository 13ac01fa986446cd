//! Harness pieces of the reliability tests: polling, health probes, metrics scraping, and
//! child processes (keygate binaries, Envoy, the demo upstream) that die with their guard.

// Each feature file uses a different subset.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

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

/// Polls `probe` every 50 ms until it returns true; returns how long that took. Fails the test
/// after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if probe().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A child process killed (and reaped) on drop, with its output going to a file.
pub struct ChildProcess {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl ChildProcess {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.name);
    }

    /// Waits (bounded) for the process to exit by itself; returns its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}; output:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails the test (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!(
                "{} exited ({status}); output:\n{}",
                self.name,
                self.output()
            );
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `keygate` command with none of the environment a developer or CI may have set for the
/// tests (DATABASE_URL, KEYGATE_*), so only what the test passes applies.
pub fn keygate_command() -> Command {
    let mut command = Command::new(crate::helpers::keygate_binary());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("KEYGATE_") || name == "DATABASE_URL" || name == "RUST_LOG" {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// A loopback address on a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::helpers::free_port()))
}

/// `examples/<name>` with each `(from, to)` replaced, where every `from` must occur exactly
/// once (so a renamed placeholder fails loudly instead of leaving a stale address).
pub fn render_example(name: &str, replacements: &[(&str, String)]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (from, to) in replacements {
        assert_eq!(
            text.matches(from).count(),
            1,
            "`{from}` must appear exactly once in {name}"
        );
        text = text.replace(from, to);
    }
    text
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    pub process: ChildProcess,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
}

impl Envoy {
    /// Validates `config` with `envoy --mode validate`, then starts Envoy on it and waits until
    /// its admin endpoint says LIVE.
    pub async fn start(dir: &Path, config: &str, admin: SocketAddr, listener: SocketAddr) -> Self {
        let envoy = crate::helpers::tool("envoy");
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write the Envoy config");
        let validated = Command::new(&envoy)
            .args(["--mode", "validate", "-c"])
            .arg(&config_path)
            .output()
            .expect("run envoy --mode validate");
        assert!(
            validated.status.success(),
            "envoy rejects the config: {}{}",
            String::from_utf8_lossy(&validated.stdout),
            String::from_utf8_lossy(&validated.stderr)
        );
        let mut command = Command::new(&envoy);
        command
            .args(["-c"])
            .arg(&config_path)
            .args(["--log-level", "warn", "--concurrency", "1"])
            .args(["--base-id", &crate::helpers::free_port().to_string()]);
        let mut process = ChildProcess::spawn("envoy", command, &dir.join("envoy.log"));
        let started = Instant::now();
        loop {
            process.assert_running();
            let ready = http_get(admin, "/ready", None).await;
            if matches!(&ready, Ok((200, body)) if body.trim() == "LIVE") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Envoy not LIVE within 30 s (/ready: {ready:?}):\n{}",
                process.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            process,
            admin,
            listener,
        }
    }

    /// Envoy's view of a cluster's hosts: `(address, healthy)` from `/clusters`.
    pub async fn hosts(&self, cluster: &str) -> Vec<(String, bool)> {
        let Ok((200, body)) = http_get(self.admin, "/clusters", None).await else {
            return Vec::new();
        };
        let prefix = format!("{cluster}::");
        body.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (host, flags) = rest.split_once("::health_flags::")?;
                Some((host.to_owned(), flags.trim() == "healthy"))
            })
            .collect()
    }
}

/// One HTTP/1.1 GET on a new connection; returns the status and the body.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut connection = HttpConnection::connect(addr).await?;
    connection.get(path, authorization).await
}

/// A keep-alive HTTP/1.1 client connection, just enough for the tests (Content-Length bodies).
pub struct HttpConnection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl HttpConnection {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| std::io::Error::other("connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: tokio::io::BufReader::new(stream),
        })
    }

    /// Sends a GET and reads the whole response (bounded by a 10 s timeout).
    pub async fn get(
        &mut self,
        path: &str,
        authorization: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        tokio::time::timeout(Duration::from_secs(10), self.get_inner(path, authorization))
            .await
            .map_err(|_| std::io::Error::other("response timed out"))?
    }

    async fn get_inner(
        &mut self,
        path: &str,
        authorization: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: keygate.test\r\n");
        if let Some(value) = authorization {
            request.push_str(&format!("Authorization: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if name.eq_ignore_ascii_case("transfer-encoding")
                    && value.trim().eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size_line = String::new();
                self.stream.read_line(&mut size_line).await?;
                let size = usize::from_str_radix(size_line.trim(), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// The demo upstream (`src/bin/demo-upstream.rs`) on a free port, killed on drop.
pub async fn start_demo_upstream(dir: &Path) -> (ChildProcess, SocketAddr) {
    let addr = free_addr();
    let mut command = Command::new(env!("CARGO_BIN_EXE_demo-upstream"));
    command.args(["--listen", &addr.to_string()]);
    let mut process = ChildProcess::spawn("demo-upstream", command, &dir.join("upstream.log"));
    let started = Instant::now();
    while http_get(addr, "/metrics", None).await.is_err() {
        process.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "demo upstream not up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (process, addr)
}

/// A `keygate serve` child process on fixed loopback addresses (so it can be restarted on the
/// same ones), with the test operator bootstrapped.
pub struct KeygateProcess {
    pub process: ChildProcess,
    pub main: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

impl KeygateProcess {
    /// Starts `keygate serve` on `database_url` with `env` added, logging to `dir/<name>.log`.
    pub fn start(
        dir: &Path,
        name: &str,
        database_url: &str,
        addrs: [SocketAddr; 3],
        env: &[(&str, &str)],
    ) -> Self {
        let [main, admin, metrics] = addrs;
        let mut command = keygate_command();
        command
            .arg("serve")
            .args(["--database-url", database_url])
            .args(["--listen", &main.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .env("KEYGATE_ADMIN_USER", crate::helpers::ADMIN_USER)
            .env("KEYGATE_ADMIN_PASSWORD", crate::helpers::ADMIN_PASSWORD);
        for (key, value) in env {
            command.env(key, value);
        }
        Self {
            process: ChildProcess::spawn(name, command, &dir.join(format!("{name}.log"))),
            main,
            admin,
            metrics,
        }
    }

    /// Waits (bounded) until the main listener reports SERVING.
    pub async fn wait_serving(&mut self) -> Duration {
        let started = Instant::now();
        loop {
            self.process.assert_running();
            if health(self.main, "").await == Some(ServingStatus::Serving) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} never became SERVING:\n{}",
                self.process.name,
                self.process.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
