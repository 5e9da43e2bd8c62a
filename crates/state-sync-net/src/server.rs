//! [`Server`]: serves a [`Hub`] over Unix sockets and WebSocket.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use state_sync::{InvalidationSink, Revision, Subscriber, Subscription, Topic};
use state_sync_hub::{Error as HubError, Hub};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{AccessConfig, Grant};
use crate::frames::{self, FrameError, FrameSink, FrameStream};
use crate::protocol::{
    self, CLIENT_MESSAGE_TYPES, ClientMessage, Envelope, ErrorCode, PROTOCOL_VERSION, ServerMessage,
};

/// Limits and behaviour of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest frame accepted or sent (default 1 MiB). A larger incoming
    /// frame closes the connection with `too_large`.
    pub max_frame_bytes: usize,
    /// Largest snapshot written or served (default 1 MiB − 1 KiB, so a
    /// snapshot always fits a frame with its envelope).
    pub max_snapshot_bytes: usize,
    /// A connection that sends nothing for this long is closed (default
    /// 60 s; clients ping more often).
    pub idle_timeout: Duration,
    /// How long a new connection has to send `hello` (default 10 s).
    pub handshake_timeout: Duration,
    /// Whether `set` on an unknown topic creates it as a JSON topic
    /// (default `true`).
    pub create_topics: bool,
    /// Largest snapshot carried inside an invalidation, for subscriptions
    /// that ask for it (default 16 KiB; `0` never inlines; capped at
    /// `max_snapshot_bytes`). Inlining saves each replica a fetch round
    /// trip; larger snapshots are fetched.
    pub inline_snapshot_max_bytes: usize,
    /// Sent in `welcome`.
    pub server_id: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_bytes: 1 << 20,
            max_snapshot_bytes: (1 << 20) - 1024,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            create_topics: true,
            inline_snapshot_max_bytes: 16 * 1024,
            server_id: "state-sync".into(),
        }
    }
}

/// Counters of a running server; from [`Server::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Open connections.
    pub connections: usize,
    /// Invalidations waiting to be written, over all connections.
    pub pending_invalidations: usize,
    /// The most invalidations waiting on one connection (at most one per
    /// subscribed topic).
    pub max_pending_per_connection: usize,
    /// Invalidations written.
    pub invalidations_sent: u64,
    /// Invalidation frames encoded: at most two per revision and topic
    /// (with and without the inline snapshot), shared by every connection.
    pub invalidation_frames_encoded: u64,
    /// Invalidations replaced by a newer one for the same topic before
    /// being written (slow readers).
    pub invalidations_coalesced: u64,
    /// Snapshots written in answer to `get`.
    pub snapshots_sent: u64,
    /// Bytes of snapshot data written in answer to `get`.
    pub snapshot_bytes_sent: u64,
    /// Snapshots written inside invalidations (see
    /// [`ServerConfig::inline_snapshot_max_bytes`]).
    pub snapshots_inlined: u64,
    /// Bytes of snapshot data written inside invalidations.
    pub snapshot_bytes_inlined: u64,
    /// Writes committed.
    pub writes: u64,
}

/// Serves a [`Hub`] to other processes: over a Unix socket (created
/// `0600`) and over WebSocket.
///
/// Each connection gets at most one pending invalidation per subscribed
/// topic (the newest): a client that reads slowly or not at all costs
/// bounded memory and never slows the writer or other clients. Bad input
/// gets an error with a stable [`ErrorCode`]; framing errors close that
/// connection only.
///
/// # Examples
///
/// ```
/// use state_sync_hub::Hub;
/// use state_sync_net::{Client, ClientOptions, Endpoint, Server};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let hub = Hub::in_memory();
/// hub.json_topic("settings").await?;
/// let server = Server::new(hub);
/// let path = server.listen_unix(dir.path().join("hub.sock")).await?;
///
/// let client = Client::connect(Endpoint::Unix(path), ClientOptions::new("doc"));
/// client.wait_connected().await;
/// let revision = client.set_json("settings", r#"{"theme":"dark"}"#, None).await?;
/// let (at, data) = client.get_json("settings").await?;
/// assert_eq!((at, &data[..]), (revision, &br#"{"theme":"dark"}"#[..]));
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    hub: Hub,
    config: ServerConfig,
    access: AccessConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_connection: AtomicU64,
    unix_paths: Mutex<Vec<PathBuf>>,
    /// One hub subscription per topic, shared by the connections on it.
    fanouts: Mutex<HashMap<Topic, Fanout>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    invalidations_sent: AtomicU64,
    invalidation_frames_encoded: AtomicU64,
    invalidations_coalesced: AtomicU64,
    snapshots_sent: AtomicU64,
    snapshot_bytes_sent: AtomicU64,
    snapshots_inlined: AtomicU64,
    snapshot_bytes_inlined: AtomicU64,
    writes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Server {
    /// A server for `hub` with open access and default limits.
    #[must_use]
    pub fn new(hub: Hub) -> Self {
        Server::with_config(hub, ServerConfig::default(), AccessConfig::open())
    }

    /// A server for `hub` with `config` and `access` rules.
    #[must_use]
    pub fn with_config(hub: Hub, config: ServerConfig, access: AccessConfig) -> Self {
        if access.is_open() {
            tracing::warn!("no access tokens configured: every client may read and write");
        }
        Server {
            shared: Arc::new(Shared {
                hub,
                config,
                access,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(1),
                unix_paths: Mutex::new(Vec::new()),
                fanouts: Mutex::new(HashMap::new()),
                counters: Arc::new(Counters::default()),
            }),
        }
    }

    /// The hub served.
    #[must_use]
    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    /// Listens on a Unix socket at `path` (mode `0600`: only this user can
    /// connect). Unix only; [`listen_local`](Self::listen_local) works
    /// everywhere. A stale socket file from a crashed server is replaced; a
    /// live one is an error. Returns the path.
    ///
    /// # Errors
    ///
    /// Binding fails, or another server is listening at `path`.
    #[cfg(unix)]
    pub async fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> io::Result<PathBuf> {
        let path = path.as_ref().to_owned();
        let listener = crate::platform::bind_unix(&path).await?;
        lock(&self.shared.unix_paths).push(path.clone());
        tracing::info!(path = %path.display(), "listening on unix socket");
        let accepted = futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await, listener))
        });
        spawn_accept_loop(&self.shared, accepted, |shared, (stream, _)| {
            let (read, write) = stream.into_split();
            serve_byte_stream(shared, read, write, "unix");
        });
        Ok(path)
    }

    /// Listens on a named local socket, through `interprocess`: a named
    /// pipe `\\.\pipe\<name>` on Windows, a socket in the abstract
    /// namespace on Linux (no file), a socket file under `/tmp` on other
    /// Unix systems. The same code serves on every platform. Unlike
    /// [`listen_unix`](Self::listen_unix), no file permission limits who
    /// connects: configure tokens. Returns the name.
    ///
    /// # Errors
    ///
    /// The name is invalid, or another server listens on it.
    pub async fn listen_local(&self, name: &str) -> io::Result<String> {
        use interprocess::local_socket::tokio::prelude::*;
        use interprocess::local_socket::{GenericNamespaced, ListenerOptions};
        let listener = ListenerOptions::new()
            .name(name.to_ns_name::<GenericNamespaced>()?)
            .create_tokio()?;
        tracing::info!(%name, "listening on local socket");
        let accepted = futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await, listener))
        });
        spawn_accept_loop(&self.shared, accepted, |shared, stream| {
            let (read, write) = tokio::io::split(stream);
            serve_byte_stream(shared, read, write, "local");
        });
        Ok(name.to_owned())
    }

    /// Listens for WebSocket connections on `addr` (text frames, one JSON
    /// message each). Returns the bound address.
    ///
    /// # Errors
    ///
    /// Binding fails.
    pub async fn listen_websocket(
        &self,
        addr: impl tokio::net::ToSocketAddrs,
    ) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "listening for websocket connections");
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(self.shared.config.max_frame_bytes))
            .max_frame_size(Some(self.shared.config.max_frame_bytes));
        let accepted = futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await, listener))
        });
        spawn_accept_loop(&self.shared, accepted, move |shared, (stream, peer)| {
            // Small frames must not wait for Nagle's algorithm.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let shared = shared.clone();
            shared.tasks.clone().spawn(async move {
                let upgrade = tokio::time::timeout(
                    shared.config.handshake_timeout,
                    tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)),
                )
                .await;
                match upgrade {
                    Ok(Ok(socket)) => {
                        let (frames, sink) = frames::websocket(socket);
                        serve(shared, frames, sink, peer.to_string()).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "websocket upgrade failed")
                    }
                    Err(_) => tracing::debug!(%peer, "websocket upgrade timed out"),
                }
            });
        });
        Ok(local)
    }

    /// Counters and queue sizes.
    #[must_use]
    pub fn stats(&self) -> ServerStats {
        let connections = lock(&self.shared.connections);
        let pending: Vec<usize> = connections
            .values()
            .map(|c| lock(&c.pending).len())
            .collect();
        let c = &self.shared.counters;
        ServerStats {
            connections: connections.len(),
            pending_invalidations: pending.iter().sum(),
            max_pending_per_connection: pending.iter().copied().max().unwrap_or(0),
            invalidations_sent: c.invalidations_sent.load(Ordering::Relaxed),
            invalidation_frames_encoded: c.invalidation_frames_encoded.load(Ordering::Relaxed),
            invalidations_coalesced: c.invalidations_coalesced.load(Ordering::Relaxed),
            snapshots_sent: c.snapshots_sent.load(Ordering::Relaxed),
            snapshot_bytes_sent: c.snapshot_bytes_sent.load(Ordering::Relaxed),
            snapshots_inlined: c.snapshots_inlined.load(Ordering::Relaxed),
            snapshot_bytes_inlined: c.snapshot_bytes_inlined.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting connections, finishes the request each connection
    /// is handling (writes in flight are committed and answered), tells
    /// clients `shutting_down`, closes every connection, then closes the
    /// hub (waiting for queued writes) and removes the socket files.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        self.shared.hub.close().await;
        for path in lock(&self.shared.unix_paths).drain(..) {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("server stopped");
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Accepts connections until shutdown, handing each to `handle`; a failed
/// accept is logged and retried shortly.
fn spawn_accept_loop<S: Send + 'static>(
    shared: &Arc<Shared>,
    accepted: impl futures::Stream<Item = io::Result<S>> + Send + 'static,
    handle: impl Fn(&Arc<Shared>, S) + Send + 'static,
) {
    let shared = shared.clone();
    shared.tasks.clone().spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let next = tokio::select! {
                () = shared.shutdown.cancelled() => break,
                next = accepted.next() => next,
            };
            match next {
                Some(Ok(stream)) => handle(&shared, stream),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => break,
            }
        }
    });
}

/// Serves a byte-stream connection (Unix or local socket) with
/// length-delimited frames.
fn serve_byte_stream<R, W>(shared: &Arc<Shared>, read: R, write: W, peer: &str)
where
    R: tokio::io::AsyncRead + Send + 'static,
    W: tokio::io::AsyncWrite + Send + 'static,
{
    let (frames, sink) = frames::length_delimited(read, write, shared.config.max_frame_bytes);
    shared
        .tasks
        .spawn(serve(shared.clone(), frames, sink, peer.to_owned()));
}

/// One connection's outgoing invalidation frames: the newest per topic.
struct Connection {
    pending: Mutex<HashMap<Topic, Pending>>,
    wake: Notify,
}

/// An invalidation frame waiting to be written, shared by every connection
/// it goes to.
#[derive(Clone)]
struct Pending {
    frame: Bytes,
    /// Bytes of snapshot data the frame carries (0: none).
    inlined: usize,
}

impl Connection {
    /// Called inside the hub's publish: never blocks.
    fn push(&self, topic: &Topic, pending: Pending, counters: &Counters) {
        let replaced = lock(&self.pending).insert(topic.clone(), pending).is_some();
        if replaced {
            counters
                .invalidations_coalesced
                .fetch_add(1, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }
}

/// A connection subscribed to a topic, and whether it asked for inline
/// snapshots.
struct Member {
    connection: Arc<Connection>,
    inline: bool,
}

type Members = Arc<Mutex<HashMap<u64, Member>>>;

/// The server's subscription to one topic: each invalidation is encoded
/// once and its frame handed to every connection subscribed to the topic.
struct Fanout {
    members: Members,
    _subscription: Subscription,
}

impl Shared {
    /// Subscribes `connection` to `topic`'s invalidations.
    async fn join(
        &self,
        topic: &Topic,
        id: u64,
        member: Member,
    ) -> Result<(), state_sync::BoxError> {
        if let Some(fanout) = lock(&self.fanouts).get(topic) {
            lock(&fanout.members).insert(id, member);
            return Ok(());
        }
        let members: Members = Arc::default();
        let sink = {
            let members = members.clone();
            let counters = self.counters.clone();
            let hub = self.hub.clone();
            // Never past the snapshot limit, which keeps frames in bounds.
            let inline_max = self
                .config
                .inline_snapshot_max_bytes
                .min(self.config.max_snapshot_bytes);
            InvalidationSink::from_fn(topic.clone(), move |event| {
                let source_id = event.source_id.as_deref();
                let plain = || Pending {
                    frame: protocol::encode_invalidation(
                        &event.topic,
                        event.revision,
                        source_id,
                        None,
                    ),
                    inlined: 0,
                };
                // The current snapshot: at this revision or newer, as a
                // batch of commits is announced one by one.
                let with_snapshot = || match hub.get_json(&event.topic) {
                    Ok(s) if s.revision >= event.revision && s.data.len() <= inline_max => {
                        Pending {
                            frame: protocol::encode_invalidation(
                                &event.topic,
                                event.revision,
                                source_id,
                                Some((s.revision, &s.data)),
                            ),
                            inlined: s.data.len(),
                        }
                    }
                    _ => plain(),
                };
                let (mut plain_frame, mut inline_frame) = (None, None);
                for member in lock(&members).values() {
                    let frame = if member.inline {
                        &mut inline_frame
                    } else {
                        &mut plain_frame
                    };
                    let pending = frame.get_or_insert_with(|| {
                        counters
                            .invalidation_frames_encoded
                            .fetch_add(1, Ordering::Relaxed);
                        if member.inline {
                            with_snapshot()
                        } else {
                            plain()
                        }
                    });
                    member
                        .connection
                        .push(&event.topic, pending.clone(), &counters);
                }
            })
        };
        let subscription = self.hub.subscribe(topic, sink).await?;
        // Another connection may have joined meanwhile: keep its fanout.
        let mut fanouts = lock(&self.fanouts);
        let fanout = fanouts.entry(topic.clone()).or_insert(Fanout {
            members,
            _subscription: subscription,
        });
        lock(&fanout.members).insert(id, member);
        Ok(())
    }

    /// Unsubscribes connection `id` from `topic`; the last one out ends the
    /// server's hub subscription.
    fn leave(&self, topic: &Topic, id: u64) {
        let emptied = {
            let mut fanouts = lock(&self.fanouts);
            let now_empty = fanouts.get(topic).is_some_and(|fanout| {
                let mut members = lock(&fanout.members);
                members.remove(&id);
                members.is_empty()
            });
            if now_empty {
                fanouts.remove(topic)
            } else {
                None
            }
        };
        // Unsubscribe from the hub outside our lock.
        drop(emptied);
    }
}

/// Runs one connection: handshake, then requests until the peer leaves,
/// goes idle, breaks framing, or the server shuts down.
async fn serve(shared: Arc<Shared>, mut frames: FrameStream, mut sink: FrameSink, peer: String) {
    let Some((client_id, grant)) = handshake(&shared, &mut frames, &mut sink, &peer).await else {
        let _ = sink.close().await;
        return;
    };
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let connection = Arc::new(Connection {
        pending: Mutex::new(HashMap::new()),
        wake: Notify::new(),
    });
    lock(&shared.connections).insert(id, connection.clone());
    tracing::debug!(connection = id, %peer, %client_id, "client connected");

    let (responses, queue) = mpsc::channel(64);
    let writer = tokio::spawn(write_loop(shared.clone(), connection.clone(), sink, queue));
    let mut session = Session {
        shared: shared.clone(),
        id,
        connection,
        grant,
        client_id,
        subscriptions: HashSet::new(),
    };
    let goodbye = session.read_loop(&mut frames, &responses).await;
    for topic in &session.subscriptions {
        shared.leave(topic, id);
    }
    if let Some(goodbye) = goodbye {
        let _ = responses.send(goodbye).await;
    }
    drop(responses);
    let _ = writer.await;
    lock(&shared.connections).remove(&id);
    tracing::debug!(connection = id, %peer, "client disconnected");
}

async fn handshake(
    shared: &Shared,
    frames: &mut FrameStream,
    sink: &mut FrameSink,
    peer: &str,
) -> Option<(String, Grant)> {
    let first = tokio::select! {
        () = shared.shutdown.cancelled() => return None,
        first = tokio::time::timeout(shared.config.handshake_timeout, frames.next()) => first,
    };
    let frame = match first {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(FrameError::TooLarge))) => {
            let _ = sink
                .send(protocol::error(
                    None,
                    ErrorCode::TooLarge,
                    "frame larger than the limit",
                ))
                .await;
            return None;
        }
        Ok(_) => return None,
        Err(_) => {
            let _ = sink
                .send(protocol::error(
                    None,
                    ErrorCode::NotAuthenticated,
                    "no hello within the handshake timeout",
                ))
                .await;
            return None;
        }
    };
    let refuse = |code, message: &str| protocol::error(None, code, message);
    let answer = match ClientMessage::decode(&frame) {
        Ok(ClientMessage::Hello {
            version,
            client_id,
            token,
        }) => {
            if version != PROTOCOL_VERSION {
                Err(refuse(
                    ErrorCode::UnsupportedVersion,
                    &format!(
                        "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
                    ),
                ))
            } else if let Some(grant) = shared.access.authenticate(token.as_deref()) {
                Ok((client_id, grant))
            } else {
                tracing::warn!(%peer, %client_id, "rejected: bad token");
                Err(refuse(ErrorCode::Unauthorized, "missing or invalid token"))
            }
        }
        Ok(_) => Err(refuse(
            ErrorCode::NotAuthenticated,
            "the first message must be hello",
        )),
        Err(e) => Err(refuse(
            ErrorCode::BadRequest,
            &format!("expected hello: {e}"),
        )),
    };
    match answer {
        Ok((client_id, grant)) => {
            let welcome = protocol::encode(&ServerMessage::Welcome {
                version: PROTOCOL_VERSION,
                server_id: shared.config.server_id.clone(),
            });
            sink.send(welcome).await.ok()?;
            Some((client_id, grant))
        }
        Err(error) => {
            let _ = sink.send(error).await;
            None
        }
    }
}

/// Writes answers and pending invalidations until the reader is done.
async fn write_loop(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    mut sink: FrameSink,
    mut answers: mpsc::Receiver<Bytes>,
) {
    let counters = &shared.counters;
    let mut batch: Vec<Pending> = Vec::new();
    loop {
        let result = tokio::select! {
            biased;
            answer = answers.recv() => match answer {
                Some(frame) => sink.send(frame).await,
                None => break,
            },
            () = connection.wake.notified() => {
                batch.extend(lock(&connection.pending).drain().map(|(_, pending)| pending));
                let mut result = Ok(());
                for Pending { frame, inlined } in batch.drain(..) {
                    counters.invalidations_sent.fetch_add(1, Ordering::Relaxed);
                    if inlined > 0 {
                        counters.snapshots_inlined.fetch_add(1, Ordering::Relaxed);
                        counters
                            .snapshot_bytes_inlined
                            .fetch_add(inlined as u64, Ordering::Relaxed);
                    }
                    result = sink.feed(frame).await;
                    if result.is_err() {
                        break;
                    }
                }
                match result {
                    Ok(()) => sink.flush().await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "write failed; closing");
            // Keep draining answers so the reader never blocks on us.
            while answers.recv().await.is_some() {}
            return;
        }
    }
    let _ = sink.close().await;
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    connection: Arc<Connection>,
    grant: Grant,
    client_id: String,
    subscriptions: HashSet<Topic>,
}

type Answer = Result<Bytes, Bytes>;

impl Session {
    /// Handles requests in order; returns the last message to send before
    /// closing, if any.
    async fn read_loop(
        &mut self,
        frames: &mut FrameStream,
        answers: &mpsc::Sender<Bytes>,
    ) -> Option<Bytes> {
        let shared = self.shared.clone();
        let config = &shared.config;
        // One timer for the connection, pushed back lazily: arming a new
        // one for every frame costs more than the frame's own work.
        let mut heard = Instant::now();
        let idle = tokio::time::sleep(config.idle_timeout);
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(idle, shutdown);
        loop {
            let next = tokio::select! {
                () = &mut shutdown => {
                    return Some(protocol::error(None, ErrorCode::ShuttingDown, "server is shutting down"));
                }
                () = &mut idle => {
                    let deadline = heard + config.idle_timeout;
                    if deadline <= Instant::now() {
                        return Some(protocol::error(
                            None,
                            ErrorCode::IdleTimeout,
                            "no message within the idle timeout",
                        ));
                    }
                    idle.as_mut().reset(deadline);
                    continue;
                }
                next = frames.next() => next,
            };
            heard = Instant::now();
            let frame = match next {
                None | Some(Err(FrameError::Closed)) => return None,
                Some(Err(FrameError::TooLarge)) => {
                    return Some(protocol::error(
                        None,
                        ErrorCode::TooLarge,
                        format!("frame larger than {} bytes", config.max_frame_bytes),
                    ));
                }
                Some(Err(FrameError::Io(e))) => {
                    tracing::debug!(error = %e, "read failed");
                    return None;
                }
                Some(Ok(frame)) => frame,
            };
            let answer = self.handle(&frame).await.unwrap_or_else(|error| error);
            if answers.send(answer).await.is_err() {
                return None;
            }
        }
    }

    async fn handle(&mut self, frame: &[u8]) -> Answer {
        let message = ClientMessage::decode(frame).map_err(|e| classify_bad_frame(frame, &e))?;
        match message {
            ClientMessage::Hello { .. } => Err(protocol::error(
                None,
                ErrorCode::BadRequest,
                "already said hello",
            )),
            ClientMessage::Ping { id } => Ok(protocol::encode(&ServerMessage::Pong { id })),
            ClientMessage::Subscribe { id, topic, inline } => {
                self.subscribe(id, &topic, inline).await
            }
            ClientMessage::Unsubscribe { id, topic } => {
                let topic = parse_topic(id, &topic)?;
                if self.subscriptions.remove(&topic) {
                    self.shared.leave(&topic, self.id);
                }
                lock(&self.connection.pending).remove(&topic);
                Ok(protocol::encode(&ServerMessage::Ok { id, revision: None }))
            }
            ClientMessage::Get {
                id,
                topic,
                if_newer_than,
            } => self.get(id, &topic, if_newer_than.as_deref()),
            ClientMessage::Set {
                id,
                topic,
                data,
                expected_revision,
                source_id,
            } => {
                let source_id = source_id.unwrap_or_else(|| self.client_id.clone());
                self.set(
                    id,
                    &topic,
                    data.get().as_bytes(),
                    expected_revision.as_deref(),
                    source_id,
                )
                .await
            }
        }
    }

    fn readable(&self, id: u64, topic: &str) -> Result<Topic, Bytes> {
        let topic = parse_topic(id, topic)?;
        if !self.grant.can_read(&topic) {
            return Err(forbidden(id, "read", &topic));
        }
        Ok(topic)
    }

    async fn subscribe(&mut self, id: u64, topic: &str, inline: bool) -> Answer {
        let topic = self.readable(id, topic)?;
        let current = self
            .shared
            .hub
            .get_json(&topic)
            .map_err(|e| hub_error(id, &e))?;
        // Subscribing again (the client's probe) may change `inline`.
        let member = Member {
            connection: self.connection.clone(),
            inline,
        };
        self.shared
            .join(&topic, self.id, member)
            .await
            .map_err(|e| protocol::error(Some(id), ErrorCode::UnknownTopic, e.to_string()))?;
        self.subscriptions.insert(topic.clone());
        Ok(protocol::encode(&ServerMessage::Subscribed {
            id,
            topic,
            revision: current.revision,
        }))
    }

    fn get(&self, id: u64, topic: &str, if_newer_than: Option<&str>) -> Answer {
        let topic = self.readable(id, topic)?;
        let known = if_newer_than.map(|r| parse_revision(id, r)).transpose()?;
        let snapshot = self
            .shared
            .hub
            .get_json(&topic)
            .map_err(|e| hub_error(id, &e))?;
        if known.is_some_and(|known| known >= snapshot.revision) {
            return Ok(protocol::encode(&ServerMessage::NotModified {
                id,
                topic,
                revision: snapshot.revision,
            }));
        }
        if snapshot.data.len() > self.shared.config.max_snapshot_bytes {
            return Err(protocol::error(
                Some(id),
                ErrorCode::TooLarge,
                format!(
                    "snapshot of {} bytes exceeds the limit of {}",
                    snapshot.data.len(),
                    self.shared.config.max_snapshot_bytes
                ),
            ));
        }
        let counters = &self.shared.counters;
        counters.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        counters
            .snapshot_bytes_sent
            .fetch_add(snapshot.data.len() as u64, Ordering::Relaxed);
        Ok(protocol::encode_snapshot(
            id,
            &topic,
            snapshot.revision,
            &snapshot.data,
        ))
    }

    async fn set(
        &self,
        id: u64,
        topic: &str,
        data: &[u8],
        expected: Option<&str>,
        source_id: String,
    ) -> Answer {
        let topic = parse_topic(id, topic)?;
        if !self.grant.can_write(&topic) {
            return Err(forbidden(id, "write", &topic));
        }
        let expected = expected.map(|r| parse_revision(id, r)).transpose()?;
        let limit = self.shared.config.max_snapshot_bytes;
        if data.len() > limit {
            return Err(protocol::error(
                Some(id),
                ErrorCode::TooLarge,
                format!("data of {} bytes exceeds the limit of {limit}", data.len()),
            ));
        }
        let hub = &self.shared.hub;
        if !hub.is_open(&topic) {
            if !self.shared.config.create_topics {
                return Err(hub_error(id, &HubError::UnknownTopic { topic }));
            }
            hub.json_topic(topic.as_str())
                .await
                .map_err(|e| hub_error(id, &e))?;
        }
        match hub.set_json(&topic, data, expected, Some(source_id)).await {
            Ok(revision) => {
                self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
                Ok(protocol::encode(&ServerMessage::Ok {
                    id,
                    revision: Some(revision),
                }))
            }
            Err(HubError::Conflict { current, .. }) => {
                Ok(protocol::encode(&ServerMessage::Conflict {
                    id,
                    topic,
                    current_revision: current,
                }))
            }
            Err(e) => Err(hub_error(id, &e)),
        }
    }
}

/// The error for a frame that does not decode: not a message at all, an
/// unknown type, or a known type with bad fields.
fn classify_bad_frame(frame: &[u8], error: &serde_json::Error) -> Bytes {
    match serde_json::from_slice::<Envelope>(frame) {
        Err(e) => protocol::error(None, ErrorCode::BadRequest, format!("not a message: {e}")),
        Ok(envelope) if !CLIENT_MESSAGE_TYPES.contains(&envelope.kind.as_str()) => protocol::error(
            envelope.id,
            ErrorCode::UnknownMessage,
            format!("unknown message type `{}`", envelope.kind),
        ),
        Ok(envelope) => protocol::error(envelope.id, ErrorCode::BadRequest, error.to_string()),
    }
}

fn parse_topic(id: u64, topic: &str) -> Result<Topic, Bytes> {
    Topic::new(topic).map_err(|e| protocol::error(Some(id), ErrorCode::InvalidTopic, e.to_string()))
}

fn parse_revision(id: u64, revision: &str) -> Result<Revision, Bytes> {
    revision.parse().map_err(|e| {
        protocol::error(
            Some(id),
            ErrorCode::InvalidRevision,
            format!("`{revision}`: {e}"),
        )
    })
}

fn forbidden(id: u64, what: &str, topic: &Topic) -> Bytes {
    protocol::error(
        Some(id),
        ErrorCode::Forbidden,
        format!("may not {what} topic `{topic}`"),
    )
}

fn hub_error(id: u64, error: &HubError) -> Bytes {
    let message = state_sync::ErrorChain(error).to_string();
    protocol::error(Some(id), ErrorCode::from_hub(error), message)
}
