//! A simulated, lossy transport between a source and many replicas, driven
//! by a seed so a failing run can be replayed (feature `testkit`).
//!
//! [`SimulatedBus`] wraps any [`Subscriber`] and [`Provider`] and injects the
//! faults real transports have: dropped, duplicated, delayed and therefore
//! reordered invalidations, failed and slow fetches. Use it with Tokio's
//! paused clock (`#[tokio::test(start_paused = true)]`) on a current-thread
//! runtime: delays then cost no real time and a seed reproduces a run.
//!
//! [`Recorder`] is an applier that remembers every applied revision, to
//! assert on ordering.
//!
//! # Examples
//!
//! ```
//! use state_sync::testkit::{Faults, Recorder, SimulatedBus};
//! use state_sync::{MemorySource, SyncHandle, Topic};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = MemorySource::new(Topic::new("t")?, 0u32);
//! let bus = SimulatedBus::new(7, Faults::lossy());
//! let recorder = Recorder::new();
//! let handle = SyncHandle::from_parts(
//!     source.topic().clone(),
//!     bus.subscriber(source.clone()),
//!     bus.provider(source.clone()),
//!     recorder.clone(),
//! )
//! .build();
//! handle.start().await?;
//! for i in 1..=100 {
//!     source.publish(i);
//! }
//! bus.set_faults(Faults::none());
//! let last = source.publish(101);
//! handle.wait_for_revision(last).await?;
//! assert!(recorder.is_strictly_increasing());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock;
use std::time::Duration;

use crate::applier::Applier;
use crate::error::BoxError;
use crate::protocol::{InvalidationEvent, ProtocolError, SnapshotEnvelope};
use crate::provider::{FetchError, FetchRequest, Fetched, Provider};
use crate::revision::Revision;
use crate::subscriber::{InvalidationSink, SinkTarget, Subscriber, Subscription};
use crate::topic::Topic;

/// Fault rates and delays. Probabilities are in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Faults {
    /// Probability that an invalidation is dropped.
    pub drop: f64,
    /// Probability that a delivered invalidation is delivered twice.
    pub duplicate: f64,
    /// Each delivery waits a uniform random delay up to this; different
    /// delays reorder events.
    pub max_event_delay: Duration,
    /// Probability that a fetch fails.
    pub fetch_failure: f64,
    /// Each fetch waits a uniform random delay up to this.
    pub max_fetch_delay: Duration,
}

impl Faults {
    /// A perfect transport.
    #[must_use]
    pub fn none() -> Self {
        Faults {
            drop: 0.0,
            duplicate: 0.0,
            max_event_delay: Duration::ZERO,
            fetch_failure: 0.0,
            max_fetch_delay: Duration::ZERO,
        }
    }

    /// 20 % drops, 20 % duplicates, delays up to 50 ms (reordering), 10 %
    /// failed fetches, fetch delays up to 20 ms.
    #[must_use]
    pub fn lossy() -> Self {
        Faults {
            drop: 0.2,
            duplicate: 0.2,
            max_event_delay: Duration::from_millis(50),
            fetch_failure: 0.1,
            max_fetch_delay: Duration::from_millis(20),
        }
    }

    /// Sets the drop probability.
    #[must_use]
    pub fn drop_rate(mut self, p: f64) -> Self {
        self.drop = p;
        self
    }

    /// Sets the duplicate probability.
    #[must_use]
    pub fn duplicate_rate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Sets the maximum event delay.
    #[must_use]
    pub fn event_delay(mut self, max: Duration) -> Self {
        self.max_event_delay = max;
        self
    }

    /// Sets the fetch failure probability.
    #[must_use]
    pub fn fetch_failure_rate(mut self, p: f64) -> Self {
        self.fetch_failure = p;
        self
    }

    /// Sets the maximum fetch delay.
    #[must_use]
    pub fn fetch_delay(mut self, max: Duration) -> Self {
        self.max_fetch_delay = max;
        self
    }
}

/// What the bus did, for assertions and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// Invalidations handed to a replica (duplicates included).
    pub delivered: u64,
    /// Invalidations dropped.
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Fetches attempted.
    pub fetches: u64,
    /// Fetches failed on purpose.
    pub failed_fetches: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    fetches: AtomicU64,
    failed_fetches: AtomicU64,
}

struct BusInner {
    faults: Mutex<Faults>,
    rng: Mutex<fastrand::Rng>,
    counters: Counters,
}

/// A seeded, lossy transport; see the [module docs](self).
#[derive(Clone)]
pub struct SimulatedBus {
    inner: Arc<BusInner>,
}

impl SimulatedBus {
    /// A bus whose random choices all come from `seed`.
    #[must_use]
    pub fn new(seed: u64, faults: Faults) -> Self {
        SimulatedBus {
            inner: Arc::new(BusInner {
                faults: Mutex::new(faults),
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
                counters: Counters::default(),
            }),
        }
    }

    /// Changes the faults from now on (e.g. [`Faults::none`] to deliver a
    /// final write cleanly).
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.inner.faults) = faults;
    }

    /// What the bus did so far.
    #[must_use]
    pub fn stats(&self) -> BusStats {
        let c = &self.inner.counters;
        BusStats {
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            duplicated: c.duplicated.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            failed_fetches: c.failed_fetches.load(Ordering::Relaxed),
        }
    }

    /// Wraps a subscriber so its events cross the bus.
    #[must_use]
    pub fn subscriber<S: Subscriber>(&self, inner: S) -> LossySubscriber<S> {
        LossySubscriber {
            inner,
            bus: self.clone(),
        }
    }

    /// Wraps a provider so its fetches cross the bus.
    #[must_use]
    pub fn provider<P: Provider>(&self, inner: P) -> LossyProvider<P> {
        LossyProvider {
            inner,
            bus: self.clone(),
        }
    }

    /// Starts a replica of `topic` behind this bus: `source`'s events and
    /// fetches cross the bus, a [`Recorder`] is its applier, and failed
    /// fetches are retried patiently (10 attempts from 5 ms), as a lossy
    /// transport needs.
    ///
    /// # Errors
    ///
    /// As [`SyncHandle::start`](crate::SyncHandle::start).
    ///
    /// # Cancel safety
    ///
    /// As for [`SyncHandle::start`](crate::SyncHandle::start).
    pub async fn start_replica<S>(
        &self,
        topic: &Topic,
        source: S,
    ) -> crate::Result<(crate::SyncHandle, Recorder<S::Data>)>
    where
        S: Subscriber + Provider + Clone,
        S::Data: Clone + Send + Sync,
    {
        let recorder = Recorder::with_data();
        let handle = crate::SyncHandle::from_parts(
            topic.clone(),
            self.subscriber(source.clone()),
            self.provider(source),
            recorder.clone(),
        )
        .retry(
            crate::RetryPolicy::default()
                .max_attempts(10)
                .initial_delay(Duration::from_millis(5)),
        )
        .build();
        handle.start().await?;
        Ok((handle, recorder))
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && lock(&self.inner.rng).f64() < p
    }

    fn delay(&self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        max.mul_f64(lock(&self.inner.rng).f64())
    }

    fn faults(&self) -> Faults {
        *lock(&self.inner.faults)
    }
}

impl fmt::Debug for SimulatedBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedBus")
            .field("faults", &self.faults())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A [`Subscriber`] whose events cross a [`SimulatedBus`].
#[derive(Debug, Clone)]
pub struct LossySubscriber<S> {
    inner: S,
    bus: SimulatedBus,
}

impl<S: Subscriber> Subscriber for LossySubscriber<S> {
    async fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> Result<Subscription, BoxError> {
        let relay = InvalidationSink::new(Arc::new(Relay {
            downstream: sink,
            bus: self.bus.clone(),
        }));
        self.inner.subscribe(topic, relay).await
    }
}

/// Sits between the real subscriber and the replica's sink.
struct Relay {
    downstream: InvalidationSink,
    bus: SimulatedBus,
}

impl Relay {
    fn send(&self, event: &InvalidationEvent, delay: Duration) {
        self.bus
            .inner
            .counters
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(rt) if !delay.is_zero() => {
                let sink = self.downstream.clone();
                let event = event.clone();
                rt.spawn(async move {
                    tokio::time::sleep(delay).await;
                    sink.deliver(&event);
                });
            }
            _ => self.downstream.deliver(event),
        }
    }
}

impl SinkTarget for Relay {
    fn topic(&self) -> &Topic {
        self.downstream.topic()
    }

    fn deliver(&self, event: &InvalidationEvent) {
        let faults = self.bus.faults();
        if self.bus.chance(faults.drop) {
            self.bus
                .inner
                .counters
                .dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.send(event, self.bus.delay(faults.max_event_delay));
        if self.bus.chance(faults.duplicate) {
            self.bus
                .inner
                .counters
                .duplicated
                .fetch_add(1, Ordering::Relaxed);
            self.send(event, self.bus.delay(faults.max_event_delay));
        }
    }

    fn protocol_error(&self, error: ProtocolError) {
        self.downstream.protocol_error(error);
    }

    fn transport_error(&self, error: BoxError) {
        self.downstream.report_error(error);
    }

    fn connection_lost(&self, error: BoxError) {
        self.downstream.connection_lost(error);
    }

    fn connection_restored(&self) {
        self.downstream.connection_restored();
    }

    fn is_closed(&self) -> bool {
        self.downstream.is_closed()
    }
}

/// A [`Provider`] whose fetches cross a [`SimulatedBus`].
#[derive(Debug, Clone)]
pub struct LossyProvider<P> {
    inner: P,
    bus: SimulatedBus,
}

/// The failure a [`LossyProvider`] injects.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("simulated fetch failure")]
pub struct SimulatedFailure;

impl<P: Provider> Provider for LossyProvider<P> {
    type Data = P::Data;

    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<P::Data>, FetchError>> + Send {
        let faults = self.bus.faults();
        let counters = &self.bus.inner.counters;
        counters.fetches.fetch_add(1, Ordering::Relaxed);
        let fail = self.bus.chance(faults.fetch_failure);
        if fail {
            counters.failed_fetches.fetch_add(1, Ordering::Relaxed);
        }
        let delay = self.bus.delay(faults.max_fetch_delay);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if fail {
                return Err(FetchError::unavailable(SimulatedFailure));
            }
            self.inner.fetch(request).await
        }
    }
}

type Applied<T> = Vec<(Revision, Option<T>)>;

/// An applier that records every applied revision (and the data), shared by
/// its clones.
pub struct Recorder<T = ()> {
    applied: Arc<Mutex<Applied<T>>>,
    keep_data: bool,
}

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Recorder {
            applied: self.applied.clone(),
            keep_data: self.keep_data,
        }
    }
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Recorder {
            applied: Arc::default(),
            keep_data: false,
        }
    }
}

impl<T> Recorder<T> {
    /// Records revisions only.
    #[must_use]
    pub fn new() -> Self {
        Recorder::default()
    }

    /// Records revisions and data.
    #[must_use]
    pub fn with_data() -> Self {
        Recorder {
            applied: Arc::default(),
            keep_data: true,
        }
    }

    /// The applied revisions, in order.
    #[must_use]
    pub fn revisions(&self) -> Vec<Revision> {
        lock(&self.applied).iter().map(|(r, _)| *r).collect()
    }

    /// Whether each applied revision is larger than the one before.
    #[must_use]
    pub fn is_strictly_increasing(&self) -> bool {
        self.revisions().windows(2).all(|w| w[0] < w[1])
    }

    /// Number of applies.
    #[must_use]
    pub fn len(&self) -> usize {
        lock(&self.applied).len()
    }

    /// Whether nothing was applied.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Clone> Recorder<T> {
    /// The last applied data, when recording data.
    #[must_use]
    pub fn last_data(&self) -> Option<T> {
        lock(&self.applied).last().and_then(|(_, d)| d.clone())
    }
}

impl<T: Send + 'static> Applier<T> for Recorder<T> {
    fn apply(
        &self,
        snapshot: SnapshotEnvelope<T>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let data = self.keep_data.then_some(snapshot.data);
        lock(&self.applied).push((snapshot.revision, data));
        std::future::ready(Ok(()))
    }
}

impl<T> fmt::Debug for Recorder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("applied", &lock(&self.applied).len())
            .finish()
    }
}

/// How long [`WithinLimit::within_limit`] waits: long enough for any test
/// of this workspace on a loaded 2-core machine, short enough that a
/// regression fails the run instead of hanging it.
pub const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Bounds a test's wait, so a regression fails instead of hanging.
///
/// On a paused clock the limit is virtual time: a wait that can never
/// finish fails at once, when the runtime has nothing else to do.
///
/// # Examples
///
/// ```
/// use state_sync::testkit::WithinLimit;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// assert_eq!(async { 7 }.within_limit().await, 7);
/// # }
/// ```
pub trait WithinLimit: Future + Sized {
    /// Awaits `self` for at most [`WAIT_LIMIT`].
    ///
    /// # Panics
    ///
    /// When the limit passes first, naming the caller's location.
    ///
    /// # Cancel safety
    ///
    /// As cancel-safe as `self`.
    #[track_caller]
    fn within_limit(self) -> impl Future<Output = Self::Output> {
        let caller = std::panic::Location::caller();
        async move {
            match tokio::time::timeout(WAIT_LIMIT, self).await {
                Ok(output) => output,
                Err(_) => panic!("waited more than {WAIT_LIMIT:?} at {caller}"),
            }
        }
    }
}

impl<F: Future> WithinLimit for F {}
