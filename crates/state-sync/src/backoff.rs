//! Exponential backoff: [`RetryPolicy`] (how the engine retries a failed
//! fetch) and [`Backoff`] (the reusable delay sequence, also used for
//! reconnects by the transports).

use std::time::Duration;

/// How the engine retries a failed fetch.
///
/// The first attempt runs at once; attempt `n + 1` waits
/// `min(initial_delay × multiplierⁿ⁻¹, max_delay)`, optionally jittered.
/// Defaults: 3 attempts, 500 ms, ×2, capped at 10 s, no jitter.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use state_sync::RetryPolicy;
///
/// let policy = RetryPolicy::default().max_attempts(5).jitter(true);
/// assert_eq!(policy.delay_for_retry(1), Duration::from_millis(500)); // jitter not applied here
/// assert_eq!(RetryPolicy::default().delay_for_retry(2), Duration::from_secs(1));
/// assert_eq!(RetryPolicy::default().delay_for_retry(10), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    multiplier: f64,
    max_delay: Duration,
    jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(500),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: false,
        }
    }
}

impl RetryPolicy {
    /// No retries: one attempt.
    #[must_use]
    pub fn none() -> Self {
        RetryPolicy::default().max_attempts(1)
    }

    /// Total attempts including the first (at least 1). `u32::MAX` retries
    /// for ever.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Delay before the first retry.
    #[must_use]
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Growth factor between retries (at least 1).
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// Upper bound of any delay.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// "Equal jitter": each delay is drawn uniformly from `[d/2, d]`, so
    /// clients that failed together do not retry together.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Total attempts including the first.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether delays are jittered.
    #[must_use]
    pub fn has_jitter(&self) -> bool {
        self.jitter
    }

    /// The un-jittered delay before retry number `retry` (1-based).
    #[must_use]
    pub fn delay_for_retry(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(1024) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.powi(exp);
        let capped = secs.min(self.max_delay.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_delay)
    }

    /// A fresh delay sequence for this policy.
    #[must_use]
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.clone())
    }
}

/// A sequence of retry delays following a [`RetryPolicy`]; [`Backoff::reset`]
/// after a success starts it over.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use state_sync::{Backoff, RetryPolicy};
///
/// let mut backoff: Backoff = RetryPolicy::default().backoff();
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(500)));
/// assert_eq!(backoff.next_delay(), Some(Duration::from_secs(1)));
/// assert_eq!(backoff.next_delay(), None); // 3 attempts used
/// backoff.reset();
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(500)));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    retries: u32,
    /// Seeded on first use: most backoffs never retry.
    rng: Option<fastrand::Rng>,
}

impl Backoff {
    /// Starts a sequence.
    #[must_use]
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            retries: 0,
            rng: None,
        }
    }

    /// Uses a seeded random source for jitter, for reproducible tests.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = Some(fastrand::Rng::with_seed(seed));
        self
    }

    /// The delay before the next retry, or `None` when the attempts are used
    /// up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.retries.saturating_add(1) >= self.policy.max_attempts {
            return None;
        }
        self.retries += 1;
        let delay = self.policy.delay_for_retry(self.retries);
        Some(if self.policy.jitter {
            let half = delay / 2;
            let rng = self.rng.get_or_insert_with(fastrand::Rng::new);
            half + half.mul_f64(rng.f64())
        } else {
            delay
        })
    }

    /// Retries scheduled so far.
    #[must_use]
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Starts over, after a success.
    pub fn reset(&mut self) {
        self.retries = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_and_cap() {
        let p = RetryPolicy::default().max_attempts(u32::MAX);
        let mut b = p.backoff();
        let delays: Vec<_> = (0..7).map(|_| b.next_delay().unwrap()).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
    }

    #[test]
    fn jitter_stays_within_half_to_full_delay() {
        let mut b = RetryPolicy::default()
            .max_attempts(u32::MAX)
            .jitter(true)
            .backoff()
            .with_seed(7);
        for retry in 1..50 {
            let d = b.next_delay().unwrap();
            let full = RetryPolicy::default().delay_for_retry(retry);
            assert!(d >= full / 2 && d <= full, "{d:?} vs {full:?}");
        }
    }

    #[test]
    fn one_attempt_means_no_retry() {
        assert_eq!(RetryPolicy::none().backoff().next_delay(), None);
    }
}
