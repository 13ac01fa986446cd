//! The tests' HTTP/1.1 client, just enough for Envoy, Prometheus, the demo upstream and the
//! metrics and admin endpoints (cheaper to build than a client crate): one GET on a fresh
//! connection (`http_get`), or several on one keep-alive connection (`HttpConnection`); plus
//! the real `curl`, as a README reader runs it.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::helpers::tool;

/// Budget of one exchange, connecting included: generous, as Envoy may wait up to 10 s on
/// keygate's Check on a loaded CI machine.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// Parses a response as `curl -i` prints it (the body already decoded).
    fn parse_curl_output(raw: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no end of headers in {text:?}"))?;
        let (status, headers) = parse_head(head)?;
        Ok(Self {
            status,
            headers,
            body: body.to_owned(),
        })
    }
}

/// The status code and the headers (names lowercased) of a response head.
fn parse_head(head: &str) -> Result<(u16, Vec<(String, String)>), String> {
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

/// One HTTP/1.1 GET on a fresh connection (`Connection: close`); panics on any failure.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    try_http_get(addr, path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// One HTTP/1.1 GET on a fresh connection (`Connection: close`).
pub async fn try_http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, String> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let mut connection = HttpConnection::connect(addr).await?;
        connection
            .get(path, &[headers, &[("connection", "close")]].concat())
            .await
    })
    .await
    .map_err(|_| format!("no response within {EXCHANGE_TIMEOUT:?}"))?
}

/// A keep-alive HTTP/1.1 client connection.
pub struct HttpConnection {
    addr: SocketAddr,
    stream: BufReader<TcpStream>,
}

impl HttpConnection {
    pub async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr} timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self {
            addr,
            stream: BufReader::new(stream),
        })
    }

    /// Sends a GET with these extra request headers and reads the whole response.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, String> {
        tokio::time::timeout(EXCHANGE_TIMEOUT, self.exchange(path, headers))
            .await
            .map_err(|_| format!("no response within {EXCHANGE_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())
    }

    async fn exchange(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<HttpResponse> {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;

        let mut head = String::new();
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before the end of a response head",
                ));
            }
            if line.trim_end().is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let (status, headers) = parse_head(&head).map_err(std::io::Error::other)?;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size_line = String::new();
                self.stream.read_line(&mut size_line).await?;
                let size = size_line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16).map_err(|e| {
                    std::io::Error::other(format!("bad chunk size {size_line:?}: {e}"))
                })?;
                // The chunk and its CRLF (after the last, empty chunk: the final CRLF).
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = header("content-length") {
            let length = length
                .parse()
                .map_err(|e| std::io::Error::other(format!("bad content-length: {e}")))?;
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await?;
        } else {
            // Neither: the body ends with the connection.
            self.stream.read_to_end(&mut body).await?;
        }
        Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Runs the real `curl` with these arguments plus `-sS -i` (status and headers on stdout),
/// as a README reader would.
pub async fn curl(args: &[&str]) -> HttpResponse {
    let mut command = std::process::Command::new(tool("curl"));
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
    HttpResponse::parse_curl_output(&output.stdout).expect("curl -i output")
}
