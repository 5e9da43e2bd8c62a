//! [`SyncHandle`]: what the application holds: start, stop, refresh, wait,
//! status; and [`Status`].

use super::*;

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
    pub(super) core: Arc<dyn Core>,
}

pub(super) trait Core: Send + Sync + 'static {
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
            refresh_on_delivery: false,
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
pub(super) struct WaiterGuard<'a>(&'a AtomicUsize);

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
