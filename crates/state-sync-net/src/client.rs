//! [`Client`]: one reconnecting connection per process and hub, shared by
//! every topic handle.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use state_sync::{
    BoxError, FetchError, FetchRequest, Fetched, InvalidationEvent, InvalidationSink,
    ProtocolError, ProtocolErrorKind, Provider, Revision, SnapshotEnvelope, Subscriber,
    Subscription, Topic,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::TopicMap;
pub use crate::client_options::ClientOptions;
pub use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::protocol::{ClientMessage, ErrorCode, HubStatus, ServerMessage};
use crate::remote_topic::RemoteTopic;

/// The state of a client's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionStatus {
    /// Connecting (first time or again).
    Connecting,
    /// Connected and authenticated.
    Connected,
    /// Not connected; retrying after a delay. Carries the last error.
    Disconnected(String),
    /// Refused for good (bad token, unsupported version): not retrying.
    Refused(String),
    /// The reconnect policy's attempts ran out (a finite
    /// [`ClientOptions::reconnect`]): not retrying.
    GaveUp(String),
    /// The client was dropped.
    Closed,
}

/// A connection to a hub server, shared by every topic of this process.
///
/// # Recovery
///
/// - It reconnects with the backoff of [`ClientOptions::reconnect`]
///   (exponential, with jitter). The backoff starts over only once a
///   connection has stayed up for a while (the ping interval, at most 5 s),
///   so a hub that drops every connection right after the handshake is not
///   hammered. When a finite policy's attempts run out, the status becomes
///   [`ConnectionStatus::GaveUp`] and it stops; a refusal (bad token,
///   unsupported version) is [`ConnectionStatus::Refused`], also final.
/// - After reconnecting it resubscribes every topic and tells every handle
///   to refresh ([`InvalidationSink::connection_restored`]), because
///   invalidations may have been missed.
/// - Reading, writing and the liveness check run independently: a hub that
///   stops answering (no frame for two ping intervals) is dropped even
///   while a large write is blocked, and a write that makes no progress
///   for the request timeout drops the connection too.
/// - A topic's hub-side subscription is shared by its handles: a handle's
///   `start` succeeds only once the hub confirmed it, and a subscribe that
///   failed or was cancelled leaves the next handle to subscribe itself.
///
/// Fetches are conditional, so an up-to-date replica transfers no data.
/// Cheap to clone; the connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

/// Owned by the `Client` clones; its drop ends the connection task.
struct ClientInner {
    shared: Arc<Shared>,
    closed: CancellationToken,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

pub(crate) struct Shared {
    pub(crate) options: ClientOptions,
    pub(crate) endpoint: Endpoint,
    status: watch::Sender<ConnectionStatus>,
    /// Requests for the connection task; `None` while disconnected.
    pub(crate) outgoing: Mutex<Option<mpsc::Sender<Bytes>>>,
    pub(crate) waiting: Mutex<HashMap<u64, oneshot::Sender<ServerMessage>>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) topics: Mutex<TopicMap<TopicSinks>>,
    next_sink: AtomicU64,
    /// Counts connections, so a subscription made on an old one is not
    /// mistaken for one on the current connection.
    connection: AtomicU64,
    /// Counts connections ended, changed under the topics' lock: a fetched
    /// snapshot is kept as a delta base only if no connection ended or
    /// began during its fetch.
    ended: AtomicU64,
}

/// A topic's sinks, shared with the topic's record: iterating them needs
/// no lock.
pub(crate) struct Sinks(Arc<Vec<(u64, InvalidationSink)>>);

impl<'a> IntoIterator for &'a Sinks {
    type Item = &'a InvalidationSink;
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (u64, InvalidationSink)>,
        fn(&'a (u64, InvalidationSink)) -> &'a InvalidationSink,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(_, sink)| sink)
    }
}

/// What an invalidation carried of its snapshot.
pub(crate) enum Carried {
    Nothing,
    Snapshot(Revision, Bytes),
    Delta(crate::protocol::SnapshotDelta),
}

/// The handles of one topic and its subscription on the hub.
pub(crate) struct TopicSinks {
    /// Copied on write only while a delivery holds it, so a delivery takes
    /// the list without allocating.
    sinks: Arc<Vec<(u64, InvalidationSink)>>,
    /// The newest revision heard of, for the probe.
    seen: Option<Revision>,
    /// The newest snapshot an invalidation carried, on this connection.
    inlined: Option<(Revision, Bytes)>,
    /// The hub-side subscription; handles wait on it.
    remote: watch::Sender<Remote>,
}

impl Default for TopicSinks {
    fn default() -> Self {
        TopicSinks {
            sinks: Arc::default(),
            seen: None,
            inlined: None,
            remote: watch::channel(Remote::Unsubscribed).0,
        }
    }
}

/// A topic's subscription on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    /// None on the current connection.
    Unsubscribed,
    /// One handle is asking for it; the others wait for the outcome.
    Subscribing,
    /// Confirmed on connection number `connection`.
    Subscribed { connection: u64 },
}

/// Claims a topic's subscription; if dropped before [`finish`](Self::finish)
/// (the subscribing future was cancelled), gives the claim back so another
/// handle can subscribe.
struct Claim<'a> {
    shared: &'a Shared,
    topic: &'a Topic,
    finished: bool,
}

impl Claim<'_> {
    fn finish(mut self, subscribed_on: Option<u64>) {
        self.finished = true;
        self.set(subscribed_on);
    }

    fn set(&self, subscribed_on: Option<u64>) {
        let current = self.shared.connection.load(Ordering::Acquire);
        if let Some(t) = lock(&self.shared.topics).get(self.topic) {
            t.remote.send_replace(match subscribed_on {
                Some(connection) if connection == current => Remote::Subscribed { connection },
                _ => Remote::Unsubscribed,
            });
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.set(None);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Client {
    /// Starts connecting to `endpoint` in the background; returns at once.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    #[must_use]
    pub fn connect(endpoint: Endpoint, options: ClientOptions) -> Client {
        let (status, _) = watch::channel(ConnectionStatus::Connecting);
        let shared = Arc::new(Shared {
            options,
            endpoint,
            status,
            outgoing: Mutex::new(None),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            topics: Mutex::default(),
            next_sink: AtomicU64::new(1),
            connection: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        });
        let closed = CancellationToken::new();
        tokio::spawn(crate::connection::run(shared.clone(), closed.clone()));
        Client {
            inner: Arc::new(ClientInner { shared, closed }),
        }
    }

    /// The connection's status.
    #[must_use]
    pub fn status(&self) -> ConnectionStatus {
        self.inner.shared.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    #[must_use]
    pub fn watch_status(&self) -> watch::Receiver<ConnectionStatus> {
        self.inner.shared.status.subscribe()
    }

    /// Waits until connected (or refused for good, given up, or closed);
    /// returns the status then.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches the status.
    pub async fn wait_connected(&self) -> ConnectionStatus {
        let mut status = self.watch_status();
        let reached = status
            .wait_for(|s| {
                matches!(
                    s,
                    ConnectionStatus::Connected
                        | ConnectionStatus::Refused(_)
                        | ConnectionStatus::GaveUp(_)
                        | ConnectionStatus::Closed
                )
            })
            .await
            .map(|s| s.clone());
        reached.unwrap_or(ConnectionStatus::Closed)
    }

    /// A typed handle on `topic`: the [`Subscriber`] and [`Provider`] of an
    /// engine replicating it.
    ///
    /// # Errors
    ///
    /// An invalid topic name.
    pub fn topic<T>(
        &self,
        topic: impl AsRef<str>,
    ) -> Result<RemoteTopic<T>, state_sync::InvalidTopic> {
        Ok(RemoteTopic::new(self.clone(), Topic::new(topic)?))
    }

    /// The current revision and JSON data of `topic`.
    ///
    /// # Errors
    ///
    /// [`Error`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn get_json(&self, topic: impl AsRef<str>) -> Result<(Revision, Bytes), Error> {
        match self.fetch(topic.as_ref(), None).await? {
            Fetched::Snapshot(s) => Ok((s.revision, s.data)),
            Fetched::NotModified { .. } => {
                Err(Error::Protocol("not modified without a revision".into()))
            }
        }
    }

    /// Writes JSON `data` to `topic`; with `expected`, a compare-and-set.
    /// Returns the new revision.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the current revision;
    /// [`Error::Json`] when `data` is not JSON; others.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the request was sent does not take it back:
    /// the hub may commit it. Read the topic to know.
    pub async fn set_json(
        &self,
        topic: impl AsRef<str>,
        data: impl Into<String>,
        expected: Option<Revision>,
    ) -> Result<Revision, Error> {
        let data = serde_json::value::RawValue::from_string(data.into())
            .map_err(|e| Error::Json(e.to_string()))?;
        let id = self.next_id();
        let message = ClientMessage::Set {
            id,
            topic: topic.as_ref().to_owned(),
            data,
            expected_revision: expected.map(|r| r.to_string()),
            source_id: None,
        };
        match self.request(id, &message).await? {
            ServerMessage::Ok {
                revision: Some(revision),
                ..
            } => Ok(revision),
            ServerMessage::Conflict {
                current_revision, ..
            } => Err(Error::Conflict {
                current: current_revision,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Writes `value` to `topic` as JSON; see [`set_json`](Self::set_json).
    ///
    /// # Errors
    ///
    /// As for [`set_json`](Self::set_json).
    ///
    /// # Cancel safety
    ///
    /// As for [`set_json`](Self::set_json).
    pub async fn set<T: Serialize>(
        &self,
        topic: impl AsRef<str>,
        value: &T,
        expected: Option<Revision>,
    ) -> Result<Revision, Error> {
        let data = serde_json::to_string(value).map_err(|e| Error::Json(e.to_string()))?;
        self.set_json(topic, data, expected).await
    }

    /// The hub's state: the topics this client may read (revision, size,
    /// subscribers), connections and counters, and whether its storage
    /// fails (`stale`).
    ///
    /// # Errors
    ///
    /// [`Error`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn hub_status(&self) -> Result<HubStatus, Error> {
        let id = self.next_id();
        match self.request(id, &ClientMessage::Status { id }).await? {
            ServerMessage::Status { status, .. } => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn fetch(
        &self,
        topic: &str,
        if_newer_than: Option<Revision>,
    ) -> Result<Fetched<Bytes>, Error> {
        let id = self.next_id();
        let message = ClientMessage::Get {
            id,
            topic: topic.to_owned(),
            if_newer_than: if_newer_than.map(|r| r.to_string()),
        };
        match self.request(id, &message).await? {
            ServerMessage::Snapshot { revision, data, .. } => Ok(Fetched::Snapshot(
                SnapshotEnvelope::new(revision, raw_bytes(data)),
            )),
            ServerMessage::NotModified { revision, .. } => Ok(Fetched::NotModified { revision }),
            other => Err(unexpected(other)),
        }
    }

    fn next_id(&self) -> u64 {
        self.inner.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn request(&self, id: u64, message: &ClientMessage) -> Result<ServerMessage, Error> {
        self.inner.shared.request(id, message).await
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.inner.shared.endpoint)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn unexpected(message: ServerMessage) -> Error {
    match message {
        ServerMessage::Error { code, message, .. } => Error::Server { code, message },
        other => Error::Protocol(format!("{other:?}")),
    }
}

impl Shared {
    async fn request(&self, id: u64, message: &ClientMessage) -> Result<ServerMessage, Error> {
        let frame =
            Bytes::from(serde_json::to_vec(message).map_err(|e| Error::Json(e.to_string()))?);
        let timeout = self.options.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let outgoing = self.connection_by(deadline).await?;
        let (reply, answer) = oneshot::channel();
        lock(&self.waiting).insert(id, reply);
        if outgoing.send(frame).await.is_err() {
            lock(&self.waiting).remove(&id);
            return Err(Error::Disconnected);
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(ServerMessage::Error { code, message, .. })) => {
                Err(Error::Server { code, message })
            }
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                lock(&self.waiting).remove(&id);
                Err(Error::Timeout(timeout))
            }
        }
    }

    /// The live connection's outgoing queue; while (re)connecting, waits
    /// for it until `deadline`. Fails at once when the client stopped
    /// retrying (refused, gave up, closed).
    async fn connection_by(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<mpsc::Sender<Bytes>, Error> {
        let mut status = self.status.subscribe();
        loop {
            if let Some(outgoing) = lock(&self.outgoing).clone() {
                return Ok(outgoing);
            }
            if matches!(
                *status.borrow_and_update(),
                ConnectionStatus::Refused(_)
                    | ConnectionStatus::GaveUp(_)
                    | ConnectionStatus::Closed
            ) {
                return Err(Error::Disconnected);
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Disconnected),
                Err(_) => return Err(Error::Timeout(self.options.request_timeout)),
            }
        }
    }

    pub(crate) fn set_status(&self, status: ConnectionStatus) {
        if status == ConnectionStatus::Connected {
            self.connection.fetch_add(1, Ordering::AcqRel);
        }
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    /// What a fetch would get, answered from the snapshot the newest
    /// invalidation carried; `None` when none did (then fetch).
    fn inlined(&self, topic: &Topic, if_newer_than: Option<Revision>) -> Option<Fetched<Bytes>> {
        let topics = lock(&self.topics);
        let t = topics.get(topic)?;
        let (revision, data) = t.inlined.as_ref()?;
        if t.seen.is_some_and(|seen| seen > *revision) {
            // A newer revision was announced without its snapshot.
            return None;
        }
        Some(if if_newer_than.is_some_and(|known| known >= *revision) {
            Fetched::NotModified {
                revision: *revision,
            }
        } else {
            Fetched::Snapshot(SnapshotEnvelope::new(*revision, data.clone()))
        })
    }

    /// Connections begun and ended: equal before and after a request when
    /// one connection carried it throughout.
    fn epoch(&self) -> (u64, u64) {
        (
            self.connection.load(Ordering::Acquire),
            self.ended.load(Ordering::Acquire),
        )
    }

    /// Keeps a fetched snapshot as the base of the next delta, if the
    /// connection that answered (`epoch` from before the request) is still
    /// the current one: the hub's revisions and its record of what this
    /// client holds are both per connection.
    fn keep_fetched(&self, topic: &Topic, epoch: (u64, u64), snapshot: &SnapshotEnvelope<Bytes>) {
        if !self.options.delta_snapshots {
            return;
        }
        let mut topics = lock(&self.topics);
        if self.epoch() != epoch {
            return;
        }
        if let Some(t) = topics.get_mut(topic)
            && t.inlined
                .as_ref()
                .is_none_or(|(at, _)| snapshot.revision > *at)
        {
            t.inlined = Some((snapshot.revision, snapshot.data.clone()));
        }
    }

    pub(crate) fn sinks_of(&self, topic: &Topic) -> Sinks {
        Sinks(
            lock(&self.topics)
                .get(topic)
                .map(|t| t.sinks.clone())
                .unwrap_or_default(),
        )
    }

    pub(crate) fn all_sinks(&self) -> Vec<InvalidationSink> {
        lock(&self.topics)
            .values()
            .flat_map(|t| t.sinks.iter().map(|(_, s)| s.clone()))
            .collect()
    }

    /// Hands an invalidation to the topic's sinks, outside every lock,
    /// after keeping the snapshot it carried for their fetches.
    pub(crate) fn deliver(&self, event: &InvalidationEvent, carried: Carried) {
        let sinks = {
            let mut topics = lock(&self.topics);
            let Some(t) = topics.get_mut(&event.topic) else {
                return;
            };
            {
                t.seen = t.seen.max(Some(event.revision));
                let snapshot = match carried {
                    Carried::Nothing => None,
                    Carried::Snapshot(revision, data) => Some((revision, data)),
                    Carried::Delta(delta) => {
                        let applied = t
                            .inlined
                            .as_ref()
                            .filter(|(at, _)| *at == delta.base)
                            .and_then(|(_, base)| delta.apply(base));
                        if applied.is_none() {
                            tracing::debug!(topic = %event.topic, base = %delta.base, "delta without its base; fetching");
                        }
                        applied.map(|data| (delta.revision, Bytes::from(data)))
                    }
                };
                if let Some(snapshot) = snapshot
                    && t.inlined.as_ref().is_none_or(|(at, _)| snapshot.0 > *at)
                {
                    t.inlined = Some(snapshot);
                }
            }
            Sinks(t.sinks.clone())
        };
        for sink in &sinks {
            sink.deliver(event);
        }
    }

    /// Makes sure `topic` is subscribed on the current connection: subscribes
    /// it, or waits for the handle already doing so and, if that failed or
    /// was cancelled, tries itself. `Ok` only once the hub confirmed.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a cancelled subscribe gives its claim back.
    pub(crate) async fn ensure_subscribed(&self, topic: &Topic) -> Result<(), Error> {
        loop {
            let current = self.connection.load(Ordering::Acquire);
            let (claimed, mut outcome) = {
                let topics = lock(&self.topics);
                let Some(t) = topics.get(topic) else {
                    return Ok(()); // no handle left
                };
                let mut claimed = false;
                t.remote.send_if_modified(|remote| match *remote {
                    Remote::Subscribed { connection } if connection == current => false,
                    Remote::Subscribing => false,
                    _ => {
                        *remote = Remote::Subscribing;
                        claimed = true;
                        true
                    }
                });
                if !claimed
                    && *t.remote.borrow()
                        == (Remote::Subscribed {
                            connection: current,
                        })
                {
                    return Ok(());
                }
                (claimed, t.remote.subscribe())
            };
            if claimed {
                let claim = Claim {
                    shared: self,
                    topic,
                    finished: false,
                };
                let result = self.subscribe_remote(topic).await;
                claim.finish(result.is_ok().then_some(current));
                return result;
            }
            // Another handle is subscribing: wait for its outcome.
            let _ = outcome.wait_for(|r| *r != Remote::Subscribing).await;
        }
    }

    /// Asks the hub for `topic`'s revision again (a probe), catching a
    /// subscription that went deaf.
    pub(crate) async fn probe(&self, topic: &Topic) -> Result<(), Error> {
        self.subscribe_remote(topic).await
    }

    /// Forgets what the connection that just ended carried.
    pub(crate) fn connection_ended(&self) {
        *lock(&self.outgoing) = None;
        {
            let mut topics = lock(&self.topics);
            self.ended.fetch_add(1, Ordering::AcqRel);
            for topic in topics.values_mut() {
                // What this connection carried may be stale on the next one.
                topic.inlined = None;
                topic.remote.send_replace(Remote::Unsubscribed);
            }
        }
        // Fail every request still waiting.
        lock(&self.waiting).clear();
    }

    /// Subscribes `topic` on the current connection.
    async fn subscribe_remote(&self, topic: &Topic) -> Result<(), Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = ClientMessage::Subscribe {
            id,
            topic: topic.as_str().to_owned(),
            inline: self.options.inline_snapshots,
            delta: self.options.inline_snapshots && self.options.delta_snapshots,
        };
        match self.request(id, &message).await? {
            ServerMessage::Subscribed { revision, .. } => {
                let newer = {
                    let mut topics = lock(&self.topics);
                    let t = topics.entry(topic.clone()).or_default();
                    let newer = t.seen.is_some_and(|seen| revision > seen);
                    t.seen = t.seen.max(Some(revision));
                    newer
                };
                if newer {
                    // The probe found a revision no invalidation announced.
                    tracing::warn!(%topic, %revision, "missed an invalidation; refreshing");
                    self.deliver(
                        &InvalidationEvent::new(topic.clone(), revision),
                        Carried::Nothing,
                    );
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }
}

/// The bytes of a decoded raw JSON value, without copying them again.
pub(crate) fn raw_bytes(raw: Box<RawValue>) -> Bytes {
    Bytes::from(Box::<str>::from(raw).into_boxed_bytes())
}

impl<T: Send + Sync + 'static> Subscriber for RemoteTopic<T> {
    async fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> Result<Subscription, BoxError> {
        let shared = self.client.inner.shared.clone();
        let sink_id = shared.next_sink.fetch_add(1, Ordering::Relaxed);
        Arc::make_mut(&mut lock(&shared.topics).entry(topic.clone()).or_default().sinks)
            .push((sink_id, sink));
        // Removed again unless this subscribe succeeds, also if cancelled.
        let mut pending = PendingSink {
            shared: &shared,
            topic,
            sink_id,
            kept: false,
        };
        // Succeeds only once the hub confirmed the subscription (this
        // handle's, or the one another handle of the topic made): an unknown
        // topic or an unreachable hub fails `start`, which may be retried.
        let connected =
            tokio::time::timeout(shared.options.request_timeout, self.client.wait_connected())
                .await;
        match connected {
            Ok(ConnectionStatus::Connected) => shared.ensure_subscribed(topic).await?,
            _ => return Err(Error::Disconnected.into()),
        }
        pending.kept = true;
        let weak = Arc::downgrade(&shared);
        let topic = topic.clone();
        Ok(Subscription::new(move || {
            if let Some(shared) = weak.upgrade() {
                remove_sink(&shared, &topic, sink_id);
            }
        }))
    }
}

/// A sink added by a subscribe still in progress.
struct PendingSink<'a> {
    shared: &'a Arc<Shared>,
    topic: &'a Topic,
    sink_id: u64,
    /// Set once the subscribe succeeded: the subscription owns it then.
    kept: bool,
}

impl Drop for PendingSink<'_> {
    fn drop(&mut self) {
        if !self.kept {
            remove_sink(self.shared, self.topic, self.sink_id);
        }
    }
}

/// Forgets a sink; the last one of a topic unsubscribes it remotely.
fn remove_sink(shared: &Arc<Shared>, topic: &Topic, sink_id: u64) {
    let last = {
        let mut topics = lock(&shared.topics);
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        Arc::make_mut(&mut entry.sinks).retain(|(id, _)| *id != sink_id);
        let last = entry.sinks.is_empty();
        if last {
            topics.remove(topic);
        }
        last
    };
    if last && let Some(outgoing) = lock(&shared.outgoing).clone() {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let message = ClientMessage::Unsubscribe {
            id,
            topic: topic.as_str().to_owned(),
        };
        if let Ok(frame) = serde_json::to_vec(&message) {
            // Best effort: the server also drops it with the connection.
            let _ = outgoing.try_send(Bytes::from(frame));
        }
    }
}

impl<T: DeserializeOwned + Send + Sync + 'static> Provider for RemoteTopic<T> {
    type Data = T;

    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<T>, FetchError>> + Send {
        let client = self.client.clone();
        let request = request.clone();
        async move {
            let shared = &client.inner.shared;
            let inlined = shared.inlined(&request.topic, request.if_newer_than);
            let fetched = match inlined {
                Some(fetched) => Ok(fetched),
                None => {
                    let epoch = shared.epoch();
                    let fetched = client
                        .fetch(request.topic.as_str(), request.if_newer_than)
                        .await;
                    if let Ok(Fetched::Snapshot(snapshot)) = &fetched {
                        shared.keep_fetched(&request.topic, epoch, snapshot);
                    }
                    fetched
                }
            };
            let fetched = fetched.map_err(|e| match e {
                Error::Server {
                    code: ErrorCode::InvalidRevision,
                    ..
                } => FetchError::Protocol(
                    ProtocolError::new(ProtocolErrorKind::Malformed(e.to_string()))
                        .with_topic(request.topic.clone()),
                ),
                other => FetchError::unavailable(other),
            })?;
            decode(&request.topic, fetched)
        }
    }

    /// Answers from the snapshot the newest invalidation carried, with no
    /// round trip; `None` without one, or when it does not decode (then
    /// [`fetch`](Provider::fetch) reports why).
    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<T>> {
        let shared = &self.client.inner.shared;
        let inlined = shared.inlined(&request.topic, request.if_newer_than)?;
        decode(&request.topic, inlined).ok()
    }
}

/// Reads a snapshot's data as `T`; data that does not decode is a
/// protocol error, with the raw bytes in its context.
fn decode<T: DeserializeOwned>(
    topic: &Topic,
    fetched: Fetched<Bytes>,
) -> Result<Fetched<T>, FetchError> {
    Ok(match fetched {
        Fetched::Snapshot(snapshot) => {
            let data = crate::protocol::from_json(&snapshot.data).map_err(|e| {
                FetchError::Protocol(
                    ProtocolError::new(ProtocolErrorKind::Malformed(e.to_string()))
                        .with_topic(topic.clone())
                        .with_raw_bytes(&snapshot.data),
                )
            })?;
            Fetched::Snapshot(SnapshotEnvelope::new(snapshot.revision, data))
        }
        Fetched::NotModified { revision } => Fetched::NotModified { revision },
    })
}
