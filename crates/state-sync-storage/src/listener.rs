//! The notification listener every shared storage runs: connect, forward
//! notices, report a resync after every (re)connection, reconnect with
//! backoff. Each engine supplies only how to connect.

use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::storage::Change;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that stayed up this long starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);

/// Runs `backend`'s notification listener until `stop`.
///
/// `connect` opens a listening connection and yields its notices' payloads
/// ([`Change::notice`]). After each successful connection, and after each
/// connection that dropped, it sends [`Change::Resync`] (what was notified
/// meanwhile is lost); malformed notices are logged and skipped. Attempts
/// time out after 5 s and back off with [`Change::listener_backoff`].
///
/// # Cancel safety
///
/// Meant to run as its own task; cancelling it just stops listening.
pub async fn run_listener<F, Fut, S, E>(
    backend: &'static str,
    mut connect: F,
    changes: broadcast::Sender<Change>,
    stop: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, E>>,
    S: Stream<Item = String> + Unpin,
    E: std::fmt::Display,
{
    let mut backoff = Change::listener_backoff();
    loop {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connect()) => connected,
        };
        match connected {
            Ok(Ok(mut notices)) => {
                tracing::debug!(backend, "following changes");
                let _ = changes.send(Change::Resync);
                let since = tokio::time::Instant::now();
                loop {
                    let notice = tokio::select! {
                        () = stop.cancelled() => return,
                        notice = notices.next() => notice,
                    };
                    let Some(notice) = notice else { break };
                    match Change::from_notice(&notice) {
                        Some(change) => {
                            let _ = changes.send(change);
                        }
                        None => tracing::warn!(backend, "ignoring a malformed change notice"),
                    }
                }
                tracing::warn!(
                    backend,
                    "the change notification connection dropped; reconnecting"
                );
                if since.elapsed() > HEALTHY_AFTER {
                    backoff.reset();
                }
            }
            Ok(Err(error)) => tracing::warn!(backend, %error, "cannot follow changes"),
            Err(_) => tracing::warn!(backend, "cannot follow changes: no connection within 5 s"),
        }
        // Changes may be missed until the next connection.
        let _ = changes.send(Change::Resync);
        let delay = backoff.next_delay().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
