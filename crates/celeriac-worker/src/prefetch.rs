//! Adaptive prefetch: a window wide enough for short tasks, and no wider than Celery's for long
//! ones.
//!
//! Celery reserves `concurrency x prefetch_multiplier` messages. For long tasks that is the right
//! size (a wider window hoards work other workers could do); for short ones it is far too small:
//! with 8 messages in flight, the worker spends its time waiting for the broker to send the next
//! ones after each acknowledgement, and RabbitMQ drains at a fraction of what it can.
//!
//! So the window starts at Celery's size (the *base*) and follows the completion rate: every
//! [`TICK`] it is set to what the worker completes in [`HORIZON`] at the rate just measured,
//! never below the base and never above the configured maximum. Long tasks keep it at the base;
//! a queue of no-ops widens it within a few ticks. Reserved work is therefore bounded in time
//! (about `HORIZON` of it beyond the base), which is what the multiplier is for in the first
//! place. A change is applied only when it moves the window by more than a quarter.
//!
//! The base follows the pool when remote control grows or shrinks it ([`AdaptivePrefetch::set_base`]),
//! as Celery's window follows its pool.

use std::time::{Duration, Instant};

/// How often the window is reconsidered.
pub const TICK: Duration = Duration::from_millis(100);
/// How much work, at the current completion rate, the window may hold.
pub const HORIZON: Duration = Duration::from_millis(100);
/// How much the window may grow in one tick.
const GROWTH: usize = 4;

/// Tracks completions and proposes prefetch changes.
#[derive(Debug)]
pub struct AdaptivePrefetch {
    base: usize,
    /// The configured maximum (the window never goes below the base, whatever this says).
    max: usize,
    current: usize,
    completed: u64,
    since: Instant,
}

impl AdaptivePrefetch {
    /// A window starting at `base`, allowed to grow up to `max` (no adaptation when `max <= base`).
    pub fn new(base: usize, max: usize, now: Instant) -> Self {
        AdaptivePrefetch { base: base.max(1), max, current: base.max(1), completed: 0, since: now }
    }

    /// Whether the window can change at all.
    pub fn enabled(&self) -> bool {
        self.max > self.base
    }

    /// The pool was resized: Celery's window for the new concurrency, applied at the next tick
    /// (at once, not by growth steps).
    pub fn set_base(&mut self, base: usize) {
        self.base = base.max(1);
    }

    /// The window now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// One more task finished.
    pub fn completed(&mut self) {
        self.completed += 1;
    }

    /// At a tick: the new window, if it should change.
    pub fn tick(&mut self, now: Instant) -> Option<usize> {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        if elapsed <= 0.0 {
            return None;
        }
        let rate = self.completed as f64 / elapsed;
        tracing::trace!(completed = self.completed, elapsed, rate, "prefetch tick");
        (self.completed, self.since) = (0, now);
        let wanted = (rate * HORIZON.as_secs_f64()).ceil() as usize;
        let max = self.max.max(self.base);
        let next = wanted.clamp(self.base, max).min(self.current.saturating_mul(GROWTH)).max(self.base);
        let moved = next.abs_diff(self.current);
        let base_moved = self.current < self.base || (!self.enabled() && next != self.current);
        if moved == 0 || (moved * 4 <= self.current && !base_moved) {
            return None;
        }
        self.current = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &mut AdaptivePrefetch, t: &mut Instant, per_tick: u64) -> Option<usize> {
        for _ in 0..per_tick {
            p.completed();
        }
        *t += TICK;
        p.tick(*t)
    }

    #[test]
    fn short_tasks_widen_the_window_up_to_the_maximum() {
        let mut t = Instant::now();
        let mut p = AdaptivePrefetch::new(8, 1000, t);
        // 700 completions per 100 ms = 7,000/s: 700 wanted, growing at most 4x a tick.
        assert_eq!(run(&mut p, &mut t, 700), Some(32));
        assert_eq!(run(&mut p, &mut t, 700), Some(128));
        assert_eq!(run(&mut p, &mut t, 700), Some(512));
        assert_eq!(run(&mut p, &mut t, 700), Some(700));
        assert_eq!(run(&mut p, &mut t, 5000), Some(1000));
        assert_eq!(run(&mut p, &mut t, 5000), None);
    }

    #[test]
    fn long_tasks_and_idle_keep_or_bring_it_back_to_the_base() {
        let mut t = Instant::now();
        let mut p = AdaptivePrefetch::new(8, 1000, t);
        // Two 1-second tasks at a time: 2 completions per second.
        for i in 0..20 {
            assert_eq!(run(&mut p, &mut t, u64::from(i % 5 == 0)), None);
        }
        assert_eq!(p.current(), 8);
        for _ in 0..3 {
            run(&mut p, &mut t, 2000);
        }
        assert!(p.current() > 100);
        assert_eq!(run(&mut p, &mut t, 0), Some(8), "idle: back to the base at once");
    }

    #[test]
    fn a_resized_pool_moves_the_base_at_once() {
        let mut t = Instant::now();
        // Fixed at Celery's window (no maximum above it), as with --max-prefetch 0.
        let mut p = AdaptivePrefetch::new(8, 0, t);
        p.set_base(12);
        assert_eq!(run(&mut p, &mut t, 0), Some(12), "grown by one slot: 3 x 4");
        p.set_base(4);
        assert_eq!(run(&mut p, &mut t, 0), Some(4), "shrunk to one slot");
        // Adaptive: a bigger pool raises the floor even while idle.
        let mut p = AdaptivePrefetch::new(8, 1000, t);
        p.set_base(40);
        assert_eq!(run(&mut p, &mut t, 0), Some(40));
    }

    #[test]
    fn small_moves_are_ignored_and_a_maximum_at_the_base_disables_it() {
        let mut t = Instant::now();
        let mut p = AdaptivePrefetch::new(100, 1000, t);
        assert_eq!(run(&mut p, &mut t, 110), None, "110 wanted: within a quarter of 100");
        let mut fixed = AdaptivePrefetch::new(8, 8, t);
        assert!(!fixed.enabled());
        assert_eq!(run(&mut fixed, &mut t, 10_000), None);
    }
}
