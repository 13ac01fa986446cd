//! `GET /metrics` on its own listener (HTTP/1.1, the same connection bounds as the others).

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;

use super::listener::{BoundedListener, ConnectionBounds, PeerInfo, TrackRequestsLayer};
use crate::metrics::Metrics;

pub(super) async fn serve_metrics(
    listener: TcpListener,
    bounds: ConnectionBounds,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener_metrics = metrics.listener("metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    let app = app.layer(TrackRequestsLayer);
    axum::serve(
        BoundedListener::new(listener, bounds, listener_metrics)?,
        app.into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
