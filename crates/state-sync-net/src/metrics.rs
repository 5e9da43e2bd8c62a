//! What the server reports through the `metrics` facade (feature
//! `metrics`; without it every function here is empty). The names, all
//! under `statesync_`, are listed in `docs/OPERATING.md`. Labels have few
//! values: the transport (`unix`, `local`, `websocket`), the request type,
//! the error code.
//!
//! The counters on the fan-out path (one call per frame and connection)
//! are registered once, at their first use: install the recorder before
//! serving.

use std::time::Duration;

/// Counters of the fan-out path and request histograms, registered once.
#[cfg(feature = "metrics")]
struct HotPath {
    /// Bytes out, by transport: `unix`, `local`, `websocket`.
    bytes_out: [metrics::Counter; 3],
    invalidations_sent: metrics::Counter,
    snapshots_inlined: metrics::Counter,
    /// Request latency, by request type, in [`REQUEST_KINDS`] order.
    requests: [metrics::Histogram; 7],
}

/// The request types, as labels.
#[cfg(feature = "metrics")]
const REQUEST_KINDS: [&str; 7] = crate::protocol::CLIENT_MESSAGE_TYPES;

#[cfg(feature = "metrics")]
fn hot_path() -> &'static HotPath {
    static HOT: std::sync::OnceLock<HotPath> = std::sync::OnceLock::new();
    HOT.get_or_init(|| HotPath {
        bytes_out: ["unix", "local", "websocket"].map(
            |transport| metrics::counter!("statesync_bytes_out_total", "transport" => transport),
        ),
        invalidations_sent: metrics::counter!("statesync_invalidations_sent_total"),
        snapshots_inlined: metrics::counter!("statesync_snapshots_inlined_total"),
        requests: REQUEST_KINDS
            .map(|kind| metrics::histogram!("statesync_request_duration_seconds", "type" => kind)),
    })
}

/// A connection finished its handshake.
pub(crate) fn connection_opened(transport: &'static str) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("statesync_connections", "transport" => transport).increment(1.0);
        metrics::counter!("statesync_connections_opened_total", "transport" => transport)
            .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = transport;
}

/// A connection that finished its handshake closed.
pub(crate) fn connection_closed(transport: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("statesync_connections", "transport" => transport).decrement(1.0);
    #[cfg(not(feature = "metrics"))]
    let _ = transport;
}

/// A connection was refused: the server was full.
pub(crate) fn connection_refused() {
    #[cfg(feature = "metrics")]
    metrics::counter!("statesync_connections_refused_total").increment(1);
}

/// `subscriptions` subscriptions were added (positive) or ended (negative).
pub(crate) fn subscriptions_changed(transport: &'static str, by: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("statesync_subscriptions", "transport" => transport).increment(by);
    #[cfg(not(feature = "metrics"))]
    let _ = (transport, by);
}

/// Frames written to a connection, and their bytes.
pub(crate) fn bytes_out(transport: &'static str, bytes: usize) {
    #[cfg(feature = "metrics")]
    {
        let index = match transport {
            "unix" => 0,
            "local" => 1,
            _ => 2,
        };
        hot_path().bytes_out[index].increment(bytes as u64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (transport, bytes);
}

/// An invalidation was written; `inlined` bytes of snapshot rode in it.
pub(crate) fn invalidation_sent(inlined: usize) {
    #[cfg(feature = "metrics")]
    {
        let hot = hot_path();
        hot.invalidations_sent.increment(1);
        if inlined > 0 {
            hot.snapshots_inlined.increment(1);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = inlined;
}

/// A pending invalidation was replaced by a newer one (a slow reader).
pub(crate) fn invalidation_coalesced() {
    #[cfg(feature = "metrics")]
    metrics::counter!("statesync_invalidations_coalesced_total").increment(1);
}

/// A delta was computed in `took`; `too_large` when it was not sent.
pub(crate) fn delta_computed(took: Duration, too_large: bool) {
    #[cfg(feature = "metrics")]
    {
        metrics::histogram!("statesync_delta_duration_seconds").record(took.as_secs_f64());
        if too_large {
            metrics::counter!("statesync_deltas_too_large_total").increment(1);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (took, too_large);
}

/// A snapshot was sent in answer to `get`.
pub(crate) fn snapshot_sent() {
    #[cfg(feature = "metrics")]
    metrics::counter!("statesync_snapshots_sent_total").increment(1);
}

/// A request of type `kind` was answered after `elapsed`.
pub(crate) fn request_done(kind: &'static str, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    match REQUEST_KINDS.iter().position(|k| *k == kind) {
        Some(index) => hot_path().requests[index].record(elapsed.as_secs_f64()),
        None => metrics::histogram!("statesync_request_duration_seconds", "type" => kind)
            .record(elapsed.as_secs_f64()),
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (kind, elapsed);
}

/// An error with `code` was sent to a client.
pub(crate) fn error_sent(code: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("statesync_errors_total", "code" => code).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = code;
}
