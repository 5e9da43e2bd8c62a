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
//! - **Refreshes without a future.** While the provider answers and the
//!   applier applies at once ([`Provider::fetch_now`],
//!   [`Applier::apply_now`]: a source in memory, a snapshot that came
//!   with its invalidation, a closure), the worker refreshes without
//!   building a future; anything that waits goes on in one. It yields to
//!   the runtime every 64 refreshes, so a handle that never catches up
//!   does not hold a thread. With
//!   [`refresh_on_delivery`](SyncHandleBuilder::refresh_on_delivery) such
//!   a refresh runs on the thread that delivers the event, and no task is
//!   woken at all.
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

mod builder;
mod gate;
mod handle;
mod refresh_now;
mod worker;

use builder::*;
pub use builder::{SyncHandleBuilder, Throttle};
use gate::*;
use handle::*;
pub use handle::{Status, SyncHandle};
use refresh_now::*;
use worker::*;

use crate::applier::{AppliedNow, Applier};
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
    event: Option<PendingEvent>,
    forced: bool,
}

/// An event in the pending slot, without its topic (the handle's own):
/// 40 bytes instead of 72, so the slot shares the gate's cache lines.
struct PendingEvent {
    revision: Revision,
    timestamp_ms: Option<u64>,
    source_id: Option<Box<str>>,
}

impl Pending {
    fn merge(&mut self, event: Option<&InvalidationEvent>, forced: bool) {
        self.forced |= forced;
        if let Some(e) = event
            && self.takes(e.revision)
        {
            self.event = Some(PendingEvent {
                revision: e.revision,
                timestamp_ms: e.timestamp_ms,
                source_id: e.source_id.as_deref().map(Box::from),
            });
        }
    }

    /// Takes `other` back into the slot: the newer event, and forced if
    /// either was.
    fn absorb(&mut self, other: Pending) {
        self.forced |= other.forced;
        if let Some(e) = other.event
            && self.takes(e.revision)
        {
            self.event = Some(e);
        }
    }

    /// Whether an event at `revision` replaces the one held: the newest
    /// stays.
    fn takes(&self, revision: Revision) -> bool {
        self.event.as_ref().is_none_or(|p| revision >= p.revision)
    }

    /// The event that asked for this refresh, if any, left in place (for
    /// an error's context).
    fn event(&self, topic: &Topic) -> Option<InvalidationEvent> {
        self.event.as_ref().map(|e| InvalidationEvent {
            topic: topic.clone(),
            revision: e.revision,
            source_id: e.source_id.as_deref().map(String::from),
            timestamp_ms: e.timestamp_ms,
        })
    }

    /// The event that asked for this refresh, if any.
    fn cause(&mut self, topic: &Topic) -> Option<InvalidationEvent> {
        self.event.take().map(|e| InvalidationEvent {
            topic: topic.clone(),
            revision: e.revision,
            source_id: e.source_id.map(String::from),
            timestamp_ms: e.timestamp_ms,
        })
    }
}

/// What every event and refresh reads comes first (see [`Gate`]).
#[derive(Default)]
#[repr(C)]
struct State {
    lifecycle: Lifecycle,
    worker_running: bool,
    pending: Option<Pending>,
    debounce_until: Option<Instant>,
    throttle_window_start: Option<Instant>,
    subscription: Option<Subscription>,
}

/// In declaration order, what every refresh touches first (see [`Gate`]).
#[repr(C)]
struct Engine<S, P: Provider, A> {
    gate: Arc<Gate>,
    provider: P,
    applier: A,
    /// One fetch-and-apply at a time; `stop` takes a turn to wait out a
    /// running apply.
    turn: futures::lock::Mutex<()>,
    options: Options,
    metrics: ReplicaMetrics,
    subscriber: S,
    progress: watch::Sender<Status>,
    /// Wakes `wait_for_revision` callers after each apply and at stop.
    revision_changed: Notify,
    /// Concurrent `start` calls wait for the first one.
    start_turn: tokio::sync::Mutex<()>,
    /// Set once the worker task is spawned (at the first `start`).
    worker_parked: OnceLock<()>,
}

impl<S, P: Provider, A> Drop for Engine<S, P, A> {
    fn drop(&mut self) {
        // Nothing is delivered to a dropped engine; the parked worker holds
        // only a weak reference: let it exit.
        self.gate.closed.store(true, Ordering::Release);
        // The state outlives the engine (the subscriber's sink holds it):
        // end the subscription now, outside the lock.
        let subscription = {
            let mut st = self.gate.lock();
            st.pending = None;
            st.subscription.take()
        };
        drop(subscription);
        self.gate.wake_worker.wake();
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
        self.gate.lock()
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

    /// Spawns the worker task on the current runtime, once.
    fn park_worker(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        if self.worker_parked.set(()).is_ok() {
            runtime.spawn(parked_worker(Arc::downgrade(self), self.gate.clone()));
        }
    }

    /// Finishes what [`refresh_now`](Self::refresh_now) left, then drains
    /// the pending slot, one refresh at a time, and exits.
    async fn run_worker(self: Arc<Self>, unfinished: Option<Unfinished<P::Data>>) {
        match unfinished {
            Some(Unfinished::Refresh(pending)) => self.refresh_pending(pending).await,
            Some(Unfinished::Apply(snapshot, pending)) => {
                self.apply_fetched(snapshot, pending).await;
            }
            None => {}
        }
        loop {
            if !self.wait_for_quiet().await {
                return self.worker_exit();
            }
            // Nothing queued behind the last refresh: exit rather than sleep
            // out the throttle window, which would open a new window with
            // no refresh in it and delay the next invalidation's leading
            // edge. Under the lock `request` takes, so no wake-up is lost.
            let Some(throttle) = self.options.throttle else {
                // No throttle: take the pending refresh, or exit, under one
                // lock.
                let Some(pending) = self.take_pending() else {
                    return;
                };
                self.refresh_pending(pending).await;
                continue;
            };
            {
                let mut st = self.lock();
                if st.pending.is_none() {
                    st.worker_running = false;
                    return;
                }
            }
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
                    if let Some(mut p) = dropped.filter(|_| misconfigured) {
                        self.fail(
                            Phase::Throttle,
                            self.context(p.cause(&self.gate.topic).as_ref()),
                            "invalidation dropped: throttle has both edges disabled",
                        );
                    }
                    return;
                }
            }
            let Some(pending) = self.take_pending() else {
                return;
            };
            self.refresh_pending(pending).await;
        }
    }

    /// Takes the pending refresh; with none (or once stopped), marks the
    /// worker done under the same lock, so a later request starts it again.
    fn take_pending(&self) -> Option<Pending> {
        let mut st = self.lock();
        match st.pending.take() {
            Some(p) if st.lifecycle == Lifecycle::Started => Some(p),
            _ => {
                st.worker_running = false;
                None
            }
        }
    }

    /// Runs a pending refresh, unless its event went stale meanwhile.
    async fn refresh_pending(&self, mut pending: Pending) {
        if !pending.forced
            && let Some(e) = &pending.event
            && self.gate.is_stale(e.revision)
        {
            return;
        }
        let cause = pending.cause(&self.gate.topic);
        // Errors were reported; the engine keeps running.
        let _ = self.refresh_turn(cause.as_ref(), pending.forced).await;
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
            Some(turn) => turn,
            None => self.turn.lock().await,
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
        // Made at the first failure: most fetches never retry.
        let mut backoff = None;
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
            let delay = backoff
                .get_or_insert_with(|| self.options.retry.backoff())
                .next_delay();
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
        match applied {
            Ok(Ok(())) => {
                self.applied(revision);
                Ok(())
            }
            Ok(Err(error)) => Err(self.apply_failed(revision, error, cause)),
            Err(panic) => Err(self.apply_failed(revision, applier_panicked(&*panic), cause)),
        }
    }

    /// Records an applied revision and wakes whoever waits for it.
    fn applied(&self, revision: Revision) {
        self.gate.record_applied(revision);
        self.metrics.applied();
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.gate.waiters.load(Ordering::SeqCst) > 0 {
            self.revision_changed.notify_waiters();
        }
        tracing::debug!(topic = %self.gate.topic, %revision, "applied");
    }

    fn apply_failed(
        &self,
        revision: Revision,
        failure: BoxError,
        cause: Option<&InvalidationEvent>,
    ) -> Error {
        let context = ErrorContext {
            snapshot_revision: Some(revision),
            ..self.context(cause)
        };
        self.fail(Phase::Apply, context, failure)
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

        let sink = InvalidationSink::new(self.gate.clone());
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
            self.gate.wake_worker.wake();
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
        self.gate.wake_worker.wake();
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
            self.gate.request(None, true);
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
