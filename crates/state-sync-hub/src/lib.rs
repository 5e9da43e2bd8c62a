//! The source of truth for state-sync: where committed `(revision, data)`
//! records live.
//!
//! This crate currently provides the storage layer: the [`Storage`] trait,
//! [`MemoryStorage`], the crash-safe [`FileStorage`] (the embedded default),
//! and a conformance suite every backend must pass (feature
//! `conformance`).
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `conformance` | no | [`conformance`]: the shared test suite for [`Storage`] backends |
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod file;
mod memory;
mod storage;

pub use error::{Error, Result};
pub use file::{Durability, FileStorage};
pub use memory::MemoryStorage;
pub use storage::{Record, Storage};
