//! What a replica reports through the `metrics` facade (feature `metrics`;
//! without it this is empty), labelled by topic. The counters are
//! registered once per handle, so reporting costs an atomic add. Names in
//! `docs/OPERATING.md`.

use crate::{Phase, Topic};

/// One handle's counters.
#[derive(Debug)]
pub(crate) struct ReplicaMetrics {
    #[cfg(feature = "metrics")]
    topic: String,
    #[cfg(feature = "metrics")]
    applies: metrics::Counter,
    #[cfg(feature = "metrics")]
    fetches: metrics::Counter,
    #[cfg(feature = "metrics")]
    retries: metrics::Counter,
}

impl ReplicaMetrics {
    pub(crate) fn new(topic: &Topic) -> ReplicaMetrics {
        #[cfg(feature = "metrics")]
        {
            let topic = topic.as_str().to_owned();
            ReplicaMetrics {
                applies: metrics::counter!("statesync_replica_applies_total", "topic" => topic.clone()),
                fetches: metrics::counter!("statesync_replica_fetches_total", "topic" => topic.clone()),
                retries: metrics::counter!("statesync_replica_retries_total", "topic" => topic.clone()),
                topic,
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = topic;
            ReplicaMetrics {}
        }
    }

    /// A snapshot was applied.
    pub(crate) fn applied(&self) {
        #[cfg(feature = "metrics")]
        self.applies.increment(1);
    }

    /// The provider was asked for a snapshot (every attempt counts).
    pub(crate) fn fetched(&self) {
        #[cfg(feature = "metrics")]
        self.fetches.increment(1);
    }

    /// A failure was reported in `phase`; `retry` when another attempt
    /// follows. Rare: registered on the spot.
    pub(crate) fn failed(&self, phase: Phase, retry: bool) {
        #[cfg(feature = "metrics")]
        {
            metrics::counter!(
                "statesync_replica_errors_total",
                "topic" => self.topic.clone(),
                "phase" => phase.as_str()
            )
            .increment(1);
            if retry {
                self.retries.increment(1);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (phase, retry);
    }
}
