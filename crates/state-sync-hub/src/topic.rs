//! One topic of a hub: its committed state, its writer task, its typed
//! handle [`HubTopic`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use state_sync::{
    BoxError, FetchError, FetchRequest, Fetched, InvalidationSink, MemorySource, Provider,
    Revision, SnapshotEnvelope, Subscriber, Subscription, Topic,
};
use state_sync_storage::{AnyStorage, Record, Storage, Stored};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a topic's value must be: JSON-serializable, cloneable and shareable
/// between tasks. Implemented for every such type.
pub trait TopicValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> TopicValue for T {}

/// One committed revision: the value and its JSON encoding, made once and
/// shared by every reader.
#[derive(Debug)]
pub struct Snapshot<T> {
    revision: Revision,
    value: Arc<T>,
    json: Bytes,
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot {
            revision: self.revision,
            value: self.value.clone(),
            json: self.json.clone(),
        }
    }
}

impl<T> Snapshot<T> {
    /// A snapshot of `value` at `revision`, whose JSON encoding is `json`
    /// (for clients that received both from a hub).
    #[must_use]
    pub fn new(revision: Revision, value: T, json: Bytes) -> Self {
        Snapshot {
            revision,
            value: Arc::new(value),
            json,
        }
    }

    /// The revision.
    #[must_use]
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The value.
    #[must_use]
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The value, shared.
    #[must_use]
    pub fn shared_value(&self) -> Arc<T> {
        self.value.clone()
    }

    /// The value's JSON encoding (the `data` of a snapshot on the wire),
    /// shared rather than copied.
    #[must_use]
    pub fn json(&self) -> &Bytes {
        &self.json
    }
}

/// A committed revision as kept by the in-memory source: no revision field,
/// the source's envelope carries it.
#[derive(Debug)]
pub(crate) struct Shared<T> {
    value: Arc<T>,
    json: Bytes,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            value: self.value.clone(),
            json: self.json.clone(),
        }
    }
}

/// A topic's data as JSON, encoded once per revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonSnapshot {
    /// The revision.
    pub revision: Revision,
    /// The JSON encoding of the data.
    pub data: Bytes,
}

/// An update closure. `FnMut`: on a shared storage it runs again when
/// another hub committed first.
type UpdateFn<T> = Box<dyn FnMut(&T) -> Result<T, BoxError> + Send>;

enum Change<T> {
    Replace(T),
    Update(UpdateFn<T>),
    CompareAndSet { expected: Revision, value: T },
}

enum Op<T> {
    Write {
        change: Change<T>,
        source_id: Option<String>,
        /// The largest JSON encoding the new value may have.
        max_bytes: usize,
        reply: oneshot::Sender<Result<Revision>>,
    },
    /// Answered once every write queued before it is committed or failed.
    Barrier(oneshot::Sender<()>),
    /// Another hub of a shared storage committed this record.
    Followed(Record),
}

/// The shared part of a topic: its state (kept by a [`MemorySource`], which
/// also fans invalidations out) and the queue of its writer task.
pub(crate) struct TopicCore<T> {
    source: MemorySource<Shared<T>>,
    writes: mpsc::Sender<Op<T>>,
    closed: Arc<AtomicBool>,
    /// The highest revision this hub's writer has offered the storage: a
    /// change notice at or below it is this hub's own commit (or one the
    /// writer takes in from its conflict answer), so it needs no read.
    offered: Arc<AtomicU64>,
}

impl<T: TopicValue> TopicCore<T> {
    /// Opens `topic` from `storage`, or at `floor` holding `default` when
    /// nothing is stored, and starts its writer task.
    pub(crate) async fn open(
        topic: Topic,
        storage: AnyStorage,
        options: &crate::hub::Options,
        default: impl FnOnce() -> T,
        closed: Arc<AtomicBool>,
    ) -> Result<Arc<Self>> {
        let loaded = load(&topic, &storage).await?;
        let stored = loaded.as_ref().map(|record| record.revision);
        let (revision, shared, stored) =
            match loaded {
                Some(record) => {
                    let (revision, shared) = decoded(&topic, record)?;
                    (revision, shared, stored)
                }
                None if options.shared => {
                    // Every hub of a shared storage must start from one record:
                    // store the default, or take the one another hub stored first.
                    let initial = encode(&topic, default())?;
                    let record = Record::new(crate::hub::revision_floor(), initial.json.clone());
                    let outcome = storage.store_if(&topic, None, &record).await.map_err(|e| {
                        Error::Storage {
                            topic: Some(topic.clone()),
                            source: Arc::new(e),
                        }
                    })?;
                    match outcome {
                        Stored::Conflict(Some(current)) => {
                            let at = Some(current.revision);
                            let (revision, shared) = decoded(&topic, current)?;
                            (revision, shared, at)
                        }
                        _ => (record.revision, initial, Some(record.revision)),
                    }
                }
                None => (
                    crate::hub::revision_floor(),
                    encode(&topic, default())?,
                    None,
                ),
            };
        tracing::debug!(%topic, %revision, "topic opened");
        let source = MemorySource::starting_at(topic, revision, shared);
        let (writes, queue) = mpsc::channel(options.queue_capacity);
        let offered = Arc::new(AtomicU64::new(0));
        tokio::spawn(run_writer(
            source.clone(),
            storage,
            queue,
            options.max_batch,
            stored,
            offered.clone(),
            options.health.clone(),
        ));
        Ok(Arc::new(TopicCore {
            source,
            writes,
            closed,
            offered,
        }))
    }

    fn snapshot(&self) -> Snapshot<T> {
        let envelope = self.source.snapshot();
        Snapshot {
            revision: envelope.revision,
            value: envelope.data.value,
            json: envelope.data.json,
        }
    }

    async fn write(
        &self,
        change: Change<T>,
        source_id: Option<String>,
        max_bytes: usize,
    ) -> Result<Revision> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let (reply, answer) = oneshot::channel();
        let op = Op::Write {
            change,
            source_id,
            max_bytes,
            reply,
        };
        self.writes.send(op).await.map_err(|_| Error::Closed)?;
        answer.await.unwrap_or(Err(Error::Closed))
    }
}

/// Loads `topic`'s record. A damaged newest copy falls back to the last good
/// one, re-stored at a revision above every revision that may have been
/// issued, so no revision is ever issued twice for different data. No good
/// copy, or bytes that are not JSON at all: [`Error::Damaged`].
async fn load(topic: &Topic, storage: &AnyStorage) -> Result<Option<Record>> {
    use state_sync_storage::Error as StorageError;
    let storage_error = |e| Error::Storage {
        topic: Some(topic.clone()),
        source: Arc::new(e),
    };
    let damaged = |reason: String| Error::Damaged {
        topic: topic.clone(),
        reason,
    };
    let record = match storage.load(topic).await {
        Ok(record) => record,
        Err(StorageError::Corrupt {
            backup: Some(_),
            claimed_revision,
            reason,
            ..
        }) => {
            // The damaged copy is quarantined; `load` now finds the backup.
            let Some(good) = storage.load(topic).await.map_err(storage_error)? else {
                return Err(damaged(format!("{reason}; the last good copy is gone")));
            };
            let lost_above = claimed_revision.unwrap_or(good.revision).max(good.revision);
            let revision = lost_above.next().max(crate::hub::revision_floor());
            tracing::error!(
                %topic,
                %reason,
                served = %good.revision,
                continuing_at = %revision,
                "the newest stored record is damaged and quarantined: serving the last good copy; the last acknowledged write(s) of this topic are LOST"
            );
            let record = Record::new(revision, good.data);
            storage.store(topic, &record).await.map_err(storage_error)?;
            Some(record)
        }
        Err(StorageError::Corrupt { reason, .. }) => {
            return Err(damaged(format!("{reason}; no good copy left")));
        }
        Err(e) => return Err(storage_error(e)),
    };
    if let Some(record) = &record
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&record.data)
    {
        return Err(damaged(format!("the stored data is not JSON: {e}")));
    }
    Ok(record)
}

/// A stored record as a topic's state.
fn decoded<T: TopicValue>(topic: &Topic, record: Record) -> Result<(Revision, Shared<T>)> {
    let value = serde_json::from_slice(&record.data).map_err(|e| Error::invalid_data(topic, e))?;
    let shared = Shared {
        value: Arc::new(value),
        json: record.data,
    };
    Ok((record.revision, shared))
}

fn encode<T: Serialize>(topic: &Topic, value: T) -> Result<Shared<T>> {
    let json = serde_json::to_vec(&value).map_err(|e| Error::Encode {
        topic: topic.clone(),
        source: Arc::new(e),
    })?;
    Ok(Shared {
        value: Arc::new(value),
        json: Bytes::from(json),
    })
}

/// Commits queued writes in order. With `max_batch > 1`, every write that
/// queued up while the previous store was in flight is committed by one
/// store (group commit); each writer is answered only once its write is
/// stored. `stored` is the revision the storage holds, as far as this hub
/// knows.
async fn run_writer<T: TopicValue>(
    source: MemorySource<Shared<T>>,
    storage: AnyStorage,
    mut queue: mpsc::Receiver<Op<T>>,
    max_batch: usize,
    mut stored: Option<Revision>,
    offered: Arc<AtomicU64>,
    health: Arc<crate::hub::StorageHealth>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut batch, max_batch).await > 0 {
        commit_batch(
            &source,
            &storage,
            &mut stored,
            &offered,
            &health,
            &mut batch,
        )
        .await;
    }
}

/// How often a batch is re-applied after losing a compare-and-set race to
/// another hub before its writes fail.
const MAX_COMMIT_ATTEMPTS: u32 = 100;

/// The wait before re-applying a batch that lost a race: jittered and
/// growing, so a hub that keeps losing to a faster one is not starved (1 ms
/// doubling to 50 ms; 100 attempts take a few seconds at most).
fn contention_backoff() -> state_sync::Backoff {
    state_sync::RetryPolicy::default()
        .max_attempts(MAX_COMMIT_ATTEMPTS)
        .initial_delay(std::time::Duration::from_millis(1))
        .max_delay(std::time::Duration::from_millis(50))
        .jitter(true)
        .backoff()
}

/// Takes in a record another hub committed, if it is newer than ours.
fn follow<T: TopicValue>(
    source: &MemorySource<Shared<T>>,
    stored: &mut Option<Revision>,
    record: Record,
) -> Result<()> {
    let topic = source.topic();
    *stored = (*stored).max(Some(record.revision));
    if record.revision <= source.revision() {
        return Ok(());
    }
    let value: T =
        serde_json::from_slice(&record.data).map_err(|e| Error::invalid_data(topic, e))?;
    let shared = Shared {
        value: Arc::new(value),
        json: record.data,
    };
    tracing::debug!(%topic, revision = %record.revision, "followed another hub's commit");
    source
        .publish_commits(shared, [(record.revision, None)])
        .map_err(|e| shared_storage_error(topic, Box::new(e)))
}

/// A failure of the shared-storage protocol itself (not of the engine).
fn shared_storage_error(topic: &Topic, source: BoxError) -> Error {
    Error::Storage {
        topic: Some(topic.clone()),
        source: Arc::new(state_sync_storage::Error::Backend {
            backend: "shared storage",
            source,
        }),
    }
}

struct Write<T> {
    change: Change<T>,
    source_id: Option<String>,
    max_bytes: usize,
    reply: oneshot::Sender<Result<Revision>>,
}

async fn commit_batch<T: TopicValue>(
    source: &MemorySource<Shared<T>>,
    storage: &AnyStorage,
    stored: &mut Option<Revision>,
    offered: &AtomicU64,
    health: &crate::hub::StorageHealth,
    batch: &mut Vec<Op<T>>,
) {
    let topic = source.topic().clone();
    let mut writes = Vec::with_capacity(batch.len());
    let mut barriers = Vec::new();
    for op in batch.drain(..) {
        match op {
            Op::Write {
                change,
                source_id,
                max_bytes,
                reply,
            } => writes.push(Write {
                change,
                source_id,
                max_bytes,
                reply,
            }),
            Op::Barrier(done) => barriers.push(done),
            Op::Followed(record) => {
                if let Err(e) = follow(source, stored, record) {
                    tracing::warn!(%topic, error = %e, "cannot take in another hub's commit");
                }
            }
        }
    }
    let answers = commit_writes(source, storage, stored, offered, health, &mut writes).await;
    for (write, answer) in writes.into_iter().zip(answers) {
        let _ = write.reply.send(answer);
    }
    for done in barriers {
        let _ = done.send(());
    }
}

/// Applies `writes` on the current state and stores the result; after
/// losing a compare-and-set race to another hub, takes in its record and
/// applies them again. One answer per write.
async fn commit_writes<T: TopicValue>(
    source: &MemorySource<Shared<T>>,
    storage: &AnyStorage,
    stored: &mut Option<Revision>,
    offered: &AtomicU64,
    health: &crate::hub::StorageHealth,
    writes: &mut [Write<T>],
) -> Vec<Result<Revision>> {
    let topic = source.topic().clone();
    let mut backoff = contention_backoff();
    loop {
        let SnapshotEnvelope {
            revision: base,
            data: mut state,
        } = source.snapshot();
        // Never below what the storage holds: revisions only go forward.
        let mut revision = base.max(stored.unwrap_or(Revision::ZERO));
        let mut answers = Vec::with_capacity(writes.len());
        let mut commits = Vec::new();
        for write in writes.iter_mut() {
            // The limit applies to what is stored and served: the encoding,
            // which can be larger than the JSON the writer sent (`1e5`).
            let next = apply_change(&topic, revision, &*state.value, &mut write.change)
                .and_then(|value| encode(&topic, value))
                .and_then(|next| match next.json.len() {
                    bytes if bytes > write.max_bytes => Err(Error::TooLarge {
                        topic: topic.clone(),
                        bytes,
                        limit: write.max_bytes,
                    }),
                    _ => Ok(next),
                });
            answers.push(match next {
                Ok(_) if revision == Revision::MAX => Err(Error::RevisionsExhausted {
                    topic: topic.clone(),
                }),
                Ok(next) => {
                    revision = revision.next();
                    state = next;
                    commits.push((revision, write.source_id.clone()));
                    Ok(revision)
                }
                Err(e) => Err(e),
            });
        }
        if commits.is_empty() {
            return answers;
        }
        let record = Record::new(revision, state.json.clone());
        offered.fetch_max(revision.get(), Ordering::AcqRel);
        let started = std::time::Instant::now();
        let outcome = storage.store_if(&topic, *stored, &record).await;
        let kind = match &outcome {
            Ok(Stored::Committed) => "committed",
            Ok(Stored::Conflict(_)) => "conflict",
            Err(_) => "error",
        };
        crate::metrics::store_done(kind, started.elapsed());
        health.record(&outcome);
        match outcome {
            Ok(Stored::Committed) => {
                *stored = Some(revision);
                // One invalidation per commit, each naming its own writer.
                if let Err(e) = source.publish_commits(state, commits) {
                    tracing::error!(%topic, error = %e, "committed revision rejected by the source");
                }
                return answers;
            }
            Ok(Stored::Conflict(current)) => {
                // Another hub committed first: take its record in, apply
                // the writes again on top of it.
                match current {
                    Some(current) => {
                        if let Err(e) = follow(source, stored, current) {
                            return writes.iter().map(|_| Err(e.clone())).collect();
                        }
                    }
                    // The storage lost the topic (an engine restarted
                    // empty): write it again, above what we had.
                    None => *stored = None,
                }
                let Some(delay) = backoff.next_delay() else {
                    break;
                };
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                tracing::warn!(%topic, %revision, error = %e, "store failed; writes not committed");
                let failure = Error::Storage {
                    topic: Some(topic.clone()),
                    source: Arc::new(e),
                };
                return answers
                    .into_iter()
                    .map(|answer| answer.and(Err(failure.clone())))
                    .collect();
            }
        }
    }
    tracing::warn!(%topic, "too much contention: writes not committed");
    let failure = shared_storage_error(
        &topic,
        format!("lost {MAX_COMMIT_ATTEMPTS} compare-and-set races in a row to other hubs").into(),
    );
    writes.iter().map(|_| Err(failure.clone())).collect()
}

fn apply_change<T: TopicValue>(
    topic: &Topic,
    current_revision: Revision,
    current: &T,
    change: &mut Change<T>,
) -> Result<T> {
    match change {
        Change::Replace(value) => Ok(value.clone()),
        Change::CompareAndSet { expected, value } if *expected == current_revision => {
            Ok(value.clone())
        }
        Change::CompareAndSet { expected, .. } => Err(Error::Conflict {
            topic: topic.clone(),
            expected: *expected,
            current: current_revision,
        }),
        Change::Update(f) => {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| f(current)))
                .unwrap_or_else(|panic| Err(panic_message(&*panic).into()));
            outcome.map_err(|e| Error::Update {
                topic: topic.clone(),
                source: Arc::new(e),
            })
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic)");
    format!("update closure panicked: {message}")
}

/// The type-erased view of a topic that the hub's JSON API and its
/// [`Subscriber`] use.
pub(crate) trait RawTopic: Send + Sync + 'static {
    fn json(&self) -> JsonSnapshot;
    fn set_json<'a>(
        &'a self,
        data: &'a [u8],
        expected: Option<Revision>,
        source_id: Option<String>,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Revision>>;
    fn subscribe(&self, sink: InvalidationSink) -> BoxFuture<'_, Result<Subscription, BoxError>>;
    fn barrier(&self) -> BoxFuture<'_, ()>;
    /// Takes in a record another hub of a shared storage committed.
    fn follow(&self, record: Record) -> BoxFuture<'_, ()>;
    /// Whether a change notice for `revision` needs no read: this hub's
    /// writer offered that revision (or a later one) itself.
    fn offered(&self, revision: Revision) -> bool;
    fn type_name(&self) -> &'static str;
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: TopicValue> RawTopic for TopicCore<T> {
    fn json(&self) -> JsonSnapshot {
        let snapshot = self.snapshot();
        JsonSnapshot {
            revision: snapshot.revision,
            data: snapshot.json,
        }
    }

    fn set_json<'a>(
        &'a self,
        data: &'a [u8],
        expected: Option<Revision>,
        source_id: Option<String>,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Revision>> {
        Box::pin(async move {
            let value: T = serde_json::from_slice(data)
                .map_err(|e| Error::invalid_data(self.source.topic(), e))?;
            let change = match expected {
                Some(expected) => Change::CompareAndSet { expected, value },
                None => Change::Replace(value),
            };
            self.write(change, source_id, max_bytes).await
        })
    }

    fn subscribe(&self, sink: InvalidationSink) -> BoxFuture<'_, Result<Subscription, BoxError>> {
        let topic = sink.topic().clone();
        Box::pin(async move { self.source.subscribe(&topic, sink).await })
    }

    fn barrier(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            if self.writes.send(Op::Barrier(done)).await.is_ok() {
                let _ = wait.await;
            }
        })
    }

    fn follow(&self, record: Record) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // In the writer's queue: ordered with this hub's own commits.
            let _ = self.writes.send(Op::Followed(record)).await;
        })
    }

    fn offered(&self, revision: Revision) -> bool {
        revision.get() <= self.offered.load(Ordering::Acquire)
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// A typed handle on one topic of a [`Hub`](crate::Hub): read it, write it,
/// and use it as the [`Subscriber`] and [`Provider`] of in-process replicas.
///
/// Writes to one topic are committed one after the other, in the order
/// they were queued; each commit makes the revision exactly one larger,
/// is stored before the writer gets its revision back, and sends one
/// invalidation to every subscriber. Cheap to clone.
///
/// # Examples
///
/// ```
/// use state_sync_hub::{Error, Hub};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let hub = Hub::in_memory();
/// let counter = hub.topic("counter", || 0u64).await?;
///
/// let first = counter.update(|n| n + 1).await?;
/// assert_eq!(*counter.get().value(), 1);
///
/// // A compare-and-set against an old revision is refused.
/// counter.replace(10).await?;
/// let conflict = counter.compare_and_set(first, 99).await.unwrap_err();
/// assert_eq!(conflict.current_revision(), Some(first.next()));
/// # Ok(())
/// # }
/// ```
pub struct HubTopic<T> {
    core: Arc<TopicCore<T>>,
    source_id: Option<String>,
}

impl<T> Clone for HubTopic<T> {
    fn clone(&self) -> Self {
        HubTopic {
            core: self.core.clone(),
            source_id: self.source_id.clone(),
        }
    }
}

impl<T: TopicValue> HubTopic<T> {
    pub(crate) fn new(core: Arc<TopicCore<T>>) -> Self {
        HubTopic {
            core,
            source_id: None,
        }
    }

    /// A handle whose writes carry `source_id` in their invalidations, so
    /// that writer's own replica can skip them.
    #[must_use]
    pub fn with_source_id(&self, source_id: impl Into<String>) -> Self {
        HubTopic {
            core: self.core.clone(),
            source_id: Some(source_id.into()),
        }
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &Topic {
        self.core.source.topic()
    }

    /// The current revision and value.
    #[must_use]
    pub fn get(&self) -> Snapshot<T> {
        self.core.snapshot()
    }

    /// The current revision.
    #[must_use]
    pub fn revision(&self) -> Revision {
        self.core.source.revision()
    }

    /// Replaces the value; returns the new revision.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`], [`Error::Encode`], [`Error::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel a write already handed to the
    /// topic's writer task: it is committed (and its invalidation sent); only
    /// the answer is lost. A write still waiting for room in the topic's queue
    /// is not queued, and not committed.
    pub async fn replace(&self, value: T) -> Result<Revision> {
        self.write(Change::Replace(value)).await
    }

    /// Computes the new value from the current one, atomically with respect
    /// to every other writer of this topic; returns the new revision.
    ///
    /// The closure runs on the topic's writer task: keep it short. On a
    /// shared storage it runs again when another hub committed first (an
    /// optimistic transaction), so keep it free of side effects.
    ///
    /// # Errors
    ///
    /// [`Error::Update`] if it panics; otherwise as for
    /// [`replace`](Self::replace).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel a write already handed to the
    /// topic's writer task: it is committed (and its invalidation sent); only
    /// the answer is lost. A write still waiting for room in the topic's queue
    /// is not queued, and not committed.
    pub async fn update(&self, mut f: impl FnMut(&T) -> T + Send + 'static) -> Result<Revision> {
        self.try_update(move |current| Ok::<_, BoxError>(f(current)))
            .await
    }

    /// Like [`update`](Self::update), with a closure that may refuse: its
    /// error is returned as [`Error::Update`] and nothing is committed.
    ///
    /// # Errors
    ///
    /// As for [`update`](Self::update).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel a write already handed to the
    /// topic's writer task: it is committed (and its invalidation sent); only
    /// the answer is lost. A write still waiting for room in the topic's queue
    /// is not queued, and not committed.
    pub async fn try_update<E: Into<BoxError>>(
        &self,
        mut f: impl FnMut(&T) -> Result<T, E> + Send + 'static,
    ) -> Result<Revision> {
        let f = Box::new(move |current: &T| f(current).map_err(Into::into));
        self.write(Change::Update(f)).await
    }

    /// Replaces the value only if the topic is still at `expected`.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the current revision when it is not;
    /// otherwise as for [`replace`](Self::replace).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel a write already handed to the
    /// topic's writer task: it is committed (and its invalidation sent); only
    /// the answer is lost. A write still waiting for room in the topic's queue
    /// is not queued, and not committed.
    pub async fn compare_and_set(&self, expected: Revision, value: T) -> Result<Revision> {
        self.write(Change::CompareAndSet { expected, value }).await
    }

    async fn write(&self, change: Change<T>) -> Result<Revision> {
        self.core
            .write(change, self.source_id.clone(), usize::MAX)
            .await
    }
}

impl<T: TopicValue> state_sync::Source for HubTopic<T> {
    fn topic(&self) -> &Topic {
        HubTopic::topic(self)
    }
}

impl<T: TopicValue> Subscriber for HubTopic<T> {
    fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> impl Future<Output = Result<Subscription, BoxError>> + Send {
        self.core.source.subscribe(topic, sink)
    }
}

impl<T: TopicValue> Provider for HubTopic<T> {
    type Data = T;

    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<T>, FetchError>> + Send {
        let fetched = self.core.source.fetch(request);
        async move { Ok(value_of(fetched.await?)) }
    }

    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<T>> {
        self.core.source.fetch_now(request).map(value_of)
    }
}

/// A stored snapshot as the value it holds.
fn value_of<T: TopicValue>(fetched: Fetched<Shared<T>>) -> Fetched<T> {
    match fetched {
        Fetched::Snapshot(envelope) => Fetched::Snapshot(SnapshotEnvelope::new(
            envelope.revision,
            T::clone(&envelope.data.value),
        )),
        Fetched::NotModified { revision } => Fetched::NotModified { revision },
    }
}

impl<T: TopicValue> fmt::Debug for HubTopic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubTopic")
            .field("topic", self.core.source.topic())
            .field("revision", &self.core.source.revision())
            .field("source_id", &self.source_id)
            .finish()
    }
}
