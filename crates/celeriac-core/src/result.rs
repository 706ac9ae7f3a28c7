//! Task states and the stored result layout.
//!
//! A result is stored as Celery stores it (`celery-task-meta-<id>` on Redis):
//! `{"status", "result", "traceback", "children", "date_done", ..., "task_id"}`, where `...` are
//! the optional request fields (`group_id`, `parent_id`, then the `result_extended` ones: `name`,
//! `args`, `kwargs`, `worker`, `retries`, `queue`) and `task_id` always comes last. `date_done`
//! is `null` for states that are not ready (STARTED, RETRY). A failure's `result` is
//! `{"exc_type", "exc_message", "exc_module"}`, `exc_message` being the exception's arguments, so
//! Python's `AsyncResult.get()` rebuilds the exception, and celeriac's `get` reports its type and
//! message.

use std::fmt;
use std::str::FromStr;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The state of a task, with Celery's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskState {
    /// Unknown to the backend: not run yet, or forgotten, or the id is wrong.
    Pending,
    /// Received by a worker.
    Received,
    /// Started by a worker.
    Started,
    /// Finished with a value.
    Success,
    /// Finished with an error.
    Failure,
    /// Failed and is to be retried.
    Retry,
    /// Revoked (or expired) before it ran.
    Revoked,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Received,
        TaskState::Started,
        TaskState::Success,
        TaskState::Failure,
        TaskState::Retry,
        TaskState::Revoked,
    ];

    /// Celery's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Retry => "RETRY",
            TaskState::Revoked => "REVOKED",
        }
    }

    /// Whether the task will not change state again.
    pub fn is_ready(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Failure | TaskState::Revoked)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown task state {s:?}"))
    }
}

/// An exception as Celery serializes it in a FAILURE (or RETRY) result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// The exception's type name, e.g. `ValueError` or `TimeLimitExceeded`.
    pub exc_type: String,
    /// The exception's arguments (Python's `exc.args`), usually one message string.
    pub exc_message: Value,
    /// The module defining the type, e.g. `builtins` or `celery.exceptions`.
    pub exc_module: String,
}

impl ExceptionInfo {
    /// A new exception with one message argument.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>, module: impl Into<String>) -> Self {
        ExceptionInfo { exc_type: exc_type.into(), exc_message: json!([message.into()]), exc_module: module.into() }
    }

    /// As Celery stores it: `{"exc_type", "exc_message", "exc_module"}`.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("exc_type".into(), Value::String(self.exc_type.clone()));
        m.insert("exc_message".into(), self.exc_message.clone());
        m.insert("exc_module".into(), Value::String(self.exc_module.clone()));
        Value::Object(m)
    }

    /// Read a stored exception (by hand: its arguments may hold any value, `NaN` included).
    pub fn from_value(v: &Value) -> Option<Self> {
        let m = v.as_object()?;
        Some(ExceptionInfo {
            exc_type: m.get("exc_type")?.as_str()?.to_string(),
            exc_message: m.get("exc_message")?.clone(),
            exc_module: m.get("exc_module")?.as_str()?.to_string(),
        })
    }

    /// The message as one readable string, as Python's `str(exc)` gives it: the one argument
    /// (`bad value`), the repr of the argument tuple when there are several
    /// (`('custom failure', 42)`), nothing when there are none.
    pub fn message(&self) -> String {
        match &self.exc_message {
            Value::String(s) => s.clone(),
            Value::Array(items) => match items.as_slice() {
                [] => String::new(),
                [Value::String(s)] => s.clone(),
                [other] => crate::pyrepr::repr(other),
                _ => crate::pyrepr::args_repr(items, true),
            },
            Value::Null => String::new(),
            other => crate::pyrepr::repr(other),
        }
    }
}

/// A stored task result in Celery's layout.
///
/// Read with [`ResultMeta::from_json`], not serde: a derived `Deserialize` would buffer the
/// flattened request fields and lose their numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultMeta {
    /// The state.
    pub status: TaskState,
    /// The return value, or an [`ExceptionInfo`] object for FAILURE and RETRY.
    #[serde(default)]
    pub result: Value,
    /// The formatted traceback (or error chain) for FAILURE.
    #[serde(default)]
    pub traceback: Option<String>,
    /// Subtasks (Celery stores their result tuples, or `null`; kept opaque here).
    #[serde(default)]
    pub children: Value,
    /// When a ready state was stored (ISO 8601, UTC); `None` for STARTED and RETRY.
    #[serde(default)]
    pub date_done: Option<String>,
    /// Request fields, written in this map's order before `task_id`: `group_id`, `parent_id`,
    /// then the extended ones (`name`, `args`, `kwargs`, `worker`, `retries`, `queue`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// The task id (declared last: Celery writes it last).
    pub task_id: String,
}

impl ResultMeta {
    /// A result with the given state and value, stamped now when the state is ready (Celery
    /// leaves `date_done` null otherwise).
    pub fn new(task_id: impl Into<String>, status: TaskState, result: Value) -> Self {
        ResultMeta {
            status,
            result,
            traceback: None,
            children: Value::Array(Vec::new()),
            date_done: status.is_ready().then(now_iso),
            extra: Map::new(),
            task_id: task_id.into(),
        }
    }

    /// A successful result.
    pub fn success(task_id: impl Into<String>, value: Value) -> Self {
        Self::new(task_id, TaskState::Success, value)
    }

    /// A failed (or retrying, or revoked) result carrying an exception.
    pub fn exception(
        task_id: impl Into<String>,
        status: TaskState,
        exc: &ExceptionInfo,
        traceback: Option<String>,
    ) -> Self {
        let mut meta = Self::new(task_id, status, exc.to_value());
        meta.traceback = traceback;
        meta
    }

    /// The exception, when the result holds one.
    pub fn exception_info(&self) -> Option<ExceptionInfo> {
        ExceptionInfo::from_value(&self.result)
    }

    /// Encode as JSON for storage, as Celery's backends write it (Python's `json.dumps`, numbers
    /// included: see [`crate::pyjson`]).
    pub fn to_json(&self) -> Vec<u8> {
        crate::pyjson::to_vec(&self.to_value()).unwrap_or_default()
    }

    /// The stored object, in Celery's key order. Built by hand: `serde_json::to_value` refuses a
    /// `NaN` in the result.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), Value::String(self.status.as_str().into()));
        m.insert("result".into(), self.result.clone());
        m.insert("traceback".into(), self.traceback.clone().map_or(Value::Null, Value::String));
        m.insert("children".into(), self.children.clone());
        m.insert("date_done".into(), self.date_done.clone().map_or(Value::Null, Value::String));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m.insert("task_id".into(), Value::String(self.task_id.clone()));
        Value::Object(m)
    }

    /// Decode a stored result, as Python's `json.loads` reads it (integers of any size, `NaN`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let value = crate::pyjson::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(mut m) = value else { return Err("not a JSON object".into()) };
        // `shift_remove`: the request fields left in `extra` keep their stored order.
        let mut text = |k: &str| -> Result<Option<String>, String> {
            match m.shift_remove(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(format!("{k} is not a string: {other}")),
            }
        };
        let status = text("status")?.ok_or("no status")?.parse::<TaskState>()?;
        let task_id = text("task_id")?.ok_or("no task_id")?;
        let traceback = text("traceback")?;
        let date_done = text("date_done")?;
        Ok(ResultMeta {
            status,
            result: m.shift_remove("result").unwrap_or(Value::Null),
            traceback,
            children: m.shift_remove("children").unwrap_or(Value::Null),
            date_done,
            extra: m,
            task_id,
        })
    }
}

/// The `traceback` stored with a failure, in the shape Celery stores Python's
/// (`traceback.format_exception`, `celery/app/trace.py`), which `AsyncResult.traceback` and Flower
/// show as text: a header, where it happened (a Rust task has no Python frames: its name and id,
/// then `detail`, indented, such as the error chain or where it panicked), and the exception's
/// `Type: message` as the last line.
///
/// ```text
/// Traceback (most recent call last):
///   Rust task images.fetch[3f1c...]
///     caused by: connection refused
/// IoError: could not fetch
/// ```
pub fn format_traceback(task: &str, id: &str, exc: &ExceptionInfo, detail: Option<&str>) -> String {
    let mut out = format!("Traceback (most recent call last):\n  Rust task {task}[{id}]\n");
    for line in detail.into_iter().flat_map(str::lines) {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    let message = exc.message();
    if message.is_empty() {
        out.push_str(&format!("{}\n", exc.exc_type));
    } else {
        out.push_str(&format!("{}: {message}\n", exc.exc_type));
    }
    out
}

/// The current time as Celery writes `date_done`.
pub fn now_iso() -> String {
    crate::protocol::format_datetime(Utc::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_by_name() {
        for st in TaskState::ALL {
            assert_eq!(st.as_str().parse::<TaskState>().unwrap(), st);
        }
        assert!("DONE".parse::<TaskState>().is_err());
    }

    #[test]
    fn exception_message_reads_like_python_str() {
        let e = ExceptionInfo::new("ValueError", "bad value", "builtins");
        assert_eq!(e.message(), "bad value");
        let meta = ResultMeta::exception("id", TaskState::Failure, &e, None);
        assert_eq!(meta.exception_info().unwrap(), e);
        let several = ExceptionInfo { exc_message: json!(["custom failure", 42]), ..e.clone() };
        assert_eq!(several.message(), "('custom failure', 42)");
        assert_eq!(ExceptionInfo { exc_message: json!([]), ..e.clone() }.message(), "");
        assert_eq!(ExceptionInfo { exc_message: json!([true]), ..e }.message(), "True");
    }

    #[test]
    fn tracebacks_read_like_pythons_and_end_with_the_exception() {
        let e = ExceptionInfo::new("IoError", "could not fetch", "std.io");
        let tb = format_traceback("images.fetch", "id-1", &e, Some("caused by: refused\ncaused by: os error 111"));
        assert_eq!(
            tb,
            "Traceback (most recent call last):\n  Rust task images.fetch[id-1]\n    caused by: refused\n    caused by: os error 111\nIoError: could not fetch\n"
        );
        let bare = ExceptionInfo { exc_message: json!([]), ..e };
        assert!(format_traceback("t", "i", &bare, None).ends_with("[i]\nIoError\n"));
    }

    #[test]
    fn stored_results_keep_every_number() {
        let value =
            crate::pyjson::from_str("[18446744073709551617, 123456789.12345679, 1e+16, -0.0, NaN, -Infinity]").unwrap();
        let mut meta = ResultMeta::success("id", value);
        meta.extra.insert("args".into(), crate::pyjson::from_str("[NaN, 100000000000000000000]").unwrap());
        let text = String::from_utf8(meta.to_json()).unwrap();
        assert!(
            text.starts_with(r#"{"status": "SUCCESS", "result": [18446744073709551617, 123456789.12345679, 1e+16, -0.0, NaN, -Infinity], "traceback": null"#),
            "{text}"
        );
        assert!(text.ends_with(r#", "args": [NaN, 100000000000000000000], "task_id": "id"}"#), "{text}");
        let back = ResultMeta::from_json(text.as_bytes()).unwrap();
        assert_eq!(back.to_json(), meta.to_json());
        let exc = ExceptionInfo {
            exc_message: crate::pyjson::from_str("[NaN]").unwrap(),
            ..ExceptionInfo::new("E", "", "m")
        };
        let failed = ResultMeta::exception("id", TaskState::Failure, &exc, None);
        assert_eq!(ResultMeta::from_json(&failed.to_json()).unwrap().exception_info().unwrap().message(), "nan");
    }

    #[test]
    fn layout_is_celerys() {
        let mut meta = ResultMeta::success("id", json!(1));
        assert!(meta.date_done.is_some());
        meta.extra.insert("group_id".into(), json!("g"));
        let text = String::from_utf8(meta.to_json()).unwrap();
        assert!(text.ends_with(r#", "group_id": "g", "task_id": "id"}"#), "{text}");
        assert_eq!(ResultMeta::from_json(text.as_bytes()).unwrap(), meta);
        assert_eq!(ResultMeta::new("id", TaskState::Started, json!({})).date_done, None);
        assert_eq!(ResultMeta::new("id", TaskState::Retry, json!({})).date_done, None);
    }
}
