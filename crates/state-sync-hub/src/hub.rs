//! [`Hub`]: many topics, one storage.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use state_sync::{BoxError, InvalidationSink, Revision, Subscriber, Subscription, Topic};
use state_sync_storage::{AnyStorage, Change, MemoryStorage, Storage};
use tokio::sync::OnceCell;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::topic::{HubTopic, JsonSnapshot, RawTopic, TopicCore, TopicValue};

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) queue_capacity: usize,
    pub(crate) max_batch: usize,
    pub(crate) max_topics: usize,
    pub(crate) probe_interval: Duration,
    /// Whether other hubs write the storage too.
    pub(crate) shared: bool,
    /// Whether the storage answers, shared by every topic of the hub.
    pub(crate) health: Arc<StorageHealth>,
}

/// Whether the hub's storage answered its last request.
#[derive(Debug, Default)]
pub(crate) struct StorageHealth {
    failing: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

impl StorageHealth {
    /// Records the outcome of a storage request.
    pub(crate) fn record<T>(&self, outcome: &std::result::Result<T, state_sync_storage::Error>) {
        match outcome {
            Ok(_) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("the storage answers again");
                }
            }
            Err(e) => {
                self.failing.store(true, Ordering::Release);
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some(state_sync::ErrorChain(e).to_string());
            }
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queue_capacity: 1024,
            max_batch: 256,
            max_topics: 10_000,
            probe_interval: Duration::from_secs(30),
            shared: false,
            health: Arc::default(),
        }
    }
}

/// The revision a topic starts at when nothing is stored for it: the wall
/// clock in microseconds since the Unix epoch (at least 1).
pub(crate) fn revision_floor() -> Revision {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Revision::new(micros.max(1))
}

type Slot = Arc<OnceCell<Arc<dyn RawTopic>>>;

/// The source of truth: many topics, each with atomic writes and
/// compare-and-set, committed to one [`Storage`].
///
/// # Revisions never go backwards
///
/// - A topic with a stored record continues from the stored revision: every
///   revision a replica has seen was stored before anyone was told of it
///   (writes are acknowledged and invalidated only after `store`).
/// - A topic with nothing stored (new, or storage lost) starts at a
///   revision taken from the wall clock, in microseconds since the Unix
///   epoch. It is above every revision an earlier run of the hub issued
///   unless that run averaged more than a million commits per second on
///   the topic, or the clock was set back.
/// - For what remains (a clock set back, a backend that lost its last
///   writes), replicas adopt a source found *behind* them whenever they
///   resync (start, manual refresh, reconnect); see
///   [`SyncHandle`](state_sync::SyncHandle).
///
/// # Durability and batching
///
/// Writes that queue up on a topic while its previous store is in flight
/// are committed together by one store (group commit), each keeping its own
/// revision and its own invalidation; each writer is answered once its
/// write is stored. The
/// durability of a store is the backend's: see
/// [`Durability`](state_sync_storage::Durability). [`group_commit(false)`]
/// stores every write on its own.
///
/// [`group_commit(false)`]: HubBuilder::group_commit
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use state_sync::SyncHandle;
/// use state_sync_hub::Hub;
///
/// #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
/// struct Settings {
///     theme: String,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = Hub::in_memory();
/// let settings = hub.topic("settings", Settings::default).await?;
///
/// // An in-process replica.
/// let (tx, rx) = tokio::sync::watch::channel(Settings::default());
/// let replica =
///     SyncHandle::builder(settings.clone(), tx).build();
/// replica.start().await?;
///
/// let revision = settings.update(|s| Settings { theme: "dark".into(), ..s.clone() }).await?;
/// replica.wait_for_revision(revision).await?;
/// assert_eq!(rx.borrow().theme, "dark");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    storage: AnyStorage,
    options: Options,
    /// Read by every get and subscribe, written when a topic is opened.
    topics: RwLock<HashMap<Topic, Slot>>,
    /// Topics whose stored record is damaged, with why.
    damaged: RwLock<HashMap<Topic, String>>,
    closed: Arc<AtomicBool>,
}

/// Configures a [`Hub`]; from [`Hub::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct HubBuilder {
    storage: AnyStorage,
    options: Options,
}

impl HubBuilder {
    /// Where committed records are stored (default: [`MemoryStorage`]).
    pub fn storage(mut self, storage: impl Storage) -> Self {
        self.storage = AnyStorage::new(storage);
        self
    }

    /// Whether writes queued while a store is in flight are committed by
    /// one store (default: `true`). Off, every write is stored on its own.
    pub fn group_commit(mut self, on: bool) -> Self {
        self.options.max_batch = if on { Options::default().max_batch } else { 1 };
        self
    }

    /// How many writes may wait per topic before writers wait too
    /// (default: 1024).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.options.queue_capacity = capacity.max(1);
        self
    }

    /// How many topics the hub may hold (default: 10 000); opening one more
    /// is [`Error::TooManyTopics`]. Each open topic costs a writer task and
    /// its current value.
    pub fn max_topics(mut self, max: usize) -> Self {
        self.options.max_topics = max;
        self
    }

    /// On a shared storage, how often every open topic's revision is read
    /// again, catching changes whose notification was lost (default: 30 s).
    pub fn probe_interval(mut self, every: Duration) -> Self {
        self.options.probe_interval = every.max(Duration::from_millis(10));
        self
    }

    /// Builds the hub. Topics are loaded when first opened.
    ///
    /// On a shared storage ([`Storage::changes`]), the hub follows the other
    /// hubs' commits: each change notification, each resync after a lost
    /// notification connection, and each probe reads the moved topics once
    /// and invalidates this hub's replicas. That task needs a Tokio
    /// runtime; without one, this hub does not follow the others (logged).
    pub fn build(mut self) -> Hub {
        let changes = self.storage.changes();
        self.options.shared = changes.is_some();
        let hub = Hub {
            inner: Arc::new(Inner {
                storage: self.storage,
                options: self.options,
                topics: RwLock::new(HashMap::new()),
                damaged: RwLock::new(HashMap::new()),
                closed: Arc::new(AtomicBool::new(false)),
            }),
        };
        if let Some(changes) = changes {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(follow_storage(Arc::downgrade(&hub.inner), changes));
                }
                Err(_) => tracing::error!(
                    "a hub on a shared storage was built outside a Tokio runtime: it will not follow the other hubs"
                ),
            }
        }
        hub
    }
}

impl fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubBuilder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub builder.
    pub fn builder() -> HubBuilder {
        HubBuilder {
            storage: AnyStorage::new(MemoryStorage::new()),
            options: Options::default(),
        }
    }

    /// A hub on [`MemoryStorage`]: nothing survives the process.
    #[must_use]
    pub fn in_memory() -> Hub {
        Hub::builder().build()
    }

    /// A hub on `storage` with default options.
    #[must_use]
    pub fn new(storage: impl Storage) -> Hub {
        Hub::builder().storage(storage).build()
    }

    /// Opens topic `name` with values of type `T`: its stored state if any,
    /// else `default()`. Opening an open topic returns a handle on it.
    ///
    /// # Damaged records
    ///
    /// When the newest stored copy is damaged, it is quarantined and the
    /// topic opens from the last good copy, re-stored at a revision above
    /// every revision that may have been issued (logged as an error: the
    /// last writes are lost). With no good copy, or stored bytes that are
    /// not JSON, the topic is [`Error::Damaged`]: listed by
    /// [`damaged_topics`](Self::damaged_topics), refusing every access,
    /// while the other topics serve.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopic`]; [`Error::TypeMismatch`] when the topic is
    /// open with another type; [`Error::InvalidData`] when the stored record
    /// does not decode as `T` (it is left untouched, never replaced by the
    /// default); [`Error::Damaged`]; [`Error::TooManyTopics`];
    /// [`Error::Storage`] when loading fails.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping it before it resolves leaves the topic either not
    /// opened or opened (and usable by the next call); nothing is written.
    pub async fn topic<T: TopicValue>(
        &self,
        name: impl AsRef<str>,
        default: impl FnOnce() -> T,
    ) -> Result<HubTopic<T>> {
        let topic = Topic::new(name)?;
        let slot = self.slot(&topic)?;
        let opened = slot
            .get_or_try_init(|| async {
                let core = TopicCore::open(
                    topic.clone(),
                    self.inner.storage.clone(),
                    &self.inner.options,
                    default,
                    self.inner.closed.clone(),
                )
                .await?;
                Ok::<Arc<dyn RawTopic>, Error>(core)
            })
            .await;
        let raw = match opened {
            Ok(raw) => {
                write_lock(&self.inner.damaged).remove(&topic);
                raw
            }
            Err(e) => {
                // A topic that failed to open takes no room.
                self.forget_slot(&topic, &slot);
                if let Error::Damaged { reason, .. } = &e {
                    tracing::error!(%topic, %reason, "topic damaged and quarantined; the others keep serving");
                    write_lock(&self.inner.damaged).insert(topic.clone(), reason.clone());
                }
                return Err(e);
            }
        };
        let opened_as = raw.type_name();
        raw.clone()
            .as_any()
            .downcast::<TopicCore<T>>()
            .map(HubTopic::new)
            .map_err(|_| Error::TypeMismatch {
                topic,
                opened_as,
                requested: std::any::type_name::<T>(),
            })
    }

    /// Opens topic `name` holding raw JSON, starting at `null` when nothing
    /// is stored.
    ///
    /// # Errors
    ///
    /// As for [`topic`](Self::topic).
    ///
    /// # Cancel safety
    ///
    /// As for [`topic`](Self::topic).
    pub async fn json_topic(&self, name: impl AsRef<str>) -> Result<HubTopic<Value>> {
        self.topic(name, || Value::Null).await
    }

    /// Opens every topic found in storage as raw JSON (topics already open
    /// keep their type). Returns the names of the topics now open; damaged
    /// ones are skipped, logged and listed by
    /// [`damaged_topics`](Self::damaged_topics).
    ///
    /// # Errors
    ///
    /// As for [`topic`](Self::topic), except [`Error::Damaged`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only opens topics; those opened before the drop stay
    /// open.
    pub async fn open_stored_topics(&self) -> Result<Vec<Topic>> {
        let stored = self
            .inner
            .storage
            .topics()
            .await
            .map_err(|e| Error::Storage {
                topic: None,
                source: Arc::new(e),
            })?;
        let mut opened = Vec::with_capacity(stored.len());
        for topic in stored {
            if !self.is_open(&topic) {
                match self.json_topic(topic.as_str()).await {
                    Ok(_) => {}
                    Err(Error::Damaged { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            opened.push(topic);
        }
        Ok(opened)
    }

    /// `None` while the storage answers; otherwise its last error. Reads
    /// keep serving the last known state meanwhile, which may be stale on
    /// a shared storage (other hubs' writes are not seen), and writes fail
    /// with [`Error::Storage`].
    #[must_use]
    pub fn storage_failure(&self) -> Option<String> {
        let health = &self.inner.options.health;
        if !health.failing.load(Ordering::Acquire) {
            return None;
        }
        health
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether other hubs share this hub's storage (see
    /// [`HubBuilder::build`]).
    #[must_use]
    pub fn shares_storage(&self) -> bool {
        self.inner.options.shared
    }

    /// Opens `topic` as raw JSON if it has a stored record (another hub of
    /// a shared storage may have created it); whether it is open now.
    ///
    /// # Errors
    ///
    /// As for [`topic`](Self::topic).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a cancelled open leaves the topic unopened.
    pub async fn open_if_stored(&self, topic: &Topic) -> Result<bool> {
        if self.is_open(topic) {
            return Ok(true);
        }
        let stored = self
            .inner
            .storage
            .load(topic)
            .await
            .map_err(|e| Error::Storage {
                topic: Some(topic.clone()),
                source: Arc::new(e),
            })?;
        if stored.is_none() {
            return Ok(false);
        }
        self.json_topic(topic.as_str()).await.map(|_| true)
    }

    /// The topics whose stored record is damaged, with what is wrong.
    /// They stay quarantined until an operator restores or removes their
    /// files (see [`FileStorage`](state_sync_storage::FileStorage)).
    #[must_use]
    pub fn damaged_topics(&self) -> Vec<(Topic, String)> {
        let damaged = read_lock(&self.inner.damaged);
        let mut list: Vec<_> = damaged
            .iter()
            .map(|(t, r)| (t.clone(), r.clone()))
            .collect();
        list.sort();
        list
    }

    /// Whether `topic` is open.
    #[must_use]
    pub fn is_open(&self, topic: &Topic) -> bool {
        self.open_topic(topic).is_some()
    }

    /// The open topics.
    #[must_use]
    pub fn topics(&self) -> Vec<Topic> {
        self.topics_lock()
            .iter()
            .filter(|(_, slot)| slot.initialized())
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// The current revision and JSON encoding of an open topic, whatever its
    /// type. The bytes are shared, never re-encoded.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`].
    pub fn get_json(&self, topic: &Topic) -> Result<JsonSnapshot> {
        Ok(self.raw(topic)?.json())
    }

    /// Writes JSON to an open topic, decoding it as the topic's type first.
    /// With `expected`, this is a compare-and-set. `source_id` is carried
    /// by the invalidation.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], [`Error::InvalidData`] when `data` does not
    /// decode, [`Error::Conflict`], and the errors of
    /// [`HubTopic::replace`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel a write already handed to the
    /// topic's writer task: it is committed (and its invalidation sent); only
    /// the answer is lost. A write still waiting for room in the topic's queue
    /// is not queued, and not committed.
    pub async fn set_json(
        &self,
        topic: &Topic,
        data: &[u8],
        expected: Option<Revision>,
        source_id: Option<String>,
    ) -> Result<Revision> {
        self.set_json_limited(topic, data, expected, source_id, usize::MAX)
            .await
    }

    /// [`set_json`](Self::set_json), refusing a value whose JSON encoding —
    /// what is stored and served, which can be larger than `data` — is
    /// over `max_bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`]; otherwise as for [`set_json`](Self::set_json).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel a write already handed to the
    /// topic's writer task: it is committed (and its invalidation sent); only
    /// the answer is lost. A write still waiting for room in the topic's queue
    /// is not queued, and not committed.
    pub async fn set_json_limited(
        &self,
        topic: &Topic,
        data: &[u8],
        expected: Option<Revision>,
        source_id: Option<String>,
        max_bytes: usize,
    ) -> Result<Revision> {
        let raw = self.raw(topic)?;
        raw.set_json(data, expected, source_id, max_bytes).await
    }

    /// Stops taking writes and waits until every write queued before is
    /// committed (or has failed). Reads and subscriptions keep working.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the hub is closed to new writes once the future is first
    /// polled; only the wait for queued writes is abandoned (they are still
    /// committed).
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let open: Vec<Arc<dyn RawTopic>> = self
            .topics_lock()
            .values()
            .filter_map(|slot| slot.get().cloned())
            .collect();
        for topic in open {
            topic.barrier().await;
        }
    }

    /// Reads `topic` from the shared storage and takes it in if it moved.
    async fn follow_topic(&self, topic: &Topic) {
        let Some(raw) = self.open_topic(topic) else {
            return;
        };
        let loaded = self.inner.storage.load(topic).await;
        self.inner.options.health.record(&loaded);
        match loaded {
            Ok(Some(record)) if record.revision > raw.json().revision => raw.follow(record).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%topic, error = %e, "cannot read a topic from the shared storage")
            }
        }
    }

    fn raw(&self, topic: &Topic) -> Result<Arc<dyn RawTopic>> {
        if let Some(raw) = self.open_topic(topic) {
            return Ok(raw);
        }
        Err(match read_lock(&self.inner.damaged).get(topic) {
            Some(reason) => Error::Damaged {
                topic: topic.clone(),
                reason: reason.clone(),
            },
            None => Error::UnknownTopic {
                topic: topic.clone(),
            },
        })
    }

    fn open_topic(&self, topic: &Topic) -> Option<Arc<dyn RawTopic>> {
        self.topics_lock().get(topic)?.get().cloned()
    }

    fn slot(&self, topic: &Topic) -> Result<Slot> {
        if let Some(slot) = self.topics_lock().get(topic) {
            return Ok(slot.clone());
        }
        let mut topics = write_lock(&self.inner.topics);
        if let Some(slot) = topics.get(topic) {
            return Ok(slot.clone());
        }
        let limit = self.inner.options.max_topics;
        if topics.len() >= limit {
            return Err(Error::TooManyTopics {
                topic: topic.clone(),
                limit,
            });
        }
        Ok(topics.entry(topic.clone()).or_default().clone())
    }

    /// Removes `slot` if it is still `topic`'s and was never filled.
    fn forget_slot(&self, topic: &Topic, slot: &Slot) {
        let mut topics = write_lock(&self.inner.topics);
        if topics
            .get(topic)
            .is_some_and(|s| Arc::ptr_eq(s, slot) && !s.initialized())
        {
            topics.remove(topic);
        }
    }

    fn topics_lock(&self) -> RwLockReadGuard<'_, HashMap<Topic, Slot>> {
        read_lock(&self.inner.topics)
    }
}

/// Follows the commits other hubs make to a shared storage, until the hub
/// is dropped or the storage's notifications end.
async fn follow_storage(inner: Weak<Inner>, mut changes: broadcast::Receiver<Change>) {
    let every = match inner.upgrade() {
        Some(inner) => inner.options.probe_interval,
        None => return,
    };
    let mut probe = tokio::time::interval(every);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        let moved: Option<Topic> = tokio::select! {
            change = changes.recv() => match change {
                Ok(Change::Stored { topic, revision }) => {
                    let Some(inner) = inner.upgrade() else { return };
                    let hub = Hub { inner };
                    match hub.open_topic(&topic) {
                        Some(raw) if raw.json().revision < revision && !raw.offered(revision) => {
                            Some(topic)
                        }
                        // Not open here: nothing to follow. (Opened on
                        // demand, with the type its user asks for.)
                        _ => continue,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
                // Resync, a lag, or something newer: re-read everything.
                _ => None,
            },
            _ = probe.tick() => None,
        };
        let Some(inner) = inner.upgrade() else { return };
        let hub = Hub { inner };
        let topics = match moved {
            Some(topic) => vec![topic],
            None => hub.topics(),
        };
        for topic in topics {
            hub.follow_topic(&topic).await;
        }
    }
}

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Subscribes to any open topic; an unknown topic is an error.
impl Subscriber for Hub {
    fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> impl Future<Output = Result<Subscription, BoxError>> + Send {
        let raw = self.raw(topic);
        async move { raw?.subscribe(sink).await }
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("topics", &self.topics())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
