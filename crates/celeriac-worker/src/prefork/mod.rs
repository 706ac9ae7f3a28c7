//! The prefork pool: tasks run in child processes under a supervisor.
//!
//! Each child is the current binary re-executed in child mode ([`child`]), so the pool works for
//! any binary built with `App::run_cli`. The supervisor (the worker process) alone talks to the
//! broker; it hands one task at a time to an idle child over a pipe ([`protocol`]) and waits for
//! the outcome. What the pool guarantees:
//!
//! - **No orphans**: children die with the supervisor (`PR_SET_PDEATHSIG`, checked after start)
//!   and are killed on drop.
//! - **Signals go to the supervisor**: each child has a process group of its own, so a signal
//!   to the worker's group (Ctrl-C, supervisord's `stopasgroup`) does not kill running tasks
//!   under a warm shutdown; the supervisor stops its children itself.
//! - **No restart loops**: [`Pool::start`] returns only when every child has said `Ready`; the
//!   worker consumes nothing before. A child that cannot start is retried with capped
//!   exponential backoff while the pool reports itself degraded.
//! - **Hung tasks are killed**: past its hard time limit a child is SIGKILLed, the task ends as
//!   `TimeLimitExceeded` and a fresh child takes the slot.
//! - **Recycling without thrash**: a child is replaced after `max_tasks_per_child` tasks or when
//!   its resident set passes `max_memory_per_child` after a task (the task itself is unaffected).
//!   A limit below a fresh child's size is refused at start, and frequent memory recycling is
//!   reported once a minute with the numbers.
//! - **Worker lost**: a child that dies mid-task is replaced and the outcome says how it died;
//!   one that breaks the frame stream (writes what is not a frame) is killed at once.

pub mod child;
pub mod proc_info;
pub mod protocol;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celeriac_core::TaskError;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::io::BufReader;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{watch, Semaphore};

use protocol::{read_frame_async, write_frame_async, FromChild, RunRequest, ToChild};

/// How long a new child may take to say `Ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Memory recycles within this window are looked at for thrashing.
const THRASH_WINDOW: Duration = Duration::from_secs(60);
/// Fewer tasks than this per child, on average, over the window is a thrash.
const THRASH_TASKS: f64 = 10.0;

/// How the pool is set up.
#[derive(Debug, Clone)]
pub struct PreforkConfig {
    /// Number of children.
    pub processes: usize,
    /// Replace a child after this many tasks.
    pub max_tasks_per_child: Option<u64>,
    /// Replace a child whose resident set passes this many KiB after a task.
    pub max_memory_per_child_kib: Option<u64>,
    /// The program to run in child mode (default: this executable).
    pub program: PathBuf,
    /// Its arguments (none for this executable; the module and application for a Python
    /// child).
    pub args: Vec<std::ffi::OsString>,
    /// Environment added for the children (a Python child's `PYTHONPATH`).
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Log filter handed to children.
    pub log_level: String,
    /// Log format handed to children (`text`, `json`).
    pub log_format: String,
}

impl PreforkConfig {
    /// A pool of `processes` children of this executable.
    pub fn new(processes: usize) -> std::io::Result<Self> {
        Ok(PreforkConfig {
            processes,
            max_tasks_per_child: None,
            max_memory_per_child_kib: None,
            program: std::env::current_exe()?,
            args: Vec::new(),
            env: Vec::new(),
            log_level: "warn".into(),
            log_format: "text".into(),
        })
    }
}

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The memory limit is below what a child needs before running anything.
    #[error(
        "--max-memory-per-child {} is below a fresh child's {}: every child would be replaced after each task; raise it above {}",
        format_kib(*limit_kib), format_kib(*fresh_kib), format_kib(*fresh_kib)
    )]
    MemoryLimitBelowFreshChild {
        /// The limit asked for.
        limit_kib: u64,
        /// What a fresh child uses.
        fresh_kib: u64,
    },
    /// A child started and said why it cannot run (a Python application that does not
    /// import): a fault of the configuration, not worth retrying.
    #[error("the pool child ({program}) cannot run: {reason} (it ended with {status})")]
    ChildFailed {
        /// The program.
        program: String,
        /// What the child said.
        reason: String,
        /// How it ended.
        status: String,
    },
    /// A child could not be started.
    #[error("cannot start a pool child ({program}): {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        reason: String,
    },
}

/// `4.1 MB`-style sizes.
pub fn format_kib(kib: u64) -> String {
    let bytes = kib as f64 * 1024.0;
    if bytes >= 1e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else {
        format!("{:.1} MB", bytes / 1e6)
    }
}

/// Parse a size: `200MB`, `512MiB`, `1.5GB`, `800kB`; a bare number is KiB, as Celery's
/// `--max-memory-per-child`. Returns KiB.
pub fn parse_size_kib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{text:?} is not a size (e.g. 200MB, 512MiB)"))?;
    let bytes = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "kib" | "k" => n * 1024.0,
        "kb" => n * 1e3,
        "mb" | "m" => n * 1e6,
        "mib" => n * 1024.0 * 1024.0,
        "gb" | "g" => n * 1e9,
        "gib" => n * 1024.0 * 1024.0 * 1024.0,
        "b" => n,
        other => return Err(format!("unknown size unit {other:?} in {text:?} (use kB, MB, GB, KiB, MiB, GiB)")),
    };
    if !(bytes.is_finite() && bytes >= 1024.0) {
        return Err(format!("{text:?} is too small for a memory limit"));
    }
    Ok((bytes / 1024.0).round() as u64)
}

/// How a task handed to the pool ended.
#[derive(Debug)]
pub enum PoolOutcome {
    /// The task returned (`chain_stopped`: it emptied its request's chain, see
    /// [`FromChild::Done`]).
    Done {
        /// Its value or error.
        result: Result<Value, TaskError>,
        /// The rest of its chain is not to be sent.
        chain_stopped: bool,
    },
    /// Its hard time limit passed; its child was killed.
    TimeLimit,
    /// Its child died; how.
    WorkerLost(String),
    /// Its child was killed by [`Pool::terminate`] (remote control's `revoke --terminate`): the
    /// signal sent, and how the child ended.
    Terminated(i32, String),
    /// The worker asked to abort (cold shutdown); its child was killed.
    Aborted,
}

/// A task running in a child, for `inspect active` and the SIGUSR1 dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActiveTask {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// When it started.
    pub started: DateTime<Utc>,
    /// The kernel id of the child's thread that runs it (the child's `Ready` thread, or the one
    /// a `Thread` frame named).
    pub tid: u32,
    /// When its hard time limit kills it, if it has one.
    pub hard_deadline: Option<DateTime<Utc>>,
    /// When its soft time limit is (or was) due, if it has one.
    pub soft_deadline: Option<DateTime<Utc>>,
}

/// A task running in a prefork child, diagnosed from `/proc` at the moment it is asked for:
/// what `inspect active` adds to each request, the SIGUSR1 dump logs and the dashboard shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskDiagnosis {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// The child's pid.
    pub pid: u32,
    /// The kernel id of the thread running the task (`/proc/<pid>/task/<tid>/`).
    pub tid: u32,
    /// Seconds since the task started.
    pub runtime: f64,
    /// Seconds until its hard time limit (0 once passed); `None` without one.
    pub hard_time_left: Option<f64>,
    /// Seconds until its soft time limit, negative once passed (a task still running past it
    /// ignored or missed the signal: the dashboard shows it as hung); `None` without one.
    pub soft_time_left: Option<f64>,
    /// What the thread is doing; `None` when it could not be read (the child just died).
    pub wait: Option<proc_info::ThreadWait>,
}

impl TaskDiagnosis {
    /// What the task is blocked on, in one phrase (`S (sleeping) in futex_wait_queue, syscall
    /// futex`), or `?` when `/proc` could not be read.
    pub fn blocked_on(&self) -> String {
        self.wait.as_ref().map_or_else(|| "?".into(), proc_info::ThreadWait::summary)
    }
}

/// One child as the supervisor sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChildStatus {
    /// Slot number.
    pub slot: usize,
    /// Its pid.
    pub pid: u32,
    /// What it runs now.
    pub task: Option<ActiveTask>,
    /// Tasks it has finished.
    pub tasks_done: u64,
    /// Resident set after its last task, KiB.
    pub rss_kib: u64,
}

impl ChildStatus {
    /// Its running task diagnosed now (reads `/proc/<pid>/task/<tid>/`); `None` when idle.
    pub fn diagnose(&self) -> Option<TaskDiagnosis> {
        let task = self.task.as_ref()?;
        let now = Utc::now();
        let secs = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        Some(TaskDiagnosis {
            id: task.id.clone(),
            name: task.name.clone(),
            pid: self.pid,
            tid: task.tid,
            runtime: secs(now - task.started).max(0.0),
            hard_time_left: task.hard_deadline.map(|d| secs(d - now).max(0.0)),
            soft_time_left: task.soft_deadline.map(|d| secs(d - now)),
            wait: proc_info::ThreadWait::read(self.pid, task.tid),
        })
    }
}

/// Pool counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Children replaced after `max_tasks_per_child`.
    pub recycled_max_tasks: AtomicU64,
    /// Children replaced for exceeding the memory limit.
    pub recycled_memory: AtomicU64,
    /// Children killed at a hard time limit.
    pub hard_limit_kills: AtomicU64,
    /// Children that died mid-task.
    pub worker_lost: AtomicU64,
    /// Failed child starts.
    pub spawn_failures: AtomicU64,
}

struct ChildProc {
    slot: usize,
    pid: u32,
    process: Child,
    stdin: ChildStdin,
    /// Buffered: a frame's length and body arrive in one read.
    stdout: BufReader<ChildStdout>,
    /// The thread its tasks run on, as its `Ready` said.
    tid: u32,
    tasks: u64,
    /// The pool's generation when it started: [`Pool::restart`] replaces older children.
    generation: u64,
}

struct Thrash {
    recycles: VecDeque<(Instant, u64)>,
    last_warning: Option<Instant>,
}

/// The supervisor's pool of children.
pub struct Pool {
    config: PreforkConfig,
    idle: Mutex<Vec<ChildProc>>,
    idle_count: Semaphore,
    status: Mutex<BTreeMap<usize, ChildStatus>>,
    stats: PoolStats,
    fresh_rss_kib: u64,
    thrash: Mutex<Thrash>,
    degraded: AtomicBool,
    /// The slot number the next added child gets.
    next_slot: AtomicUsize,
    /// Children signalled by [`Pool::terminate`], whose death is not a lost worker.
    terminated: Mutex<std::collections::HashMap<u32, i32>>,
    /// Bumped by [`Pool::restart`]; a child of an older generation is replaced when idle.
    generation: AtomicU64,
    /// The tasks the children announced when ready (a Python child's app).
    child_tasks: Vec<protocol::ChildTask>,
}

/// Publishes what a task in a child asks to send ([`FromChild::Publish`]); the worker's broker.
pub trait ChildPublisher: Send + Sync {
    /// Publish one message; `Err` says why it could not be (given to the task as an error).
    fn publish<'a>(&'a self, req: protocol::PublishRequest) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

impl Pool {
    /// Start every child and wait until all are ready. Refuses a memory limit below a fresh
    /// child's resident set.
    pub async fn start(config: PreforkConfig) -> Result<Arc<Pool>, PoolError> {
        let mut children = Vec::with_capacity(config.processes);
        let mut child_tasks = Vec::new();
        for slot in 0..config.processes.max(1) {
            let (child, tasks) = spawn_child(&config, slot).await?;
            if slot == 0 {
                child_tasks = tasks;
            }
            children.push(child);
        }
        let fresh_rss_kib = children.iter().filter_map(|c| proc_info::rss_kib(c.pid)).max().unwrap_or(0);
        if let Some(limit) = config.max_memory_per_child_kib {
            if limit <= fresh_rss_kib {
                for c in &children {
                    proc_info::kill(c.pid);
                }
                return Err(PoolError::MemoryLimitBelowFreshChild { limit_kib: limit, fresh_kib: fresh_rss_kib });
            }
        }
        let status = children
            .iter()
            .map(|c| {
                let s = ChildStatus { slot: c.slot, pid: c.pid, task: None, tasks_done: 0, rss_kib: fresh_rss_kib };
                (c.slot, s)
            })
            .collect();
        let n = children.len();
        tracing::info!(processes = n, fresh_child_rss = %format_kib(fresh_rss_kib), "prefork pool ready");
        Ok(Arc::new(Pool {
            config,
            idle: Mutex::new(children),
            idle_count: Semaphore::new(n),
            status: Mutex::new(status),
            stats: PoolStats::default(),
            fresh_rss_kib,
            thrash: Mutex::new(Thrash { recycles: VecDeque::new(), last_warning: None }),
            degraded: AtomicBool::new(false),
            next_slot: AtomicUsize::new(n),
            terminated: Mutex::default(),
            generation: AtomicU64::new(0),
            child_tasks,
        }))
    }

    /// The tasks the children announced when they started (empty for this executable's
    /// children, whose tasks are the supervisor's registry).
    pub fn child_tasks(&self) -> &[protocol::ChildTask] {
        &self.child_tasks
    }

    /// The resident set of a fresh child, KiB.
    pub fn fresh_rss_kib(&self) -> u64 {
        self.fresh_rss_kib
    }

    /// Counters.
    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// Whether children are failing to start.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Every child, by slot.
    pub fn children(&self) -> Vec<ChildStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    fn set_status(&self, slot: usize, f: impl FnOnce(&mut ChildStatus)) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = st.get_mut(&slot) {
            f(s);
        }
    }

    /// Run one task in an idle child, killing it at `hard` or when `abort` turns true.
    pub async fn run(
        self: &Arc<Self>,
        req: RunRequest,
        hard: Option<Duration>,
        mut abort: watch::Receiver<bool>,
        publisher: &dyn ChildPublisher,
    ) -> PoolOutcome {
        let permit = match self.idle_count.acquire().await {
            Ok(p) => p,
            Err(_) => return PoolOutcome::Aborted,
        };
        permit.forget();
        let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let Some(mut child) = popped else {
            // Cannot happen: a permit means a child is idle. Give the permit back and report.
            self.idle_count.add_permits(1);
            return PoolOutcome::WorkerLost("no idle child".into());
        };
        let (id, name) = (req.id.clone(), req.name.clone());
        tracing::Span::current().record("child_pid", child.pid);
        let started = Utc::now();
        let hard_deadline = hard.and_then(|h| chrono::TimeDelta::from_std(h).ok()).map(|h| started + h);
        let soft_deadline = req
            .soft_time_limit
            .and_then(|s| chrono::TimeDelta::from_std(Duration::try_from_secs_f64(s).ok()?).ok())
            .map(|s| started + s);
        let task = ActiveTask { id: id.clone(), name, started, tid: child.tid, hard_deadline, soft_deadline };
        self.set_status(child.slot, |s| s.task = Some(task));
        if let Err(e) = write_frame_async(&mut child.stdin, &ToChild::Run(Box::new(req))).await {
            let how = self.bury(child).await;
            return PoolOutcome::WorkerLost(format!("the child's pipe broke ({e}); it ended with {how}"));
        }
        let hard_timer = async {
            match hard {
                Some(h) => tokio::time::sleep(h).await,
                None => std::future::pending().await,
            }
        };
        let hard_timer = std::pin::pin!(hard_timer);
        let mut hard_timer = hard_timer;
        let outcome: Result<(), String> = loop {
            tokio::select! {
                frame = read_frame_async::<FromChild>(&mut child.stdout) => match frame {
                    Ok(Some(FromChild::Done { id: done_id, outcome, rss_kib, chain_stopped })) if done_id == id => {
                        child.tasks += 1;
                        let tasks = child.tasks;
                        self.set_status(child.slot, |s| { s.task = None; s.tasks_done = tasks; s.rss_kib = rss_kib; });
                        // A terminate signal the child did not die of (a task that ignores it)
                        // must not make its next death a termination.
                        self.take_terminated(child.pid);
                        self.check_in(child, rss_kib);
                        return PoolOutcome::Done { result: outcome.into_result(), chain_stopped };
                    }
                    Ok(Some(FromChild::Thread { id: thread_id, tid })) => {
                        if thread_id == id {
                            self.set_status(child.slot, |s| if let Some(t) = &mut s.task { t.tid = tid });
                        } else {
                            tracing::warn!(pid = child.pid, frame_task = %thread_id, tid, "a child named the thread of a task it is not running; ignored");
                        }
                    }
                    Ok(Some(FromChild::Publish(publish))) => {
                        // The task waits for the answer, as a Celery task waits for its publish.
                        let error = publisher.publish(*publish).await.err();
                        if let Err(e) = write_frame_async(&mut child.stdin, &ToChild::Published { error }).await {
                            break Err(format!("the child's pipe broke ({e})"));
                        }
                    }
                    Ok(None) => break Err(String::new()),
                    Ok(Some(other)) => break Err(format!("the child answered out of turn: {other:?}")),
                    Err(e) => break Err(format!("unreadable answer from the child: {e}")),
                },
                _ = &mut hard_timer => {
                    proc_info::kill(child.pid);
                    self.stats.hard_limit_kills.fetch_add(1, Ordering::Relaxed);
                    let how = self.bury(child).await;
                    tracing::warn!(child_exit = %how, "hard time limit: child killed and replaced");
                    return PoolOutcome::TimeLimit;
                }
                _ = async { let _ = abort.wait_for(|a| *a).await; } => {
                    proc_info::kill(child.pid);
                    self.bury(child).await;
                    return PoolOutcome::Aborted;
                }
            }
        };
        // The stream ended or broke: the child died mid-task.
        let detail = outcome.err().unwrap_or_default();
        if let Some(signal) = self.take_terminated(child.pid) {
            let how = self.bury(child).await;
            return PoolOutcome::Terminated(signal, how);
        }
        self.stats.worker_lost.fetch_add(1, Ordering::Relaxed);
        if detail.is_empty() {
            return PoolOutcome::WorkerLost(self.bury(child).await);
        }
        // A stream that broke (not ended) comes from a child that may well be alive, e.g. a task
        // that wrote on the frame pipe: nothing it says can be trusted any more, so it is killed
        // now rather than waited for.
        proc_info::kill(child.pid);
        let how = self.bury(child).await;
        PoolOutcome::WorkerLost(format!("{detail}; the supervisor killed it ({how})"))
    }

    /// Return a child to the idle set, or replace it if it has done its share.
    fn check_in(self: &Arc<Self>, child: ChildProc, rss_kib: u64) {
        let over_tasks = self.config.max_tasks_per_child.is_some_and(|max| child.tasks >= max);
        let over_memory = self.config.max_memory_per_child_kib.is_some_and(|max| rss_kib > max);
        let outdated = child.generation < self.generation.load(Ordering::Relaxed);
        if !(over_tasks || over_memory || outdated) {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(child);
            self.idle_count.add_permits(1);
            return;
        }
        if over_memory {
            self.stats.recycled_memory.fetch_add(1, Ordering::Relaxed);
            tracing::info!(pid = child.pid, tasks = child.tasks, rss = %format_kib(rss_kib), "child over --max-memory-per-child: replacing it");
            self.note_memory_recycle(child.tasks, rss_kib);
        } else if outdated && !over_tasks {
            tracing::info!(pid = child.pid, tasks = child.tasks, "pool restart: replacing the child after its task");
        } else {
            self.stats.recycled_max_tasks.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pid = child.pid, tasks = child.tasks, "child reached --max-tasks-per-child: replacing it");
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let slot = child.slot;
            retire(child).await;
            pool.respawn(slot).await;
        });
    }

    fn note_memory_recycle(&self, tasks: u64, rss_kib: u64) {
        let now = Instant::now();
        let mut t = self.thrash.lock().unwrap_or_else(|e| e.into_inner());
        t.recycles.push_back((now, tasks));
        while t.recycles.front().is_some_and(|(at, _)| now.duration_since(*at) > THRASH_WINDOW) {
            t.recycles.pop_front();
        }
        let n = t.recycles.len();
        let avg = t.recycles.iter().map(|(_, k)| *k as f64).sum::<f64>() / n.max(1) as f64;
        let due = t.last_warning.is_none_or(|at| now.duration_since(at) >= THRASH_WINDOW);
        if n >= 3 && avg < THRASH_TASKS && due {
            t.last_warning = Some(now);
            tracing::warn!(
                recycles_last_minute = n,
                avg_tasks_per_child = format!("{avg:.1}"),
                fresh_child = %format_kib(self.fresh_rss_kib),
                last_child = %format_kib(rss_kib),
                limit = %format_kib(self.config.max_memory_per_child_kib.unwrap_or(0)),
                "memory recycling thrash: children are replaced after {avg:.1} tasks on average; \
                 raise --max-memory-per-child above what a child needs after a few tasks, or fix the task that keeps memory"
            );
        }
    }

    /// The signal [`Pool::terminate`] sent to `pid`, if it did, forgotten from now on.
    fn take_terminated(&self, pid: u32) -> Option<i32> {
        self.terminated.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid)
    }

    /// Wait for a dead or killed child and start its replacement in the background.
    async fn bury(self: &Arc<Self>, mut child: ChildProc) -> String {
        self.take_terminated(child.pid);
        let how = match tokio::time::timeout(Duration::from_secs(5), child.process.wait()).await {
            Ok(Ok(status)) => proc_info::describe_exit(status),
            _ => {
                proc_info::kill(child.pid);
                "no exit status".into()
            }
        };
        let pool = self.clone();
        let slot = child.slot;
        tokio::spawn(async move { pool.respawn(slot).await });
        how
    }

    /// Start a child for `slot`, retrying with capped exponential backoff.
    async fn respawn(self: Arc<Self>, slot: usize) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match spawn_child(&self.config, slot).await {
                Ok((mut child, _)) => {
                    child.generation = self.generation.load(Ordering::Relaxed);
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!(slot, "pool child started again; pool healthy");
                    }
                    let pid = child.pid;
                    self.set_status(slot, |s| {
                        *s = ChildStatus {
                            slot,
                            pid,
                            task: None,
                            tasks_done: 0,
                            rss_kib: proc_info::rss_kib(pid).unwrap_or(0),
                        }
                    });
                    self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(child);
                    self.idle_count.add_permits(1);
                    return;
                }
                Err(e) => {
                    self.stats.spawn_failures.fetch_add(1, Ordering::Relaxed);
                    self.degraded.store(true, Ordering::Relaxed);
                    tracing::error!(slot, error = %e, retry_in = ?backoff, "pool degraded: a child failed to start");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Send `signal` to the child running task `id` (remote control's `revoke --terminate`);
    /// returns its pid, or `None` when no child runs that task. If the child dies of it, the task
    /// ends as [`PoolOutcome::Terminated`] and the child is replaced.
    pub fn terminate(&self, id: &str, signal: nix::sys::signal::Signal) -> Option<u32> {
        let pid = self.children().into_iter().find(|c| c.task.as_ref().is_some_and(|t| t.id == id))?.pid;
        self.terminated.lock().unwrap_or_else(|e| e.into_inner()).insert(pid, signal as i32);
        proc_info::signal(pid, signal);
        Some(pid)
    }

    /// Add `n` children, started (ready) when this returns.
    pub async fn grow(&self, n: usize) -> Result<(), PoolError> {
        for _ in 0..n {
            let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
            let (mut child, _) = spawn_child(&self.config, slot).await?;
            child.generation = self.generation.load(Ordering::Relaxed);
            let s = ChildStatus { slot, pid: child.pid, task: None, tasks_done: 0, rss_kib: self.fresh_rss_kib };
            self.status.lock().unwrap_or_else(|e| e.into_inner()).insert(slot, s);
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(child);
            self.idle_count.add_permits(1);
        }
        Ok(())
    }

    /// Retire `n` children as they become idle. The caller has first taken `n` of the worker's
    /// slots, so no task waits for them.
    pub async fn shrink(&self, n: usize) {
        for _ in 0..n {
            let Ok(permit) = self.idle_count.acquire().await else { return };
            permit.forget();
            let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(child) = popped {
                self.status.lock().unwrap_or_else(|e| e.into_inner()).remove(&child.slot);
                retire(child).await;
            }
        }
    }

    /// Replace every child with a fresh start of the program (remote control's `pool_restart`,
    /// e.g. after the binary was upgraded in place): idle children now, busy ones once their task
    /// is done, so no task is interrupted.
    pub fn restart(self: &Arc<Self>) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        let mut replaced = 0;
        while let Ok(permit) = self.idle_count.try_acquire() {
            permit.forget();
            let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(child) = popped else { break };
            replaced += 1;
            let pool = self.clone();
            tokio::spawn(async move {
                let slot = child.slot;
                retire(child).await;
                pool.respawn(slot).await;
            });
        }
        tracing::info!(idle_replaced = replaced, "pool restart: replacing every child");
    }

    /// Stop every idle child (busy ones are stopped by their tasks' abort).
    pub async fn shutdown(&self) {
        self.idle_count.close();
        let children: Vec<ChildProc> = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for c in children {
            retire(c).await;
        }
    }
}

/// Ask a child to exit; kill it if it does not within a second.
async fn retire(mut child: ChildProc) {
    let _ = write_frame_async(&mut child.stdin, &ToChild::Exit).await;
    match tokio::time::timeout(Duration::from_secs(1), child.process.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(status) => {
            let how = status.map(proc_info::describe_exit).unwrap_or_else(|e| e.to_string());
            tracing::warn!(pid = child.pid, child_exit = %how, "a retired child did not exit cleanly");
        }
        Err(_) => {
            tracing::warn!(pid = child.pid, "a retired child did not exit within 1 s of being asked: killed");
            proc_info::kill(child.pid);
            let _ = child.process.wait().await;
        }
    }
}

async fn spawn_child(config: &PreforkConfig, slot: usize) -> Result<(ChildProc, Vec<protocol::ChildTask>), PoolError> {
    let err = |reason: String| PoolError::Spawn { program: config.program.display().to_string(), reason };
    let parent = std::process::id();
    let mut command = tokio::process::Command::new(&config.program);
    command
        .args(&config.args)
        .envs(config.env.iter().map(|(k, v)| (k, v)))
        .env(child::CHILD_ENV, parent.to_string())
        .env("CELERIAC_LOG", &config.log_level)
        .env("CELERIAC_LOG_FORMAT", &config.log_format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A process group of its own: a signal to the worker's group (Ctrl-C in a terminal,
        // supervisord's `stopasgroup`, `kill -TERM -<pgid>`) reaches the supervisor alone, which
        // decides when children stop; otherwise a warm shutdown's SIGTERM or SIGINT would kill
        // every running task's child at once.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: between fork and exec the closure makes two syscalls (prctl, getppid) and
    // allocates nothing; the parent-death signal is set before any program (a Python
    // interpreter, which cannot set it itself before it has started) runs.
    unsafe {
        command.pre_exec(move || {
            proc_info::die_with_parent(parent).map_err(std::io::Error::other)?;
            Ok(())
        });
    }
    let mut process = command.spawn().map_err(|e| err(e.to_string()))?;
    let pid = process.id().unwrap_or(0);
    let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
        return Err(err("no pipes to the child".into()));
    };
    let mut stdout = BufReader::new(stdout);
    match tokio::time::timeout(READY_TIMEOUT, read_frame_async::<FromChild>(&mut stdout)).await {
        Ok(Ok(Some(FromChild::Ready { tasks, tid, .. }))) => {
            let tid = tid.unwrap_or(pid);
            Ok((ChildProc { slot, pid, process, stdin, stdout, tid, tasks: 0, generation: 0 }, tasks))
        }
        Ok(Ok(Some(FromChild::Failed { reason }))) => {
            let status = process.wait().await.map(proc_info::describe_exit).unwrap_or_default();
            Err(PoolError::ChildFailed { program: config.program.display().to_string(), reason, status })
        }
        Ok(Ok(other)) => {
            let status = process.wait().await.map(proc_info::describe_exit).unwrap_or_default();
            Err(err(format!("it did not say ready ({other:?}); it ended with {status}")))
        }
        Ok(Err(e)) => Err(err(format!("unreadable first frame: {e}"))),
        Err(_) => {
            proc_info::kill(pid);
            Err(err(format!("not ready within {READY_TIMEOUT:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bare_kib() {
        assert_eq!(parse_size_kib("200MB").unwrap(), 195_313);
        assert_eq!(parse_size_kib("512MiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size_kib("40MB").unwrap(), 39_063);
        assert_eq!(parse_size_kib("1GiB").unwrap(), 1024 * 1024);
        assert_eq!(parse_size_kib("300000").unwrap(), 300_000);
        assert!(parse_size_kib("lots").is_err());
        assert!(parse_size_kib("5 parsecs").unwrap_err().contains("unit"));
        assert!(parse_size_kib("0MB").is_err());
    }

    #[test]
    fn sizes_print_in_mb() {
        assert_eq!(format_kib(4004), "4.1 MB");
    }
}
