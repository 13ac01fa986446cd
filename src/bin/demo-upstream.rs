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

/// A header sent more than once is echoed once, its values joined with `, ` (as HTTP allows),
/// so a duplicate (say a client's forged `x-keygate-key-id` next to Envoy's) stays visible.
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

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/headers", get(headers));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("demo-upstream listening on {}", listener.local_addr()?);
    // Nagle off, as on keygate's listeners: Envoy keeps connections open and waits for replies.
    // Stops on SIGTERM (docker stop, bench/run.sh) with a normal exit, as keygate does.
    axum::serve(keygate::startup::http_no_delay(listener), app)
        .with_graceful_shutdown(keygate::startup::shutdown_signal())
        .await
}
