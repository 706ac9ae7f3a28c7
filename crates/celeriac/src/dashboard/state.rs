//! What the dashboard knows, kept in memory: workers (from heartbeats and events, and from the
//! `stats`/`active` replies polled every few seconds), queue depths and their history (one
//! sample per queue per poll, the last hour), the most recent tasks (bounded), per-minute counts
//! of successes and failures, and run-time histograms (per minute, and per task name) from
//! which the charts' percentiles are read.
//!
//! Events are Celery's (`celery/events/state.py` reads the same fields): worker events
//! `worker-online`, `worker-heartbeat`, `worker-offline`; task events `task-sent`,
//! `task-received`, `task-started`, `task-succeeded`, `task-failed`, `task-retried`,
//! `task-revoked`, `task-rejected`. A task's `args`/`kwargs` are the reprs the sender wrote
//! (`argsrepr`), `result` the repr of the return value: text, shown as text.
//!
//! A workflow is read from the ids events carry: `root_id`/`parent_id` (every Celery worker),
//! and the extra keys celeriac's worker adds to `task-received` (`group`, `group_index`, `chord`,
//! `chain`, `link`, `errback`: see `celeriac_worker::observe`), from which
//! [`State::task_json`] builds a task's `graph`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use celeriac_core::TaskState;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// How many tasks are kept; the oldest is forgotten first.
pub const MAX_TASKS: usize = 10_000;
/// A worker with no heartbeat for this long is shown offline (Celery's heartbeats come every 2 s).
pub const OFFLINE_AFTER_SECS: f64 = 10.0;
/// Minutes of throughput kept, and shown (every one of them, an empty minute as zeros).
pub const MINUTES: usize = 60;
/// Queue depth samples kept per queue: an hour at the poller's 2 s.
pub const DEPTH_SAMPLES: usize = 1800;
/// Task names whose run times are kept apart; later names are counted under [`OTHER_NAMES`].
pub const MAX_NAMES: usize = 200;
/// The name run times of task names past [`MAX_NAMES`] are counted under.
pub const OTHER_NAMES: &str = "(other names)";
/// A running task asleep in one system call this long (seconds of run time) is shown as hung.
pub const HUNG_AFTER_SECS: f64 = 5.0;
/// The most tasks a workflow graph holds.
pub const MAX_GRAPH_NODES: usize = 300;

/// Why an event was not applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    /// The event lacks a field every event has.
    #[error("event without a string {0:?}")]
    Missing(&'static str),
    /// A task event without a task id.
    #[error("{0} event without a uuid")]
    NoTaskId(String),
}

/// One worker, as events and remote control show it.
#[derive(Debug, Default, Clone)]
struct WorkerView {
    /// Unix seconds of the last heartbeat or online event.
    heartbeat: Option<f64>,
    /// A `worker-offline` came after the last heartbeat.
    said_offline: bool,
    /// The last heartbeat's fields (`sw_ident`, `sw_ver`, `active`, `processed`, `loadavg`, `pid`).
    heartbeat_fields: Map<String, Value>,
    /// The last `stats` reply and when (Unix seconds) it came.
    stats: Option<Value>,
    /// The last `active` reply.
    active: Option<Value>,
    /// The last `active_queues` reply.
    queues: Option<Value>,
    /// The last `reserved` and `scheduled` replies (what it holds unstarted), for the queues'
    /// unacked and scheduled counts on RabbitMQ.
    held: [Option<Value>; 2],
    /// It sent a `task-received` naming its queue (celeriac's extra key), so its rate out of
    /// each queue it consumes is known from its events.
    names_queues: bool,
    /// Unix seconds of the last reply to a poll.
    replied: Option<f64>,
}

/// One minute's outcomes.
#[derive(Debug, Clone)]
struct Minute {
    /// Minutes since the epoch.
    minute: i64,
    succeeded: u64,
    failed: u64,
    runtimes: Histogram,
}

/// Run times in buckets growing by 2^(1/4) (each about 19% wide) from 10 µs to about 28 h, so a
/// percentile is read within ±9.1% at a fixed cost (134 counters) however many tasks ran.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u32>,
    n: u64,
    min: f64,
    max: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; Self::BUCKETS], n: 0, min: f64::INFINITY, max: 0.0 }
    }
}

impl Histogram {
    const BUCKETS: usize = 134;
    const LOW: f64 = 1e-5;

    fn bucket(seconds: f64) -> usize {
        if seconds <= Self::LOW {
            return 0;
        }
        (((seconds / Self::LOW).log2() * 4.0).floor() as usize + 1).min(Self::BUCKETS - 1)
    }

    /// Record one run time, in seconds (a negative or non-finite one is ignored).
    pub fn record(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.counts[Self::bucket(seconds)] += 1;
        self.n += 1;
        self.min = self.min.min(seconds);
        self.max = self.max.max(seconds);
    }

    /// How many run times were recorded.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// The `q` quantile (0..=1) in seconds: the middle of its bucket (geometric), kept within
    /// the least and greatest run time seen; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                let mid = if i == 0 { Self::LOW } else { Self::LOW * 2f64.powf((i as f64 - 0.5) / 4.0) };
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// `{count, p50, p95, p99}`, seconds (`null` when empty).
    fn summary(&self) -> Value {
        json!({"count": self.n, "p50": self.quantile(0.5), "p95": self.quantile(0.95), "p99": self.quantile(0.99)})
    }
}

/// The longest `args`, `kwargs`, `result` and `exception` repr kept, in bytes (Celery's worker
/// cuts `argsrepr` and a result's repr at 1,024 already: `celery/app/amqp.py`,
/// `celery/app/trace.py`); longer ones are cut at a character boundary and end with `…`.
pub const MAX_REPR: usize = 4096;
/// The longest traceback kept, in bytes.
pub const MAX_TRACEBACK: usize = 16384;

/// A task's state as its events put it (Celery's `TASK_EVENT_TO_STATE`): one of the result
/// backend's states, or `REJECTED`, which only an event tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventState {
    Stored(TaskState),
    Rejected,
}

impl Default for EventState {
    fn default() -> Self {
        Self::Stored(TaskState::Pending)
    }
}

impl EventState {
    /// The state a task event's type puts the task in.
    fn of_event(kind: &str) -> Option<Self> {
        Some(Self::Stored(match kind {
            "task-sent" => TaskState::Pending,
            "task-received" => TaskState::Received,
            "task-started" => TaskState::Started,
            "task-succeeded" => TaskState::Success,
            "task-failed" => TaskState::Failure,
            "task-retried" => TaskState::Retry,
            "task-revoked" => TaskState::Revoked,
            "task-rejected" => return Some(Self::Rejected),
            _ => return None,
        }))
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Stored(s) => s.as_str(),
            Self::Rejected => "REJECTED",
        }
    }

    /// Later states win over earlier ones when events come out of order (a `task-started` after
    /// a `task-succeeded` from a batch); a retry starts the task over.
    fn rank(self) -> u8 {
        match self {
            Self::Stored(TaskState::Pending) => 0,
            Self::Stored(TaskState::Received | TaskState::Retry) => 1,
            Self::Stored(TaskState::Started) => 2,
            Self::Stored(TaskState::Success | TaskState::Failure | TaskState::Revoked) | Self::Rejected => 3,
        }
    }
}

/// One event as it came, its values still JSON text: parsed once, each value read only where it
/// is used, strings borrowed from the message unless they hold escapes.
#[derive(Debug, Default)]
pub struct RawEvent<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, RawValue>)>,
}

/// A JSON string, borrowed where it has no escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for RawEvent<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawEvent<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawEvent<'de>, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    pairs.push((key, Cow::Borrowed(value)));
                }
                Ok(RawEvent { pairs })
            }
        }
        d.deserialize_map(Visit)
    }
}

impl<'a> RawEvent<'a> {
    /// One event from a JSON object already parsed (the event's values written back as JSON;
    /// a value JSON cannot hold, Python's `NaN`, reads as `null`).
    pub fn from_map(ev: &Map<String, Value>) -> RawEvent<'static> {
        let raw = |v: &Value| {
            serde_json::value::to_raw_value(v)
                .ok()
                .filter(|r| serde_json::from_str::<&RawValue>(r.get()).is_ok())
                .unwrap_or_else(|| RawValue::from_string("null".into()).unwrap_or_default())
        };
        RawEvent { pairs: ev.iter().map(|(k, v)| (Cow::Owned(k.clone()), Cow::Owned(raw(v)))).collect() }
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        // The last of a repeated key, as a JSON object read into a map keeps.
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_ref())
    }

    /// The value of `key` if it is a string.
    fn text(&self, key: &str) -> Option<Cow<'_, str>> {
        self.get(key).and_then(text_of)
    }

    /// The value of `key` if it is a number.
    fn number(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(number_of)
    }
}

/// A string value, `None` for any other. A raw value's text starts at the value (no whitespace),
/// so only one that starts with `"` is read: trying the others built a serde_json error each
/// (`null`s, numbers, lists: most of an event's fields), about 5% of the dashboard's samples in a
/// profile beside a busy worker (docs/benchmarks.md, "An open page made cheap").
fn text_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str::<Text<'_>>(raw.get()).ok().map(|t| t.0)
}

fn number_of(raw: &RawValue) -> Option<f64> {
    let t = raw.get();
    if t.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        t.parse().ok()
    } else {
        None
    }
}

/// The events of one `celeryev` message: an object, or a list of them (Celery's `task.multi`),
/// each with its JSON text (for a log line); an error names why the body is not that, and each
/// item that is not an object is an error of its own.
pub type Events<'a> = Vec<Result<(RawEvent<'a>, &'a str), String>>;

/// Read a `celeryev` message's body into its events (see [`Events`]).
pub fn parse_body(body: &[u8]) -> Result<Events<'_>, String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {
            let one: &RawValue = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
            let ev: RawEvent<'_> = serde_json::from_str(one.get()).map_err(|e| format!("not JSON: {e}"))?;
            Ok(vec![Ok((ev, one.get()))])
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
            Ok(items
                .into_iter()
                .map(|item| {
                    let text = item.get();
                    match serde_json::from_str::<RawEvent<'_>>(text) {
                        Ok(ev) => Ok((ev, text)),
                        Err(_) => Err(format!("not a JSON object: {text}")),
                    }
                })
                .collect())
        }
        _ => Err("not a JSON object or list".into()),
    }
}

/// One task, merged from its events: what the page reads as typed fields, names and hosts
/// shared, every other field as the JSON text it came as.
#[derive(Debug, Clone)]
struct TaskView {
    id: Arc<str>,
    state: EventState,
    name: Option<Arc<str>>,
    worker: Option<Arc<str>>,
    /// Unix seconds: `sent`, `received`, `started`, `retried_at`, `finished`.
    times: [Option<f64>; 5],
    runtime: Option<f64>,
    /// `args`, `kwargs`, `result`, `exception`, `traceback`, `retry_exception`,
    /// `retry_traceback`: text, bounded ([`MAX_REPR`], [`MAX_TRACEBACK`]).
    texts: [Option<Box<str>>; 7],
    root_id: Option<Box<str>>,
    parent_id: Option<Box<str>>,
    group: Option<Box<str>>,
    queue: Option<Arc<str>>,
    routing_key: Option<Arc<str>>,
    /// Retries seen (`retry_number`).
    retries_seen: u32,
    /// Every other field, by name, as its JSON text (`worker_pid`, `retries`, `eta`, `chord`, ...).
    other: Vec<(Arc<str>, Box<RawValue>)>,
}

const TIME_KEYS: [&str; 5] = ["sent", "received", "started", "retried_at", "finished"];
const TEXT_KEYS: [&str; 7] =
    ["args", "kwargs", "result", "exception", "traceback", "retry_exception", "retry_traceback"];

/// `text` cut to `max` bytes at a character boundary, with `…` when cut.
fn bounded(text: &str, max: usize) -> Box<str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into_boxed_str()
}

impl TaskView {
    fn new(id: Arc<str>) -> Self {
        TaskView {
            id,
            state: EventState::default(),
            name: None,
            worker: None,
            times: [None; 5],
            runtime: None,
            texts: Default::default(),
            root_id: None,
            parent_id: None,
            group: None,
            queue: None,
            routing_key: None,
            retries_seen: 0,
            other: Vec::new(),
        }
    }

    /// A field kept as JSON text (`chord`, `chain`, `link`, ...), read.
    fn value(&self, key: &str) -> Option<Value> {
        let raw = self.other.iter().find(|(k, _)| &**k == key)?;
        serde_json::from_str(raw.1.get()).ok()
    }

    fn set_other(&mut self, key: Arc<str>, raw: &RawValue) {
        match self.other.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = raw.to_owned(),
            None => self.other.push((key, raw.to_owned())),
        }
    }

    /// Every field as the JSON the API serves.
    fn to_map(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(&*self.id));
        m.insert("state".into(), json!(self.state.as_str()));
        let texts = [
            ("worker", self.worker.as_deref()),
            ("name", self.name.as_deref()),
            ("root_id", self.root_id.as_deref()),
            ("parent_id", self.parent_id.as_deref()),
            ("group", self.group.as_deref()),
            ("queue", self.queue.as_deref()),
            ("routing_key", self.routing_key.as_deref()),
        ];
        for (k, v) in texts.into_iter().chain(TEXT_KEYS.iter().copied().zip(self.texts.iter().map(|t| t.as_deref()))) {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        for (k, t) in TIME_KEYS.iter().zip(self.times) {
            if let Some(t) = t {
                m.insert((*k).into(), json!(t));
            }
        }
        if let Some(r) = self.runtime {
            m.insert("runtime".into(), json!(r));
        }
        if self.retries_seen > 0 {
            m.insert("retry_number".into(), json!(self.retries_seen));
        }
        for (k, raw) in &self.other {
            m.insert(k.to_string(), serde_json::from_str(raw.get()).unwrap_or(Value::Null));
        }
        m
    }
}

/// Task names, worker names, queues and field names, each held once however many tasks name it.
#[derive(Debug, Default)]
struct Names(std::collections::HashSet<Arc<str>>);

impl Names {
    /// At most this many are shared; past it a name is held by each task (names are few: a
    /// flood of distinct ones must not grow this for ever).
    const MAX: usize = 10_000;

    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return n.clone();
        }
        let n: Arc<str> = name.into();
        if self.0.len() < Self::MAX {
            self.0.insert(n.clone());
        }
        n
    }
}

/// Everything the dashboard shows.
#[derive(Debug, Default)]
pub struct State {
    workers: BTreeMap<String, WorkerView>,
    tasks: HashMap<Arc<str>, TaskView>,
    /// Task ids, oldest first, for the bound.
    order: VecDeque<Arc<str>>,
    /// Names shared by the tasks.
    names: Names,
    queues: Vec<Value>,
    /// Per minute with any outcome, oldest first.
    minutes: VecDeque<Minute>,
    /// Run times per task name (at most [`MAX_NAMES`] names and [`OTHER_NAMES`]).
    runtimes: BTreeMap<String, Histogram>,
    /// Per queue: (Unix seconds, ready, unacked, scheduled), oldest first.
    depths: BTreeMap<String, VecDeque<(f64, u64, u64, u64)>>,
    /// Tasks received per queue in the last minute, for the rates.
    flow: Flow,
    /// The broker answered the last poll.
    pub connected: bool,
    /// Why the last poll failed.
    pub last_error: Option<String>,
    /// Bumped on every change; the live stream sends it.
    pub version: u64,
}

impl State {
    /// Apply one event body (a JSON object from `celeryev`, already parsed).
    pub fn apply_event(&mut self, ev: &Map<String, Value>) -> Result<(), EventError> {
        self.apply(&RawEvent::from_map(ev))
    }

    /// Apply one event (see [`parse_body`]).
    pub fn apply(&mut self, ev: &RawEvent<'_>) -> Result<(), EventError> {
        let kind = ev.text("type").ok_or(EventError::Missing("type"))?;
        let host = ev.text("hostname").ok_or(EventError::Missing("hostname"))?;
        let at = ev.number("timestamp").unwrap_or_else(now);
        if let Some(rest) = kind.strip_prefix("worker-") {
            let w = self.workers.entry(host.into_owned()).or_default();
            match rest {
                "offline" => w.said_offline = true,
                _ => {
                    w.said_offline = false;
                    w.heartbeat = Some(at);
                    for (k, v) in &ev.pairs {
                        if !matches!(k.as_ref(), "type" | "hostname" | "clock" | "utcoffset") {
                            let v = serde_json::from_str(v.get()).unwrap_or(Value::Null);
                            w.heartbeat_fields.insert(k.to_string(), v);
                        }
                    }
                }
            }
            self.version += 1;
            return Ok(());
        }
        let Some(state) = EventState::of_event(&kind) else {
            return Ok(()); // Another kind of event (a future one): nothing to show.
        };
        if kind == "task-received" {
            let queue = ev.text("queue").or_else(|| ev.text("routing_key"));
            self.flow.received(&mut self.workers, &host, queue.as_deref(), at);
        }
        let id = ev.text("uuid").ok_or_else(|| EventError::NoTaskId(kind.to_string()))?;
        if !self.tasks.contains_key(id.as_ref()) {
            let key: Arc<str> = id.as_ref().into();
            self.order.push_back(key.clone());
            self.tasks.insert(key.clone(), TaskView::new(key));
            while self.order.len() > MAX_TASKS {
                if let Some(old) = self.order.pop_front() {
                    self.tasks.remove(&old);
                }
            }
        }
        let names = &mut self.names;
        let Some(t) = self.tasks.get_mut(id.as_ref()) else { return Ok(()) };
        let current = t.state;
        // A retry starts the task over, unless it already ended: a prefork Celery worker sends
        // `task-retried` from its main process once the child reported, and the retried
        // message may have run to its end on another child by then (Celery's own
        // `celery/events/state.py` keeps a ready state against a lower one too).
        let over = kind == "task-retried" && current.rank() < 3;
        if over || state.rank() >= current.rank() || kind == "task-revoked" {
            t.state = state;
        }
        if kind != "task-sent" {
            t.worker = Some(names.get(&host));
        }
        // Of several retries, the latest (by its timestamp) is the one shown.
        let latest_retry = kind == "task-retried" && t.times[3].is_none_or(|r| at >= r);
        let stamp = match kind.as_ref() {
            "task-sent" => Some(0),
            "task-received" => Some(1),
            "task-started" => Some(2),
            "task-retried" if latest_retry => Some(3),
            "task-retried" => None,
            _ => Some(4),
        };
        if let Some(i) = stamp {
            t.times[i] = Some(at);
        }
        for (k, v) in &ev.pairs {
            if matches!(
                k.as_ref(),
                "type" | "hostname" | "clock" | "utcoffset" | "timestamp" | "uuid" | "local_received"
            ) || v.get() == "null"
            {
                continue;
            }
            let key = match (kind.as_ref(), k.as_ref()) {
                // The worker's pid is the event's, not the task's.
                (_, "pid") => "worker_pid",
                // What made the task retry, kept apart from how it ended.
                ("task-retried", "exception" | "traceback") if !latest_retry => continue,
                ("task-retried", "exception") => "retry_exception",
                ("task-retried", "traceback") => "retry_traceback",
                (_, k) => k,
            };
            let text = text_of(v);
            match (key, text) {
                // A task that retried itself is sent again by itself: Celery's retry
                // (`celery/app/task.py`, `retry` → `signature_from_request` → `send_task`) names
                // the running task as parent when it had none. The task is not its own parent.
                ("parent_id", Some(p)) if p == id => {}
                ("parent_id", Some(p)) => t.parent_id = Some(p.as_ref().into()),
                ("root_id", Some(r)) => t.root_id = Some(r.as_ref().into()),
                ("group", Some(g)) => t.group = Some(g.as_ref().into()),
                ("name", Some(n)) => t.name = Some(names.get(&n)),
                ("queue", Some(q)) => t.queue = Some(names.get(&q)),
                ("routing_key", Some(q)) => t.routing_key = Some(names.get(&q)),
                (key, Some(text)) if TEXT_KEYS.contains(&key) => {
                    let i = TEXT_KEYS.iter().position(|k| *k == key).unwrap_or(0);
                    let max = if key.ends_with("traceback") { MAX_TRACEBACK } else { MAX_REPR };
                    t.texts[i] = Some(bounded(&text, max));
                }
                ("runtime", _) if number_of(v).is_some() => t.runtime = number_of(v),
                (key, _) => t.set_other(names.get(key), v),
            }
        }
        if kind == "task-retried" {
            // Retries seen; the traceback kept is the latest's, so it is that of retry N.
            t.retries_seen += 1;
        }
        let runtime = matches!(kind.as_ref(), "task-succeeded" | "task-failed").then(|| ev.number("runtime")).flatten();
        let name = t.name.clone();
        let minute = (at / 60.0).floor() as i64;
        match kind.as_ref() {
            "task-succeeded" => self.count(minute, 1, 0, runtime),
            "task-failed" => self.count(minute, 0, 1, runtime),
            _ => {}
        }
        if let Some(r) = runtime {
            let known = self.runtimes.len() < MAX_NAMES;
            let name: &str = match &name {
                Some(n) if known || self.runtimes.contains_key(&**n) => n,
                _ => OTHER_NAMES,
            };
            match self.runtimes.get_mut(name) {
                Some(h) => h.record(r),
                None => self.runtimes.entry(name.to_string()).or_default().record(r),
            }
        }
        self.version += 1;
        Ok(())
    }

    fn count(&mut self, minute: i64, ok: u64, failed: u64, runtime: Option<f64>) {
        let slot = match self.minutes.iter().position(|m| m.minute == minute) {
            Some(i) => i,
            None => {
                if self.minutes.back().is_some_and(|last| minute < last.minute - MINUTES as i64) {
                    return; // Older than every minute kept.
                }
                let fresh = Minute { minute, succeeded: 0, failed: 0, runtimes: Histogram::default() };
                let at = self.minutes.partition_point(|m| m.minute < minute);
                self.minutes.insert(at, fresh);
                while self.minutes.len() > MINUTES {
                    self.minutes.pop_front();
                }
                match self.minutes.iter().position(|m| m.minute == minute) {
                    Some(i) => i,
                    None => return,
                }
            }
        };
        let m = &mut self.minutes[slot];
        m.succeeded += ok;
        m.failed += failed;
        if let Some(r) = runtime {
            m.runtimes.record(r);
        }
    }

    /// Whether worker `node` was seen (an event, or a reply to a poll).
    pub fn knows_worker(&self, node: &str) -> bool {
        self.workers.contains_key(node)
    }

    /// The workers seen, by node name.
    pub fn worker_names(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// The queues worker `node` said it consumes (`active_queues`), by name.
    pub fn worker_queues(&self, node: &str) -> Vec<String> {
        let queues = self.workers.get(node).and_then(|w| w.queues.as_ref()).and_then(Value::as_array);
        queues.into_iter().flatten().filter_map(|q| q["name"].as_str().map(str::to_string)).collect()
    }

    /// Record one poll's replies: `method` is `stats`, `active` or `active_queues`.
    pub fn apply_replies(&mut self, method: &str, replies: Vec<(String, Value)>) {
        let at = now();
        for (node, reply) in replies {
            let w = self.workers.entry(node).or_default();
            w.replied = Some(at);
            match method {
                "stats" => w.stats = Some(reply),
                "active" => w.active = Some(reply),
                "active_queues" => w.queues = Some(reply),
                "reserved" => w.held[0] = Some(reply),
                "scheduled" => w.held[1] = Some(reply),
                _ => {}
            }
        }
        self.version += 1;
    }

    /// Record the broker's queue depths (`Broker::queues`: rows with `name`, `ready`, `unacked`,
    /// `scheduled`), and a sample of each in its history; a queue not listed for an hour is
    /// forgotten.
    pub fn set_queues(&mut self, queues: Vec<Value>) {
        self.sample_depths(now(), &queues);
        if self.queues != queues {
            self.queues = queues;
            self.version += 1;
        }
    }

    fn sample_depths(&mut self, at: f64, queues: &[Value]) {
        for q in queues {
            let Some(name) = q["name"].as_str() else { continue };
            if q.get("error").is_some() {
                continue;
            }
            let n = |k: &str| q[k].as_u64().unwrap_or(0);
            let ring = self.depths.entry(name.to_string()).or_default();
            ring.push_back((at, n("ready"), n("unacked"), n("scheduled")));
            while ring.len() > DEPTH_SAMPLES {
                ring.pop_front();
            }
        }
        self.depths.retain(|_, ring| ring.back().is_some_and(|s| at - s.0 < 3600.0));
    }

    /// Record whether the broker answered; `error` says why not.
    pub fn set_connected(&mut self, error: Option<String>) {
        let connected = error.is_none();
        if connected != self.connected || error != self.last_error {
            self.connected = connected;
            self.last_error = error;
            self.version += 1;
        }
    }

    /// The queues every worker said it consumes (`active_queues` replies), for brokers that
    /// cannot list queues.
    pub fn known_queues(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tasks
            .values()
            .filter_map(|t| t.routing_key.as_deref().map(str::to_string))
            .filter(|q| !q.is_empty())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Workers as `[{hostname, online, heartbeat_age, software, pool, children, ...}]`; ages in
    /// seconds, RSS in KiB.
    pub fn workers_json(&self) -> Value {
        let at = now();
        let list: Vec<Value> = self
            .workers
            .iter()
            .map(|(name, w)| {
                let seen = w.heartbeat.into_iter().chain(w.replied).fold(f64::NEG_INFINITY, f64::max);
                let age = seen.is_finite().then(|| (at - seen).max(0.0));
                let online = !w.said_offline && age.is_some_and(|a| a < OFFLINE_AFTER_SECS);
                let stats = w.stats.as_ref();
                let pool = stats.map(|s| &s["pool"]);
                let software = w
                    .heartbeat_fields
                    .get("sw_ident")
                    .or_else(|| stats.and_then(|s| s.get("sw_ident")))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| match pool.and_then(|p| p["implementation"].as_str()) {
                        Some(i) if i.starts_with("celeriac") => "celeriac",
                        Some(_) => "py-celery",
                        None => "unknown",
                    });
                let active: Vec<Value> = w.active.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
                // A Celery prefork pool lists its processes' pids only
                // (`celery/concurrency/prefork.py` `_get_info`): RSS and tasks done are not
                // reported (`null`); the task each runs is the `active` entry of its pid.
                let python_children: Option<Vec<Value>> = pool.and_then(|p| p["processes"].as_array()).map(|pids| {
                    pids.iter()
                        .enumerate()
                        .map(|(slot, pid)| {
                            let task = active
                                .iter()
                                .find(|t| t["worker_pid"] == *pid)
                                .map(|t| json!({"id": t["id"], "name": t["name"]}));
                            json!({"slot": slot, "pid": pid, "rss_kib": null, "tasks_done": null, "task": task})
                        })
                        .collect()
                });
                let children: Vec<Value> = pool
                    .and_then(|p| p["children"].as_array())
                    .or(python_children.as_ref())
                    .map(|cs| {
                        cs.iter()
                            .map(|c| {
                                let mut c = c.clone();
                                let task = active.iter().find(|t| t["worker_pid"] == c["pid"] && !c["pid"].is_null());
                                if let Some(t) = task {
                                    c["blocked_on"] = t["blocked_on"].clone();
                                    c["wchan"] = t["wchan"].clone();
                                    c["runtime"] = t["runtime"].clone();
                                }
                                c
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "hostname": name,
                    "online": online,
                    "heartbeat_age": age,
                    "software": software,
                    "version": w.heartbeat_fields.get("sw_ver").cloned().or_else(|| stats.map(|s| s["sw_ver"].clone())),
                    "pid": stats.map(|s| s["pid"].clone()).or_else(|| w.heartbeat_fields.get("pid").cloned()),
                    "pool": pool.map(|p| p["implementation"].clone()),
                    // A Celery prefork pool keeps `max-concurrency` at its start value after
                    // `pool_grow`/`pool_shrink` (`celery/concurrency/prefork.py` `_get_info`
                    // reports `self.limit`); its `processes` are the pool as it is now.
                    "concurrency": pool.map(|p| match (software, p["processes"].as_array()) {
                        ("py-celery", Some(pids)) => json!(pids.len()),
                        _ => p["max-concurrency"].clone(),
                    }),
                    "processed": w.heartbeat_fields.get("processed").cloned(),
                    "active_count": w.heartbeat_fields.get("active").cloned().unwrap_or_else(|| json!(active.len())),
                    "loadavg": w.heartbeat_fields.get("loadavg").cloned(),
                    "rss_kib": stats.map(|s| s["rss_kib"].clone()),
                    // `getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux) of the worker's own
                    // process, the one figure a Celery worker's `stats` gives
                    // (`celery/worker/worker.py` `rusage`).
                    "peak_rss_kib": stats.map(|s| s["rusage"]["maxrss"].clone()),
                    "children": children,
                    "recycles": pool.map(|p| p["recycles"].clone()),
                    "hard_limit_kills": pool.map(|p| p["hard_limit_kills"].clone()),
                    "active": active,
                    "queues": self.worker_queues(name),
                })
            })
            .collect();
        Value::Array(list)
    }

    /// The most recent tasks, newest first, that match every given filter (see [`TaskFilter`]),
    /// skipping `offset` of them, at most `limit`: `{total (kept), matched, offset, tasks}`.
    pub fn tasks_json(&self, filter: &TaskFilter, offset: usize, limit: usize) -> Value {
        let mut matched = 0usize;
        let mut list = Vec::new();
        for t in self.order.iter().rev().filter_map(|id| self.tasks.get(id)) {
            if !filter.matches(t) {
                continue;
            }
            if matched >= offset && list.len() < limit {
                list.push(self.with_diagnosis(Value::Object(t.to_map())));
            }
            matched += 1;
        }
        json!({"total": self.tasks.len(), "matched": matched, "offset": offset, "tasks": list})
    }

    /// A running task's diagnosis from its worker's last `active` reply (`blocked_on`, `wchan`,
    /// `runtime`, `hard_time_left`, `worker_pid` of the child), so a hung task can be shown as
    /// such; other tasks as they are.
    fn with_diagnosis(&self, mut task: Value) -> Value {
        if task["state"] != json!("STARTED") {
            return task;
        }
        let worker = task["worker"].as_str().and_then(|w| self.workers.get(w));
        let active = worker.and_then(|w| w.active.as_ref()).and_then(Value::as_array);
        if let Some(entry) = active.into_iter().flatten().find(|a| a["id"] == task["id"]) {
            for key in [
                "blocked_on",
                "wchan",
                "syscall",
                "proc_state",
                "runtime",
                "hard_time_left",
                "soft_time_left",
                "worker_pid",
            ] {
                if !entry[key].is_null() {
                    task[key] = entry[key].clone();
                }
            }
            if let Some(why) = hung(entry) {
                task["hung"] = json!(why);
            }
        }
        task
    }

    /// The kept tasks whose events name `group` as their group: `[{id, name, state}]`, oldest
    /// first (empty when none is kept).
    pub fn group_members(&self, group: &str) -> Vec<Value> {
        self.order
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| t.group.as_deref() == Some(group))
            .map(|t| json!({"id": &*t.id, "name": t.name.as_deref(), "state": t.state.as_str()}))
            .collect()
    }

    /// The worker holding a task its events say was received or started and not finished.
    pub fn holder(&self, id: &str) -> Option<String> {
        let t = self.tasks.get(id)?;
        let held = matches!(t.state, EventState::Stored(TaskState::Received | TaskState::Started));
        held.then(|| t.worker.as_deref().map(str::to_string)).flatten()
    }

    /// One task as its events tell it, with the ids of tasks whose events name it as parent
    /// (`child_ids`, never itself) and its workflow as a `graph` (see [`State::graph`]).
    pub fn task_json(&self, id: &str) -> Option<Value> {
        let t = self.tasks.get(id)?;
        let mut v = self.with_diagnosis(Value::Object(t.to_map()));
        let children: Vec<&str> = self
            .order
            .iter()
            .filter(|c| &***c != id)
            .filter(|c| self.tasks.get(*c).is_some_and(|t| t.parent_id.as_deref() == Some(id)))
            .map(|c| &**c)
            .collect();
        v["child_ids"] = json!(children);
        v["graph"] = self.graph(id);
        Some(v)
    }

    /// The workflow task `id` is in, for drawing: every kept task of its root (`root_id`, or the
    /// task itself), at most [`MAX_GRAPH_NODES`], and the tasks their `chain`, `chord`, `link`
    /// and `errback` name that were not seen yet (state `PENDING`).
    ///
    /// `{root, nodes: [{id, name, state, group?}], edges: [{from, to, kind}], groups: [{id,
    /// members, chord?: {id, name}}]}`; `kind` is `parent` (parent → child, from `parent_id`),
    /// `chain` (a step → the next), `chord` (a header task → the chord's body), `link` or
    /// `errback`.
    pub fn graph(&self, id: &str) -> Value {
        let root = self.tasks.get(id).and_then(|t| t.root_id.as_deref()).unwrap_or(id).to_string();
        let mut ids: Vec<&str> = vec![id];
        if root != id && self.tasks.contains_key(root.as_str()) {
            ids.push(&root);
        }
        for other in self.order.iter() {
            if ids.len() >= MAX_GRAPH_NODES {
                break;
            }
            let Some(t) = self.tasks.get(other) else { continue };
            if &**other != id && **other != *root && t.root_id.as_deref() == Some(root.as_str()) {
                ids.push(other);
            }
        }
        // The other members of its groups: a group applied on its own makes each member a root.
        let in_groups: std::collections::HashSet<&str> =
            ids.iter().filter_map(|i| self.tasks.get(*i)).filter_map(|t| t.group.as_deref()).collect();
        if !in_groups.is_empty() {
            let known: std::collections::HashSet<&str> = ids.iter().copied().collect();
            let more: Vec<&str> = self
                .order
                .iter()
                .filter(|o| !known.contains(&***o))
                .filter(|o| self.tasks.get(*o).and_then(|t| t.group.as_deref()).is_some_and(|g| in_groups.contains(g)))
                .map(|o| &**o)
                .collect();
            ids.extend(more.into_iter().take(MAX_GRAPH_NODES.saturating_sub(ids.len())));
        }
        let mut nodes: Vec<Value> = Vec::new();
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut edges: Vec<Value> = Vec::new();
        let mut groups: BTreeMap<String, (Vec<String>, Option<Value>)> = BTreeMap::new();
        let mut edge_seen: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
        let mut edge = |from: &str, to: &str, kind: &str, edges: &mut Vec<Value>| {
            if from != to && edge_seen.insert((from.to_string(), to.to_string())) {
                edges.push(json!({"from": from, "to": to, "kind": kind}));
            }
        };
        let mut pending: Vec<(String, Option<String>)> = Vec::new();
        for tid in &ids {
            let Some(t) = self.tasks.get(*tid) else { continue };
            seen.insert(tid.to_string());
            let group = t.group.as_deref().map(str::to_string);
            nodes.push(json!({"id": tid, "name": t.name.as_deref(), "state": t.state.as_str(), "group": group}));
            if let Some(g) = &group {
                let entry = groups.entry(g.clone()).or_default();
                entry.0.push(tid.to_string());
                if let Some(body) = t.value("chord").filter(|c| c.is_object()) {
                    entry.1 = Some(body);
                }
            }
        }
        for tid in &ids {
            let Some(t) = self.tasks.get(*tid) else { continue };
            let refs = |key: &str| -> Vec<(String, Option<String>)> {
                t.value(key)
                    .as_ref()
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|r| Some((r["id"].as_str()?.to_string(), r["name"].as_str().map(str::to_string))))
                    .collect()
            };
            if let Some((next, name)) = refs("chain").into_iter().next() {
                edge(tid, &next, "chain", &mut edges);
                pending.push((next, name));
            }
            if let Some(body) = t.value("chord").filter(|c| c.is_object()) {
                if let Some(bid) = body["id"].as_str() {
                    edge(tid, bid, "chord", &mut edges);
                    pending.push((bid.to_string(), body["name"].as_str().map(str::to_string)));
                }
            }
            for (kind, key) in [("link", "link"), ("errback", "errback")] {
                for (to, name) in refs(key) {
                    edge(tid, &to, kind, &mut edges);
                    pending.push((to, name));
                }
            }
        }
        // Parent edges last: an edge a chain or chord already drew keeps that kind.
        for tid in &ids {
            let parent = self.tasks.get(*tid).and_then(|t| t.parent_id.as_deref());
            if let Some(p) = parent.filter(|p| seen.contains(*p)) {
                edge(p, tid, "parent", &mut edges);
            }
        }
        for (pid, name) in pending {
            if nodes.len() >= MAX_GRAPH_NODES {
                break;
            }
            if seen.insert(pid.clone()) {
                let state = self.tasks.get(pid.as_str()).map_or("PENDING", |t| t.state.as_str());
                nodes.push(json!({"id": pid, "name": name, "state": state}));
            }
        }
        // A chord's body carries the header's group id (Celery's `chord` sets it) but is not a
        // member of the header.
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(gid, (mut members, chord))| {
                let body = chord.as_ref().and_then(|c| c["id"].as_str());
                members.retain(|m| Some(m.as_str()) != body);
                json!({"id": gid, "members": members, "chord": chord})
            })
            .collect();
        json!({"root": root, "nodes": nodes, "edges": edges, "groups": groups})
    }

    /// Queue depths as the broker reported them.
    pub fn queues_json(&self) -> Value {
        Value::Array(self.queues.clone())
    }

    /// The last [`MINUTES`] minutes up to now's (or the latest minute an event named, if
    /// later), every one of them: `[{minute, succeeded, failed, runtime: {count, p50, p95, p99}}]`,
    /// `minute` in Unix seconds at its start, run times in seconds (`null` for a minute without
    /// any), oldest first.
    pub fn throughput_json(&self) -> Value {
        self.throughput_at(now())
    }

    fn throughput_at(&self, at: f64) -> Value {
        let current = (at / 60.0).floor() as i64;
        let last = self.minutes.back().map_or(current, |m| m.minute.max(current));
        let empty = Histogram::default();
        let list = (last - MINUTES as i64 + 1..=last)
            .map(|minute| {
                let m = self.minutes.iter().find(|m| m.minute == minute);
                json!({
                    "minute": minute * 60,
                    "succeeded": m.map_or(0, |m| m.succeeded),
                    "failed": m.map_or(0, |m| m.failed),
                    "runtime": m.map_or(&empty, |m| &m.runtimes).summary(),
                })
            })
            .collect();
        Value::Array(list)
    }

    /// Run-time percentiles per task name since the dashboard started: `[{name, count, p50, p95,
    /// p99}]` in seconds, by name.
    pub fn runtimes_json(&self) -> Value {
        Value::Array(
            self.runtimes
                .iter()
                .map(|(name, h)| {
                    let mut v = h.summary();
                    v["name"] = json!(name);
                    v
                })
                .collect(),
        )
    }

    /// Each queue's depth over the last hour: `{name: [[unix_seconds, ready, unacked,
    /// scheduled], ...]}`, oldest first, a sample per poll.
    pub fn depths_json(&self) -> Value {
        Value::Object(
            self.depths
                .iter()
                .map(|(name, ring)| (name.clone(), ring.iter().map(|(t, r, u, s)| json!([t, r, u, s])).collect()))
                .collect(),
        )
    }
}

/// How far back a queue's rates look.
pub const RATE_WINDOW_SECS: f64 = 60.0;

/// When workers received tasks from each queue (`task-received` events naming it), the last
/// [`RATE_WINDOW_SECS`].
#[derive(Debug, Default)]
struct Flow {
    received: BTreeMap<String, VecDeque<f64>>,
}

impl Flow {
    /// A `task-received` from `host` at `at` (Unix seconds); counted for the queue it names
    /// (its `queue`, else its `routing_key`), if any.
    fn received(&mut self, workers: &mut BTreeMap<String, WorkerView>, host: &str, queue: Option<&str>, at: f64) {
        let Some(queue) = queue.filter(|q| !q.is_empty()) else {
            return;
        };
        workers.entry(host.to_string()).or_default().names_queues = true;
        let times = self.received.entry(queue.to_string()).or_default();
        times.push_back(at);
        while times.front().is_some_and(|t| at - t > RATE_WINDOW_SECS) {
            times.pop_front();
        }
    }

    /// Tasks received from `queue` in the window ending at `at`.
    fn count(&self, queue: &str, at: f64) -> usize {
        self.received.get(queue).map_or(0, |times| times.iter().filter(|t| at - **t <= RATE_WINDOW_SECS).count())
    }
}

/// Per queue, what the workers said they hold of it: (unacked, scheduled). An entry counts for
/// the queue its `delivery_info.routing_key` names; unacked unless `acknowledged` is true.
fn held_by_workers<'a>(workers: impl Iterator<Item = &'a WorkerView>) -> BTreeMap<String, (u64, u64)> {
    let mut held: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for w in workers {
        let list = |v: &Option<Value>| v.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
        // `scheduled` entries wrap the request: `{eta, priority, request}`.
        let scheduled = list(&w.held[1]).into_iter().map(|e| e["request"].clone());
        let taken = list(&w.active).into_iter().chain(list(&w.held[0])).map(|r| (r, false));
        for (request, is_scheduled) in taken.chain(scheduled.map(|r| (r, true))) {
            let Some(queue) = request["delivery_info"]["routing_key"].as_str() else { continue };
            let counts = held.entry(queue.to_string()).or_default();
            if request["acknowledged"] != json!(true) {
                counts.0 += 1;
            }
            if is_scheduled {
                counts.1 += 1;
            }
        }
    }
    held
}

impl State {
    /// The broker's queue rows with what the dashboard adds: on RabbitMQ (`from_workers`, whose
    /// passive declare gives only ready and consumers), `unacked` and `scheduled` counted from
    /// the workers' `active`/`reserved`/`scheduled` replies (`null` when no worker answered
    /// them), and `dead` `null` (RabbitMQ keeps no dead-letter store to count; the broker's 0
    /// would read as "none"); on every broker `rate_out` and `rate_in` in messages a second
    /// over the last minute (see [`Self::rates`]).
    pub fn fill_queue_rows(&self, mut rows: Vec<Value>, from_workers: bool) -> Vec<Value> {
        let at = now();
        let answered = self.workers.values().any(|w| w.held[0].is_some() && w.replied.is_some_and(|r| at - r < 10.0));
        let held = held_by_workers(self.workers.values());
        for row in rows.iter_mut().filter(|r| r.get("error").is_none()) {
            let Some(name) = row["name"].as_str().map(str::to_string) else { continue };
            if from_workers {
                let (unacked, scheduled) = held.get(&name).copied().unwrap_or_default();
                row["unacked"] = if answered { json!(unacked) } else { Value::Null };
                row["scheduled"] = if answered { json!(scheduled) } else { Value::Null };
                row["dead"] = Value::Null;
            }
            let (rate_out, rate_in) = self.rates(&name, row["consumers"].as_u64(), row["ready"].as_u64(), at);
            row["rate_out"] = json!(rate_out);
            row["rate_in"] = json!(rate_in);
        }
        rows
    }

    /// A queue's rates over the last minute, messages a second: out = tasks workers received from
    /// it (their `task-received` events naming the queue), in = out + the change of its ready
    /// count over the same time (from the depth samples, `ready_now` the newest). Out is known
    /// when every worker consuming the queue (`active_queues`) names queues in its events and
    /// the broker counts no other consumer; otherwise both are `None` (a Python Celery worker's
    /// events name no queue; a worker without `-E` sends none).
    fn rates(
        &self,
        queue: &str,
        consumers: Option<u64>,
        ready_now: Option<u64>,
        at: f64,
    ) -> (Option<f64>, Option<f64>) {
        let consuming: Vec<&WorkerView> = self
            .workers
            .iter()
            .filter(|(name, _)| self.worker_queues(name).iter().any(|q| q == queue))
            .map(|(_, w)| w)
            .collect();
        let foreign = consumers.is_some_and(|c| c > consuming.len() as u64);
        if foreign || consuming.iter().any(|w| !w.names_queues) {
            return (None, None);
        }
        let samples = self.depths.get(queue);
        let first = samples.and_then(|ring| ring.iter().find(|s| at - s.0 <= RATE_WINDOW_SECS));
        // Before the first sample of the queue there is no time span to divide by.
        let Some(&(since, ready_then, ..)) = first else { return (None, None) };
        let span = (at - since).max(1.0);
        let out = self.flow.count(queue, at) as f64 / span;
        let rate_in = ready_now.map(|now| (out + (now as f64 - ready_then as f64) / span).max(0.0));
        (Some(round2(out)), rate_in.map(round2))
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Why a running task (an `active` entry with celeriac's diagnosis) looks hung, if it does: it
/// is past its soft time limit, or it has slept in one system call (`S` or `D` with a
/// `syscall`) for at least [`HUNG_AFTER_SECS`] of running.
fn hung(active: &Value) -> Option<String> {
    if let Some(left) = active["soft_time_left"].as_f64().filter(|l| *l < 0.0) {
        return Some(format!("past its soft time limit by {:.1} s", -left));
    }
    let runtime = active["runtime"].as_f64()?;
    let sleeping = active["proc_state"].as_str().is_some_and(|s| s.starts_with('S') || s.starts_with('D'));
    let in_syscall = active["syscall"].as_str().is_some_and(|s| !s.is_empty());
    (sleeping && in_syscall && runtime >= HUNG_AFTER_SECS).then(|| {
        let on = active["blocked_on"].as_str().unwrap_or("?");
        format!("blocked for {runtime:.0} s: {on}")
    })
}

/// Filters of the task list; `None` matches all.
#[derive(Debug, Default)]
pub struct TaskFilter {
    /// Exact state, e.g. `FAILURE`.
    pub state: Option<String>,
    /// A part of the task's name.
    pub name: Option<String>,
    /// A part of the worker's node name (`w1` matches `w1@host`).
    pub worker: Option<String>,
    /// The start of the task's id.
    pub id: Option<String>,
}

impl TaskFilter {
    fn matches(&self, t: &TaskView) -> bool {
        self.state.as_deref().is_none_or(|s| t.state.as_str() == s)
            && self.name.as_deref().is_none_or(|n| t.name.as_deref().is_some_and(|name| name.contains(n)))
            && self.worker.as_deref().is_none_or(|w| t.worker.as_deref().is_some_and(|name| name.contains(w)))
            && self.id.as_deref().is_none_or(|p| t.id.starts_with(p))
    }
}

/// Unix seconds now.
pub fn now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn queue_rows_count_held_tasks_by_routing_key_and_rates_from_received_events() {
        let mut s = State::default();
        let req = |id: &str, q: &str, acked: bool| json!({"id": id, "acknowledged": acked, "delivery_info": {"routing_key": q}});
        let row = json!({"name": "q", "ready": 4, "unacked": 0, "scheduled": 0, "consumers": 1, "dead": 0});
        // No worker answered yet: unknown, not 0; dead letters are never known on RabbitMQ.
        let rows = s.fill_queue_rows(vec![row.clone()], true);
        assert_eq!(
            (&rows[0]["unacked"], &rows[0]["scheduled"], &rows[0]["rate_out"], &rows[0]["dead"]),
            (&Value::Null, &Value::Null, &Value::Null, &Value::Null)
        );
        assert_eq!(s.fill_queue_rows(vec![row.clone()], false)[0]["dead"], json!(0), "where the broker counts them");

        s.apply_replies("active_queues", vec![("w".into(), json!([{"name": "q"}]))]);
        s.apply_replies("active", vec![("w".into(), json!([req("a", "q", false), req("b", "q", true)]))]);
        s.apply_replies("reserved", vec![("w".into(), json!([req("c", "q", false), req("d", "other", false)]))]);
        s.apply_replies("scheduled", vec![("w".into(), json!([{"eta": "x", "request": req("e", "q", false)}]))]);
        let rows = s.fill_queue_rows(vec![row.clone()], true);
        // a, c and e are unacked (b was acknowledged as it started); e is scheduled.
        assert_eq!((&rows[0]["unacked"], &rows[0]["scheduled"]), (&json!(3), &json!(1)), "{}", rows[0]);
        // Rates need a worker naming its queue in task-received and a depth sample to start from.
        assert_eq!(rows[0]["rate_out"], Value::Null, "w never named a queue");
        let t = now();
        s.sample_depths(t - 30.0, &[json!({"name": "q", "ready": 10})]);
        for i in 0..6 {
            let e = json!({"type": "task-received", "hostname": "w", "uuid": format!("r{i}"), "queue": "q", "timestamp": t - 1.0});
            s.apply_event(&ev(e)).unwrap();
        }
        let rows = s.fill_queue_rows(vec![row], true);
        // 6 out in about 30 s; ready went from 10 to 4, so in = 0.2 - 0.2 = 0.
        let out = rows[0]["rate_out"].as_f64().unwrap();
        assert!((out - 0.2).abs() < 0.02, "{}", rows[0]);
        assert!(rows[0]["rate_in"].as_f64().is_some_and(|r| r < 0.02), "{}", rows[0]);
    }

    #[test]
    fn task_events_merge_and_out_of_order_events_keep_the_final_state() {
        let mut s = State::default();
        s.apply_event(&ev(json!({"type": "task-received", "hostname": "w@h", "uuid": "a", "name": "t.add",
            "args": "(1, 2)", "timestamp": 60.0})))
            .unwrap();
        s.apply_event(&ev(json!({"type": "task-succeeded", "hostname": "w@h", "uuid": "a", "result": "3",
            "runtime": 0.1, "timestamp": 61.0})))
            .unwrap();
        s.apply_event(&ev(json!({"type": "task-started", "hostname": "w@h", "uuid": "a", "timestamp": 60.5}))).unwrap();
        let t = s.task_json("a").unwrap();
        assert_eq!(
            (t["state"].as_str(), t["args"].as_str(), t["result"].as_str()),
            (Some("SUCCESS"), Some("(1, 2)"), Some("3"))
        );
        let minutes = s.throughput_at(61.0);
        assert_eq!(minutes.as_array().unwrap().len(), MINUTES);
        assert_eq!(minutes[MINUTES - 1]["minute"], json!(60));
        assert_eq!(minutes[MINUTES - 1]["succeeded"], json!(1));
        assert_eq!(minutes[MINUTES - 1]["runtime"]["p50"], json!(0.1));
    }

    #[test]
    fn malformed_events_are_refused_with_the_reason() {
        let mut s = State::default();
        assert_eq!(s.apply_event(&ev(json!({"hostname": "w"}))), Err(EventError::Missing("type")));
        assert_eq!(
            s.apply_event(&ev(json!({"type": "task-started", "hostname": "w"}))),
            Err(EventError::NoTaskId("task-started".into()))
        );
        assert_eq!(s.tasks_json(&TaskFilter::default(), 0, 10)["total"], json!(0));
    }

    #[test]
    fn a_multi_body_is_read_in_place_and_each_bad_item_is_refused_on_its_own() {
        let body = br#"[{"type": "task-received", "hostname": "w", "uuid": "a", "name": "t.x", "args": "(\"q\", 1)", "pid": 7, "retries": 0, "chord": {"id": "b", "name": "t.y"}, "timestamp": 60.0},
            5,
            {"type": "task-succeeded", "hostname": "w", "uuid": "a", "result": "None", "runtime": 0.25, "timestamp": 61.0},
            {"hostname": "w"}]"#;
        let items = parse_body(body).unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[1].as_ref().err().map(String::as_str), Some("not a JSON object: 5"));
        let mut s = State::default();
        let outcomes: Vec<_> = items.into_iter().flatten().map(|(ev, _)| s.apply(&ev)).collect();
        assert_eq!(outcomes, vec![Ok(()), Ok(()), Err(EventError::Missing("type"))]);
        let t = s.task_json("a").unwrap();
        assert_eq!(t["args"], json!("(\"q\", 1)"), "an escaped string is read whole");
        assert_eq!((&t["state"], &t["worker_pid"], &t["retries"]), (&json!("SUCCESS"), &json!(7), &json!(0)));
        assert_eq!((&t["runtime"], &t["chord"]["id"], &t["received"]), (&json!(0.25), &json!("b"), &json!(60.0)));
        assert_eq!(parse_body(b" 3").err().as_deref(), Some("not a JSON object or list"));
        assert!(parse_body(b"{\"type\": ").unwrap_err().starts_with("not JSON"));
    }

    #[test]
    fn a_string_without_escapes_is_borrowed_from_the_message_and_one_with_escapes_is_owned() {
        let body = br#"{"type": "task-sent", "hostname": "w", "uuid": "a", "name\u0021": "t.x", "args": "(\"q\",)"}"#;
        let items = parse_body(body).unwrap();
        let (ev, _) = items[0].as_ref().unwrap();
        let key = |k: &str| ev.pairs.iter().find(|(key, _)| key == k).map(|(key, _)| key).unwrap();
        assert!(matches!(key("uuid"), Cow::Borrowed(_)));
        assert!(matches!(key("name!"), Cow::Owned(_)));
        assert!(matches!(ev.text("type"), Some(Cow::Borrowed("task-sent"))));
        assert!(matches!(ev.text("args"), Some(Cow::Owned(a)) if a == "(\"q\",)"));
        assert_eq!(ev.text("name!"), Some(Cow::Borrowed("t.x")));
        // Only strings are text, whatever the other value is.
        let items = parse_body(br#"{"a": null, "b": 5, "c": ["x"], "d": {"e": "f"}, "g": true, "h": ""}"#).unwrap();
        let (ev, _) = items[0].as_ref().unwrap();
        assert_eq!(["a", "b", "c", "d", "g"].map(|k| ev.text(k)), [None, None, None, None, None]);
        assert_eq!(ev.text("h"), Some(Cow::Borrowed("")));
    }

    #[test]
    fn long_reprs_and_tracebacks_are_cut_at_their_bounds() {
        let mut s = State::default();
        let long = "é".repeat(MAX_REPR); // two bytes each
        s.apply_event(&ev(json!({"type": "task-failed", "hostname": "w", "uuid": "a", "args": long,
            "exception": "E()", "traceback": "x".repeat(MAX_TRACEBACK + 10)})))
            .unwrap();
        let t = s.task_json("a").unwrap();
        let args = t["args"].as_str().unwrap();
        assert!(args.ends_with('…') && args.len() <= MAX_REPR + '…'.len_utf8(), "{}", args.len());
        assert_eq!(t["traceback"].as_str().unwrap().chars().count(), MAX_TRACEBACK + 1);
        assert_eq!(t["exception"], json!("E()"));
    }

    #[test]
    fn the_task_list_is_bounded_and_filtered() {
        let mut s = State::default();
        for i in 0..MAX_TASKS + 5 {
            let kind = if i % 2 == 0 { "task-succeeded" } else { "task-failed" };
            s.apply_event(&ev(json!({"type": kind, "hostname": "w", "uuid": i.to_string(), "name": "n"}))).unwrap();
        }
        assert!(s.task_json("0").is_none() && s.task_json("5").is_some());
        let filter = TaskFilter { state: Some("FAILURE".into()), ..TaskFilter::default() };
        let failed = s.tasks_json(&filter, 0, 3);
        assert_eq!(failed["total"], json!(MAX_TASKS));
        assert_eq!(failed["tasks"][0]["id"], json!((MAX_TASKS + 3).to_string()), "newest failure first");
        assert_eq!(failed["tasks"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn every_minute_of_the_window_is_shown_and_run_time_percentiles_are_read() {
        let mut s = State::default();
        let done = |s: &mut State, id: &str, at: f64, runtime: f64, kind: &str| {
            s.apply_event(&ev(json!({"type": kind, "hostname": "w", "uuid": id, "name": "t.x",
                "runtime": runtime, "timestamp": at})))
                .unwrap();
        };
        for i in 0..1000 {
            done(&mut s, &format!("a{i}"), 6000.0 + (i % 50) as f64, (i + 1) as f64 / 1000.0, "task-succeeded");
        }
        done(&mut s, "late", 6125.0, 2.0, "task-failed");
        let minutes = s.throughput_at(6130.0);
        let list = minutes.as_array().unwrap();
        assert_eq!(list.len(), MINUTES, "{minutes}");
        let last3: Vec<(i64, u64, u64)> = list[MINUTES - 3..]
            .iter()
            .map(|m| (m["minute"].as_i64().unwrap(), m["succeeded"].as_u64().unwrap(), m["failed"].as_u64().unwrap()))
            .collect();
        assert_eq!(last3, vec![(6000, 1000, 0), (6060, 0, 0), (6120, 0, 1)], "an empty minute is zeros");
        assert_eq!(list[MINUTES - 2]["runtime"]["p50"], Value::Null);
        let near = |got: &Value, want: f64| {
            let got = got.as_f64().unwrap();
            assert!((got - want).abs() <= want * 0.1, "{got} not within 10% of {want}");
        };
        let m = &list[MINUTES - 3]["runtime"];
        near(&m["p50"], 0.5);
        near(&m["p95"], 0.95);
        near(&m["p99"], 0.99);
        let per_name = s.runtimes_json();
        assert_eq!(per_name[0]["name"], json!("t.x"));
        assert_eq!(per_name[0]["count"], json!(1001));
        near(&per_name[0]["p50"], 0.5);
        assert_eq!(per_name[0]["p99"].as_f64().map(|p| p <= 2.0), Some(true));
    }

    #[test]
    fn queue_depths_are_sampled_at_each_poll() {
        let mut s = State::default();
        s.set_queues(vec![json!({"name": "q", "ready": 3, "unacked": 1, "scheduled": 0})]);
        s.set_queues(vec![
            json!({"name": "q", "ready": 3, "unacked": 1, "scheduled": 0}),
            json!({"name": "gone", "error": "no such queue"}),
        ]);
        s.set_queues(vec![json!({"name": "q", "ready": 7, "unacked": 0, "scheduled": 2})]);
        let d = s.depths_json();
        let q = d["q"].as_array().unwrap();
        assert_eq!(q.len(), 3, "one sample per poll, changed or not: {d}");
        assert_eq!((q[2][1].as_u64(), q[2][2].as_u64(), q[2][3].as_u64()), (Some(7), Some(0), Some(2)));
        assert!(d.get("gone").is_none(), "{d}");
    }

    #[test]
    fn a_self_retried_task_is_not_its_own_parent_and_its_retry_traceback_is_kept_apart() {
        let mut s2 = State::default();
        for v in [
            json!({"type": "task-received", "hostname": "w", "uuid": "r", "name": "t.flaky", "retries": 0, "root_id": "r"}),
            json!({"type": "task-retried", "hostname": "w", "uuid": "r", "exception": "Retry(boom)", "traceback": "Traceback: boom"}),
            json!({"type": "task-received", "hostname": "w", "uuid": "r", "name": "t.flaky", "retries": 1, "root_id": "r", "parent_id": "r"}),
            json!({"type": "task-succeeded", "hostname": "w", "uuid": "r", "result": "'ok'", "runtime": 0.01}),
        ] {
            s2.apply_event(&ev(v)).unwrap();
        }
        let t = s2.task_json("r").unwrap();
        assert_eq!(t["child_ids"], json!([]), "{t}");
        assert!(t.get("parent_id").is_none(), "{t}");
        assert!(t.get("traceback").is_none() && t.get("exception").is_none(), "not shown as the success's: {t}");
        assert_eq!((t["retry_traceback"].as_str(), t["retry_number"].as_u64()), (Some("Traceback: boom"), Some(1)));
        assert_eq!(t["graph"]["edges"], json!([]), "no self-edge: {t}");
        assert_eq!(t["state"], json!("SUCCESS"));

        // As a prefork Celery worker sends them: the second retry's event after the success.
        let mut s = State::default();
        for (kind, at, extra) in [
            ("task-received", 1.0, json!({"retries": 0})),
            ("task-retried", 2.0, json!({"exception": "ValueError('not yet 0')"})),
            ("task-received", 3.0, json!({"retries": 1, "parent_id": "p"})),
            ("task-received", 5.0, json!({"retries": 2, "parent_id": "p"})),
            ("task-succeeded", 6.0, json!({"result": "40"})),
            ("task-retried", 4.0, json!({"exception": "ValueError('not yet 1')"})),
        ] {
            let mut e = json!({"type": kind, "hostname": "w", "uuid": "x", "timestamp": at});
            e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            s.apply_event(&ev(e)).unwrap();
        }
        let t = s.task_json("x").unwrap();
        assert_eq!(t["state"], json!("SUCCESS"), "a late retry does not undo the end: {t}");
        assert_eq!(t["retry_exception"], json!("ValueError('not yet 1')"), "{t}");
        assert_eq!((t["retry_number"].as_u64(), t["parent_id"].as_str()), (Some(2), Some("p")));
        assert_eq!(t["graph"]["nodes"][0]["state"], json!("SUCCESS"));
    }

    #[test]
    fn the_worker_filter_matches_a_part_of_the_name_and_the_id_filter_a_prefix_with_paging() {
        let mut s = State::default();
        for i in 0..450 {
            let host = if i % 3 == 0 { "alpha@host1" } else { "beta@host2" };
            s.apply_event(&ev(json!({"type": "task-received", "hostname": host, "uuid": format!("{i:04}-x")})))
                .unwrap();
        }
        let f = TaskFilter { worker: Some("alpha".into()), ..TaskFilter::default() };
        let page = s.tasks_json(&f, 100, 20);
        assert_eq!((page["matched"].as_u64(), page["tasks"].as_array().unwrap().len()), (Some(150), 20));
        assert_eq!(page["tasks"][0]["id"], json!("0147-x"), "the 101st newest alpha task: {page}");
        let f = TaskFilter { id: Some("001".into()), ..TaskFilter::default() };
        let page = s.tasks_json(&f, 0, 500);
        assert_eq!(page["matched"], json!(10));
        assert!(
            s.tasks_json(&TaskFilter { id: Some("x".into()), ..TaskFilter::default() }, 0, 5)["matched"] == json!(0)
        );
    }

    #[test]
    fn a_chain_and_a_chord_are_drawn_from_the_received_events_extra_keys() {
        let mut s = State::default();
        for v in [
            // chain(a, b, c): a names the rest of the chain.
            json!({"type": "task-received", "hostname": "w", "uuid": "a", "name": "t.a", "root_id": "a",
                "chain": [{"id": "b", "name": "t.b"}, {"id": "c", "name": "t.c"}]}),
            json!({"type": "task-succeeded", "hostname": "w", "uuid": "a"}),
            json!({"type": "task-received", "hostname": "w", "uuid": "b", "name": "t.b", "root_id": "a", "parent_id": "a",
                "chain": [{"id": "c", "name": "t.c"}]}),
            // chord([h1, h2], body) started by b.
            json!({"type": "task-received", "hostname": "w", "uuid": "h1", "name": "t.h", "root_id": "a", "parent_id": "b",
                "group": "g", "group_index": 0, "chord": {"id": "body", "name": "t.sum"}}),
            json!({"type": "task-received", "hostname": "w", "uuid": "h2", "name": "t.h", "root_id": "h2",
                "group": "g", "group_index": 1, "chord": {"id": "body", "name": "t.sum"}}),
        ] {
            s.apply_event(&ev(v)).unwrap();
        }
        let g = &s.task_json("h1").unwrap()["graph"];
        assert_eq!(g["root"], json!("a"));
        let edges: Vec<(String, String, String)> = g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["from"].as_str().unwrap().into(),
                    e["to"].as_str().unwrap().into(),
                    e["kind"].as_str().unwrap().into(),
                )
            })
            .collect();
        for want in [
            ("a", "b", "chain"),
            ("b", "c", "chain"),
            ("h1", "body", "chord"),
            ("h2", "body", "chord"),
            ("b", "h1", "parent"),
        ] {
            let want = (want.0.to_string(), want.1.to_string(), want.2.to_string());
            assert!(edges.contains(&want), "{want:?} missing from {edges:?}");
        }
        let body = g["nodes"].as_array().unwrap().iter().find(|n| n["id"] == json!("body")).cloned();
        assert_eq!(body, Some(json!({"id": "body", "name": "t.sum", "state": "PENDING"})), "not run yet");
        assert_eq!(
            g["groups"],
            json!([{"id": "g", "members": ["h1", "h2"], "chord": {"id": "body", "name": "t.sum"}}])
        );
    }

    #[test]
    fn a_python_celery_workers_processes_and_peak_rss_are_shown_from_its_stats() {
        let mut s = State::default();
        let stats = json!({"pid": 10, "pool": {"implementation": "celery.concurrency.prefork:TaskPool",
            "max-concurrency": 2, "processes": [11, 12]}, "rusage": {"maxrss": 40960}});
        s.apply_replies("stats", vec![("py@h".into(), stats)]);
        s.apply_replies("active", vec![("py@h".into(), json!([{"id": "t1", "name": "app.slow", "worker_pid": 12}]))]);
        let w = &s.workers_json()[0];
        assert_eq!(w["peak_rss_kib"], json!(40960));
        assert_eq!(w["software"], json!("py-celery"));
        let children = w["children"].as_array().unwrap();
        assert_eq!(children.len(), 2, "{w}");
        assert_eq!(
            (&children[0]["pid"], &children[0]["rss_kib"], &children[0]["task"]),
            (&json!(11), &Value::Null, &Value::Null)
        );
        assert_eq!(children[1]["task"], json!({"id": "t1", "name": "app.slow"}));
    }

    #[test]
    fn a_grown_celery_pool_reads_its_size_from_the_processes_and_a_group_id_lists_its_members() {
        let mut s = State::default();
        s.apply_event(&ev(json!({"type": "worker-heartbeat", "hostname": "py@h", "sw_ident": "py-celery"}))).unwrap();
        // Celery's stats after pool_grow: max-concurrency is still the start value.
        let stats = json!({"pid": 10, "pool": {"implementation": "celery.concurrency.prefork:TaskPool",
            "max-concurrency": 1, "processes": [11, 12]}});
        s.apply_replies("stats", vec![("py@h".into(), stats)]);
        let w = &s.workers_json()[0];
        assert_eq!((&w["concurrency"], w["children"].as_array().map(Vec::len)), (&json!(2), Some(2)), "{w}");

        for (id, index) in [("m1", 0), ("m2", 1)] {
            let received = json!({"type": "task-received", "hostname": "py@h", "uuid": id, "name": "t.add",
                "group": "g1", "group_index": index});
            s.apply_event(&ev(received)).unwrap();
        }
        let members = s.group_members("g1");
        assert_eq!(members.iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(), ["m1", "m2"]);
        assert!(s.group_members("nothing").is_empty());
    }

    #[test]
    fn a_task_past_its_soft_limit_or_asleep_in_a_syscall_is_hung() {
        let mut s = State::default();
        for id in ["soft", "futex", "busy", "young"] {
            s.apply_event(&ev(json!({"type": "task-started", "hostname": "w", "uuid": id}))).unwrap();
        }
        s.apply_replies(
            "active",
            vec![(
                "w".into(),
                json!([
                    {"id": "soft", "runtime": 3.0, "soft_time_left": -1.5, "proc_state": "R (running)"},
                    {"id": "futex", "runtime": 9.0, "proc_state": "S (sleeping)", "syscall": "futex", "blocked_on": "S (sleeping) in futex_wait, syscall futex"},
                    {"id": "busy", "runtime": 9.0, "proc_state": "R (running)", "syscall": null},
                    {"id": "young", "runtime": 1.0, "proc_state": "S (sleeping)", "syscall": "futex"},
                ]),
            )],
        );
        let hung = |id: &str| s.task_json(id).unwrap()["hung"].as_str().map(str::to_string);
        assert_eq!(hung("soft").as_deref(), Some("past its soft time limit by 1.5 s"));
        assert!(hung("futex").is_some_and(|h| h.contains("syscall futex")));
        assert_eq!((hung("busy"), hung("young")), (None, None));
    }
}
