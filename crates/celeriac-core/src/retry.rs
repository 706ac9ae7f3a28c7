//! Retry delays: Celery's exponential backoff with full jitter.
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
