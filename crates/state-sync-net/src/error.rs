//! The network crate's error: what a [`Client`](crate::Client) request can
//! fail with.

use std::time::Duration;

use state_sync::Revision;

use crate::protocol::ErrorCode;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A request to a hub failed. [`Disconnected`](Error::Disconnected) and
/// [`Timeout`](Error::Timeout) are retryable; for a write they leave its
/// outcome unknown (read the topic to know).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not connected (or the connection dropped before the answer).
    #[error("not connected to the hub")]
    Disconnected,
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A compare-and-set found another revision.
    #[error("conflict: the topic is at revision {current}")]
    Conflict {
        /// The topic's current revision.
        current: Revision,
    },
    /// The server refused the request.
    #[error("server error `{code}`: {message}")]
    Server {
        /// The stable error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server sent something this client does not understand.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The value could not be encoded or decoded.
    #[error("invalid JSON: {0}")]
    Json(String),
}

impl Error {
    /// The server's error code, if the server refused the request.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}
