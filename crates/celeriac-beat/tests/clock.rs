//! The beat loop driven by a [`ManualClock`] on a real (SQLite file) broker: days pass in
//! milliseconds, and what the loop sent is read back from the queue.
//!
//! - Europe/Berlin's spring-forward day (2026-03-29, 02:00 CET → 03:00 CEST): a `30 2 * * *`
//!   entry runs once, at 03:00 CEST, the first valid time after the gap.
//! - Its fall-back day (2026-10-25, 03:00 CEST → 02:00 CET): the same entry runs once, at the
//!   first 02:30, not again at the second.
//! - A wall clock jumping forward an hour sends one run for the hour (`catch_up = "once"`), not
//!   3,600; one jumping back an hour neither repeats runs nor holds the schedule up for the hour.
//! - A tick longer than the lease term (24,000 runs due at once, a 400 ms lease) renews the lease
//!   as it sends: the whole tick goes out in one turn.
//!
//! The clock moves in steps of at most ten minutes and to each time the loop waits for, and only
//! once the loop waits again ([`ManualClock::sleeping`]), so each step is one turn of the loop.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use celeriac_beat::{Beat, BeatConfig, Clock, Event, ManualClock};
use celeriac_core::Broker;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

/// How long the loop may take to come back to waiting, in real time.
const TURN: Duration = Duration::from_secs(20);

/// The queue the entries send to.
const QUEUE: &str = "periodic";

/// An `[[entry]]` table named `name` sending `celeriac.noop` to [`QUEUE`] (`when`: its `every`
/// or `cron` line).
fn entry(name: &str, when: &str) -> String {
    format!("[[entry]]\nname = \"{name}\"\ntask = \"celeriac.noop\"\n{when}\nqueue = \"{QUEUE}\"\n")
}

fn utc(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// A beat on its own SQLite broker and a manual clock, and what it sent.
struct Driven {
    clock: ManualClock,
    broker: Arc<dyn Broker>,
    queue: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Sleeps of the loop seen so far.
    seen: u64,
    /// How long until the loop wakes.
    wakes_in: Duration,
    /// (wall clock when sent, scheduled time, task id).
    sent: Vec<(DateTime<Utc>, DateTime<Utc>, String)>,
    _dir: tempfile::TempDir,
}

impl Driven {
    /// Start a beat with one entry (`when` is its `every = ...` or `cron = ...` line) on a
    /// clock reading `start`; returns once the loop leads and waits.
    async fn start(timezone: &str, when: &str, start: DateTime<Utc>) -> Driven {
        let text = format!("timezone = \"{timezone}\"\n{}", entry("e", when));
        // A long lease: its renewals (in real time) do not wake the loop while the test runs.
        Driven::start_schedule(&text, start, Duration::from_secs(60)).await
    }

    /// Start a beat with the schedule `text` (entries on [`QUEUE`]) and `lease`.
    async fn start_schedule(text: &str, start: DateTime<Utc>, lease: Duration) -> Driven {
        let dir = tempfile::tempdir().unwrap();
        let broker: Arc<dyn Broker> =
            Arc::new(celeriac_sqlite::SqliteBroker::open(&format!("sqlite://{}/b.db", dir.path().display())).unwrap());
        let queue = QUEUE.to_string();
        let schedule = celeriac_beat::parse(text, "test.toml").unwrap();
        let clock = ManualClock::new(start);
        let config = BeatConfig { lease, ..BeatConfig::default() };
        let beat = Beat::new(schedule, broker.clone(), Arc::new(clock.clone()), config);
        let (stop, rx) = watch::channel(false);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move { beat.run(rx, Some(tx)).await.unwrap() });
        let mut driven = Driven {
            clock,
            broker,
            queue,
            stop,
            task,
            events,
            seen: 0,
            wakes_in: Duration::ZERO,
            sent: Vec::new(),
            _dir: dir,
        };
        driven.wakes_in = driven.wait_turn().await;
        driven
    }

    /// Wait until the loop waits again; collect what it sent meanwhile. Returns how long until
    /// it wakes.
    async fn wait_turn(&mut self) -> Duration {
        let sleeping = self.clock.sleeping(self.seen, TURN).await.expect("the loop to come back to waiting");
        self.seen = sleeping.started;
        while let Ok(e) = self.events.try_recv() {
            if let Event::Sent { scheduled, task_id, .. } = e {
                self.sent.push((self.clock.now(), scheduled, task_id));
            }
        }
        sleeping.wakes_in
    }

    /// Let `total` pass, in steps of at most `step` and to each time the loop waits for.
    async fn run_for(&mut self, total: Duration, step: Duration) {
        self.pass(total, step, true).await
    }

    /// Let `total` pass in steps of `step`, whatever the loop waits for (each step a downtime
    /// to it).
    async fn step_over(&mut self, total: Duration, step: Duration) {
        self.pass(total, step, false).await
    }

    async fn pass(&mut self, total: Duration, step: Duration, to_each_wake: bool) {
        let end = self.clock.monotonic() + total;
        while self.clock.monotonic() < end {
            let d = if to_each_wake { self.wakes_in.min(step) } else { step };
            let d = d.min(end - self.clock.monotonic());
            self.clock.advance(d);
            if d >= self.wakes_in {
                // The loop wakes: wait for its turn to end.
                self.wakes_in = self.wait_turn().await;
            } else {
                self.wakes_in -= d;
            }
        }
    }

    /// The scheduled times sent, in order.
    fn scheduled(&self) -> Vec<DateTime<Utc>> {
        self.sent.iter().map(|(_, s, _)| *s).collect()
    }

    /// Stop the beat and check the queue holds exactly what it reported sending, once each.
    async fn finish(self) -> Vec<(DateTime<Utc>, DateTime<Utc>, String)> {
        let _ = self.stop.send(true);
        tokio::time::timeout(TURN, self.task).await.expect("the beat to stop").unwrap();
        let ids: HashSet<&String> = self.sent.iter().map(|(_, _, id)| id).collect();
        assert_eq!(ids.len(), self.sent.len(), "a run sent twice: {:?}", self.sent);
        let mut consumer = self.broker.consume(std::slice::from_ref(&self.queue), 100).await.unwrap();
        let mut got = HashSet::new();
        while got.len() < ids.len() {
            let d = tokio::time::timeout(TURN, consumer.next()).await.expect("a message").unwrap();
            got.insert(d.message.task_id().unwrap().to_string());
            d.ack().await.unwrap();
        }
        assert!(tokio::time::timeout(Duration::from_millis(200), consumer.next()).await.is_err(), "more in the queue");
        assert_eq!(got, ids.into_iter().cloned().collect::<HashSet<_>>());
        self.sent
    }
}

/// Two days of a daily `30 2 * * *` entry in Europe/Berlin from `start`, in ten-minute steps:
/// the runs sent, each at its time.
async fn two_days_of_0230_berlin(start: &str) -> Vec<DateTime<Utc>> {
    let mut beat = Driven::start("Europe/Berlin", "cron = \"30 2 * * *\"", utc(start)).await;
    beat.run_for(Duration::from_secs(48 * 3600), Duration::from_secs(600)).await;
    let sent = beat.finish().await;
    assert!(sent.iter().all(|(at, scheduled, _)| at == scheduled), "each sent at its time: {sent:?}");
    sent.into_iter().map(|(_, scheduled, _)| scheduled).collect()
}

#[tokio::test]
async fn spring_forward_a_0230_entry_runs_once_at_0300_cest() {
    // 03:00 CEST on the day (02:30 does not exist), 02:30 CEST the day after.
    let runs = two_days_of_0230_berlin("2026-03-28T12:00:00Z").await;
    assert_eq!(runs, vec![utc("2026-03-29T01:00:00Z"), utc("2026-03-30T00:30:00Z")]);
}

#[tokio::test]
async fn fall_back_a_0230_entry_runs_once_not_twice() {
    // Through both 02:30s of the 25th (00:30 and 01:30 UTC): the first (CEST) only; 02:30 CET
    // the day after.
    let runs = two_days_of_0230_berlin("2026-10-24T12:00:00Z").await;
    assert_eq!(runs, vec![utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]);
}

#[tokio::test]
async fn a_wall_clock_jump_forward_or_back_neither_floods_nor_stalls() {
    let second = Duration::from_secs(1);
    let start = utc("2026-01-01T00:00:00.500Z");
    let mut beat = Driven::start("UTC", "every = \"1s\"", start).await;
    beat.run_for(5 * second, second).await;
    assert_eq!(beat.sent.len(), 5, "one run a second: {:?}", beat.sent);
    // An hour forward: one run for the hour (catch_up "once": the latest), then one a second.
    let wall = beat.clock.now();
    beat.clock.set_wall(wall + chrono::Duration::hours(1));
    beat.run_for(5 * second, second).await;
    let after_forward = &beat.sent[5..];
    assert_eq!(after_forward.len(), 5, "no flood after the jump forward: {after_forward:?}");
    assert_eq!(after_forward[0].1, utc("2026-01-01T01:00:06Z"), "the latest run of the hour: {after_forward:?}");
    // An hour back: the schedule goes on from where it was, at half pace (a run every two
    // seconds), none of the times already sent again.
    let wall = beat.clock.now();
    beat.clock.set_wall(wall - chrono::Duration::hours(1));
    beat.run_for(10 * second, second).await;
    let after_back = beat.scheduled()[10..].to_vec();
    assert_eq!(after_back.len(), 5, "not held up for the hour after the jump back: {:?}", beat.sent);
    let last_before = beat.sent[9].1;
    assert_eq!(after_back[0], last_before + chrono::Duration::seconds(1), "{after_back:?} after {last_before}");
    assert!(after_back.windows(2).all(|w| w[1] - w[0] == chrono::Duration::seconds(1)), "{after_back:?}");
    // Two hours and more later the wall clock has caught up: a run a second on it again.
    beat.step_over(130 * 60 * second, 10 * 60 * second).await;
    let sent = beat.sent.len();
    beat.run_for(3 * second, second).await;
    let last3 = beat.scheduled()[sent..].to_vec();
    assert_eq!(last3.len(), 3, "{:?}", beat.sent);
    assert!(last3.windows(2).all(|w| w[1] - w[0] == chrono::Duration::seconds(1)), "{last3:?}");
    assert_eq!(*last3.last().unwrap(), beat.clock.now().duration_trunc_secs(), "on the wall clock again");
    let all = beat.scheduled();
    assert!(all.windows(2).all(|w| w[1] > w[0]), "scheduled times only move on: {all:?}");
    beat.finish().await;
}

/// Whole seconds of a time.
trait TruncSecs {
    fn duration_trunc_secs(self) -> Self;
}

impl TruncSecs for DateTime<Utc> {
    fn duration_trunc_secs(self) -> Self {
        chrono::DurationRound::duration_trunc(self, chrono::Duration::seconds(1)).unwrap()
    }
}

/// What the code under test logs, while the guard lives (this thread only: a current-thread
/// runtime runs the beat here too).
fn capture_logs() -> (Arc<std::sync::Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Sink(buf.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    (buf, tracing::subscriber::set_default(subscriber))
}

/// 24,000 runs due at once take longer than twice a 400 ms lease term (a debug build on SQLite:
/// 12,000 took 0.84 s on a quiet machine): the beat renews the lease while it sends, so every run
/// of the tick goes out in that one turn, and the lease never runs out under it.
#[tokio::test]
async fn a_tick_longer_than_the_lease_term_renews_the_lease_as_it_goes() {
    let (logs, _guard) = capture_logs();
    let lease = Duration::from_millis(400);
    let entries = 24_000;
    let text: String = (0..entries).map(|i| entry(&format!("e{i}"), "every = \"1s\"")).collect();
    let mut beat = Driven::start_schedule(&text, utc("2026-01-01T00:00:00.500Z"), lease).await;
    let started = std::time::Instant::now();
    beat.run_for(Duration::from_millis(500), Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(took > lease * 2, "the tick took {took:?}: too short to test the renewal (more entries)");
    assert_eq!(beat.sent.len(), entries, "every run of the tick sent");
    assert!(beat.sent.iter().all(|(at, s, _)| *s == utc("2026-01-01T00:00:01Z") && at == s));
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(!logged.contains("lease"), "the lease ran out or was not renewed:\n{logged}");
    beat.finish().await;
}

/// An entry added by a reload (SIGHUP) half a second before its first run gets that run, though
/// the loop is asleep until its next renewal and the clock passes the run before it wakes: a
/// new entry starts from when the schedule was given, not from when the loop next looks.
#[tokio::test]
async fn an_entry_added_by_a_reload_just_before_its_first_run_gets_that_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker: Arc<dyn Broker> =
        Arc::new(celeriac_sqlite::SqliteBroker::open(&format!("sqlite://{}/b.db", dir.path().display())).unwrap());
    let clock = ManualClock::new(utc("2026-01-01T00:00:59.500Z"));
    let hourly = entry("hourly", "cron = \"0 * * * *\"");
    let schedule = celeriac_beat::parse(&hourly, "test.toml").unwrap();
    // A long lease: the loop's next renewal is 20 s of real time away.
    let config = BeatConfig { lease: Duration::from_secs(60), ..BeatConfig::default() };
    let beat = Arc::new(Beat::new(schedule, broker, Arc::new(clock.clone()), config));
    let (stop, rx) = watch::channel(false);
    let (tx, mut events) = mpsc::unbounded_channel();
    let task = tokio::spawn({
        let beat = beat.clone();
        async move { beat.run(rx, Some(tx)).await.unwrap() }
    });
    clock.sleeping(0, TURN).await.expect("the loop to lead and wait for the hourly run");
    let both = format!("{hourly}{}", entry("minutely", "cron = \"* * * * *\""));
    beat.replace_schedule(celeriac_beat::parse(&both, "test.toml").unwrap());
    clock.advance(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + TURN;
    let sent = loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Sent { entry, scheduled, .. })) => break (entry, scheduled),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("the new entry's first run (00:01:00) was not sent"),
        }
    };
    assert_eq!(sent, ("minutely".to_string(), utc("2026-01-01T00:01:00Z")));
    let _ = stop.send(true);
    tokio::time::timeout(TURN, task).await.expect("the beat to stop").unwrap();
}
