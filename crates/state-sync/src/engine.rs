//! The engine: one [`SyncHandle`] per topic keeps a local copy current.
//!
//! # How it works
//!
//! ```text
//!  subscriber ──invalidation──▶ gate ──(newer?)──▶ pending slot ──▶ worker task
//!                               (2 atomic loads)   (latest wins)     │ debounce / throttle
//!                                                                    │ fetch (retry + backoff)
//!                                                                    │ gate again
//!                                                                    ▼ apply ──▶ local revision
//! ```
//!
//! - **Revision gate.** The first snapshot is applied whatever its revision
//!   (also `0`); later ones only if strictly newer. Invalidations at or below
//!   the local revision cost two atomic loads and never fetch.
//! - **Coalescing.** Invalidations land in a single pending slot that keeps
//!   the newest event. One worker task per handle drains it, so at most one
//!   invalidation-triggered fetch is in flight and at most one is queued: N
//!   invalidations during a fetch cause at most one more fetch. The worker
//!   exits when the slot is empty, so an idle handle owns no task.
//! - **One fetch at a time.** Worker refreshes and explicit
//!   [`SyncHandle::refresh`] calls take turns; `stop` waits for the turn in
//!   progress, so no snapshot is applied after `stop` returns.
//! - **Re-entrancy.** No lock is held while the applier runs. An applier may
//!   cause an invalidation for its own handle (it is queued), call
//!   [`SyncHandle::refresh`] (it is queued instead of waiting on itself) or
//!   [`SyncHandle::stop`] (it does not wait for itself).
//! - **Throttling** of invalidation-triggered refreshes, see [`Throttle`]:
//!   debounce first (wait until `debounce` passes without a new
//!   invalidation), then throttle (at most one fetch per `interval`, on the
//!   leading and/or trailing edge). `start` and `refresh` are never delayed.
//! - **Retry.** A provider failure ([`FetchError::Unavailable`]) is retried
//!   per the [`RetryPolicy`]; each scheduled retry is reported with its
//!   attempt and delay. `stop` cancels pending retries.
//! - **Errors** go to the error callback once each, in their most specific
//!   [`Phase`]. Neither a failing refresh nor a panicking callback stops the
//!   engine.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::applier::Applier;
use crate::backoff::RetryPolicy;
use crate::error::{BoxError, Error, ErrorContext, Phase, Result, Stopped};
use crate::metrics::ReplicaMetrics;
use crate::protocol::{InvalidationEvent, ProtocolError, SnapshotEnvelope};
use crate::provider::{FetchError, FetchRequest, Fetched, Provider};
use crate::revision::Revision;
use crate::subscriber::{InvalidationSink, SinkTarget, Subscriber, Subscription};
use crate::topic::Topic;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type ShouldRefresh = Arc<dyn Fn(&InvalidationEvent) -> bool + Send + Sync>;
type OnError = Arc<dyn Fn(&Error) + Send + Sync>;

/// Where a handle is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Built, not started.
    Idle,
    /// `start` is subscribing and fetching the first snapshot.
    Connecting,
    /// Started; invalidations are flowing.
    Live,
    /// The subscriber lost its connection; invalidations may be missed until
    /// it comes back (then the handle refreshes).
    Interrupted,
    /// Stopped for good.
    Stopped,
}

/// Rate limits for invalidation-triggered refreshes.
///
/// With both set, debounce feeds the throttle: an invalidation first waits
/// until `debounce` has passed without another one; the refresh that
/// results is then subject to the throttle window. Explicit `start` and
/// `refresh` calls bypass both.
///
/// Throttle edges (default: both on):
/// - **leading**: outside a window, refresh at once and open a window of
///   `interval`;
/// - **trailing**: invalidations inside a window cause one refresh when it
///   ends (which opens the next window);
/// - leading off, trailing on: the first invalidation opens a window and the
///   refresh happens when it ends;
/// - both off: invalidations never refresh; each dropped one is reported in
///   the `throttle` phase so the misconfiguration is visible.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use state_sync::Throttle;
///
/// let throttle = Throttle::new(Duration::from_millis(250)).leading(false);
/// # let _ = throttle;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    interval: Duration,
    leading: bool,
    trailing: bool,
}

impl Throttle {
    /// At most one refresh per `interval`, both edges on.
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            leading: true,
            trailing: true,
        }
    }

    /// Refresh at once on the first invalidation of a window.
    #[must_use]
    pub fn leading(mut self, on: bool) -> Self {
        self.leading = on;
        self
    }

    /// Refresh when a window that saw invalidations ends.
    #[must_use]
    pub fn trailing(mut self, on: bool) -> Self {
        self.trailing = on;
        self
    }
}

#[derive(Clone, Default)]
struct Options {
    debounce: Option<Duration>,
    throttle: Option<Throttle>,
    retry: RetryPolicy,
    should_refresh: Option<ShouldRefresh>,
    on_error: Option<OnError>,
    initial_revision: Option<Revision>,
}

/// Builds a [`SyncHandle`]; from [`SyncHandle::builder`] or
/// [`SyncHandle::from_parts`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct SyncHandleBuilder<S, P, A> {
    topic: Topic,
    subscriber: S,
    provider: P,
    applier: A,
    options: Options,
}

impl<S, P, A> SyncHandleBuilder<S, P, A>
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    /// Waits until `delay` passes without a new invalidation before
    /// refreshing.
    pub fn debounce(mut self, delay: Duration) -> Self {
        self.options.debounce = (!delay.is_zero()).then_some(delay);
        self
    }

    /// Limits invalidation-triggered refreshes to one per window; see
    /// [`Throttle`].
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.options.throttle = (!throttle.interval.is_zero()).then_some(throttle);
        self
    }

    /// How failed fetches are retried (default: 3 attempts, 500 ms, ×2,
    /// capped at 10 s).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = policy;
        self
    }

    /// A filter that can veto the refresh for an invalidation, for example
    /// to skip a window's own writes by `source_id`. Called for each event
    /// that passes the revision gate; a panic counts as "refresh" and is
    /// reported.
    pub fn should_refresh(
        mut self,
        filter: impl Fn(&InvalidationEvent) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.options.should_refresh = Some(Arc::new(filter));
        self
    }

    /// Called once for each failure. A panic inside it is caught and logged;
    /// it never stops the engine.
    pub fn on_error(mut self, callback: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.options.on_error = Some(Arc::new(callback));
        self
    }

    /// Declares that the applier's state already holds `revision` (for
    /// example restored from a client-side cache): the revision gate starts
    /// there, so `start` fetches conditionally and applies only a newer
    /// snapshot. A source found *behind* this revision on `start` is
    /// resynced from, as described on [`SyncHandle`].
    pub fn initial_revision(mut self, revision: Revision) -> Self {
        self.options.initial_revision = Some(revision);
        self
    }

    /// Builds the handle. Nothing happens until [`SyncHandle::start`].
    pub fn build(self) -> SyncHandle {
        let (progress, _) = watch::channel(Status::Idle);
        let initial = self.options.initial_revision;
        let gate = Arc::new(Gate {
            topic: self.topic,
            local: AtomicU64::new(initial.map_or(0, Revision::get)),
            applied: AtomicBool::new(initial.is_some()),
            closed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
        });
        let engine = Engine {
            metrics: ReplicaMetrics::new(&gate.topic),
            gate,
            subscriber: self.subscriber,
            provider: self.provider,
            applier: self.applier,
            options: self.options,
            state: Mutex::new(State::default()),
            progress,
            revision_changed: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
            start_turn: tokio::sync::Mutex::new(()),
            wake_worker: Arc::new(Notify::new()),
            worker_parked: OnceLock::new(),
        };
        SyncHandle {
            core: Arc::new(engine),
        }
    }
}

impl<S, P, A> fmt::Debug for SyncHandleBuilder<S, P, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncHandleBuilder")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Keeps one topic's local copy in sync with its source of truth.
///
/// Cheap to clone; clones share the engine. Dropping every clone (with no
/// refresh in progress) unsubscribes, like [`SyncHandle::stop`].
///
/// # A source behind the replica
///
/// Invalidations at or below the local revision are ignored, so a source
/// that restarted without its state (its revisions now lower than the
/// replica's) would be ignored forever. To avoid that, a *resync* —
/// [`start`](Self::start), and the refresh after a transport reconnects —
/// adopts the source's snapshot when the source reports a revision *lower*
/// than the local one, with a warning in the logs. Invalidation-driven and
/// manual refreshes never move the revision backwards.
///
/// # Examples
///
/// ```
/// use state_sync::{MemorySource, SyncHandle, Topic};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let source = MemorySource::new(Topic::new("counter")?, 0u64);
/// let (tx, rx) = tokio::sync::watch::channel(0u64);
///
/// let handle = SyncHandle::builder(source.clone(), tx)
///     .on_error(|e| eprintln!("{e}"))
///     .build();
/// handle.start().await?;
///
/// let revision = source.publish(41);
/// handle.wait_for_revision(revision).await?;
/// assert_eq!(*rx.borrow(), 41);
/// handle.stop().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SyncHandle {
    core: Arc<dyn Core>,
}

trait Core: Send + Sync + 'static {
    fn gate(&self) -> &Gate;
    fn progress(&self) -> &watch::Sender<Status>;
    fn revision_changed(&self) -> &Notify;
    fn start(self: Arc<Self>) -> BoxFuture<'static, Result<()>>;
    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()>;
    fn refresh(self: Arc<Self>) -> BoxFuture<'static, Result<()>>;
}

impl SyncHandle {
    /// Starts building a replica of `source`'s topic that hands each newer
    /// snapshot to `applier`. The source is the subscriber and the provider
    /// and knows its topic: a `HubTopic`, a `RemoteTopic`, a
    /// [`MemorySource`](crate::MemorySource).
    ///
    /// ```
    /// use state_sync::{MemorySource, SyncHandle, Topic};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let source = MemorySource::new(Topic::new("settings")?, 0u32);
    /// let (applier, mut seen) = tokio::sync::watch::channel(0u32);
    /// let handle = SyncHandle::builder(source.clone(), applier).build();
    /// handle.start().await?;
    /// let revision = source.publish(7);
    /// handle.wait_for_revision(revision).await?;
    /// assert_eq!(*seen.borrow_and_update(), 7);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder<S, A>(source: S, applier: A) -> SyncHandleBuilder<S, S, A>
    where
        S: crate::Source + Clone,
        A: Applier<S::Data>,
    {
        let topic = source.topic().clone();
        SyncHandle::from_parts(topic, source.clone(), source, applier)
    }

    /// Starts building a handle for `topic` from separate parts: for custom
    /// transports whose subscriber and provider are different values.
    /// `subscriber` and `provider` must serve `topic`.
    pub fn from_parts<S, P, A>(
        topic: Topic,
        subscriber: S,
        provider: P,
        applier: A,
    ) -> SyncHandleBuilder<S, P, A>
    where
        S: Subscriber,
        P: Provider,
        A: Applier<P::Data>,
    {
        SyncHandleBuilder {
            topic,
            subscriber,
            provider,
            applier,
            options: Options::default(),
        }
    }

    /// The handle's topic.
    #[must_use]
    pub fn topic(&self) -> &Topic {
        &self.core.gate().topic
    }

    /// Subscribes, then fetches and applies the first snapshot (whatever its
    /// revision). Subscribing first means no change is missed between the
    /// fetch and the subscription.
    ///
    /// Idempotent: concurrent and repeated calls subscribe once and fetch
    /// once. Must run inside a Tokio runtime; the handle spawns its worker
    /// there.
    ///
    /// # Errors
    ///
    /// - `start` phase: the handle was stopped ([`Error::is_stopped`]), or no
    ///   Tokio runtime is running;
    /// - `subscribe`, `getSnapshot` (after the retries), `protocol` or `apply`
    ///   phase: that step failed. Everything is rolled back (unsubscribed,
    ///   status [`Status::Idle`]) and `start` may be called again.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future mid-way may leave the handle
    /// subscribed without a first snapshot; call `start` again or `stop`.
    pub async fn start(&self) -> Result<()> {
        self.core.clone().start().await
    }

    /// [`start`](Self::start), waiting for the source to be there: while
    /// starting fails in the `subscribe` or `getSnapshot` phase (the hub is
    /// not up yet, is restarting, or the topic does not exist yet), it
    /// tries again after a growing, jittered delay (50 ms doubling to 2 s)
    /// until `limit` has passed. Each failed attempt is reported like any
    /// failure.
    ///
    /// ```
    /// use std::time::Duration;
    /// use state_sync::{MemorySource, SyncHandle, Topic};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), state_sync::Error> {
    /// let source = MemorySource::new(Topic::new("settings").unwrap(), 1u32);
    /// let (applier, _seen) = tokio::sync::watch::channel(0u32);
    /// let handle = SyncHandle::builder(source, applier).build();
    /// handle.start_within(Duration::from_secs(30)).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The last failure once `limit` has passed; at once a failure that
    /// waiting cannot cure: the handle was stopped, or the `protocol` or
    /// `apply` phase failed.
    ///
    /// # Cancel safety
    ///
    /// As [`start`](Self::start): dropping it mid-way may leave the handle
    /// subscribed without a first snapshot; call `start` again or `stop`.
    pub async fn start_within(&self, limit: Duration) -> Result<()> {
        // `None`: a limit too far to represent, i.e. none.
        let deadline = Instant::now().checked_add(limit);
        let mut delay = Duration::from_millis(50);
        loop {
            let error = match self.start().await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let curable = !error.is_stopped()
                && matches!(error.phase(), Phase::Subscribe | Phase::GetSnapshot);
            let jittered = delay.mul_f64(0.5 + fastrand::f64() / 2.0);
            let past = deadline.is_some_and(|deadline| Instant::now() + jittered >= deadline);
            if !curable || past {
                return Err(error);
            }
            tokio::time::sleep(jittered).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Unsubscribes and cancels pending work. When it returns, no snapshot
    /// will be applied any more, even one whose fetch was in flight (an
    /// apply already running is awaited). Idempotent. The last applied
    /// revision stays readable.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the handle is stopped once the future is first polled;
    /// only the wait for a running apply is abandoned.
    pub async fn stop(&self) {
        self.core.clone().stop().await;
    }

    /// Fetches and applies once, now (no debounce or throttle). Works
    /// before `start`; a silent no-op after `stop`. Called from inside the
    /// handle's own applier, it queues a refresh and returns at once.
    ///
    /// # Errors
    ///
    /// The `getSnapshot` (after the retries), `protocol` or `apply` error;
    /// it is also reported to the error callback.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled refresh applies nothing after the
    /// cancellation point, except an apply already running.
    pub async fn refresh(&self) -> Result<()> {
        self.core.clone().refresh().await
    }

    /// The last applied revision; [`Revision::ZERO`] before the first apply.
    #[must_use]
    pub fn local_revision(&self) -> Revision {
        self.core.gate().revision()
    }

    /// The current status.
    #[must_use]
    pub fn status(&self) -> Status {
        *self.core.progress().borrow()
    }

    /// A receiver that sees every status change (latest value wins, like
    /// any `watch`). Revisions are read with
    /// [`local_revision`](Self::local_revision) and awaited with
    /// [`wait_for_revision`](Self::wait_for_revision).
    #[must_use]
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.core.progress().subscribe()
    }

    /// Waits until a snapshot at `revision` or newer has been applied.
    ///
    /// # Errors
    ///
    /// [`Stopped`] if the handle stops first.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_for_revision(&self, revision: Revision) -> Result<Revision, Stopped> {
        let gate = self.core.gate();
        if let Some(local) = gate.local()
            && local >= revision
        {
            return Ok(local);
        }
        gate.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaiterGuard(&gate.waiters);
        loop {
            // Register before checking, so an apply in between is not missed.
            let notified = self.core.revision_changed().notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            // Pairs with the fence in `apply`: either it sees our count or
            // we see its revision.
            std::sync::atomic::fence(Ordering::SeqCst);
            if let Some(local) = gate.local()
                && local >= revision
            {
                return Ok(local);
            }
            if gate.closed.load(Ordering::Acquire) {
                return Err(Stopped);
            }
            notified.await;
        }
    }
}

/// Decrements the waiter count when a `wait_for_revision` ends or is
/// cancelled.
struct WaiterGuard<'a>(&'a AtomicUsize);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for SyncHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncHandle")
            .field("topic", self.topic())
            .field("status", &self.status())
            .field("local_revision", &self.local_revision())
            .finish()
    }
}

/// The lock-free part of a handle that every delivered event touches.
struct Gate {
    topic: Topic,
    local: AtomicU64,
    applied: AtomicBool,
    closed: AtomicBool,
    /// `wait_for_revision` calls in progress: an apply wakes waiters only
    /// when there are some (the `Notify` takes a lock).
    waiters: AtomicUsize,
}

impl Gate {
    /// Whether a snapshot or event at `revision` is not newer than what was
    /// applied. Nothing is stale before the first apply.
    fn is_stale(&self, revision: Revision) -> bool {
        self.applied.load(Ordering::Acquire) && revision.get() <= self.local.load(Ordering::Acquire)
    }

    /// The last applied revision, `0` before the first apply.
    fn revision(&self) -> Revision {
        Revision::new(self.local.load(Ordering::Acquire))
    }

    fn local(&self) -> Option<Revision> {
        self.applied
            .load(Ordering::Acquire)
            .then(|| Revision::new(self.local.load(Ordering::Acquire)))
    }

    fn record_applied(&self, revision: Revision) {
        self.local.store(revision.get(), Ordering::Release);
        self.applied.store(true, Ordering::Release);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Lifecycle {
    #[default]
    Idle,
    Starting,
    Started,
    Stopped,
}

/// A refresh waiting for the worker: the newest event, or a forced refresh
/// (reconnect, re-entrant `refresh`) that ignores the gate.
#[derive(Default)]
struct Pending {
    event: Option<InvalidationEvent>,
    forced: bool,
}

impl Pending {
    fn merge(&mut self, event: Option<InvalidationEvent>, forced: bool) {
        self.forced |= forced;
        if let Some(e) = event
            && self.event.as_ref().is_none_or(|p| e.revision >= p.revision)
        {
            self.event = Some(e);
        }
    }
}

#[derive(Default)]
struct State {
    lifecycle: Lifecycle,
    subscription: Option<Subscription>,
    pending: Option<Pending>,
    worker_running: bool,
    debounce_until: Option<Instant>,
    throttle_window_start: Option<Instant>,
}

struct Engine<S, P: Provider, A> {
    gate: Arc<Gate>,
    subscriber: S,
    provider: P,
    applier: A,
    options: Options,
    state: Mutex<State>,
    progress: watch::Sender<Status>,
    /// Wakes `wait_for_revision` callers after each apply and at stop.
    revision_changed: Notify,
    /// One fetch-and-apply at a time; `stop` takes a turn to wait out a
    /// running apply.
    turn: tokio::sync::Mutex<()>,
    /// Concurrent `start` calls wait for the first one.
    start_turn: tokio::sync::Mutex<()>,
    /// Wakes the handle's parked worker task to drain the pending slot.
    wake_worker: Arc<Notify>,
    /// Set once the worker task is spawned (at the first `start`).
    worker_parked: OnceLock<()>,
    metrics: ReplicaMetrics,
}

impl<S, P: Provider, A> Drop for Engine<S, P, A> {
    fn drop(&mut self) {
        // The parked worker holds only a weak reference: let it exit.
        self.wake_worker.notify_one();
    }
}

tokio::task_local! {
    /// The engine whose applier the current task is running, to make
    /// re-entrant `refresh` and `stop` calls safe.
    static APPLYING: usize;
}

enum Throttled {
    FireNow,
    Drop,
    Cancelled,
}

impl<S, P, A> Engine<S, P, A>
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    fn id(&self) -> usize {
        std::ptr::from_ref(self).cast::<()>() as usize
    }

    fn in_own_apply(&self) -> bool {
        APPLYING.try_with(|id| *id == self.id()).unwrap_or(false)
    }

    fn set_status(&self, status: Status) {
        self.progress.send_if_modified(|s| {
            let changed = *s != status && *s != Status::Stopped;
            if changed {
                *s = status;
            }
            changed
        });
    }

    /// What is known of a failure's circumstances; the event is encoded
    /// only here, on the error path.
    fn context(&self, cause: Option<&InvalidationEvent>) -> ErrorContext {
        ErrorContext {
            local_revision: self.gate.local(),
            event_revision: cause.map(|e| e.revision),
            source_id: cause.and_then(|e| e.source_id.clone()),
            raw_event: cause.and_then(|e| serde_json::to_string(e).ok()),
            ..ErrorContext::default()
        }
    }

    fn report(&self, error: &Error) {
        self.metrics.failed(error.phase(), error.will_retry());
        // `Display` already ends with the cause.
        tracing::warn!(
            topic = %error.topic(),
            phase = %error.phase(),
            will_retry = error.will_retry(),
            "{}",
            crate::ErrorChain(error)
        );
        if let Some(callback) = &self.options.on_error
            && std::panic::catch_unwind(AssertUnwindSafe(|| callback(error))).is_err()
        {
            tracing::error!(topic = %self.gate.topic, "state-sync error callback panicked; ignored");
        }
    }

    fn fail(&self, phase: Phase, context: ErrorContext, source: impl Into<BoxError>) -> Error {
        let error = Error::new(phase, self.gate.topic.clone(), context, source);
        self.report(&error);
        error
    }

    /// Resolves once the handle is stopped. Subscribes only when first
    /// polled, so a `biased` select whose other branch is ready at once
    /// costs nothing here.
    async fn cancelled(&self) {
        let mut rx = self.progress.subscribe();
        let _ = rx.wait_for(|s| *s == Status::Stopped).await;
    }

    // ---- invalidations -------------------------------------------------

    fn on_invalidation(self: &Arc<Self>, event: &InvalidationEvent) {
        if let Some(filter) = &self.options.should_refresh {
            match std::panic::catch_unwind(AssertUnwindSafe(|| filter(event))) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::trace!(topic = %self.gate.topic, revision = %event.revision, "refresh vetoed by should_refresh");
                    return;
                }
                Err(_) => {
                    self.fail(
                        Phase::Invalidation,
                        self.context(Some(event)),
                        "should_refresh panicked; refreshing anyway",
                    );
                }
            }
        }
        self.request(Some(event.clone()), false);
    }

    /// Records a wanted refresh and makes sure a worker will run it.
    fn request(self: &Arc<Self>, event: Option<InvalidationEvent>, forced: bool) {
        let spawn = {
            let mut st = self.lock();
            if st.lifecycle == Lifecycle::Stopped {
                return;
            }
            st.pending
                .get_or_insert_with(Pending::default)
                .merge(event, forced);
            if let Some(d) = self.options.debounce {
                st.debounce_until = Some(Instant::now() + d);
            }
            let spawn = st.lifecycle == Lifecycle::Started && !st.worker_running;
            st.worker_running |= spawn;
            spawn
        };
        if spawn {
            self.spawn_worker();
        }
    }

    /// Wakes the parked worker. One task per handle, parked between
    /// refreshes, costs less than a spawn per refresh: no allocation and
    /// no task registration on the hot path.
    fn spawn_worker(self: &Arc<Self>) {
        self.wake_worker.notify_one();
    }

    /// Spawns the worker task on the current runtime, once.
    fn park_worker(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        if self.worker_parked.set(()).is_ok() {
            runtime.spawn(parked_worker(
                Arc::downgrade(self),
                self.wake_worker.clone(),
            ));
        }
    }

    /// Drains the pending slot, one refresh at a time, then exits.
    async fn run_worker(self: Arc<Self>) {
        loop {
            if !self.wait_for_quiet().await {
                return self.worker_exit();
            }
            // Nothing queued behind the last refresh: exit rather than sleep
            // out the throttle window, which would open a new window with
            // no refresh in it and delay the next invalidation's leading
            // edge. Under the lock `request` takes, so no wake-up is lost.
            {
                let mut st = self.lock();
                if st.pending.is_none() {
                    st.worker_running = false;
                    return;
                }
            }
            if let Some(throttle) = self.options.throttle {
                match self.wait_for_throttle(throttle).await {
                    Throttled::FireNow => {}
                    Throttled::Cancelled => return self.worker_exit(),
                    Throttled::Drop => {
                        // Exit under the same lock that empties the slot, so
                        // a later invalidation starts a new worker.
                        let dropped = {
                            let mut st = self.lock();
                            st.worker_running = false;
                            st.pending.take()
                        };
                        // Dropping inside a window is the configured
                        // behaviour; dropping everything is a misconfiguration.
                        let misconfigured = !throttle.leading && !throttle.trailing;
                        if let Some(p) = dropped.filter(|_| misconfigured) {
                            self.fail(
                                Phase::Throttle,
                                self.context(p.event.as_ref()),
                                "invalidation dropped: throttle has both edges disabled",
                            );
                        }
                        return;
                    }
                }
            }
            let pending = {
                let mut st = self.lock();
                match st.pending.take() {
                    Some(p) if st.lifecycle == Lifecycle::Started => p,
                    _ => {
                        st.worker_running = false;
                        return;
                    }
                }
            };
            if !pending.forced
                && let Some(e) = &pending.event
                && self.gate.is_stale(e.revision)
            {
                continue;
            }
            // Errors were reported; the engine keeps running.
            let _ = self
                .refresh_turn(pending.event.as_ref(), pending.forced)
                .await;
        }
    }

    fn worker_exit(&self) {
        self.lock().worker_running = false;
    }

    /// Debounce: sleeps until no invalidation arrived for the configured
    /// delay. Returns `false` when stopped or nothing is pending.
    async fn wait_for_quiet(&self) -> bool {
        if self.options.debounce.is_none() {
            return true;
        }
        loop {
            let deadline = {
                let st = self.lock();
                if st.pending.is_none() || st.lifecycle != Lifecycle::Started {
                    return false;
                }
                st.debounce_until
            };
            match deadline {
                Some(deadline) if deadline > Instant::now() => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = self.cancelled() => return false,
                    }
                }
                _ => return true,
            }
        }
    }

    async fn wait_for_throttle(&self, throttle: Throttle) -> Throttled {
        let now = Instant::now();
        let window = self.lock().throttle_window_start;
        let in_window = window.is_some_and(|start| now < start + throttle.interval);
        let fire_at = match (in_window, throttle.leading, throttle.trailing) {
            (false, true, _) => now,
            (false, false, true) => now + throttle.interval,
            (true, _, true) => window.map_or(now, |start| start + throttle.interval),
            (_, _, false) => return Throttled::Drop,
        };
        if fire_at > now {
            tokio::select! {
                () = tokio::time::sleep_until(fire_at) => {}
                () = self.cancelled() => return Throttled::Cancelled,
            }
        }
        self.lock().throttle_window_start = Some(Instant::now());
        Throttled::FireNow
    }

    // ---- fetch and apply -----------------------------------------------

    /// One fetch (with retries) and, if newer, one apply, in turn with every
    /// other refresh. `cause` is the invalidation that asked for it, if any.
    /// A `resync` (start, reconnect) also adopts a source
    /// found behind the local revision: it restarted without its state.
    async fn refresh_turn(&self, cause: Option<&InvalidationEvent>, resync: bool) -> Result<()> {
        // Uncontended almost always; skip the acquire future then.
        let _turn = match self.turn.try_lock() {
            Ok(turn) => turn,
            Err(_) => self.turn.lock().await,
        };
        if self.gate.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(snapshot) = self.fetch_with_retry(cause, resync).await? else {
            return Ok(());
        };
        let local = self.gate.revision();
        if resync && self.gate.local().is_some() && snapshot.revision < local {
            tracing::warn!(
                topic = %self.gate.topic,
                source = %snapshot.revision,
                %local,
                "source is behind the local revision (restarted without its state?); resyncing to it"
            );
        } else if self.gate.is_stale(snapshot.revision) {
            tracing::debug!(
                topic = %self.gate.topic,
                snapshot = %snapshot.revision,
                local = %self.gate.revision(),
                "snapshot not newer than local state; not applied"
            );
            return Ok(());
        }
        if self.gate.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.apply(snapshot, cause).await
    }

    /// `Ok(None)`: not modified, or stopped while fetching.
    async fn fetch_with_retry(
        &self,
        cause: Option<&InvalidationEvent>,
        resync: bool,
    ) -> Result<Option<SnapshotEnvelope<P::Data>>> {
        let mut request = FetchRequest::new(self.gate.topic.clone());
        request.if_newer_than = self.gate.local();
        let mut backoff = self.options.retry.backoff();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.metrics.fetched();
            let fetch =
                AssertUnwindSafe(async { self.provider.fetch(&request).await }).catch_unwind();
            let fetched = tokio::select! {
                biased;
                r = fetch => r.unwrap_or_else(|panic| {
                    Err(FetchError::unavailable(format!(
                        "provider panicked: {}",
                        panic_message(&*panic)
                    )))
                }),
                () = self.cancelled() => return Ok(None),
            };
            let failure = match fetched {
                Ok(Fetched::Snapshot(snapshot)) => return Ok(Some(snapshot)),
                Ok(Fetched::NotModified { revision }) => {
                    let behind = request.if_newer_than.is_some_and(|local| revision < local);
                    if resync && behind {
                        // Ask again unconditionally; refresh_turn adopts it.
                        request.if_newer_than = None;
                        continue;
                    }
                    tracing::trace!(topic = %self.gate.topic, %revision, "not modified");
                    return Ok(None);
                }
                Err(FetchError::Protocol(error)) => {
                    return Err(self.protocol_failure(error, cause, attempt));
                }
                Err(FetchError::Unavailable(error)) => error,
            };
            let delay = backoff.next_delay();
            let context = ErrorContext {
                attempt: Some(attempt),
                will_retry: delay.is_some(),
                retry_delay: delay,
                ..self.context(cause)
            };
            let error = self.fail(Phase::GetSnapshot, context, failure);
            let Some(delay) = delay else {
                return Err(error);
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancelled() => return Ok(None),
            }
        }
    }

    fn protocol_failure(
        &self,
        error: ProtocolError,
        cause: Option<&InvalidationEvent>,
        attempt: u32,
    ) -> Error {
        let context = ErrorContext {
            raw_snapshot: error.raw().map(str::to_owned),
            attempt: Some(attempt),
            ..self.context(cause)
        };
        self.fail(Phase::Protocol, context, error)
    }

    async fn apply(
        &self,
        snapshot: SnapshotEnvelope<P::Data>,
        cause: Option<&InvalidationEvent>,
    ) -> Result<()> {
        let revision = snapshot.revision;
        let applied = APPLYING
            .scope(
                self.id(),
                // Lazily, so a panic while building the future is caught too.
                AssertUnwindSafe(async { self.applier.apply(snapshot).await }).catch_unwind(),
            )
            .await;
        let failure: BoxError = match applied {
            Ok(Ok(())) => {
                self.gate.record_applied(revision);
                self.metrics.applied();
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.gate.waiters.load(Ordering::SeqCst) > 0 {
                    self.revision_changed.notify_waiters();
                }
                tracing::debug!(topic = %self.gate.topic, %revision, "applied");
                return Ok(());
            }
            Ok(Err(error)) => error,
            Err(panic) => format!("applier panicked: {}", panic_message(&*panic)).into(),
        };
        let context = ErrorContext {
            snapshot_revision: Some(revision),
            ..self.context(cause)
        };
        Err(self.fail(Phase::Apply, context, failure))
    }

    // ---- lifecycle -----------------------------------------------------

    async fn start_inner(self: Arc<Self>) -> Result<()> {
        let _start = self.start_turn.lock().await;
        {
            let mut st = self.lock();
            match st.lifecycle {
                Lifecycle::Started => return Ok(()),
                Lifecycle::Stopped => {
                    drop(st);
                    return Err(self.fail(Phase::Start, self.context(None), Stopped));
                }
                Lifecycle::Idle | Lifecycle::Starting => st.lifecycle = Lifecycle::Starting,
            }
        }
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt,
            Err(e) => {
                self.lock().lifecycle = Lifecycle::Idle;
                return Err(self.fail(Phase::Start, self.context(None), e));
            }
        };
        self.park_worker(&runtime);
        self.set_status(Status::Connecting);

        let sink = InvalidationSink::new(Arc::new(EngineSink {
            gate: self.gate.clone(),
            engine: Arc::downgrade(&self),
        }));
        let subscription = match self.subscriber.subscribe(&self.gate.topic, sink).await {
            Ok(s) => s,
            Err(e) => {
                self.roll_back(None);
                return Err(self.fail(Phase::Subscribe, self.context(None), e));
            }
        };
        {
            let mut st = self.lock();
            if st.lifecycle == Lifecycle::Stopped {
                drop(st);
                drop(subscription);
                return Err(self.fail(Phase::Start, self.context(None), Stopped));
            }
            st.subscription = Some(subscription);
        }
        if let Err(e) = self.refresh_turn(None, true).await {
            let subscription = self.lock().subscription.take();
            self.roll_back(subscription);
            return Err(e);
        }
        let spawn = {
            let mut st = self.lock();
            if st.lifecycle == Lifecycle::Stopped {
                drop(st);
                return Err(self.fail(Phase::Start, self.context(None), Stopped));
            }
            st.lifecycle = Lifecycle::Started;
            let spawn = st.pending.is_some() && !st.worker_running;
            st.worker_running |= spawn;
            spawn
        };
        self.set_status(Status::Live);
        if spawn {
            self.spawn_worker();
        }
        tracing::debug!(topic = %self.gate.topic, revision = %self.gate.revision(), "started");
        Ok(())
    }

    fn roll_back(&self, subscription: Option<Subscription>) {
        {
            let mut st = self.lock();
            if st.lifecycle != Lifecycle::Stopped {
                st.lifecycle = Lifecycle::Idle;
            }
            st.pending = None;
        }
        drop(subscription);
        self.set_status(Status::Idle);
    }

    async fn stop_inner(self: Arc<Self>) {
        let subscription = {
            let mut st = self.lock();
            st.lifecycle = Lifecycle::Stopped;
            st.pending = None;
            st.subscription.take()
        };
        self.gate.closed.store(true, Ordering::Release);
        drop(subscription);
        self.wake_worker.notify_one();
        self.progress.send_if_modified(|s| {
            let changed = *s != Status::Stopped;
            *s = Status::Stopped;
            changed
        });
        self.revision_changed.notify_waiters();
        if !self.in_own_apply() {
            // Fetches and retry sleeps end at the stop signal; a running
            // apply finishes before we get the turn.
            drop(self.turn.lock().await);
        }
    }

    async fn refresh_inner(self: Arc<Self>) -> Result<()> {
        if self.lock().lifecycle == Lifecycle::Stopped {
            return Ok(());
        }
        if self.in_own_apply() {
            self.request(None, true);
            return Ok(());
        }
        self.refresh_turn(None, false).await
    }
}

impl<S, P, A> Core for Engine<S, P, A>
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    fn gate(&self) -> &Gate {
        &self.gate
    }

    fn progress(&self) -> &watch::Sender<Status> {
        &self.progress
    }

    fn revision_changed(&self) -> &Notify {
        &self.revision_changed
    }

    fn start(self: Arc<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(self.start_inner())
    }

    fn stop(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(self.stop_inner())
    }

    fn refresh(self: Arc<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(self.refresh_inner())
    }
}

/// What a subscriber's [`InvalidationSink`] talks to. Holds the engine
/// weakly so a forgotten subscription does not keep a dropped handle alive.
/// A handle's worker: parked until woken, then drains the pending slot.
/// Holds the engine weakly so dropping every handle still drops it.
async fn parked_worker<S, P, A>(engine: Weak<Engine<S, P, A>>, wake: Arc<Notify>)
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    loop {
        wake.notified().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        if engine.lock().lifecycle == Lifecycle::Stopped {
            engine.worker_exit();
            return;
        }
        // Boxed so the parked task stays small between refreshes.
        Box::pin(engine.run_worker()).await;
    }
}

struct EngineSink<S, P: Provider, A> {
    gate: Arc<Gate>,
    engine: Weak<Engine<S, P, A>>,
}

impl<S, P: Provider, A> EngineSink<S, P, A> {
    /// The engine, unless it is stopped or dropped.
    fn live_engine(&self) -> Option<Arc<Engine<S, P, A>>> {
        if self.gate.closed.load(Ordering::Relaxed) {
            return None;
        }
        self.engine.upgrade()
    }
}

impl<S, P, A> SinkTarget for EngineSink<S, P, A>
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    fn topic(&self) -> &Topic {
        &self.gate.topic
    }

    fn deliver(&self, event: &InvalidationEvent) {
        if !event.topic.matches(&self.gate.topic)
            || self.gate.closed.load(Ordering::Relaxed)
            || self.gate.is_stale(event.revision)
        {
            return;
        }
        if let Some(engine) = self.engine.upgrade() {
            engine.on_invalidation(event);
        }
    }

    fn protocol_error(&self, error: ProtocolError) {
        if let Some(engine) = self.live_engine() {
            let context = ErrorContext {
                raw_event: error.raw().map(str::to_owned),
                ..engine.context(None)
            };
            engine.fail(Phase::Protocol, context, error);
        }
    }

    fn transport_error(&self, error: BoxError) {
        if let Some(engine) = self.live_engine() {
            engine.fail(Phase::Invalidation, engine.context(None), error);
        }
    }

    fn connection_lost(&self, error: BoxError) {
        if let Some(engine) = self.live_engine() {
            engine.set_status(Status::Interrupted);
            let context = ErrorContext {
                will_retry: true,
                ..engine.context(None)
            };
            engine.fail(Phase::Subscribe, context, error);
        }
    }

    fn connection_restored(&self) {
        if let Some(engine) = self.live_engine() {
            if engine.lock().lifecycle == Lifecycle::Started {
                engine.set_status(Status::Live);
            }
            engine.request(None, true);
        }
    }

    fn is_closed(&self) -> bool {
        self.gate.closed.load(Ordering::Relaxed) || self.engine.strong_count() == 0
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
