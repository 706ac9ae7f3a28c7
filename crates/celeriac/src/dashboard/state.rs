//! What the dashboard knows, kept in memory: workers (from heartbeats and events, and from the
//! `stats`/`active` replies polled every few seconds), queue depths, the most recent tasks
//! (bounded) and per-minute counts of successes and failures.
//!
//! Events are Celery's (`celery/events/state.py` reads the same fields): worker events
//! `worker-online`, `worker-heartbeat`, `worker-offline`; task events `task-sent`,
//! `task-received`, `task-started`, `task-succeeded`, `task-failed`, `task-retried`,
//! `task-revoked`, `task-rejected`. A task's `args`/`kwargs` are the reprs the sender wrote
//! (`argsrepr`), `result` the repr of the return value: text, shown as text.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{json, Map, Value};

/// How many tasks are kept; the oldest is forgotten first.
pub const MAX_TASKS: usize = 10_000;
/// A worker with no heartbeat for this long is shown offline (Celery's heartbeats come every 2 s).
pub const OFFLINE_AFTER_SECS: f64 = 10.0;
/// Minutes of throughput kept.
const MINUTES: usize = 60;

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
    /// Unix seconds of the last reply to a poll.
    replied: Option<f64>,
}

/// One task, merged from its events.
#[derive(Debug, Clone, Default)]
struct TaskView {
    fields: Map<String, Value>,
}

/// Everything the dashboard shows.
#[derive(Debug, Default)]
pub struct State {
    workers: BTreeMap<String, WorkerView>,
    tasks: HashMap<String, TaskView>,
    /// Task ids, oldest first, for the bound.
    order: VecDeque<String>,
    queues: Vec<Value>,
    /// (minute since the epoch, succeeded, failed), oldest first.
    minutes: VecDeque<(i64, u64, u64)>,
    /// The broker answered the last poll.
    pub connected: bool,
    /// Why the last poll failed.
    pub last_error: Option<String>,
    /// Bumped on every change; the live stream sends it.
    pub version: u64,
}

fn text<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

fn number(m: &Map<String, Value>, key: &str) -> Option<f64> {
    m.get(key).and_then(Value::as_f64)
}

/// A task event's type → the state it puts the task in (Celery's `TASK_EVENT_TO_STATE`).
fn task_state(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "task-sent" => "PENDING",
        "task-received" => "RECEIVED",
        "task-started" => "STARTED",
        "task-succeeded" => "SUCCESS",
        "task-failed" => "FAILURE",
        "task-retried" => "RETRY",
        "task-revoked" => "REVOKED",
        "task-rejected" => "REJECTED",
        _ => return None,
    })
}

/// Later states win over earlier ones when events come out of order (a `task-started` after a
/// `task-succeeded` from a batch); a retry starts the task over.
fn rank(state: &str) -> u8 {
    match state {
        "PENDING" => 0,
        "RECEIVED" => 1,
        "STARTED" => 2,
        "RETRY" => 1,
        _ => 3,
    }
}

impl State {
    /// Apply one event body (a JSON object from `celeryev`).
    pub fn apply_event(&mut self, ev: &Map<String, Value>) -> Result<(), EventError> {
        let kind = text(ev, "type").ok_or(EventError::Missing("type"))?;
        let host = text(ev, "hostname").ok_or(EventError::Missing("hostname"))?.to_string();
        let at = number(ev, "timestamp").unwrap_or_else(now);
        if let Some(rest) = kind.strip_prefix("worker-") {
            let w = self.workers.entry(host).or_default();
            match rest {
                "offline" => w.said_offline = true,
                _ => {
                    w.said_offline = false;
                    w.heartbeat = Some(at);
                    for (k, v) in ev {
                        if !matches!(k.as_str(), "type" | "hostname" | "clock" | "utcoffset") {
                            w.heartbeat_fields.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            self.version += 1;
            return Ok(());
        }
        let Some(state) = task_state(kind) else {
            return Ok(()); // Another kind of event (a future one): nothing to show.
        };
        let id = text(ev, "uuid").ok_or_else(|| EventError::NoTaskId(kind.to_string()))?.to_string();
        if !self.tasks.contains_key(&id) {
            self.order.push_back(id.clone());
            while self.order.len() > MAX_TASKS {
                if let Some(old) = self.order.pop_front() {
                    self.tasks.remove(&old);
                }
            }
        }
        let task = self.tasks.entry(id.clone()).or_default();
        let f = &mut task.fields;
        f.insert("id".into(), json!(id));
        let current = text(f, "state").unwrap_or("PENDING");
        if kind == "task-retried" || rank(state) >= rank(current) || kind == "task-revoked" {
            f.insert("state".into(), json!(state));
        }
        if kind != "task-sent" {
            f.insert("worker".into(), json!(host));
        }
        let stamp = match kind {
            "task-sent" => "sent",
            "task-received" => "received",
            "task-started" => "started",
            "task-retried" => "retried_at",
            _ => "finished",
        };
        f.insert(stamp.into(), json!(at));
        for (k, v) in ev {
            if matches!(
                k.as_str(),
                "type" | "hostname" | "clock" | "utcoffset" | "timestamp" | "uuid" | "local_received"
            ) || v.is_null()
            {
                continue;
            }
            // The worker's pid is the event's, not the task's.
            let key = if k == "pid" { "worker_pid" } else { k.as_str() };
            f.insert(key.into(), v.clone());
        }
        let minute = (at / 60.0).floor() as i64;
        match kind {
            "task-succeeded" => self.count(minute, 1, 0),
            "task-failed" => self.count(minute, 0, 1),
            _ => {}
        }
        self.version += 1;
        Ok(())
    }

    fn count(&mut self, minute: i64, ok: u64, failed: u64) {
        match self.minutes.iter_mut().find(|(m, ..)| *m == minute) {
            Some(slot) => {
                slot.1 += ok;
                slot.2 += failed;
            }
            None => {
                self.minutes.push_back((minute, ok, failed));
                self.minutes.make_contiguous().sort_by_key(|(m, ..)| *m);
                while self.minutes.len() > MINUTES {
                    self.minutes.pop_front();
                }
            }
        }
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
                _ => {}
            }
        }
        self.version += 1;
    }

    /// Record the broker's queue depths (`Broker::queues`).
    pub fn set_queues(&mut self, queues: Vec<Value>) {
        if self.queues != queues {
            self.queues = queues;
            self.version += 1;
        }
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
            .filter_map(|t| text(&t.fields, "routing_key").map(str::to_string))
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
                let children: Vec<Value> = pool
                    .and_then(|p| p["children"].as_array())
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
                    "concurrency": pool.map(|p| p["max-concurrency"].clone()),
                    "processed": w.heartbeat_fields.get("processed").cloned(),
                    "active_count": w.heartbeat_fields.get("active").cloned().unwrap_or_else(|| json!(active.len())),
                    "loadavg": w.heartbeat_fields.get("loadavg").cloned(),
                    "rss_kib": stats.map(|s| s["rss_kib"].clone()),
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

    /// The most recent tasks, newest first, that match every given filter (`state`, `name`,
    /// `worker`; exact, `name` also as a substring), at most `limit`.
    pub fn tasks_json(&self, filter: &TaskFilter, limit: usize) -> Value {
        let list: Vec<Value> = self
            .order
            .iter()
            .rev()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| filter.matches(&t.fields))
            .take(limit)
            .map(|t| self.with_diagnosis(Value::Object(t.fields.clone())))
            .collect();
        json!({"total": self.tasks.len(), "tasks": list})
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
            for key in ["blocked_on", "wchan", "runtime", "hard_time_left", "worker_pid"] {
                if !entry[key].is_null() {
                    task[key] = entry[key].clone();
                }
            }
        }
        task
    }

    /// One task as its events tell it, with the ids of tasks whose events name it as parent.
    pub fn task_json(&self, id: &str) -> Option<Value> {
        let t = self.tasks.get(id)?;
        let mut v = self.with_diagnosis(Value::Object(t.fields.clone()));
        let children: Vec<&String> = self
            .order
            .iter()
            .filter(|c| self.tasks.get(*c).is_some_and(|t| text(&t.fields, "parent_id") == Some(id)))
            .collect();
        v["child_ids"] = json!(children);
        Some(v)
    }

    /// Queue depths as the broker reported them.
    pub fn queues_json(&self) -> Value {
        Value::Array(self.queues.clone())
    }

    /// `[{minute, succeeded, failed}]`, `minute` in Unix seconds at its start.
    pub fn throughput_json(&self) -> Value {
        Value::Array(
            self.minutes
                .iter()
                .map(|(m, ok, failed)| json!({"minute": m * 60, "succeeded": ok, "failed": failed}))
                .collect(),
        )
    }
}

/// Filters of the task list; `None` matches all.
#[derive(Debug, Default)]
pub struct TaskFilter {
    /// Exact state, e.g. `FAILURE`.
    pub state: Option<String>,
    /// A part of the task's name.
    pub name: Option<String>,
    /// Exact worker node name.
    pub worker: Option<String>,
}

impl TaskFilter {
    fn matches(&self, f: &Map<String, Value>) -> bool {
        self.state.as_deref().is_none_or(|s| text(f, "state") == Some(s))
            && self.name.as_deref().is_none_or(|n| text(f, "name").is_some_and(|name| name.contains(n)))
            && self.worker.as_deref().is_none_or(|w| text(f, "worker") == Some(w))
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
        assert_eq!(s.throughput_json(), json!([{"minute": 60, "succeeded": 1, "failed": 0}]));
    }

    #[test]
    fn malformed_events_are_refused_with_the_reason() {
        let mut s = State::default();
        assert_eq!(s.apply_event(&ev(json!({"hostname": "w"}))), Err(EventError::Missing("type")));
        assert_eq!(
            s.apply_event(&ev(json!({"type": "task-started", "hostname": "w"}))),
            Err(EventError::NoTaskId("task-started".into()))
        );
        assert_eq!(s.tasks_json(&TaskFilter::default(), 10)["total"], json!(0));
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
        let failed = s.tasks_json(&filter, 3);
        assert_eq!(failed["total"], json!(MAX_TASKS));
        assert_eq!(failed["tasks"][0]["id"], json!((MAX_TASKS + 3).to_string()), "newest failure first");
        assert_eq!(failed["tasks"].as_array().unwrap().len(), 3);
    }
}
