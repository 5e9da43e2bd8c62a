//! Hub errors, each with a stable [`code`](Error::code).

use std::sync::Arc;

use state_sync::{BoxError, InvalidTopic, Revision, Topic};

/// `Result` with the hub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A hub operation failed. Nothing was committed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic name is not valid.
    #[error(transparent)]
    InvalidTopic(#[from] InvalidTopic),
    /// No topic of that name is open on this hub.
    #[error("unknown topic `{topic}`")]
    UnknownTopic {
        /// The topic asked for.
        topic: Topic,
    },
    /// The topic is open with another Rust type.
    #[error("topic `{topic}` is open as `{opened_as}`, not `{requested}`")]
    TypeMismatch {
        /// The topic.
        topic: Topic,
        /// The type it was opened with.
        opened_as: &'static str,
        /// The type asked for.
        requested: &'static str,
    },
    /// A compare-and-set found another revision than the one expected.
    #[error("conflict on `{topic}`: expected revision {expected}, current is {current}")]
    Conflict {
        /// The topic.
        topic: Topic,
        /// The revision the writer expected.
        expected: Revision,
        /// The revision the topic was at.
        current: Revision,
    },
    /// Data (stored, or offered as JSON) does not decode as the topic's type.
    /// A stored record that fails here is left untouched.
    #[error("data for `{topic}` is not valid")]
    InvalidData {
        /// The topic.
        topic: Topic,
        /// Why it does not decode.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// The new value could not be encoded as JSON.
    #[error("value for `{topic}` cannot be encoded as JSON")]
    Encode {
        /// The topic.
        topic: Topic,
        /// Why.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// An update closure returned an error or panicked.
    #[error("update of `{topic}` failed")]
    Update {
        /// The topic.
        topic: Topic,
        /// What the closure reported.
        #[source]
        source: Arc<BoxError>,
    },
    /// The storage backend failed; the write was not committed and the
    /// previous state is intact.
    #[error("storage failed{}", topic.as_ref().map(|t| format!(" for `{t}`")).unwrap_or_default())]
    Storage {
        /// The topic, unless the failure concerned them all.
        topic: Option<Topic>,
        /// The backend's error.
        #[source]
        source: Arc<state_sync_storage::Error>,
    },
    /// The topic is at the largest revision; no more writes are possible.
    #[error("topic `{topic}` has reached the largest revision")]
    RevisionsExhausted {
        /// The topic.
        topic: Topic,
    },
    /// The value, as the hub encodes it, is larger than the write's limit
    /// ([`Hub::set_json_limited`](crate::Hub::set_json_limited)): it could
    /// never be served. Nothing was committed.
    #[error("`{topic}` would hold {bytes} bytes of JSON, over the limit of {limit}")]
    TooLarge {
        /// The topic.
        topic: Topic,
        /// The encoded value's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Opening the topic would pass the hub's topic limit
    /// ([`HubBuilder::max_topics`](crate::HubBuilder::max_topics)).
    #[error("the hub already has {limit} topics, its limit; `{topic}` was not created")]
    TooManyTopics {
        /// The topic that was not created.
        topic: Topic,
        /// The limit.
        limit: usize,
    },
    /// The topic's stored record is damaged (corrupt file, or data that
    /// does not decode): it is quarantined and refuses reads and writes
    /// until an operator restores or removes it. Other topics serve.
    #[error("topic `{topic}` is damaged and quarantined: {reason}")]
    Damaged {
        /// The topic.
        topic: Topic,
        /// What is wrong (for logs; may name server paths).
        reason: String,
    },
    /// The hub is closed (or closing) and takes no more writes.
    #[error("the hub is closed")]
    Closed,
    /// The hub runs in another process and could not be reached, or its
    /// answer was lost. Retryable; a write may or may not have been
    /// committed: read the topic to know.
    #[error("the hub could not be reached for `{topic}`")]
    Unreachable {
        /// The topic.
        topic: Topic,
        /// What the connection reported.
        #[source]
        source: Arc<BoxError>,
    },
    /// A hub in another process refused the request with a code this
    /// type has no variant for (e.g. `forbidden`, `unauthorized`).
    #[error("the hub refused the request for `{topic}` ({code}): {message}")]
    Refused {
        /// The topic.
        topic: Topic,
        /// The protocol's error code.
        code: String,
        /// The hub's explanation.
        message: String,
    },
}

impl Error {
    /// A stable, machine-readable code for this error, used on the wire by
    /// the transports: `invalid_topic`, `unknown_topic`, `type_mismatch`,
    /// `conflict`, `invalid_data`, `encode`, `update_failed`, `storage`,
    /// `revisions_exhausted`, `too_large`, `too_many_topics`, `damaged`,
    /// `closed`; from a remote hub also `unreachable` and `refused` (whose
    /// protocol code is in the variant).
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidTopic(_) => "invalid_topic",
            Error::UnknownTopic { .. } => "unknown_topic",
            Error::TypeMismatch { .. } => "type_mismatch",
            Error::Conflict { .. } => "conflict",
            Error::InvalidData { .. } => "invalid_data",
            Error::Encode { .. } => "encode",
            Error::Update { .. } => "update_failed",
            Error::Storage { .. } => "storage",
            Error::RevisionsExhausted { .. } => "revisions_exhausted",
            Error::TooLarge { .. } => "too_large",
            Error::TooManyTopics { .. } => "too_many_topics",
            Error::Damaged { .. } => "damaged",
            Error::Closed => "closed",
            Error::Unreachable { .. } => "unreachable",
            Error::Refused { .. } => "refused",
        }
    }

    /// The current revision, for a [`Conflict`](Error::Conflict).
    #[must_use]
    pub fn current_revision(&self) -> Option<Revision> {
        match self {
            Error::Conflict { current, .. } => Some(*current),
            _ => None,
        }
    }

    pub(crate) fn invalid_data(topic: &Topic, source: serde_json::Error) -> Self {
        Error::InvalidData {
            topic: topic.clone(),
            source: Arc::new(source),
        }
    }
}
