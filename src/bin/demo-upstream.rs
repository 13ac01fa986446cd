//! A tiny HTTP service to put behind Envoy in demos and end-to-end tests: `GET /metrics`
//! serves a few Prometheus series (standing in for Uptime Kuma's `/metrics`), and
//! `GET /headers` echoes the request headers as JSON, so a test can see what Envoy forwarded
//! (the `x-keygate-*` headers, and no `authorization`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use axum::{Json, Router, http::HeaderMap, routing::get};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Demo upstream for keygate: /metrics and /headers")]
struct Args {
    #[arg(long, env = "DEMO_UPSTREAM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

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

async fn headers(headers: HeaderMap) -> Json<BTreeMap<String, String>> {
    Json(
        headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/headers", get(headers));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("demo-upstream listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
