//! What a finished task's embed asks for next (Celery's `celery/app/trace.py`: callbacks and the
//! rest of the chain after a success, errbacks after a failure; the chord body is joined by the
//! result backend, see [`super::join`]).
//!
//! [`Continuations::read`] never fails: each malformed part (a `chain` that is not a list, a
//! signature with no `task`, an unknown `subtask_type`) is left out and reported in
//! [`Continuations::problems`], with the id of the continuation when it has one, so the task's
//! own result still stands and the operator learns what was dropped.

use serde_json::Value;

use super::{Call, CanvasError, Shape, Signature};
use crate::Embed;

/// A part of an embed that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The embed field (`callbacks`, `errbacks`, `chain`, `chord`).
    pub field: &'static str,
    /// The id the continuation would have had (`options.task_id`), if it can be read.
    pub task_id: Option<String>,
    /// What is wrong.
    pub error: CanvasError,
}

/// The continuations of one task message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuations {
    /// Applied with the result after a success (`link`).
    pub callbacks: Vec<Signature>,
    /// Applied (or called) after a failure (`link_error`).
    pub errbacks: Vec<Signature>,
    /// The rest of the chain, last step first, as on the wire: the next step is the last one.
    pub chain: Vec<Signature>,
    /// The body of the chord this task is a header task of.
    pub chord: Option<Signature>,
    /// Parts left out, each with its reason.
    pub problems: Vec<Problem>,
}

impl Continuations {
    /// Read an embed.
    pub fn read(embed: &Embed) -> Self {
        let mut c = Continuations::default();
        c.callbacks = list(&embed.callbacks, "callbacks", &mut c.problems);
        c.errbacks = list(&embed.errbacks, "errbacks", &mut c.problems);
        c.chain = list(&embed.chain, "chain", &mut c.problems);
        if let Some(v) = &embed.chord {
            match Signature::from_value(v).and_then(|s| s.shape().map(|_| s)) {
                Ok(sig) => c.chord = Some(sig),
                Err(error) => c.problems.push(Problem { field: "chord", task_id: id_of(v), error }),
            }
        }
        c
    }

    /// What to apply after a SUCCESS with `value` of the task `task_id` in the workflow
    /// `root_id` (Celery's `trace_task`): one callback alone; several as Celery sends them, each
    /// group on its own and the others together as one new group; then the next step of the
    /// chain (its last element) with the rest of the chain (`chain`, possibly `[]`). Each is
    /// given the value first and `parent_id`/`root_id`.
    pub fn after_success(&self, value: &Value, task_id: &str, root_id: &str) -> Vec<(Signature, Call)> {
        let call = || Call::with_result(value.clone(), task_id, root_id);
        let mut out: Vec<(Signature, Call)> = Vec::new();
        match self.callbacks.as_slice() {
            [] => {}
            [one] => out.push((one.clone(), call())),
            many => {
                let (groups, others): (Vec<&Signature>, Vec<&Signature>) =
                    many.iter().partition(|s| matches!(s.shape(), Ok(Shape::Group(_))));
                out.extend(groups.into_iter().map(|g| (g.clone(), call())));
                if !others.is_empty() {
                    out.push((Signature::group(others.into_iter().cloned().collect()), call()));
                }
            }
        }
        if let Some((next, rest)) = self.chain.split_last() {
            let rest = Value::Array(rest.iter().map(Signature::to_value).collect());
            out.push((next.clone(), Call::next_step(value.clone(), rest, task_id, root_id)));
        }
        out
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.callbacks.is_empty() && self.errbacks.is_empty() && self.chain.is_empty() && self.chord.is_none()
    }
}

/// The errbacks of the failed task `failed_id`, as Celery sends those it does not call in its own
/// process (`celery/backends/base.py` `_call_task_errbacks`): all of them as one new group, each
/// given the failed id first, `parent_id` the failed id and `root_id` the workflow's.
pub fn errbacks_call(errbacks: &[Signature], failed_id: &str, root_id: &str) -> Option<(Signature, Call)> {
    if errbacks.is_empty() {
        return None;
    }
    let call = Call { args: vec![Value::String(failed_id.to_string())], ..Call::default() }.ids(failed_id, root_id);
    Some((Signature::group(errbacks.to_vec()), call))
}

/// What completes a chord (Celery's `on_chord_part_return` once every part is in).
#[derive(Debug, Clone, PartialEq)]
pub enum ChordFinish {
    /// Apply the body with the list of results.
    Body(Signature, Call),
    /// A header task failed: Celery's `chord_error_from_stack`. Send the body's errbacks (given
    /// the body's id), store `error` as the body's FAILURE, fail the rest of its chain.
    Failed {
        /// The body's id (a chain body's last step's).
        body_id: String,
        /// The error to store on it.
        error: super::join::ChordError,
        /// The body's errbacks, as one group given the body's id.
        errbacks: Option<(Signature, Call)>,
        /// The rest of the chain after the body (`options.chain`), to fail.
        chain: Vec<Signature>,
    },
}

/// What the worker that completed the chord of `body` does with its `parts` (in header order);
/// `task_id` and `root_id` are the completing header task's. The body's `parent_id` is that
/// task, its `root_id` its own option or the task's root (as Celery's `callback.delay` from
/// inside the header task fills them in).
pub fn finish_chord(body: &Signature, parts: &[super::join::ChordPart], task_id: &str, root_id: &str) -> ChordFinish {
    match super::join::body_argument(parts) {
        Ok(results) => ChordFinish::Body(body.clone(), Call::from_task(vec![results], task_id, root_id)),
        Err(error) => {
            let body_id = match body.shape() {
                Ok(Shape::Chain(steps)) => steps.last().and_then(|s| s.task_id()).map(str::to_string),
                _ => body.task_id().map(str::to_string),
            }
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let sigs = |name: &str| -> Vec<Signature> {
                match body.options.get(name) {
                    Some(Value::Array(items)) => items.iter().filter_map(|v| Signature::from_value(v).ok()).collect(),
                    Some(v @ Value::Object(_)) => Signature::from_value(v).ok().into_iter().collect(),
                    _ => Vec::new(),
                }
            };
            let errbacks = errbacks_call(&sigs("link_error"), &body_id, &body_id);
            ChordFinish::Failed { body_id, error, errbacks, chain: sigs("chain") }
        }
    }
}

/// The `options.task_id` of a signature-like value, if it has one.
fn id_of(v: &Value) -> Option<String> {
    v.get("options")?.get("task_id")?.as_str().map(str::to_string)
}

fn list(v: &Option<Value>, field: &'static str, problems: &mut Vec<Problem>) -> Vec<Signature> {
    let items: Vec<&Value> = match v {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        // Celery accepts a single signature where a list is expected for links.
        Some(one @ Value::Object(_)) if field != "chain" => vec![one],
        Some(other) => {
            problems.push(Problem {
                field,
                task_id: id_of(other),
                error: CanvasError::BadEmbed {
                    field,
                    reason: format!("expected a list of signatures, got {}", super::short(other)),
                },
            });
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match Signature::from_value(item).and_then(|s| s.shape().map(|_| s)) {
            Ok(sig) => out.push(sig),
            Err(error) => problems.push(Problem { field, task_id: id_of(item), error }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bad_part_is_named_and_the_rest_kept() {
        let embed = Embed {
            callbacks: Some(json!([{"task": "ok"}, {"args": [1], "options": {"task_id": "cb2"}}])),
            errbacks: None,
            chain: Some(json!({"task": "not-a-list"})),
            chord: Some(json!({"task": "body", "subtask_type": "weird", "options": {"task_id": "B"}})),
        };
        let c = Continuations::read(&embed);
        assert_eq!(c.callbacks.len(), 1);
        assert!(c.chain.is_empty() && c.chord.is_none());
        let fields: Vec<_> = c.problems.iter().map(|p| (p.field, p.task_id.clone())).collect();
        assert_eq!(fields, vec![("callbacks", Some("cb2".into())), ("chain", None), ("chord", Some("B".into()))]);
        assert!(matches!(c.problems[2].error, CanvasError::UnknownSubtaskType { .. }));
    }
}
