//! The worker: the task that drains the pending slot, parked when idle,
//! and the sink through which a subscriber hands invalidations in.

use super::*;

/// A handle's worker: parked until woken, then drains the pending slot.
/// Holds the engine weakly so dropping every handle still drops it.
pub(super) async fn parked_worker<S, P, A>(engine: Weak<Engine<S, P, A>>, gate: Arc<Gate>)
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    loop {
        gate.wake_worker.woken().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        // Closed only once stopped: an atomic load, not the state's lock.
        if gate.closed.load(Ordering::Acquire) {
            engine.worker_exit();
            return;
        }
        // Nothing of a refresh's outcome may be held across the yield: it
        // would be kept in every parked task.
        let outcome = loop {
            match engine.refresh_now() {
                RefreshNow::Yield => {}
                outcome => break outcome,
            }
            tokio::task::yield_now().await;
        };
        if let RefreshNow::Waits(unfinished) = outcome {
            // Boxed so the parked task stays small between refreshes.
            Box::pin(engine.run_worker(unfinished)).await;
        }
    }
}

/// What the gate hands a fresh event or a report to: the engine, behind
/// a trait object so the gate (which every event touches) need not know
/// its types.
pub(super) trait EngineEvents: Send + Sync {
    /// Runs the wanted refresh here, on the delivering thread, as far as
    /// it goes at once; the worker, woken, does the rest. The caller
    /// marked the worker running.
    fn refresh_on_delivery(&self);
    fn should_refresh_panicked(&self, event: &InvalidationEvent);
    fn protocol_error(&self, error: ProtocolError);
    fn transport_error(&self, error: BoxError);
    fn connection_lost(&self, error: BoxError);
    fn connection_restored(&self);
}

/// A subscriber's [`InvalidationSink`] is the handle's gate: a stale event
/// is dropped there, touching nothing else; a fresh one goes to the engine,
/// held weakly so a forgotten subscription does not keep a dropped handle
/// alive.
impl SinkTarget for Gate {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    fn deliver(&self, event: &InvalidationEvent) {
        // Every condition drops the event, so the cheapest goes first: a
        // stale event costs two atomic loads and no string comparison.
        if self.is_stale(event.revision)
            || self.closed.load(Ordering::Relaxed)
            || !event.topic.matches(&self.topic)
        {
            return;
        }
        self.on_invalidation(event);
    }

    fn protocol_error(&self, error: ProtocolError) {
        if let Some(engine) = self.live_engine() {
            engine.protocol_error(error);
        }
    }

    fn transport_error(&self, error: BoxError) {
        if let Some(engine) = self.live_engine() {
            engine.transport_error(error);
        }
    }

    fn connection_lost(&self, error: BoxError) {
        if let Some(engine) = self.live_engine() {
            engine.connection_lost(error);
        }
    }

    fn connection_restored(&self) {
        if let Some(engine) = self.live_engine() {
            engine.connection_restored();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
            || self
                .engine
                .get()
                .is_none_or(|engine| engine.strong_count() == 0)
    }
}

impl Gate {
    /// The engine, unless it is stopped or dropped.
    pub(super) fn live_engine(&self) -> Option<Arc<dyn EngineEvents>> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        self.engine.get()?.upgrade()
    }
}

impl<S, P, A> EngineEvents for Engine<S, P, A>
where
    S: Subscriber,
    P: Provider,
    A: Applier<P::Data>,
{
    fn refresh_on_delivery(&self) {
        match self.refresh_now() {
            RefreshNow::Drained => {}
            RefreshNow::Yield | RefreshNow::Waits(None) => self.gate.wake_worker.wake(),
            RefreshNow::Waits(Some(unfinished)) => {
                // The worker refreshes again from the slot: a snapshot
                // fetched for an applier that waits is fetched anew.
                let (Unfinished::Refresh(pending) | Unfinished::Apply(_, pending)) = unfinished;
                {
                    let mut st = self.lock();
                    if st.lifecycle == Lifecycle::Started {
                        st.pending
                            .get_or_insert_with(Pending::default)
                            .absorb(pending);
                    }
                }
                self.gate.wake_worker.wake();
            }
        }
    }

    fn should_refresh_panicked(&self, event: &InvalidationEvent) {
        self.fail(
            Phase::Invalidation,
            self.context(Some(event)),
            "should_refresh panicked; refreshing anyway",
        );
    }

    fn protocol_error(&self, error: ProtocolError) {
        let context = ErrorContext {
            raw_event: error.raw().map(str::to_owned),
            ..self.context(None)
        };
        self.fail(Phase::Protocol, context, error);
    }

    fn transport_error(&self, error: BoxError) {
        self.fail(Phase::Invalidation, self.context(None), error);
    }

    fn connection_lost(&self, error: BoxError) {
        self.set_status(Status::Interrupted);
        let context = ErrorContext {
            will_retry: true,
            ..self.context(None)
        };
        self.fail(Phase::Subscribe, context, error);
    }

    fn connection_restored(&self) {
        if self.lock().lifecycle == Lifecycle::Started {
            self.set_status(Status::Live);
        }
        self.gate.request(None, true);
    }
}

pub(super) fn applier_panicked(panic: &(dyn std::any::Any + Send)) -> BoxError {
    format!("applier panicked: {}", panic_message(panic)).into()
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
