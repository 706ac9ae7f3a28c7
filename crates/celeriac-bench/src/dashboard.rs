//! The dashboard part (issue 16, item 4): what `celeriac dashboard` costs while it watches a
//! worker at full speed, and what it costs the worker.
//!
//! For each broker (RabbitMQ, Redis) the same drain is timed four times, each on a queue of its
//! own pre-filled with `--dashboard-tasks` `celeriac.noop` (ignore_result), so the worker runs at
//! its maximum and its events are a steady stream for as long as the drain lasts:
//!
//! 1. `plain`: the worker without `-E` (worker events only), the reference;
//! 2. `events`: the worker with `-E` and nobody listening but the exchange;
//! 3. `dashboard`: the same with `celeriac dashboard` watching (started first, so it sees every
//!    event);
//! 4. `dashboard+client`: the same with a client holding the dashboard's `/api/stream` open and
//!    refetching as the page's tasks view does (`assets/app.js`: on each `update`, at most one a
//!    second, `refresh()` fetches the first page of the task list,
//!    `/api/tasks?state=&name=&worker=&id=&offset=0&limit=200`, then `/api/overview`, on one
//!    kept-alive connection as a browser's; an update that comes during a refresh makes one more;
//!    and a refresh 5 s after the last one when no update came). The client runs on a thread of
//!    its own in this process, and its CPU is measured apart (`/proc/self/task/<tid>/schedstat`): on
//!    this machine it takes from the cores the worker uses; a browser on another machine would
//!    not.
//!
//! Measured: the worker's rate over the steady part of the drain (the queue's depth from 90% to
//! 10% of the fill, as every drain of the benchmark); the dashboard's CPU over the same window
//! (`/proc/<pid>/stat` utime + stime, in % of one core); its resident memory (`VmRSS`) before
//! the worker starts, at its peak, at the end of the window, and after every event was applied
//! (it then holds its 10,000 most recent tasks), with its CPU while it holds them; whether every
//! `task-succeeded` reached it (the sum of `/api/overview`'s per-minute successes) and how long
//! after the queue emptied; the page-like client's CPU over the same window. Each wait has a
//! deadline.
//!
//! **The paced mode** (`--dashboard-rate R`): the drain runs the worker flat out, so on a 2-core
//! machine any CPU the dashboard takes comes out of the worker's rate, whatever the dashboard
//! does to the worker itself. The condition is a worker that *runs* 10,000 tasks/s, so
//! the paced mode holds it there: each queue starts empty, a [`Producer`] (its own thread)
//! publishes R `celeriac.noop` a second, and the same four cases are read every
//! [`PACED_SAMPLE`] over a window of `--dashboard-seconds` after a [`WARMUP`]: the producer's
//! confirmed sends and the worker's completed tasks (its `--metrics-addr` endpoint, on in every
//! case), whether it kept up ([`Paced::kept_up`]) and the backlog (published, not completed),
//! the mean time a task spends between its publish and its completion (Little's law: mean
//! backlog / rate), the worker's CPU per task (`/proc/<pid>/stat`), the broker's and the
//! producer's CPU per task, the machine's idle CPU, and the dashboard's CPU and RSS as in the
//! drain. The worker "slowed" is then its CPU per task (and the time a task waits) with the
//! dashboard against with `-E` alone, and whether it still holds R.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::measure::{Bench, STOP_LIMIT};
use crate::paced::Producer;
use crate::procs::{cpu_secs, rss_kib, thread_cpu_secs, Proc};
use crate::rabbit::{self, Drain, Sample};

/// What the page fetches on each update of its tasks view (the largest answer it asks for).
const TASKS_VIEW: &str = "/api/tasks?state=&name=&worker=&id=&offset=0&limit=200";
/// What the page fetches after every view (the header).
const OVERVIEW: &str = "/api/overview";
/// The page refreshes this long after its last refresh when no update came.
const PAGE_QUIET: Duration = Duration::from_secs(5);
/// How long the dashboard's memory and CPU are watched once it holds its tasks.
const HOLD: Duration = Duration::from_secs(6);
/// The most tasks the dashboard keeps (`celeriac::dashboard::state::MAX_TASKS`).
const KEPT: u64 = 10_000;

/// One of the four configurations timed on each broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// The worker without `-E`.
    Plain,
    /// The worker with `-E`, no dashboard.
    Events,
    /// The worker with `-E` and a dashboard watching.
    Dashboard,
    /// The same, and a client on the dashboard's stream refetching as the page does.
    DashboardClient,
}

impl Case {
    /// Every case, in the order they run.
    pub const ALL: [Case; 4] = [Case::Plain, Case::Events, Case::Dashboard, Case::DashboardClient];

    /// A short name (queue names, logs).
    pub fn name(self) -> &'static str {
        match self {
            Case::Plain => "plain",
            Case::Events => "events",
            Case::Dashboard => "dashboard",
            Case::DashboardClient => "dashboard+client",
        }
    }

    /// What runs, for the table.
    pub fn describe(self) -> &'static str {
        match self {
            Case::Plain => "worker without -E (reference)",
            Case::Events => "worker -E, no dashboard",
            Case::Dashboard => "worker -E, dashboard watching",
            Case::DashboardClient => "worker -E, dashboard and a page's client",
        }
    }

    fn dashboard(self) -> bool {
        matches!(self, Case::Dashboard | Case::DashboardClient)
    }
}

/// What the dashboard process cost in one case.
#[derive(Debug, Clone, Default)]
pub struct DashCost {
    /// CPU over the steady window of the drain, % of one core.
    pub cpu_pct: f64,
    /// RSS once it was ready, before the worker started, MiB.
    pub rss_start_mib: f64,
    /// The largest RSS seen (drain, catching up, holding), MiB.
    pub rss_peak_mib: f64,
    /// RSS at the end of the steady window, MiB.
    pub rss_steady_mib: f64,
    /// RSS at the end of the hold (every event applied, its tasks kept), MiB.
    pub rss_held_mib: f64,
    /// CPU while holding them (the poller, and the client's refetches if any), % of one core.
    pub cpu_held_pct: f64,
    /// Tasks it keeps at the end (`/api/tasks` `total`).
    pub held: u64,
    /// Successes it counted (the sum of `/api/overview`'s per-minute counts).
    pub succeeded: u64,
    /// Seconds after the queue emptied until it had counted every task's success; `None` if it
    /// never did within the deadline.
    pub caught_up_secs: Option<f64>,
}

/// What the page-like client did.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// `update` events received.
    pub updates: u64,
    /// Refreshes made (each: the tasks view, then the overview).
    pub refreshes: u64,
    /// Bytes of the answers, in all.
    pub bytes: u64,
    /// The slowest refresh, milliseconds.
    pub slowest_ms: f64,
    /// The mean refresh, milliseconds.
    pub mean_ms: f64,
    /// The client's own CPU over the drain's steady window, % of one core (its thread in this
    /// process: the stream, the fetches, reading the answers).
    pub cpu_pct: f64,
    /// Its CPU from its start to its stop, seconds.
    pub cpu_secs: f64,
}

/// How a case drives the worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// A queue pre-filled with this many tasks, drained flat out.
    Drain(u64),
    /// A paced producer publishing `rate` tasks a second while the worker consumes; measured
    /// over `window` after [`WARMUP`].
    Paced {
        /// Tasks a second.
        rate: u64,
        /// The measured window.
        window: Duration,
    },
}

/// The paced mode's warm-up: the worker and the producer run this long before the window opens.
const WARMUP: Duration = Duration::from_secs(2);
/// How often the paced mode reads the worker, the broker, the queue and the dashboard.
const PACED_SAMPLE: Duration = Duration::from_millis(100);

/// The worker held at a paced producer's rate, over the steady window.
#[derive(Debug, Clone, Default)]
pub struct Paced {
    /// The rate asked of the producer, tasks a second.
    pub rate: u64,
    /// The window's length, seconds.
    pub window_secs: f64,
    /// Sends the producer had confirmed per second over the window.
    pub offered: f64,
    /// Tasks the worker completed per second over the window (its `celeriac_tasks_total`
    /// SUCCESS count, read from its metrics endpoint).
    pub completed: f64,
    /// Tasks completed in the window.
    pub tasks: u64,
    /// Tasks published and not yet completed (in the queue, prefetched or running) at the
    /// window's start and end, and the most seen in it.
    pub backlog_start: u64,
    /// See `backlog_start`.
    pub backlog_end: u64,
    /// See `backlog_start`.
    pub backlog_max: u64,
    /// The most ready messages the broker's queue held in the window.
    pub ready_max: u64,
    /// The mean time from publish (confirmed) to completion, milliseconds, by Little's law:
    /// the mean backlog over the window divided by the completed rate.
    pub latency_ms: f64,
    /// The worker's CPU (process tree, utime + stime) per task completed in the window, µs.
    pub worker_us: f64,
    /// The worker's CPU over the window, % of one core.
    pub worker_pct: f64,
    /// The broker's CPU per task completed in the window (its publish and its delivery), µs.
    pub broker_us: f64,
    /// The producer's CPU (its thread) per task confirmed in the window, µs.
    pub producer_us: f64,
    /// The machine's idle CPU over the window, % of one core (out of 100 × cores).
    pub idle_pct: f64,
}

impl Paced {
    /// Whether the producer held the rate asked: it had at least 98% of it confirmed over the
    /// window (on a loaded machine it may not get the CPU; the worker is then held at less).
    pub fn held(&self) -> bool {
        self.offered >= 0.98 * self.rate as f64
    }

    /// Whether the worker kept up with what was offered: it completed at least 99% of it and its
    /// backlog at the window's end is under 100 ms of tasks at the rate asked.
    pub fn kept_up(&self) -> bool {
        self.completed >= 0.99 * self.offered && (self.backlog_end as f64) < self.rate as f64 / 10.0
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "paced at {}/s for {:.1} s: producer {:.0}/s, worker {:.0}/s ({} tasks; {}), backlog at start {}, at end {}, \
             max {}, queue ready max {}, latency {:.1} ms (Little), CPU per task: worker {:.1} µs ({:.1}% of a core), \
             broker {:.1} µs, producer {:.1} µs; machine idle {:.0}% of a core",
            self.rate,
            self.window_secs,
            self.offered,
            self.completed,
            self.tasks,
            match (self.held(), self.kept_up()) {
                (true, true) => "the rate held, the worker kept up",
                (false, true) => "the producer fell short of the rate, the worker kept up with it",
                (true, false) => "the rate held, the worker did NOT keep up",
                (false, false) => "the producer fell short of the rate, the worker did NOT keep up",
            },
            self.backlog_start,
            self.backlog_end,
            self.backlog_max,
            self.ready_max,
            self.latency_ms,
            self.worker_us,
            self.worker_pct,
            self.broker_us,
            self.producer_us,
            self.idle_pct
        )
    }
}

/// One case on one broker.
#[derive(Debug, Clone)]
pub struct CaseRun {
    /// `rabbitmq` or `redis`.
    pub broker: String,
    /// Which configuration.
    pub case: Case,
    /// The worker's drain (the drain mode).
    pub drain: Option<Drain>,
    /// The worker held at a paced producer's rate (the paced mode, `--dashboard-rate`).
    pub paced: Option<Paced>,
    /// The dashboard's cost (cases with a dashboard).
    pub dash: Option<DashCost>,
    /// The client's work (the last case).
    pub client: Option<ClientStats>,
    /// Events the worker said it dropped because its event queue was full (the largest count it
    /// logged: it logs at 1, 2, 4, 8, ...; so at least this many).
    pub worker_dropped: u64,
}

impl CaseRun {
    /// One line of figures.
    pub fn describe(&self) -> String {
        let worker = match (&self.drain, &self.paced) {
            (Some(d), _) => d.describe(),
            (None, Some(p)) => p.describe(),
            (None, None) => "not measured".into(),
        };
        let mut line = format!(
            "dashboard part, {} broker, {}: worker {worker}, at least {} events dropped by the worker",
            self.broker,
            self.case.name(),
            self.worker_dropped
        );
        if let Some(d) = &self.dash {
            line.push_str(&format!(
                "; dashboard CPU {:.1}% of one core over the window, {:.1}% while holding {} tasks; RSS ready {:.1} MiB, \
                 end of window {:.1}, peak {:.1}, holding {:.1} MiB; {} successes counted, {}",
                d.cpu_pct,
                d.cpu_held_pct,
                d.held,
                d.rss_start_mib,
                d.rss_steady_mib,
                d.rss_peak_mib,
                d.rss_held_mib,
                d.succeeded,
                d.caught_up_secs
                    .map_or("never all within the deadline".to_string(), |s| format!("all {s:.1} s after the queue emptied"))
            ));
        }
        if let Some(c) = &self.client {
            line.push_str(&format!(
                "; client: {} updates, {} refreshes ({:.1} MiB fetched, mean {:.1} ms, slowest {:.0} ms), \
                 its own CPU {:.2}% of one core over the window ({:.1} ms in all)",
                c.updates,
                c.refreshes,
                c.bytes as f64 / 1024.0 / 1024.0,
                c.mean_ms,
                c.slowest_ms,
                c.cpu_pct,
                c.cpu_secs * 1e3
            ));
        }
        line
    }
}

/// Where a drain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    Rabbit,
    Redis,
}

impl Bench {
    /// The dashboard part on each of `brokers` (`rabbitmq`, `redis`), each of `cases` (by
    /// [`Case::name`]; empty: every [`Case`]) in turn, draining `n` tasks each.
    pub async fn dashboard(&self, mode: Mode, brokers: &[String], cases: &[String]) -> Result<Vec<CaseRun>> {
        match mode {
            Mode::Drain(n) => {
                ensure!(n >= 10 * KEPT, "--dashboard-tasks must be at least {} (the dashboard keeps {KEPT})", 10 * KEPT)
            }
            Mode::Paced { rate, window } => ensure!(
                rate > 0 && window >= Duration::from_secs(1),
                "--dashboard-rate must be above 0 and --dashboard-seconds at least 1"
            ),
        }
        for c in cases {
            ensure!(
                Case::ALL.iter().any(|k| k.name() == c),
                "unknown dashboard case {c:?} (known: plain, events, dashboard, dashboard+client)"
            );
        }
        let chosen: Vec<Case> =
            Case::ALL.into_iter().filter(|k| cases.is_empty() || cases.iter().any(|c| c == k.name())).collect();
        let mut out = Vec::new();
        for broker in brokers {
            let on = match broker.as_str() {
                "rabbitmq" => On::Rabbit,
                "redis" => On::Redis,
                other => bail!("unknown dashboard broker {other:?} (known: rabbitmq, redis)"),
            };
            for &case in &chosen {
                let run = match mode {
                    Mode::Drain(n) => self.dashboard_case(on, broker, case, n).await?,
                    Mode::Paced { rate, window } => self.paced_case(on, broker, case, rate, window).await?,
                };
                eprintln!("  {}", run.describe());
                out.push(run);
            }
        }
        Ok(out)
    }

    fn broker_url(&self, on: On) -> String {
        match on {
            On::Rabbit => self.url(),
            On::Redis => self.redis.url.clone(),
        }
    }

    /// Ready messages of `queue`.
    async fn ready(&self, on: On, conn: &mut Option<redis::Connection>, queue: &str) -> Result<u64> {
        match on {
            On::Rabbit => Ok(u64::from(self.admin.depth(queue).await?.0)),
            On::Redis => {
                let conn = conn.as_mut().context("no Redis connection")?;
                Ok(redis::cmd("LLEN").arg(queue).query(conn)?)
            }
        }
    }

    async fn dashboard_case(&self, on: On, broker: &str, case: Case, n: u64) -> Result<CaseRun> {
        let queue = format!("bench.dash.{}", case.name().replace('+', "-"));
        let url = self.broker_url(on);
        let mut conn = match on {
            On::Rabbit => None,
            On::Redis => Some(self.redis.connection()?),
        };
        // Fill.
        let started = Instant::now();
        if on == On::Rabbit {
            self.admin.declare(&queue).await?;
        }
        let client = celeriac::Client::connect(&url, None).await?;
        crate::measure::send_noops(&client, &queue, n, self.settings.in_flight).await?;
        drop(client);
        let ready = self.ready(on, &mut conn, &queue).await?;
        ensure!(ready == n, "queue {queue} holds {ready} messages after publishing {n}");
        eprintln!("  filled {queue} ({broker}) with {n} messages in {:.2}s", started.elapsed().as_secs_f64());

        let Watchers { dash, dash_pid, rss_start, client } = self.watchers(case, &url, &queue).await?;

        // The worker, and the drain.
        let extra: Vec<String> = if case == Case::Plain { Vec::new() } else { vec!["-E".into()] };
        let worker = Proc::spawn(
            &format!("celeriac worker on {queue} ({broker})"),
            &mut self.celeriac_command(&url, &queue, &extra),
        )?;
        let broker_pid = match on {
            On::Rabbit => self.broker_pid,
            On::Redis => self.redis.pid(),
        };
        let broker_cpu = || broker_pid.map(cpu_secs).unwrap_or(0.0);
        let limit = Self::drain_limit(n);
        let drain_started = Instant::now();
        let mut samples: Vec<Sample> = Vec::with_capacity(8192);
        // The dashboard's (CPU seconds, RSS KiB) at each sample.
        let mut dash_samples: Vec<(f64, u64)> = Vec::with_capacity(8192);
        // The page-like client's CPU seconds at each sample.
        let mut client_samples: Vec<f64> = Vec::with_capacity(8192);
        loop {
            let ready = self.ready(on, &mut conn, &queue).await?;
            let at = Instant::now();
            samples.push(Sample { at, ready, consumer_cpu: worker.tree_cpu(), broker_cpu: broker_cpu() });
            if let Some(pid) = dash_pid {
                dash_samples.push((cpu_secs(pid), rss_kib(pid).unwrap_or(0)));
            }
            if let Some(c) = &client {
                client_samples.push(c.cpu_secs());
            }
            if ready == 0 {
                break;
            }
            worker.check_alive()?;
            if let Some((p, _)) = &dash {
                p.check_alive()?;
            }
            ensure!(at - drain_started < limit, "queue {queue} still holds {ready} of {n} messages after {limit:?}");
            tokio::time::sleep(rabbit::POLL_INTERVAL).await;
        }
        let emptied = Instant::now();
        let drain = Drain::from_samples(n, &samples)?;
        self.wait_settled(on, &mut conn, &queue).await?;

        // The steady window is the drain's: from the first reading at 90% of the fill to the
        // first at 10%.
        let hi = samples.iter().position(|s| s.ready * 10 <= n * 9).context("no reading at 90%")?;
        let lo = samples.iter().position(|s| s.ready * 10 <= n).context("no reading at 10%")?;
        let span = samples[lo].at.duration_since(samples[hi].at).as_secs_f64();
        let window = dash_pid.map(|_| Window {
            cpu_pct: (dash_samples[lo].0 - dash_samples[hi].0) / span * 100.0,
            rss_start,
            rss_steady: dash_samples[lo].1,
            peak: dash_samples.iter().map(|s| s.1).max().unwrap_or(0),
        });
        let client_cpu_pct = match client {
            Some(_) => (client_samples[lo] - client_samples[hi]) / span * 100.0,
            None => f64::NAN,
        };
        let ends = Ends { window, emptied, tasks: n, client, client_cpu_pct };
        let (cost, client, worker_dropped) = self.finish(on, &mut conn, &queue, worker, dash, ends).await?;
        Ok(CaseRun {
            broker: broker.to_string(),
            case,
            drain: Some(drain),
            paced: None,
            dash: cost,
            client,
            worker_dropped,
        })
    }

    /// One case of the paced mode: the queue starts empty, a [`Producer`] publishes `rate`
    /// `celeriac.noop` a second while the worker consumes them, and the worker, the broker, the
    /// producer and the dashboard are read every [`PACED_SAMPLE`] for [`WARMUP`] then `window`.
    /// The worker runs with `--metrics-addr` in every case (its completed count is read there).
    async fn paced_case(&self, on: On, broker: &str, case: Case, rate: u64, window: Duration) -> Result<CaseRun> {
        let queue = format!("bench.dash.paced.{}", case.name().replace('+', "-"));
        let url = self.broker_url(on);
        let mut conn = match on {
            On::Rabbit => None,
            On::Redis => Some(self.redis.connection()?),
        };
        match on {
            On::Rabbit => self.admin.declare(&queue).await?,
            On::Redis => {
                let conn = conn.as_mut().context("no Redis connection")?;
                redis::cmd("DEL").arg(&queue).query::<()>(conn)?;
            }
        }

        let Watchers { dash, dash_pid, rss_start, client } = self.watchers(case, &url, &queue).await?;

        // The worker, with its metrics endpoint on a free port; consuming before the producer
        // starts.
        let metrics = free_port()?;
        let mut extra: Vec<String> = vec!["--metrics-addr".into(), metrics.to_string()];
        if case != Case::Plain {
            extra.push("-E".into());
        }
        let worker = Proc::spawn(
            &format!("celeriac worker on {queue} ({broker})"),
            &mut self.celeriac_command(&url, &queue, &extra),
        )?;
        let deadline = Instant::now() + crate::measure::START_LIMIT;
        while completed(metrics).await.is_err() {
            worker.check_alive()?;
            ensure!(Instant::now() < deadline, "the worker's metrics endpoint {metrics} did not answer within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if on == On::Rabbit {
            self.admin.wait_for_consumer(&queue, crate::measure::START_LIMIT, || worker.check_alive()).await?;
        }
        let broker_pid = match on {
            On::Rabbit => self.broker_pid,
            On::Redis => self.redis.pid(),
        };
        let broker_cpu = || broker_pid.map(cpu_secs).unwrap_or(0.0);

        let producer = Producer::start(&url, &queue, rate, self.settings.in_flight).await?;
        let started = producer.started();
        let end = started + WARMUP + window;
        let mut samples: Vec<PacedSample> = Vec::with_capacity(512);
        loop {
            let done = completed(metrics).await?;
            let confirmed = producer.confirmed();
            let ready = self.ready(on, &mut conn, &queue).await?;
            let at = Instant::now();
            samples.push(PacedSample {
                at,
                confirmed,
                completed: done,
                ready,
                worker_cpu: worker.tree_cpu(),
                broker_cpu: broker_cpu(),
                producer_cpu: producer.cpu_secs(),
                idle: machine_idle_secs(),
                dash: dash_pid.map(|pid| (cpu_secs(pid), rss_kib(pid).unwrap_or(0))),
                client_cpu: client.as_ref().map(PageClient::cpu_secs),
            });
            if at >= end {
                break;
            }
            worker.check_alive()?;
            producer.check_alive()?;
            if let Some((p, _)) = &dash {
                p.check_alive()?;
            }
            tokio::time::sleep(PACED_SAMPLE.min(end.saturating_duration_since(Instant::now()))).await;
        }
        let published = producer.stop().await?;
        // The rest: every task published completed, within a deadline.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = completed(metrics).await?;
            if done >= published {
                break;
            }
            worker.check_alive()?;
            ensure!(
                Instant::now() < deadline,
                "the worker completed {done} of {published} tasks 60 s after the producer stopped"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let emptied = Instant::now();

        // The window: from the first reading after the warm-up to the last.
        let first = samples.iter().position(|s| s.at >= started + WARMUP).context("no reading after the warm-up")?;
        let (a, b) = (&samples[first], samples.last().context("no readings")?);
        let span = b.at.duration_since(a.at).as_secs_f64();
        ensure!(span > 0.0 && b.completed > a.completed, "no task completed in the paced window");
        let tasks = b.completed - a.completed;
        let in_window = &samples[first..];
        let backlog = |s: &PacedSample| s.confirmed.saturating_sub(s.completed);
        let mean_backlog = in_window.iter().map(|s| backlog(s) as f64).sum::<f64>() / in_window.len() as f64;
        let completed_rate = tasks as f64 / span;
        let paced = Paced {
            rate,
            window_secs: span,
            offered: (b.confirmed - a.confirmed) as f64 / span,
            completed: completed_rate,
            tasks,
            backlog_start: backlog(a),
            backlog_end: backlog(b),
            backlog_max: in_window.iter().map(backlog).max().unwrap_or(0),
            ready_max: in_window.iter().map(|s| s.ready).max().unwrap_or(0),
            latency_ms: mean_backlog / completed_rate * 1e3,
            worker_us: (b.worker_cpu - a.worker_cpu) / tasks as f64 * 1e6,
            worker_pct: (b.worker_cpu - a.worker_cpu) / span * 100.0,
            broker_us: (b.broker_cpu - a.broker_cpu) / tasks as f64 * 1e6,
            producer_us: (b.producer_cpu - a.producer_cpu) / (b.confirmed - a.confirmed).max(1) as f64 * 1e6,
            idle_pct: (b.idle - a.idle) / span * 100.0,
        };

        self.wait_settled(on, &mut conn, &queue).await?;
        let window = match (dash_pid, a.dash, b.dash) {
            (Some(_), Some(da), Some(db)) => Some(Window {
                cpu_pct: (db.0 - da.0) / span * 100.0,
                rss_start,
                rss_steady: db.1,
                peak: samples.iter().filter_map(|s| s.dash.map(|d| d.1)).max().unwrap_or(0),
            }),
            _ => None,
        };
        let client_cpu_pct = match (a.client_cpu, b.client_cpu) {
            (Some(x), Some(y)) => (y - x) / span * 100.0,
            _ => f64::NAN,
        };
        let ends = Ends { window, emptied, tasks: published, client, client_cpu_pct };
        let (cost, client, worker_dropped) = self.finish(on, &mut conn, &queue, worker, dash, ends).await?;
        Ok(CaseRun {
            broker: broker.to_string(),
            case,
            drain: None,
            paced: Some(paced),
            dash: cost,
            client,
            worker_dropped,
        })
    }

    /// What watches a case's worker: for the cases with a dashboard, `celeriac dashboard` (started
    /// first, so that it sees every event), and for the last case the page-like client.
    async fn watchers(&self, case: Case, url: &str, queue: &str) -> Result<Watchers> {
        let dash = if case.dashboard() { Some(self.start_dashboard(url, queue).await?) } else { None };
        let (dash_pid, dash_addr) = match &dash {
            Some((p, addr)) => (Some(p.pid()), Some(*addr)),
            None => (None, None),
        };
        let rss_start = dash_pid.and_then(rss_kib).unwrap_or(0);
        let client = match (case, dash_addr) {
            (Case::DashboardClient, Some(addr)) => Some(PageClient::start(addr).await?),
            _ => None,
        };
        Ok(Watchers { dash, dash_pid, rss_start, client })
    }

    /// Once the queue is empty: wait (up to 60 s) until nothing is unacknowledged either.
    async fn wait_settled(&self, on: On, conn: &mut Option<redis::Connection>, queue: &str) -> Result<()> {
        match on {
            On::Rabbit => self.wait_all_acked(queue).await,
            On::Redis => {
                let conn = conn.as_mut().context("no Redis connection")?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while redis::cmd("HLEN").arg("unacked").query::<u64>(conn)? > 0 {
                    ensure!(
                        Instant::now() < deadline,
                        "Redis: messages still unacknowledged 60s after {queue} emptied"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(())
            }
        }
    }

    /// The end of a case, the same in both modes: what the dashboard cost (its window, then
    /// until it caught up), the page client stopped with its CPU, the worker and the dashboard
    /// stopped and the queue deleted; with the events the worker said it dropped.
    async fn finish(
        &self,
        on: On,
        conn: &mut Option<redis::Connection>,
        queue: &str,
        worker: Proc,
        dash: Option<(Proc, SocketAddr)>,
        ends: Ends,
    ) -> Result<(Option<DashCost>, Option<ClientStats>, u64)> {
        let cost = match (&dash, ends.window) {
            (Some((proc, addr)), Some(window)) => {
                Some(dash_after(proc, *addr, proc.pid(), ends.emptied, ends.tasks, window).await?)
            }
            _ => None,
        };
        let client = match ends.client {
            Some(c) => {
                let mut stats = c.stop().await?;
                stats.cpu_pct = ends.client_cpu_pct;
                Some(stats)
            }
            None => None,
        };
        let worker_dropped = dropped(&worker.tail(usize::MAX));
        worker.stop(STOP_LIMIT)?;
        if let Some((proc, _)) = dash {
            proc.stop(STOP_LIMIT)?;
        }
        match on {
            On::Rabbit => self.admin.delete(queue).await?,
            On::Redis => {
                let conn = conn.as_mut().context("no Redis connection")?;
                redis::cmd("DEL").arg(queue).query::<()>(conn)?;
            }
        }
        Ok((cost, client, worker_dropped))
    }

    /// Start `celeriac dashboard` on a free loopback port, watching `queue` of `url`; wait until
    /// it has answered a poll (`connected`).
    async fn start_dashboard(&self, url: &str, queue: &str) -> Result<(Proc, SocketAddr)> {
        let mut cmd = Command::new(&self.celeriac_bin);
        cmd.args(["dashboard", "--broker", url, "--result-backend", &self.redis.url])
            .args(["--listen", "127.0.0.1:0", "-Q", queue, "-l", "warn"])
            .env_remove("CELERIAC_BROKER_URL")
            .env_remove("CELERIAC_RESULT_BACKEND")
            .env_remove("CELERIAC_DASHBOARD_TOKEN")
            .env_remove("CELERIAC_LOG")
            .env("NO_COLOR", "1");
        let proc = Proc::spawn("celeriac dashboard", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            proc.check_alive()?;
            let said = proc.tail(50);
            let addr = said
                .lines()
                .find_map(|l| l.strip_prefix("dashboard at http://"))
                .and_then(|rest| rest.split('/').next())
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if let Some(addr) = addr {
                break addr;
            }
            ensure!(Instant::now() < deadline, "the dashboard did not say where it listens within 30 s:\n{said}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            proc.check_alive()?;
            if let Ok((200, body)) = http_get(addr, OVERVIEW).await {
                if serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["connected"].as_bool()) == Some(true) {
                    break;
                }
            }
            ensure!(Instant::now() < deadline, "the dashboard was not connected to {url} within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((proc, addr))
    }
}

/// What was read of the dashboard during a case's window, KiB and % of one core.
/// What a case measured, for [`Bench::finish`]: the dashboard's window (when it ran), when the
/// worker was seen done, how many tasks it ran, and the page client with its CPU (% of a core)
/// over the window.
struct Ends {
    window: Option<Window>,
    emptied: Instant,
    tasks: u64,
    client: Option<PageClient>,
    client_cpu_pct: f64,
}

struct Window {
    cpu_pct: f64,
    rss_start: u64,
    rss_steady: u64,
    peak: u64,
}

/// After the window: wait (up to 60 s after `emptied`) until the dashboard at `addr` (process
/// `proc`, `pid`) has counted `n` successes, then watch it hold its tasks for [`HOLD`]; its cost
/// in all.
async fn dash_after(proc: &Proc, addr: SocketAddr, pid: u32, emptied: Instant, n: u64, w: Window) -> Result<DashCost> {
    let mut peak = w.peak;
    // Every success counted, or a deadline.
    let deadline = emptied + Duration::from_secs(60);
    let (caught_up, succeeded) = loop {
        proc.check_alive()?;
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        let (status, body) = http_get(addr, OVERVIEW).await?;
        ensure!(status == 200, "the dashboard answered {status} to {OVERVIEW}");
        let succeeded = successes(&body)?;
        if succeeded >= n {
            break (Some(emptied.elapsed().as_secs_f64()), succeeded);
        }
        if Instant::now() >= deadline {
            break (None, succeeded);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Holding its tasks: memory and CPU for a while (the poller runs, the client fetches).
    let (hold_cpu0, hold_started) = (cpu_secs(pid), Instant::now());
    let mut held_rss = 0;
    while hold_started.elapsed() < HOLD {
        tokio::time::sleep(Duration::from_millis(250)).await;
        held_rss = rss_kib(pid).unwrap_or(0);
        peak = peak.max(held_rss);
    }
    let cpu_held_pct = (cpu_secs(pid) - hold_cpu0) / hold_started.elapsed().as_secs_f64() * 100.0;
    let (status, body) = http_get(addr, "/api/tasks?limit=1").await?;
    ensure!(status == 200, "the dashboard answered {status} to /api/tasks");
    let held = serde_json::from_slice::<Value>(&body)?["total"].as_u64().unwrap_or(0);
    let mib = |k: u64| k as f64 / 1024.0;
    Ok(DashCost {
        cpu_pct: w.cpu_pct,
        rss_start_mib: mib(w.rss_start),
        rss_peak_mib: mib(peak),
        rss_steady_mib: mib(w.rss_steady),
        rss_held_mib: mib(held_rss),
        cpu_held_pct,
        held,
        succeeded,
        caught_up_secs: caught_up,
    })
}

/// The dashboard (its process, address and pid), its RSS once ready (KiB), and the page-like
/// client, of a case.
struct Watchers {
    dash: Option<(Proc, SocketAddr)>,
    dash_pid: Option<u32>,
    rss_start: u64,
    client: Option<PageClient>,
}

/// One reading of the paced mode.
struct PacedSample {
    at: Instant,
    /// Sends the producer had confirmed.
    confirmed: u64,
    /// Tasks the worker had completed.
    completed: u64,
    /// Ready messages in the queue.
    ready: u64,
    /// CPU seconds so far: the worker (tree), the broker, the producer's thread.
    worker_cpu: f64,
    broker_cpu: f64,
    producer_cpu: f64,
    /// The machine's idle CPU seconds so far (all cores).
    idle: f64,
    /// The dashboard's CPU seconds and RSS KiB.
    dash: Option<(f64, u64)>,
    /// The page-like client's CPU seconds.
    client_cpu: Option<f64>,
}

/// A loopback address with a free port (bound, read, released), for a worker's metrics.
fn free_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?)
}

/// The tasks a worker has completed (`celeriac_tasks_total{task="celeriac.noop",state="SUCCESS"}`
/// of its metrics endpoint at `addr`; 0 before its first task, when the series is not there yet).
async fn completed(addr: SocketAddr) -> Result<u64> {
    let (status, body) = http_get(addr, "/metrics").await?;
    ensure!(status == 200, "the worker's metrics endpoint answered {status}");
    let text = std::str::from_utf8(&body).context("the worker's metrics are not UTF-8")?;
    let series = "celeriac_tasks_total{task=\"celeriac.noop\",state=\"SUCCESS\"}";
    match text.lines().find_map(|l| l.strip_prefix(series)) {
        Some(v) => v.trim().parse::<f64>().map(|v| v as u64).with_context(|| format!("{series} is {v:?}")),
        None => Ok(0),
    }
}

/// Idle CPU seconds of the whole machine so far (`/proc/stat`'s `cpu` line: idle + iowait);
/// `NaN` if it cannot be read.
fn machine_idle_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return f64::NAN };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return f64::NAN };
    let f: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    match (f.get(3), f.get(4)) {
        // USER_HZ is 100 on every Linux the benchmark runs on.
        (Some(idle), Some(iowait)) => (idle + iowait) as f64 / 100.0,
        _ => f64::NAN,
    }
}

/// The largest `dropped=N` of the worker's "events dropped" warnings (0 without one).
fn dropped(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("events dropped"))
        .filter_map(|l| l.split("dropped=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// The successes `/api/overview` counted (its `throughput`: `[{minute, succeeded, failed}]`).
fn successes(overview: &[u8]) -> Result<u64> {
    let v: Value = serde_json::from_slice(overview).context("the overview is not JSON")?;
    let minutes = v["throughput"].as_array().context("the overview has no throughput list")?;
    Ok(minutes.iter().filter_map(|m| m["succeeded"].as_u64()).sum())
}

/// `GET path` on a new connection (`Connection: close`): the status and the body (the
/// dashboard's JSON answers carry a `Content-Length`, never chunks).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {path} on the dashboard took over 10 s"))??;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("an HTTP answer without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("an HTTP answer without a status: {head}"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// One kept-alive HTTP/1.1 connection to the dashboard, as a browser's: a `GET` at a time, each
/// answer read by its `Content-Length` (the dashboard's JSON answers carry one, never chunks);
/// made again when the server closed it.
struct KeptAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeptAlive {
    /// `GET path`: the status and the body.
    async fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        let addr = self.addr;
        let conn = match self.conn.take() {
            Some(c) => c,
            None => BufReader::new(TcpStream::connect(addr).await.context("connecting to the dashboard")?),
        };
        let exchange = async move {
            let mut conn = conn;
            conn.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
            let mut line = String::new();
            conn.read_line(&mut line).await?;
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("an HTTP answer without a status: {line:?}"))?;
            let (mut length, mut close) = (None, false);
            loop {
                line.clear();
                ensure!(conn.read_line(&mut line).await? > 0, "the dashboard closed the connection in a header");
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap_or((header, ""));
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse::<usize>().ok(),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
            let length = length.context("an answer without a Content-Length")?;
            let mut body = vec![0; length];
            conn.read_exact(&mut body).await?;
            anyhow::Ok((status, body, (!close).then_some(conn)))
        };
        let (status, body, conn) = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .with_context(|| format!("GET {path} on the dashboard took over 10 s"))??;
        self.conn = conn;
        Ok((status, body))
    }
}

/// A client that behaves as the dashboard's page on its tasks view (`assets/app.js`): it holds
/// `/api/stream` open and, on each `update` (one more after a refresh if any came during it) and
/// [`PAGE_QUIET`] after its last refresh when none came, fetches [`TASKS_VIEW`] then
/// [`OVERVIEW`] on one kept-alive connection. It runs on a thread of its own, with a runtime of
/// its own, so its CPU is read apart from the rest of this process ([`PageClient::cpu_secs`]).
struct PageClient {
    thread: std::thread::JoinHandle<Result<ClientStats>>,
    tid: i32,
    cpu_at_start: f64,
    updates: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
}

impl PageClient {
    async fn start(addr: SocketAddr) -> Result<Self> {
        let updates = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let (up, is_up) = tokio::sync::oneshot::channel::<Result<i32>>();
        let thread = {
            let (updates, stop) = (updates.clone(), stop.clone());
            std::thread::Builder::new().name("page-client".into()).spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(Self::run(addr, updates, stop, up))
            })?
        };
        let tid = match is_up.await {
            Ok(r) => r?,
            Err(_) => bail!("the page client stopped before it connected: {:?}", thread.join().map(|r| r.err())),
        };
        let cpu_at_start = thread_cpu_secs(tid)
            .with_context(|| format!("cannot read the page client's CPU time (/proc/self/task/{tid}/schedstat)"))?;
        Ok(PageClient { thread, tid, cpu_at_start, updates, stop })
    }

    /// The client's thread: connect the stream, say so on `up` (with the thread's id), then
    /// refresh as the page does until `stop`.
    async fn run(
        addr: SocketAddr,
        updates: Arc<AtomicU64>,
        stop: Arc<tokio::sync::Notify>,
        up: tokio::sync::oneshot::Sender<Result<i32>>,
    ) -> Result<ClientStats> {
        let connected = async {
            let mut stream = TcpStream::connect(addr).await.context("connecting to the dashboard's stream")?;
            stream
                .write_all(
                    format!("GET /api/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").as_bytes(),
                )
                .await?;
            anyhow::Ok(stream)
        }
        .await;
        let stream = match connected {
            Ok(s) => {
                let _ = up.send(Ok(nix::unistd::gettid().as_raw()));
                s
            }
            Err(e) => {
                let _ = up.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let update = Arc::new(tokio::sync::Notify::new());
        let reader = {
            let (update, updates) = (update.clone(), updates.clone());
            tokio::spawn(async move {
                // Chunked transfer: an event's lines come whole in one chunk; the chunks' size
                // lines do not look like them.
                let mut lines = BufReader::new(stream).lines();
                while let Some(line) = lines.next_line().await? {
                    if line.trim() == "event: update" {
                        updates.fetch_add(1, Ordering::Relaxed);
                        // One stored permit: updates during a refresh make one more, never more.
                        update.notify_one();
                    }
                }
                bail!("the dashboard closed its stream")
            })
        };
        let mut conn = KeptAlive { addr, conn: None };
        let mut stats = ClientStats::default();
        let mut total_ms = 0.0;
        loop {
            tokio::select! {
                _ = update.notified() => {}
                _ = tokio::time::sleep(PAGE_QUIET) => {}
                _ = stop.notified() => break,
            }
            if reader.is_finished() {
                break;
            }
            let started = Instant::now();
            for path in [TASKS_VIEW, OVERVIEW] {
                let (status, body) = conn.get(path).await?;
                ensure!(status == 200, "the dashboard answered {status} to {path}");
                stats.bytes += body.len() as u64;
            }
            let ms = started.elapsed().as_secs_f64() * 1e3;
            total_ms += ms;
            stats.slowest_ms = stats.slowest_ms.max(ms);
            stats.refreshes += 1;
        }
        if reader.is_finished() {
            reader.await.context("the stream reader")??;
            bail!("the stream reader stopped");
        }
        reader.abort();
        stats.mean_ms = if stats.refreshes > 0 { total_ms / stats.refreshes as f64 } else { 0.0 };
        Ok(stats)
    }

    /// CPU seconds the client's thread has used so far (`NaN` if it cannot be read).
    fn cpu_secs(&self) -> f64 {
        thread_cpu_secs(self.tid).unwrap_or(f64::NAN)
    }

    /// Stop refreshing; what it did. An error if the stream or a fetch failed meanwhile.
    async fn stop(self) -> Result<ClientStats> {
        let cpu_secs = self.cpu_secs() - self.cpu_at_start;
        self.stop.notify_one();
        let thread = self.thread;
        let joined = tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || thread.join()))
            .await
            .context("the page client did not stop within 30 s")?
            .context("waiting for the page client")?;
        let mut stats = match joined {
            Ok(r) => r.context("the page client")?,
            Err(_) => bail!("the page client panicked"),
        };
        stats.updates = self.updates.load(Ordering::Relaxed);
        stats.cpu_secs = cpu_secs;
        Ok(stats)
    }
}

/// The median of some figures (`NaN` with none).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The targets: the dashboard under this much of one core, this much memory, and the
/// worker slowed by less than this fraction.
const CPU_TARGET_PCT: f64 = 20.0;
const RSS_TARGET_MB: f64 = 100.0;
const SLOWDOWN_TARGET: f64 = 0.05;

/// The part's table (medians over the runs) and the verdicts, as Markdown lines.
pub fn report(runs: &[Vec<CaseRun>]) -> Vec<String> {
    if runs.iter().flatten().any(|r| r.paced.is_some()) {
        return paced_report(runs);
    }
    let mut out = Vec::new();
    let mut brokers: Vec<&str> = runs.iter().flatten().map(|r| r.broker.as_str()).collect();
    brokers.dedup();
    brokers.sort_unstable();
    brokers.dedup();
    for broker in brokers {
        let of = |case: Case| -> Vec<&CaseRun> {
            runs.iter().flatten().filter(|r| r.broker == broker && r.case == case).collect()
        };
        let rate = |case: Case| median(of(case).iter().filter_map(|r| r.drain.as_ref()).map(|d| d.rate).collect());
        let dash = |case: Case, f: fn(&DashCost) -> f64| {
            median(of(case).iter().filter_map(|r| r.dash.as_ref()).map(f).collect())
        };
        let events = rate(Case::Events);
        out.push(String::new());
        out.push(format!(
            "Dashboard part, {broker} broker ({} run{}, medians):",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" }
        ));
        out.push(String::new());
        out.push(
            "| case | worker drain | against -E alone | worker CPU per task | dashboard CPU, steady | RSS ready / end of \
             window / peak / holding 10,000 | CPU holding | every success counted | events the worker dropped |"
                .into(),
        );
        out.push("|---|---|---|---|---|---|---|---|---|".into());
        for case in Case::ALL {
            let runs_of = of(case);
            if runs_of.is_empty() {
                continue;
            }
            let r = rate(case);
            let against =
                if case == Case::Events { "—".to_string() } else { format!("{:+.1}%", (r / events - 1.0) * 100.0) };
            let us = median(runs_of.iter().filter_map(|r| r.drain.as_ref()).map(|d| d.consumer_us).collect());
            let (cpu, rss, held_cpu, caught) = if case.dashboard() {
                let caught: Vec<String> = runs_of
                    .iter()
                    .filter_map(|r| r.dash.as_ref())
                    .map(|d| d.caught_up_secs.map_or("no".to_string(), |s| format!("{s:.1} s after")))
                    .collect();
                (
                    format!("{:.1}%", dash(case, |d| d.cpu_pct)),
                    format!(
                        "{:.1} / {:.1} / {:.1} / {:.1} MiB",
                        dash(case, |d| d.rss_start_mib),
                        dash(case, |d| d.rss_steady_mib),
                        dash(case, |d| d.rss_peak_mib),
                        dash(case, |d| d.rss_held_mib)
                    ),
                    format!("{:.1}%", dash(case, |d| d.cpu_held_pct)),
                    caught.join(", "),
                )
            } else {
                ("—".into(), "—".into(), "—".into(), "—".into())
            };
            let dropped: Vec<String> = runs_of
                .iter()
                .map(|r| if r.worker_dropped == 0 { "0".into() } else { format!("≥ {}", r.worker_dropped) })
                .collect();
            out.push(format!(
                "| {} | {}/s | {against} | {us:.0} µs | {cpu} | {rss} | {held_cpu} | {caught} | {} |",
                case.describe(),
                crate::report::thousands(r),
                dropped.join(", ")
            ));
        }
        out.push(String::new());
        for case in [Case::Dashboard, Case::DashboardClient] {
            if of(case).is_empty() {
                continue;
            }
            let cpu = dash(case, |d| d.cpu_pct);
            let peak_mb = dash(case, |d| d.rss_peak_mib) * 1.048_576;
            let slowdown = 1.0 - rate(case) / events;
            let verdict = |ok: bool| if ok { "met" } else { "missed" };
            let slowed = if events.is_nan() {
                "worker's slowdown not measured (no -E case run)".to_string()
            } else {
                format!(
                    "worker slowed by {:.1}% against -E alone (target under {:.0}%: {})",
                    slowdown * 100.0,
                    SLOWDOWN_TARGET * 100.0,
                    verdict(slowdown < SLOWDOWN_TARGET)
                )
            };
            out.push(format!(
                "{} ({} broker, worker at {}/s): dashboard CPU {cpu:.1}% of one core (target under {CPU_TARGET_PCT:.0}%: {}); \
                 peak RSS {peak_mb:.0} MB (target under {RSS_TARGET_MB:.0} MB: {}); {slowed}",
                case.describe(),
                broker,
                crate::report::thousands(rate(case)),
                verdict(cpu < CPU_TARGET_PCT),
                verdict(peak_mb < RSS_TARGET_MB),
            ));
            let clients: Vec<&ClientStats> = of(case).into_iter().filter_map(|r| r.client.as_ref()).collect();
            if !clients.is_empty() {
                out.push(format!(
                    "  the page's client itself (a thread of the benchmark, on the worker's machine; a browser elsewhere \
                     would cost it nothing): {:.2}% of one core over the window, {:.0} refreshes of {:.0} updates \
                     (medians of {} run{})",
                    median(clients.iter().map(|c| c.cpu_pct).collect()),
                    median(clients.iter().map(|c| c.refreshes as f64).collect()),
                    median(clients.iter().map(|c| c.updates as f64).collect()),
                    clients.len(),
                    if clients.len() == 1 { "" } else { "s" }
                ));
            }
        }
    }
    out
}

/// The paced mode's table (medians over the runs, with each run's worker CPU per task) and the
/// verdicts, as Markdown lines. "Slowed" is the worker's CPU per task with the dashboard against
/// with `-E` alone (the worker holds the rate in both, so its rate cannot show a slowdown; its
/// CPU per task, and the time a task waits, can), and whether it still holds the rate.
fn paced_report(runs: &[Vec<CaseRun>]) -> Vec<String> {
    let mut out = Vec::new();
    let mut brokers: Vec<&str> = runs.iter().flatten().map(|r| r.broker.as_str()).collect();
    brokers.sort_unstable();
    brokers.dedup();
    let dash_of = |r: &CaseRun, f: fn(&DashCost) -> f64| r.dash.as_ref().map(f);
    for broker in brokers {
        // Each run's case, in run order (None where a run did not have it).
        let per_run = |case: Case| -> Vec<Option<&CaseRun>> {
            runs.iter().map(|run| run.iter().find(|r| r.broker == broker && r.case == case)).collect()
        };
        let paced = |case: Case| -> Vec<&Paced> {
            per_run(case).into_iter().flatten().filter_map(|r| r.paced.as_ref()).collect()
        };
        let med = |case: Case, f: fn(&Paced) -> f64| median(paced(case).into_iter().map(f).collect());
        let rate = paced(Case::Events).first().or(paced(Case::Plain).first()).map_or(0, |p| p.rate);
        out.push(String::new());
        out.push(format!(
            "Dashboard part, paced, {broker} broker, the producer asked for {}/s ({} run{}, medians):",
            crate::report::thousands(rate as f64),
            runs.len(),
            if runs.len() == 1 { "" } else { "s" }
        ));
        out.push(String::new());
        out.push(
            "| case | producer | worker | rate held / worker kept up | backlog end / max | latency (Little) | worker CPU per task (each run) | \
             against -E alone | worker CPU | broker CPU per task | machine idle | dashboard CPU | dashboard RSS peak | \
             events the worker dropped |"
                .into(),
        );
        out.push("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into());
        let events_us = med(Case::Events, |p| p.worker_us);
        for case in Case::ALL {
            let ps = paced(case);
            if ps.is_empty() {
                continue;
            }
            let us = med(case, |p| p.worker_us);
            let each: Vec<String> = ps.iter().map(|p| format!("{:.1}", p.worker_us)).collect();
            let against = if case == Case::Events {
                "—".to_string()
            } else {
                format!("{:+.1}%", (us / events_us - 1.0) * 100.0)
            };
            let kept = ps.iter().filter(|p| p.kept_up()).count();
            let held = ps.iter().filter(|p| p.held()).count();
            let runs_of: Vec<&CaseRun> = per_run(case).into_iter().flatten().collect();
            let (cpu, rss) = if case.dashboard() {
                (
                    format!("{:.1}%", median(runs_of.iter().filter_map(|r| dash_of(r, |d| d.cpu_pct)).collect())),
                    format!(
                        "{:.1} MiB",
                        median(runs_of.iter().filter_map(|r| dash_of(r, |d| d.rss_peak_mib)).collect())
                    ),
                )
            } else {
                ("—".into(), "—".into())
            };
            let dropped: Vec<String> = runs_of
                .iter()
                .map(|r| if r.worker_dropped == 0 { "0".into() } else { format!("≥ {}", r.worker_dropped) })
                .collect();
            out.push(format!(
                "| {} | {}/s | {}/s | {held} / {kept} of {} | {:.0} / {:.0} | {:.1} ms | {us:.1} µs ({}) | {against} | {:.1}% | {:.1} µs | {:.0}% | {cpu} | {rss} | {} |",
                case.describe(),
                crate::report::thousands(med(case, |p| p.offered)),
                crate::report::thousands(med(case, |p| p.completed)),
                ps.len(),
                med(case, |p| p.backlog_end as f64),
                med(case, |p| p.backlog_max as f64),
                med(case, |p| p.latency_ms),
                each.join(", "),
                med(case, |p| p.worker_pct),
                med(case, |p| p.broker_us),
                med(case, |p| p.idle_pct),
                dropped.join(", ")
            ));
        }
        out.push(String::new());
        let events = per_run(Case::Events);
        for case in [Case::Dashboard, Case::DashboardClient] {
            let ps = paced(case);
            if ps.is_empty() {
                continue;
            }
            if events_us.is_nan() {
                out.push(format!("{} ({broker}): no -E case run, the slowdown is not measured", case.describe()));
                continue;
            }
            // Within each run, the case against that run's -E alone.
            let paired: Vec<String> = per_run(case)
                .iter()
                .zip(&events)
                .filter_map(|(c, e)| Some((c.and_then(|c| c.paced.as_ref())?, e.and_then(|e| e.paced.as_ref())?)))
                .map(|(c, e)| format!("{:+.1}%", (c.worker_us / e.worker_us - 1.0) * 100.0))
                .collect();
            let us = med(case, |p| p.worker_us);
            let slowed = us / events_us - 1.0;
            let (kept, n) = (ps.iter().filter(|p| p.kept_up()).count(), ps.len());
            out.push(format!(
                "{} ({broker}, asked {}/s): worker CPU per task {us:.1} µs against {events_us:.1} µs with -E alone, {:+.1}% \
                 (each run against its own -E alone: {}; target under {:.0}%: {}); latency {:.1} ms against {:.1} ms; \
                 the producer held the rate in {} of {n} runs and the worker kept up with it in {kept} (-E alone: {} and {} \
                 of {})",
                case.describe(),
                crate::report::thousands(rate as f64),
                slowed * 100.0,
                paired.join(", "),
                SLOWDOWN_TARGET * 100.0,
                if slowed < SLOWDOWN_TARGET { "met" } else { "missed" },
                med(case, |p| p.latency_ms),
                med(Case::Events, |p| p.latency_ms),
                ps.iter().filter(|p| p.held()).count(),
                paced(Case::Events).iter().filter(|p| p.held()).count(),
                paced(Case::Events).iter().filter(|p| p.kept_up()).count(),
                paced(Case::Events).len(),
            ));
        }
    }
    out
}
