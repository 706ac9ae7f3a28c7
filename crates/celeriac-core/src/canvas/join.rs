//! The chord join: each header task's part, and what the body gets once every part is in
//! (Celery's `celery/backends/redis.py` `on_chord_part_return` and `_unpack_chord_result`; the
//! other backends keep the same parts their own way).
//!
//! A part is Celery's Redis member, `[1, task_id, state, result]` as JSON, `result` being the
//! value or, for FAILURE and REVOKED, the exception object (`{"exc_type", "exc_message",
//! "exc_module"}`). When the last part is in, the parts in header order are either the body's
//! argument (the list of values) or a [`ChordError`] naming the first part that failed, which
//! Celery's worker stores as the body's FAILURE and reports to the body's errbacks.

use serde_json::Value;

use crate::pyrepr;
use crate::result::{ExceptionInfo, ResultMeta, TaskState};

/// A header task's part of its chord.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    /// The chord's group id (the header tasks' `group` header).
    pub group_id: String,
    /// The header task's id.
    pub task_id: String,
    /// Its place in the header (`group_index`), `None` when the message has none (Celery then
    /// sorts it after every indexed part: score `+inf`).
    pub group_index: Option<i64>,
    /// The final state.
    pub state: TaskState,
    /// The value, or the exception object.
    pub result: Value,
}

impl ChordPart {
    /// The part of the header task whose outcome is `meta`.
    pub fn of(group_id: &str, group_index: Option<i64>, meta: &ResultMeta) -> Self {
        ChordPart {
            group_id: group_id.to_string(),
            task_id: meta.task_id.clone(),
            group_index,
            state: meta.status,
            result: meta.result.clone(),
        }
    }

    /// Celery's member: `[1, task_id, state, result]`, written as Python's `json.dumps` writes it.
    pub fn encode(&self) -> Vec<u8> {
        let v = Value::Array(vec![
            Value::from(1),
            Value::String(self.task_id.clone()),
            Value::String(self.state.as_str().into()),
            self.result.clone(),
        ]);
        crate::pyjson::to_vec(&v).unwrap_or_default()
    }

    /// Read a member back.
    pub fn decode(group_id: &str, bytes: &[u8]) -> Result<Self, String> {
        let v = crate::pyjson::from_slice(bytes).map_err(|e| format!("a chord part that is not JSON: {e}"))?;
        match v {
            Value::Array(mut items) if items.len() == 4 => {
                let result = items.pop().unwrap_or(Value::Null);
                let state =
                    items[2].as_str().ok_or("a chord part whose state is not a string")?.parse::<TaskState>()?;
                let task_id = items[1].as_str().ok_or("a chord part whose task id is not a string")?.to_string();
                Ok(ChordPart { group_id: group_id.to_string(), task_id, group_index: None, state, result })
            }
            other => Err(format!("a chord part that is not [1, task_id, state, result]: {other}")),
        }
    }

    /// The score the part sorts by in Celery's sorted set: its index, `+inf` without one.
    pub fn score(&self) -> String {
        self.group_index.map_or_else(|| "+inf".to_string(), |i| i.to_string())
    }
}

/// Why a chord's body cannot run: a header task failed, or the join could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ChordError(pub String);

impl ChordError {
    /// As Celery stores it on the body's id: `celery.exceptions.ChordError`.
    pub fn to_exception(&self) -> ExceptionInfo {
        ExceptionInfo::new("ChordError", self.0.clone(), "celery.exceptions")
    }
}

/// The body's argument from every part, in header order: the list of values, or the error of the
/// first part that failed (`Dependency <id> raised <repr>`, Celery's text).
pub fn body_argument(parts: &[ChordPart]) -> Result<Value, ChordError> {
    let mut values = Vec::with_capacity(parts.len());
    for part in parts {
        if matches!(part.state, TaskState::Failure | TaskState::Revoked) {
            return Err(ChordError(format!("Dependency {} raised {}", part.task_id, exception_repr(&part.result))));
        }
        values.push(part.result.clone());
    }
    Ok(Value::Array(values))
}

/// Python's `repr` of a stored exception: `ValueError('boom')`.
pub fn exception_repr(result: &Value) -> String {
    match ExceptionInfo::from_value(result) {
        Some(exc) => {
            let args = match &exc.exc_message {
                Value::Array(items) => items.iter().map(pyrepr::repr).collect::<Vec<_>>().join(", "),
                Value::Null => String::new(),
                other => pyrepr::repr(other),
            };
            format!("{}({args})", exc.exc_type)
        }
        None => pyrepr::repr(result),
    }
}

/// What every [`ResultBackend`](crate::ResultBackend) that joins chords must do, checked on a
/// real one: for backend implementers' tests (celeriac's Redis and SQLite backends run it).
/// Uses fresh ids; returns what did not hold.
///
/// A chord of three: parts are counted once per task (a second store of the same part is not
/// counted), nothing completes before the last part, the last part completes it with every part
/// in header order and the claim, another caller then finds it claimed, and once cleared every
/// caller finds it done.
pub async fn check_join_contract(backend: &dyn crate::ResultBackend) -> Result<(), String> {
    use crate::backend::Joined;
    let gid = uuid::Uuid::new_v4().to_string();
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let meta = |i: usize| ResultMeta::success(&ids[i], Value::from(i as i64 * 10));
    let part = |i: usize| ChordPart::of(&gid, Some(i as i64), &meta(i));
    let store = |i: usize| async move {
        backend.store_chord_part(&meta(i), Default::default(), &part(i)).await.map(|(_, joined)| joined)
    };
    let err = |e: crate::BackendError| e.to_string();
    backend.set_chord_size(&gid, 3).await.map_err(err)?;
    // Out of order, and the middle part twice (a header task run again).
    for (step, i) in [2usize, 1, 1].into_iter().enumerate() {
        let joined = store(i).await.map_err(err)?;
        if joined != Joined::Waiting {
            return Err(format!("part {i} (store {step}) of 3 must wait, got {joined:?}"));
        }
    }
    let claim = match store(0).await.map_err(err)? {
        Joined::Complete { parts, claim } => {
            let got: Vec<(String, Value)> = parts.iter().map(|p| (p.task_id.clone(), p.result.clone())).collect();
            let want: Vec<(String, Value)> = (0..3).map(|i| (ids[i].clone(), Value::from(i as i64 * 10))).collect();
            if got != want {
                return Err(format!("the complete join must hold every part once, in header order: {got:?}"));
            }
            claim
        }
        other => return Err(format!("the last part must complete the chord with the claim, got {other:?}")),
    };
    match store(2).await.map_err(err)? {
        Joined::ClaimedElsewhere => {}
        other => {
            return Err(format!("a part stored again while the claim is held must find it claimed, got {other:?}"))
        }
    }
    backend.clear_chord(&gid, &claim).await.map_err(err)?;
    match store(0).await.map_err(err)? {
        Joined::Done => {}
        other => {
            return Err(format!("a part stored again after the chord was cleared must find it done, got {other:?}"))
        }
    }
    match backend.get(&ids[1]).await.map_err(err)? {
        Some(m) if m.status == TaskState::Success => Ok(()),
        other => Err(format!("a part's result is stored with it: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parts_are_celerys_members() {
        let meta = ResultMeta::success("t1", json!(4));
        let part = ChordPart::of("g", Some(2), &meta);
        assert_eq!(part.encode(), br#"[1, "t1", "SUCCESS", 4]"#.to_vec());
        assert_eq!(part.score(), "2");
        let back = ChordPart::decode("g", &part.encode()).unwrap();
        assert_eq!((back.task_id.as_str(), back.state, back.result), ("t1", TaskState::Success, json!(4)));
    }

    #[test]
    fn a_failed_part_is_a_chord_error_with_celerys_text() {
        let ok = ChordPart::of("g", Some(0), &ResultMeta::success("a", json!(1)));
        let exc = ExceptionInfo::new("ValueError", "boom", "builtins");
        let failed = ChordPart::of("g", Some(1), &ResultMeta::exception("b", TaskState::Failure, &exc, None));
        assert_eq!(body_argument(std::slice::from_ref(&ok)), Ok(json!([1])));
        assert_eq!(body_argument(&[ok, failed]), Err(ChordError("Dependency b raised ValueError('boom')".into())));
    }
}
