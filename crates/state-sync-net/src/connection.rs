//! The client's connection task: connect, serve, reconnect with backoff, as
//! an explicit state machine.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use state_sync::{Backoff, InvalidationEvent, ProtocolError, ProtocolErrorKind, Topic};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Carried, ConnectionStatus, Endpoint, Shared, lock, raw_bytes};
use crate::frames::{self, FrameError, FrameSink, FrameStream};
use crate::protocol::{ClientMessage, ErrorCode, PROTOCOL_VERSION, ServerMessage};

/// Where the connection task is.
///
/// ```text
///            ┌──────────── refused (bad token, version) ──────────────▶ Stopped
///            │                                                            ▲
/// Connecting ┼── welcome ──▶ Connected ── connection fails ──▶ Waiting ───┤ attempts used up
///    ▲       │                                                   │
///    │       └── cannot connect ─────────────────────────────────┤
///    └──────────────────────── delay passed ─────────────────────┘
/// ```
///
/// Any state ends in `Closed` when the client is dropped.
enum State {
    /// Opening a connection and saying hello.
    Connecting,
    /// Serving a connection that said welcome, until it fails.
    Connected(FrameStream, FrameSink),
    /// Waiting before the next attempt, after `error`.
    Waiting { error: String },
    /// Not retrying: refused for good, or the reconnect policy gave up.
    /// Waits for the client to be dropped.
    Stopped,
    /// The client was dropped.
    Closed,
}

/// What the state machine keeps across states.
struct Machine {
    shared: Arc<Shared>,
    closed: CancellationToken,
    backoff: Backoff,
    /// Whether a connection was made before (then a new one resyncs).
    connected_before: bool,
}

/// How long a connection must stay up before its backoff starts over: a hub
/// that drops connections right after the handshake is not hammered.
fn healthy_after(shared: &Shared) -> Duration {
    shared.options.ping_interval.min(Duration::from_secs(5))
}

/// Runs the connection task until the client is dropped.
pub(crate) async fn run(shared: Arc<Shared>, closed: CancellationToken) {
    let mut machine = Machine {
        backoff: shared.options.reconnect.backoff(),
        shared,
        closed,
        connected_before: false,
    };
    let mut state = State::Connecting;
    loop {
        state = match state {
            State::Closed => break,
            state => machine.step(state).await,
        };
    }
    machine.shared.set_status(ConnectionStatus::Closed);
}

impl Machine {
    /// One transition.
    async fn step(&mut self, state: State) -> State {
        let shared = self.shared.clone();
        match state {
            State::Connecting => {
                shared.set_status(ConnectionStatus::Connecting);
                let attempt = tokio::select! {
                    () = self.closed.cancelled() => return State::Closed,
                    attempt = open(&shared) => attempt,
                };
                match attempt {
                    Ok((frames, sink)) => State::Connected(frames, sink),
                    Err(Failure::Retry(error)) => State::Waiting { error },
                    Err(Failure::Refused(reason)) => {
                        tracing::error!(endpoint = %shared.endpoint, %reason, "refused by the hub; not retrying");
                        self.stop(ConnectionStatus::Refused(reason.clone()), &reason);
                        State::Stopped
                    }
                }
            }
            State::Connected(frames, sink) => {
                let since = Instant::now();
                let error = serve(&shared, &self.closed, frames, sink, self.connected_before).await;
                self.connected_before = true;
                if self.closed.is_cancelled() {
                    return State::Closed;
                }
                if since.elapsed() >= healthy_after(&shared) {
                    self.backoff.reset();
                }
                State::Waiting { error }
            }
            State::Waiting { error } => {
                tracing::debug!(endpoint = %shared.endpoint, %error, "disconnected");
                let Some(delay) = self.backoff.next_delay() else {
                    let reason = format!(
                        "gave up after {} reconnect attempts: {error}",
                        self.backoff.retries() + 1
                    );
                    tracing::error!(endpoint = %shared.endpoint, %reason, "not reconnecting");
                    self.stop(ConnectionStatus::GaveUp(reason.clone()), &reason);
                    return State::Stopped;
                };
                shared.set_status(ConnectionStatus::Disconnected(error));
                tokio::select! {
                    () = self.closed.cancelled() => State::Closed,
                    () = tokio::time::sleep(delay) => State::Connecting,
                }
            }
            State::Stopped => {
                self.closed.cancelled().await;
                State::Closed
            }
            State::Closed => State::Closed,
        }
    }

    /// Reports a final status, and tells every handle.
    fn stop(&self, status: ConnectionStatus, reason: &str) {
        self.shared.set_status(status);
        for sink in self.shared.all_sinks() {
            sink.connection_lost(reason.to_owned());
        }
    }
}

enum Failure {
    Retry(String),
    Refused(String),
}

/// Connects to a local endpoint: a Unix socket or a named local socket.
async fn local_stream(
    endpoint: &Endpoint,
    max: usize,
) -> Result<(FrameStream, FrameSink), Failure> {
    let retry = |e: &dyn fmt::Display| Failure::Retry(e.to_string());
    match endpoint {
        #[cfg(unix)]
        Endpoint::Unix(path) => {
            let (read, write) = crate::platform::connect_unix(path)
                .await
                .map_err(|e| retry(&e))?;
            Ok(frames::length_delimited(read, write, max))
        }
        Endpoint::Local(name) => {
            use interprocess::local_socket::GenericNamespaced;
            use interprocess::local_socket::tokio::{Stream, prelude::*};
            let name = name
                .as_str()
                .to_ns_name::<GenericNamespaced>()
                .map_err(|e| Failure::Refused(format!("bad local socket name: {e}")))?;
            // A busy Windows pipe fails at once; the reconnect loop retries.
            let stream = Stream::connect(name).await.map_err(|e| retry(&e))?;
            let (read, write) = tokio::io::split(stream);
            Ok(frames::length_delimited(read, write, max))
        }
        other => Err(Failure::Refused(format!(
            "{other} is not supported on this platform"
        ))),
    }
}

/// Connects and says hello, within the request timeout.
async fn open(shared: &Shared) -> Result<(FrameStream, FrameSink), Failure> {
    let limit = shared.options.request_timeout;
    tokio::time::timeout(limit, open_unbounded(shared))
        .await
        .unwrap_or_else(|_| Err(Failure::Retry(format!("no welcome within {limit:?}"))))
}

/// Bytes a client's WebSocket reads at a time.
const WEBSOCKET_READ_BUFFER: usize = 8 * 1024;
/// Bytes of outgoing frames gathered before writing; each request is
/// flushed anyway.
const WEBSOCKET_WRITE_BUFFER: usize = 16 * 1024;

async fn open_unbounded(shared: &Shared) -> Result<(FrameStream, FrameSink), Failure> {
    let retry = |e: &dyn fmt::Display| Failure::Retry(e.to_string());
    let max = shared.options.max_frame_bytes;
    let (mut frames, mut sink) = match &shared.endpoint {
        Endpoint::Unix(_) | Endpoint::Local(_) => local_stream(&shared.endpoint, max).await?,
        Endpoint::WebSocket(url) => {
            // tungstenite zero-fills its whole read buffer before every read
            // (128 KiB by default, most of a replica's CPU when frames are
            // small); a larger frame is read in several turns.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(WEBSOCKET_READ_BUFFER)
                .write_buffer_size(WEBSOCKET_WRITE_BUFFER)
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
            let (socket, _) =
                tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                    .await
                    .map_err(|e| retry(&e))?;
            frames::websocket(socket)
        }
    };
    let hello = ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        client_id: shared.options.client_id.clone(),
        token: shared.options.token.clone(),
    };
    let hello = serde_json::to_vec(&hello).map_err(|e| retry(&e))?;
    sink.send(Bytes::from(hello)).await.map_err(|e| retry(&e))?;
    match frames.next().await {
        Some(Ok(frame)) => match ServerMessage::decode(&frame) {
            Ok(ServerMessage::Welcome { .. }) => Ok((frames, sink)),
            Ok(ServerMessage::Error { code, message, .. }) => {
                let reason = format!("{code}: {message}");
                match code {
                    ErrorCode::Unauthorized | ErrorCode::UnsupportedVersion => {
                        Err(Failure::Refused(reason))
                    }
                    _ => Err(Failure::Retry(reason)),
                }
            }
            Ok(other) => Err(Failure::Retry(format!("expected welcome, got {other:?}"))),
            Err(e) => Err(retry(&e)),
        },
        Some(Err(e)) => Err(retry(&e)),
        None => Err(Failure::Retry(
            "connection closed during the handshake".into(),
        )),
    }
}

/// Serves one connection until it fails; returns why. Reading, writing and
/// the liveness check run independently: a large frame being written never
/// holds up reading (or the other way round), and a hub that stops
/// answering is noticed even while a write is blocked.
async fn serve(
    shared: &Arc<Shared>,
    closed: &CancellationToken,
    mut frames: FrameStream,
    mut sink: FrameSink,
    reconnected: bool,
) -> String {
    let (outgoing, mut queue) = mpsc::channel::<Bytes>(256);
    *lock(&shared.outgoing) = Some(outgoing);
    shared.set_status(ConnectionStatus::Connected);
    tracing::debug!(endpoint = %shared.endpoint, "connected");

    // Resubscribe, then make every handle refresh: invalidations may have
    // been missed while disconnected. Runs beside the loop below, which
    // carries its requests.
    let resubscribe = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let topics: Vec<Topic> = lock(&shared.topics).keys().cloned().collect();
            for topic in topics {
                if let Err(e) = shared.ensure_subscribed(&topic).await {
                    tracing::warn!(%topic, error = %e, "resubscribe failed");
                    for sink in &shared.sinks_of(&topic) {
                        sink.report_error(format!("resubscribing `{topic}` failed: {e}"));
                    }
                }
            }
            if reconnected {
                for sink in shared.all_sinks() {
                    sink.connection_restored();
                }
            }
        })
    };

    let ping_every = shared.options.ping_interval;
    let write_limit = shared.options.request_timeout;
    let heard = std::sync::Mutex::new(Instant::now());
    let reader = async {
        loop {
            match frames.next().await {
                Some(Ok(frame)) => {
                    *lock(&heard) = Instant::now();
                    dispatch(shared, &frame);
                }
                Some(Err(FrameError::Closed)) | None => {
                    return "the hub closed the connection".to_owned();
                }
                Some(Err(e)) => return e.to_string(),
            }
        }
    };
    let writer = async {
        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            let frame = tokio::select! {
                frame = queue.recv() => match frame {
                    Some(frame) => frame,
                    None => return "request queue closed".to_owned(),
                },
                _ = ping.tick() => {
                    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                    Bytes::from(serde_json::to_vec(&ClientMessage::Ping { id }).unwrap_or_default())
                }
            };
            match tokio::time::timeout(write_limit, sink.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return e.to_string(),
                Err(_) => {
                    return format!(
                        "no write progress for {write_limit:?}: the hub is not reading"
                    );
                }
            }
        }
    };
    let watchdog = async {
        loop {
            tokio::time::sleep(ping_every).await;
            if lock(&heard).elapsed() > ping_every * 2 {
                return "the hub stopped answering".to_owned();
            }
        }
    };
    let probe = async {
        let Some(every) = shared.options.probe_interval else {
            return std::future::pending::<String>().await;
        };
        let mut probe = tokio::time::interval(every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            probe.tick().await;
            let shared = shared.clone();
            tokio::spawn(async move {
                let topics: Vec<Topic> = lock(&shared.topics).keys().cloned().collect();
                for topic in topics {
                    let _ = shared.probe(&topic).await;
                }
            });
        }
    };
    let error = first_to_end([
        Box::pin(async {
            closed.cancelled().await;
            "client closed".to_owned()
        }),
        Box::pin(reader),
        Box::pin(writer),
        Box::pin(watchdog),
        Box::pin(probe),
    ])
    .await;
    resubscribe.abort();
    shared.connection_ended();
    if !closed.is_cancelled() {
        for sink in shared.all_sinks() {
            sink.connection_lost(error.clone());
        }
    }
    if closed.is_cancelled() {
        // A clean goodbye, briefly; a failed connection is just dropped (its
        // unsent frames would only delay the reconnect).
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    }
    error
}

type Branch<'a> = std::pin::Pin<Box<dyn Future<Output = String> + Send + 'a>>;

/// What the first of `branches` to end returns; the others are dropped.
///
/// Unlike `select!`, which polls every branch whenever any is woken, each
/// branch here has its own waker: a frame read polls the reader alone, not
/// the writer's queue, its ping timer, the watchdog and the close signal
/// too (a tenth of a replica's CPU per frame, measured).
async fn first_to_end<const N: usize>(branches: [Branch<'_>; N]) -> String {
    let mut running: futures::stream::FuturesUnordered<Branch<'_>> = branches.into_iter().collect();
    running.next().await.unwrap_or_default()
}

/// Routes one frame from the server.
fn dispatch(shared: &Shared, frame: &[u8]) {
    let message = match ServerMessage::decode(frame) {
        Ok(m) => m,
        Err(e) => {
            // A bad invalidation is a protocol error for its topic's handles.
            let raw: Option<serde_json::Value> = serde_json::from_slice(frame).ok();
            let topic = raw
                .as_ref()
                .and_then(|v| v.get("topic")?.as_str())
                .and_then(|t| Topic::new(t).ok());
            tracing::warn!(error = %e, "undecodable message from the hub");
            if let Some(topic) = topic {
                let error = ProtocolError::new(ProtocolErrorKind::Malformed(e.to_string()))
                    .with_topic(topic.clone())
                    .with_raw_bytes(frame);
                for sink in &shared.sinks_of(&topic) {
                    sink.protocol_error(error.clone());
                }
            }
            return;
        }
    };
    let id = match message {
        ServerMessage::Invalidation {
            topic,
            revision,
            source_id,
            snapshot,
            delta,
        } => {
            let mut event = InvalidationEvent::new(topic, revision);
            event.source_id = source_id;
            let carried = match (snapshot, delta) {
                (Some(s), _) => Carried::Snapshot(s.revision, raw_bytes(s.data)),
                (None, Some(delta)) => Carried::Delta(delta),
                (None, None) => Carried::Nothing,
            };
            shared.deliver(&event, carried);
            return;
        }
        ServerMessage::Welcome { .. } => return,
        ServerMessage::Error {
            id: None,
            code,
            ref message,
        } => {
            if code == ErrorCode::ShuttingDown {
                tracing::debug!(%message, "the hub is shutting down");
            } else {
                tracing::warn!(%code, %message, "hub error");
            }
            return;
        }
        ServerMessage::Error { id: Some(id), .. }
        | ServerMessage::Subscribed { id, .. }
        | ServerMessage::Snapshot { id, .. }
        | ServerMessage::NotModified { id, .. }
        | ServerMessage::Ok { id, .. }
        | ServerMessage::Conflict { id, .. }
        | ServerMessage::Pong { id }
        | ServerMessage::Status { id, .. } => id,
    };
    if let Some(reply) = lock(&shared.waiting).remove(&id) {
        let _ = reply.send(message);
    }
}
