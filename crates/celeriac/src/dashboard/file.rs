//! On an SQLite broker, which carries no events and no remote control, the dashboard reads the
//! file itself at each poll ([`celeriac_sqlite::read_snapshot`], a read-only connection; the file
//! is never created): the newest [`FILE_ROWS`] messages and results, turned into the task events
//! a worker would have sent, so they land in the same task list and pages.
//!
//! - a message that is not held is `task-sent` (PENDING; with its `eta` when `visible_at` is
//!   later than now: scheduled);
//! - a message a consumer holds (`owner`) is `task-received` from "consumer <owner>" (running or
//!   reserved: the file does not say which; the owner is a uuid per consumer, not a node name);
//! - a stored result is the event of its state (`task-succeeded`, `task-failed` with the
//!   exception as Python prints it and the traceback, `task-revoked`, `task-started`,
//!   `task-retried`), stamped with `date_done`, naming the worker, the task's name and
//!   arguments when the meta is extended (Celery's `result_extended`).
//!
//! Each task's row is applied again only when it changed (another state, another holder), so
//! outcomes are counted once. Workers are what the file tells: the consumers holding messages.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use celeriac_core::result::ResultMeta;
use celeriac_sqlite::{read_snapshot, Snapshot};
use serde_json::{json, Map, Value};

/// How many of the newest messages, and of the newest results, each poll reads.
pub const FILE_ROWS: usize = 2_000;

/// What the page says SQLite cannot show.
pub const NOTE: &str = "SQLite has no events or remote control: tasks are read from the file (the newest \
     2,000 messages and results); workers are the consumers holding messages, idle workers are not listed, \
     and a held task may be running or reserved";

/// Reads an SQLite broker file into task events, remembering what it already applied.
pub struct FileReader {
    path: PathBuf,
    /// Per task id: what was last applied (`sent`, `held:<owner>`, `result:<status>`).
    applied: HashMap<String, String>,
    /// Per task id: the worker (or consumer) last named, for a result whose meta names none.
    hosts: HashMap<String, String>,
}

/// One poll's reading: the events to apply, and the page's note with the consumers seen.
pub struct Reading {
    /// Task events in the order to apply them.
    pub events: Vec<Map<String, Value>>,
    /// `{note, consumers: [{consumer, holding, queues}]}`.
    pub summary: Value,
}

impl FileReader {
    /// A reader of the SQLite broker file at `path`.
    pub fn new(path: PathBuf) -> Self {
        FileReader { path, applied: HashMap::new(), hosts: HashMap::new() }
    }

    /// Read the file (on a blocking thread) into what changed since the last poll.
    ///
    /// # Errors
    /// The file cannot be read (missing, locked past 5 s, not a celeriac database): the reason.
    pub async fn poll(&mut self) -> Result<Reading, String> {
        let path = self.path.clone();
        let snapshot = tokio::task::spawn_blocking(move || read_snapshot(&path, FILE_ROWS))
            .await
            .map_err(|e| format!("reading {} stopped: {e}", self.path.display()))?
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        Ok(self.read(&snapshot, chrono::Utc::now().timestamp_millis()))
    }

    /// The events and summary of `snapshot`, read at `now_ms` (Unix milliseconds).
    pub fn read(&mut self, snapshot: &Snapshot, now_ms: i64) -> Reading {
        let mut events = Vec::new();
        let mut seen = HashSet::new();
        let mut consumers: HashMap<String, (u64, Vec<String>)> = HashMap::new();
        // Oldest first, so a task's earlier row comes before its later one.
        for m in snapshot.messages.iter().rev() {
            let Ok(message) = celeriac_core::envelope::decode(&m.payload) else {
                continue; // Not a task message celeriac can read: nothing to show.
            };
            let Some(id) = message.task_id().map(str::to_string) else { continue };
            seen.insert(id.clone());
            let h = &message.headers;
            let mut ev = Map::new();
            ev.insert("uuid".into(), json!(id));
            ev.insert("timestamp".into(), json!(m.published_at_ms as f64 / 1000.0));
            if let Some(name) = message.task_name() {
                ev.insert("name".into(), json!(name));
            }
            for (from, to) in [
                ("argsrepr", "args"),
                ("kwargsrepr", "kwargs"),
                ("root_id", "root_id"),
                ("parent_id", "parent_id"),
                ("group", "group"),
            ] {
                if let Some(v) = h.get(from).filter(|v| !v.is_null()) {
                    ev.insert(to.into(), v.clone());
                }
            }
            let key = match &m.owner {
                Some(owner) => {
                    let label = format!("consumer {owner}");
                    let c = consumers.entry(label.clone()).or_default();
                    c.0 += 1;
                    if !c.1.contains(&m.queue) {
                        c.1.push(m.queue.clone());
                    }
                    ev.insert("type".into(), json!("task-received"));
                    ev.insert("hostname".into(), json!(label));
                    self.hosts.insert(id.clone(), label);
                    format!("held:{owner}")
                }
                None => {
                    ev.insert("type".into(), json!("task-sent"));
                    ev.insert("hostname".into(), json!(""));
                    ev.insert("queue".into(), json!(m.queue));
                    if m.visible_at_ms > now_ms {
                        let eta = chrono::DateTime::from_timestamp_millis(m.visible_at_ms).map(|t| t.to_rfc3339());
                        ev.insert("eta".into(), json!(eta));
                        "scheduled".to_string()
                    } else {
                        "sent".to_string()
                    }
                }
            };
            if self.applied.get(&id) != Some(&key) {
                self.applied.insert(id, key);
                events.push(ev);
            }
        }
        for r in snapshot.results.iter().rev() {
            seen.insert(r.task_id.clone());
            let key = format!("result:{}", r.status);
            if self.applied.get(&r.task_id) == Some(&key) {
                continue;
            }
            let Ok(meta) = ResultMeta::from_json(&r.meta) else { continue };
            let Some(ev) = self.result_event(&r.task_id, &meta, r.stored_at_ms) else { continue };
            self.applied.insert(r.task_id.clone(), key);
            events.push(ev);
        }
        // Bounded: only the tasks still in the newest rows are remembered.
        self.applied.retain(|id, _| seen.contains(id));
        self.hosts.retain(|id, _| seen.contains(id));
        let mut consumers: Vec<Value> = consumers
            .into_iter()
            .map(|(consumer, (holding, queues))| json!({"consumer": consumer, "holding": holding, "queues": queues}))
            .collect();
        consumers.sort_by(|a, b| a["consumer"].as_str().cmp(&b["consumer"].as_str()));
        Reading { events, summary: json!({"note": NOTE, "consumers": consumers}) }
    }

    /// The event a stored result stands for; `None` for a state no event shows (PENDING).
    fn result_event(&mut self, id: &str, meta: &ResultMeta, stored_at_ms: i64) -> Option<Map<String, Value>> {
        let kind = match meta.status.as_str() {
            "SUCCESS" => "task-succeeded",
            "FAILURE" => "task-failed",
            "REVOKED" => "task-revoked",
            "STARTED" => "task-started",
            "RETRY" => "task-retried",
            "REJECTED" => "task-rejected",
            _ => return None,
        };
        let extra = &meta.extra;
        let host = extra
            .get("worker")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| self.hosts.get(id).cloned())
            .unwrap_or_default();
        let mut ev = Map::new();
        ev.insert("type".into(), json!(kind));
        ev.insert("uuid".into(), json!(id));
        ev.insert("hostname".into(), json!(host));
        ev.insert("timestamp".into(), json!(stored_at_ms as f64 / 1000.0));
        if let Some(name) = extra.get("name").filter(|v| v.is_string()) {
            ev.insert("name".into(), name.clone());
        }
        for key in ["args", "kwargs"] {
            if let Some(v) = extra.get(key).filter(|v| !v.is_null()) {
                ev.insert(key.into(), json!(v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())));
            }
        }
        for key in ["parent_id", "group_id", "queue"] {
            if let Some(v) = extra.get(key).filter(|v| v.is_string()) {
                ev.insert(if key == "group_id" { "group".into() } else { key.into() }, v.clone());
            }
        }
        match kind {
            "task-succeeded" => {
                ev.insert("result".into(), json!(meta.result.to_string()));
            }
            "task-failed" | "task-retried" => {
                ev.insert("exception".into(), json!(exception_text(&meta.result)));
                if let Some(tb) = &meta.traceback {
                    ev.insert("traceback".into(), json!(tb));
                }
            }
            _ => {}
        }
        Some(ev)
    }
}

/// A stored exception (`{exc_type, exc_message}`, Celery's `celery/backends/base.py`
/// `prepare_exception`) as Python prints it: `ValueError('no')`.
fn exception_text(result: &Value) -> String {
    let Some(kind) = result.get("exc_type").and_then(Value::as_str) else { return result.to_string() };
    let args = match result.get("exc_message") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(v) => vec![v.clone()],
    };
    let args: Vec<String> = args
        .iter()
        .map(|a| match a {
            Value::String(s) => format!("'{s}'"),
            other => other.to_string(),
        })
        .collect();
    format!("{kind}({})", args.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::protocol::{Message, TaskBody, TaskHeaders};
    use celeriac_core::result::TaskState;
    use celeriac_sqlite::{StoredMessage, StoredResult};

    fn message(id: &str, owner: Option<&str>, visible_at_ms: i64) -> StoredMessage {
        let h = TaskHeaders::new("t.add", id);
        let m = Message::new_task(&h, &TaskBody::default(), None, None).unwrap();
        StoredMessage {
            queue: "celery".into(),
            visible_at_ms,
            owner: owner.map(str::to_string),
            published_at_ms: 1_000,
            payload: celeriac_core::envelope::encode(&m, "", "celery", "1"),
        }
    }

    #[test]
    fn rows_become_events_once_each_and_held_messages_name_their_consumer() {
        let mut reader = FileReader::new("unused.db".into());
        let done = ResultMeta::new("done", TaskState::Success, json!(5));
        let snapshot = Snapshot {
            // Newest first, as read.
            messages: vec![
                message("later", None, 10_000),
                message("held", Some("c1"), 2_000),
                message("ready", None, 500),
            ],
            results: vec![StoredResult {
                task_id: "done".into(),
                status: "SUCCESS".into(),
                stored_at_ms: 900,
                meta: done.to_json(),
            }],
        };
        let r = reader.read(&snapshot, 1_000);
        let kinds: Vec<(&str, &str)> =
            r.events.iter().map(|e| (e["uuid"].as_str().unwrap(), e["type"].as_str().unwrap())).collect();
        assert_eq!(
            kinds,
            [("ready", "task-sent"), ("held", "task-received"), ("later", "task-sent"), ("done", "task-succeeded")]
        );
        assert!(r.events[2]["eta"].is_string(), "a scheduled message carries its ETA");
        assert_eq!(r.events[1]["hostname"], json!("consumer c1"));
        assert_eq!(r.events[3]["result"], json!("5"));
        assert_eq!(r.summary["consumers"], json!([{"consumer": "consumer c1", "holding": 1, "queues": ["celery"]}]));
        // The same rows again: nothing new, so an outcome is counted once.
        assert!(reader.read(&snapshot, 1_000).events.is_empty());
    }

    #[test]
    fn a_stored_exception_reads_as_python_prints_it() {
        assert_eq!(exception_text(&json!({"exc_type": "ValueError", "exc_message": ["no", 3]})), "ValueError('no', 3)");
    }
}
