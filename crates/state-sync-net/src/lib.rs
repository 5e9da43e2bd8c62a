//! state-sync between processes and machines.
//!
//! - A versioned JSON [`protocol`] (see `docs/PROTOCOL.md`):
//!   length-delimited frames over Unix sockets and named local sockets
//!   (Windows named pipes), text frames over WebSocket; many topics over
//!   one connection; every error with a stable [`ErrorCode`].
//! - [`Server`] serves a [`Hub`](state_sync_hub::Hub): tokens compared in
//!   constant time, per-topic read/write permissions ([`AccessConfig`]),
//!   frame and snapshot size limits, idle timeout, at most one pending
//!   invalidation per topic and connection, graceful shutdown. Small
//!   snapshots ride inside invalidations, saving each replica a fetch.
//! - [`Client`] is one reconnecting connection per process and hub; each
//!   [`RemoteTopic`] is the [`Subscriber`](state_sync::Subscriber) and
//!   [`Provider`](state_sync::Provider) of an engine handle, with
//!   conditional fetch, resubscribe-and-refresh after a reconnect, and an
//!   optional revision probe.
#![doc(test(attr(deny(warnings))))]

mod access;
mod client;
mod client_options;
mod connection;
mod endpoint;
mod error;
mod frames;
mod metrics;
mod platform;
pub mod protocol;
mod remote_topic;
mod server;

pub use access::{AccessConfig, AccessConfigError, ClientAccess, Grant};
pub use client::{Client, ClientOptions, ConnectionStatus, Endpoint};
pub use error::{Error, Result};
pub use protocol::{ErrorCode, HubStatus, PROTOCOL_VERSION, Secret, TopicStatus};
pub use remote_topic::RemoteTopic;
pub use server::{ProcessStats, Server, ServerConfig, ServerStats};

/// A map keyed by topic, for the maps every frame looks up (a connection's
/// outbox, a client's subscriptions). SipHash costs more than the rest of
/// such a lookup; foldhash is randomly seeded per process, and these maps
/// only hold topics one connection subscribed to, within its limit.
pub(crate) type TopicMap<V> = foldhash::HashMap<state_sync::Topic, V>;
