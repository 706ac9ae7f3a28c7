//! The benchmark's surroundings: paths in the repository, the RabbitMQ vhost and Redis database it
//! owns for the length of a run, external commands run with deadlines, and a description of the
//! machine for the report.
//!
//! [`Vhost`] and [`RedisDb`] clean up when dropped, so a run that fails (or is interrupted) still
//! deletes its vhost and empties its Redis database.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root (two levels above this crate).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

/// The directory holding the Python side of the benchmark.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Run a command to completion, killing it after `limit`. Fails on a non-zero exit.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    // Read the pipes on threads so a chatty command cannot block on a full pipe.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() };
    if !status.success() {
        bail!(
            "{what} failed ({status}): {}{}",
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(output)
}

fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = run(Command::new("rabbitmqctl").args(args), Duration::from_secs(60))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A RabbitMQ vhost created for this run (guest has every permission), deleted when dropped.
pub struct Vhost {
    /// Its name.
    pub name: String,
    host: String,
}

impl Vhost {
    /// Create `celeriac-bench-<random>` on the local node.
    pub fn create(host: &str) -> Result<Self> {
        let name = format!("celeriac-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        rabbitmqctl(&["add_vhost", &name]).context("creating the benchmark vhost (is RabbitMQ running?)")?;
        let vhost = Vhost { name, host: host.to_string() };
        rabbitmqctl(&["set_permissions", "-p", &vhost.name, "guest", ".*", ".*", ".*"])?;
        Ok(vhost)
    }

    /// `amqp://guest:guest@<host>/<vhost>`, understood by celeriac, lapin and kombu alike.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/{}", self.host, self.name)
    }

    /// Turn the vhost's firehose tracer on or off (every publish copied to `amq.rabbitmq.trace`).
    pub fn trace(&self, on: bool) -> Result<()> {
        rabbitmqctl(&[if on { "trace_on" } else { "trace_off" }, "-p", &self.name])?;
        Ok(())
    }

    /// Ready plus unacknowledged messages of a queue, as RabbitMQ counts them (slow: a
    /// `rabbitmqctl` call; used outside timed sections).
    pub fn messages(&self, queue: &str) -> Result<u64> {
        let out = rabbitmqctl(&["list_queues", "-p", &self.name, "--no-table-headers", "-q", "name", "messages"])?;
        for line in out.lines() {
            let mut cols = line.split_whitespace();
            if cols.next() == Some(queue) {
                return cols.next().unwrap_or("0").parse().context("messages column");
            }
        }
        bail!("queue {queue} not found in vhost {}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        match rabbitmqctl(&["delete_vhost", &self.name]) {
            Ok(_) => eprintln!("deleted vhost {}", self.name),
            Err(e) => eprintln!("warning: could not delete vhost {}: {e:#}", self.name),
        }
    }
}

/// The Redis database the run owns: emptied at the start and when dropped.
pub struct RedisDb {
    /// `redis://host:port/db`.
    pub url: String,
}

impl RedisDb {
    /// Take the database at `url` (emptying it).
    pub fn take(url: &str) -> Result<Self> {
        let db = RedisDb { url: url.to_string() };
        db.flush().with_context(|| format!("emptying {url} (is Redis running?)"))?;
        Ok(db)
    }

    fn flush(&self) -> Result<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
        redis::cmd("FLUSHDB").query::<()>(&mut conn)?;
        Ok(())
    }

    /// A connection to the database (for polling without reconnecting each time).
    pub fn connection(&self) -> Result<redis::Connection> {
        let client = redis::Client::open(self.url.as_str())?;
        Ok(client.get_connection_with_timeout(Duration::from_secs(5))?)
    }

    /// The server's process id, from `INFO server`.
    pub fn pid(&self) -> Option<u32> {
        let mut conn = self.connection().ok()?;
        let info: String = redis::cmd("INFO").arg("server").query(&mut conn).ok()?;
        info.lines().find_map(|l| l.strip_prefix("process_id:")).and_then(|p| p.trim().parse().ok())
    }

    /// The server's version.
    pub fn version(&self) -> Result<String> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
        let info: String = redis::cmd("INFO").arg("server").query(&mut conn)?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into()))
    }
}

impl Drop for RedisDb {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            eprintln!("warning: could not empty {}: {e:#}", self.url);
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU model, cores and memory, one line.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb as f64 / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}", kernel.trim())
}

/// RabbitMQ's version, from `rabbitmqctl version`.
pub fn rabbitmq_version() -> String {
    rabbitmqctl(&["version"]).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// The operating-system process id of the RabbitMQ node, from `rabbitmqctl status`.
pub fn rabbitmq_pid() -> Option<u32> {
    let status = rabbitmqctl(&["status"]).ok()?;
    status.lines().find_map(|l| l.trim().strip_prefix("OS PID:")).and_then(|p| p.trim().parse().ok())
}
