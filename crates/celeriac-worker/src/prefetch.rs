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
//!
//! Two rules keep the window from hoarding or starving (see ARCHITECTURE.md, "The window and the
//! acknowledgements"):
//! - **An ETA task held takes no place in the window.** A delivery waiting for its ETA (or its
//!   turn under a rate limit) stays unacknowledged for as long as it waits, so each one held adds
//!   one to the window the transport is given ([`wanted`]), as Celery raises its QoS for each ETA
//!   task it holds. Ready tasks keep the whole window whatever number of ETA tasks are held.
//! - **A ready task that cannot start soon goes back.** When every slot is busy and no task has
//!   started from the ready reserve for twice the typical run time, at least [`GIVE_BACK_AFTER`]
//!   ([`Reserve`], [`give_back_after`]), the window shrinks to
//!   the tasks running (plus those held) and the reserve is given back to the broker unstarted
//!   (`Delivery::release`), where a worker with a free slot takes it. The window comes back when
//!   a slot frees. So a quick task never waits behind a long one on a busy worker while another
//!   worker has a free slot, and a burst that widened the window leaves nothing stranded behind
//!   a long task.

use std::time::{Duration, Instant};

/// How often the window is reconsidered.
pub const TICK: Duration = Duration::from_millis(100);
/// How much work, at the current completion rate, the window may hold.
pub const HORIZON: Duration = Duration::from_millis(100);
/// How much the window may grow in one tick.
const GROWTH: usize = 4;
/// The least time the ready reserve waits, every slot busy and no task started from it, before it
/// is given back to the broker for other workers: long next to the gap between two quick tasks on
/// a busy worker, short next to a task worth moving elsewhere. With slower tasks the wait is
/// longer ([`give_back_after`]).
pub const GIVE_BACK_AFTER: Duration = Duration::from_millis(100);
/// How often the worker checks whether its reserve should be given back, while it has one.
pub const GIVE_BACK_CHECK: Duration = Duration::from_millis(20);
/// How many recent run times [`RecentRuntimes`] keeps.
const RECENT: usize = 32;

/// How long the reserve may wait for a slot before it goes back: twice the typical run time of
/// the worker's recent tasks, and at least [`GIVE_BACK_AFTER`]. A worker whose tasks all take
/// 200 ms is not stuck when nothing starts for 150 ms, and keeps Celery's window; one that runs
/// millisecond tasks is stuck after 100 ms. The typical time is a median, so a few long tasks
/// among many quick ones (the case this is for) do not move it. Before any task has finished
/// there is no measure of "soon": `None`, the reserve stays, as in Celery (`inspect reserved`
/// lists it).
pub fn give_back_after(typical: Option<Duration>) -> Option<Duration> {
    typical.map(|t| (t * 2).max(GIVE_BACK_AFTER))
}

/// The run times of the worker's last tasks, for [`give_back_after`].
#[derive(Debug, Default)]
pub struct RecentRuntimes {
    ring: Vec<Duration>,
    next: usize,
}

impl RecentRuntimes {
    /// One more task ran for `d`.
    pub fn record(&mut self, d: Duration) {
        if self.ring.len() < RECENT {
            self.ring.push(d);
        } else {
            self.ring[self.next] = d;
        }
        self.next = (self.next + 1) % RECENT;
    }

    /// The median of the recent run times; `None` before the first task.
    pub fn typical(&self) -> Option<Duration> {
        let mut sorted = self.ring.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied()
    }
}

/// The window to give the transport: the adaptive window, or only the tasks running while the
/// reserve is given back (`blocked`), plus one place per delivery held for an ETA or a rate limit.
/// At least 1 (a prefetch of 0 means "unlimited" to RabbitMQ).
pub fn wanted(adaptive: usize, running: usize, held: usize, blocked: bool) -> usize {
    let own = if blocked { running } else { adaptive };
    own.saturating_add(held).max(1)
}

/// When the ready reserve stops moving: the state behind [`GIVE_BACK_AFTER`].
#[derive(Debug, Default)]
pub struct Reserve {
    /// Since when ready requests have waited with no task started from them.
    stalled_since: Option<Instant>,
    /// The reserve was given back and the window is shrunk to the tasks running.
    blocked: bool,
}

impl Reserve {
    /// A ready request was queued behind busy slots.
    pub fn queued(&mut self, now: Instant) {
        self.stalled_since.get_or_insert(now);
    }

    /// A task started from the reserve; `more` says whether others still wait.
    pub fn started(&mut self, now: Instant, more: bool) {
        self.stalled_since = more.then_some(now);
        self.blocked = false;
    }

    /// A slot is free again: the window may widen.
    pub fn unblock(&mut self) -> bool {
        std::mem::take(&mut self.blocked)
    }

    /// Whether the window is shrunk to the tasks running.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Whether the reserve should be given back now: it has waited `after` (see
    /// [`give_back_after`]) with no free slot. Marks the reserve blocked when it says yes.
    pub fn give_back(&mut self, now: Instant, free_slots: usize, after: Duration) -> bool {
        let stalled = self.stalled_since.is_some_and(|t| now.saturating_duration_since(t) >= after) && free_slots == 0;
        if stalled {
            self.blocked = true;
            self.stalled_since = None;
        }
        stalled
    }
}

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
    fn held_eta_tasks_add_to_the_window_and_a_blocked_worker_keeps_only_its_running_tasks() {
        assert_eq!(wanted(8, 2, 0, false), 8);
        assert_eq!(wanted(8, 2, 3, false), 11, "three ETA tasks held: three more places");
        assert_eq!(wanted(500, 2, 3, true), 5, "blocked: the running tasks and the held ones");
        assert_eq!(wanted(0, 0, 0, true), 1, "never 0, which RabbitMQ reads as unlimited");
    }

    #[test]
    fn the_reserve_goes_back_only_after_every_slot_stayed_busy_long_enough() {
        let t0 = Instant::now();
        let after = GIVE_BACK_AFTER;
        let mut r = Reserve::default();
        assert!(!r.give_back(t0 + after * 10, 0, after), "nothing waits");
        r.queued(t0);
        assert!(!r.give_back(t0 + after / 2, 0, after), "not long enough");
        assert!(!r.give_back(t0 + after, 1, after), "a slot is free");
        // A task started from the reserve: the clock starts again.
        r.started(t0 + after / 2, true);
        assert!(!r.give_back(t0 + after, 0, after));
        assert!(r.give_back(t0 + after * 2, 0, after));
        assert!(r.blocked());
        assert!(!r.give_back(t0 + after * 3, 0, after), "given back once; nothing queued since");
        assert!(r.unblock());
        assert!(!r.blocked());
    }

    #[test]
    fn the_wait_before_giving_back_follows_the_typical_task_not_the_odd_long_one() {
        let mut recent = RecentRuntimes::default();
        assert_eq!(give_back_after(recent.typical()), None, "no task yet: nothing says what soon is");
        for _ in 0..30 {
            recent.record(Duration::from_millis(1));
        }
        recent.record(Duration::from_secs(8));
        recent.record(Duration::from_secs(8));
        assert_eq!(give_back_after(recent.typical()), Some(GIVE_BACK_AFTER), "quick tasks with two long ones");
        for _ in 0..32 {
            recent.record(Duration::from_millis(200));
        }
        assert_eq!(give_back_after(recent.typical()), Some(Duration::from_millis(400)), "200 ms tasks");
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
