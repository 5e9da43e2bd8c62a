//! Where state-sync keeps committed `(revision, data)` records: the hub's
//! source of truth and the replicas' client-side cache both store through
//! this crate.
//!
//! It provides the [`Storage`] trait, [`MemoryStorage`], the crash-safe
//! [`FileStorage`] (the embedded default), and a conformance suite every
//! backend must pass (feature `conformance`).
//!
//! # Durability
//!
//! [`FileStorage`] with [`Durability::Fsync`] (the default) makes every
//! record durable before `store` returns: the data reaches the disk even if
//! the machine loses power. [`Durability::NoFsync`] skips the `fsync` calls:
//! a crash of the process loses nothing, a power loss may lose the last
//! records (never corrupts them: a torn file fails its checksum and the
//! last good copy is used). The hub batches commits that arrive while a
//! store is in flight into one store (group commit); see `docs/BENCHMARKS.md`
//! for what each mode costs.
//!
//! # Files, modes and locking
//!
//! [`FileStorage`] keeps one file per topic, `t-<topic in hex>.ssr`, its
//! last good copy `….ssr.bak`, and `….ssr.tmp` while a store is in flight.
//! On Unix the directories it creates are `0700` and every file `0600`,
//! whatever the umask: only the user running the hub can read the data.
//! The directory is locked (`.lock`, holding the pid) while a process uses
//! it, so a second hub on the same store fails with
//! [`Error::Locked`] instead of overwriting records.
//!
//! # Recovery
//!
//! A record whose header, length or checksum is wrong is renamed aside to
//! `….corrupt-<unix ms>` (never overwritten or deleted) and reported as
//! [`Error::Corrupt`], with the revision its header
//! still names if it can be read; the next `load` returns the last good
//! copy. The hub then continues *above* every revision that may have been
//! issued and logs the loss as an error (`state_sync_hub::Hub::topic`).
//! When no good copy is left, `load` keeps answering `Corrupt` (the topic
//! is damaged, not silently new) until an operator restores a quarantined
//! file under its original name or deletes the topic's files.
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `conformance` | no | the `conformance` module: the shared test suite for [`Storage`] backends |
//! | `fuzzing` | no | the `fuzzing` module: the file record format's encoder and decoder, for `fuzz/` |
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod file;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod listener;
mod memory;
mod platform;
mod storage;

pub use error::{Error, Result};
pub use file::{Durability, FileStorage};
pub use listener::run_listener;
pub use memory::MemoryStorage;
pub use storage::{AnyStorage, Change, Record, Storage, Stored};
