//! The beat part (issue 14): one `celeriac beat` process with N entries every P seconds (10,000
//! every second by default; the other form is 100,000 every minute), on RabbitMQ, Redis
//! and SQLite in turn, for a timed window; does it keep up, and what does it cost?
//!
//! - **Kept up**: every scheduled tick (every P seconds, all entries at once: `every` runs fall
//!   on one grid) whose period falls wholly inside the window should see N runs sent. The beat logs each
//!   send (`sent entry=… scheduled=…`, its default `info` level, written to a file as a
//!   deployment would); the log gives, per tick, the runs sent and how long after the tick the
//!   last of them was sent (the lag). A tick with fewer than N runs lost some (`catch_up =
//!   "once"` skips the runs of a beat that fell more than a period behind). The queue's depth at
//!   the end must equal the sends logged: the broker has them all.
//! - **Cost**: the beat process's CPU time (`/proc/<pid>/stat` utime + stime) over the window
//!   against the window's length, in % of one core, averaged and per second (the worst second);
//!   its resident memory (`VmRSS`) sampled each second; the broker's CPU over the window too
//!   (RabbitMQ's and Redis's processes; SQLite's is in the beat).
//!
//! The window starts a few seconds after the beat took the lead (its first tick records 10,000
//! new entries; the window measures the steady state).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, Utc};

use crate::measure::{Bench, STOP_LIMIT};
use crate::procs::{cpu_secs, rss_kib, Proc};

/// The queue the entries send to.
const QUEUE: &str = "bench.beat";
/// Time after taking the lead before the window opens.
const WARM_UP: Duration = Duration::from_secs(3);

/// One broker's figures.
#[derive(Debug, Clone)]
pub struct BeatRun {
    /// Which broker.
    pub broker: String,
    /// Entries in the schedule.
    pub entries: u64,
    /// Their period, seconds.
    pub period: u64,
    /// Scheduled ticks wholly inside the window.
    pub ticks: u64,
    /// Runs due in those ticks (entries × ticks).
    pub due: u64,
    /// Runs sent for those ticks.
    pub sent: u64,
    /// Ticks with fewer runs sent than entries.
    pub short_ticks: u64,
    /// Lag of each tick's last send after the tick, milliseconds: median, worst.
    pub lag_p50_ms: f64,
    /// The worst lag.
    pub lag_max_ms: f64,
    /// CPU of the beat process over the window, % of one core.
    pub cpu_pct: f64,
    /// CPU of the broker's process over the window, % of one core (RabbitMQ, Redis).
    pub broker_cpu_pct: Option<f64>,
    /// The busiest second of the window, % of one core (above 100 when the beat's threads used
    /// both cores).
    pub cpu_max_pct: f64,
    /// Resident memory, MiB: the largest sample and the last.
    pub rss_max_mib: f64,
    /// The last sample.
    pub rss_end_mib: f64,
    /// Messages in the queue after the beat stopped, and the sends logged over the whole run.
    pub queued: u64,
    /// Sends logged over the whole run (warm-up and after the window included).
    pub logged: u64,
    /// The 1-minute load average when the window opened and closed.
    pub load: (String, String),
}

impl BeatRun {
    /// Whether every due run of the window was sent (and every send reached the queue), at under
    /// `cpu` % of one core.
    pub fn met(&self, cpu: f64) -> bool {
        self.sent == self.due && self.short_ticks == 0 && self.queued == self.logged && self.cpu_pct < cpu
    }

    /// One line of figures.
    pub fn describe(&self) -> String {
        format!(
            "beat on {}: {} entries every {} s, {} ticks in the window: {} of {} due runs sent ({} short ticks), last \
             send of each tick p50 {:.0} ms / max {:.0} ms after it; CPU {:.1}% of one core (busiest second {:.1}%), \
             broker {}; RSS max {:.1} MiB, end {:.1} MiB; queue {} = {} sends logged; load {} → {}",
            self.broker,
            self.entries,
            self.period,
            self.ticks,
            self.sent,
            self.due,
            self.short_ticks,
            self.lag_p50_ms,
            self.lag_max_ms,
            self.cpu_pct,
            self.cpu_max_pct,
            self.broker_cpu_pct.map_or("not measured".to_string(), |c| format!("{c:.1}%")),
            self.rss_max_mib,
            self.rss_end_mib,
            self.queued,
            self.logged,
            self.load.0,
            self.load.1
        )
    }
}

/// The schedule: `entries` entries every `period` seconds on [`QUEUE`].
fn schedule(entries: u64, period: u64) -> String {
    let mut text = String::with_capacity(entries as usize * 80);
    for i in 0..entries {
        text.push_str(&format!(
            "[[entry]]\nname = \"e{i}\"\ntask = \"celeriac.noop\"\nevery = \"{period}s\"\nqueue = \"{QUEUE}\"\n"
        ));
    }
    text
}

/// The `sent` lines of a beat's log: (when logged, scheduled time).
fn sends(log: &Path) -> Result<Vec<(DateTime<Utc>, DateTime<Utc>)>> {
    let file = std::fs::File::open(log).with_context(|| format!("opening {}", log.display()))?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        if !line.contains(" sent entry=") {
            continue;
        }
        let logged = line.split_whitespace().next().and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        let scheduled = line
            .split("scheduled=")
            .nth(1)
            .map(|t| t.trim().trim_end_matches(" UTC"))
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").ok());
        match (logged, scheduled) {
            (Some(l), Some(s)) => out.push((l.with_timezone(&Utc), s.and_utc())),
            _ => bail!("a send line the benchmark cannot read: {line}"),
        }
    }
    Ok(out)
}

/// Whether `log` has a line containing `text`.
fn logged(log: &Path, text: &str) -> bool {
    std::fs::read_to_string(log).map(|s| s.contains(text)).unwrap_or(false)
}

impl Bench {
    /// The beat part on each of `brokers` (`rabbitmq`, `redis`, `sqlite`): `entries` every
    /// `period` seconds.
    pub async fn beat(&self, entries: u64, period: u64, window: Duration, brokers: &[String]) -> Result<Vec<BeatRun>> {
        let dir = std::env::temp_dir().join(format!("celeriac-bench-beat-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("beat.toml");
        std::fs::write(&file, schedule(entries, period.max(1)))?;
        let mut out = Vec::new();
        for broker in brokers {
            let (url, broker_pid) = match broker.as_str() {
                "rabbitmq" => {
                    self.admin.declare(QUEUE).await?;
                    (self.url(), self.broker_pid)
                }
                "redis" => (self.redis.url.clone(), self.redis.pid()),
                "sqlite" => (format!("sqlite://{}/broker.db", dir.display()), None),
                other => bail!("unknown beat broker {other:?} (known: rabbitmq, redis, sqlite)"),
            };
            let run = self.beat_on(broker, (&url, broker_pid), &file, &dir, (entries, period.max(1)), window).await;
            if broker == "rabbitmq" {
                self.admin.delete(QUEUE).await?;
            }
            let run = run?;
            eprintln!("  {}", run.describe());
            out.push(run);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(out)
    }

    async fn beat_on(
        &self,
        label: &str,
        (url, broker_pid): (&str, Option<u32>),
        file: &Path,
        dir: &Path,
        (entries, period): (u64, u64),
        window: Duration,
    ) -> Result<BeatRun> {
        let log: PathBuf = dir.join(format!("beat-{label}.log"));
        let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let stderr = std::fs::File::create(&log)?;
        let beat = Proc::spawn_with_stderr(
            &format!("celeriac beat on {label}"),
            Command::new(&self.celeriac_bin)
                .args(["beat", "--broker", url, "--schedule"])
                .arg(file)
                .args(["--name", &name])
                .env_remove("CELERIAC_BROKER_URL")
                .env_remove("CELERIAC_LOG")
                .env("NO_COLOR", "1"),
            Stdio::from(stderr),
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !logged(&log, "leader: sending") {
            beat.check_alive()?;
            ensure!(Instant::now() < deadline, "celeriac beat on {label} did not lead within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(WARM_UP).await;
        let pid = beat.pid();
        let broker_cpu0 = broker_pid.map(cpu_secs);
        let (load0, opened, cpu0) = (crate::env::load(), Utc::now(), cpu_secs(pid));
        let started = Instant::now();
        let (mut rss_max, mut rss_end, mut cpu_max, mut cpu_prev) = (0u64, 0u64, 0f64, (cpu0, Instant::now()));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while started.elapsed() < window {
            tick.tick().await;
            beat.check_alive()?;
            let cpu = cpu_secs(pid);
            // Per sample, over the time since the last (a sample can come late on a busy machine).
            cpu_max = cpu_max.max((cpu - cpu_prev.0) / cpu_prev.1.elapsed().as_secs_f64());
            cpu_prev = (cpu, Instant::now());
            rss_end = rss_kib(pid).unwrap_or(0);
            rss_max = rss_max.max(rss_end);
        }
        let (cpu1, elapsed, closed, load1) = (cpu_secs(pid), started.elapsed(), Utc::now(), crate::env::load());
        let broker_cpu =
            broker_pid.map(cpu_secs).zip(broker_cpu0).map(|(b1, b0)| (b1 - b0) / elapsed.as_secs_f64() * 100.0);
        beat.stop(STOP_LIMIT)?;
        // The scheduled ticks inside the window with their whole period (the time they have to be
        // sent in before the next tick): a tick the beat is stopped in the middle of is not
        // counted.
        let p = period as i64;
        let first = opened.timestamp().div_euclid(p) * p + p;
        let last = (closed.timestamp() - p).div_euclid(p) * p;
        let all = sends(&log)?;
        let mut per_tick: std::collections::BTreeMap<i64, (u64, f64)> =
            (first..=last).step_by(period as usize).map(|s| (s, (0, 0.0))).collect();
        for (logged_at, scheduled) in &all {
            if let Some((n, lag)) = per_tick.get_mut(&scheduled.timestamp()) {
                *n += 1;
                *lag = lag.max((*logged_at - *scheduled).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        let mut lags: Vec<f64> = per_tick.values().filter(|(n, _)| *n > 0).map(|(_, l)| *l).collect();
        lags.sort_by(f64::total_cmp);
        let sent: u64 = per_tick.values().map(|(n, _)| n).sum();
        let ticks = per_tick.len() as u64;
        let broker = celeriac::connect::broker(url)?;
        let queued = broker.queues(&[QUEUE.to_string()]).await?.first().map_or(0, |q| q.ready);
        broker.purge(QUEUE).await?;
        Ok(BeatRun {
            broker: label.to_string(),
            entries,
            period,
            ticks,
            due: entries * ticks,
            sent,
            short_ticks: per_tick.values().filter(|(n, _)| *n < entries).count() as u64,
            lag_p50_ms: lags.get(lags.len() / 2).copied().unwrap_or(f64::NAN),
            lag_max_ms: lags.last().copied().unwrap_or(f64::NAN),
            cpu_pct: (cpu1 - cpu0) / elapsed.as_secs_f64() * 100.0,
            broker_cpu_pct: broker_cpu,
            cpu_max_pct: cpu_max * 100.0,
            rss_max_mib: rss_max as f64 / 1024.0,
            rss_end_mib: rss_end as f64 / 1024.0,
            queued,
            logged: all.len() as u64,
            load: (load0, load1),
        })
    }
}
