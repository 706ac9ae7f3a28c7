//! Worker processes started by the benchmark, and their memory.
//!
//! Each worker is started in a process group of its own, so that stopping it also stops the
//! children a Celery prefork pool forks. Dropping a [`Proc`] that is still running kills its
//! group; [`Proc::stop`] asks for a warm shutdown first (SIGTERM to the main process) and kills
//! the group only if that does not end it in time.
//!
//! Memory is the resident set size (`VmRSS` in `/proc/<pid>/status`) of the main process and of
//! each of its children.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// A running worker process whose stderr is collected.
pub struct Proc {
    /// What it is, for messages.
    pub label: String,
    child: Mutex<Child>,
    pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Start `cmd` in a new process group, collecting its stderr.
    pub fn spawn(label: &str, cmd: &mut Command) -> Result<Self> {
        let mut proc = Self::spawn_with_stderr(label, cmd, Stdio::piped())?;
        let sink = proc.lines.clone();
        let stderr = proc.child.get_mut().unwrap_or_else(|p| p.into_inner()).stderr.take().context("stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Ok(proc)
    }

    /// Start `cmd` in a new process group with its stderr going to `stderr` (a file, for a
    /// process that logs too much to keep in memory; [`Proc::tail`] is then empty).
    pub fn spawn_with_stderr(label: &str, cmd: &mut Command, stderr: Stdio) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {label}: {cmd:?}"))?;
        let pid = child.id();
        Ok(Proc { label: label.to_string(), child: Mutex::new(child), pid, lines: Arc::new(Mutex::new(Vec::new())) })
    }

    /// The main process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its stderr so far (the last `n` lines).
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Fail if the process has exited.
    pub fn check_alive(&self) -> Result<()> {
        if let Some(status) = self.child().try_wait()? {
            bail!("{} exited early ({status}); its log:\n{}", self.label, self.tail(30));
        }
        Ok(())
    }

    /// Resident memory of the main process and of each of its children.
    pub fn rss(&self) -> Result<Rss> {
        let pid = self.pid();
        let main = rss_kib(pid).with_context(|| format!("reading the RSS of {} ({pid})", self.label))?;
        let children = children_of(pid).into_iter().filter_map(rss_kib).collect();
        Ok(Rss { main, children })
    }

    /// Warm shutdown: SIGTERM to the main process, then wait up to `limit`; kill the group
    /// if it is still there.
    pub fn stop(&self, limit: Duration) -> Result<()> {
        if self.child().try_wait()?.is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(self.pid() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.child().try_wait()?.is_some() {
                // Children of a prefork pool exit with their parent; make sure.
                let _ = killpg(pid, Signal::SIGKILL);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child().wait();
        bail!("{} did not stop within {limit:?} of SIGTERM; killed", self.label)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        let mut child = self.child();
        if let Ok(None) = child.try_wait() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Resident memory of a process tree, in KiB.
#[derive(Debug, Clone, Default)]
pub struct Rss {
    /// The main process.
    pub main: u64,
    /// Each child.
    pub children: Vec<u64>,
}

impl Rss {
    /// Everything, in MiB.
    pub fn total_mib(&self) -> f64 {
        (self.main + self.children.iter().sum::<u64>()) as f64 / 1024.0
    }

    /// "main X + children Y, Z" in MiB.
    pub fn describe(&self) -> String {
        let mib = |k: u64| k as f64 / 1024.0;
        if self.children.is_empty() {
            return format!("{:.1} MiB", mib(self.main));
        }
        let kids: Vec<String> = self.children.iter().map(|k| format!("{:.1}", mib(*k))).collect();
        format!("{:.1} MiB (main {:.1} + children {})", self.total_mib(), mib(self.main), kids.join(" + "))
    }
}

/// The largest resident memory seen of a process tree over several readings, KiB: of the main
/// process (with its anonymous and file-backed parts' own peaks), and of each child by pid.
///
/// The pool's children are those alive at the last reading; a child seen only earlier (one
/// replaced, or a short-lived helper such as `--python-app`'s one `--describe` run at start)
/// is counted apart, in `gone`.
#[derive(Debug, Clone, Default)]
pub struct PeakRss {
    /// The main process (`VmRSS`).
    pub main: u64,
    /// Its anonymous memory (`RssAnon`).
    pub main_anon: u64,
    /// Its file-backed pages (`RssFile`: the executable's and libraries' pages it touched).
    pub main_file: u64,
    /// Each child seen, by pid.
    pub children: BTreeMap<u32, u64>,
    /// The children alive at the last reading.
    pub last: Vec<u32>,
    /// Readings taken.
    pub readings: usize,
}

impl PeakRss {
    /// Read the tree of `pid` once (a process gone meanwhile is skipped).
    pub fn read(&mut self, pid: u32) {
        let field = |name: &str| status_kib(pid, name).unwrap_or(0);
        self.main = self.main.max(field("VmRSS:"));
        self.main_anon = self.main_anon.max(field("RssAnon:"));
        self.main_file = self.main_file.max(field("RssFile:"));
        self.last.clear();
        for child in children_of(pid) {
            if let Some(kib) = rss_kib(child) {
                let peak = self.children.entry(child).or_default();
                *peak = (*peak).max(kib);
                self.last.push(child);
            }
        }
        self.readings += 1;
    }

    /// The peaks of the pool's children (alive at the last reading), KiB.
    pub fn pool(&self) -> Vec<u64> {
        self.last.iter().filter_map(|pid| self.children.get(pid).copied()).collect()
    }

    /// The largest pool child's peak, KiB (0 with no child).
    pub fn largest_child(&self) -> u64 {
        self.pool().into_iter().max().unwrap_or(0)
    }

    /// "main X (anon A, file F), children Y + Z (n readings)" in MiB.
    pub fn describe(&self) -> String {
        let mib = |k: u64| k as f64 / 1024.0;
        let kids: Vec<String> = self.pool().iter().map(|k| format!("{:.1}", mib(*k))).collect();
        let gone = self.children.len() - self.last.len();
        format!(
            "main {:.1} MiB (anonymous {:.1}, file {:.1}), pool children {} MiB{} ({} readings)",
            mib(self.main),
            mib(self.main_anon),
            mib(self.main_file),
            if kids.is_empty() { "none".into() } else { kids.join(" + ") },
            if gone > 0 { format!(", {gone} other child seen earlier") } else { String::new() },
            self.readings
        )
    }
}

/// Resident memory of one process (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status` (`name` with its colon), KiB.
fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The direct children of `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // pid (comm) state ppid ...; comm may contain spaces, so split after the last ')'.
        let ppid =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// CPU time (user + system) a process has used so far, in seconds; 0 if it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// CPU seconds used so far by thread `tid` of this process, to the nanosecond (the first field
/// of `/proc/self/task/<tid>/schedstat`: time on a CPU; `stat`'s ticks of 10 ms are too coarse
/// for a thread that works a few milliseconds a second); `None` if it cannot be read.
pub fn thread_cpu_secs(tid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// utime + stime of a `stat` file of `/proc`, in seconds.
fn stat_cpu_secs(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else { return 0.0 };
    // Fields after "(comm)": state is the 1st, utime the 12th, stime the 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on every Linux the benchmark runs on.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

impl Proc {
    /// CPU seconds used so far by the main process and its live children.
    pub fn tree_cpu(&self) -> f64 {
        let pid = self.pid();
        cpu_secs(pid) + children_of(pid).into_iter().map(cpu_secs).sum::<f64>()
    }
}
