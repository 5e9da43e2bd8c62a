//! The plugin's error, serialized for the JavaScript side as
//! `{code, message, currentRevision?}`.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use state_sync::Revision;

/// `Result` with the plugin's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A command or an extension call failed. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The hub refused: unknown topic, conflict, invalid data, storage…
    #[error(transparent)]
    Hub(#[from] state_sync_hub::Error),
    /// The window may not access this topic (plugin configuration).
    #[error("window `{window}` may not access topic `{topic}`")]
    Forbidden {
        /// The window's label.
        window: String,
        /// The topic.
        topic: String,
    },
    /// The window's capabilities lack the plugin permission of an
    /// un-prefixed (app-level) command: `state-sync:allow-<command>`.
    #[error("window `{window}` is not allowed to run `{command}`: its capabilities lack `state-sync:allow-{}`", command.replace('_', "-"))]
    NotAllowed {
        /// The command (`get_snapshot`, `set`).
        command: &'static str,
        /// The window's label.
        window: String,
    },
    /// `expectedRevision` is not a canonical decimal string.
    #[error("invalid revision `{0}`")]
    InvalidRevision(String),
    /// Opening the store failed.
    #[error(transparent)]
    Storage(#[from] state_sync_storage::Error),
    /// Tauri failed (e.g. no app data directory).
    #[error(transparent)]
    Tauri(#[from] tauri::Error),
}

impl Error {
    /// A stable code: the hub's codes (`unknown_topic`, `conflict`,
    /// `invalid_data`, …), `forbidden`, `not_allowed`, `invalid_revision`,
    /// `storage`, `internal`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Error::Hub(e) => e.code(),
            Error::Forbidden { .. } => "forbidden",
            Error::NotAllowed { .. } => "not_allowed",
            Error::InvalidRevision(_) => "invalid_revision",
            Error::Storage(_) => "storage",
            Error::Tauri(_) => "internal",
        }
    }

    fn current_revision(&self) -> Option<Revision> {
        match self {
            Error::Hub(e) => e.current_revision(),
            _ => None,
        }
    }
}

impl Serialize for Error {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let current = self.current_revision();
        let mut map = serializer.serialize_map(Some(2 + usize::from(current.is_some())))?;
        map.serialize_entry("code", self.code())?;
        map.serialize_entry("message", &state_sync::ErrorChain(self).to_string())?;
        if let Some(current) = current {
            map.serialize_entry("currentRevision", &current)?;
        }
        map.end()
    }
}
