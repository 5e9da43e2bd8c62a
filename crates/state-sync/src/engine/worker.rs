//! The worker: the task that drains the pending slot, parked when idle,
//! and the sink through which a subscriber hands invalidations in.

use super::*;

/// What a subscriber's [`InvalidationSink`] talks to. Holds the engine
/// weakly so a forgotten subscription does not keep a dropped handle alive.
/// A handle's worker: parked until woken, then drains the pending slot.
/// Holds the engine weakly so dropping every handle still drops it.
pub(super) async fn parked_worker<S, P, A>(engine: Weak<Engine<S, P, A>>, wake: Arc<Notify>)
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

pub(super) struct EngineSink<S, P: Provider, A> {
    pub(super) gate: Arc<Gate>,
    pub(super) engine: Weak<Engine<S, P, A>>,
}

impl<S, P: Provider, A> EngineSink<S, P, A> {
    /// The engine, unless it is stopped or dropped.
    pub(super) fn live_engine(&self) -> Option<Arc<Engine<S, P, A>>> {
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

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
