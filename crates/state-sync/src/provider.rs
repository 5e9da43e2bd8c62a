//! The [`Provider`] role: fetches the canonical snapshot of a topic.

use std::future::Future;
use std::sync::Arc;

use crate::error::BoxError;
use crate::protocol::{ProtocolError, SnapshotEnvelope};
use crate::revision::Revision;
use crate::topic::Topic;

/// What the engine asks a [`Provider`] for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FetchRequest {
    /// The topic to fetch.
    pub topic: Topic,
    /// The replica's revision, once it has applied a snapshot. A provider
    /// may answer [`Fetched::NotModified`] when its revision is not newer.
    pub if_newer_than: Option<Revision>,
}

impl FetchRequest {
    /// A request for `topic`, unconditional.
    #[must_use]
    pub fn new(topic: Topic) -> Self {
        FetchRequest {
            topic,
            if_newer_than: None,
        }
    }

    /// Makes the request conditional on the replica's revision.
    #[must_use]
    pub fn if_newer_than(mut self, revision: Revision) -> Self {
        self.if_newer_than = Some(revision);
        self
    }
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched<T> {
    /// The snapshot.
    Snapshot(SnapshotEnvelope<T>),
    /// The source is not newer than `FetchRequest::if_newer_than`; nothing
    /// was transferred. `revision` is the source's current revision.
    NotModified {
        /// The source's current revision.
        revision: Revision,
    },
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The snapshot arrived but does not follow the protocol (for example a
    /// non-canonical revision). Not retried; reported in the `protocol` phase.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The source could not be reached or failed. Retried with backoff;
    /// reported in the `get_snapshot` phase.
    #[error("snapshot unavailable")]
    Unavailable(#[source] BoxError),
}

impl FetchError {
    /// Wraps any error as [`FetchError::Unavailable`].
    pub fn unavailable(error: impl Into<BoxError>) -> Self {
        FetchError::Unavailable(error.into())
    }

    /// Whether trying again may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, FetchError::Unavailable(_))
    }
}

/// Fetches a topic's snapshot from the source of truth.
///
/// # Examples
///
/// ```
/// use state_sync::{FetchError, FetchRequest, Fetched, Provider, Revision, SnapshotEnvelope};
///
/// struct Fixed;
///
/// impl Provider for Fixed {
///     type Data = String;
///
///     async fn fetch(&self, request: &FetchRequest) -> Result<Fetched<String>, FetchError> {
///         let current = Revision::new(3);
///         if request.if_newer_than >= Some(current) {
///             return Ok(Fetched::NotModified { revision: current });
///         }
///         Ok(Fetched::Snapshot(SnapshotEnvelope::new(current, "hello".to_owned())))
///     }
/// }
/// # let _ = Fixed;
/// ```
pub trait Provider: Send + Sync + 'static {
    /// The state type.
    type Data: Send + 'static;

    /// Fetches the current snapshot.
    ///
    /// # Errors
    ///
    /// [`FetchError::Unavailable`] is retried by the engine per its
    /// [`RetryPolicy`](crate::RetryPolicy); [`FetchError::Protocol`] is not.
    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<Self::Data>, FetchError>> + Send;

    /// Answers at once, when the answer is at hand without waiting: a
    /// source in memory, a snapshot that came with its invalidation. The
    /// engine then refreshes without building a future, which halves what
    /// a refresh costs (with [`Applier::apply_now`](crate::Applier::apply_now)).
    ///
    /// `None`, the default, sends the engine to [`fetch`](Self::fetch),
    /// which also reports every failure: return `Some` only with the
    /// answer `fetch` would give. It runs on the handle's worker task, so
    /// it must not block; a panic is reported (phase `get_snapshot`) and
    /// the engine fetches instead.
    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<Self::Data>> {
        let _ = request;
        None
    }
}

impl<P: Provider> Provider for Arc<P> {
    type Data = P::Data;

    fn fetch(
        &self,
        request: &FetchRequest,
    ) -> impl Future<Output = Result<Fetched<Self::Data>, FetchError>> + Send {
        (**self).fetch(request)
    }

    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<Self::Data>> {
        (**self).fetch_now(request)
    }
}
