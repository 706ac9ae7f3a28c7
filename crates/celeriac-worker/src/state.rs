//! What a worker holds right now, for remote inspection and control: every request it has taken
//! (reserved, held for its ETA, or running), the revoked task ids, per-task totals and rate
//! limits.
//!
//! A request is registered by [`WorkerState::track`] when it has been validated; the returned
//! [`Tracked`] travels with the request and unregisters it when dropped, whichever way the request
//! ends. The main loop and the executor each make one call ([`WorkerState::track`],
//! [`WorkerState::start`]); everything else reads.
//!
//! The revoked set is Celery's `LimitedSet(maxlen=50000, expires=10800)`: ids older than three
//! hours, or beyond the 50,000 newest, are forgotten. It holds the revokes this worker heard and
//! those recorded in the result backend ([`crate::revokes`]), so a restart forgets none.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::request::Request;

use celeriac_core::backend::{Revoke, REVOKES_MAX as REVOKED_MAX, REVOKE_EXPIRES as REVOKED_EXPIRES};

/// Where a request is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Taken from the broker, waiting for a pool slot.
    Reserved,
    /// Held until its ETA.
    Scheduled(DateTime<Utc>),
    /// Running since then.
    Active(DateTime<Utc>),
}

/// One request as `inspect` shows it.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// Positional arguments.
    pub args: Value,
    /// Keyword arguments.
    pub kwargs: Value,
    /// The queue it came from.
    pub queue: String,
    /// The exchange its message was published to (`""`: the default exchange).
    pub exchange: String,
    /// The routing key its message was published with.
    pub routing_key: String,
    /// Message priority.
    pub priority: u8,
    /// Delivered before.
    pub redelivered: bool,
    /// Its message was acknowledged as it started (a `--python-app` task that is not
    /// `acks_late`); otherwise it is acknowledged after its outcome.
    pub acknowledged: bool,
    /// Where it is.
    pub phase: Phase,
}

impl RequestInfo {
    /// Celery's `Request.info()`: what `inspect active/reserved` lists for a request.
    pub fn to_celery(&self, hostname: &str, worker_pid: Option<u32>) -> Value {
        let time_start = match self.phase {
            Phase::Active(t) => json!(t.timestamp_micros() as f64 / 1e6),
            _ => Value::Null,
        };
        let mut info = serde_json::Map::new();
        info.insert("id".into(), Value::from(self.id.as_str()));
        info.insert("name".into(), Value::from(self.name.as_str()));
        // Inserted, not put through `json!`: serde_json's `to_value` refuses a `NaN` argument.
        info.insert("args".into(), self.args.clone());
        info.insert("kwargs".into(), self.kwargs.clone());
        let rest = json!({
            "type": self.name,
            "hostname": hostname,
            "time_start": time_start,
            // Acks late unless it was acknowledged as it started (Celery's `acknowledged`).
            "acknowledged": self.acknowledged,
            "delivery_info": {
                "exchange": self.exchange,
                "routing_key": self.routing_key,
                "priority": self.priority,
                "redelivered": self.redelivered,
            },
            "worker_pid": worker_pid,
        });
        if let Value::Object(rest) = rest {
            info.extend(rest);
        }
        Value::Object(info)
    }
}

struct Entry {
    info: RequestInfo,
    /// Set to a signal number to terminate the task (async pool). Made when the task starts or
    /// is told to terminate, whichever is first: a channel is ~300 bytes, and most requests in
    /// a full window never start while they are tracked as reserved.
    terminate: Option<watch::Sender<Option<i32>>>,
}

#[derive(Default)]
struct Inner {
    /// Boxed: a table of a full window (1,024) holds 2,048 slots, and an entry is ~300 bytes.
    requests: HashMap<String, Box<Entry>>,
    revoked: HashMap<String, Instant>,
    revoked_order: VecDeque<(String, Instant)>,
    totals: BTreeMap<String, u64>,
    rate_limits: HashMap<String, RateLimit>,
    time_limits: HashMap<String, TimeLimits>,
}

/// A task's time limits in seconds, as remote control's `time_limit` sets them; they replace the
/// task's own (a message's `timelimit` header still wins, as in Celery).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TimeLimits {
    /// Soft limit: the task is told.
    pub soft: Option<f64>,
    /// Hard limit: the task is stopped.
    pub hard: Option<f64>,
}

/// A per-task rate limit: at most one start every `interval`.
#[derive(Debug, Clone)]
struct RateLimit {
    text: String,
    interval: Duration,
    next: Instant,
}

/// The worker's live state (see the module documentation).
#[derive(Default)]
pub struct WorkerState {
    inner: Mutex<Inner>,
}

/// Keeps a request registered until dropped.
pub struct Tracked {
    state: Arc<WorkerState>,
    id: String,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.state.lock().requests.remove(&self.id);
    }
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked").field("id", &self.id).finish()
    }
}

/// Parse a Celery rate limit: `10`, `10/s`, `100/m`, `1000/h` (tasks per second, minute or hour);
/// `0` or empty for none. Returns the interval between starts.
pub fn parse_rate(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let (n, per) = match t.split_once('/') {
        Some((n, unit)) => {
            let per = match unit.trim() {
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                other => return Err(format!("unknown rate unit {other:?} in {text:?} (use s, m or h)")),
            };
            (n, per)
        }
        None => (t, 1.0),
    };
    let n: f64 = n.trim().parse().map_err(|_| format!("{text:?} is not a rate limit (e.g. 10/s, 100/m, 1000/h)"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{text:?} is not a rate limit (e.g. 10/s, 100/m, 1000/h)"));
    }
    if n == 0.0 {
        return Ok(None);
    }
    Ok(Some(Duration::from_secs_f64(per / n)))
}

impl WorkerState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a validated request: reserved, or scheduled when it waits for an ETA.
    pub fn track(self: &Arc<Self>, req: &Request, eta: Option<DateTime<Utc>>) -> Tracked {
        let m = &req.delivery.message;
        let info = RequestInfo {
            id: req.headers.id.clone(),
            name: req.headers.task.clone(),
            args: Value::Array(req.body.args.clone()),
            kwargs: Value::Object(req.body.kwargs.clone()),
            queue: req.delivery.queue.clone(),
            exchange: req.delivery.exchange.clone(),
            routing_key: req.delivery.routing_key.clone(),
            priority: m.properties.priority.unwrap_or(0),
            redelivered: req.delivery.redelivered(),
            acknowledged: false,
            phase: eta.map_or(Phase::Reserved, Phase::Scheduled),
        };
        self.lock().requests.insert(info.id.clone(), Box::new(Entry { info, terminate: None }));
        Tracked { state: self.clone(), id: req.headers.id.clone() }
    }

    /// The request's message was acknowledged before its outcome (as it started).
    pub fn acknowledged(&self, id: &str) {
        if let Some(entry) = self.lock().requests.get_mut(id) {
            entry.info.acknowledged = true;
        }
    }

    /// The request starts running: counted in its task's total; returns what says when it is to
    /// be terminated (a signal number), for pools that terminate cooperatively.
    pub fn start(&self, id: &str) -> watch::Receiver<Option<i32>> {
        let mut inner = self.lock();
        let Some(entry) = inner.requests.get_mut(id) else {
            return watch::channel(None).1;
        };
        entry.info.phase = Phase::Active(Utc::now());
        let rx = entry.terminate.get_or_insert_with(|| watch::channel(None).0).subscribe();
        let name = entry.info.name.clone();
        *inner.totals.entry(name).or_default() += 1;
        rx
    }

    /// Every request, with where it is.
    pub fn requests(&self) -> Vec<RequestInfo> {
        let mut all: Vec<RequestInfo> = self.lock().requests.values().map(|e| e.info.clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Tasks started since the worker started, by name.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.lock().totals.clone()
    }

    /// Remember ids as revoked; returns those of them running now.
    pub fn revoke(&self, ids: &[String]) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.lock();
        for id in ids {
            inner.revoked.insert(id.clone(), now);
            inner.revoked_order.push_back((id.clone(), now));
        }
        // Forget the oldest beyond the limit and the expired.
        while let Some((id, at)) = inner.revoked_order.front().cloned() {
            if inner.revoked_order.len() <= REVOKED_MAX && now.duration_since(at) < REVOKED_EXPIRES {
                break;
            }
            inner.revoked_order.pop_front();
            if inner.revoked.get(&id) == Some(&at) {
                inner.revoked.remove(&id);
            }
        }
        ids.iter()
            .filter(|id| inner.requests.get(*id).is_some_and(|e| matches!(e.info.phase, Phase::Active(_))))
            .cloned()
            .collect()
    }

    /// Remember ids recorded as revoked elsewhere (the result backend), each as of its own time
    /// (`now` being the present in the same Unix seconds); ids already known are left as they
    /// are. Returns how many were new.
    pub fn revoke_recorded(&self, revokes: &[Revoke], now: f64) -> usize {
        let instant_now = Instant::now();
        let mut inner = self.lock();
        let mut added = 0;
        for r in revokes {
            if inner.revoked.contains_key(&r.task_id) {
                continue;
            }
            let age = Duration::try_from_secs_f64(now - r.at).unwrap_or_default();
            if age >= REVOKED_EXPIRES || inner.revoked_order.len() >= REVOKED_MAX {
                continue;
            }
            let at = instant_now.checked_sub(age).unwrap_or(instant_now);
            inner.revoked.insert(r.task_id.clone(), at);
            inner.revoked_order.push_back((r.task_id.clone(), at));
            added += 1;
        }
        added
    }

    /// Whether an id was revoked (within the last three hours).
    pub fn is_revoked(&self, id: &str) -> bool {
        self.lock().revoked.get(id).is_some_and(|at| at.elapsed() < REVOKED_EXPIRES)
    }

    /// The revoked ids remembered.
    pub fn revoked(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().revoked.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Ask a running task to stop (pools that terminate cooperatively watch this).
    pub fn terminate(&self, id: &str, signal: i32) {
        if let Some(e) = self.lock().requests.get_mut(id) {
            match &e.terminate {
                Some(tx) => {
                    tx.send_replace(Some(signal));
                }
                // Seen by the task when it starts, as a value sent before it subscribed would be.
                None => e.terminate = Some(watch::channel(Some(signal)).0),
            }
        }
    }

    /// Set (or with `None`, remove) a task's rate limit; `text` is how it was given.
    pub fn set_rate_limit(&self, task: &str, text: &str, interval: Option<Duration>) {
        let mut inner = self.lock();
        match interval {
            Some(interval) => {
                inner
                    .rate_limits
                    .insert(task.to_string(), RateLimit { text: text.to_string(), interval, next: Instant::now() });
            }
            None => {
                inner.rate_limits.remove(task);
            }
        }
    }

    /// Set the rate limits the registry's tasks declare ([`TaskOptions::rate_limit`]), as
    /// Celery's worker does at start-up; the tasks limited, with their limits. A limit that does
    /// not parse is an error naming the task and the value (Celery's worker does not start
    /// either).
    ///
    /// [`TaskOptions::rate_limit`]: celeriac_core::TaskOptions::rate_limit
    pub fn set_declared_rate_limits(&self, registry: &celeriac_core::Registry) -> Result<Vec<String>, String> {
        let mut limited = Vec::new();
        for name in registry.names() {
            let Some(text) = registry.get(name).and_then(|t| t.options().rate_limit) else { continue };
            let interval = parse_rate(&text).map_err(|e| format!("task {name}: rate_limit {e}"))?;
            if interval.is_some() {
                limited.push(format!("{name}={text}"));
            }
            self.set_rate_limit(name, &text, interval);
        }
        limited.sort_unstable();
        Ok(limited)
    }

    /// Set a task's time limits (remote control's `time_limit`).
    pub fn set_time_limits(&self, task: &str, limits: TimeLimits) {
        self.lock().time_limits.insert(task.to_string(), limits);
    }

    /// The time limits remote control set for a task, if it did.
    pub fn time_limits(&self, task: &str) -> Option<TimeLimits> {
        self.lock().time_limits.get(task).copied()
    }

    /// The rate limit set for a task, as given.
    pub fn rate_limit(&self, task: &str) -> Option<String> {
        self.lock().rate_limits.get(task).map(|r| r.text.clone())
    }

    /// How long a task about to start must wait for its rate limit; reserves its turn.
    pub fn rate_wait(&self, task: &str) -> Option<Duration> {
        let mut inner = self.lock();
        let limit = inner.rate_limits.get_mut(task)?;
        let now = Instant::now();
        let turn = limit.next.max(now);
        limit.next = turn + limit.interval;
        Some(turn - now).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_shows_python_numbers_in_arguments() {
        let info = RequestInfo {
            id: "i".into(),
            name: "t".into(),
            args: celeriac_core::pyjson::from_str("[NaN, 18446744073709551617, 1e+16]").unwrap(),
            kwargs: celeriac_core::pyjson::from_str(r#"{"x": -Infinity}"#).unwrap(),
            queue: "q".into(),
            exchange: String::new(),
            routing_key: "q".into(),
            priority: 0,
            redelivered: false,
            acknowledged: false,
            phase: Phase::Reserved,
        };
        let text = celeriac_core::pyjson::to_string(&info.to_celery("h", None)).unwrap();
        assert!(
            text.starts_with(r#"{"id": "i", "name": "t", "args": [NaN, 18446744073709551617, 1e+16], "kwargs": {"x": -Infinity}, "type": "t""#),
            "{text}"
        );
    }

    #[test]
    fn rates_parse_as_celery_writes_them() {
        assert_eq!(parse_rate("10/s").unwrap(), Some(Duration::from_millis(100)));
        assert_eq!(parse_rate("2/m").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(parse_rate("3600/h").unwrap(), Some(Duration::from_secs(1)));
        assert_eq!(parse_rate("4").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(parse_rate("0").unwrap(), None);
        assert_eq!(parse_rate("").unwrap(), None);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1/d").unwrap_err().contains("unit"));
    }

    #[test]
    fn declared_rate_limits_are_set_and_bad_ones_named() {
        struct Limited(&'static str, &'static str);
        impl celeriac_core::Task for Limited {
            fn name(&self) -> &str {
                self.0
            }
            fn options(&self) -> celeriac_core::TaskOptions {
                celeriac_core::TaskOptions { rate_limit: Some(self.1.into()), ..Default::default() }
            }
            fn call(
                &self,
                _: celeriac_core::TaskContext,
                _: Vec<Value>,
                _: serde_json::Map<String, Value>,
            ) -> celeriac_core::task::TaskFuture {
                Box::pin(async { Ok(Value::Null) })
            }
        }
        let mut registry = celeriac_core::Registry::new();
        registry.register_arc(Arc::new(Limited("a", "2/s")));
        registry.register_arc(Arc::new(Limited("b", "0")));
        let s = WorkerState::default();
        assert_eq!(s.set_declared_rate_limits(&registry).unwrap(), vec!["a=2/s".to_string()]);
        assert_eq!(s.rate_limit("a").as_deref(), Some("2/s"));
        assert_eq!(s.rate_limit("b"), None);
        registry.register_arc(Arc::new(Limited("c", "3/fortnight")));
        let e = WorkerState::default().set_declared_rate_limits(&registry).unwrap_err();
        assert!(e.contains("task c") && e.contains("3/fortnight"), "{e}");
    }

    #[test]
    fn rate_limits_space_starts() {
        let s = WorkerState::default();
        s.set_rate_limit("t", "1/s", Some(Duration::from_secs(1)));
        assert_eq!(s.rate_wait("t"), None);
        let second = s.rate_wait("t").unwrap();
        assert!(second > Duration::from_millis(900) && second <= Duration::from_secs(1), "{second:?}");
        assert_eq!(s.rate_wait("other"), None);
        s.set_rate_limit("t", "0", None);
        assert_eq!(s.rate_wait("t"), None);
    }

    #[test]
    fn a_terminate_sent_before_the_task_starts_is_seen_when_it_starts() {
        let state: Arc<WorkerState> = Default::default();
        let log = Default::default();
        let early = crate::ready::tests::request(1, &log);
        let _early = state.track(&early, None);
        state.terminate("id-1", 9);
        assert_eq!(*state.start("id-1").borrow(), Some(9));
        // One that starts first is told when it is terminated.
        let later = crate::ready::tests::request(2, &log);
        let _later = state.track(&later, None);
        let rx = state.start("id-2");
        assert_eq!(*rx.borrow(), None);
        state.terminate("id-2", 15);
        assert_eq!(*rx.borrow(), Some(15));
    }

    #[test]
    fn revoked_ids_are_remembered() {
        let s = WorkerState::default();
        assert!(!s.is_revoked("a"));
        assert!(s.revoke(&["a".into(), "b".into()]).is_empty());
        assert!(s.is_revoked("a") && s.is_revoked("b"));
        assert_eq!(s.revoked(), vec!["a", "b"]);
    }

    #[test]
    fn recorded_revokes_are_remembered_from_their_own_time() {
        let s = WorkerState::default();
        let now = 1_000_000.0;
        let recorded = [
            Revoke { task_id: "recent".into(), at: now - 60.0 },
            Revoke { task_id: "old".into(), at: now - REVOKED_EXPIRES.as_secs_f64() - 1.0 },
            Revoke { task_id: "future".into(), at: now + 5.0 },
        ];
        assert_eq!(s.revoke_recorded(&recorded, now), 2, "the expired one is not taken");
        assert!(s.is_revoked("recent") && s.is_revoked("future") && !s.is_revoked("old"));
        assert_eq!(s.revoke_recorded(&recorded, now), 0, "known ids are not added twice");
        assert_eq!(s.revoked(), vec!["future", "recent"]);
    }
}
