//! The time beat reads and waits on: the system's ([`SystemClock`]), or one a test moves by hand
//! ([`ManualClock`]), so the loop itself can be driven across a daylight-saving change or a clock
//! jump in milliseconds instead of waiting for them.
//!
//! A clock has two faces, as a computer's has: the wall clock ([`Clock::now`]), which the
//! schedule is read against and which can jump (an administrator, an NTP step), and a monotonic
//! clock ([`Clock::monotonic`], [`Clock::sleep`]), which never jumps and which the loop waits on.
//! The loop's lease term is counted on the real monotonic clock whatever the [`Clock`], because
//! the broker counts it in real time too.
//!
//! ```
//! use celeriac_beat::clock::{Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new("2026-03-29T00:00:00Z".parse().unwrap());
//! clock.advance(Duration::from_secs(60)); // both faces move
//! clock.set_wall("2026-03-28T00:00:00Z".parse().unwrap()); // the wall clock jumps back
//! assert_eq!(clock.monotonic(), Duration::from_secs(60));
//! ```

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// The time beat reads: the system clock, or a test's.
pub trait Clock: Send + Sync + 'static {
    /// The wall clock: what the schedule is read against.
    fn now(&self) -> DateTime<Utc>;

    /// Time elapsed since a fixed origin on a clock that never jumps.
    fn monotonic(&self) -> Duration;

    /// Wait until `d` of [`monotonic`](Self::monotonic) time has passed. Dropping the future
    /// cancels the wait.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
}

/// The system clock: `Utc::now`, and tokio's monotonic timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told: [`advance`](Self::advance) moves both faces (time
/// passing), [`set_wall`](Self::set_wall) moves the wall clock alone (a jump). Sleepers wake when
/// the monotonic face reaches their deadline; [`sleeping`](Self::sleeping) tells a test when the
/// code under test has finished its turn and is waiting, and for how long.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every change (time moved, a sleep started or ended).
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    wall: DateTime<Utc>,
    mono: Duration,
    /// Pending sleeps: (id, deadline on the monotonic face).
    sleepers: Vec<(u64, Duration)>,
    /// Sleeps started so far (also the next sleep's id).
    started: u64,
}

/// What a [`ManualClock`]'s sleepers are doing, as seen by [`ManualClock::sleeping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sleeping {
    /// Sleeps started so far: pass it back to wait for the next one.
    pub started: u64,
    /// Monotonic time until the earliest pending sleep ends.
    pub wakes_in: Duration,
}

impl ManualClock {
    /// A clock whose wall face reads `start` and whose monotonic face reads zero.
    pub fn new(start: DateTime<Utc>) -> Self {
        let state = State { wall: start, mono: Duration::ZERO, sleepers: Vec::new(), started: 0 };
        ManualClock { inner: Arc::new(Shared { state: Mutex::new(state), changed: watch::channel(0).0 }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// Let `d` pass: both faces move, and the sleeps it ends wake.
    pub fn advance(&self, d: Duration) {
        {
            let mut s = self.state();
            s.mono += d;
            s.wall += chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        }
        self.bump();
    }

    /// Set the wall clock to `t` (a jump forward or back); the monotonic face does not move.
    pub fn set_wall(&self, t: DateTime<Utc>) {
        self.state().wall = t;
        self.bump();
    }

    /// Wait until a sleep later than the `after`-th is pending (pass 0 at first, then the
    /// `started` returned), for at most `limit` of real time; `None` if none came.
    pub async fn sleeping(&self, after: u64, limit: Duration) -> Option<Sleeping> {
        let mut rx = self.inner.changed.subscribe();
        let look = || {
            let s = self.state();
            let earliest = s.sleepers.iter().map(|(_, d)| *d).min()?;
            (s.started > after).then(|| Sleeping { started: s.started, wakes_in: earliest.saturating_sub(s.mono) })
        };
        tokio::time::timeout(limit, async {
            loop {
                if let Some(found) = look() {
                    return found;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .ok()
    }
}

/// Removes a sleep from the pending ones when it ends or is dropped.
struct Registered {
    clock: ManualClock,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clock.state().sleepers.retain(|(id, _)| *id != self.id);
        self.clock.bump();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.state().wall
    }

    fn monotonic(&self) -> Duration {
        self.state().mono
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        let clock = self.clone();
        let mut rx = self.inner.changed.subscribe();
        let (id, deadline) = {
            let mut s = self.state();
            let (id, deadline) = (s.started, s.mono + d);
            s.started += 1;
            s.sleepers.push((id, deadline));
            (id, deadline)
        };
        self.bump();
        // Made here, not in the future, so that a future dropped unpolled still unregisters.
        let registered = Registered { clock: clock.clone(), id };
        Box::pin(async move {
            let _registered = registered;
            while clock.monotonic() < deadline {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sleep_ends_when_the_monotonic_face_reaches_it_not_on_a_wall_jump() {
        let clock = ManualClock::new("2026-01-01T00:00:00Z".parse().unwrap());
        let mut sleep = clock.sleep(Duration::from_secs(10));
        let seen = clock.sleeping(0, Duration::from_secs(5)).await.expect("a sleeper");
        assert_eq!(seen, Sleeping { started: 1, wakes_in: Duration::from_secs(10) });
        clock.set_wall("2027-01-01T00:00:00Z".parse().unwrap());
        clock.advance(Duration::from_secs(9));
        let early = tokio::time::timeout(Duration::from_millis(50), &mut sleep).await;
        assert!(early.is_err(), "woke before its deadline");
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), sleep).await.expect("woke at its deadline");
        assert_eq!(clock.now(), "2027-01-01T00:00:10Z".parse::<DateTime<Utc>>().unwrap());
        assert!(clock.state().sleepers.is_empty());
        // A dropped sleep is no longer pending.
        drop(clock.sleep(Duration::from_secs(1)));
        assert!(clock.state().sleepers.is_empty());
        assert!(clock.sleeping(1, Duration::from_millis(20)).await.is_none());
    }
}
