//! What the hub reports through the `metrics` facade (feature `metrics`;
//! without it these functions are empty). Names in `docs/OPERATING.md`.

use std::time::Duration;

/// A commit to the storage finished after `elapsed`: `committed`,
/// `conflict` (another hub committed first) or `error`.
pub(crate) fn store_done(outcome: &'static str, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::histogram!("statesync_store_commit_duration_seconds")
            .record(elapsed.as_secs_f64());
        match outcome {
            "error" => metrics::counter!("statesync_store_errors_total").increment(1),
            "conflict" => metrics::counter!("statesync_store_conflicts_total").increment(1),
            _ => metrics::counter!("statesync_store_commits_total").increment(1),
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome, elapsed);
}
