//! [`Server`]: serves a [`Hub`] over Unix sockets and WebSocket.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

mod fanout;
mod listeners;
mod process;
mod session;
#[cfg(unix)]
mod unix_stream;
mod writer;

pub use process::ProcessStats;

use fanout::*;
use listeners::*;
use session::*;
use writer::*;

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
    /// Bytes of snapshot data written inside invalidations; a snapshot
    /// sent as a delta counts the delta frame's bytes.
    pub snapshot_bytes_inlined: u64,
    /// Snapshots written inside invalidations as deltas (included in
    /// `snapshots_inlined`).
    pub snapshots_as_deltas: u64,
    /// Deltas computed: one per revision and topic while some connection
    /// asks for deltas on the topic.
    pub deltas_computed: u64,
    /// Deltas computed and then not sent, as larger than half the document
    /// or than the inline limit (a document rewritten all over).
    pub deltas_too_large: u64,
    /// Time spent computing deltas, in microseconds: inside the
    /// announcement of each revision, bounded per delta.
    pub delta_micros: u64,
    /// Bytes of every frame written to clients (answers, invalidations,
    /// errors), before transport framing.
    pub bytes_sent: u64,
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
    snapshots_as_deltas: AtomicU64,
    deltas_computed: AtomicU64,
    deltas_too_large: AtomicU64,
    delta_micros: AtomicU64,
    bytes_sent: AtomicU64,
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

impl Shared {
    fn stats(&self) -> ServerStats {
        let (connections, pending) = {
            let connections = lock(&self.connections);
            let pending: Vec<usize> = connections
                .values()
                .map(|c| lock(&c.outbox).pending.len())
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
            snapshots_as_deltas: c.snapshots_as_deltas.load(Ordering::Relaxed),
            deltas_computed: c.deltas_computed.load(Ordering::Relaxed),
            deltas_too_large: c.deltas_too_large.load(Ordering::Relaxed),
            delta_micros: c.delta_micros.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
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
            process: ProcessStats::current(),
        }
    }
}
