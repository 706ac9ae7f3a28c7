//! The `python` part (issue 15): one Celery app's Python tasks run by `celeriac worker
//! --python-app benchtasks:app -P prefork` (Python children under celeriac's supervisor) and by
//! `celery -A benchtasks worker -P prefork`, at the run's concurrency, on the run's RabbitMQ
//! vhost with results in the run's Redis database.
//!
//! The app is `crates/celeriac-bench/python/benchtasks.py`: `pybench.noop` (ignore_result: neither
//! side stores anything) and `pybench.getset(i)` (one Redis GET and one SET on a real key in the
//! run's database; its result is stored by both sides). For each task and each worker, a queue
//! of its own is filled with `--celery-drain` messages (default 10,000) by celeriac's client
//! (protocol v2, confirmed; the same messages for both), then the worker is started and the
//! drain is timed from the queue's depth between 90% and 10% of the fill, as the other drain
//! rows are. Prefetch is each side's default, as in those rows: Celery's `concurrency x 4`,
//! celeriac's adaptive window starting there.
//!
//! While the queue falls (from the worker's start to the last acknowledgement), the resident
//! memory (`VmRSS`) of the worker's main process (celeriac's supervisor, Celery's main process)
//! and of each pool child is read every [`RSS_EVERY`]; the peaks are reported. After each drain
//! the run checks what was stored: no result for `noop`, exactly one per message for `getset`.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use celeriac::{Client, SendOptions};
use serde_json::json;

use crate::env::python_dir;
use crate::measure::{send_many, Bench, STOP_LIMIT};
use crate::procs::{cpu_secs, PeakRss, Proc};
use crate::rabbit::{Drain, Sample};

/// The app, as `celeriac --python-app` and `celery -A` name it.
const APP: &str = "benchtasks";
/// How often the workers' memory is read during a drain.
pub const RSS_EVERY: Duration = Duration::from_millis(100);

/// Which worker drains.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// `celeriac worker --python-app benchtasks:app -P prefork`.
    Celeriac,
    /// `celery -A benchtasks worker -P prefork`.
    Celery,
}

/// Which task fills the queue.
#[derive(Debug, Clone, Copy)]
pub enum PyTask {
    /// `pybench.noop`, ignore_result.
    Noop,
    /// `pybench.getset(i)`, result stored.
    GetSet,
}

impl PyTask {
    fn name(self) -> &'static str {
        match self {
            PyTask::Noop => "pybench.noop",
            PyTask::GetSet => "pybench.getset",
        }
    }

    /// Results each message leaves in the result backend.
    fn stores(self) -> u64 {
        match self {
            PyTask::Noop => 0,
            PyTask::GetSet => 1,
        }
    }
}

/// One worker's drain of one task.
#[derive(Debug, Clone)]
pub struct PyDrain {
    /// The rate and CPU per message (`consumer_us`: the worker's whole tree).
    pub drain: Drain,
    /// CPU of the worker's main process per message in the same window, microseconds (the
    /// supervisor's share of `drain.consumer_us`; the rest is the pool children's).
    pub main_us: f64,
    /// Peak memory of the main process and of each child over the drain.
    pub rss: PeakRss,
}

/// The figures of one task: both workers.
#[derive(Debug, Clone, Default)]
pub struct PyPair {
    /// celeriac with Python children.
    pub celeriac: Option<PyDrain>,
    /// Celery prefork.
    pub celery: Option<PyDrain>,
}

/// The part's figures.
#[derive(Debug, Clone, Default)]
pub struct PythonResults {
    /// `pybench.noop`.
    pub noop: PyPair,
    /// `pybench.getset`.
    pub getset: PyPair,
    /// The version of Celery in the virtualenv (both sides import it).
    pub celery_version: Option<String>,
}

impl PythonResults {
    /// The peak of `f` over both tasks' drains of one side (`celeriac` or not), MiB.
    pub fn peak_mib(&self, celeriac: bool, f: fn(&PeakRss) -> u64) -> Option<f64> {
        [&self.noop, &self.getset]
            .iter()
            .filter_map(|p| if celeriac { p.celeriac.as_ref() } else { p.celery.as_ref() })
            .map(|d| f(&d.rss))
            .max()
            .map(|k| k as f64 / 1024.0)
    }
}

impl Bench {
    /// The `python` part: both tasks, both workers.
    pub async fn python(&self, with_celery: bool) -> Result<PythonResults> {
        let mut out = PythonResults::default();
        let version = crate::env::run(
            std::process::Command::new(&self.python).args(["-c", "import celery; print(celery.__version__)"]),
            Duration::from_secs(30),
        )
        .context("the virtualenv's Python cannot import celery")?;
        out.celery_version = Some(String::from_utf8_lossy(&version.stdout).trim().to_string());
        for (task, pair) in [(PyTask::Noop, &mut out.noop), (PyTask::GetSet, &mut out.getset)] {
            pair.celeriac = Some(self.python_drain(task, Side::Celeriac).await?);
            if with_celery {
                pair.celery = Some(self.python_drain(task, Side::Celery).await?);
            }
        }
        Ok(out)
    }

    /// The worker of `side` for the app, on `queue`.
    fn python_worker(&self, side: Side, queue: &str) -> Result<Proc> {
        let url = self.url();
        let mut cmd = match side {
            Side::Celeriac => {
                let python = self.python.to_string_lossy().into_owned();
                let extra = ["--python-app", &format!("{APP}:app"), "--python", &python, "-P", "prefork"];
                let mut cmd = self.celeriac_command(&url, queue, &extra.map(String::from));
                cmd.current_dir(python_dir()).env("PYTHONPATH", python_dir()).env("BENCH_BROKER_URL", &url);
                cmd.env("BENCH_RESULT_BACKEND", &self.redis.url);
                cmd
            }
            Side::Celery => self.celery_command(APP, &url, queue, "prefork"),
        };
        cmd.env("BENCH_REDIS_URL", &self.redis.url);
        let label = match side {
            Side::Celeriac => format!("celeriac worker --python-app {APP}:app on {queue}"),
            Side::Celery => format!("celery -A {APP} worker -P prefork on {queue}"),
        };
        Proc::spawn(&label, &mut cmd)
    }

    /// Fill a queue with `--celery-drain` messages of `task`, drain it with `side`'s worker,
    /// and check what was stored.
    async fn python_drain(&self, task: PyTask, side: Side) -> Result<PyDrain> {
        let n = self.settings.celery_drain;
        let queue = format!(
            "bench.python.{}.{}",
            task.name().trim_start_matches("pybench."),
            if side == Side::Celeriac { "celeriac" } else { "celery" }
        );
        let mut conn = self.redis.connection()?;
        let results_before = result_keys(&mut conn)?;
        ensure!(
            results_before.is_empty(),
            "{} results are left in {} before the drain",
            results_before.len(),
            self.redis.url
        );

        let client = Client::connect(&self.url(), None).await?;
        let opts = SendOptions {
            queue: Some(queue.clone()),
            ignore_result: Some(task.stores() == 0),
            ..SendOptions::default()
        };
        let started = Instant::now();
        let args = |i: u64| match task {
            PyTask::Noop => Vec::new(),
            PyTask::GetSet => vec![json!(i)],
        };
        send_many(&client, task.name(), args, &opts, n, self.settings.in_flight).await?;
        drop(client);
        let (ready, _) = self.admin.depth(&queue).await?;
        ensure!(u64::from(ready) == n, "queue {queue} holds {ready} messages after publishing {n}");
        eprintln!("  filled {queue} with {n} {} in {:.2}s", task.name(), started.elapsed().as_secs_f64());

        let worker = self.python_worker(side, &queue)?;
        let mut rss = PeakRss::default();
        let mut last_read: Option<Instant> = None;
        let broker_cpu = || self.broker_pid.map(cpu_secs).unwrap_or(0.0);
        let alive = || {
            worker.check_alive()?;
            if last_read.is_none_or(|t| t.elapsed() >= RSS_EVERY) {
                rss.read(worker.pid());
                last_read = Some(Instant::now());
            }
            Ok(())
        };
        // The main process's CPU with each reading too: its share of the tree's.
        let mut main_cpu = Vec::new();
        let cpu = || {
            main_cpu.push(cpu_secs(worker.pid()));
            (worker.tree_cpu(), broker_cpu())
        };
        let samples = self.admin.drain_samples(&queue, n, Self::drain_limit(n), alive, cpu).await?;
        let drain = Drain::from_samples(n, &samples)?;
        let main_only: Vec<Sample> =
            samples.iter().zip(&main_cpu).map(|(s, main)| Sample { consumer_cpu: *main, ..*s }).collect();
        let main_us = Drain::from_samples(n, &main_only)?.consumer_us;
        self.wait_all_acked(&queue).await?;
        // Celery acknowledges before running (acks early): wait for the results too.
        let expected = n * task.stores();
        let deadline = Instant::now() + Duration::from_secs(60);
        let stored = loop {
            rss.read(worker.pid());
            let keys = result_keys(&mut conn)?;
            if keys.len() as u64 >= expected || Instant::now() >= deadline {
                break keys;
            }
            worker.check_alive()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        worker.check_alive()?;
        worker.stop(STOP_LIMIT)?;
        if stored.len() as u64 != expected {
            bail!("{}: {} results stored for {n} {} (expected {expected})", worker.label, stored.len(), task.name());
        }
        if expected > 0 {
            let sample: String = redis::cmd("GET").arg(&stored[0]).query(&mut conn)?;
            ensure!(sample.contains("\"SUCCESS\""), "{}: a stored result is not SUCCESS: {sample}", worker.label);
            let value: Option<String> = redis::cmd("GET").arg("pybench:getset").query(&mut conn)?;
            ensure!(value.is_some(), "{}: pybench:getset was never written", worker.label);
            let mut del = redis::pipe();
            for key in &stored {
                del.cmd("DEL").arg(key).ignore();
            }
            del.cmd("DEL").arg("pybench:getset").ignore();
            del.query::<()>(&mut conn).context("deleting the drain's results")?;
        }
        eprintln!(
            "  {}: {} (main process {main_us:.0} µs); RSS peaks {}",
            worker.label,
            drain.describe(),
            rss.describe()
        );
        self.admin.delete(&queue).await?;
        Ok(PyDrain { drain, main_us, rss })
    }
}

/// The Celery result keys (`celery-task-meta-*`) in the run's database.
fn result_keys(conn: &mut redis::Connection) -> Result<Vec<String>> {
    Ok(redis::cmd("KEYS").arg("celery-task-meta-*").query(conn)?)
}
