//! What one peer can hold on a listener (SPEC section 7): a connection slot out of
//! `max_connections`, and only for as long as it uses it. A new connection must start a request
//! within the handshake deadline; afterwards, one with no request in flight is closed once it
//! has been idle for the idle timeout. (Streams per connection, header sizes and each
//! request's own deadline are set on the HTTP/2 server itself.)

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{ConnectionClose, ListenerMetrics};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionBounds {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Accepts connections on `listener` for as long as the server polls the stream. Beyond
/// `max_connections`, a new connection is closed as soon as it is accepted (counted as
/// refused): the listener keeps answering the peers it holds.
pub fn bounded_incoming(
    listener: TcpListener,
    bounds: ConnectionBounds,
    metrics: ListenerMetrics,
) -> ReceiverStream<io::Result<PeerConnection>> {
    let (accepted, incoming) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(connection) => connection,
                    Err(error) => {
                        // Out of file descriptors, usually: wait for some to be released
                        // rather than spin.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = accepted.closed() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.refused.inc();
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let connection = PeerConnection::new(stream, remote, slot, bounds, metrics.clone());
            if accepted.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(incoming)
}

/// `bounded_incoming` for axum's HTTP/1.1 servers (the metrics listener). Served with
/// `into_make_service_with_connect_info::<PeerInfo>()`, so that `TrackRequestsLayer` sees each
/// request and a keep-alive connection between scrapes is idle, not unused.
pub struct BoundedListener {
    incoming: ReceiverStream<io::Result<PeerConnection>>,
    local_addr: SocketAddr,
}

impl BoundedListener {
    pub fn new(
        listener: TcpListener,
        bounds: ConnectionBounds,
        metrics: ListenerMetrics,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        Ok(Self {
            incoming: bounded_incoming(listener, bounds, metrics),
            local_addr,
        })
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = PeerConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (PeerConnection, SocketAddr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(connection)) => {
                    let remote = connection.info.tcp.remote_addr.unwrap_or(self.local_addr);
                    return (connection, remote);
                }
                Some(Err(_)) => continue,
                // The accepting task has stopped: there will be no more connections.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, BoundedListener>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, BoundedListener>) -> Self {
        stream.io().info.clone()
    }
}

/// What every request on a connection shares: when it started, and its requests.
#[derive(Debug)]
pub struct ConnectionActivity {
    opened: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_request_end_ms: AtomicU64,
}

impl ConnectionActivity {
    fn ms_since_open(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Until when the connection may stay open as things are now, or why it must close.
    fn deadline(&self, bounds: &ConnectionBounds) -> Result<Instant, ConnectionClose> {
        let now = Instant::now();
        let deadline = if self.requests.load(Ordering::Acquire) == 0 {
            self.opened + bounds.handshake_timeout
        } else if self.in_flight.load(Ordering::Acquire) > 0 {
            return Ok(now + bounds.idle_timeout);
        } else {
            let last = Duration::from_millis(self.last_request_end_ms.load(Ordering::Acquire));
            self.opened + last + bounds.idle_timeout
        };
        if deadline > now {
            Ok(deadline)
        } else if self.requests.load(Ordering::Acquire) == 0 {
            Err(ConnectionClose::Handshake)
        } else {
            Err(ConnectionClose::Idle)
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestInFlight {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestInFlight(self.clone())
    }
}

/// A request being answered; its connection is not idle until it is dropped.
pub struct RequestInFlight(Arc<ConnectionActivity>);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0
            .last_request_end_ms
            .store(self.0.ms_since_open(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the server learns of a connection (tonic's connect info): the addresses, and the
/// activity that `TrackRequestsLayer` records.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub tcp: TcpConnectInfo,
    activity: Arc<ConnectionActivity>,
}

/// An accepted connection holding its slot. Reading fails, which makes the HTTP/2 server drop
/// the connection, once it has outlived its handshake deadline or its idle timeout.
pub struct PeerConnection {
    stream: TcpStream,
    info: PeerInfo,
    bounds: ConnectionBounds,
    timer: Pin<Box<Sleep>>,
    metrics: ListenerMetrics,
    _slot: OwnedSemaphorePermit,
}

impl PeerConnection {
    fn new(
        stream: TcpStream,
        remote: SocketAddr,
        slot: OwnedSemaphorePermit,
        bounds: ConnectionBounds,
        metrics: ListenerMetrics,
    ) -> Self {
        let opened = Instant::now();
        metrics.open.inc();
        Self {
            info: PeerInfo {
                tcp: TcpConnectInfo {
                    local_addr: stream.local_addr().ok(),
                    remote_addr: Some(remote),
                },
                activity: Arc::new(ConnectionActivity {
                    opened,
                    requests: AtomicU64::new(0),
                    in_flight: AtomicUsize::new(0),
                    last_request_end_ms: AtomicU64::new(0),
                }),
            },
            stream,
            timer: Box::pin(tokio::time::sleep_until(opened + bounds.handshake_timeout)),
            bounds,
            metrics,
            _slot: slot,
        }
    }

    /// Pending while the connection may stay; an error once it must close.
    fn poll_bounds(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match self.info.activity.deadline(&self.bounds) {
                Ok(deadline) => self.timer.as_mut().reset(deadline),
                Err(close) => {
                    self.metrics.closed(close).inc();
                    tracing::debug!(peer = ?self.info.tcp.remote_addr, ?close, "closing a connection");
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, close.as_str()));
                }
            }
        }
    }
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

impl AsyncRead for PeerConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Checked before reading too: a peer that keeps sending must not outlive its bounds.
        if this.timer.is_elapsed()
            && let Poll::Ready(error) = this.poll_bounds(cx)
        {
            return Poll::Ready(Err(error));
        }
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.poll_bounds(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for PeerConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for PeerConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// Marks each request in flight on its connection's activity, and gives the request tonic's
/// own `TcpConnectInfo`, so `Request::remote_addr` works as on any tonic server.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackRequestsLayer;

impl<S> tower::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> TrackRequests<S> {
        TrackRequests(inner)
    }
}

#[derive(Debug, Clone)]
pub struct TrackRequests<S>(S);

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for TrackRequests<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: tonic::codegen::http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let peer = extensions
            .get::<PeerInfo>()
            .cloned()
            .or_else(|| {
                extensions
                    .get::<tonic::transport::server::TlsConnectInfo<PeerInfo>>()
                    .map(|tls| tls.get_ref().clone())
            })
            .or_else(|| {
                extensions
                    .get::<axum::extract::ConnectInfo<PeerInfo>>()
                    .map(|info| info.0.clone())
            });
        let in_flight = peer.map(|peer| {
            request.extensions_mut().insert(peer.tcp);
            peer.activity.request_started()
        });
        Tracked {
            inner: self.0.call(request),
            _in_flight: in_flight,
        }
    }
}

pin_project! {
    /// A request's future, holding its place in flight until it completes or is dropped.
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        _in_flight: Option<RequestInFlight>,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// Raises the soft limit on open files to the hard limit, so the connection bounds (not the
/// default soft limit of 1024) are what stops new peers, and logs the limit now in force; warns
/// when it is below what three listeners of `max_connections` each (and the store) may need.
pub fn raise_open_files_limit(max_connections: u32) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(limit, "open files limit");
            let wanted = 3 * u64::from(max_connections) + 256;
            if limit < wanted {
                tracing::warn!(
                    limit,
                    max_connections,
                    "the open files limit is below what KEYGATE_MAX_CONNECTIONS allows: \
                     new connections will wait for a free descriptor; raise the hard limit \
                     (LimitNOFILE=, ulimit -Hn) or lower KEYGATE_MAX_CONNECTIONS"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
}
