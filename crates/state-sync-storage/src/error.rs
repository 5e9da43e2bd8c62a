//! Storage errors.

use std::path::PathBuf;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed. Usually retryable (disk full,
    /// permissions fixed by the operator).
    #[error("storage I/O failed at {path}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored file is corrupt or truncated. It was renamed aside to
    /// `quarantined` and nothing was overwritten; the previous good copy, if
    /// any, is at `backup`. Not retryable: an operator decides what to
    /// restore.
    #[error(
        "stored file {path} is corrupt ({reason}); moved to {quarantined}{}",
        backup.as_ref().map(|b| format!("; last good copy at {}", b.display())).unwrap_or_default()
    )]
    Corrupt {
        /// Where the file was.
        path: PathBuf,
        /// Where it is now.
        quarantined: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The last good copy, if one exists: the next `load` returns it.
        backup: Option<PathBuf>,
        /// The revision the damaged record's header names, when it can
        /// still be read: a revision that may have been issued, which a
        /// fallback to an older copy must stay above.
        claimed_revision: Option<state_sync::Revision>,
    },
    /// Another process has the storage directory open (two hubs on one
    /// store would overwrite each other's records). Not retryable until it
    /// stops.
    #[error(
        "storage directory {} is in use by another process{}",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The process holding it, when it said.
        holder: Option<u32>,
    },
    /// A database backend (Redis, PostgreSQL) failed or is unreachable.
    /// Retryable: the backend reconnects by itself.
    #[error("{backend} failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Its client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A background task running blocking file work failed.
    #[error("storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl Error {
    /// Whether trying again may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Task(_) | Error::Backend { .. }
        )
    }
}
