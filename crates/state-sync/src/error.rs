//! [`Error`]: what went wrong in an engine, in which [`Phase`], with the
//! full [`ErrorContext`].

use std::fmt;
use std::time::Duration;

use crate::revision::Revision;
use crate::topic::Topic;

/// A boxed error from a subscriber, provider or applier.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The step of the engine that failed. Each failure is reported once, in its
/// most specific phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// `start()` was called on a stopped handle.
    Start,
    /// Subscribing failed, or the subscriber lost its connection.
    Subscribe,
    /// The subscriber reported an error on the event stream, or the
    /// `should_refresh` filter panicked.
    Invalidation,
    /// A refresh failed for a reason outside fetching and applying (the
    /// refresh task itself failed).
    Refresh,
    /// The provider failed (retried per the [`RetryPolicy`](crate::RetryPolicy)).
    GetSnapshot,
    /// The applier failed or panicked.
    Apply,
    /// An event or snapshot did not follow the protocol (blank topic,
    /// non-canonical revision, malformed payload). The event is dropped.
    Protocol,
    /// The throttle dropped an invalidation (both edges disabled).
    Throttle,
}

impl Phase {
    /// The phase's name as the JavaScript packages spell it
    /// (`"getSnapshot"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Subscribe => "subscribe",
            Phase::Invalidation => "invalidation",
            Phase::Refresh => "refresh",
            Phase::GetSnapshot => "getSnapshot",
            Phase::Apply => "apply",
            Phase::Protocol => "protocol",
            Phase::Throttle => "throttle",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything known about a failure. Fields that do not apply are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorContext {
    /// The handle's last applied revision, once it applied one.
    pub local_revision: Option<Revision>,
    /// The revision of the invalidation that caused the work.
    pub event_revision: Option<Revision>,
    /// The revision of the fetched snapshot.
    pub snapshot_revision: Option<Revision>,
    /// The source id of the invalidation.
    pub source_id: Option<String>,
    /// The invalidation that caused the work, as JSON: the payload as
    /// received for a malformed event, the event re-encoded otherwise. Set
    /// for every error an invalidation caused (protocol, fetch, apply).
    pub raw_event: Option<String>,
    /// The snapshot payload as received, when it broke the protocol.
    pub raw_snapshot: Option<String>,
    /// The fetch attempt, starting at 1.
    pub attempt: Option<u32>,
    /// Whether the engine retries after this failure.
    pub will_retry: bool,
    /// The delay before that retry.
    pub retry_delay: Option<Duration>,
}

/// A failure inside an engine handle.
///
/// Passed to the handle's error callback and returned by
/// [`SyncHandle::start`](crate::SyncHandle::start) and
/// [`SyncHandle::refresh`](crate::SyncHandle::refresh).
///
/// `Display` says what failed and why, so `eprintln!("{e}")` prints
/// `state-sync `settings`: getSnapshot failed (attempt 1): connection
/// refused`. The cause itself (a [`ProtocolError`](crate::ProtocolError)
/// for protocol failures, the provider's or applier's own error otherwise)
/// is [`cause`](Self::cause), to downcast; like [`std::io::Error`] wrapping
/// a custom error, [`source`](std::error::Error::source) continues with
/// the cause's own source, so a chain of causes prints each one once.
#[derive(Debug)]
pub struct Error {
    phase: Phase,
    topic: Topic,
    context: Box<ErrorContext>,
    source: BoxError,
}

impl Error {
    pub(crate) fn new(
        phase: Phase,
        topic: Topic,
        context: ErrorContext,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            phase,
            topic,
            context: Box::new(context),
            source: source.into(),
        }
    }

    /// The phase that failed.
    #[must_use]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The handle's topic.
    #[must_use]
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Revisions, attempt and retry details.
    #[must_use]
    pub fn context(&self) -> &ErrorContext {
        &self.context
    }

    /// Whether the engine retries the failed step by itself.
    #[must_use]
    pub fn will_retry(&self) -> bool {
        self.context.will_retry
    }

    /// Whether `start` failed because the handle was stopped.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.source.is::<Stopped>()
    }

    /// The cause: the provider's, applier's or subscriber's error, a
    /// [`ProtocolError`](crate::ProtocolError), or [`Stopped`]. Downcast it
    /// to reach a transport's own error type.
    #[must_use]
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The cause, owned.
    #[must_use]
    pub fn into_cause(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state-sync `{}`: {} failed", self.topic, self.phase)?;
        let c = &*self.context;
        if let Some(attempt) = c.attempt {
            write!(f, " (attempt {attempt}")?;
            match c.retry_delay {
                Some(d) if c.will_retry => write!(f, ", retrying in {d:?})")?,
                _ => f.write_str(")")?,
            }
        }
        write!(f, ": {}", self.source)
    }
}

impl std::error::Error for Error {
    /// The cause's own source: the cause is already part of `Display`.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

/// The handle was stopped; it cannot be started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the handle was stopped and cannot be restarted")]
pub struct Stopped;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_says_why_and_the_chain_prints_each_cause_once() {
        let e = Error::new(
            Phase::GetSnapshot,
            Topic::new("t").unwrap(),
            ErrorContext {
                attempt: Some(2),
                will_retry: true,
                retry_delay: Some(Duration::from_secs(1)),
                ..ErrorContext::default()
            },
            "connection refused",
        );
        let text = e.to_string();
        assert_eq!(
            text,
            "state-sync `t`: getSnapshot failed (attempt 2, retrying in 1s): connection refused"
        );
        assert_eq!(e.cause().to_string(), "connection refused");
        assert!(std::error::Error::source(&e).is_none());

        #[derive(Debug, thiserror::Error)]
        #[error("fetch failed")]
        struct Fetch(#[source] std::io::Error);
        let nested = Error::new(
            Phase::GetSnapshot,
            Topic::new("t").unwrap(),
            ErrorContext::default(),
            Fetch(std::io::Error::other("refused")),
        );
        assert_eq!(
            ErrorChain(&nested).to_string(),
            "state-sync `t`: getSnapshot failed: fetch failed: refused"
        );
        assert!(nested.cause().is::<Fetch>());
    }
}

/// Displays an error with its chain of causes, `outer: inner: root`, for
/// messages that leave the process (wire errors, command-line output).
///
/// # Examples
///
/// ```
/// use state_sync::ErrorChain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("saving failed")]
/// struct Saving(#[source] std::io::Error);
///
/// let error = Saving(std::io::Error::other("disk full"));
/// assert_eq!(ErrorChain(&error).to_string(), "saving failed: disk full");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
