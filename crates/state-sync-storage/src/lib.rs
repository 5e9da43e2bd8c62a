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
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `conformance` | no | the `conformance` module: the shared test suite for [`Storage`] backends |
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod file;
mod memory;
mod platform;
mod storage;

pub use error::{Error, Result};
pub use file::{Durability, FileStorage};
pub use memory::MemoryStorage;
pub use storage::{AnyStorage, Record, Storage};
