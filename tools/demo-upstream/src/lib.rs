//! A tiny HTTP service to put behind a gateway in demos and end-to-end tests: `GET /metrics`
//! serves a few Prometheus series (standing in for Uptime Kuma's `/metrics`), and
//! `GET /headers` echoes the request headers as JSON, so a test can see what the gateway
//! forwarded (the `x-keygate-*` headers, and no `authorization`).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
};

use axum::{Json, Router, http::HeaderMap, routing::get};
use tokio::net::TcpListener;

static SCRAPES: AtomicU64 = AtomicU64::new(0);

async fn metrics() -> String {
    let scrapes = SCRAPES.fetch_add(1, Ordering::Relaxed) + 1;
    format!(
        "# HELP demo_scrapes_total Scrapes of this endpoint.\n\
         # TYPE demo_scrapes_total counter\n\
         demo_scrapes_total {scrapes}\n\
         # HELP demo_up Always 1.\n\
         # TYPE demo_up gauge\n\
         demo_up 1\n"
    )
}

/// A header sent more than once is echoed once, its values joined with `, ` (as HTTP allows),
/// so a duplicate (say a client's forged `x-keygate-key-id` next to the gateway's) stays
/// visible.
async fn headers(headers: HeaderMap) -> Json<BTreeMap<String, String>> {
    let mut echoed = BTreeMap::<String, String>::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        echoed
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    Json(echoed)
}

pub fn router() -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/headers", get(headers))
}

/// Serves `router()` on `listener` until `shutdown` resolves. Nagle is off, as on keygate's
/// listeners: a gateway keeps connections open and waits for each reply.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |socket| {
        let _ = socket.set_nodelay(true);
    });
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}
