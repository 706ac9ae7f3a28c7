//! Task states and the stored result layout.
//!
//! A result is stored as Celery stores it (`celery-task-meta-<id>` on Redis):
//! `{"status", "result", "traceback", "children", "date_done", "task_id"}`. A failure's `result`
//! is `{"exc_type", "exc_message", "exc_module"}` so Python's `AsyncResult.get()` rebuilds the
//! exception, and celeriac's `get` reports its type and message.

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

    /// The message as one readable string (the arguments joined, as Python's `str(exc)` would).
    pub fn message(&self) -> String {
        match &self.exc_message {
            Value::String(s) => s.clone(),
            Value::Array(items) if items.len() == 1 => match &items[0] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            Value::Array(items) => format!("({})", items.iter().map(Value::to_string).collect::<Vec<_>>().join(", ")),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

/// A stored task result in Celery's layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// When the state was stored (ISO 8601, UTC).
    #[serde(default)]
    pub date_done: Option<String>,
    /// The task id.
    pub task_id: String,
    /// Extended fields (`name`, `args`, `kwargs`, `worker`, `retries`, `queue`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ResultMeta {
    /// A result with the given state and value, stamped now.
    pub fn new(task_id: impl Into<String>, status: TaskState, result: Value) -> Self {
        ResultMeta {
            status,
            result,
            traceback: None,
            children: Value::Array(Vec::new()),
            date_done: Some(now_iso()),
            task_id: task_id.into(),
            extra: Map::new(),
        }
    }

    /// A successful result.
    pub fn success(task_id: impl Into<String>, value: Value) -> Self {
        Self::new(task_id, TaskState::Success, value)
    }

    /// A failed (or retrying, or revoked) result carrying an exception.
    pub fn exception(task_id: impl Into<String>, status: TaskState, exc: &ExceptionInfo, traceback: Option<String>) -> Self {
        let mut meta = Self::new(task_id, status, serde_json::to_value(exc).unwrap_or(Value::Null));
        meta.traceback = traceback;
        meta
    }

    /// The exception, when the result holds one.
    pub fn exception_info(&self) -> Option<ExceptionInfo> {
        serde_json::from_value(self.result.clone()).ok()
    }

    /// Encode as JSON for storage, as Celery's backends write it (Python's `json.dumps`).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_value(self).ok().and_then(|v| crate::protocol::to_python_json(&v).ok()).unwrap_or_default()
    }

    /// Decode a stored result.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
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
    }
}
