//! [`SnapshotCache`]: load, restore, stage and save.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use state_sync::{
    AppliedNow, Applier, Backoff, BoxError, RetryPolicy, Revision, SnapshotEnvelope, Topic,
};
use state_sync_storage::{AnyStorage, Record, Storage};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;
use crate::format::{self, Compression};

type Migration = Box<dyn Fn(Value) -> Result<Value, BoxError> + Send + Sync>;
type Validator<T> = Box<dyn Fn(&T) -> Result<(), BoxError> + Send + Sync>;
type EventFn = Box<dyn Fn(&CacheEvent) + Send + Sync>;
type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

/// What a cache reports to [`CacheBuilder::on_event`]. Every variant fires.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheEvent {
    /// A save of `revision` started.
    SaveStarted {
        /// The revision being saved.
        revision: Revision,
    },
    /// A save completed.
    SaveCompleted {
        /// The revision saved.
        revision: Revision,
        /// Bytes written (after compression, with the header).
        stored_bytes: usize,
    },
    /// A save failed; the snapshot stays pending for the next save.
    SaveFailed {
        /// The revision that was not saved.
        revision: Revision,
        /// The error, as text.
        error: String,
    },
    /// [`SnapshotCache::load`] finished; `revision` is `None` when nothing
    /// usable was cached.
    LoadCompleted {
        /// The cached revision.
        revision: Option<Revision>,
    },
    /// The cached snapshot was older than the TTL and was removed.
    Expired {
        /// Its revision.
        revision: Revision,
        /// How old it was.
        age: Duration,
    },
    /// The cached snapshot was migrated to the current schema.
    Migrated {
        /// The stored schema version.
        from: u32,
        /// The current schema version.
        to: u32,
    },
    /// The cached snapshot was removed ([`SnapshotCache::clear`] or expiry).
    Cleared,
}

/// Counters of a cache; from [`SnapshotCache::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Snapshots staged by the applier.
    pub staged: u64,
    /// Staged snapshots replaced by a newer one before being saved.
    pub coalesced: u64,
    /// Saves that completed.
    pub saves: u64,
    /// Saves that failed.
    pub save_failures: u64,
    /// Loads that returned a snapshot.
    pub loads: u64,
    /// The last revision saved.
    pub last_saved_revision: Option<Revision>,
    /// The value's JSON size at the last save.
    pub last_json_bytes: usize,
    /// What the last save wrote (after compression, with the header).
    pub last_stored_bytes: usize,
}

/// Configures a [`SnapshotCache`]; from [`SnapshotCache::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct CacheBuilder<T> {
    settings: Settings<T>,
}

/// What a cache is configured with; shared by the builder and the cache.
struct Settings<T> {
    topic: Topic,
    storage: AnyStorage,
    schema: u32,
    migrations: BTreeMap<u32, Migration>,
    validator: Option<Validator<T>>,
    ttl: Option<Duration>,
    compression: Compression,
    timing: SaveTiming,
    on_event: Option<EventFn>,
    clock: Clock,
}

#[derive(Debug, Clone, Copy, Default)]
struct SaveTiming {
    debounce: Option<Duration>,
    throttle: Option<Duration>,
    max_wait: Option<Duration>,
}

impl<T> CacheBuilder<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// The schema version this build writes (default 1). Older records are
    /// migrated step by step; newer ones are refused.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.settings.schema = version;
        self
    }

    /// The step from schema version `from` to `from + 1`, on the stored
    /// JSON.
    pub fn migration<E: Into<BoxError>>(
        mut self,
        from: u32,
        step: impl Fn(Value) -> Result<Value, E> + Send + Sync + 'static,
    ) -> Self {
        self.settings
            .migrations
            .insert(from, Box::new(move |v| step(v).map_err(Into::into)));
        self
    }

    /// A check a loaded value must pass before it is used.
    pub fn validate<E: Into<BoxError>>(
        mut self,
        check: impl Fn(&T) -> Result<(), E> + Send + Sync + 'static,
    ) -> Self {
        self.settings.validator = Some(Box::new(move |v| check(v).map_err(Into::into)));
        self
    }

    /// Cached snapshots older than `ttl` (by the time they were saved) are
    /// removed instead of loaded.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = Some(ttl);
        self
    }

    /// How payloads are compressed (default: not).
    pub fn compression(mut self, compression: Compression) -> Self {
        self.settings.compression = compression;
        self
    }

    /// Saves once no new snapshot arrived for `delay`.
    pub fn debounce(mut self, delay: Duration) -> Self {
        self.settings.timing.debounce = Some(delay);
        self
    }

    /// At most one save per `interval`.
    pub fn throttle(mut self, interval: Duration) -> Self {
        self.settings.timing.throttle = Some(interval);
        self
    }

    /// Bounds the debounce: a staged snapshot waits at most `max_wait` for
    /// quiet, however often new snapshots postpone it. The throttle still
    /// holds (saves stay `throttle` apart), and so does the backoff after a
    /// failed save.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.settings.timing.max_wait = Some(max_wait);
        self
    }

    /// Called for every [`CacheEvent`]. A panic inside it is caught.
    pub fn on_event(mut self, callback: impl Fn(&CacheEvent) + Send + Sync + 'static) -> Self {
        self.settings.on_event = Some(Box::new(callback));
        self
    }

    /// The wall clock used for save times and TTL (default:
    /// [`SystemTime::now`]); replaceable for tests.
    pub fn clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.settings.clock = Box::new(clock);
        self
    }

    /// Builds the cache and starts its saver task.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime; the runtime must have its timer enabled.
    pub fn build(self) -> SnapshotCache<T> {
        let (commands, queue) = mpsc::channel(8);
        let inner = Arc::new(Inner {
            settings: self.settings,
            stats: Mutex::new(CacheStats::default()),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            disposed: AtomicBool::new(false),
        });
        tokio::spawn(run_saver(inner.clone(), queue));
        SnapshotCache { inner, commands }
    }
}

impl<T> fmt::Debug for CacheBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("topic", &self.settings.topic)
            .field("schema", &self.settings.schema)
            .finish_non_exhaustive()
    }
}

/// Caches a replica's applied snapshots so it starts with state before its
/// first fetch.
///
/// [`restore`](Self::restore) applies the cached snapshot to the replica's
/// applier and returns its revision, to seed the engine's revision gate
/// ([`initial_revision`](state_sync::SyncHandleBuilder::initial_revision)): the
/// engine's first fetch is then conditional and applies only a newer
/// snapshot. [`wrap`](Self::wrap) makes an applier that stages every applied
/// snapshot; the cache's saver task writes the latest one, as often as the
/// save timing allows. Cheap to clone; one cache per replica and topic.
///
/// # Examples
///
/// ```
/// use state_sync::{MemorySource, SyncHandle, Topic};
/// use state_sync_cache::SnapshotCache;
/// use state_sync_storage::MemoryStorage;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let topic = Topic::new("settings")?;
/// let source = MemorySource::new(topic.clone(), String::from("light"));
/// let storage = MemoryStorage::new();
/// let (tx, rx) = tokio::sync::watch::channel(String::new());
///
/// let cache = SnapshotCache::builder(topic.clone(), storage.clone()).build();
/// let cached = cache.restore(&tx).await?; // None on the first run
/// let mut builder = SyncHandle::builder(source.clone(), cache.wrap(tx));
/// if let Some(revision) = cached {
///     builder = builder.initial_revision(revision);
/// }
/// let handle = builder.build();
/// handle.start().await?;
/// source.publish("dark".into());
/// handle.wait_for_revision(source.revision()).await?;
/// cache.flush().await?;
/// assert_eq!(cache.stats().last_saved_revision, Some(source.revision()));
/// # assert_eq!(*rx.borrow(), "dark");
/// # Ok(())
/// # }
/// ```
pub struct SnapshotCache<T> {
    inner: Arc<Inner<T>>,
    commands: mpsc::Sender<Command>,
}

impl<T> Clone for SnapshotCache<T> {
    fn clone(&self) -> Self {
        SnapshotCache {
            inner: self.inner.clone(),
            commands: self.commands.clone(),
        }
    }
}

struct Inner<T> {
    settings: Settings<T>,
    stats: Mutex<CacheStats>,
    pending: Mutex<Pending<T>>,
    wake: Notify,
    disposed: AtomicBool,
}

/// The newest staged snapshot and the times the save timing needs.
struct Pending<T> {
    snapshot: Option<SnapshotEnvelope<T>>,
    first_staged: Option<Instant>,
    last_staged: Option<Instant>,
    last_save: Option<Instant>,
    /// After failed saves: no automatic save before this.
    retry_at: Option<Instant>,
    /// Delays between automatic retries of a failing save.
    backoff: Backoff,
}

/// How long a failing save waits before it is tried again: 100 ms doubling
/// to 30 s, with jitter, for as long as it fails.
fn save_retry_policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(u32::MAX)
        .initial_delay(Duration::from_millis(100))
        .max_delay(Duration::from_secs(30))
        .jitter(true)
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            snapshot: None,
            first_staged: None,
            last_staged: None,
            last_save: None,
            retry_at: None,
            backoff: save_retry_policy().backoff(),
        }
    }
}

enum Command {
    Flush(oneshot::Sender<Result<(), Error>>),
    Dispose(oneshot::Sender<Result<(), Error>>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> SnapshotCache<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// A cache for `topic` in `storage` (any
    /// [`Storage`](state_sync_storage::Storage); the crash-safe
    /// [`FileStorage`](state_sync_storage::FileStorage) for real apps).
    pub fn builder(topic: Topic, storage: impl Storage) -> CacheBuilder<T> {
        CacheBuilder {
            settings: Settings {
                topic,
                storage: AnyStorage::new(storage),
                schema: 1,
                migrations: BTreeMap::new(),
                validator: None,
                ttl: None,
                compression: Compression::None,
                timing: SaveTiming::default(),
                on_event: None,
                clock: Box::new(SystemTime::now),
            },
        }
    }

    /// The cached snapshot, checked, expired, migrated and validated; `None`
    /// when nothing is cached or it expired.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`], [`FutureVersion`](Error::FutureVersion),
    /// [`MissingMigration`](Error::MissingMigration),
    /// [`MigrationFailed`](Error::MigrationFailed),
    /// [`Invalid`](Error::Invalid),
    /// [`Validation`](Error::Validation),
    /// [`Storage`](Error::Storage). The record is left untouched.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn load(&self) -> Result<Option<SnapshotEnvelope<T>>, Error> {
        let inner = &self.inner;
        let Some(record) = inner.settings.storage.load(&inner.settings.topic).await? else {
            inner.emit(&CacheEvent::LoadCompleted { revision: None });
            return Ok(None);
        };
        let (header, json) = format::decode(&record.data)?;
        if let Some(ttl) = inner.settings.ttl {
            let saved = UNIX_EPOCH + Duration::from_millis(header.saved_at_ms);
            let age = (inner.settings.clock)()
                .duration_since(saved)
                .unwrap_or_default();
            if age > ttl {
                inner.emit(&CacheEvent::Expired {
                    revision: record.revision,
                    age,
                });
                self.clear().await?;
                inner.emit(&CacheEvent::LoadCompleted { revision: None });
                return Ok(None);
            }
        }
        let value = inner.migrate(header.schema, &json)?;
        let value: T = serde_json::from_value(value).map_err(Error::Invalid)?;
        if let Some(validate) = &inner.settings.validator {
            validate(&value).map_err(Error::Validation)?;
        }
        lock(&inner.stats).loads += 1;
        inner.emit(&CacheEvent::LoadCompleted {
            revision: Some(record.revision),
        });
        Ok(Some(SnapshotEnvelope::new(record.revision, value)))
    }

    /// Loads the cached snapshot and applies it to `applier`; returns its
    /// revision, for [`initial_revision`](state_sync::SyncHandleBuilder::initial_revision).
    ///
    /// # Errors
    ///
    /// As for [`load`](Self::load); [`Error::Apply`] when the applier
    /// refuses the snapshot.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it resolves, the snapshot may or may not
    /// have been applied; nothing is written.
    pub async fn restore<A: Applier<T>>(&self, applier: &A) -> Result<Option<Revision>, Error> {
        let Some(snapshot) = self.load().await? else {
            return Ok(None);
        };
        let revision = snapshot.revision;
        applier.apply(snapshot).await.map_err(Error::Apply)?;
        Ok(Some(revision))
    }

    /// An applier that applies through `applier` and then stages the
    /// snapshot for saving.
    pub fn wrap<A: Applier<T>>(&self, applier: A) -> CachingApplier<A, T> {
        CachingApplier {
            inner: applier,
            cache: self.clone(),
            _value: PhantomData,
        }
    }

    /// Stages `snapshot` for saving; the newest staged snapshot wins.
    /// Ignored once [`dispose`](Self::dispose) has made its final save.
    pub fn stage(&self, snapshot: SnapshotEnvelope<T>) {
        let now = Instant::now();
        {
            let mut pending = lock(&self.inner.pending);
            // Checked under the lock `dispose` sets it under: a snapshot is
            // either saved by the final save or refused, never dropped.
            if self.inner.disposed.load(Ordering::Acquire) {
                return;
            }
            let replaced = pending.snapshot.replace(snapshot).is_some();
            pending.first_staged.get_or_insert(now);
            pending.last_staged = Some(now);
            let mut stats = lock(&self.inner.stats);
            stats.staged += 1;
            stats.coalesced += u64::from(replaced);
        }
        self.inner.wake.notify_one();
    }

    /// Saves the staged snapshot now, if any, and waits for it.
    ///
    /// # Errors
    ///
    /// The save's error; [`Error::Disposed`] after `dispose`.
    ///
    /// # Cancel safety
    ///
    /// Dropping it may leave the pending save unwritten; the previous stored
    /// copy stays intact (saves replace the file atomically).
    pub async fn flush(&self) -> Result<(), Error> {
        self.command(Command::Flush).await
    }

    /// Flushes, then stops saving: snapshots staged while the final save
    /// runs are saved too, later ones are not staged.
    ///
    /// # Errors
    ///
    /// The final save's error.
    ///
    /// # Cancel safety
    ///
    /// As for [`flush`](Self::flush).
    pub async fn dispose(&self) -> Result<(), Error> {
        let result = self.command(Command::Dispose).await;
        // Already set by the saver; also when it had gone.
        self.inner.disposed.store(true, Ordering::Release);
        match result {
            Err(Error::Disposed) => Ok(()),
            other => other,
        }
    }

    /// Removes the cached snapshot (and any staged one).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    ///
    /// # Cancel safety
    ///
    /// Dropped before it resolves, the stored copy may or may not be removed.
    pub async fn clear(&self) -> Result<(), Error> {
        lock(&self.inner.pending).snapshot = None;
        self.inner
            .settings
            .storage
            .remove(&self.inner.settings.topic)
            .await?;
        self.inner.emit(&CacheEvent::Cleared);
        Ok(())
    }

    /// The cache's counters.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        lock(&self.inner.stats).clone()
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Command,
    ) -> Result<(), Error> {
        let (ack, done) = oneshot::channel();
        self.commands
            .send(make(ack))
            .await
            .map_err(|_| Error::Disposed)?;
        done.await.unwrap_or(Err(Error::Disposed))
    }
}

impl<T> fmt::Debug for SnapshotCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotCache")
            .field("topic", &self.inner.settings.topic)
            .field("schema", &self.inner.settings.schema)
            .field("stats", &*lock(&self.inner.stats))
            .finish_non_exhaustive()
    }
}

impl<T> Inner<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn emit(&self, event: &CacheEvent) {
        tracing::trace!(topic = %self.settings.topic, ?event, "cache event");
        if let Some(callback) = &self.settings.on_event
            && std::panic::catch_unwind(AssertUnwindSafe(|| callback(event))).is_err()
        {
            tracing::error!(topic = %self.settings.topic, ?event, "cache event callback panicked");
        }
    }

    fn migrate(&self, stored: u32, json: &[u8]) -> Result<Value, Error> {
        if stored > self.settings.schema {
            return Err(Error::FutureVersion {
                stored,
                current: self.settings.schema,
            });
        }
        let mut value: Value = serde_json::from_slice(json).map_err(Error::Invalid)?;
        for from in stored..self.settings.schema {
            let step = self
                .settings
                .migrations
                .get(&from)
                .ok_or(Error::MissingMigration { from })?;
            value = step(value).map_err(|source| Error::MigrationFailed { from, source })?;
        }
        if stored < self.settings.schema {
            self.emit(&CacheEvent::Migrated {
                from: stored,
                to: self.settings.schema,
            });
        }
        Ok(value)
    }

    /// When the staged snapshot is due, or `None` when nothing is staged.
    ///
    /// Debounce waits for quiet, `max_wait` bounds that wait, the throttle
    /// then spaces saves apart, and after a failure the retry backoff holds
    /// further automatic saves back.
    fn due(&self) -> Option<Instant> {
        let pending = lock(&self.pending);
        pending.snapshot.as_ref()?;
        let last = pending.last_staged?;
        let timing = &self.settings.timing;
        let mut due = last + timing.debounce.unwrap_or_default();
        if let (Some(max_wait), Some(first)) = (timing.max_wait, pending.first_staged) {
            due = due.min(first + max_wait);
        }
        if let (Some(interval), Some(saved)) = (timing.throttle, pending.last_save) {
            due = due.max(saved + interval);
        }
        if let Some(retry_at) = pending.retry_at {
            due = due.max(retry_at);
        }
        Some(due)
    }

    /// Saves the staged snapshot, if any. A failed save leaves it staged
    /// unless a newer one arrived meanwhile.
    async fn save_pending(&self) -> Result<(), Error> {
        let snapshot = {
            let mut pending = lock(&self.pending);
            let Some(snapshot) = pending.snapshot.take() else {
                return Ok(());
            };
            pending.first_staged = None;
            pending.last_save = Some(Instant::now());
            snapshot
        };
        let revision = snapshot.revision;
        self.emit(&CacheEvent::SaveStarted { revision });
        match self.write(&snapshot).await {
            Ok(encoded) => {
                {
                    let mut pending = lock(&self.pending);
                    pending.retry_at = None;
                    pending.backoff.reset();
                }
                {
                    let mut stats = lock(&self.stats);
                    stats.saves += 1;
                    stats.last_saved_revision = Some(revision);
                    stats.last_json_bytes = encoded.json_bytes;
                    stats.last_stored_bytes = encoded.stored_bytes;
                }
                self.emit(&CacheEvent::SaveCompleted {
                    revision,
                    stored_bytes: encoded.stored_bytes,
                });
                Ok(())
            }
            Err(error) => {
                lock(&self.stats).save_failures += 1;
                tracing::warn!(topic = %self.settings.topic, %revision, %error, "cache save failed");
                self.emit(&CacheEvent::SaveFailed {
                    revision,
                    error: error.to_string(),
                });
                let mut pending = lock(&self.pending);
                if pending.snapshot.is_none() {
                    pending.snapshot = Some(snapshot);
                    pending.first_staged.get_or_insert(Instant::now());
                }
                // Back off: the failure will most likely repeat at once.
                let delay = pending
                    .backoff
                    .next_delay()
                    .unwrap_or(Duration::from_secs(30));
                pending.retry_at = Some(Instant::now() + delay);
                Err(error)
            }
        }
    }

    /// Saves until nothing is staged, then refuses further stages, under
    /// the lock `stage` takes. Gives up after a failed save, or after a few
    /// rounds if snapshots keep arriving.
    async fn final_save(&self) -> Result<(), Error> {
        for _ in 0..16 {
            self.save_pending().await?;
            let pending = lock(&self.pending);
            if pending.snapshot.is_none() {
                self.disposed.store(true, Ordering::Release);
                return Ok(());
            }
        }
        let _pending = lock(&self.pending);
        self.disposed.store(true, Ordering::Release);
        Ok(())
    }

    async fn write(&self, snapshot: &SnapshotEnvelope<T>) -> Result<format::Encoded, Error> {
        let json = serde_json::to_vec(&snapshot.data).map_err(Error::Encode)?;
        let saved_at_ms = (self.settings.clock)()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let (bytes, encoded) = format::encode(
            &json,
            self.settings.schema,
            saved_at_ms,
            self.settings.compression,
        )?;
        self.settings
            .storage
            .store(&self.settings.topic, &Record::new(snapshot.revision, bytes))
            .await?;
        Ok(encoded)
    }
}

/// The saver task: saves when the staged snapshot is due, on `flush`, and
/// when the last handle is dropped.
async fn run_saver<T>(inner: Arc<Inner<T>>, mut commands: mpsc::Receiver<Command>)
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    loop {
        let due = inner.due();
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Flush(ack)) => {
                    let _ = ack.send(inner.save_pending().await);
                }
                Some(Command::Dispose(ack)) => {
                    let _ = ack.send(inner.final_save().await);
                    return;
                }
                None => {
                    let _ = inner.save_pending().await;
                    return;
                }
            },
            () = inner.wake.notified() => {}
            () = sleep_until(due), if due.is_some() => {
                let _ = inner.save_pending().await;
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

/// An [`Applier`] that applies through another and stages each applied
/// snapshot in a [`SnapshotCache`]; from [`SnapshotCache::wrap`].
pub struct CachingApplier<A, T> {
    inner: A,
    cache: SnapshotCache<T>,
    _value: PhantomData<fn(T)>,
}

impl<A, T> Applier<T> for CachingApplier<A, T>
where
    A: Applier<T>,
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    async fn apply(&self, snapshot: SnapshotEnvelope<T>) -> Result<(), BoxError> {
        self.inner.apply(snapshot.clone()).await?;
        self.cache.stage(snapshot);
        Ok(())
    }

    fn apply_now(&self, snapshot: SnapshotEnvelope<T>) -> AppliedNow<T> {
        match self.inner.apply_now(snapshot.clone()) {
            AppliedNow::Done(Ok(())) => {
                self.cache.stage(snapshot);
                AppliedNow::Done(Ok(()))
            }
            AppliedNow::Done(Err(error)) => AppliedNow::Done(Err(error)),
            AppliedNow::Later(_) => AppliedNow::Later(snapshot),
        }
    }
}

impl<A: fmt::Debug, T> fmt::Debug for CachingApplier<A, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingApplier")
            .field("inner", &self.inner)
            .field("cache", &self.cache)
            .finish()
    }
}
