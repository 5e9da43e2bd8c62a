//! `statesync serve --metrics ADDR`: Prometheus metrics at `/metrics` and
//! a health check at `/healthz`, on their own port.
//!
//! The libraries report through the `metrics` facade as things happen
//! (connections, requests, commits); what is a state rather than an event
//! (topics, the storage's health, queued invalidations) is read from the
//! server at each scrape.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use state_sync_net::Server;

/// Histogram buckets for latencies, in seconds: 0.25 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Installs the process-wide recorder. Call before the server starts, so
/// the libraries register their counters with it.
///
/// # Errors
///
/// Another recorder is installed already.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    // Histograms are kept in windows that need draining now and then.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

#[derive(Clone)]
struct Scrape {
    handle: PrometheusHandle,
    server: Server,
}

/// Serves `/metrics` and `/healthz` on `addr`; returns the bound address.
/// Stops with the runtime.
///
/// # Errors
///
/// Binding fails.
pub(crate) async fn serve(
    addr: &str,
    handle: PrometheusHandle,
    server: Server,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .with_state(Scrape { handle, server });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%local, "serving metrics at /metrics and health at /healthz");
    Ok(local)
}

async fn metrics(State(scrape): State<Scrape>) -> impl IntoResponse {
    let stats = scrape.server.stats();
    let hub = scrape.server.hub();
    metrics::gauge!("statesync_topics").set(hub.topics().len() as f64);
    metrics::gauge!("statesync_damaged_topics").set(hub.damaged_topics().len() as f64);
    metrics::gauge!("statesync_storage_up").set(if stats.storage_failure.is_some() {
        0.0
    } else {
        1.0
    });
    metrics::gauge!("statesync_storage_shared").set(if hub.shares_storage() { 1.0 } else { 0.0 });
    metrics::gauge!("statesync_pending_invalidations").set(stats.pending_invalidations as f64);
    metrics::gauge!("statesync_queued_bytes").set(stats.queued_bytes as f64);
    metrics::counter!("statesync_writes_total").absolute(stats.writes);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        scrape.handle.render(),
    )
}

/// `200 ok` while the hub serves and its storage answers; `503` with the
/// storage's last error while it fails (reads still serve, marked stale).
async fn health(State(scrape): State<Scrape>) -> impl IntoResponse {
    let stats = scrape.server.stats();
    match stats.storage_failure {
        None => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok", "connections": stats.connections})),
        ),
        Some(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "status": "storage_failing",
                "error": error,
                "connections": stats.connections,
            })),
        ),
    }
}
