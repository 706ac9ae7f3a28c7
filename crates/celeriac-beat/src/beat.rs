//! The beat loop: take the leader lease through the broker, and while holding it send every run
//! that falls due.
//!
//! - **Leadership.** Every beat asks for the lease `beat.<schedule name>` ([`Broker::lease`])
//!   every third of its term ([`BeatConfig::lease`]) and renews it while it holds it. A beat sends
//!   only while the lease it last renewed is valid, counted from *before* that renewal was asked,
//!   so it stops before any other beat can have taken it over; a beat whose renewal fails stops
//!   sending at once. A beat that dies loses the lease when its term runs out: another takes over
//!   within the term plus a third of it.
//! - **Runs.** The leader reads the last run sent of each entry from the broker
//!   ([`Broker::last_runs`]) when it takes the lease, and keeps the entries in a queue ordered by
//!   their next run, so each tick looks only at the entries whose time has come (10,000 entries
//!   cost nothing between their runs). It sends what [`Entry::due`] says for each, with up to
//!   `PUBLISH_IN_FLIGHT` (1,024) publishes waiting for the broker at once, then records the runs sent in
//!   one call ([`Broker::record_runs`]); a tick that takes longer than a third of the lease term
//!   renews the lease as it goes. A new leader therefore sends each run the old one sent
//!   but did not record a second time, with the same task id ([`run_id`]): the same run,
//!   recognisable by its id. An entry never seen before starts at the first run after now.
//! - **Time.** The schedule is read against the [`Clock`]'s wall clock and the loop waits on its
//!   monotonic clock ([`Clock::sleep`]), so a test drives the loop with a
//!   [`ManualClock`](crate::clock::ManualClock). A wall clock that jumps forward is downtime
//!   (`catch_up` decides); one that jumps back does not hold the schedule up or repeat runs: the
//!   schedule goes on from where it was until the wall clock catches up (`ScheduleTime`).
//! - **Messages** are plain protocol v2 task messages (Python workers run them too): id from the
//!   schedule's name, the entry and the scheduled time, `expires` the scheduled time plus the entry's `expires`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::canvas::{build_message, CallOptions, Sender};
use celeriac_core::{Broker, BrokerError};
use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use tokio::sync::watch;

pub use crate::clock::{Clock, SystemClock};

use crate::schedule::{run_id, Entry, Schedule};

/// The header naming a beat run (`<schedule>/<entry>`), by which a worker runs a run once.
pub const BEAT_RUN_HEADER: &str = "celeriac_beat_run";

/// How a beat runs.
#[derive(Debug, Clone)]
pub struct BeatConfig {
    /// The schedule's name: beats with the same name share one leader and one record of runs.
    pub name: String,
    /// This beat's identity as a lease holder (`beat@host:pid` by default).
    pub holder: String,
    /// The lease term: a dead leader is replaced within it plus a third of it.
    pub lease: Duration,
    /// The queue of an entry that names none (Celery's `task_default_queue`).
    pub default_queue: String,
}

impl Default for BeatConfig {
    fn default() -> Self {
        let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        BeatConfig {
            name: "default".into(),
            holder: format!("beat@{host}:{}:{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs(3),
            default_queue: celeriac_core::DEFAULT_QUEUE.into(),
        }
    }
}

/// What a beat did, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// This beat became the leader.
    Leader,
    /// This beat stopped being the leader (lost or gave up the lease).
    Follower,
    /// A run was sent: entry, scheduled time, task id.
    Sent {
        /// The entry.
        entry: String,
        /// The scheduled time.
        scheduled: DateTime<Utc>,
        /// The task id.
        task_id: String,
    },
}

/// Why a beat stopped.
#[derive(Debug, thiserror::Error)]
pub enum BeatError {
    /// The broker holds no leases or no beat state.
    #[error("{0}")]
    Unsupported(BrokerError),
}

/// A beat: a schedule, a broker, a clock.
pub struct Beat {
    schedule: std::sync::RwLock<Loaded>,
    /// Woken by [`Beat::replace_schedule`], so the loop takes a new schedule up at once.
    reloaded: tokio::sync::Notify,
    broker: Arc<dyn Broker>,
    clock: Arc<dyn Clock>,
    config: BeatConfig,
}

impl Beat {
    /// A beat; nothing happens until [`Beat::run`].
    pub fn new(schedule: Schedule, broker: Arc<dyn Broker>, clock: Arc<dyn Clock>, config: BeatConfig) -> Self {
        let schedule = std::sync::RwLock::new(Loaded { schedule: Arc::new(schedule), at: None });
        Beat { schedule, reloaded: tokio::sync::Notify::new(), broker, clock, config }
    }

    /// Replace the schedule (a file changed on disk, read again on SIGHUP): the loop takes it up
    /// at once; entries keep their last runs by name, and an entry new in it starts from now
    /// (its first run is the first after this call, even if the loop is busy until after it).
    pub fn replace_schedule(&self, schedule: Schedule) {
        let loaded = Loaded { schedule: Arc::new(schedule), at: Some(self.clock.now()) };
        *self.schedule.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        self.reloaded.notify_one();
    }

    /// The schedule in use.
    pub fn schedule(&self) -> Arc<Schedule> {
        self.loaded().schedule
    }

    fn loaded(&self) -> Loaded {
        self.schedule.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lease_name(&self) -> String {
        format!("beat.{}", self.config.name)
    }

    /// Run until `stop` turns true, reporting what happens on `events` (if given). Gives the
    /// lease up on the way out.
    pub async fn run(
        &self,
        mut stop: watch::Receiver<bool>,
        events: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    ) -> Result<(), BeatError> {
        let report = |e: Event| {
            if let Some(tx) = &events {
                let _ = tx.send(e);
            }
        };
        let term = self.config.lease;
        let mut leader_until: Option<Instant> = None;
        let mut plan = Plan::default();
        let mut time = ScheduleTime::default();
        loop {
            if *stop.borrow() {
                break;
            }
            // Ask (or renew), counting the term from before the question.
            let asked = Instant::now();
            match self.broker.lease(&self.lease_name(), &self.config.holder, term).await {
                Ok(true) => {
                    if leader_until.is_none() {
                        let last = match self.broker.last_runs(&self.config.name).await {
                            Ok(runs) => runs,
                            Err(e @ BrokerError::Rejected { .. }) => return Err(BeatError::Unsupported(e)),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the last runs; not sending until it can");
                                self.pause(&mut stop, term / 3).await;
                                continue;
                            }
                        };
                        if let Some(latest) = last.values().max().and_then(|ms| Utc.timestamp_millis_opt(*ms).single())
                        {
                            time.not_before(latest, &*self.clock);
                        }
                        plan = Plan { last, leading_since: Some(self.clock.now()), ..Plan::default() };
                        tracing::info!(schedule = %self.config.name, holder = %self.config.holder, "leader: sending the schedule's runs");
                        report(Event::Leader);
                    }
                    leader_until = Some(asked + term);
                }
                Ok(false) => {
                    if leader_until.take().is_some() {
                        tracing::warn!(schedule = %self.config.name, "no longer the leader");
                        report(Event::Follower);
                    }
                }
                Err(e @ BrokerError::Rejected { .. }) => return Err(BeatError::Unsupported(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the broker for the lease");
                    if leader_until.take().is_some() {
                        report(Event::Follower);
                    }
                }
            }
            let Some(until) = leader_until else {
                tokio::select! {
                    _ = tokio::time::sleep_until((asked + term / 3).into()) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                continue;
            };
            let mut lease = Term { asked, until };
            let all_sent = self.send_due(&mut plan, &mut time, &mut lease, &report).await;
            // Renewed while sending a long tick: the term and the next renewal count from then.
            leader_until = Some(lease.until);
            let renew_at = tokio::time::Instant::from_std(lease.asked + term / 3);
            // Wait for the next run (on the beat's clock) or the next renewal, whichever is
            // first; after a run that could not be sent, for the renewal (no busy retry).
            let next = plan
                .next()
                .filter(|_| all_sent)
                .map(|t| (t - time.now(&*self.clock)).to_std().unwrap_or_default())
                .map(|d| time.real(d));
            let next_run = async {
                match next {
                    Some(d) => self.clock.sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = next_run => {}
                _ = tokio::time::sleep_until(renew_at) => {}
                _ = self.reloaded.notified() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
        if leader_until.is_some() {
            if let Err(e) = self.broker.release_lease(&self.lease_name(), &self.config.holder).await {
                tracing::warn!(error = %e, "could not give the lease up; it lapses by itself");
            }
            report(Event::Follower);
        }
        Ok(())
    }

    async fn pause(&self, stop: &mut watch::Receiver<bool>, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// Send every run due while the lease is valid, `PUBLISH_IN_FLIGHT` (1,024) at a time, then record
    /// the runs sent in one call. A tick longer than a third of the term (100,000 runs take
    /// seconds) renews the lease as it goes, as the loop does between ticks; a renewal refused
    /// stops the sends when the term runs out. Returns false if a due run was not sent (the
    /// broker failed, or the lease ran out first).
    async fn send_due(
        &self,
        plan: &mut Plan,
        time: &mut ScheduleTime,
        lease: &mut Term,
        report: &impl Fn(Event),
    ) -> bool {
        let Loaded { schedule, at } = self.loaded();
        let tz = schedule.timezone;
        let now = time.now(&*self.clock);
        // A schedule given while this beat led: its new entries start from then.
        let start = at.filter(|at| plan.leading_since.is_some_and(|since| *at >= since)).map_or(now, |at| at.min(now));
        let mut record = plan.follow(&schedule, start, now);
        // The entries whose next run has come, and their runs (an entry's runs together,
        // oldest first).
        let mut popped = Vec::new();
        let mut runs: Vec<(usize, DateTime<Utc>)> = Vec::new();
        while let Some(&Reverse((next, i))) = plan.queue.peek() {
            if next > now {
                break;
            }
            plan.queue.pop();
            popped.push(i);
            let entry = &schedule.entries[i];
            let since = last_of(&plan.last, entry, now);
            let due = entry.due(tz, Some(since), now);
            if due.is_empty() {
                // Missed runs skipped (`catch_up = "skip"`): the entry goes on from the latest.
                let latest = entry.at_or_before(tz, now).timestamp_millis();
                tracing::info!(entry = %entry.name, "runs missed while no beat led: skipped");
                plan.last.insert(entry.name.clone(), latest);
                record.push((entry.name.clone(), latest));
                continue;
            }
            runs.extend(due.into_iter().map(|t| (i, t)));
        }
        let origin = format!("beat@{}", self.config.name);
        let no_tasks = |_: &str| None;
        let sender =
            Sender { origin: &origin, default_queue: &self.config.default_queue, now, task_options: &no_tasks };
        // Pipelined: started in order, up to PUBLISH_IN_FLIGHT waiting for their confirmations.
        let valid = std::sync::Mutex::new(lease.until);
        let (entries, sender, valid_until) = (&schedule.entries, &sender, &valid);
        let publishes = runs.iter().copied().map(|(i, scheduled)| async move {
            if Instant::now() >= *valid_until.lock().unwrap_or_else(|e| e.into_inner()) {
                return Err(None);
            }
            self.send(&entries[i], scheduled, sender).await.map_err(Some)
        });
        let sending = futures::stream::iter(publishes).buffered(PUBLISH_IN_FLIGHT).collect::<Vec<_>>();
        tokio::pin!(sending);
        let term = self.config.lease;
        let mut renew = tokio::time::interval_at((lease.asked + term / 3).into(), term / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewing = true;
        let results: Vec<Result<String, Option<String>>> = loop {
            tokio::select! {
                results = &mut sending => break results,
                _ = renew.tick(), if renewing => {
                    let asked = Instant::now();
                    match self.broker.lease(&self.lease_name(), &self.config.holder, term).await {
                        Ok(true) => {
                            *lease = Term { asked, until: asked + term };
                            *valid.lock().unwrap_or_else(|e| e.into_inner()) = lease.until;
                        }
                        Ok(false) | Err(_) => {
                            tracing::warn!("the lease was not renewed while sending; the sends stop when its term runs out");
                            renewing = false;
                        }
                    }
                }
            }
        };
        let (mut all_sent, mut lapsed, mut failed) = (true, false, None);
        let mut sent = Vec::new();
        for (&(i, scheduled), result) in runs.iter().zip(results) {
            let entry = &schedule.entries[i];
            if failed == Some(i) {
                // An earlier run of this entry was not sent: the later ones are not counted,
                // so the entry is not recorded past it.
                continue;
            }
            match result {
                Ok(task_id) => {
                    tracing::info!(entry = %entry.name, task_id = %task_id, task_name = %entry.task, %scheduled, "sent");
                    let at = scheduled.timestamp_millis();
                    plan.last.insert(entry.name.clone(), at);
                    match record.last_mut() {
                        Some((name, t)) if *name == entry.name => *t = at,
                        _ => record.push((entry.name.clone(), at)),
                    }
                    sent.push((i, scheduled, task_id));
                }
                Err(None) => (lapsed, failed, all_sent) = (true, Some(i), false),
                Err(Some(e)) => {
                    tracing::error!(entry = %entry.name, %scheduled, error = %e, "could not send; trying again at the next renewal");
                    (failed, all_sent) = (Some(i), false);
                }
            }
        }
        if lapsed {
            tracing::warn!("the lease ran out before every due run was sent; the next leader sends the rest");
        }
        let recorded =
            if record.is_empty() { Ok(()) } else { self.broker.record_runs(&self.config.name, &record).await };
        if let Err(e) = recorded {
            tracing::warn!(runs = sent.len(), error = %e, "sent, but not recorded: the next leader may send these runs again, with the same ids");
        }
        for (i, scheduled, task_id) in sent {
            report(Event::Sent { entry: schedule.entries[i].name.clone(), scheduled, task_id });
        }
        for i in popped {
            let entry = &schedule.entries[i];
            plan.queue.push(Reverse((entry.next_after(tz, last_of(&plan.last, entry, now)), i)));
        }
        all_sent
    }

    async fn send(&self, entry: &Entry, scheduled: DateTime<Utc>, sender: &Sender<'_>) -> Result<String, String> {
        let task_id = run_id(&self.config.name, &entry.name, scheduled);
        let expires = entry.expires.map(|s| scheduled + chrono::Duration::milliseconds((s * 1000.0) as i64));
        let options = CallOptions {
            task_id: Some(task_id.clone()),
            queue: entry.queue.clone(),
            priority: entry.priority,
            expires,
            ..CallOptions::default()
        };
        let (_, mut message) = build_message(&entry.task, entry.args.clone(), entry.kwargs.clone(), options, sender)
            .map_err(|e| e.to_string())?;
        // Workers run a run once, however many times it is sent (celeriac_worker's
        // `request::BEAT_RUN_HEADER`; Python workers ignore the header).
        message.headers.insert(BEAT_RUN_HEADER.into(), format!("{}/{}", self.config.name, entry.name).into());
        let queue = entry.queue.clone().unwrap_or_else(|| self.config.default_queue.clone());
        self.broker.publish(&queue, &message).await.map_err(|e| e.to_string())?;
        Ok(task_id)
    }
}

/// The schedule in use, and when it was given by [`Beat::replace_schedule`] (`None`: the one the
/// beat started with, whose new entries start when the beat takes the lead).
#[derive(Clone)]
struct Loaded {
    schedule: Arc<Schedule>,
    at: Option<DateTime<Utc>>,
}

/// The leader's lease: when it was last asked for, and until when it is held (counted from
/// before the asking).
#[derive(Debug, Clone, Copy)]
struct Term {
    asked: Instant,
    until: Instant,
}

/// Publishes in flight at once while a tick's runs are sent, each waiting for the broker to take
/// it (as `Client::apply_canvas`): 10,000 entries due in the same second cannot wait for 10,000
/// confirmations one after another. 1,024 as the benchmark's publishers: with 256, RabbitMQ's
/// confirmations (persistent messages) held a beat to about 6,400 runs a second here.
const PUBLISH_IN_FLIGHT: usize = 1024;

/// A step back of the wall clock larger than this is a jump (see [`ScheduleTime`]); smaller ones
/// (NTP slewing, clocks of two machines) only hold the next run until the clock passes it.
const JUMP: Duration = Duration::from_secs(1);

/// What the leader knows of the schedule: the last run sent of each entry, and the entries by
/// their next run, earliest first, so a tick looks only at the entries whose time has come.
#[derive(Default)]
struct Plan {
    /// The schedule the queue was built for (another one, after a reload, rebuilds it).
    schedule: Option<Arc<Schedule>>,
    /// Entry name → the scheduled time of its last run sent (Unix milliseconds).
    last: HashMap<String, i64>,
    /// (next run, index of the entry in the schedule).
    queue: BinaryHeap<Reverse<(DateTime<Utc>, usize)>>,
    /// When this beat took the lead (the wall clock).
    leading_since: Option<DateTime<Utc>>,
}

impl Plan {
    /// Use `schedule` (rebuilding the queue if it is not the one in use); returns the entries
    /// never seen before, which start at `start` (when the schedule was loaded, or `now`), to
    /// record.
    fn follow(&mut self, schedule: &Arc<Schedule>, start: DateTime<Utc>, now: DateTime<Utc>) -> Vec<(String, i64)> {
        if self.schedule.as_ref().is_some_and(|s| Arc::ptr_eq(s, schedule)) {
            return Vec::new();
        }
        let mut fresh = Vec::new();
        self.queue.clear();
        for (i, entry) in schedule.entries.iter().enumerate() {
            if !self.last.contains_key(&entry.name) {
                // Never seen: it starts with the first run after `start`.
                let record = Record::Started(start).encode();
                self.last.insert(entry.name.clone(), record);
                fresh.push((entry.name.clone(), record));
            }
            let next = entry.next_after(schedule.timezone, last_of(&self.last, entry, now));
            self.queue.push(Reverse((next, i)));
        }
        self.schedule = Some(schedule.clone());
        fresh
    }

    /// The earliest next run.
    fn next(&self) -> Option<DateTime<Utc>> {
        self.queue.peek().map(|Reverse((t, _))| *t)
    }
}

/// The time the schedule is read against: the wall clock, except after it jumped back. Then
/// the schedule's time does not step back with it: it slews, as `adjtime` does, going on from
/// where it was at half the pace of the monotonic clock until the wall clock catches up (after
/// twice the jump). No run is sent twice (the times already sent are not reached again), none is
/// held up for the length of the jump (the runs come at half their pace meanwhile), and cron
/// entries are back on the wall clock afterwards. A jump forward is downtime, which `catch_up`
/// governs.
#[derive(Default)]
struct ScheduleTime {
    /// The last time given, and the monotonic clock then.
    last: Option<(DateTime<Utc>, Duration)>,
    /// Whether the wall clock is behind the schedule (it jumped back): slewing.
    behind: bool,
}

impl ScheduleTime {
    fn now(&mut self, clock: &dyn Clock) -> DateTime<Utc> {
        let (wall, mono) = (clock.now(), clock.monotonic());
        let t = match self.last {
            Some((prev, prev_mono)) => {
                let elapsed = chrono::Duration::from_std(mono.saturating_sub(prev_mono)).unwrap_or_default();
                if !self.behind && prev + elapsed - wall > jump() {
                    tracing::warn!(%wall, schedule_time = %(prev + elapsed), "the wall clock went back: the schedule goes on from where it was, at half pace, until the clock catches up");
                    self.behind = true;
                }
                let slewed = prev + elapsed / 2;
                if self.behind && wall < slewed {
                    slewed
                } else {
                    if self.behind {
                        tracing::info!(%wall, "the wall clock caught up with the schedule");
                        self.behind = false;
                    }
                    wall
                }
            }
            None => wall,
        };
        self.last = Some((t, mono));
        t
    }

    /// Never behind `t` (the latest run the broker says was sent): a new leader whose wall clock
    /// is behind it by more than a jump (its clock went back, or is behind the last leader's)
    /// slews from there instead of waiting for its clock to pass it.
    fn not_before(&mut self, t: DateTime<Utc>, clock: &dyn Clock) {
        let wall = clock.now();
        if t - wall > jump() && self.last.is_none_or(|(prev, _)| prev < t) {
            tracing::warn!(%wall, last_run = %t, "the wall clock is behind the last run sent: the schedule goes on from there, at half pace, until the clock catches up");
            self.last = Some((t, clock.monotonic()));
            self.behind = true;
        }
    }

    /// The monotonic time until the schedule's time has moved on by `d`.
    fn real(&self, d: Duration) -> Duration {
        if self.behind {
            d * 2
        } else {
            d
        }
    }
}

fn jump() -> chrono::Duration {
    chrono::Duration::from_std(JUMP).unwrap_or_default()
}

/// The entry's last run sent (or when it was first followed, if none was), or `now` for one
/// never seen.
fn last_of(last: &HashMap<String, i64>, entry: &Entry, now: DateTime<Utc>) -> DateTime<Utc> {
    last.get(&entry.name).and_then(|v| Record::decode(*v)).map_or(now, Record::time)
}

/// What the broker keeps of an entry ([`Broker::record_runs`], [`Broker::last_runs`]): one
/// integer, the Unix milliseconds of its last run sent, or, negated, of when a leader first
/// followed it (an entry new to the schedule, with no run yet: its runs start after then, on any
/// leader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// The scheduled time of the last run sent (or skipped by `catch_up = "skip"`).
    Sent(DateTime<Utc>),
    /// No run sent yet; followed since then.
    Started(DateTime<Utc>),
}

impl Record {
    /// The integer kept in the broker.
    pub fn encode(self) -> i64 {
        match self {
            Record::Sent(t) => t.timestamp_millis(),
            Record::Started(t) => -t.timestamp_millis(),
        }
    }

    /// Read a kept integer (`None`: out of chrono's range).
    pub fn decode(v: i64) -> Option<Record> {
        let t = Utc.timestamp_millis_opt(v.checked_abs()?).single()?;
        Some(if v < 0 { Record::Started(t) } else { Record::Sent(t) })
    }

    /// The time the entry's runs go on from.
    pub fn time(self) -> DateTime<Utc> {
        match self {
            Record::Sent(t) | Record::Started(t) => t,
        }
    }
}
