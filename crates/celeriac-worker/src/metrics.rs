//! Prometheus metrics of one worker, served on `--metrics-addr` (off by default).
//!
//! Built on `prometheus-client` (the Prometheus project's own Rust client: typed label sets,
//! OpenMetrics text). What is exported, all prefixed `celeriac_`:
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `tasks_total` | counter | `task`, `state` | tasks that reached a final state: `SUCCESS`, `FAILURE`, `RETRY` (a retry was scheduled), `REVOKED` (expired), `REJECTED` (dead-lettered before running); every state of a task name is exported from its first task on, at 0 until it happens |
//! | `task_runtime_seconds` | histogram | `task` | how long the task function ran |
//! | `task_queue_wait_seconds` | histogram | `task` | from when the task was due at this worker to its start (see below) |
//! | `tasks_in_flight` | gauge | | tasks running now |
//! | `tasks_prefetched` | gauge | | deliveries held by this worker and not yet started (prefetched, or waiting for their ETA) |
//! | `pool_child_recycles_total` | counter | `reason` (`max_tasks`, `max_memory`) | prefork children replaced |
//! | `pool_hard_limit_kills_total` | counter | | prefork children killed at a hard time limit |
//! | `pool_worker_lost_total` | counter | | prefork children that died mid-task |
//! | `broker_reconnects_total` | counter | | times a lost broker connection was established again (this process) |
//! | `publish_retries_total` | counter | | publishes retried under the publish retry policy (this process) |
//!
//! **Queue wait.** Celery's protocol v2 carries no sent time (no header, and kombu sets no AMQP
//! `timestamp`), so the time a message spent in the broker's queue cannot be known from the
//! message. What is measured is the wait the worker can see: from the later of the delivery
//! reaching this worker and the task's ETA, to the task's start. It grows when tasks sit in the
//! prefetch buffer waiting for a slot, or start late after their ETA; the broker-side backlog is
//! the queue depth (`celeriac queues`, or RabbitMQ's own exporter).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::prefork::Pool;

/// Buckets for task run times and waits, in seconds: 1 ms to about 10 minutes.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0];

/// Labels of `tasks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskState {
    task: String,
    state: String,
}

/// Labels of the per-task histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskName {
    task: String,
}

type HistogramFamily = Family<TaskName, Histogram, fn() -> Histogram>;

/// The final states `tasks_total` counts.
pub const STATES: [&str; 5] = ["SUCCESS", "FAILURE", "RETRY", "REVOKED", "REJECTED"];

/// One task name's series, looked up once: the hot path then neither allocates label sets nor
/// takes the families' locks (the metrics share their values with the families' entries).
struct TaskSeries {
    states: [Counter; STATES.len()],
    runtime: Histogram,
    wait: Histogram,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

/// The worker's metrics. Cheap to update from any task; encoded on each scrape.
pub struct Metrics {
    registry: Mutex<Registry>,
    tasks: Family<TaskState, Counter>,
    runtime: HistogramFamily,
    queue_wait: HistogramFamily,
    in_flight: Gauge,
    prefetched: Gauge,
    pool: Arc<OnceLock<Arc<Pool>>>,
    series: std::sync::RwLock<std::collections::HashMap<String, Arc<TaskSeries>>>,
    /// Other parts of this process whose metrics each scrape adds (see [`Metrics::also_encode`]).
    extra: Mutex<Vec<ExtraMetrics>>,
}

/// Appends metric families (OpenMetrics text, without `# EOF`) to a scrape.
type ExtraMetrics = Box<dyn Fn(&mut String) + Send + Sync>;

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("celeriac");
        let tasks = Family::<TaskState, Counter>::default();
        registry.register("tasks", "Tasks that reached a final state, by task name and state", tasks.clone());
        let runtime = HistogramFamily::new_with_constructor(histogram);
        registry.register("task_runtime_seconds", "How long tasks ran, by task name", runtime.clone());
        let queue_wait = HistogramFamily::new_with_constructor(histogram);
        registry.register(
            "task_queue_wait_seconds",
            "From when a task was due at this worker (delivered, or its ETA if later) to its start",
            queue_wait.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("tasks_in_flight", "Tasks running now", in_flight.clone());
        let prefetched = Gauge::default();
        registry.register("tasks_prefetched", "Deliveries held by this worker, not yet started", prefetched.clone());
        let pool = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(ProcessCounters { pool: pool.clone() }));
        Metrics {
            registry: Mutex::new(registry),
            tasks,
            runtime,
            queue_wait,
            in_flight,
            prefetched,
            pool,
            series: Default::default(),
            extra: Default::default(),
        }
    }

    /// Report the prefork pool's counters too (recycles, hard-limit kills, lost children).
    pub fn attach_pool(&self, pool: Arc<Pool>) {
        let _ = self.pool.set(pool);
    }

    /// The series of `task`, created (every state at zero) the first time it is seen.
    fn series(&self, task: &str) -> Arc<TaskSeries> {
        if let Some(s) = self.series.read().unwrap_or_else(|e| e.into_inner()).get(task) {
            return s.clone();
        }
        let name = TaskName { task: task.to_string() };
        let s = Arc::new(TaskSeries {
            states: STATES.map(|state| {
                self.tasks.get_or_create(&TaskState { task: task.to_string(), state: state.to_string() }).clone()
            }),
            runtime: self.runtime.get_or_create(&name).clone(),
            wait: self.queue_wait.get_or_create(&name).clone(),
        });
        self.series.write().unwrap_or_else(|e| e.into_inner()).entry(task.to_string()).or_insert(s).clone()
    }

    /// One more task of `task` reached `state`, one of [`STATES`].
    pub fn task_done(&self, task: &str, state: &str) {
        match STATES.iter().position(|s| *s == state) {
            Some(i) => {
                self.series(task).states[i].inc();
            }
            None => {
                self.tasks.get_or_create(&TaskState { task: task.to_string(), state: state.to_string() }).inc();
            }
        }
    }

    /// A task ran for `runtime`.
    pub fn observe_runtime(&self, task: &str, runtime: Duration) {
        self.series(task).runtime.observe(runtime.as_secs_f64());
    }

    /// A task waited `wait` at this worker before starting.
    pub fn observe_queue_wait(&self, task: &str, wait: Duration) {
        self.series(task).wait.observe(wait.as_secs_f64());
    }

    /// A delivery is now held by the worker; the guard counts it until started or dropped.
    pub fn reserve(&self) -> Reserved {
        self.prefetched.inc();
        Reserved { gauge: Some(self.prefetched.clone()), at: Instant::now() }
    }

    /// A task starts running; the guard counts it until dropped.
    pub fn start(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Tasks running now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// Serve another part of this process's metrics with the worker's: `encode` appends its
    /// families (OpenMetrics text without `# EOF`, e.g. `celeriac_beat::metrics::BeatMetrics::encode_into`)
    /// to each scrape. Used by `worker -B`.
    pub fn also_encode(&self, encode: impl Fn(&mut String) + Send + Sync + 'static) {
        self.extra.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(encode));
    }

    /// The metrics in Prometheus' text format (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut out, &registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        for extra in self.extra.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            extra(&mut out);
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    /// Serve `GET /metrics` (any path answers the same) on `addr`. Binds before returning, so a
    /// bad or busy address is an error at start-up; the server then runs until the returned
    /// handle is aborted.
    pub async fn serve(self: &Arc<Self>, addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
        let metrics = self.clone();
        serve_text(addr, move || metrics.encode()).await
    }
}

/// Serve what `encode` gives (Prometheus' text format) on `addr` at any path: the endpoint of
/// [`Metrics::serve`], and of other processes' metrics (beat). Binds before returning.
pub async fn serve_text(
    addr: SocketAddr,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let app = axum::Router::new().fallback(move || {
        let encode = encode.clone();
        async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                encode(),
            )
        }
    });
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    }))
}

/// A delivery held by the worker, counted in `tasks_prefetched` until started or dropped.
#[derive(Debug)]
pub struct Reserved {
    gauge: Option<Gauge>,
    at: Instant,
}

impl Reserved {
    /// Not counted anywhere (metrics off).
    pub fn untracked() -> Self {
        Reserved { gauge: None, at: Instant::now() }
    }

    /// When the delivery reached the worker.
    pub fn since(&self) -> Instant {
        self.at
    }

    /// The task starts: no longer prefetched.
    pub fn release(&mut self) {
        if let Some(g) = self.gauge.take() {
            g.dec();
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.release();
    }
}

/// A running task, counted in `tasks_in_flight` until dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counters kept elsewhere, read at each scrape: the pool's and the process-wide transport ones.
struct ProcessCounters {
    pool: Arc<OnceLock<Arc<Pool>>>,
}

impl fmt::Debug for ProcessCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessCounters").finish_non_exhaustive()
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for ProcessCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let (mut by_tasks, mut by_memory, mut kills, mut lost) = (0, 0, 0, 0);
        if let Some(pool) = self.pool.get() {
            let s = pool.stats();
            by_tasks = s.recycled_max_tasks.load(Ordering::Relaxed);
            by_memory = s.recycled_memory.load(Ordering::Relaxed);
            kills = s.hard_limit_kills.load(Ordering::Relaxed);
            lost = s.worker_lost.load(Ordering::Relaxed);
        }
        {
            let c = ConstCounter::new(0u64);
            let mut m = encoder.encode_descriptor(
                "pool_child_recycles",
                "Prefork children replaced, by reason",
                None,
                c.metric_type(),
            )?;
            for (reason, v) in [("max_tasks", by_tasks), ("max_memory", by_memory)] {
                ConstCounter::new(v).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        counter(&mut encoder, "pool_hard_limit_kills", "Prefork children killed at a hard time limit", kills)?;
        counter(&mut encoder, "pool_worker_lost", "Prefork children that died mid-task", lost)?;
        let t = celeriac_core::telemetry::snapshot();
        counter(
            &mut encoder,
            "broker_reconnects",
            "Times a lost broker connection was established again",
            t.broker_reconnects,
        )?;
        counter(&mut encoder, "publish_retries", "Publishes retried under the retry policy", t.publish_retries)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_histograms_and_gauges() {
        let m = Metrics::new();
        m.task_done("celeriac.add", "SUCCESS");
        m.task_done("celeriac.add", "SUCCESS");
        m.observe_runtime("celeriac.add", Duration::from_millis(3));
        let mut r = m.reserve();
        let _running = m.start();
        let text = m.encode();
        assert!(text.contains("celeriac_tasks_total{task=\"celeriac.add\",state=\"SUCCESS\"} 2"), "{text}");
        assert!(text.contains("celeriac_tasks_total{task=\"celeriac.add\",state=\"FAILURE\"} 0"), "{text}");
        assert!(text.contains("celeriac_task_runtime_seconds_count{task=\"celeriac.add\"} 1"), "{text}");
        assert!(text.contains("celeriac_tasks_in_flight 1"), "{text}");
        assert!(text.contains("celeriac_tasks_prefetched 1"), "{text}");
        assert!(text.contains("celeriac_pool_child_recycles_total{reason=\"max_memory\"} 0"), "{text}");
        assert!(text.contains("celeriac_broker_reconnects_total"), "{text}");
        r.release();
        drop(r);
        assert!(m.encode().contains("celeriac_tasks_prefetched 0"));
    }
}
