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
//! Sending never blocks a task: events go through a bounded channel to one publishing task, which
//! sends the task events already waiting as one list on `task.multi` (as Celery's worker buffers
//! them; every receiver accepts lists); when the broker is away they are dropped (counted, and
//! logged once per outage), as a monitor cannot use stale events anyway.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{Binding, Broker, ExchangeKind, ExchangeSpec, Message, Properties};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

/// The events exchange.
pub const EXCHANGE: &str = "celeryev";
/// Seconds between heartbeats (Celery's default `freq`).
pub const HEARTBEAT_FREQ: f64 = 2.0;
/// What `sw_ident` says.
pub const SW_IDENT: &str = "celeriac";
/// Events waiting to be published before new ones are dropped.
const QUEUE: usize = 10_000;

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

/// Sends a worker's events (see the module documentation). Cheap to call from any task.
pub struct Dispatcher {
    hostname: String,
    pid: u32,
    clock: AtomicU64,
    task_events: AtomicBool,
    tx: mpsc::Sender<(String, Map<String, Value>)>,
    dropped: AtomicU64,
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
        let (tx, rx) = mpsc::channel(QUEUE);
        let dispatcher = Arc::new(Dispatcher {
            hostname: hostname.to_string(),
            pid: std::process::id(),
            clock: AtomicU64::new(0),
            task_events: AtomicBool::new(config.task_events),
            tx,
            dropped: AtomicU64::new(0),
            broker: broker.clone(),
            spec: exchange(fanout),
        });
        let handle = tokio::spawn(publish_loop(broker, exchange(fanout), hostname.to_string(), rx));
        Some((dispatcher, handle))
    }

    /// Wait (up to 2 s) for queued events to go out, then publish `kind` (`worker-offline`) at
    /// once: the last event of this worker.
    pub async fn stop(&self, kind: &str, fields: Map<String, Value>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.tx.capacity() < self.tx.max_capacity() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
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

    /// The body of an event of this worker (advances the clock).
    pub fn body(&self, kind: &str, fields: Map<String, Value>) -> Map<String, Value> {
        let clock = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        event_body(kind, &self.hostname, self.pid, clock, fields)
    }

    /// Queue an event; never waits. Dropped (and counted) if the queue is full.
    pub fn send(&self, kind: &str, fields: Map<String, Value>) {
        let body = self.body(kind, fields);
        if self.tx.try_send((kind.to_string(), body)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(dropped = n + 1, "event queue full or closed: events dropped");
            }
        }
    }

    /// Queue a task event (`task-…`) if task events are on; `uuid` first, as Celery's
    /// `Request.send_event`.
    pub fn task(&self, kind: &str, uuid: &str, fields: Vec<(&str, Value)>) {
        if !self.task_events() {
            return;
        }
        let mut map = Map::new();
        map.insert("uuid".into(), Value::from(uuid));
        for (k, v) in fields {
            map.insert(k.to_string(), v);
        }
        self.send(kind, map);
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

/// Most task events sent in one `task.multi` message.
const MAX_BATCH: usize = 200;

/// Publish queued events until the queue closes. Task events already waiting are sent together as
/// one list on `task.multi`, as Celery's worker buffers them (its `buffer_group=['task']`), so a
/// busy worker costs the broker one message per batch rather than three per task; nothing waits
/// to fill a batch. Worker events go one by one.
async fn publish_loop(
    broker: Arc<dyn Broker>,
    spec: ExchangeSpec,
    hostname: String,
    mut rx: mpsc::Receiver<(String, Map<String, Value>)>,
) {
    let mut failing = false;
    let mut tasks: Vec<Value> = Vec::new();
    while let Some(first) = rx.recv().await {
        let Some(exchanges) = broker.exchanges() else { return };
        let mut single = Vec::new();
        let mut next = Some(first);
        while let Some((kind, body)) = next.take() {
            if kind.starts_with("task-") {
                tasks.push(Value::Object(body));
            } else {
                single.push((routing_key(&kind), Value::Object(body)));
            }
            if tasks.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        match tasks.len() {
            0 => {}
            1 => single.push((routing_key(tasks[0]["type"].as_str().unwrap_or("task")), tasks.remove(0))),
            _ => single.push(("task.multi".to_string(), Value::Array(std::mem::take(&mut tasks)))),
        }
        for (key, body) in single {
            let message = event_message(&hostname, &body);
            let outcome =
                tokio::time::timeout(Duration::from_secs(5), exchanges.publish_to(&spec, &key, &message)).await;
            match outcome {
                Ok(Ok(())) => {
                    if failing {
                        tracing::info!("events are published again");
                        failing = false;
                    }
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(error = %e, events = %key, "cannot publish events; dropping them until the broker answers");
                        failing = true;
                    }
                }
                Err(_) => {
                    if !failing {
                        tracing::warn!(events = %key, "publishing events timed out; dropping them until the broker answers");
                        failing = true;
                    }
                }
            }
        }
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
