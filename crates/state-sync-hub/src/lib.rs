//! The source of truth for state-sync.
//!
//! A [`Hub`] holds many topics. Each topic has a typed value (any `serde`
//! type, or raw JSON), atomic [`update`](HubTopic::update)s,
//! [`replace`](HubTopic::replace) and
//! [`compare_and_set`](HubTopic::compare_and_set); every commit makes the
//! revision exactly one larger, is stored, and sends one invalidation to
//! every subscriber. Each revision is encoded to JSON once and that
//! encoding is shared by every reader ([`Snapshot::json`],
//! [`Hub::get_json`]).
//!
//! A [`HubTopic`] is the [`Subscriber`](state_sync::Subscriber) and
//! [`Provider`](state_sync::Provider) of in-process replicas, with
//! conditional fetch; the transports serve the same hub to other processes.
//!
//! Storage is pluggable ([`state_sync_storage`]); the crash-safe
//! [`FileStorage`](state_sync_storage::FileStorage) is the embedded default
//! of the command-line hub. How revisions stay monotonic across restarts,
//! with or without stored state, is described on [`Hub`].
//!
//! Several hubs on one *shared* storage (Redis, PostgreSQL: the
//! `state-sync-redis` and `state-sync-postgres` crates) behave as one
//! source of truth: commits are compare-and-sets in the storage, and each
//! hub follows the others' commits; see [`HubBuilder::build`].
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `testkit` | no | the `testkit` module: scenarios every shared storage must pass with several hubs on it |
#![doc(test(attr(deny(warnings))))]

mod error;
mod hub;
mod metrics;
mod shared_topic;
#[cfg(feature = "testkit")]
pub mod testkit;
mod topic;

pub use error::{Error, Result};
pub use hub::{Hub, HubBuilder};
pub use shared_topic::SharedTopic;
pub use topic::{HubTopic, JsonSnapshot, Snapshot, TopicValue};

/// The README's Rust examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
