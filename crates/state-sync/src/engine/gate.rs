//! The revision gate: the local revision, whether anything was applied,
//! and whether the handle is closed, read with atomic loads; and the
//! handle's state, where a fresh event queues its refresh.

use super::*;

/// The part of a handle that every delivered event touches: the revision
/// check (atomic loads, no lock), then for a fresh event the pending slot.
///
/// In declaration order, what every event and refresh touches, in three
/// cache lines: a fan-out to many handles misses the cache on each. The
/// first holds what every event reads; the second what wakes the worker
/// and guards the state; the state's first fields (lifecycle, the pending
/// slot) fill the third.
#[repr(C, align(64))]
pub(super) struct Gate {
    pub(super) local: AtomicU64,
    pub(super) applied: AtomicBool,
    pub(super) closed: AtomicBool,
    /// Whether a fresh event is refreshed on the delivering thread (see
    /// [`SyncHandleBuilder::refresh_on_delivery`]); in the padding before
    /// the topic.
    pub(super) refresh_on_delivery: bool,
    pub(super) topic: Topic,
    pub(super) should_refresh: Option<ShouldRefresh>,
    /// `wait_for_revision` calls in progress: an apply wakes waiters only
    /// when there are some (the `Notify` takes a lock).
    pub(super) waiters: AtomicUsize,
    /// Wakes the handle's parked worker task to drain the pending slot.
    pub(super) wake_worker: WorkerWake,
    pub(super) debounce: Option<Duration>,
    /// The handle's lifecycle and pending refresh: here, beside the gate,
    /// so a fresh event is queued without reaching the engine (no
    /// reference count taken, one cache line fewer per event).
    pub(super) state: Mutex<State>,
    /// The engine, set once it is built; reached only for reports.
    pub(super) engine: OnceLock<Weak<dyn EngineEvents>>,
}

impl Gate {
    /// Whether a snapshot or event at `revision` is not newer than what was
    /// applied. Nothing is stale before the first apply.
    #[inline]
    pub(super) fn is_stale(&self, revision: Revision) -> bool {
        self.applied.load(Ordering::Acquire) && revision.get() <= self.local.load(Ordering::Acquire)
    }

    /// The last applied revision, `0` before the first apply.
    pub(super) fn revision(&self) -> Revision {
        Revision::new(self.local.load(Ordering::Acquire))
    }

    pub(super) fn local(&self) -> Option<Revision> {
        self.applied
            .load(Ordering::Acquire)
            .then(|| Revision::new(self.local.load(Ordering::Acquire)))
    }

    pub(super) fn record_applied(&self, revision: Revision) {
        self.local.store(revision.get(), Ordering::Release);
        self.applied.store(true, Ordering::Release);
    }
}

impl Gate {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// A fresh event: the filter, if any, then a wanted refresh. Out of
    /// line, so the stale path that every event takes stays small.
    #[inline(never)]
    pub(super) fn on_invalidation(&self, event: &InvalidationEvent) {
        if let Some(filter) = &self.should_refresh {
            match std::panic::catch_unwind(AssertUnwindSafe(|| filter(event))) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::trace!(topic = %self.topic, revision = %event.revision, "refresh vetoed by should_refresh");
                    return;
                }
                Err(_) => {
                    if let Some(engine) = self.live_engine() {
                        engine.should_refresh_panicked(event);
                    }
                }
            }
        }
        self.request(Some(event), false);
    }

    /// Records a wanted refresh and wakes the worker to run it.
    pub(super) fn request(&self, event: Option<&InvalidationEvent>, forced: bool) {
        let wake = {
            let mut st = self.lock();
            if st.lifecycle == Lifecycle::Stopped {
                return;
            }
            st.pending
                .get_or_insert_with(Pending::default)
                .merge(event, forced);
            if let Some(d) = self.debounce {
                st.debounce_until = Some(Instant::now() + d);
            }
            let wake = st.lifecycle == Lifecycle::Started && !st.worker_running;
            st.worker_running |= wake;
            wake
        };
        // One task per handle, parked between refreshes, costs less than a
        // spawn per refresh: no allocation, no task registration.
        if !wake {
            return;
        }
        match self.live_engine().filter(|_| self.refresh_on_delivery) {
            Some(engine) => engine.refresh_on_delivery(),
            None => self.wake_worker.wake(),
        }
    }
}

/// Wakes one parked task, keeping the wake-up if it is not waiting yet
/// (like `Notify::notify_one`), without a lock on either side: a flag and
/// an `AtomicWaker`. Only the worker waits on it.
#[derive(Default)]
pub(super) struct WorkerWake {
    woken: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl WorkerWake {
    pub(super) fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves at the next wake-up, or at once for one that came before.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a wake-up is consumed only when this resolves.
    pub(super) async fn woken(&self) {
        std::future::poll_fn(|cx| {
            if self.woken.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A wake-up between the check and the registration.
            if self.woken.swap(false, Ordering::AcqRel) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }
}
