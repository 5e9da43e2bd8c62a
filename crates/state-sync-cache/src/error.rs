//! Cache errors.

use state_sync::BoxError;

/// `Result` with the cache's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Loading or saving the cache failed.
///
/// A cached record that fails to load is left where it is: nothing is
/// replaced by a default behind the caller's back. The replica then starts
/// from its first fetch, and its next save overwrites the record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage backend failed.
    #[error("cache storage failed")]
    Storage(#[from] state_sync_storage::Error),
    /// The stored bytes fail their checksum, length or header check.
    #[error("cached snapshot is corrupt: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
    /// The record was written by a newer schema than this build knows.
    #[error("cached snapshot has schema version {stored}, newer than this build's {current}")]
    FutureVersion {
        /// The record's schema version.
        stored: u32,
        /// This build's schema version.
        current: u32,
    },
    /// No migration is registered from this schema version.
    #[error("no migration from schema version {from} to {}", from + 1)]
    MissingMigration {
        /// The version with no step out of it.
        from: u32,
    },
    /// A migration step failed.
    #[error("migration from schema version {from} to {} failed", from + 1)]
    MigrationFailed {
        /// The step's starting version.
        from: u32,
        /// What the step reported.
        #[source]
        source: BoxError,
    },
    /// The (migrated) JSON does not decode as the value type.
    #[error("cached snapshot does not decode as the value type")]
    Invalid(#[source] serde_json::Error),
    /// The validation hook refused the cached value.
    #[error("cached snapshot failed validation")]
    Validation(#[source] BoxError),
    /// The value could not be encoded as JSON.
    #[error("value cannot be encoded as JSON")]
    Encode(#[source] serde_json::Error),
    /// Compression failed.
    #[error("compression failed")]
    Compression(#[source] std::io::Error),
    /// The restored snapshot was refused by the applier.
    #[error("applier refused the cached snapshot")]
    Apply(#[source] BoxError),
    /// The cache was disposed.
    #[error("the cache is disposed")]
    Disposed,
}
