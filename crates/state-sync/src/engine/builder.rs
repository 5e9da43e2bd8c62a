//! [`SyncHandleBuilder`]: a handle's options (retry, throttle, debounce,
//! filter, error callback, initial revision) and [`Throttle`].

use super::*;

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
    pub(super) interval: Duration,
    pub(super) leading: bool,
    pub(super) trailing: bool,
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

/// The pacing a refresh reads first (see `Engine`).
#[derive(Clone, Default)]
#[repr(C)]
pub(super) struct Options {
    pub(super) debounce: Option<Duration>,
    pub(super) throttle: Option<Throttle>,
    pub(super) retry: RetryPolicy,
    pub(super) should_refresh: Option<ShouldRefresh>,
    pub(super) on_error: Option<OnError>,
    pub(super) initial_revision: Option<Revision>,
}

/// Builds a [`SyncHandle`]; from [`SyncHandle::builder`] or
/// [`SyncHandle::from_parts`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct SyncHandleBuilder<S, P, A> {
    pub(super) topic: Topic,
    pub(super) subscriber: S,
    pub(super) provider: P,
    pub(super) applier: A,
    pub(super) options: Options,
    /// Kept in the gate only, in its padding: not in `Options`, which
    /// every engine holds.
    pub(super) refresh_on_delivery: bool,
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

    /// Refreshes on the thread that delivers an invalidation (the
    /// subscriber's: a connection's reader, [`MemorySource::publish`]),
    /// without waking the handle's worker task, while the provider answers
    /// and the applier applies at once ([`Provider::fetch_now`],
    /// [`Applier::apply_now`]); anything else still goes to the worker.
    /// One task wake less per event, for an applier quick enough to run
    /// inside the delivery: it holds up the subscriber meanwhile (other
    /// handles of a `MemorySource`, other topics of a connection). Off by
    /// default; ignored with [`debounce`](Self::debounce) or
    /// [`throttle`](Self::throttle).
    ///
    /// [`MemorySource::publish`]: crate::MemorySource::publish
    pub fn refresh_on_delivery(mut self, on: bool) -> Self {
        self.refresh_on_delivery = on;
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
            wake_worker: WorkerWake::default(),
            engine: OnceLock::new(),
            state: Mutex::new(State::default()),
            debounce: self.options.debounce,
            refresh_on_delivery: self.refresh_on_delivery,
            should_refresh: self.options.should_refresh.clone(),
        });
        let engine = Engine {
            metrics: ReplicaMetrics::new(&gate.topic),
            gate,
            subscriber: self.subscriber,
            provider: self.provider,
            applier: self.applier,
            options: self.options,
            progress,
            revision_changed: Notify::new(),
            turn: futures::lock::Mutex::new(()),
            start_turn: tokio::sync::Mutex::new(()),
            worker_parked: OnceLock::new(),
        };
        let engine = Arc::new(engine);
        let events: Weak<dyn EngineEvents> = Arc::downgrade(&engine) as Weak<_>;
        let _ = engine.gate.engine.set(events);
        SyncHandle { core: engine }
    }
}

impl<S, P, A> fmt::Debug for SyncHandleBuilder<S, P, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncHandleBuilder")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}
