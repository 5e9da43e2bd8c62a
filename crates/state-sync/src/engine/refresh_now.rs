//! Refreshes without a future: while the provider answers and the applier
//! applies at once, the worker runs each refresh as a plain call. A
//! refresh through the worker's future allocates it, copies it and steps
//! through its state machine, about half of what a refresh costs when the
//! fetch and the apply themselves cost nothing.

use super::*;

/// How far [`Engine::refresh_now`] got.
pub(super) enum RefreshNow<T> {
    /// The slot is empty, and the worker marked done under its lock.
    Drained,
    /// [`REFRESHES_PER_POLL`] refreshes ran: the worker yields to the
    /// runtime before it goes on (the slot may hold more).
    Yield,
    /// The rest needs the worker's future, starting with this, if any.
    Waits(Option<Unfinished<T>>),
}

/// Refreshes run in one poll of the worker at most: a source that
/// publishes as fast as the handle applies (or an applier that publishes
/// to its own source) must not hold a runtime thread forever.
pub(super) const REFRESHES_PER_POLL: usize = 64;

/// A refresh taken from the slot that must go on in the worker's future.
pub(super) enum Unfinished<T> {
    /// Not fetched yet: the provider waits, or the turn is taken.
    Refresh(Pending),
    /// Fetched; the applier waits.
    Apply(SnapshotEnvelope<T>, Pending),
}

impl<S, P, A> Engine<S, P, A>
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    /// Drains the pending slot with plain calls for as long as the
    /// provider and the applier answer at once. Debounce, throttle, forced
    /// refreshes (they resync), a turn held elsewhere, and a provider or
    /// an applier that waits are left to the worker's future.
    pub(super) fn refresh_now(&self) -> RefreshNow<P::Data> {
        if self.gate.debounce.is_some() || self.options.throttle.is_some() {
            return RefreshNow::Waits(None);
        }
        for _ in 0..REFRESHES_PER_POLL {
            let mut pending = {
                let mut st = self.lock();
                let Some(pending) = &st.pending else {
                    st.worker_running = false;
                    return RefreshNow::Drained;
                };
                if pending.forced || st.lifecycle != Lifecycle::Started {
                    return RefreshNow::Waits(None);
                }
                st.pending.take().unwrap_or_default()
            };
            if let Some(event) = &pending.event
                && self.gate.is_stale(event.revision)
            {
                continue;
            }
            let Some(_turn) = self.turn.try_lock() else {
                return RefreshNow::Waits(Some(Unfinished::Refresh(pending)));
            };
            if self.gate.closed.load(Ordering::Acquire) {
                return RefreshNow::Waits(None);
            }
            let request = FetchRequest {
                topic: self.gate.topic.clone(),
                if_newer_than: self.gate.local(),
            };
            let answer =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.provider.fetch_now(&request)));
            let fetched = match answer {
                Ok(Some(fetched)) => fetched,
                Ok(None) => return RefreshNow::Waits(Some(Unfinished::Refresh(pending))),
                Err(panic) => {
                    let context = ErrorContext {
                        will_retry: true,
                        ..self.context(pending.event(&self.gate.topic).as_ref())
                    };
                    let message = format!(
                        "provider panicked in fetch_now: {}; fetching instead",
                        panic_message(&*panic)
                    );
                    self.fail(Phase::GetSnapshot, context, message);
                    return RefreshNow::Waits(Some(Unfinished::Refresh(pending)));
                }
            };
            self.metrics.fetched();
            let snapshot = match fetched {
                Fetched::Snapshot(snapshot) => snapshot,
                Fetched::NotModified { revision } => {
                    tracing::trace!(topic = %self.gate.topic, %revision, "not modified");
                    continue;
                }
            };
            if self.gate.is_stale(snapshot.revision) {
                tracing::debug!(
                    topic = %self.gate.topic,
                    snapshot = %snapshot.revision,
                    local = %self.gate.revision(),
                    "snapshot not newer than local state; not applied"
                );
                continue;
            }
            let revision = snapshot.revision;
            let id = self.id();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                APPLYING.sync_scope(id, || self.applier.apply_now(snapshot))
            }));
            let failure = match outcome {
                Ok(AppliedNow::Done(Ok(()))) => {
                    self.applied(revision);
                    continue;
                }
                Ok(AppliedNow::Done(Err(error))) => error,
                Ok(AppliedNow::Later(snapshot)) => {
                    return RefreshNow::Waits(Some(Unfinished::Apply(snapshot, pending)));
                }
                Err(panic) => applier_panicked(&*panic),
            };
            let cause = pending.cause(&self.gate.topic);
            self.apply_failed(revision, failure, cause.as_ref());
        }
        RefreshNow::Yield
    }

    /// Applies a snapshot fetched at once, for an applier that waits: in
    /// turn, and only if it is still newer and the handle not stopped.
    pub(super) async fn apply_fetched(
        &self,
        snapshot: SnapshotEnvelope<P::Data>,
        mut pending: Pending,
    ) {
        let cause = pending.cause(&self.gate.topic);
        let _turn = self.turn.lock().await;
        if self.gate.closed.load(Ordering::Acquire) || self.gate.is_stale(snapshot.revision) {
            return;
        }
        // Errors were reported; the engine keeps running.
        let _ = self.apply(snapshot, cause.as_ref()).await;
    }
}
