//! The measurements: publish throughput with confirms, drain throughput, round-trip latency and
//! worker memory, for celeriac, Celery and the bare lapin client.
//!
//! Every system is measured on the same RabbitMQ vhost and Redis database, each on a queue of its
//! own that is deleted afterwards. Workers are real processes (`celeriac worker`, `celery
//! worker`); the bare clients run in this process. Every wait has a deadline.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use celeriac::{Client, SendOptions};
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Map, Value};

use crate::env::{python_dir, RedisDb, Vhost};
use crate::procs::{self, Proc, Rss};
use crate::rabbit::{self, Admin, Drain};

/// How long a worker may take to start consuming.
pub(crate) const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a worker may take to stop after SIGTERM.
pub(crate) const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Idle time before reading a fresh worker's memory.
const SETTLE: Duration = Duration::from_secs(1);

/// Counts and settings of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Messages each Rust publisher sends (timed).
    pub publish: u64,
    /// Messages Celery's publish loop sends (timed).
    pub celery_publish: u64,
    /// Messages in the queue celeriac's worker and the bare consumer drain.
    pub drain: u64,
    /// Messages in the queue Celery's workers drain.
    pub celery_drain: u64,
    /// Timed round trips.
    pub roundtrips: u64,
    /// Untimed operations first (publishes, round trips).
    pub warmup: u64,
    /// Publishes in flight (celeriac client and bare publisher).
    pub in_flight: usize,
    /// Worker concurrency (both workers).
    pub concurrency: usize,
    /// Extra arguments for `celeriac worker`.
    pub worker_args: Vec<String>,
    /// Prefetch of the bare consumer.
    pub bare_prefetch: u16,
    /// The bare consumer acknowledges every this many deliveries.
    pub bare_ack_every: u64,
    /// Also drain with the celeriac worker at the bare consumer's prefetch and the bare
    /// consumer at the worker's.
    pub window_rows: bool,
    /// Also measure celeriac's prefork pool (drain and memory; the canvas part too).
    pub prefork: bool,
    /// Header tasks of the canvas part's chord (0: no chord).
    pub chord: u64,
    /// Steps of the canvas part's chain (0: no chain).
    pub chain: u64,
}

/// Who drains a queue.
#[derive(Debug, Clone, Copy)]
enum Consumer<'a> {
    /// The bare lapin consumer, in this process.
    Bare { prefetch: u16, ack_every: u64 },
    /// `celeriac worker` with extra arguments.
    Celeriac { extra: &'a [String] },
    /// `celery worker` with this pool.
    Celery { pool: &'a str },
}

/// Everything a measurement needs.
pub struct Bench {
    /// Counts.
    pub settings: Settings,
    /// The run's vhost.
    pub vhost: Vhost,
    /// The run's Redis database (results).
    pub redis: RedisDb,
    /// A connection for queue depths.
    pub admin: Admin,
    /// The `celeriac` binary.
    pub celeriac_bin: PathBuf,
    /// The virtualenv's python.
    pub python: PathBuf,
    /// The virtualenv's `celery`.
    pub celery_bin: PathBuf,
    /// RabbitMQ's process (for its CPU time), if found.
    pub broker_pid: Option<u32>,
}

fn noop_options(queue: &str) -> SendOptions {
    SendOptions { queue: Some(queue.to_string()), ignore_result: Some(true), ..SendOptions::default() }
}

/// Send `n` `celeriac.noop` to `queue` with `in_flight` sends pipelined.
pub(crate) async fn send_noops(client: &Client, queue: &str, n: u64, in_flight: usize) -> Result<()> {
    send_many(client, "celeriac.noop", |_| Vec::new(), &noop_options(queue), n, in_flight).await
}

/// Send `n` tasks `name` with `opts`, the `i`th with the arguments `args(i)`, `in_flight` sends
/// pipelined (protocol v2, confirmed).
pub(crate) async fn send_many(
    client: &Client,
    name: &str,
    args: impl Fn(u64) -> Vec<Value>,
    opts: &SendOptions,
    n: u64,
    in_flight: usize,
) -> Result<()> {
    futures::stream::iter(0..n)
        .map(|i| client.send_task(name, args(i), Map::new(), opts.clone()))
        .buffer_unordered(in_flight)
        .map_err(anyhow::Error::from)
        .try_for_each(|_| async { Ok(()) })
        .await
}

/// Publish results, messages per second.
#[derive(Debug, Default)]
pub struct Publish {
    /// celeriac `Client::send_task`, pipelined.
    pub celeriac: Option<f64>,
    /// Celery's `apply_async` loop with `confirm_publish`.
    pub celery: Option<f64>,
    /// Bare lapin, 1,024 confirms in flight.
    pub bare: Option<f64>,
    /// The same with the headers of a celeriac message.
    pub bare_headers: Option<f64>,
    /// Body bytes of a celeriac `celeriac.noop` message (the bare publisher's body).
    pub body_bytes: usize,
    /// Body bytes of Celery's message.
    pub celery_body_bytes: Option<u64>,
    /// Celery's version as reported by the script.
    pub celery_version: Option<String>,
}

/// Drain results, tasks per second.
#[derive(Debug, Default)]
pub struct DrainResults {
    /// The celeriac worker.
    pub celeriac: Option<Drain>,
    /// Celery prefork.
    pub celery: Option<Drain>,
    /// Celery solo.
    pub celery_solo: Option<Drain>,
    /// The bare consumer.
    pub bare: Option<Drain>,
    /// The celeriac worker with the bare consumer's prefetch.
    pub celeriac_wide: Option<Drain>,
    /// The bare consumer with the celeriac worker's default prefetch.
    pub bare_narrow: Option<Drain>,
    /// celeriac worker memory once the queue is empty.
    pub celeriac_rss: Option<Rss>,
    /// The celeriac worker with its prefork pool.
    pub celeriac_prefork: Option<Drain>,
    /// Its memory once the queue is empty.
    pub celeriac_prefork_rss: Option<Rss>,
    /// The prefork pool replacing each child after 100 tasks.
    pub celeriac_prefork_recycling: Option<Drain>,
    /// Celery prefork memory once the queue is empty.
    pub celery_rss: Option<Rss>,
}

/// Drain results on the Redis broker, tasks per second.
#[derive(Debug, Default)]
pub struct RedisDrainResults {
    /// The celeriac worker, async pool.
    pub celeriac: Option<Drain>,
    /// The celeriac worker, prefork pool.
    pub celeriac_prefork: Option<Drain>,
    /// Celery prefork.
    pub celery: Option<Drain>,
}

/// Round-trip results.
#[derive(Debug, Default)]
pub struct RoundTrip {
    /// celeriac client and worker: (p50, p99, mean) in ms.
    pub celeriac: Option<Latency>,
    /// Celery client and worker.
    pub celery: Option<Latency>,
    /// The `send_task` part of celeriac's round trips (publish until confirmed).
    pub celeriac_send: Option<Latency>,
    /// A bare lapin publish of the same message waiting for its confirm, one at a time.
    pub bare_confirm: Option<Latency>,
    /// The same, on the queue the celeriac worker consumes, while it consumes.
    pub bare_confirm_consumed: Option<Latency>,
    /// The celeriac worker's memory, idle before the round trips.
    pub celeriac_idle: Option<Rss>,
    /// A fresh celeriac prefork worker's memory, idle.
    pub celeriac_prefork_idle: Option<Rss>,
    /// Celery prefork's memory, idle before the round trips.
    pub celery_idle: Option<Rss>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of samples in seconds.
    pub fn from_secs(mut samples: Vec<f64>) -> Result<Self> {
        ensure!(!samples.is_empty(), "no latency samples");
        samples.sort_by(f64::total_cmp);
        let rank = |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1] * 1e3;
        Ok(Latency {
            p50: rank(0.50),
            p99: rank(0.99),
            mean: samples.iter().sum::<f64>() / samples.len() as f64 * 1e3,
            max: samples[samples.len() - 1] * 1e3,
        })
    }
}

impl Bench {
    pub(crate) fn url(&self) -> String {
        self.vhost.url()
    }

    /// A `celeriac worker` on `queue` (async pool, the run's concurrency, warnings only).
    pub(crate) fn celeriac_worker(&self, queue: &str, extra: &[String]) -> Result<Proc> {
        self.celeriac_worker_on(&self.url(), queue, extra)
    }

    /// A `celeriac worker` on `queue` of the broker at `broker`.
    fn celeriac_worker_on(&self, broker: &str, queue: &str, extra: &[String]) -> Result<Proc> {
        Proc::spawn(&format!("celeriac worker on {queue}"), &mut self.celeriac_command(broker, queue, extra))
    }

    /// The command line of a `celeriac worker` on `queue` of the broker at `broker`: results in
    /// the run's Redis database, the run's concurrency and extra worker arguments, warnings only.
    pub(crate) fn celeriac_command(&self, broker: &str, queue: &str, extra: &[String]) -> Command {
        let c = self.settings.concurrency.to_string();
        let mut cmd = Command::new(&self.celeriac_bin);
        cmd.args(["worker", "--broker", broker, "--result-backend", &self.redis.url])
            .args(["-Q", queue, "-c", &c, "-l", "warn", "-n", &format!("bench-{queue}@localhost")])
            .args(&self.settings.worker_args)
            .args(extra)
            .env_remove("CELERIAC_BROKER_URL")
            .env_remove("CELERIAC_RESULT_BACKEND")
            .env_remove("CELERIAC_LOG")
            .env("NO_COLOR", "1");
        cmd
    }

    /// A `celery worker` on `queue` with `pool` (prefork or solo) and the run's concurrency.
    pub(crate) fn celery_worker(&self, queue: &str, pool: &str) -> Result<Proc> {
        self.celery_worker_on(&self.url(), queue, pool)
    }

    /// A `celery worker` on `queue` of the broker at `broker`.
    fn celery_worker_on(&self, broker: &str, queue: &str, pool: &str) -> Result<Proc> {
        Proc::spawn(
            &format!("celery worker -P {pool} on {queue}"),
            &mut self.celery_command("benchtasks", broker, queue, pool),
        )
    }

    /// The command line of `celery -A app worker` (an app of `crates/celeriac-bench/python`) on
    /// `queue` of the broker at `broker` with `pool` and the run's concurrency: no gossip,
    /// mingle or heartbeat, results in the run's Redis database.
    pub(crate) fn celery_command(&self, app: &str, broker: &str, queue: &str, pool: &str) -> Command {
        let c = self.settings.concurrency.to_string();
        let mut cmd = Command::new(&self.celery_bin);
        cmd.args(["-A", app, "worker", "-P", pool, "-c", &c, "-Q", queue, "-l", "WARNING"])
            .args(["-n", &format!("bench-{queue}@%h"), "--without-gossip", "--without-mingle", "--without-heartbeat"])
            .current_dir(python_dir())
            .env("PYTHONPATH", python_dir())
            .env("BENCH_BROKER_URL", broker)
            .env("BENCH_RESULT_BACKEND", &self.redis.url);
        cmd
    }

    /// Run `celery_bench.py` with `args`; its one JSON line.
    pub(crate) async fn celery_script(&self, args: &[&str], confirm: bool, limit: Duration) -> Result<Value> {
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.arg(python_dir().join("celery_bench.py"))
            .args(args)
            .env("BENCH_BROKER_URL", self.url())
            .env("BENCH_RESULT_BACKEND", &self.redis.url)
            .env("BENCH_CONFIRM_PUBLISH", if confirm { "1" } else { "0" })
            .kill_on_drop(true);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .with_context(|| format!("celery_bench.py {args:?} did not finish within {limit:?}"))??;
        if !out.status.success() {
            bail!("celery_bench.py {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().context("celery_bench.py printed nothing")?;
        serde_json::from_str(line).with_context(|| format!("celery_bench.py printed {line:?}"))
    }

    /// Fill `queue` with `n` `celeriac.noop` (sent by a celeriac client) and check the depth.
    async fn fill(&self, queue: &str, n: u64) -> Result<()> {
        let client = Client::connect(&self.url(), None).await?;
        let started = Instant::now();
        send_noops(&client, queue, n, self.settings.in_flight).await?;
        let (ready, _) = self.admin.depth(queue).await?;
        ensure!(u64::from(ready) == n, "queue {queue} holds {ready} messages after publishing {n}");
        eprintln!("  filled {queue} with {n} messages in {:.2}s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// After the ready count reached 0: wait until nothing is unacknowledged either.
    pub(crate) async fn wait_all_acked(&self, queue: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.vhost.messages(queue)? == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("queue {queue} still has unacknowledged messages 60s after its depth reached 0");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn drain_limit(n: u64) -> Duration {
        Duration::from_secs(60 + n / 200)
    }

    // ----------------------------------------------------------------- publish

    /// Publish throughput with confirms: celeriac, the bare publisher, Celery.
    pub async fn publish(&self, with_celery: bool) -> Result<Publish> {
        let s = &self.settings;
        let mut out = Publish::default();
        let me = std::process::id();
        let broker_cpu = || self.broker_pid.map(procs::cpu_secs).unwrap_or(0.0);
        let report = |label: &str, elapsed: Duration, cpu: (f64, f64), n: u64| {
            let per = |secs: f64| secs / n as f64 * 1e6;
            eprintln!(
                "  {label}: {n} in {:.2}s, {:.0}/s (CPU per message: client {:.0} µs, broker {:.0} µs)",
                elapsed.as_secs_f64(),
                n as f64 / elapsed.as_secs_f64(),
                per(cpu.0),
                per(cpu.1)
            );
        };

        let client = Client::connect(&self.url(), None).await?;
        let queue = "bench.publish.celeriac";
        let message = client.build_message("celeriac.noop", Vec::new(), Map::new(), &noop_options(queue), false)?;
        out.body_bytes = message.body.len();
        send_noops(&client, queue, s.warmup, s.in_flight).await?;
        let (started, cpu0) = (Instant::now(), (procs::cpu_secs(me), broker_cpu()));
        send_noops(&client, queue, s.publish, s.in_flight).await?;
        let (elapsed, cpu1) = (started.elapsed(), (procs::cpu_secs(me), broker_cpu()));
        let (ready, _) = self.admin.depth(queue).await?;
        ensure!(u64::from(ready) == s.warmup + s.publish, "celeriac publish: {ready} messages in the queue");
        out.celeriac = Some(s.publish as f64 / elapsed.as_secs_f64());
        report("celeriac send_task", elapsed, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1), s.publish);
        self.admin.delete(queue).await?;
        drop(client);

        // The bare publisher: a body of the same size and no headers (the brief's broker limit);
        // then the same with the celeriac message's headers, to see what they cost.
        let body = vec![b' '; out.body_bytes];
        let with_headers = rabbit::Headers::of(&message);
        for (queue, headers) in [("bench.publish.bare", None), ("bench.publish.bare-headers", Some(with_headers))] {
            let cpu = || (procs::cpu_secs(me), broker_cpu());
            let (elapsed, used) = rabbit::bare_publish(
                &self.url(),
                queue,
                &body,
                headers.as_ref(),
                s.warmup,
                s.publish,
                s.in_flight,
                &cpu,
            )
            .await?;
            let (ready, _) = self.admin.depth(queue).await?;
            ensure!(u64::from(ready) == s.warmup + s.publish, "bare publish: {ready} messages in the queue");
            let rate = s.publish as f64 / elapsed.as_secs_f64();
            if headers.is_none() {
                out.bare = Some(rate);
                report("bare lapin publisher", elapsed, used, s.publish);
            } else {
                out.bare_headers = Some(rate);
                report("bare lapin publisher, celeriac's headers", elapsed, used, s.publish);
            }
            self.admin.delete(queue).await?;
        }

        if with_celery {
            let queue = "bench.publish.celery";
            let (n, w) = (s.celery_publish.to_string(), s.warmup.to_string());
            let limit = Duration::from_secs(60 + s.celery_publish / 100);
            let r =
                self.celery_script(&["publish", "--count", &n, "--warmup", &w, "--queue", queue], true, limit).await?;
            let secs = r["seconds"].as_f64().context("seconds")?;
            let (ready, _) = self.admin.depth(queue).await?;
            ensure!(u64::from(ready) == s.warmup + s.celery_publish, "Celery publish: {ready} messages in the queue");
            out.celery = Some(s.celery_publish as f64 / secs);
            out.celery_body_bytes = r["body_bytes"].as_u64();
            out.celery_version = r["celery"].as_str().map(str::to_string);
            eprintln!(
                "  Celery apply_async (confirm_publish): {} in {secs:.2}s, {:.0}/s",
                s.celery_publish,
                s.celery_publish as f64 / secs
            );
            self.admin.delete(queue).await?;
        }
        Ok(out)
    }

    // ------------------------------------------------------------------- drain

    /// Fill a queue with `n` messages, start `consumer` on it, time the drain from the queue's
    /// depth, wait until every message is acknowledged, and read the worker's memory.
    async fn drain_one(&self, queue: &str, n: u64, consumer: Consumer<'_>) -> Result<(Drain, Option<Rss>)> {
        self.fill(queue, n).await?;
        let limit = Self::drain_limit(n);
        let broker_cpu = || self.broker_pid.map(procs::cpu_secs).unwrap_or(0.0);
        let (label, drain, rss) = match consumer {
            Consumer::Bare { prefetch, ack_every } => {
                let task = tokio::spawn(rabbit::bare_consume(self.url(), queue.to_string(), n, prefetch, ack_every));
                let me = std::process::id();
                let drain =
                    self.admin.time_drain(queue, n, limit, || Ok(()), || (procs::cpu_secs(me), broker_cpu())).await?;
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .context("bare consumer did not finish")???;
                self.wait_all_acked(queue).await?;
                (format!("bare consumer, prefetch {prefetch}, ack every {ack_every}"), drain, None)
            }
            Consumer::Celeriac { extra } => {
                let worker = self.celeriac_worker(queue, extra)?;
                let drain = self
                    .admin
                    .time_drain(queue, n, limit, || worker.check_alive(), || (worker.tree_cpu(), broker_cpu()))
                    .await?;
                self.wait_all_acked(queue).await?;
                let rss = worker.rss()?;
                worker.stop(STOP_LIMIT)?;
                (format!("celeriac worker {}", extra.join(" ")), drain, Some(rss))
            }
            Consumer::Celery { pool } => {
                let worker = self.celery_worker(queue, pool)?;
                let drain = self
                    .admin
                    .time_drain(queue, n, limit, || worker.check_alive(), || (worker.tree_cpu(), broker_cpu()))
                    .await?;
                self.wait_all_acked(queue).await?;
                let rss = worker.rss()?;
                worker.stop(STOP_LIMIT)?;
                (format!("Celery {pool}"), drain, Some(rss))
            }
        };
        let rss_text = rss.as_ref().map(|r| format!(", RSS after {}", r.describe())).unwrap_or_default();
        eprintln!("  {label}: {}{rss_text}", drain.describe());
        self.admin.delete(queue).await?;
        Ok((drain, rss))
    }

    /// The prefork half of [`Bench::drain`]: celeriac's prefork pool (with and without recycling)
    /// and Celery's prefork (and solo) pool, at the run's concurrency.
    pub async fn prefork_drain(&self, with_celery: bool, with_solo: bool, out: &mut DrainResults) -> Result<()> {
        let s = &self.settings;
        if s.prefork {
            let extra = ["--pool=prefork".to_string()];
            let prefork = Consumer::Celeriac { extra: &extra };
            let (drain, rss) = self.drain_one("bench.drain.celeriac-prefork", s.celery_drain, prefork).await?;
            (out.celeriac_prefork, out.celeriac_prefork_rss) = (Some(drain), rss);
            let extra = ["--pool=prefork".to_string(), "--max-tasks-per-child=100".to_string()];
            let recycling = Consumer::Celeriac { extra: &extra };
            out.celeriac_prefork_recycling =
                Some(self.drain_one("bench.drain.celeriac-prefork-recycling", s.celery_drain, recycling).await?.0);
        }
        if with_celery {
            let (drain, rss) = self
                .drain_one("bench.drain.celery-prefork", s.celery_drain, Consumer::Celery { pool: "prefork" })
                .await?;
            (out.celery, out.celery_rss) = (Some(drain), rss);
            if with_solo {
                let solo = Consumer::Celery { pool: "solo" };
                out.celery_solo = Some(self.drain_one("bench.drain.celery-solo", s.celery_drain, solo).await?.0);
            }
        }
        Ok(())
    }

    /// Drain throughput of a pre-filled queue: bare consumer, celeriac worker, Celery prefork
    /// (and solo); then the celeriac worker and the bare consumer at each other's window.
    pub async fn drain(&self, with_celery: bool, with_solo: bool) -> Result<DrainResults> {
        let s = &self.settings;
        let mut out = DrainResults::default();
        let bare = Consumer::Bare { prefetch: s.bare_prefetch, ack_every: s.bare_ack_every };
        out.bare = Some(self.drain_one("bench.drain.bare", s.drain, bare).await?.0);
        let (drain, rss) = self.drain_one("bench.drain.celeriac", s.drain, Consumer::Celeriac { extra: &[] }).await?;
        (out.celeriac, out.celeriac_rss) = (Some(drain), rss);
        self.prefork_drain(with_celery, with_solo, &mut out).await?;
        if s.window_rows {
            // The celeriac worker with the bare consumer's window, and the bare consumer with the
            // worker's default window (prefetch = concurrency x 4, acknowledging every quarter of it).
            let multiplier = (usize::from(s.bare_prefetch) / s.concurrency).max(1);
            let extra = [format!("--prefetch-multiplier={multiplier}")];
            let wide = Consumer::Celeriac { extra: &extra };
            out.celeriac_wide = Some(self.drain_one("bench.drain.celeriac-wide", s.drain, wide).await?.0);
            let window = (s.concurrency * 4).min(usize::from(u16::MAX)) as u16;
            let narrow = Consumer::Bare { prefetch: window, ack_every: (u64::from(window) / 4).max(1) };
            out.bare_narrow = Some(self.drain_one("bench.drain.bare-narrow", s.drain, narrow).await?.0);
        }
        Ok(out)
    }

    // ------------------------------------------------------------ redis drain

    /// The run's Redis database as a broker (kombu's layout; results go to the same database).
    fn redis_broker(&self) -> String {
        self.redis.url.clone()
    }

    /// Fill a Redis queue with `n` messages, start a worker on it, and time the drain from the
    /// list's length; then wait until nothing is left unacknowledged.
    async fn redis_drain_one(&self, queue: &str, n: u64, worker: impl FnOnce() -> Result<Proc>) -> Result<Drain> {
        let broker = self.redis_broker();
        let client = Client::connect(&broker, None).await?;
        let started = Instant::now();
        send_noops(&client, queue, n, self.settings.in_flight).await?;
        let mut conn = self.redis.connection()?;
        let llen = |conn: &mut redis::Connection| -> Result<u64> { Ok(redis::cmd("LLEN").arg(queue).query(conn)?) };
        ensure!(llen(&mut conn)? == n, "Redis queue {queue} does not hold {n} messages after the fill");
        eprintln!("  filled {queue} (Redis) with {n} messages in {:.2}s", started.elapsed().as_secs_f64());
        let worker = worker()?;
        let redis_pid = self.redis.pid();
        let broker_cpu = || redis_pid.map(procs::cpu_secs).unwrap_or(0.0);
        let limit = Self::drain_limit(n);
        let started = Instant::now();
        let mut samples = Vec::with_capacity(4096);
        loop {
            let ready = llen(&mut conn)?;
            let now = Instant::now();
            samples.push(rabbit::Sample { at: now, ready, consumer_cpu: worker.tree_cpu(), broker_cpu: broker_cpu() });
            if ready == 0 {
                break;
            }
            worker.check_alive()?;
            if now - started >= limit {
                bail!("Redis queue {queue} still holds {ready} of {n} messages after {limit:?}");
            }
            tokio::time::sleep(rabbit::POLL_INTERVAL).await;
        }
        let drain = Drain::from_samples(n, &samples)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while redis::cmd("HLEN").arg("unacked").query::<u64>(&mut conn)? > 0 {
            ensure!(Instant::now() < deadline, "Redis: messages still unacknowledged 60s after {queue} emptied");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worker.stop(STOP_LIMIT)?;
        eprintln!("  {}: {}", worker.label, drain.describe());
        Ok(drain)
    }

    /// Drain throughput on the Redis broker: celeriac async and prefork, Celery prefork.
    pub async fn redis_drain(&self, with_celery: bool) -> Result<RedisDrainResults> {
        let s = &self.settings;
        let broker = self.redis_broker();
        let mut out = RedisDrainResults::default();
        let q = "bench.redis.celeriac";
        out.celeriac = Some(self.redis_drain_one(q, s.drain, || self.celeriac_worker_on(&broker, q, &[])).await?);
        if s.prefork {
            let q = "bench.redis.celeriac-prefork";
            let extra = ["--pool=prefork".to_string()];
            let drain = self.redis_drain_one(q, s.celery_drain, || self.celeriac_worker_on(&broker, q, &extra)).await?;
            out.celeriac_prefork = Some(drain);
        }
        if with_celery {
            let q = "bench.redis.celery";
            let drain =
                self.redis_drain_one(q, s.celery_drain, || self.celery_worker_on(&broker, q, "prefork")).await?;
            out.celery = Some(drain);
        }
        Ok(out)
    }

    // -------------------------------------------------------------- round trip

    /// Sequential `add` round trips with the Redis result backend, and idle worker memory.
    pub async fn round_trip(&self, with_celery: bool) -> Result<RoundTrip> {
        let s = &self.settings;
        let mut out = RoundTrip::default();

        // The floor: the same message published by bare lapin, waiting for each confirm.
        let queue = "bench.rt.bare";
        let client = Client::connect(&self.url(), None).await?;
        let message = client.build_message(
            "celeriac.add",
            vec![json!(1), json!(1)],
            Map::new(),
            &SendOptions::default(),
            false,
        )?;
        drop(client);
        let samples = rabbit::bare_confirm_latency(
            &self.url(),
            queue,
            &message.body,
            &rabbit::Headers::of(&message),
            s.warmup,
            s.roundtrips,
        )
        .await?;
        let lat = Latency::from_secs(samples)?;
        eprintln!(
            "  bare lapin publish waiting for its confirm: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms",
            lat.p50, lat.p99, lat.mean
        );
        out.bare_confirm = Some(lat);
        self.admin.delete(queue).await?;

        let queue = "bench.rt.celeriac";
        self.admin.declare(queue).await?;
        let worker = self.celeriac_worker(queue, &[])?;
        self.admin.wait_for_consumer(queue, START_LIMIT, || worker.check_alive()).await?;
        tokio::time::sleep(SETTLE).await;
        out.celeriac_idle = Some(worker.rss()?);
        let client = Client::connect(&self.url(), Some(&self.redis.url)).await?;
        let opts = SendOptions { queue: Some(queue.to_string()), ..SendOptions::default() };
        let mut samples = Vec::with_capacity(s.roundtrips as usize);
        let mut sends = Vec::with_capacity(s.roundtrips as usize);
        for i in 0..s.warmup + s.roundtrips {
            let started = Instant::now();
            let r = client.send_task("celeriac.add", vec![json!(i), json!(1)], Map::new(), opts.clone()).await?;
            let sent = started.elapsed();
            let v = r.get(Some(Duration::from_secs(10))).await?;
            let elapsed = started.elapsed();
            ensure!(v == json!(i + 1), "add({i}, 1) returned {v}");
            if i >= s.warmup {
                samples.push(elapsed.as_secs_f64());
                sends.push(sent.as_secs_f64());
            }
        }
        // The floor again, on the worker's queue while the worker consumes it: what a confirm
        // costs when the broker also delivers and settles the message meanwhile.
        let consumed = rabbit::bare_confirm_latency(
            &self.url(),
            queue,
            &message.body,
            &rabbit::Headers::of(&message),
            s.warmup,
            s.roundtrips,
        )
        .await?;
        out.bare_confirm_consumed = Some(Latency::from_secs(consumed)?);
        worker.check_alive()?;
        worker.stop(STOP_LIMIT)?;
        let lat = Latency::from_secs(samples)?;
        let send = Latency::from_secs(sends)?;
        eprintln!(
            "  celeriac: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, max {:.3} ms (of which send_task until confirmed: \
             p50 {:.3} ms, p99 {:.3} ms); idle RSS {}",
            lat.p50,
            lat.p99,
            lat.mean,
            lat.max,
            send.p50,
            send.p99,
            out.celeriac_idle.as_ref().map(Rss::describe).unwrap_or_default()
        );
        out.celeriac_send = Some(send);
        out.celeriac = Some(lat);
        self.admin.delete(queue).await?;

        if s.prefork {
            let queue = "bench.idle.prefork";
            self.admin.declare(queue).await?;
            let worker = self.celeriac_worker(queue, &["--pool=prefork".to_string()])?;
            self.admin.wait_for_consumer(queue, START_LIMIT, || worker.check_alive()).await?;
            tokio::time::sleep(SETTLE).await;
            let idle = worker.rss()?;
            worker.stop(STOP_LIMIT)?;
            eprintln!("  celeriac prefork worker, idle: RSS {}", idle.describe());
            out.celeriac_prefork_idle = Some(idle);
            self.admin.delete(queue).await?;
        }

        if with_celery {
            let queue = "bench.rt.celery";
            self.admin.declare(queue).await?;
            let worker = self.celery_worker(queue, "prefork")?;
            self.admin.wait_for_consumer(queue, START_LIMIT, || worker.check_alive()).await?;
            tokio::time::sleep(SETTLE).await;
            let idle = worker.rss()?;
            ensure!(
                idle.children.len() == self.settings.concurrency,
                "Celery prefork has {} children, expected {}",
                idle.children.len(),
                self.settings.concurrency
            );
            out.celery_idle = Some(idle);
            let (n, w) = (s.roundtrips.to_string(), s.warmup.to_string());
            let limit = Duration::from_secs(60 + (s.roundtrips + s.warmup) / 20);
            let r = self
                .celery_script(&["roundtrip", "--count", &n, "--warmup", &w, "--queue", queue], false, limit)
                .await?;
            worker.check_alive()?;
            worker.stop(STOP_LIMIT)?;
            let samples: Vec<f64> =
                r["latencies"].as_array().context("latencies")?.iter().filter_map(Value::as_f64).collect();
            ensure!(samples.len() as u64 == s.roundtrips, "Celery returned {} latencies", samples.len());
            let lat = Latency::from_secs(samples)?;
            eprintln!(
                "  Celery: p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, max {:.3} ms; idle RSS {}",
                lat.p50,
                lat.p99,
                lat.mean,
                lat.max,
                out.celery_idle.as_ref().map(Rss::describe).unwrap_or_default()
            );
            out.celery = Some(lat);
            self.admin.delete(queue).await?;
        }
        Ok(out)
    }
}
