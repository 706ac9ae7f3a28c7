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
//!   ([`Broker::last_runs`]) when it takes the lease, sends what [`Entry::due`] says, and records
//!   each run after sending it ([`Broker::record_runs`]). A new leader therefore sends each run
//!   the old one sent but did not record a second time, with the same task id ([`run_id`]): the
//!   same run, recognisable by its id. An entry never seen before starts at the first run after
//!   now.
//! - **Messages** are plain protocol v2 task messages (Python workers run them too): id from the
//!   entry and the scheduled time, `expires` the scheduled time plus the entry's `expires`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::canvas::{build_message, CallOptions, Sender};
use celeriac_core::{Broker, BrokerError};
use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::watch;

use crate::schedule::{run_id, Entry, Schedule};

/// The header naming a beat run (`<schedule>/<entry>`), by which a worker runs a run once.
pub const BEAT_RUN_HEADER: &str = "celeriac_beat_run";

/// The time beat reads: the system clock, or a test's.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

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
    schedule: std::sync::RwLock<Arc<Schedule>>,
    broker: Arc<dyn Broker>,
    clock: Arc<dyn Clock>,
    config: BeatConfig,
}

impl Beat {
    /// A beat; nothing happens until [`Beat::run`].
    pub fn new(schedule: Schedule, broker: Arc<dyn Broker>, clock: Arc<dyn Clock>, config: BeatConfig) -> Self {
        Beat { schedule: std::sync::RwLock::new(Arc::new(schedule)), broker, clock, config }
    }

    /// Replace the schedule (a file changed on disk, read again on SIGHUP): the loop uses the new
    /// one from its next turn, within a third of the lease; entries keep their last runs by name.
    pub fn replace_schedule(&self, schedule: Schedule) {
        *self.schedule.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(schedule);
    }

    /// The schedule in use.
    pub fn schedule(&self) -> Arc<Schedule> {
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
        let mut last: HashMap<String, i64> = HashMap::new();
        loop {
            if *stop.borrow() {
                break;
            }
            // Ask (or renew), counting the term from before the question.
            let asked = Instant::now();
            match self.broker.lease(&self.lease_name(), &self.config.holder, term).await {
                Ok(true) => {
                    if leader_until.is_none() {
                        last = match self.broker.last_runs(&self.config.name).await {
                            Ok(runs) => runs,
                            Err(e @ BrokerError::Rejected { .. }) => return Err(BeatError::Unsupported(e)),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the last runs; not sending until it can");
                                self.pause(&mut stop, term / 3).await;
                                continue;
                            }
                        };
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
            let renew_at = asked + term / 3;
            if let Some(until) = leader_until {
                self.send_due(&mut last, until, &report).await;
                // Sleep to the next run or the next renewal, whichever is first.
                let now = self.clock.now();
                let schedule = self.schedule();
                let next = schedule
                    .entries
                    .iter()
                    .map(|e| e.next_after(schedule.timezone, last_of(&last, e, now)))
                    .min()
                    .map(|t| (t - now).to_std().unwrap_or_default());
                let wake = next.map_or(renew_at, |d| (Instant::now() + d).min(renew_at));
                self.pause(&mut stop, wake.saturating_duration_since(Instant::now())).await;
            } else {
                self.pause(&mut stop, renew_at.saturating_duration_since(Instant::now())).await;
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

    /// Send every due run while the lease is valid; record each after sending it.
    async fn send_due(&self, last: &mut HashMap<String, i64>, valid_until: Instant, report: &impl Fn(Event)) {
        let schedule = self.schedule();
        let tz = schedule.timezone;
        let now = self.clock.now();
        let mut fresh = Vec::new();
        for entry in &schedule.entries {
            if !last.contains_key(&entry.name) {
                // Never seen: it starts with the first run after now.
                last.insert(entry.name.clone(), now.timestamp_millis());
                fresh.push((entry.name.clone(), now.timestamp_millis()));
            }
        }
        if let Err(e) = self.broker.record_runs(&self.config.name, &fresh).await {
            tracing::warn!(error = %e, "cannot record the schedule's new entries");
        }
        for entry in &schedule.entries {
            let since = last_of(last, entry, now);
            let due = entry.due(tz, Some(since), now);
            if due.is_empty() && entry.next_after(tz, since) <= now {
                // Missed runs skipped (`catch_up = "skip"`): the entry goes on from the latest.
                let latest = entry.at_or_before(tz, now).timestamp_millis();
                tracing::info!(entry = %entry.name, "runs missed while no beat led: skipped");
                last.insert(entry.name.clone(), latest);
                if let Err(e) = self.broker.record_runs(&self.config.name, &[(entry.name.clone(), latest)]).await {
                    tracing::warn!(entry = %entry.name, error = %e, "cannot record the skipped runs");
                }
                continue;
            }
            for scheduled in due {
                if Instant::now() >= valid_until {
                    tracing::warn!("the lease ran out before every due run was sent; the next leader sends the rest");
                    return;
                }
                match self.send(entry, scheduled).await {
                    Ok(task_id) => {
                        tracing::info!(entry = %entry.name, task_id = %task_id, task_name = %entry.task, %scheduled, "sent");
                        last.insert(entry.name.clone(), scheduled.timestamp_millis());
                        if let Err(e) = self
                            .broker
                            .record_runs(&self.config.name, &[(entry.name.clone(), scheduled.timestamp_millis())])
                            .await
                        {
                            tracing::warn!(entry = %entry.name, error = %e, "sent, but not recorded: the next leader may send this run again, with the same id");
                        }
                        report(Event::Sent { entry: entry.name.clone(), scheduled, task_id });
                    }
                    Err(e) => {
                        tracing::error!(entry = %entry.name, %scheduled, error = %e, "could not send; trying again at the next tick");
                        break;
                    }
                }
            }
        }
    }

    async fn send(&self, entry: &Entry, scheduled: DateTime<Utc>) -> Result<String, String> {
        let task_id = run_id(&entry.name, scheduled);
        let expires = entry.expires.map(|s| scheduled + chrono::Duration::milliseconds((s * 1000.0) as i64));
        let options = CallOptions {
            task_id: Some(task_id.clone()),
            queue: entry.queue.clone(),
            priority: entry.priority,
            expires,
            ..CallOptions::default()
        };
        let no_tasks = |_: &str| None;
        let origin = format!("beat@{}", self.config.name);
        let sender = Sender {
            origin: &origin,
            default_queue: &self.config.default_queue,
            now: self.clock.now(),
            task_options: &no_tasks,
        };
        let (_, mut message) = build_message(&entry.task, entry.args.clone(), entry.kwargs.clone(), options, &sender)
            .map_err(|e| e.to_string())?;
        // Workers run a run once, however many times it is sent (celeriac_worker's
        // `request::BEAT_RUN_HEADER`; Python workers ignore the header).
        message.headers.insert(BEAT_RUN_HEADER.into(), format!("{}/{}", self.config.name, entry.name).into());
        let queue = entry.queue.clone().unwrap_or_else(|| self.config.default_queue.clone());
        self.broker.publish(&queue, &message).await.map_err(|e| e.to_string())?;
        Ok(task_id)
    }
}

/// The entry's last run sent, or `now` for one never seen.
fn last_of(last: &HashMap<String, i64>, entry: &Entry, now: DateTime<Utc>) -> DateTime<Utc> {
    last.get(&entry.name).and_then(|ms| Utc.timestamp_millis_opt(*ms).single()).unwrap_or(now)
}
