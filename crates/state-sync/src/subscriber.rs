//! The [`Subscriber`] role: delivers invalidations for a topic to an
//! [`InvalidationSink`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::error::BoxError;
use crate::protocol::{InvalidationEvent, ProtocolError};
use crate::topic::Topic;

/// Delivers invalidation events for a topic.
///
/// `subscribe` registers `sink` and returns a [`Subscription`] that
/// unsubscribes when dropped. Delivery must not block: the sink's methods
/// only record the event and return.
///
/// Transports that receive raw bytes hand them to
/// [`InvalidationSink::deliver_json`], so a malformed payload becomes a
/// `protocol` error that keeps the payload. A transport that loses its
/// connection says so with [`InvalidationSink::connection_lost`] and, once
/// back, [`InvalidationSink::connection_restored`], which makes the handle
/// refresh because invalidations may have been missed.
///
/// # Examples
///
/// A subscriber for an in-process broadcast channel:
///
/// ```
/// use state_sync::{BoxError, InvalidationEvent, InvalidationSink, Subscriber, Subscription, Topic};
/// use tokio::sync::broadcast;
///
/// struct Broadcast(broadcast::Sender<InvalidationEvent>);
///
/// impl Subscriber for Broadcast {
///     async fn subscribe(&self, _topic: &Topic, sink: InvalidationSink) -> Result<Subscription, BoxError> {
///         let mut rx = self.0.subscribe();
///         let task = tokio::spawn(async move {
///             while let Ok(event) = rx.recv().await {
///                 sink.deliver(&event);
///             }
///         });
///         Ok(Subscription::new(move || task.abort()))
///     }
/// }
/// # let _ = Broadcast(broadcast::channel(1).0);
/// ```
pub trait Subscriber: Send + Sync + 'static {
    /// Starts delivering invalidations for `topic` to `sink`.
    ///
    /// # Errors
    ///
    /// When the subscription cannot be set up; the engine reports it in the
    /// `subscribe` phase and rolls `start` back.
    fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> impl Future<Output = Result<Subscription, BoxError>> + Send;
}

impl<S: Subscriber> Subscriber for Arc<S> {
    fn subscribe(
        &self,
        topic: &Topic,
        sink: InvalidationSink,
    ) -> impl Future<Output = Result<Subscription, BoxError>> + Send {
        (**self).subscribe(topic, sink)
    }
}

/// Where a [`Subscriber`] delivers events. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct InvalidationSink {
    target: Arc<dyn SinkTarget>,
}

/// What an engine does with what a subscriber delivers.
pub(crate) trait SinkTarget: Send + Sync + 'static {
    fn topic(&self) -> &Topic;
    fn deliver(&self, event: &InvalidationEvent);
    fn protocol_error(&self, error: ProtocolError);
    fn transport_error(&self, error: BoxError);
    fn connection_lost(&self, error: BoxError);
    fn connection_restored(&self);
    fn is_closed(&self) -> bool;
}

impl InvalidationSink {
    pub(crate) fn new(target: Arc<dyn SinkTarget>) -> Self {
        InvalidationSink { target }
    }

    /// A sink that calls `on_event` for each event of `topic`, for code
    /// that forwards invalidations rather than syncing a replica (a
    /// transport server, a log, a test). `on_event` must not block. Error
    /// and connection reports are logged.
    ///
    /// # Examples
    ///
    /// ```
    /// use state_sync::{InvalidationEvent, InvalidationSink, Revision, Topic};
    ///
    /// let topic = Topic::new("settings")?;
    /// let sink = InvalidationSink::from_fn(topic.clone(), |event| println!("{}", event.revision));
    /// sink.deliver(&InvalidationEvent::new(topic, Revision::new(3)));
    /// # Ok::<(), state_sync::InvalidTopic>(())
    /// ```
    pub fn from_fn(
        topic: Topic,
        on_event: impl Fn(&InvalidationEvent) + Send + Sync + 'static,
    ) -> Self {
        InvalidationSink::new(Arc::new(FnSink { topic, on_event }))
    }

    /// The topic this sink listens to.
    #[must_use]
    pub fn topic(&self) -> &Topic {
        self.target.topic()
    }

    /// Delivers a decoded event. Events for other topics are ignored;
    /// events at or below the local revision cost two atomic loads.
    #[inline]
    pub fn deliver(&self, event: &InvalidationEvent) {
        self.target.deliver(event);
    }

    /// Decodes and delivers a raw JSON event. A payload that cannot be
    /// decoded is reported as a `protocol` error keeping the payload, unless
    /// it clearly names another topic.
    pub fn deliver_json(&self, raw: &[u8]) {
        match InvalidationEvent::from_json(raw) {
            Ok(event) => self.target.deliver(&event),
            Err(error) => self.protocol_error(error),
        }
    }

    /// Decodes and delivers an already parsed JSON event, like
    /// [`InvalidationSink::deliver_json`].
    pub fn deliver_value(&self, value: &serde_json::Value) {
        match InvalidationEvent::from_value(value) {
            Ok(event) => self.target.deliver(&event),
            Err(error) => self.protocol_error(error),
        }
    }

    /// Reports a payload the transport could not decode itself.
    pub fn protocol_error(&self, error: ProtocolError) {
        match error.topic() {
            Some(topic) if !topic.matches(self.target.topic()) => {}
            _ => self.target.protocol_error(error),
        }
    }

    /// Reports a transport error that did not end the subscription
    /// (`invalidation` phase).
    pub fn report_error(&self, error: impl Into<BoxError>) {
        self.target.transport_error(error.into());
    }

    /// The connection is lost: events may be missed until
    /// [`InvalidationSink::connection_restored`]. The handle's status becomes
    /// [`Status::Interrupted`](crate::Status::Interrupted) and the error is
    /// reported in the `subscribe` phase.
    pub fn connection_lost(&self, error: impl Into<BoxError>) {
        self.target.connection_lost(error.into());
    }

    /// The connection is back: the handle becomes live again and refreshes,
    /// whatever its local revision, because invalidations may have been
    /// missed.
    pub fn connection_restored(&self) {
        self.target.connection_restored();
    }

    /// Whether the handle behind this sink is stopped or gone. Subscribers
    /// may drop such sinks.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.target.is_closed()
    }
}

impl fmt::Debug for InvalidationSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationSink")
            .field("topic", self.target.topic())
            .field("closed", &self.target.is_closed())
            .finish()
    }
}

/// An active subscription; unsubscribes when dropped or on
/// [`Subscription::unsubscribe`].
#[must_use = "dropping a Subscription unsubscribes"]
pub struct Subscription {
    unsubscribe: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Subscription {
    /// A subscription that runs `unsubscribe` once when it ends.
    pub fn new(unsubscribe: impl FnOnce() + Send + Sync + 'static) -> Self {
        Subscription {
            unsubscribe: Some(Box::new(unsubscribe)),
        }
    }

    /// A subscription with nothing to undo.
    pub fn noop() -> Self {
        Subscription { unsubscribe: None }
    }

    /// Ends the subscription now.
    pub fn unsubscribe(mut self) {
        self.run();
    }

    fn run(&mut self) {
        if let Some(f) = self.unsubscribe.take() {
            f();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.run();
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("active", &self.unsubscribe.is_some())
            .finish()
    }
}

struct FnSink<F> {
    topic: Topic,
    on_event: F,
}

impl<F: Fn(&InvalidationEvent) + Send + Sync + 'static> SinkTarget for FnSink<F> {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    fn deliver(&self, event: &InvalidationEvent) {
        if event.topic.matches(&self.topic) {
            (self.on_event)(event);
        }
    }

    fn protocol_error(&self, error: ProtocolError) {
        tracing::warn!(topic = %self.topic, %error, "protocol error");
    }

    fn transport_error(&self, error: BoxError) {
        tracing::warn!(topic = %self.topic, %error, "transport error");
    }

    fn connection_lost(&self, error: BoxError) {
        tracing::warn!(topic = %self.topic, %error, "connection lost");
    }

    fn connection_restored(&self) {
        tracing::info!(topic = %self.topic, "connection restored");
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// A subscriber and a provider of one topic, which knows the topic: what
/// [`SyncHandle::builder`](crate::SyncHandle::builder) takes. Implemented by
/// [`MemorySource`](crate::MemorySource), the hub's `HubTopic` and the
/// network client's `RemoteTopic`.
pub trait Source: Subscriber + crate::Provider {
    /// The topic this source serves.
    fn topic(&self) -> &Topic;
}
