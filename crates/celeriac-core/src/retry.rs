//! Retry delays: Celery's exponential backoff with full jitter for task retries, and the
//! publish retry policy ([`PublishPolicy`]) for a client whose broker does not answer.
//!
//! With `retry_backoff = f` the n-th retry (n counted from 0) waits `min(max, f * 2^n)` seconds;
//! with jitter the wait is drawn uniformly from `[0, that]` so retrying tasks spread out instead of
//! stampeding. Without backoff a retry waits the task's `default_retry_delay`.

use std::time::Duration;

use rand::Rng;

/// How long to wait before a retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Exponential factor in seconds; `None` for a fixed delay.
    pub factor: Option<f64>,
    /// The largest delay, in seconds.
    pub max: f64,
    /// Draw the delay uniformly from `[0, computed]`.
    pub jitter: bool,
    /// The delay when there is no exponential factor, in seconds.
    pub default_delay: f64,
}

impl Default for Backoff {
    /// Celery's defaults: no exponential backoff, 180 s between retries, backoff capped at 600 s,
    /// jitter on.
    fn default() -> Self {
        Backoff { factor: None, max: 600.0, jitter: true, default_delay: 180.0 }
    }
}

impl Backoff {
    /// The upper bound of the delay before retry number `retries` (0 for the first retry).
    pub fn ceiling(&self, retries: u32) -> f64 {
        match self.factor {
            Some(f) => (f * 2f64.powi(retries.min(62) as i32)).min(self.max).max(0.0),
            None => self.default_delay.max(0.0),
        }
    }

    /// The delay before retry number `retries`, jittered when asked (fixed delays never are).
    pub fn delay(&self, retries: u32) -> Duration {
        let ceiling = self.ceiling(retries);
        let secs = if self.jitter && self.factor.is_some() && ceiling > 0.0 {
            rand::rng().random_range(0.0..=ceiling)
        } else {
            ceiling
        };
        Duration::from_secs_f64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_ceiling_doubles_and_caps() {
        let b = Backoff { factor: Some(1.0), max: 5.0, jitter: false, default_delay: 180.0 };
        let got: Vec<f64> = (0..5).map(|n| b.ceiling(n)).collect();
        assert_eq!(got, vec![1.0, 2.0, 4.0, 5.0, 5.0]);
        assert_eq!(b.delay(1), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_the_ceiling() {
        let b = Backoff { factor: Some(0.5), max: 600.0, jitter: true, default_delay: 0.0 };
        for n in 0..8 {
            for _ in 0..50 {
                assert!(b.delay(n).as_secs_f64() <= b.ceiling(n) + 1e-9);
            }
        }
    }

    #[test]
    fn fixed_delay_without_factor() {
        let b = Backoff { default_delay: 3.0, ..Backoff::default() };
        assert_eq!(b.delay(7), Duration::from_secs(3));
    }
}

/// How a client retries a publish the broker did not take: Celery's `retry_policy` (kombu's
/// `ensure` keys `max_retries`, `interval_start`, `interval_step`, `interval_max`, `timeout`).
///
/// Attempt 1 is made at once; retry `n` (from 0) waits `min(interval_start + n * interval_step,
/// interval_max)` first. At most `1 + max_retries` attempts are made, and none starts once
/// `timeout` has passed since the first; no wait is begun that would end past it. Each attempt
/// is cut at what is left of `timeout` (its connect and confirm waits included), so a publish
/// gives up within `timeout` (default 5 s) whatever the broker does: a listener that accepts TCP
/// and never speaks costs one connect timeout and what is left, not `1 + max_retries` of them
/// (16.6 s on RabbitMQ and 20.6 s on Redis without it; Celery's AMQP client gives up in about
/// 4 s). A refused connection fails at once and is retried as Celery does, well within it. With
/// `timeout: None` the bound is `(1 + max_retries)` attempt bounds plus the intervals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PublishPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Wait before the first retry.
    pub interval_start: Duration,
    /// Added to the wait for each further retry.
    pub interval_step: Duration,
    /// The longest wait between attempts.
    pub interval_max: Duration,
    /// Give up once this much time has passed since the first attempt (Celery's `timeout` key;
    /// default [`DEFAULT_PUBLISH_TIMEOUT`]).
    pub timeout: Option<Duration>,
}

/// The default total deadline of a publish, retries included.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for PublishPolicy {
    /// Celery's defaults: 3 retries, waits of 0, 0.2 and 0.4 s (step 0.2 s, at most 1 s); and a
    /// total deadline of 5 s.
    fn default() -> Self {
        PublishPolicy {
            max_retries: 3,
            interval_start: Duration::ZERO,
            interval_step: Duration::from_millis(200),
            interval_max: Duration::from_secs(1),
            timeout: Some(DEFAULT_PUBLISH_TIMEOUT),
        }
    }
}

impl PublishPolicy {
    /// No retries at all.
    pub fn no_retry() -> Self {
        PublishPolicy { max_retries: 0, ..PublishPolicy::default() }
    }

    /// The wait before retry number `retry` (0 for the first retry).
    pub fn interval(&self, retry: u32) -> Duration {
        (self.interval_start + self.interval_step * retry).min(self.interval_max)
    }

    /// The sum of every wait between attempts.
    pub fn total_interval(&self) -> Duration {
        (0..self.max_retries).map(|n| self.interval(n)).sum()
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn celery_defaults_wait_0_then_200_then_400_ms() {
        let p = PublishPolicy::default();
        assert_eq!((0..3).map(|n| p.interval(n).as_millis()).collect::<Vec<_>>(), vec![0, 200, 400]);
        assert_eq!(p.total_interval(), Duration::from_millis(600));
        let capped = PublishPolicy { interval_max: Duration::from_millis(300), ..p };
        assert_eq!(capped.interval(5), Duration::from_millis(300));
    }
}
