//! [`Server`]: serves a [`Hub`] over Unix sockets and WebSocket.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use state_sync::{InvalidationSink, Revision, Subscriber, Subscription, Topic};
use state_sync_hub::{Error as HubError, Hub};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::{AccessConfig, Grant};
use crate::frames::{self, FrameError, FrameSink, FrameStream};
use crate::protocol::{
    self, CLIENT_MESSAGE_TYPES, ClientMessage, Envelope, ErrorCode, HubStatus, PROTOCOL_VERSION,
    Secret, ServerMessage, TopicStatus,
};

/// Limits and behaviour of a [`Server`].
///
/// Deserializes from a TOML table (the `[server]` table of `statesync serve
/// --config`): every field is optional and takes the default documented on
/// it; durations are written like `"10s"` or `"500ms"`; an unknown key is an
/// error that names it.
///
/// ```
/// use std::time::Duration;
/// use state_sync_net::ServerConfig;
///
/// let config: ServerConfig = toml::from_str(r#"
///     max_connections = 100
///     idle_timeout = "30s"
/// "#)?;
/// assert_eq!(config.max_connections, 100);
/// assert_eq!(config.idle_timeout, Duration::from_secs(30));
/// assert_eq!(config.write_timeout, ServerConfig::default().write_timeout);
///
/// let unknown = toml::from_str::<ServerConfig>("max_conections = 100").unwrap_err();
/// assert!(unknown.to_string().contains("max_conections"));
/// # Ok::<(), toml::de::Error>(())
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest frame accepted or sent (default 1 MiB). A larger incoming
    /// frame closes the connection with `too_large`.
    pub max_frame_bytes: usize,
    /// Largest snapshot written or served (default 1 MiB − 1 KiB, so a
    /// snapshot always fits a frame with its envelope).
    pub max_snapshot_bytes: usize,
    /// A connection that sends nothing for this long is closed (default
    /// 60 s; clients ping more often).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a new connection has to send `hello` (default 10 s).
    #[serde(with = "humantime_serde")]
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
    /// Longest `clientId`, `sourceId` and `token` accepted, in bytes
    /// (default 1 KiB). Longer ones are refused with `too_large`.
    pub max_field_bytes: usize,
    /// A write to a connection that makes no progress for this long closes
    /// it (default 10 s): a peer that stops reading costs bounded time.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Bytes of answers queued for one connection, waiting to be written
    /// (default 4 MiB; at least one frame always fits). A client that
    /// pipelines requests without reading waits for room, then is closed by
    /// the write timeout.
    pub max_queued_bytes_per_connection: usize,
    /// Bytes of answers queued over all connections (default 64 MiB).
    pub max_queued_bytes: usize,
    /// Open connections at most (default 4 096); one more is answered
    /// `too_many_connections` and closed.
    pub max_connections: usize,
    /// Requests of one connection handled at once (default 64): `set`s of
    /// different topics proceed together while their answers keep the
    /// request order.
    pub max_requests_in_flight: usize,
    /// How long [`Server::shutdown`] waits for connections to finish after
    /// answering the writes in flight (default 5 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
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
            max_field_bytes: 1024,
            write_timeout: Duration::from_secs(10),
            max_queued_bytes_per_connection: 4 << 20,
            max_queued_bytes: 64 << 20,
            max_connections: 4096,
            max_requests_in_flight: 64,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Counters of a running server; from [`Server::stats`], and in a
/// [`HubStatus`] over the wire (camelCase keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
#[non_exhaustive]
pub struct ServerStats {
    /// Open connections.
    pub connections: usize,
    /// Subscriptions, over all connections.
    pub subscriptions: usize,
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
    /// Bytes of answers queued, over all connections.
    pub queued_bytes: usize,
    /// Connections refused because the server was full.
    pub connections_refused: u64,
    /// Connections closed because writing to them failed or stalled.
    pub connections_closed_unwritable: u64,
    /// `Some(last error)` while the hub's storage fails: writes answer
    /// `storage`, reads serve the last known state, which on a shared
    /// storage may be stale.
    pub storage_failure: Option<String>,
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
    /// Room for queued answers over all connections, in bytes.
    queue_budget: Arc<Semaphore>,
    /// Connections open or in their handshake.
    open_connections: AtomicUsize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_connection: AtomicU64,
    unix_paths: Mutex<Vec<PathBuf>>,
    /// One hub subscription per topic, shared by the connections on it.
    fanouts: Mutex<HashMap<Topic, Fanout>>,
    /// Served for `GET /` on WebSocket listeners.
    web_page: Mutex<Option<Bytes>>,
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
    connections_refused: AtomicU64,
    connections_closed_unwritable: AtomicU64,
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
                queue_budget: Arc::new(Semaphore::new(
                    config.max_queued_bytes.min(Semaphore::MAX_PERMITS),
                )),
                open_connections: AtomicUsize::new(0),
                config,
                access,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(1),
                unix_paths: Mutex::new(Vec::new()),
                fanouts: Mutex::new(HashMap::new()),
                web_page: Mutex::new(None),
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, nothing listens (a half-made
    /// socket file is removed or replaced by the next bind).
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, nothing listens.
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

    /// Serves `html` to plain HTTP `GET /` requests on this server's
    /// WebSocket listeners (the same port), e.g. a live view of the hub
    /// built with the JavaScript client. Other paths get `404`. Without a
    /// page, plain HTTP gets `400`. The page is public: it must hold no
    /// secret and ask for the token itself.
    pub fn serve_web_page(&self, html: impl Into<Bytes>) {
        *lock(&self.shared.web_page) = Some(html.into());
    }

    /// Listens for WebSocket connections on `addr` (text frames, one JSON
    /// message each). Returns the bound address.
    ///
    /// # Errors
    ///
    /// Binding fails.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, nothing listens.
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
                let upgrade = tokio::time::timeout(shared.config.handshake_timeout, async {
                    match classify_request(&stream).await {
                        HttpRequest::Upgrade => {}
                        HttpRequest::Broken => return None,
                        HttpRequest::Plain {
                            method,
                            path,
                            head_len,
                        } => {
                            let page = lock(&shared.web_page).clone();
                            let limit = shared.config.write_timeout;
                            answer_plain_http(stream, (method, path, head_len), page, limit).await;
                            return None;
                        }
                    }
                    Some(tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)).await)
                })
                .await;
                let upgrade = match upgrade {
                    Ok(Some(upgrade)) => Ok(upgrade),
                    Ok(None) => return,
                    Err(elapsed) => Err(elapsed),
                };
                match upgrade {
                    Ok(Ok(socket)) => {
                        let (frames, sink) = frames::websocket(socket);
                        let peer = Peer {
                            transport: "websocket",
                            address: peer.to_string(),
                        };
                        serve(shared, frames, sink, peer).await;
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
        self.shared.stats()
    }

    /// Stops accepting connections, finishes the requests each connection
    /// is handling (writes in flight are committed and answered), tells
    /// clients `shutting_down`, closes every connection, then closes the
    /// hub (waiting for queued writes) and removes the socket files.
    ///
    /// Bounded in time: every write to a connection has
    /// [`write_timeout`](ServerConfig::write_timeout), and connections
    /// still open after [`shutdown_grace`](ServerConfig::shutdown_grace)
    /// are left to close on their own (logged).
    ///
    /// # Cancel safety
    ///
    /// Cancelling it leaves the server stopping: no new connections, and
    /// connections wind down by themselves.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        let grace = self.shared.config.shutdown_grace;
        if tokio::time::timeout(grace, self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.shared.open_connections.load(Ordering::Relaxed),
                ?grace,
                "connections still closing after the shutdown grace period; not waiting for them"
            );
        }
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

/// What a new connection on the WebSocket port asks for.
enum HttpRequest {
    /// A WebSocket upgrade: left unread for the handshake.
    Upgrade,
    /// A plain HTTP request; its head is `head_len` bytes.
    Plain {
        method: String,
        path: String,
        head_len: usize,
    },
    /// Closed, or no complete head within 8 KiB.
    Broken,
}

/// Reads what the request head waiting on `stream` asks for. Peeks,
/// consuming nothing, until the head is complete (at most 8 KiB).
async fn classify_request(stream: &tokio::net::TcpStream) -> HttpRequest {
    let mut head = vec![0u8; 8192];
    loop {
        let n = match stream.peek(&mut head).await {
            Ok(0) | Err(_) => return HttpRequest::Broken,
            Ok(n) => n,
        };
        let seen = &head[..n];
        let end = seen.windows(4).position(|w| w == b"\r\n\r\n");
        if end.is_none() && n < head.len() {
            // Only part of the head has arrived; wait for more.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let text = String::from_utf8_lossy(seen).to_ascii_lowercase();
        let upgrade = text.lines().any(|line| {
            line.strip_prefix("upgrade:")
                .is_some_and(|v| v.trim() == "websocket")
        });
        if upgrade {
            return HttpRequest::Upgrade;
        }
        let Some(end) = end else {
            return HttpRequest::Broken;
        };
        let request_line = String::from_utf8_lossy(&seen[..end]);
        let mut parts = request_line.lines().next().unwrap_or("").split(' ');
        return HttpRequest::Plain {
            method: parts.next().unwrap_or("").to_owned(),
            path: parts.next().unwrap_or("").to_owned(),
            head_len: end + 4,
        };
    }
}

/// Answers a plain HTTP request on the WebSocket port: the web page (when
/// the server has one) for `GET /`, else a short refusal.
async fn answer_plain_http(
    mut stream: tokio::net::TcpStream,
    request: (String, String, usize),
    page: Option<Bytes>,
    limit: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (method, path, head_len) = request;
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body): (&str, &str, Bytes) = match (&page, method.as_str(), path) {
        (Some(page), "GET" | "HEAD", "/" | "/index.html") => {
            ("200 OK", "text/html; charset=utf-8", page.clone())
        }
        (Some(_), "GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            Bytes::from_static(b"not found: the page is at /\n"),
        ),
        (Some(_), _, _) => (
            "405 Method Not Allowed",
            "text/plain",
            Bytes::from_static(b"only GET\n"),
        ),
        (None, _, _) => (
            "400 Bad Request",
            "text/plain",
            Bytes::from_static(b"this port speaks the state-sync protocol over WebSocket\n"),
        ),
    };
    // The page keeps to itself: no framing by other sites, no sniffing, no
    // caching (it may show data), no referrer.
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nx-content-type-options: nosniff\r\n\
         x-frame-options: DENY\r\nreferrer-policy: no-referrer\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(limit, async {
        // Consume the head: closing with unread bytes would reset the
        // connection and lose the answer.
        let mut consumed = vec![0u8; head_len];
        stream.read_exact(&mut consumed).await?;
        stream.write_all(head.as_bytes()).await?;
        if method != "HEAD" {
            stream.write_all(&body).await?;
        }
        stream.shutdown().await
    })
    .await;
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
fn serve_byte_stream<R, W>(shared: &Arc<Shared>, read: R, write: W, transport: &'static str)
where
    R: tokio::io::AsyncRead + Send + 'static,
    W: tokio::io::AsyncWrite + Send + 'static,
{
    let (frames, sink) = frames::length_delimited(read, write, shared.config.max_frame_bytes);
    let peer = Peer {
        transport,
        address: transport.to_owned(),
    };
    shared
        .tasks
        .spawn(serve(shared.clone(), frames, sink, peer));
}

/// Where a connection comes from: its transport (a metrics label) and,
/// for logs, its address.
#[derive(Clone)]
struct Peer {
    transport: &'static str,
    address: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
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
            crate::metrics::invalidation_coalesced();
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
    fn stats(&self) -> ServerStats {
        let (connections, pending) = {
            let connections = lock(&self.connections);
            let pending: Vec<usize> = connections
                .values()
                .map(|c| lock(&c.pending).len())
                .collect();
            (connections.len(), pending)
        };
        let c = &self.counters;
        ServerStats {
            connections,
            subscriptions: lock(&self.fanouts)
                .values()
                .map(|fanout| lock(&fanout.members).len())
                .sum(),
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
            queued_bytes: self
                .config
                .max_queued_bytes
                .min(Semaphore::MAX_PERMITS)
                .saturating_sub(self.queue_budget.available_permits()),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
            connections_closed_unwritable: c.connections_closed_unwritable.load(Ordering::Relaxed),
            storage_failure: self.hub.storage_failure(),
        }
    }

    /// The hub's state as `grant` may see it: only topics it may read.
    fn status(&self, grant: &Grant) -> HubStatus {
        let subscribers: HashMap<Topic, usize> = lock(&self.fanouts)
            .iter()
            .map(|(topic, fanout)| (topic.clone(), lock(&fanout.members).len()))
            .collect();
        let mut topics: Vec<TopicStatus> = self
            .hub
            .topics()
            .into_iter()
            .filter(|topic| grant.can_read(topic))
            .filter_map(|topic| {
                let snapshot = self.hub.get_json(&topic).ok()?;
                Some(TopicStatus {
                    subscribers: subscribers.get(&topic).copied().unwrap_or(0),
                    revision: snapshot.revision,
                    bytes: snapshot.data.len(),
                    topic,
                })
            })
            .collect();
        topics.sort_by(|a, b| a.topic.as_str().cmp(b.topic.as_str()));
        let stats = self.stats();
        HubStatus {
            server_id: self.config.server_id.clone(),
            shared_storage: self.hub.shares_storage(),
            stale: stats.storage_failure.is_some(),
            topics,
            damaged_topics: self
                .hub
                .damaged_topics()
                .into_iter()
                .filter(|(topic, _)| grant.can_read(topic))
                .map(|(topic, _)| topic.as_str().to_owned())
                .collect(),
            stats,
        }
    }

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

/// Counts a connection while it lives; refused when the server is full.
struct ConnectionSlot<'a>(&'a Shared);

impl<'a> ConnectionSlot<'a> {
    fn take(shared: &'a Shared) -> Option<Self> {
        let limit = shared.config.max_connections;
        shared
            .open_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(shared))
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends one frame within the write timeout.
async fn send_within(sink: &mut FrameSink, frame: Bytes, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, sink.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!(
            "no write progress for {limit:?}: the peer is not reading"
        )),
    }
}

/// Sends a last frame and closes, both within the write timeout.
async fn send_and_close(sink: &mut FrameSink, frame: Bytes, limit: Duration) {
    if send_within(sink, frame, limit).await.is_ok() {
        let _ = tokio::time::timeout(limit, sink.close()).await;
    }
}

/// Runs one connection: handshake, then requests until the peer leaves,
/// goes idle, breaks framing, cannot be written to, or the server shuts
/// down.
async fn serve(shared: Arc<Shared>, mut frames: FrameStream, mut sink: FrameSink, peer: Peer) {
    let write_timeout = shared.config.write_timeout;
    let Some(_slot) = ConnectionSlot::take(&shared) else {
        shared
            .counters
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        crate::metrics::connection_refused();
        tracing::warn!(%peer, limit = shared.config.max_connections, "connection refused: too many connections");
        let busy = protocol::error(
            None,
            ErrorCode::TooManyConnections,
            "the server has as many connections as it may; try again later",
        );
        send_and_close(&mut sink, busy, write_timeout).await;
        return;
    };
    let (client_id, grant) = match handshake(&shared, &mut frames, &peer.address).await {
        Ok(accepted) => accepted,
        Err(refusal) => {
            if let Some(refusal) = refusal {
                send_and_close(&mut sink, refusal, write_timeout).await;
            }
            return;
        }
    };
    let welcome = protocol::encode(&ServerMessage::Welcome {
        version: PROTOCOL_VERSION,
        server_id: shared.config.server_id.clone(),
    });
    if send_within(&mut sink, welcome, write_timeout)
        .await
        .is_err()
    {
        return;
    }
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let connection = Arc::new(Connection {
        pending: Mutex::new(HashMap::new()),
        wake: Notify::new(),
    });
    lock(&shared.connections).insert(id, connection.clone());
    crate::metrics::connection_opened(peer.transport);
    tracing::debug!(connection = id, %peer, %client_id, "client connected");

    // Closed by the writer when the connection cannot be written to.
    let unwritable = CancellationToken::new();
    let (answers, queue) = mpsc::channel(shared.config.max_requests_in_flight.max(1) * 2);
    // Every log line of this connection, its requests' included, carries
    // who it is: one client's trouble can be followed.
    let span = tracing::info_span!(
        "connection",
        connection = id,
        transport = peer.transport,
        peer = %peer,
        client = %client_id,
    );
    let writer = tokio::spawn(
        write_loop(
            shared.clone(),
            connection.clone(),
            sink,
            queue,
            unwritable.clone(),
            peer.clone(),
        )
        .instrument(span.clone()),
    );
    let mut session = Session {
        shared: shared.clone(),
        id,
        connection,
        grant,
        client_id,
        transport: peer.transport,
        subscriptions: HashSet::new(),
        answers,
        budget: Arc::new(Semaphore::new(
            shared
                .config
                .max_queued_bytes_per_connection
                .clamp(1, Semaphore::MAX_PERMITS),
        )),
        unwritable,
    };
    let goodbye = session
        .read_loop(&mut frames)
        .instrument(span.clone())
        .await;
    for topic in &session.subscriptions {
        shared.leave(topic, id);
    }
    crate::metrics::subscriptions_changed(peer.transport, -(session.subscriptions.len() as f64));
    if let Some(goodbye) = goodbye {
        session.queue(goodbye).await;
    }
    drop(session);
    let _ = writer.await;
    lock(&shared.connections).remove(&id);
    crate::metrics::connection_closed(peer.transport);
    tracing::debug!(connection = id, %peer, "client disconnected");
}

/// Reads `hello`. `Err(Some(frame))`: refused with that answer;
/// `Err(None)`: the peer left or the server is stopping.
async fn handshake(
    shared: &Shared,
    frames: &mut FrameStream,
    peer: &str,
) -> Result<(String, Grant), Option<Bytes>> {
    let first = tokio::select! {
        () = shared.shutdown.cancelled() => return Err(None),
        first = tokio::time::timeout(shared.config.handshake_timeout, frames.next()) => first,
    };
    let refuse = |code, message: &str| Err(Some(protocol::error(None, code, message)));
    let frame = match first {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(FrameError::TooLarge))) => {
            return refuse(ErrorCode::TooLarge, "frame larger than the limit");
        }
        Ok(Some(Err(FrameError::InvalidUtf8))) => {
            return refuse(ErrorCode::BadRequest, "text frame is not valid UTF-8");
        }
        Ok(_) => return Err(None),
        Err(_) => {
            return refuse(
                ErrorCode::NotAuthenticated,
                "no hello within the handshake timeout",
            );
        }
    };
    match ClientMessage::decode(&frame) {
        Ok(ClientMessage::Hello {
            version,
            client_id,
            token,
        }) => {
            let max = shared.config.max_field_bytes;
            if version != PROTOCOL_VERSION {
                refuse(
                    ErrorCode::UnsupportedVersion,
                    &format!(
                        "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
                    ),
                )
            } else if let Some(what) = over_limit(
                &[
                    ("clientId", Some(client_id.as_str())),
                    ("token", token.as_ref().map(Secret::expose)),
                ],
                max,
            ) {
                refuse(ErrorCode::TooLarge, &what)
            } else if let Some(grant) = shared
                .access
                .authenticate(token.as_ref().map(Secret::expose))
            {
                Ok((client_id, grant))
            } else {
                tracing::warn!(%peer, %client_id, "rejected: bad token");
                refuse(ErrorCode::Unauthorized, "missing or invalid token")
            }
        }
        Ok(_) => refuse(
            ErrorCode::NotAuthenticated,
            "the first message must be hello",
        ),
        Err(e) => refuse(ErrorCode::BadRequest, &format!("expected hello: {e}")),
    }
}

/// The first of `fields` longer than `max` bytes, described.
fn over_limit(fields: &[(&str, Option<&str>)], max: usize) -> Option<String> {
    fields.iter().find_map(|(name, value)| {
        let len = value.map_or(0, |v| v.len());
        (len > max).then(|| format!("{name} is {len} bytes, over the limit of {max}"))
    })
}

/// An answer waiting to be written, holding its room in the queue budgets.
struct Queued {
    frame: Bytes,
    _room: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Writes answers and pending invalidations until the reader is done, each
/// write within the write timeout. A connection that cannot be written to
/// is closed, with the reason logged, never left silent.
async fn write_loop(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    mut sink: FrameSink,
    mut answers: mpsc::Receiver<Queued>,
    unwritable: CancellationToken,
    peer: Peer,
) {
    let counters = &shared.counters;
    let limit = shared.config.write_timeout;
    let mut batch: Vec<Pending> = Vec::new();
    loop {
        let result = tokio::select! {
            biased;
            answer = answers.recv() => match answer {
                Some(queued) => {
                    crate::metrics::bytes_out(peer.transport, queued.frame.len());
                    send_within(&mut sink, queued.frame, limit).await
                }
                None => break,
            },
            () = connection.wake.notified() => {
                batch.extend(lock(&connection.pending).drain().map(|(_, pending)| pending));
                let written = async {
                    for Pending { frame, inlined } in batch.drain(..) {
                        counters.invalidations_sent.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::invalidation_sent(inlined);
                        crate::metrics::bytes_out(peer.transport, frame.len());
                        if inlined > 0 {
                            counters.snapshots_inlined.fetch_add(1, Ordering::Relaxed);
                            counters
                                .snapshot_bytes_inlined
                                .fetch_add(inlined as u64, Ordering::Relaxed);
                        }
                        sink.feed(frame).await?;
                    }
                    sink.flush().await
                };
                match tokio::time::timeout(limit, written).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("write failed: {e}")),
                    Err(_) => Err(format!("no write progress for {limit:?}: the peer is not reading")),
                }
            }
        };
        if let Err(reason) = result {
            counters
                .connections_closed_unwritable
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, %reason, "closing the connection");
            unwritable.cancel();
            return;
        }
    }
    let _ = tokio::time::timeout(limit, sink.close()).await;
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    connection: Arc<Connection>,
    grant: Grant,
    client_id: String,
    /// The metrics label of the connection's transport.
    transport: &'static str,
    subscriptions: HashSet<Topic>,
    answers: mpsc::Sender<Queued>,
    /// Room for this connection's queued answers, in bytes.
    budget: Arc<Semaphore>,
    unwritable: CancellationToken,
}

type Answer = Result<Bytes, Bytes>;

/// A request being handled: the topic it concerns and its answer.
type InFlight = Pin<Box<dyn Future<Output = (Option<Topic>, Bytes)> + Send>>;

impl Session {
    /// Queues an answer for the writer once there is room for it; `false`
    /// when the connection is closing.
    async fn queue(&self, frame: Bytes) -> bool {
        let frame = if frame.len() > self.shared.config.max_frame_bytes {
            // Never hand the codec a frame it cannot send.
            tracing::error!(
                len = frame.len(),
                "an answer is larger than the frame limit; sending an error instead"
            );
            protocol::error(None, ErrorCode::Internal, "answer too large to send")
        } else {
            frame
        };
        let config = &self.shared.config;
        let room = |budget: &Arc<Semaphore>, size: usize| {
            // One answer may take the whole budget, never more: it always fits.
            let n = frame.len().clamp(1, size.clamp(1, Semaphore::MAX_PERMITS));
            budget
                .clone()
                .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
        };
        let acquired = async {
            let own = room(&self.budget, config.max_queued_bytes_per_connection)
                .await
                .ok()?;
            let all = room(&self.shared.queue_budget, config.max_queued_bytes)
                .await
                .ok()?;
            Some((own, all))
        };
        let room = tokio::select! {
            room = acquired => room,
            () = self.unwritable.cancelled() => None,
        };
        let Some(room) = room else { return false };
        self.answers
            .send(Queued { frame, _room: room })
            .await
            .is_ok()
    }

    /// Handles requests; `set`s run concurrently (requests on one topic in
    /// order), answers are queued in request order. Returns the last
    /// message to send before closing, if any.
    async fn read_loop(&mut self, frames: &mut FrameStream) -> Option<Bytes> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let max_in_flight = config.max_requests_in_flight.max(1);
        let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
        // Requests in flight per topic, so a later one on the same topic
        // waits for them: per topic, requests take effect in order.
        let mut busy: HashMap<Topic, usize> = HashMap::new();
        // One timer for the connection, pushed back lazily: arming a new
        // one for every frame costs more than the frame's own work.
        let mut heard = Instant::now();
        let idle = tokio::time::sleep(config.idle_timeout);
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(idle, shutdown);
        loop {
            let next = tokio::select! {
                biased;
                () = self.unwritable.cancelled() => return None,
                Some((topic, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                    release(&mut busy, topic.as_ref());
                    if !self.queue(answer).await {
                        return None;
                    }
                    continue;
                }
                () = &mut shutdown => {
                    // Writes in flight are committed: answer them first.
                    while let Some((_, answer)) = in_flight.next().await {
                        if !self.queue(answer).await {
                            return None;
                        }
                    }
                    return Some(protocol::error(None, ErrorCode::ShuttingDown, "server is shutting down"));
                }
                () = &mut idle => {
                    let deadline = heard + config.idle_timeout;
                    if deadline <= Instant::now() && in_flight.is_empty() {
                        return Some(protocol::error(
                            None,
                            ErrorCode::IdleTimeout,
                            "no message within the idle timeout",
                        ));
                    }
                    idle.as_mut().reset(deadline.max(Instant::now() + config.idle_timeout / 4));
                    continue;
                }
                next = frames.next(), if in_flight.len() < max_in_flight => next,
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
                Some(Err(FrameError::InvalidUtf8)) => {
                    return Some(protocol::error(
                        None,
                        ErrorCode::BadRequest,
                        "text frame is not valid UTF-8",
                    ));
                }
                Some(Err(FrameError::Io(e))) => {
                    tracing::debug!(error = %e, "read failed");
                    return None;
                }
                Some(Ok(frame)) => frame,
            };
            let message = match ClientMessage::decode(&frame) {
                Ok(message) => message,
                Err(e) => {
                    let answer = classify_bad_frame(&frame, &e);
                    in_flight.push_back(Box::pin(std::future::ready((None, answer))));
                    continue;
                }
            };
            // Per topic, in order: wait for the topic's earlier requests.
            if let Some(topic) = message_topic(&message)
                && busy.contains_key(topic)
            {
                while busy.contains_key(topic) {
                    let Some((done, answer)) = in_flight.next().await else {
                        break;
                    };
                    release(&mut busy, done.as_ref());
                    if !self.queue(answer).await {
                        return None;
                    }
                }
            }
            let kind = message_kind(&message);
            let span = tracing::debug_span!(
                "request",
                id = message_id(&message),
                kind,
                topic = message_topic(&message),
            );
            let started = Instant::now();
            let handled = self.handle(message).instrument(span.clone()).await;
            if let Some(topic) = &handled.topic {
                *busy.entry(topic.clone()).or_default() += 1;
            }
            let topic = handled.topic;
            let answer = handled.answer;
            in_flight.push_back(Box::pin(
                async move {
                    let answer = answer.await;
                    let elapsed = started.elapsed();
                    crate::metrics::request_done(kind, elapsed);
                    tracing::debug!(elapsed_us = elapsed.as_micros() as u64, "answered");
                    (topic, answer)
                }
                .instrument(span),
            ));
        }
    }

    async fn handle(&mut self, message: ClientMessage) -> Handled {
        // On a shared storage another hub may have created the topic.
        if let ClientMessage::Get { topic, .. } | ClientMessage::Subscribe { topic, .. } = &message
            && self.shared.hub.shares_storage()
            && let Ok(topic) = Topic::new(topic)
            && !self.shared.hub.is_open(&topic)
        {
            let _ = self.shared.hub.open_if_stored(&topic).await;
        }
        let now = |answer: Answer| Handled::now(answer.unwrap_or_else(|e| e));
        match message {
            ClientMessage::Hello { .. } => now(Err(protocol::error(
                None,
                ErrorCode::BadRequest,
                "already said hello",
            ))),
            ClientMessage::Ping { id } => now(Ok(protocol::encode(&ServerMessage::Pong { id }))),
            ClientMessage::Status { id } => now(Ok(protocol::encode(&ServerMessage::Status {
                id,
                status: self.shared.status(&self.grant),
            }))),
            ClientMessage::Subscribe { id, topic, inline } => {
                now(self.subscribe(id, &topic, inline).await)
            }
            ClientMessage::Unsubscribe { id, topic } => now(self.unsubscribe(id, &topic)),
            ClientMessage::Get {
                id,
                topic,
                if_newer_than,
            } => now(self.get(id, &topic, if_newer_than.as_deref())),
            ClientMessage::Set {
                id,
                topic,
                data,
                expected_revision,
                source_id,
            } => match self.prepare_set(id, &topic, expected_revision.as_deref(), source_id) {
                Ok((topic, expected, source_id)) => {
                    let shared = self.shared.clone();
                    Handled {
                        topic: Some(topic.clone()),
                        answer: Box::pin(async move {
                            commit(&shared, id, topic, &data, expected, source_id)
                                .await
                                .unwrap_or_else(|e| e)
                        }),
                    }
                }
                Err(error) => Handled::now(error),
            },
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
        if self.subscriptions.insert(topic.clone()) {
            crate::metrics::subscriptions_changed(self.transport, 1.0);
        }
        Ok(protocol::encode(&ServerMessage::Subscribed {
            id,
            topic,
            revision: current.revision,
        }))
    }

    fn unsubscribe(&mut self, id: u64, topic: &str) -> Answer {
        let topic = parse_topic(id, topic)?;
        if self.subscriptions.remove(&topic) {
            self.shared.leave(&topic, self.id);
            crate::metrics::subscriptions_changed(self.transport, -1.0);
        }
        lock(&self.connection.pending).remove(&topic);
        Ok(protocol::encode(&ServerMessage::Ok { id, revision: None }))
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
        crate::metrics::snapshot_sent();
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

    /// Checks a `set` before it runs: topic, permission, revision, fields.
    fn prepare_set(
        &self,
        id: u64,
        topic: &str,
        expected: Option<&str>,
        source_id: Option<String>,
    ) -> Result<(Topic, Option<Revision>, String), Bytes> {
        let topic = parse_topic(id, topic)?;
        if !self.grant.can_write(&topic) {
            return Err(forbidden(id, "write", &topic));
        }
        let expected = expected.map(|r| parse_revision(id, r)).transpose()?;
        let max = self.shared.config.max_field_bytes;
        if let Some(what) = over_limit(&[("sourceId", source_id.as_deref())], max) {
            return Err(protocol::error(Some(id), ErrorCode::TooLarge, what));
        }
        let source_id = source_id.unwrap_or_else(|| self.client_id.clone());
        Ok((topic, expected, source_id))
    }
}

/// A handled request: the topic it concerns, and its answer (ready, or a
/// write being committed).
struct Handled {
    topic: Option<Topic>,
    answer: Pin<Box<dyn Future<Output = Bytes> + Send>>,
}

impl Handled {
    fn now(answer: Bytes) -> Self {
        Handled {
            topic: None,
            answer: Box::pin(std::future::ready(answer)),
        }
    }
}

/// The topic a request concerns, for per-topic ordering.
/// The request id, for the request's span.
fn message_id(message: &ClientMessage) -> Option<u64> {
    match message {
        ClientMessage::Hello { .. } => None,
        ClientMessage::Subscribe { id, .. }
        | ClientMessage::Unsubscribe { id, .. }
        | ClientMessage::Get { id, .. }
        | ClientMessage::Set { id, .. }
        | ClientMessage::Ping { id }
        | ClientMessage::Status { id } => Some(*id),
    }
}

/// The request type, as a metrics label.
fn message_kind(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Hello { .. } => "hello",
        ClientMessage::Subscribe { .. } => "subscribe",
        ClientMessage::Unsubscribe { .. } => "unsubscribe",
        ClientMessage::Get { .. } => "get",
        ClientMessage::Set { .. } => "set",
        ClientMessage::Ping { .. } => "ping",
        ClientMessage::Status { .. } => "status",
    }
}

fn message_topic(message: &ClientMessage) -> Option<&str> {
    match message {
        ClientMessage::Subscribe { topic, .. }
        | ClientMessage::Unsubscribe { topic, .. }
        | ClientMessage::Get { topic, .. }
        | ClientMessage::Set { topic, .. } => Some(topic),
        _ => None,
    }
}

fn release(busy: &mut HashMap<Topic, usize>, topic: Option<&Topic>) {
    if let Some(topic) = topic
        && let Some(count) = busy.get_mut(topic)
    {
        *count -= 1;
        if *count == 0 {
            busy.remove(topic);
        }
    }
}

/// Commits a checked `set`, creating the topic when allowed.
async fn commit(
    shared: &Shared,
    id: u64,
    topic: Topic,
    data: &RawValue,
    expected: Option<Revision>,
    source_id: String,
) -> Answer {
    let data = data.get().as_bytes();
    let limit = shared.config.max_snapshot_bytes;
    if data.len() > limit {
        return Err(protocol::error(
            Some(id),
            ErrorCode::TooLarge,
            format!("data of {} bytes exceeds the limit of {limit}", data.len()),
        ));
    }
    let hub = &shared.hub;
    if !hub.is_open(&topic) {
        if !shared.config.create_topics {
            return Err(hub_error(id, &HubError::UnknownTopic { topic }));
        }
        hub.json_topic(topic.as_str())
            .await
            .map_err(|e| hub_error(id, &e))?;
    }
    match hub
        .set_json_limited(&topic, data, expected, Some(source_id), limit)
        .await
    {
        Ok(revision) => {
            shared.counters.writes.fetch_add(1, Ordering::Relaxed);
            Ok(protocol::encode(&ServerMessage::Ok {
                id,
                revision: Some(revision),
            }))
        }
        Err(HubError::Conflict { current, .. }) => Ok(protocol::encode(&ServerMessage::Conflict {
            id,
            topic,
            current_revision: current,
        })),
        Err(e) => Err(hub_error(id, &e)),
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

/// A hub error as a client sees it: the code, and a message that never
/// names server paths (storage and damage details go to the log).
fn hub_error(id: u64, error: &HubError) -> Bytes {
    let code = ErrorCode::from_hub(error);
    let message = match error {
        HubError::Storage { topic, .. } => {
            tracing::error!(error = %state_sync::ErrorChain(error), "storage failed");
            match topic {
                Some(topic) => format!("storage failed for `{topic}`; nothing was committed"),
                None => "storage failed; nothing was committed".to_owned(),
            }
        }
        HubError::Damaged { topic, .. } => format!(
            "topic `{topic}` is damaged and quarantined until an operator restores it; see the server log"
        ),
        _ => state_sync::ErrorChain(error).to_string(),
    };
    protocol::error(Some(id), code, message)
}
