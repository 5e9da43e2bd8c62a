//! Client-side cache for state-sync replicas: the last applied snapshot,
//! kept in [`Storage`](state_sync_storage::Storage) so a replica starts
//! with state before its first fetch.
//!
//! - [`SnapshotCache::restore`] applies the cached snapshot and returns its
//!   revision, which seeds the engine's revision gate
//!   ([`initial_revision`](state_sync::SyncHandleBuilder::initial_revision)); the
//!   first fetch then applies only a newer snapshot.
//! - [`SnapshotCache::wrap`] makes an applier that stages every applied
//!   snapshot; a saver task writes the newest one, with debounce, throttle
//!   and max wait, plus [`flush`](SnapshotCache::flush) and
//!   [`dispose`](SnapshotCache::dispose).
//! - Records carry their schema version, save time, codec, length and a
//!   CRC32 of the bytes as stored, so schema checks, step-by-step
//!   migrations and TTL work on every backend. Compression (zstd, feature
//!   `zstd`, on by default) is applied to what is stored and round-trips
//!   any Unicode text.
//! - [`CacheEvent`]s and [`CacheStats`] report what happened.
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `zstd` | yes | [`Compression::Zstd`] |
//! | `fuzzing` | no | `fuzzing::decode`: the stored format's decoder, for `fuzz/` |
#![doc(test(attr(deny(warnings))))]

mod cache;
mod error;
mod format;

/// The stored format, exposed for the fuzz targets (feature `fuzzing`).
/// Not a stable API.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// Decodes stored bytes: the schema version and the JSON they hold.
    ///
    /// # Errors
    ///
    /// What is wrong with them.
    pub fn decode(stored: &[u8]) -> Result<(u32, Vec<u8>), crate::Error> {
        crate::format::decode(stored).map(|(header, json)| (header.schema, json))
    }
}

pub use cache::{CacheBuilder, CacheEvent, CacheStats, CachingApplier, SnapshotCache};
pub use error::{Error, Result};
pub use format::Compression;
