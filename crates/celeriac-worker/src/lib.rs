//! The worker: takes deliveries from a broker, runs tasks, stores outcomes, acknowledges.
//!
//! - [`request`]: turns a delivery into a runnable request, or explains why it cannot be run
//!   (bad headers, bad body, unknown task) so the message is failed or dead-lettered, never
//!   dropped and never a panic.
//! - [`execute`]: runs one request in the async pool with its time limits, then settles it:
//!   result stored first, message acknowledged after (acks late), retries republished.
//! - [`shutdown`]: warm and cold shutdown, driven by signals or by code.
//! - [`stats`]: counters of what the worker did.
//! - [`prefetch`]: the adaptive prefetch window (Celery's size for long tasks, wider for short).
//! - [`events`]: Celery's events on `celeryev` (worker heartbeats; task events with `-E`).
//! - [`metrics`]: Prometheus metrics, served on `--metrics-addr`.
//! - [`nodename`]: the worker's node name (`-n name@%h`) with Celery's `%` expansions.
//! - [`state`]: the requests the worker holds (reserved, scheduled, active), revoked ids, rate
//!   limits: what remote control inspects and changes.
//! - [`control`]: the worker's node in Celery's pidbox (remote control).
//! - [`revokes`]: revoked ids kept in the result backend, loaded at start, followed while running.
//! - `consumers`: the queues consumed, changeable at run time (`add_consumer`).
//!
//! The main loop ([`Worker::run`]) pulls from the [`Consumer`](celeriac_core::Consumer)s and runs at
//! most `concurrency` tasks at once. It keeps taking deliveries whatever the slots are doing: a
//! delivery whose ETA is later is held without a slot (and widens the window by one), one that can
//! run waits in the ready queue, and a ready queue stuck behind busy slots is given back to the
//! broker for other workers (see [`prefetch`] and ARCHITECTURE.md, "The window and the
//! acknowledgements").

mod builtins;
mod canvas;
mod consumers;
pub mod control;
pub mod events;
pub mod execute;
mod foreign;
pub mod metrics;
pub mod nodename;
mod observe;
pub mod prefetch;
pub mod prefork;
mod ready;
pub mod request;
pub mod revokes;
pub mod shutdown;
pub mod state;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{Broker, BrokerError, Registry, ResultBackend};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub use shutdown::{Shutdown, ShutdownLevel};
pub use stats::{Stats, StatsSnapshot};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to consume.
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Deliveries held per slot (prefetch = concurrency x multiplier): the window for long
    /// tasks, and its floor.
    pub prefetch_multiplier: usize,
    /// How wide the prefetch window may grow for short tasks (see [`prefetch`]); at or below
    /// `concurrency x prefetch_multiplier` the window is fixed, as in Celery.
    pub max_prefetch: usize,
    /// How long a warm shutdown waits for running tasks before requeueing them.
    pub shutdown_timeout: Duration,
    /// The worker's node name (`celeriac@host`).
    pub hostname: String,
    /// Default hard time limit, seconds.
    pub time_limit: Option<f64>,
    /// Default soft time limit, seconds.
    pub soft_time_limit: Option<f64>,
    /// A message delivered more than this many times is failed with `WorkerLostError` and
    /// dead-lettered (the poison-message guard).
    pub max_deliveries: u32,
    /// Run tasks in child processes (the prefork pool) instead of in this process.
    pub prefork: Option<prefork::PreforkConfig>,
    /// Which events to send (on transports with exchanges).
    pub events: events::EventsConfig,
    /// Serve Prometheus metrics on this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The queue of a continuation (callback, chain step, chord body, errback) whose signature
    /// names none and whose task is not registered here with one (Celery's
    /// `task_default_queue`, default `celery`).
    pub default_queue: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec![celeriac_core::DEFAULT_QUEUE.to_string()],
            concurrency: 8,
            prefetch_multiplier: 4,
            max_prefetch: DEFAULT_MAX_PREFETCH,
            shutdown_timeout: Duration::from_secs(30),
            hostname: default_hostname(),
            time_limit: None,
            soft_time_limit: None,
            max_deliveries: 3,
            prefork: None,
            events: events::EventsConfig::default(),
            metrics_addr: None,
            default_queue: celeriac_core::DEFAULT_QUEUE.to_string(),
        }
    }
}

/// The default upper bound of the adaptive prefetch window.
pub const DEFAULT_MAX_PREFETCH: usize = 1024;

/// The default upper bound of the adaptive prefetch window for a pool of Python children
/// (`--python-app`), whose supervisor holds the requests: with its reserve packed (`ready`), 256
/// drained no-op Python tasks as fast as 512 and 1,024 in the benchmark (10,600-12,500 a
/// second), and with 21 ms of work at 12,000 a second it covers a broker several milliseconds
/// away (docs/benchmarks.md, "Supervisor RSS"). Not for Rust prefork children: at 20,000 tasks a
/// second, 256 drained 15% slower than 1,024.
pub const DEFAULT_MAX_PREFETCH_PYTHON: usize = 256;

/// `celeriac@<host name>` (the expansion of [`nodename::DEFAULT_NODENAME`]).
pub fn default_hostname() -> String {
    format!("celeriac@{}", nodename::host_name())
}

/// An error that stops a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is unusable.
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// The prefork pool could not start.
    #[error(transparent)]
    Pool(#[from] prefork::PoolError),
    /// The broker failed in a way the worker cannot recover from.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// What the worker shares with every running task.
pub(crate) struct Shared {
    pub config: WorkerConfig,
    pub registry: Arc<Registry>,
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    pub stats: Arc<Stats>,
    /// Set to true to abort running tasks (shutdown timeout passed, or cold shutdown).
    pub abort: watch::Receiver<bool>,
    /// The prefork pool, when tasks run in child processes.
    pub pool: Option<Arc<prefork::Pool>>,
    /// Times each task's child died under it, in this process.
    pub lost: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Metrics and events.
    pub observe: observe::Observer,
    /// The requests held, revoked ids, rate limits (for remote control).
    pub state: Arc<state::WorkerState>,
    /// One permit per task that may run at once.
    pub slots: Arc<Semaphore>,
    /// How long the last tasks ran (how long the ready reserve may wait for a slot).
    pub runtimes: std::sync::Mutex<prefetch::RecentRuntimes>,
    /// Whether the unconsumed default queue was reported (`canvas`, once per worker).
    pub warned_default_queue: std::sync::atomic::AtomicBool,
    /// How the tasks the pool's children announced are acknowledged (`acks_late`,
    /// `reject_on_worker_lost`), by name; empty when the children run this binary's tasks.
    pub acks: std::collections::HashMap<String, foreign::AckPolicy>,
}

impl Shared {
    /// Count one more lost child for a task; returns the count.
    pub fn note_lost(&self, id: &str) -> u32 {
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        let n = lost.entry(id.to_string()).or_default();
        *n += 1;
        *n
    }

    /// Forget a task's lost-child count.
    pub fn forget_lost(&self, id: &str) {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// An INFO line with a [`StatsSnapshot`](stats::StatsSnapshot)'s counters as fields of their own
/// (`received=34 succeeded=28 ...` in text, numbers in JSON), then the given fields and message.
macro_rules! info_with_counts {
    ($s:expr, $($rest:tt)*) => {
        tracing::info!(
            received = $s.received, succeeded = $s.succeeded, failed = $s.failed, retried = $s.retried,
            revoked = $s.revoked, dead_lettered = $s.dead_lettered, requeued = $s.requeued,
            released = $s.released, $($rest)*
        )
    };
}

/// On SIGUSR1, log what every pool child is doing (pid, task, runtime, tasks done, memory, and
/// what it is blocked on), or how many tasks run in the async pool.
fn spawn_status_dump(shared: Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok()?;
    Some(tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let s = shared.stats.snapshot();
            match &shared.pool {
                Some(pool) => {
                    info_with_counts!(s, degraded = pool.degraded(), "pool status");
                    for c in pool.children() {
                        match c.diagnose() {
                            Some(d) => tracing::info!(
                                slot = c.slot, pid = c.pid, tid = d.tid, task_id = %d.id, task_name = %d.name,
                                runtime = format!("{:.1}s", d.runtime),
                                hard_time_left = %d.hard_time_left.map_or_else(|| "-".into(), |s| format!("{s:.1}s")),
                                tasks_done = c.tasks_done, rss = %prefork::format_kib(c.rss_kib),
                                blocked = %d.blocked_on(), "child busy"
                            ),
                            None => {
                                tracing::info!(slot = c.slot, pid = c.pid, tasks_done = c.tasks_done, rss = %prefork::format_kib(c.rss_kib), "child idle")
                            }
                        }
                    }
                }
                None => info_with_counts!(s, "async pool status"),
            }
        }
    }))
}

/// Tasks this worker finished, for heartbeats (Celery's `processed`).
fn processed(stats: &Stats) -> u64 {
    let s = stats.snapshot();
    s.succeeded + s.failed + s.retried + s.revoked
}

/// Send `worker-online` now, then `worker-heartbeat` every [`events::HEARTBEAT_FREQ`] seconds.
fn spawn_heartbeat(
    events: Arc<events::Dispatcher>,
    stats: Arc<Stats>,
    metrics: Arc<metrics::Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let fields = || {
            let active = u64::try_from(metrics.in_flight()).unwrap_or(0);
            events::Dispatcher::worker_fields(active, processed(&stats))
        };
        events.send("worker-online", fields());
        let mut tick = tokio::time::interval(Duration::from_secs_f64(events::HEARTBEAT_FREQ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            events.send("worker-heartbeat", fields());
        }
    })
}

/// Tasks running now: the pool's slots in use.
fn running_now(slots: &Semaphore, concurrency: &std::sync::atomic::AtomicUsize) -> usize {
    concurrency.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(slots.available_permits())
}

/// Give the transport a new window if it differs from the one applied; returns the one applied.
/// A transport that cannot change it keeps its first window, and adaptation stops.
fn set_window(consumers: &mut consumers::Consumers, adapt: &mut bool, want: usize, applied: usize) -> usize {
    if want == applied {
        return applied;
    }
    *adapt = consumers.set_prefetch(want);
    if *adapt {
        tracing::debug!(prefetch = want, "prefetch window changed");
    }
    want
}

/// Hold a request whose ETA (or turn under its rate limit) is later, without a slot, counting it
/// in `held` until it gets its slot; returns the request when it can run now.
fn hold_if_due_later(
    shared: &Arc<Shared>,
    mut req: request::Request,
    slots: &Arc<Semaphore>,
    shutdown: &Shutdown,
    held: &Arc<std::sync::atomic::AtomicUsize>,
    running: &mut JoinSet<()>,
) -> Option<request::Request> {
    let turn = match req.eta_in_future() {
        Some(eta) => eta,
        None => {
            // A rate-limited task waits for its turn without a slot, so other tasks keep the pool.
            req.rate_turn_taken = true;
            match shared.state.rate_wait(&req.headers.task) {
                Some(wait) => chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
                None => return Some(req),
            }
        }
    };
    let guard = execute::HeldGuard::new(held.clone());
    let hold = execute::hold_then_run(shared.clone(), req, turn, slots.clone(), shutdown.subscribe(), guard);
    running.spawn(Box::pin(hold));
    None
}

/// Give every ready request back to the broker, unstarted, for a worker with a free slot.
async fn give_back(shared: &Shared, ready: &mut ready::ReadyQueue) {
    let n = ready.len();
    if n == 0 {
        return;
    }
    tracing::debug!(
        released = n,
        "every slot busy: giving back the tasks waiting for one, for workers with a free slot"
    );
    shared.stats.released.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    ready.release_all(false).await;
}

/// Every [`prefork::proc_info::HEAP_RELEASE_EVERY`], the malloc arenas' free pages back to the
/// kernel (a prefork supervisor; see `proc_info::release_free_heap`).
async fn release_free_heap() {
    let mut every = tokio::time::interval(prefork::proc_info::HEAP_RELEASE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        prefork::proc_info::release_free_heap();
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once shutdown has reached `target` (or the handle is gone).
async fn reached(level: &mut watch::Receiver<ShutdownLevel>, target: ShutdownLevel) {
    let _ = level.wait_for(|l| *l >= target).await;
}

/// A worker bound to a broker, a result backend and a registry of tasks.
pub struct Worker {
    config: WorkerConfig,
    registry: Arc<Registry>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    stats: Arc<Stats>,
    metrics: Arc<metrics::Metrics>,
    /// The running worker, for Celery's builtin tasks (`celery.map`, ...).
    builtins: builtins::Link,
}

impl Worker {
    /// A worker; nothing happens until [`Worker::run`].
    pub fn new(
        config: WorkerConfig,
        registry: Arc<Registry>,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
    ) -> Self {
        let link = builtins::Link::default();
        let registry = Arc::new(builtins::with_builtins(&registry, &link));
        Worker {
            config,
            registry,
            broker,
            backend,
            stats: Arc::new(Stats::default()),
            metrics: Default::default(),
            builtins: link,
        }
    }

    /// The worker's metrics (live; served on `metrics_addr` when set).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    /// The worker's counters (live).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Run until `shutdown` asks to stop; returns once every task is settled.
    ///
    /// The consume loop runs as a task of the runtime rather than on the caller's thread (for the
    /// `celeriac` binary, the thread blocked in `block_on`): deliveries, task spawns and
    /// acknowledgements then stay on the runtime's worker threads instead of waking another
    /// thread for every message. Dropping the returned future aborts that task, which drops the
    /// loop exactly as dropping it in place would.
    pub async fn run(self, shutdown: Shutdown) -> Result<StatsSnapshot, WorkerError> {
        let handle = tokio::spawn(self.run_loop(shutdown));
        let _abort_on_drop = AbortOnDrop(handle.abort_handle());
        match handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only an abort (this future dropped, or the runtime shutting down) ends it otherwise.
            Err(_) => Err(WorkerError::Broker(BrokerError::Closed)),
        }
    }

    async fn run_loop(self, shutdown: Shutdown) -> Result<StatsSnapshot, WorkerError> {
        let cfg = &self.config;
        if cfg.concurrency == 0 {
            return Err(WorkerError::Config("concurrency must be at least 1".into()));
        }
        if cfg.queues.is_empty() {
            return Err(WorkerError::Config("no queue to consume".into()));
        }
        let prefetch = cfg.concurrency.saturating_mul(cfg.prefetch_multiplier.max(1));
        // The pool is fully started (every child ready) before anything is consumed: no restart
        // loop on a backlog.
        let pool = match &cfg.prefork {
            Some(pc) => {
                Some(prefork::Pool::start(prefork::PreforkConfig { processes: cfg.concurrency, ..pc.clone() }).await?)
            }
            None => None,
        };
        if let Some(p) = &pool {
            self.metrics.attach_pool(p.clone());
        }
        // A supervisor's memory is the pool's overhead: freed pages go back to the kernel.
        let _heap_release = pool.as_ref().map(|_| AbortOnDrop(tokio::spawn(release_free_heap()).abort_handle()));
        // Children that announced their own tasks (Python children) run those, and only those.
        let registry = match &pool {
            Some(p) if !p.child_tasks().is_empty() => {
                tracing::info!(tasks = p.child_tasks().len(), "the pool's children run the tasks they announced");
                Arc::new(foreign::registry(&self.registry, p.child_tasks()))
            }
            _ => self.registry.clone(),
        };
        let state: Arc<state::WorkerState> = Default::default();
        match state.set_declared_rate_limits(&registry) {
            Ok(limited) if !limited.is_empty() => tracing::info!(tasks = %limited.join(" "), "rate limits"),
            Ok(_) => {}
            Err(e) => {
                if let Some(p) = &pool {
                    p.shutdown().await;
                }
                return Err(WorkerError::Config(e));
            }
        }
        let metrics_server = match cfg.metrics_addr {
            Some(addr) => match self.metrics.serve(addr).await {
                Ok(h) => Some(AbortOnDrop(h.abort_handle())),
                Err(e) => {
                    if let Some(p) = &pool {
                        p.shutdown().await;
                    }
                    return Err(e.into());
                }
            },
            None => None,
        };
        let mut consumers = match consumers::Consumers::start(self.broker.clone(), &cfg.queues, prefetch).await {
            Ok(c) => c,
            Err(e) => {
                if let Some(p) = &pool {
                    p.shutdown().await;
                }
                return Err(e.into());
            }
        };
        let wants_events = cfg.events.task_events || cfg.events.worker_events;
        let events =
            wants_events.then(|| events::Dispatcher::start(self.broker.clone(), &cfg.hostname, cfg.events)).flatten();
        tracing::info!(
            hostname = %cfg.hostname,
            queues = %cfg.queues.join(","),
            concurrency = cfg.concurrency,
            prefetch,
            broker = %self.broker.url(),
            tasks = registry.len(),
            "worker ready"
        );
        if self.backend.url() == "disabled://" {
            tracing::warn!(
                "no result backend: results are not stored, so a client waiting on a result (a \
                 chain's, a chord's, any .get()) waits in vain, and chords cannot be joined; start \
                 the worker with the clients' --result-backend"
            );
        }
        let (abort_tx, abort_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(cfg.concurrency));
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            registry,
            broker: self.broker.clone(),
            backend: self.backend.clone(),
            stats: self.stats.clone(),
            abort: abort_rx,
            pool: pool.clone(),
            lost: Default::default(),
            observe: observe::Observer {
                metrics: self.metrics.clone(),
                events: events.as_ref().map(|(d, _)| d.clone()),
            },
            state,
            slots: slots.clone(),
            runtimes: Default::default(),
            warned_default_queue: Default::default(),
            acks: pool.as_ref().map(|p| foreign::ack_policies(p.child_tasks())).unwrap_or_default(),
        });
        let _ = self.builtins.set(Arc::downgrade(&shared));
        let _status_dump = spawn_status_dump(shared.clone());
        let _heartbeat = match (&events, cfg.events.worker_events) {
            (Some((d, _)), true) => {
                Some(AbortOnDrop(spawn_heartbeat(d.clone(), self.stats.clone(), self.metrics.clone()).abort_handle()))
            }
            _ => None,
        };
        if events.is_some() && cfg.events.worker_events {
            let check = events::warn_if_name_taken(self.broker.clone(), cfg.hostname.clone(), std::process::id());
            tokio::spawn(check);
        }
        let (queue_tx, mut queue_rx) = tokio::sync::mpsc::unbounded_channel();
        // Slots as remote control grows or shrinks the pool; the prefetch window follows.
        let concurrency = Arc::new(std::sync::atomic::AtomicUsize::new(cfg.concurrency));
        let node = control::start(control::Context {
            shared: shared.clone(),
            shutdown: shutdown.clone(),
            queues: queue_tx,
            queue_list: consumers.listing(),
            prefetch,
            started: std::time::Instant::now(),
            concurrency: concurrency.clone(),
            clock: Default::default(),
        })
        .await;
        // After the pidbox listens, before anything runs: no revoke falls between the two.
        let _revokes = revokes::load_and_follow(shared.clone()).await.map(|h| AbortOnDrop(h.abort_handle()));
        let mut running: JoinSet<()> = JoinSet::new();
        let mut level = shutdown.subscribe();
        let mut broker_errors = 0u32;
        let mut window = prefetch::AdaptivePrefetch::new(prefetch, cfg.max_prefetch, std::time::Instant::now());
        let mut ticks = tokio::time::interval(prefetch::TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Ticks run while the transport can change its prefetch: to widen the window for short
        // tasks, to follow a resized pool, to make room for held ETA tasks and to give back a
        // reserve stuck behind long tasks. A transport that cannot (SQLite, which delivers ETA
        // tasks itself; quorum queues) keeps its first window, and nothing is given back (the
        // same consumer would take it again at once).
        let mut adapt = consumers.set_prefetch(prefetch);
        // The window last given to the transport.
        let mut applied = prefetch;
        // Validated requests waiting for a slot, oldest first (the ready reserve); a prefork
        // supervisor keeps them packed (see `ready`).
        let mut ready = ready::ReadyQueue::new(cfg.prefork.is_some());
        let mut reserve = prefetch::Reserve::default();
        let mut give_back_check = tokio::time::interval(prefetch::GIVE_BACK_CHECK);
        give_back_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Deliveries held for an ETA or a rate limit, without a slot: each widens the window.
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));

        'consume: loop {
            if *level.borrow() != ShutdownLevel::Running {
                break;
            }
            let mut reapply = false;
            tokio::select! {
                biased;
                _ = level.changed() => continue,
                Some(_) = running.join_next(), if !running.is_empty() => {
                    window.completed();
                    reapply = slots.available_permits() > 0 && reserve.unblock();
                }
                _ = ticks.tick(), if adapt => {
                    let slots_now = concurrency.load(std::sync::atomic::Ordering::Relaxed);
                    window.set_base(slots_now.saturating_mul(cfg.prefetch_multiplier.max(1)));
                    window.tick(std::time::Instant::now());
                    if slots.available_permits() > 0 {
                        reserve.unblock();
                    }
                    reapply = true;
                }
                _ = give_back_check.tick(), if adapt && !ready.is_empty() => {
                    let typical = shared.runtimes.lock().unwrap_or_else(|p| p.into_inner()).typical();
                    let stuck = prefetch::give_back_after(typical)
                        .is_some_and(|after| reserve.give_back(std::time::Instant::now(), slots.available_permits(), after));
                    if stuck {
                        // Shrink the window first, so the broker does not hand the reserve
                        // straight back, then give back what is ready (and what the transport has
                        // already received).
                        let held_now = held.load(std::sync::atomic::Ordering::Relaxed);
                        let want = prefetch::wanted(0, running_now(&slots, &concurrency), held_now, true);
                        applied = set_window(&mut consumers, &mut adapt, want, applied);
                        while let Some(Ok(delivery)) = futures::FutureExt::now_or_never(consumers.next()) {
                            if let Some(req) = request::prepare(&shared, delivery).await {
                                if let Some(req) = hold_if_due_later(&shared, req, &slots, &shutdown, &held, &mut running) {
                                    ready.push_back(req);
                                }
                            }
                        }
                        give_back(&shared, &mut ready).await;
                    }
                    continue;
                }
                Some(command) = queue_rx.recv() => consumers.apply(command).await,
                permit = slots.clone().acquire_owned(), if !ready.is_empty() => {
                    let Ok(permit) = permit else { break 'consume };
                    if let Some(req) = ready.pop_front().await {
                        reserve.started(std::time::Instant::now(), !ready.is_empty());
                        // Boxed: the task's state is large, and tokio moves a spawned future's
                        // state several times (into the task, out as its output); a box is moved
                        // as a pointer.
                        running.spawn(Box::pin(execute::run(shared.clone(), req, permit)));
                    }
                    continue;
                }
                next = consumers.next() => match next {
                    Ok(delivery) => {
                        broker_errors = 0;
                        let Some(req) = request::prepare(&shared, delivery).await else { continue };
                        match hold_if_due_later(&shared, req, &slots, &shutdown, &held, &mut running) {
                            // One more held: one more place in the window, at once.
                            None => reapply = true,
                            Some(req) => {
                                if ready.is_empty() {
                                    // The fast path: nothing waits and a slot is free.
                                    if let Ok(permit) = slots.clone().try_acquire_owned() {
                                        running.spawn(Box::pin(execute::run(shared.clone(), req, permit)));
                                        continue;
                                    }
                                }
                                ready.push_back(req);
                                if reserve.blocked() && slots.available_permits() == 0 {
                                    // Arrived before the smaller window took effect: straight back.
                                    give_back(&shared, &mut ready).await;
                                } else {
                                    reserve.queued(std::time::Instant::now());
                                }
                            }
                        }
                    }
                    Err(BrokerError::Closed) => break,
                    Err(e) => {
                        broker_errors += 1;
                        let pause = Duration::from_millis(100 * 2u64.pow(broker_errors.min(6)));
                        tracing::warn!(error = %e, retry_in = ?pause, "cannot fetch from the broker");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = level.changed() => {}
                        }
                    }
                },
            }
            if reapply && adapt {
                let want = prefetch::wanted(
                    window.current(),
                    running_now(&slots, &concurrency),
                    held.load(std::sync::atomic::Ordering::Relaxed),
                    reserve.blocked(),
                );
                applied = set_window(&mut consumers, &mut adapt, want, applied);
            }
        }

        // Requests that never started go back first, for other workers.
        let released = ready.release_all(true).await;
        shared.stats.requeued.fetch_add(released as u64, std::sync::atomic::Ordering::Relaxed);
        // Stop consuming: prefetched deliveries go back to the queue.
        consumers.close().await;
        let in_flight = running.len();
        let warm = *level.borrow() != ShutdownLevel::Cold;
        if warm && in_flight > 0 {
            tracing::info!(running = in_flight, timeout = ?cfg.shutdown_timeout, "warm shutdown: waiting for running tasks");
            let deadline = tokio::time::sleep(cfg.shutdown_timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    biased;
                    r = running.join_next() => if r.is_none() { break },
                    _ = reached(&mut level, ShutdownLevel::Cold) => {
                        tracing::warn!(running = running.len(), "cold shutdown: requeueing running tasks");
                        break;
                    }
                    _ = &mut deadline => {
                        tracing::warn!(running = running.len(), "shutdown timeout passed: requeueing running tasks");
                        break;
                    }
                }
            }
        }
        if !running.is_empty() {
            let _ = abort_tx.send(true);
            while running.join_next().await.is_some() {}
        }
        // Every outcome is settled: make sure the broker has heard of it before returning.
        consumers.flush().await;
        if let Some(node) = node {
            node.stop().await;
        }
        if let Some(p) = &pool {
            p.shutdown().await;
        }
        drop(_heartbeat);
        if let Some((d, publisher)) = events {
            if cfg.events.worker_events {
                d.stop("worker-offline", events::Dispatcher::worker_fields(0, processed(&self.stats))).await;
            }
            publisher.abort();
        }
        drop(metrics_server);
        let snapshot = self.stats.snapshot();
        info_with_counts!(snapshot, hostname = %cfg.hostname, "worker stopped");
        Ok(snapshot)
    }
}
