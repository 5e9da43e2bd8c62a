//! Keep one logical piece of state consistent across windows, processes and
//! machines.
//!
//! A lightweight *invalidation* says "topic T is now at revision R"; each
//! replica *pulls* the canonical snapshot `{revision, data}` and *applies it
//! only if it is newer*. Events may be lost, duplicated, delayed or
//! reordered: the snapshot is always the truth and the revision gate applies
//! only what is newer, so replicas converge anyway.
//!
//! This crate holds the protocol types (wire-compatible with the JavaScript
//! `@statesync/*` packages), the three roles a replica is built from, the
//! engine, ready-made appliers, an in-memory source of truth and a test kit.
//!
//! | role | trait | examples |
//! |---|---|---|
//! | delivers invalidations | [`Subscriber`] | [`MemorySource`], network clients, Tauri events |
//! | both, for one topic it knows | [`Source`] | [`MemorySource`], `HubTopic`, `RemoteTopic`: what [`SyncHandle::builder`] takes |
//! | fetches snapshots | [`Provider`] | [`MemorySource`], network clients, Tauri commands |
//! | writes local state | [`Applier`] | closures, `watch::Sender`, `Arc<RwLock<T>>`, [`applier::JsonObjectApplier`] |
//!
//! # Usage
//!
//! ```
//! use state_sync::{applier, MemorySource, SnapshotEnvelope, SyncHandle, Topic};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = MemorySource::new(Topic::new("settings")?, serde_json::json!({"theme": "light"}));
//!
//! // The source is the subscriber and the provider, and knows its topic.
//! let handle = SyncHandle::builder(
//!     source.clone(),
//!     applier::from_fn(|s: SnapshotEnvelope<serde_json::Value>| {
//!         println!("revision {}: {}", s.revision, s.data);
//!         Ok::<_, std::convert::Infallible>(())
//!     }),
//! )
//! .on_error(|e| eprintln!("{e}"))
//! .build();
//!
//! handle.start().await?; // subscribes, then applies revision 0
//! let r = source.publish(serde_json::json!({"theme": "dark"}));
//! handle.wait_for_revision(r).await?;
//! handle.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `arc-swap` | no | an [`Applier`] for `Arc<arc_swap::ArcSwap<T>>` |
//! | `testkit` | no | the `testkit` module: a seeded lossy bus and a recording applier |
#![cfg_attr(docsrs, feature(doc_auto_cfg))]
#![doc(test(attr(deny(warnings))))]

pub mod applier;
mod backoff;
mod engine;
mod error;
mod memory;
mod metrics;
mod protocol;
mod provider;
mod revision;
mod subscriber;
#[cfg(feature = "testkit")]
pub mod testkit;
mod topic;

pub use applier::{AppliedNow, Applier};
pub use backoff::{Backoff, RetryPolicy};
pub use engine::{Status, SyncHandle, SyncHandleBuilder, Throttle};
pub use error::{BoxError, Error, ErrorChain, ErrorContext, Phase, Result, Stopped};
pub use memory::{MemorySource, RevisionNotNewer, UnknownTopic};
pub use protocol::{InvalidationEvent, ProtocolError, ProtocolErrorKind, SnapshotEnvelope};
pub use provider::{FetchError, FetchRequest, Fetched, Provider};
pub use revision::{ParseRevisionError, Revision};
pub use subscriber::{InvalidationSink, Source, Subscriber, Subscription};
pub use topic::{InvalidTopic, Topic, is_valid_topic};

/// Locks a mutex, recovering from poisoning: every critical section in this
/// crate leaves its data consistent, so a panic elsewhere cannot expose a
/// half-written value.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
