//! Celery's events: what Flower, `celery events` and `celeriac events` watch.
//!
//! Each event is one transient message (`delivery_mode` 1) on the exchange `celeryev`, declared as
//! Celery declares it (topic, durable, not auto-delete; a fanout on kombu's Redis transport, as
//! Celery's `get_exchange` makes it there), routed by its type with `-` turned into `.`
//! (`task-succeeded` → `task.succeeded`), with the header `hostname`. The body is a JSON object in
//! the order Celery's `EventDispatcher.publish` builds it: `hostname`, `utcoffset` (hours west of
//! UTC, Python's `time.timezone / 3600`), `pid`, `clock` (a Lamport clock, one step per event),
//! the type's own fields, then `timestamp` (seconds since the epoch) and `type`.
//!
//! As in Celery, worker events (`worker-online`, `worker-heartbeat` every 2 s with `freq`,
//! `active`, `processed`, `loadavg`, `sw_ident`, `sw_ver`, `sw_sys`, and `worker-offline`) are sent
//! whenever the transport has exchanges, unless `--without-heartbeat`; task events
//! (`task-received`, `-started`, `-succeeded`, `-failed`, `-retried`, `-revoked`, `-rejected`) only
//! with `-E/--events`. Flower counts a worker online while heartbeats keep arriving.
//!
//! Sending never blocks a task and builds no `serde_json::Value`: a task event ([`TaskEvent`],
//! typed, borrowing what it says from the request) is written as Python's JSON straight onto the
//! end of one buffer of events waiting to be published, under a lock held only while writing it.
//! One publishing task takes the whole buffer at a time (swapping in the one it used before, so
//! the steady state allocates nothing per event) and sends it as lists of at most [`MAX_BATCH`]
//! events on `task.multi` (as Celery's worker buffers them; every receiver accepts lists), one
//! event alone on its own routing key. The longer a publish takes, the more events wait and the
//! bigger the next lists: the publisher keeps up with any task rate its broker's round trip
//! allows for [`MAX_BATCH`] events. Worker events go through a small channel of their own, so a
//! flood of task events never holds up a heartbeat. Past [`QUEUE_BYTES`] of events waiting (the broker
//! away or too slow), new task events are dropped, counted and logged (at each power of two),
//! as a monitor cannot use stale events anyway; so are the events of a publish that failed.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use celeriac_core::{Binding, Broker, ExchangeKind, ExchangeSpec, Message, Properties};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Notify};

/// The events exchange.
pub const EXCHANGE: &str = "celeryev";
/// Seconds between heartbeats (Celery's default `freq`).
pub const HEARTBEAT_FREQ: f64 = 2.0;
/// What `sw_ident` says.
pub const SW_IDENT: &str = "celeriac";
/// Task events waiting to be published (their JSON, in bytes) before new ones are dropped: 16 MiB,
/// 50,000 to 100,000 events, a second or two of a worker running 15,000-20,000 tasks/s, so that a
/// broker that stalls for a moment (RabbitMQ at full CPU) costs no event. (It was 10,000 events,
/// a fifth of a second at that rate.)
pub const QUEUE_BYTES: usize = 16 << 20;
/// A buffer of waiting events that grew past this while the broker stalled is given back once
/// it has been sent, so that a worker's memory returns to what it was.
const KEEP_BYTES: usize = 1 << 20;
/// Most task events sent in one `task.multi` message.
pub const MAX_BATCH: usize = 1_000;
/// Worker events (online, heartbeat) waiting to be published before new ones are dropped.
const WORKER_QUEUE: usize = 16;

/// `celeryev` as Celery declares it: a durable topic exchange, or a fanout where the transport
/// asks for it (kombu's Redis transport, see [`celeriac_core::Exchanges::events_as_fanout`]).
pub fn exchange(fanout: bool) -> ExchangeSpec {
    ExchangeSpec {
        name: EXCHANGE.to_string(),
        kind: if fanout { ExchangeKind::Fanout } else { ExchangeKind::Topic },
        durable: true,
        auto_delete: false,
    }
}

/// A monitor's queue on `celeryev`, as Celery's `EventReceiver` binds one: named
/// `celeryev.<uuid>`, auto-deleted, events older than 5 s dropped, the queue gone after 60 s
/// unused.
pub fn monitor_binding(routing_key: &str) -> Binding {
    Binding {
        queue: format!("{EXCHANGE}.{}", uuid::Uuid::new_v4()),
        routing_key: routing_key.to_string(),
        durable: false,
        auto_delete: true,
        exclusive: true,
        message_ttl: Some(Duration::from_secs(5)),
        expires: Some(Duration::from_secs(60)),
    }
}

/// The routing key of an event type: `task-succeeded` → `task.succeeded`.
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// Python's `utcoffset()`: hours *west* of UTC, as a float.
pub fn utcoffset() -> f64 {
    let east = chrono::Local::now().offset().local_minus_utc();
    f64::from(-east) / 3600.0
}

/// Seconds since the epoch, as Python's `time.time()`.
pub fn now_timestamp() -> f64 {
    let now = chrono::Utc::now();
    now.timestamp() as f64 + f64::from(now.timestamp_subsec_micros()) / 1e6
}

/// The body of an event, in Celery's key order (see the module documentation).
pub fn event_body(kind: &str, hostname: &str, pid: u32, clock: u64, fields: Map<String, Value>) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("hostname".into(), Value::from(hostname));
    body.insert("utcoffset".into(), json!(utcoffset()));
    body.insert("pid".into(), Value::from(pid));
    body.insert("clock".into(), Value::from(clock));
    body.extend(fields);
    body.insert("timestamp".into(), json!(now_timestamp()));
    body.insert("type".into(), Value::from(kind));
    body
}

/// An event (or a list of them) as a message: JSON body, header `hostname`, transient.
pub fn event_message(hostname: &str, body: &Value) -> Message {
    let mut headers = Map::new();
    headers.insert("hostname".into(), Value::from(hostname));
    let bytes =
        celeriac_core::protocol::to_python_json(body).unwrap_or_else(|_| serde_json::to_vec(body).unwrap_or_default());
    Message {
        headers,
        properties: Properties { delivery_mode: 1, priority: Some(0), ..Properties::default() },
        body: bytes,
    }
}

/// `repr()` of an exception as Celery puts it in `task-failed`: `ValueError('bad value')`.
pub fn exception_repr(exc: &celeriac_core::ExceptionInfo) -> String {
    let args = match &exc.exc_message {
        Value::Array(items) => items.iter().map(celeriac_core::pyrepr::repr).collect::<Vec<_>>().join(", "),
        Value::Null => String::new(),
        other => celeriac_core::pyrepr::repr(other),
    };
    format!("{}({args})", exc.exc_type)
}

/// The system load averages, rounded up to two decimals as Celery's `load_average()`.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, v) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = v.parse::<f64>().map(|l| (l * 100.0).ceil() / 100.0).unwrap_or(0.0);
    }
    out
}

/// A task event: its type and its own fields, which follow `uuid` in the body in the order
/// Celery's worker sends them (`celery/worker/request.py`, `celery/app/trace.py`). Borrowed from
/// the request and the outcome, and written as JSON where it is queued ([`Dispatcher::task`]).
#[derive(Debug, Clone)]
pub enum TaskEvent<'a> {
    /// `task-received`: the request as the worker took it.
    Received(Received<'a>),
    /// `task-started` (no fields of its own).
    Started,
    /// `task-succeeded`: the result's repr and the run time in seconds.
    Succeeded {
        /// `result`: the return value's `repr()`.
        result: &'a str,
        /// `runtime`, seconds.
        runtime: f64,
    },
    /// `task-failed`.
    Failed {
        /// `exception`: the exception's `repr()` ([`exception_repr`]).
        exception: &'a str,
        /// `traceback` (`null` when there is none).
        traceback: Option<&'a str>,
        /// `runtime`, a key of celeriac's (Celery's `task-failed` has none), left out when the
        /// task never ran (unknown task, poison message): the dashboard's run-time percentiles.
        runtime: Option<f64>,
    },
    /// `task-retried`.
    Retried {
        /// `exception`: the exception's `repr()`.
        exception: &'a str,
        /// `traceback` (`null` when there is none).
        traceback: Option<&'a str>,
    },
    /// `task-revoked`.
    Revoked {
        /// `terminated`: it was running and was killed.
        terminated: bool,
        /// `signum`: the signal it was killed with (`null` when not terminated).
        signum: Option<i32>,
        /// `expired`: revoked because its `expires` passed.
        expired: bool,
    },
    /// `task-rejected`: `requeue`, whether the message went back to its queue.
    Rejected {
        /// `requeue`.
        requeue: bool,
    },
}

/// The fields of `task-received`, in Celery's order, then celeriac's own keys.
#[derive(Debug, Clone)]
pub struct Received<'a> {
    /// `name`: the task's name.
    pub name: &'a str,
    /// `args`: the `argsrepr` header, or the arguments' repr.
    pub args: Cow<'a, str>,
    /// `kwargs`: the `kwargsrepr` header, or the keyword arguments' repr.
    pub kwargs: Cow<'a, str>,
    /// `root_id` (`null` when absent).
    pub root_id: Option<&'a str>,
    /// `parent_id` (`null` when absent).
    pub parent_id: Option<&'a str>,
    /// `retries`.
    pub retries: u32,
    /// `eta`, ISO 8601 (`null` when absent).
    pub eta: Option<String>,
    /// `expires`, ISO 8601 (`null` when absent).
    pub expires: Option<String>,
    /// `queue` and `routing_key`, keys of celeriac's (Celery's worker sends neither; Flower shows
    /// `routing_key` when present): the queue the message came from, which is also its routing
    /// key as `inspect`'s `delivery_info` reports it. The dashboard counts each queue's rate out
    /// with them.
    pub queue: &'a str,
    /// Extra keys naming the task's workflow (`group`, `chord`, `chain`, `link`, ...; empty for
    /// a task in none), written after the rest in this order.
    pub workflow: Vec<(&'static str, Value)>,
}

impl TaskEvent<'_> {
    /// The event's type and its routing key ([`routing_key`] of the type, not built each time).
    fn names(&self) -> (&'static str, &'static str) {
        match self {
            TaskEvent::Received(_) => ("task-received", "task.received"),
            TaskEvent::Started => ("task-started", "task.started"),
            TaskEvent::Succeeded { .. } => ("task-succeeded", "task.succeeded"),
            TaskEvent::Failed { .. } => ("task-failed", "task.failed"),
            TaskEvent::Retried { .. } => ("task-retried", "task.retried"),
            TaskEvent::Revoked { .. } => ("task-revoked", "task.revoked"),
            TaskEvent::Rejected { .. } => ("task-rejected", "task.rejected"),
        }
    }

    /// The event's type: `task-received`, `task-started`, ...
    pub fn kind(&self) -> &'static str {
        self.names().0
    }

    /// Its routing key: `task.received`, `task.started`, ...
    pub fn routing_key(&self) -> &'static str {
        self.names().1
    }

    /// Serialize the event's own fields into an open map.
    fn fields<M: SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        match self {
            TaskEvent::Received(r) => {
                m.serialize_entry("name", r.name)?;
                m.serialize_entry("args", &*r.args)?;
                m.serialize_entry("kwargs", &*r.kwargs)?;
                m.serialize_entry("root_id", &r.root_id)?;
                m.serialize_entry("parent_id", &r.parent_id)?;
                m.serialize_entry("retries", &r.retries)?;
                m.serialize_entry("eta", &r.eta)?;
                m.serialize_entry("expires", &r.expires)?;
                m.serialize_entry("queue", r.queue)?;
                m.serialize_entry("routing_key", r.queue)?;
                for (key, value) in &r.workflow {
                    m.serialize_entry(key, value)?;
                }
            }
            TaskEvent::Started => {}
            TaskEvent::Succeeded { result, runtime } => {
                m.serialize_entry("result", result)?;
                m.serialize_entry("runtime", runtime)?;
            }
            TaskEvent::Failed { exception, traceback, runtime } => {
                m.serialize_entry("exception", exception)?;
                m.serialize_entry("traceback", traceback)?;
                if let Some(r) = runtime {
                    m.serialize_entry("runtime", r)?;
                }
            }
            TaskEvent::Retried { exception, traceback } => {
                m.serialize_entry("exception", exception)?;
                m.serialize_entry("traceback", traceback)?;
            }
            TaskEvent::Revoked { terminated, signum, expired } => {
                m.serialize_entry("terminated", terminated)?;
                m.serialize_entry("signum", signum)?;
                m.serialize_entry("expired", expired)?;
            }
            TaskEvent::Rejected { requeue } => m.serialize_entry("requeue", requeue)?,
        }
        Ok(())
    }
}

/// A task event's whole body, in the order of [`event_body`] with `uuid` first of the type's
/// fields (Celery's `Request.send_event`), serialized without building a map.
struct TaskEventBody<'e, 'a> {
    hostname: &'e str,
    utcoffset: f64,
    pid: u32,
    clock: u64,
    uuid: &'e str,
    event: &'e TaskEvent<'a>,
    timestamp: f64,
}

impl Serialize for TaskEventBody<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut m = serializer.serialize_map(None)?;
        m.serialize_entry("hostname", self.hostname)?;
        m.serialize_entry("utcoffset", &self.utcoffset)?;
        m.serialize_entry("pid", &self.pid)?;
        m.serialize_entry("clock", &self.clock)?;
        m.serialize_entry("uuid", self.uuid)?;
        self.event.fields(&mut m)?;
        m.serialize_entry("timestamp", &self.timestamp)?;
        m.serialize_entry("type", self.event.kind())?;
        m.end()
    }
}

/// What the worker sends: task events on or off, worker events on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsConfig {
    /// Send task events (`-E/--events`).
    pub task_events: bool,
    /// Send worker-online, -heartbeat and -offline (off with `--without-heartbeat`).
    pub worker_events: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { task_events: false, worker_events: true }
    }
}

/// Task events written and not yet taken by the publisher: their JSON texts back to back, and
/// where each ends with its routing key.
#[derive(Default)]
struct Pending {
    text: Vec<u8>,
    events: Vec<(usize, &'static str)>,
    /// The publisher holds a batch it took and has not finished sending.
    publishing: bool,
}

impl Pending {
    /// Write an event's body after those waiting.
    fn push(&mut self, body: &TaskEventBody<'_, '_>) -> Result<(), serde_json::Error> {
        let start = self.text.len();
        if let Err(e) = celeriac_core::pyjson::write_to(&mut self.text, body) {
            self.text.truncate(start);
            return Err(e);
        }
        self.events.push((self.text.len(), body.event.routing_key()));
        Ok(())
    }

    /// Write into `body` the message of the waiting events `first..` (at most [`MAX_BATCH`] of
    /// them): a list of them, or the event itself when it is the only one. Returns its routing
    /// key (`task.multi` for a list), how many events it holds, and where the next message starts.
    fn message(&self, first: usize, body: &mut Vec<u8>) -> (&'static str, usize, usize) {
        let chunk = &self.events[first..self.events.len().min(first + MAX_BATCH)];
        let mut start = first.checked_sub(1).map_or(0, |i| self.events[i].0);
        body.clear();
        if let [(end, key)] = chunk {
            body.extend_from_slice(&self.text[start..*end]);
            return (key, 1, first + 1);
        }
        body.push(b'[');
        for (i, (end, _)) in chunk.iter().enumerate() {
            if i > 0 {
                body.extend_from_slice(b", ");
            }
            body.extend_from_slice(&self.text[start..*end]);
            start = *end;
        }
        body.push(b']');
        ("task.multi", chunk.len(), first + chunk.len())
    }

    /// Empty it, giving back what a backlog made it grow to.
    fn clear(&mut self) {
        self.text.clear();
        self.events.clear();
        if self.text.capacity() > KEEP_BYTES {
            self.text.shrink_to(KEEP_BYTES);
            self.events.shrink_to(KEEP_BYTES / 256);
        }
    }
}

/// What the dispatcher and its publishing task share.
struct Queue {
    pending: Mutex<Pending>,
    /// Task events are waiting (one permit is kept when the publisher is busy).
    wake: Notify,
    /// The publisher finished a batch.
    idle: Notify,
    /// Task events dropped, the queue full or their publish failed.
    dropped: AtomicU64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; were it poisoned, its contents are still whole
        // events (a write that fails is cut off).
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Count `n` task events lost, and say so at each power of two.
    fn drop_events(&self, n: u64, why: &str) {
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        if crosses_power_of_two(before, after) {
            tracing::warn!(dropped = after, reason = why, "events dropped");
        }
    }
}

/// Whether a count going from `before` to `after` reaches a power of two (1, 2, 4, ...) it had
/// not reached: when a running count of drops is worth a line.
fn crosses_power_of_two(before: u64, after: u64) -> bool {
    after > before && (before == 0 || after.ilog2() > before.ilog2())
}

/// Sends a worker's events (see the module documentation). Cheap to call from any task.
pub struct Dispatcher {
    hostname: String,
    pid: u32,
    clock: AtomicU64,
    task_events: AtomicBool,
    queue: Arc<Queue>,
    worker_tx: mpsc::Sender<(String, Map<String, Value>)>,
    broker: Arc<dyn Broker>,
    spec: ExchangeSpec,
}

impl Dispatcher {
    /// A dispatcher publishing through `broker`'s exchanges, and the task that publishes (abort it
    /// after [`Dispatcher::stop`]). `None` when the transport has no exchanges (SQLite): there
    /// is nowhere to send events.
    pub fn start(
        broker: Arc<dyn Broker>,
        hostname: &str,
        config: EventsConfig,
    ) -> Option<(Arc<Dispatcher>, tokio::task::JoinHandle<()>)> {
        let fanout = broker.exchanges()?.events_as_fanout();
        let (worker_tx, worker_rx) = mpsc::channel(WORKER_QUEUE);
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            dropped: AtomicU64::new(0),
        });
        let dispatcher = Arc::new(Dispatcher {
            hostname: hostname.to_string(),
            pid: std::process::id(),
            clock: AtomicU64::new(0),
            task_events: AtomicBool::new(config.task_events),
            queue: queue.clone(),
            worker_tx,
            broker: broker.clone(),
            spec: exchange(fanout),
        });
        let publisher = Publisher { broker, spec: exchange(fanout), queue, failing: false, lost: 0 };
        let handle = tokio::spawn(publisher.run(hostname.to_string(), worker_rx));
        Some((dispatcher, handle))
    }

    /// Wait (up to 2 s) for queued events to go out, then publish `kind` (`worker-offline`) at
    /// once: the last event of this worker.
    pub async fn stop(&self, kind: &str, fields: Map<String, Value>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let idle = self.queue.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let waiting = {
                let p = self.queue.lock();
                !p.events.is_empty() || p.publishing
            };
            if !waiting && self.worker_tx.capacity() == self.worker_tx.max_capacity() {
                break;
            }
            // Worker events are not followed by an idle signal: look again shortly.
            let again = tokio::time::Instant::now() + Duration::from_millis(10);
            if tokio::time::timeout_at(deadline.min(again), idle).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                break;
            }
        }
        let dropped = self.queue.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "events dropped in all while this worker ran");
        }
        let Some(exchanges) = self.broker.exchanges() else { return };
        let body = self.body(kind, fields);
        let message = event_message(&self.hostname, &Value::Object(body));
        let key = routing_key(kind);
        let sent = exchanges.publish_to(&self.spec, &key, &message);
        match tokio::time::timeout(Duration::from_secs(2), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, event = kind, "cannot publish the event"),
            Err(_) => tracing::warn!(event = kind, "publishing the event timed out"),
        }
    }

    /// Whether task events are sent.
    pub fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// Turn task events on or off while running (Celery's `enable_events` / `disable_events`
    /// control commands).
    pub fn set_task_events(&self, on: bool) {
        self.task_events.store(on, Ordering::Relaxed);
    }

    /// The node name events are sent as.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Task events dropped so far (the queue full, or their publish failed).
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// The body of an event of this worker (advances the clock).
    pub fn body(&self, kind: &str, fields: Map<String, Value>) -> Map<String, Value> {
        let clock = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        event_body(kind, &self.hostname, self.pid, clock, fields)
    }

    /// Queue a worker event (`worker-online`, `worker-heartbeat`); never waits. Dropped (and
    /// logged) if its queue is full.
    pub fn send(&self, kind: &str, fields: Map<String, Value>) {
        let body = self.body(kind, fields);
        if let Err(e) = self.worker_tx.try_send((kind.to_string(), body)) {
            let (kind, _) = e.into_inner();
            tracing::warn!(event = %kind, "worker event queue full or closed: event dropped");
        }
    }

    /// Queue a task event for the task `uuid` if task events are on; never waits. Written as
    /// JSON at once onto the end of the waiting events; dropped (and counted) when
    /// [`QUEUE_BYTES`] of events wait already.
    pub fn task(&self, uuid: &str, event: TaskEvent<'_>) {
        if !self.task_events() {
            return;
        }
        let (utcoffset, timestamp) = (utcoffset(), now_timestamp());
        let mut p = self.queue.lock();
        if p.text.len() >= QUEUE_BYTES {
            drop(p);
            self.queue.drop_events(1, "the event queue is full");
            return;
        }
        // Under the lock, so that the events wait in the order of their clocks.
        let clock = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let body =
            TaskEventBody { hostname: &self.hostname, utcoffset, pid: self.pid, clock, uuid, event: &event, timestamp };
        if let Err(e) = p.push(&body) {
            // Strings, numbers and JSON values always serialize; never seen.
            drop(p);
            tracing::error!(task_id = %uuid, error = %e, event = event.kind(), "cannot write the event");
            self.queue.drop_events(1, "the event could not be written");
            return;
        }
        let first = p.events.len() == 1;
        drop(p);
        if first {
            self.queue.wake.notify_one();
        }
    }

    /// The fields of a worker event: `freq`, `active`, `processed`, `loadavg`, software info.
    pub fn worker_fields(active: u64, processed: u64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("freq".into(), json!(HEARTBEAT_FREQ));
        m.insert("active".into(), Value::from(active));
        m.insert("processed".into(), Value::from(processed));
        m.insert("loadavg".into(), json!(load_average()));
        m.insert("sw_ident".into(), Value::from(SW_IDENT));
        m.insert("sw_ver".into(), Value::from(env!("CARGO_PKG_VERSION")));
        m.insert("sw_sys".into(), Value::from(sw_sys()));
        m
    }
}

/// Python's `platform.system()` for this OS (`Linux`, `Darwin`, ...).
fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        "freebsd" => "FreeBSD",
        other => other,
    }
}

/// The task that publishes a worker's events (see the module documentation).
struct Publisher {
    broker: Arc<dyn Broker>,
    spec: ExchangeSpec,
    queue: Arc<Queue>,
    /// The last publish failed (said once per outage).
    failing: bool,
    /// Task events lost in failed publishes during this outage.
    lost: u64,
}

impl Publisher {
    /// Publish until the dispatcher is dropped (or this task aborted): worker events one by one
    /// as they come, task events a whole waiting buffer at a time. Nothing waits to fill a
    /// batch, so an idle worker's events leave at once.
    async fn run(mut self, hostname: String, mut worker_rx: mpsc::Receiver<(String, Map<String, Value>)>) {
        // One message, its body reused from batch to batch; the buffer the dispatcher writes
        // into is swapped with `taken` each time, so both keep their capacity.
        let mut message = event_message(&hostname, &Value::Null);
        let mut taken = Pending::default();
        loop {
            tokio::select! {
                biased;
                worker = worker_rx.recv() => {
                    let Some((kind, body)) = worker else { return };
                    let single = event_message(&hostname, &Value::Object(body));
                    // A lost worker event is said with the outage; the next heartbeat follows.
                    self.publish(&routing_key(&kind), &single, 0).await;
                }
                () = self.queue.wake.notified() => {
                    {
                        let mut p = self.queue.lock();
                        std::mem::swap(&mut p.text, &mut taken.text);
                        std::mem::swap(&mut p.events, &mut taken.events);
                        p.publishing = true;
                    }
                    let mut next = 0;
                    while next < taken.events.len() {
                        let (key, events, after) = taken.message(next, &mut message.body);
                        if !self.publish(key, &message, events as u64).await {
                            // Not one more wait on a broker that did not answer: the rest of
                            // what was taken is dropped too, and the next events try again.
                            let rest = (taken.events.len() - after) as u64;
                            self.lost += rest;
                            self.queue.drop_events(rest, "their publish failed");
                            break;
                        }
                        next = after;
                    }
                    taken.clear();
                    self.queue.lock().publishing = false;
                    self.queue.idle.notify_waiters();
                }
            }
        }
    }

    /// Publish one message holding `events` task events; a failure is said once per outage
    /// and its task events counted as dropped. Whether it was published.
    async fn publish(&mut self, key: &str, message: &Message, events: u64) -> bool {
        let Some(exchanges) = self.broker.exchanges() else { return false };
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), exchanges.publish_to(&self.spec, key, message)).await;
        let error = match outcome {
            Ok(Ok(())) => {
                if self.failing {
                    tracing::info!(lost = self.lost, "events are published again");
                    (self.failing, self.lost) = (false, 0);
                }
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out after 5 s".to_string(),
        };
        if !self.failing {
            tracing::warn!(%error, events = %key, "cannot publish events; dropping them until the broker answers");
            self.failing = true;
        }
        self.lost += events;
        self.queue.drop_events(events, "their publish failed");
        false
    }
}

/// Watch `celeryev` for a few heartbeats and warn if another worker with this node name is
/// online (Celery warns the same way, from the replies to its start-up broadcast).
pub async fn warn_if_name_taken(broker: Arc<dyn Broker>, hostname: String, pid: u32) {
    let Some(exchanges) = broker.exchanges() else { return };
    let spec = exchange(exchanges.events_as_fanout());
    let mut sub = match exchanges.subscribe(&spec, &monitor_binding("worker.#")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "cannot watch for workers with the same name");
            return;
        }
    };
    let deadline = tokio::time::sleep(Duration::from_secs_f64(HEARTBEAT_FREQ * 1.5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            m = sub.next() => match m {
                Ok(m) => {
                    for ev in bodies(&m.body) {
                        let same_name = ev.get("hostname").and_then(Value::as_str) == Some(hostname.as_str());
                        let other = ev.get("pid").and_then(Value::as_u64) != Some(u64::from(pid));
                        let alive = ev.get("type").and_then(Value::as_str) != Some("worker-offline");
                        if same_name && other && alive {
                            tracing::warn!(
                                %hostname,
                                other_pid = ?ev.get("pid"),
                                "a worker named {hostname} is already online: give each worker a unique name with -n/--hostname"
                            );
                            sub.close().await;
                            return;
                        }
                    }
                }
                Err(_) => break,
            },
        }
    }
    sub.close().await;
}

/// The events in a message body: one object, or a list of them (Celery's buffered `task.multi`).
pub fn bodies(body: &[u8]) -> Vec<Map<String, Value>> {
    match celeriac_core::pyjson::from_slice(body) {
        Ok(Value::Object(m)) => vec![m],
        Ok(Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_celerys_key_order() {
        let mut fields = Map::new();
        fields.insert("uuid".into(), json!("abc"));
        fields.insert("result".into(), json!("5"));
        let body = event_body("task-succeeded", "w@h", 7, 3, fields);
        let keys: Vec<&str> = body.keys().map(String::as_str).collect();
        assert_eq!(keys, ["hostname", "utcoffset", "pid", "clock", "uuid", "result", "timestamp", "type"]);
        assert_eq!(body["type"], "task-succeeded");
        assert!(body["timestamp"].as_f64().unwrap() > 1.7e9);
        let m = event_message("w@h", &Value::Object(body.clone()));
        assert_eq!(m.headers["hostname"], "w@h");
        assert_eq!(m.properties.delivery_mode, 1);
        assert_eq!(routing_key("task-succeeded"), "task.succeeded");
        assert_eq!(routing_key("worker-heartbeat"), "worker.heartbeat");
    }

    /// A task event as the worker wrote it before the typed writer: a map of `Value`s in the
    /// same order (`uuid` first of its fields), written by `to_python_json`.
    fn as_before(uuid: &str, event: &TaskEvent<'_>, utcoffset: f64, timestamp: f64) -> Vec<u8> {
        let opt = |v: Option<&str>| v.map(Value::from).unwrap_or(Value::Null);
        let mut m = Map::new();
        m.insert("hostname".into(), Value::from("w@h\u{e9}"));
        m.insert("utcoffset".into(), json!(utcoffset));
        m.insert("pid".into(), Value::from(4242u32));
        m.insert("clock".into(), Value::from(77u64));
        m.insert("uuid".into(), Value::from(uuid));
        match event {
            TaskEvent::Received(r) => {
                m.insert("name".into(), Value::from(r.name));
                m.insert("args".into(), Value::from(r.args.to_string()));
                m.insert("kwargs".into(), Value::from(r.kwargs.to_string()));
                m.insert("root_id".into(), opt(r.root_id));
                m.insert("parent_id".into(), opt(r.parent_id));
                m.insert("retries".into(), Value::from(r.retries));
                m.insert("eta".into(), opt(r.eta.as_deref()));
                m.insert("expires".into(), opt(r.expires.as_deref()));
                m.insert("queue".into(), Value::from(r.queue));
                m.insert("routing_key".into(), Value::from(r.queue));
                for (k, v) in &r.workflow {
                    m.insert((*k).into(), v.clone());
                }
            }
            TaskEvent::Started => {}
            TaskEvent::Succeeded { result, runtime } => {
                m.insert("result".into(), Value::from(*result));
                m.insert("runtime".into(), Value::from(*runtime));
            }
            TaskEvent::Failed { exception, traceback, runtime } => {
                m.insert("exception".into(), Value::from(*exception));
                m.insert("traceback".into(), opt(*traceback));
                if let Some(r) = runtime {
                    m.insert("runtime".into(), Value::from(*r));
                }
            }
            TaskEvent::Retried { exception, traceback } => {
                m.insert("exception".into(), Value::from(*exception));
                m.insert("traceback".into(), opt(*traceback));
            }
            TaskEvent::Revoked { terminated, signum, expired } => {
                m.insert("terminated".into(), Value::from(*terminated));
                m.insert("signum".into(), signum.map(Value::from).unwrap_or(Value::Null));
                m.insert("expired".into(), Value::from(*expired));
            }
            TaskEvent::Rejected { requeue } => {
                m.insert("requeue".into(), Value::from(*requeue));
            }
        }
        m.insert("timestamp".into(), json!(timestamp));
        m.insert("type".into(), Value::from(event.kind()));
        celeriac_core::protocol::to_python_json(&Value::Object(m)).unwrap()
    }

    fn written(uuid: &str, event: &TaskEvent<'_>, utcoffset: f64, timestamp: f64) -> Vec<u8> {
        let mut p = Pending::default();
        let body = TaskEventBody { hostname: "w@h\u{e9}", utcoffset, pid: 4242, clock: 77, uuid, event, timestamp };
        p.push(&body).unwrap();
        assert_eq!(p.events, [(p.text.len(), event.routing_key())]);
        p.text
    }

    fn received<'a>(workflow: Vec<(&'static str, Value)>) -> TaskEvent<'a> {
        TaskEvent::Received(Received {
            name: "proj.t\u{e2}che",
            args: Cow::Borrowed("('a \"quoted\" \\\\ back\\nline', '\u{2603} \u{1d11e}', 1.5)"),
            kwargs: Cow::Owned("{'k': None, 'ctl': '\u{1}\u{1f}\u{7f}\u{2028}'}".into()),
            root_id: Some("root"),
            parent_id: None,
            retries: 3,
            eta: Some("2026-12-01T02:00:00.123456+00:00".into()),
            expires: None,
            queue: "q\u{e9}",
            workflow,
        })
    }

    #[test]
    fn task_events_are_written_byte_for_byte_as_the_value_maps_were() {
        let workflow = vec![
            ("group", json!("g-1")),
            ("group_index", json!(2)),
            ("chord", json!({"id": "c", "name": "body"})),
            ("chain", json!([{"id": "s2", "name": "n2"}, {"id": "s3", "name": "n\u{e9}"}])),
            ("link", json!([{"id": "l", "name": "cb"}])),
        ];
        let events = [
            received(Vec::new()),
            received(workflow),
            TaskEvent::Started,
            TaskEvent::Succeeded { result: "{'x': [1, 2.5, '\u{e9}']}", runtime: 1.2345e-5 },
            TaskEvent::Succeeded { result: "None", runtime: 3.0 },
            TaskEvent::Failed {
                exception: "ValueError('b\u{e4}d')",
                traceback: Some("Traceback\n  line\n"),
                runtime: Some(0.000123456789),
            },
            TaskEvent::Failed { exception: "E()", traceback: None, runtime: None },
            TaskEvent::Retried { exception: "Retry('in 5s')", traceback: None },
            TaskEvent::Revoked { terminated: true, signum: Some(15), expired: false },
            TaskEvent::Revoked { terminated: false, signum: None, expired: true },
            TaskEvent::Rejected { requeue: true },
        ];
        let clocks = [
            (0.0, 1_764_553_757.123_456),
            (-5.5, 1_764_553_757.0),
            (8.0, 1_764_553_757.5),
            (-0.75, 1_764_553_757.000_001),
            (0.0, 1e-7),
            (1.0, 12_345.678),
        ];
        for event in &events {
            assert_eq!(event.routing_key(), routing_key(event.kind()));
            for (utcoffset, timestamp) in clocks {
                let new = written("6f1c\u{e9}-id", event, utcoffset, timestamp);
                let old = as_before("6f1c\u{e9}-id", event, utcoffset, timestamp);
                assert_eq!(String::from_utf8_lossy(&new), String::from_utf8_lossy(&old), "{event:?}");
            }
        }
    }

    #[test]
    fn waiting_events_go_as_lists_of_at_most_max_batch_and_one_alone_as_itself() {
        let mut p = Pending::default();
        let n = 2 * MAX_BATCH + 1;
        for clock in 1..=n as u64 {
            let event = if clock % 2 == 0 { TaskEvent::Started } else { TaskEvent::Rejected { requeue: false } };
            let uuid = format!("id-{clock}");
            let body = TaskEventBody {
                hostname: "w",
                utcoffset: 0.0,
                pid: 1,
                clock,
                uuid: &uuid,
                event: &event,
                timestamp: 1.5,
            };
            p.push(&body).unwrap();
        }
        let mut body = Vec::new();
        let mut clocks = Vec::new();
        let mut next = 0;
        let mut messages = Vec::new();
        while next < p.events.len() {
            let (key, count, after) = p.message(next, &mut body);
            let value: Value = serde_json::from_slice(&body).unwrap();
            let items = match &value {
                Value::Array(items) => items.clone(),
                one => vec![one.clone()],
            };
            assert_eq!(items.len(), count);
            clocks.extend(items.iter().map(|e| e["clock"].as_u64().unwrap()));
            messages.push((key, count, value.is_array()));
            next = after;
        }
        // The last one, alone, goes on its own routing key as an object, as Celery sends one.
        assert_eq!(
            messages,
            [("task.multi", MAX_BATCH, true), ("task.multi", MAX_BATCH, true), ("task.rejected", 1, false)]
        );
        assert_eq!(clocks, (1..=n as u64).collect::<Vec<_>>());
        // Python's separators, as Celery's lists are written.
        p.message(0, &mut body);
        assert!(body.starts_with(b"[{\"hostname\": \"w\", ") && body.windows(4).any(|w| w == b"}, {"));
    }

    #[test]
    fn drops_are_said_at_each_power_of_two() {
        let said: Vec<u64> = (1..=40).filter(|&n| crosses_power_of_two(n - 1, n)).collect();
        assert_eq!(said, [1, 2, 4, 8, 16, 32]);
        // A failed publish drops many at once: said when it passes one.
        assert!(crosses_power_of_two(3, 1003) && crosses_power_of_two(1000, 1024));
        assert!(!crosses_power_of_two(1025, 2047) && !crosses_power_of_two(5, 5));
    }

    #[test]
    fn exceptions_read_as_python_reprs() {
        let exc = celeriac_core::ExceptionInfo::new("ValueError", "bad value", "builtins");
        assert_eq!(exception_repr(&exc), "ValueError('bad value')");
        let exc = celeriac_core::ExceptionInfo {
            exc_type: "E".into(),
            exc_message: json!(["a", 42]),
            exc_module: "m".into(),
        };
        assert_eq!(exception_repr(&exc), "E('a', 42)");
    }

    #[test]
    fn list_bodies_are_split() {
        assert_eq!(bodies(br#"[{"type":"a"},{"type":"b"}]"#).len(), 2);
        assert_eq!(bodies(br#"{"type":"a"}"#).len(), 1);
        assert!(bodies(b"nope").is_empty());
    }
}
