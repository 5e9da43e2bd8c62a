//! [`ClientOptions`]: how a [`Client`](crate::Client) connects and behaves.

use std::time::Duration;

use state_sync::RetryPolicy;

use crate::protocol::Secret;

/// How a [`Client`](crate::Client) connects and behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// A name for the server's logs; also the default `sourceId` of writes.
    pub client_id: String,
    /// The access token, if the server requires one (never shown by
    /// `Debug`).
    pub token: Option<Secret>,
    /// Reconnect delays (default: 100 ms doubling to 5 s, with jitter,
    /// forever).
    pub reconnect: RetryPolicy,
    /// How long a request waits for its answer (default 10 s).
    pub request_timeout: Duration,
    /// How often to ping an idle connection (default 15 s). A connection
    /// that stays silent for two intervals is considered dead.
    pub ping_interval: Duration,
    /// Optionally, how often to ask the revision of every subscribed topic,
    /// to catch a subscription that went deaf (default: off).
    pub probe_interval: Option<Duration>,
    /// Largest frame sent or accepted (default 1 MiB, as the server).
    pub max_frame_bytes: usize,
    /// Whether to ask the server to carry small snapshots inside
    /// invalidations (default `true`): a replica then applies a new
    /// revision without a fetch round trip. Larger snapshots, and every
    /// refresh after a reconnect, are still fetched.
    pub inline_snapshots: bool,
    /// With `inline_snapshots`: whether an invalidation may carry the new
    /// snapshot as a change to the last one this connection was sent
    /// (default `true`). A large document of which little changes per
    /// write then costs the change, not the document. The revision gate is
    /// unchanged; a delta whose base this client does not hold is a plain
    /// invalidation, and the snapshot is fetched.
    pub delta_snapshots: bool,
}

impl ClientOptions {
    /// Defaults, with `client_id`.
    pub fn new(client_id: impl Into<String>) -> Self {
        ClientOptions {
            client_id: client_id.into(),
            token: None,
            reconnect: RetryPolicy::default()
                .max_attempts(u32::MAX)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(5))
                .jitter(true),
            request_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            probe_interval: None,
            max_frame_bytes: 1 << 20,
            inline_snapshots: true,
            delta_snapshots: true,
        }
    }

    /// Sets the access token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret::new(token));
        self
    }

    /// Sets the reconnect policy.
    #[must_use]
    pub fn reconnect(mut self, policy: RetryPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// How long a request may take, waiting for the connection included: a
    /// request made while the client (re)connects waits for it, then fails
    /// with [`Error::Timeout`](crate::Error::Timeout). A client that stopped retrying
    /// (refused, gave up) fails requests at once with
    /// [`Error::Disconnected`](crate::Error::Disconnected).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the ping interval.
    #[must_use]
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Turns on the periodic revision probe.
    #[must_use]
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = Some(interval);
        self
    }

    /// Sets whether invalidations should carry small snapshots.
    #[must_use]
    pub fn inline_snapshots(mut self, inline: bool) -> Self {
        self.inline_snapshots = inline;
        self
    }

    /// Sets whether inline snapshots may come as deltas.
    #[must_use]
    pub fn delta_snapshots(mut self, delta: bool) -> Self {
        self.delta_snapshots = delta;
        self
    }
}
