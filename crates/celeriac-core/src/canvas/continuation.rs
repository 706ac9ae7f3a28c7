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
use crate::pyjson::RawJson;
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
    /// The rest of the chain: its next step, and the steps after it as their text.
    pub chain: Option<ChainRest>,
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
        c.chain = embed.chain.as_ref().and_then(|text| ChainRest::read(text, &mut c.problems));
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
        if let Some(chain) = &self.chain {
            out.push((chain.next.clone(), Call::next_step(value.clone(), chain.after.clone(), task_id, root_id)));
        }
        out
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.callbacks.is_empty() && self.errbacks.is_empty() && self.chain.is_none() && self.chord.is_none()
    }
}

/// The rest of a chain as a step's message carries it (`chain`, last step first): the next step
/// read, the steps after it kept as the JSON text they came in (each step decodes one step and
/// passes the rest on byte for byte, so a chain of N steps costs N reads of one step, not N²).
#[derive(Debug, Clone, PartialEq)]
pub struct ChainRest {
    /// The next step (the list's last element).
    pub next: Signature,
    /// The steps after it, last first: a JSON list, possibly `[]`.
    pub after: RawJson,
    /// How many steps are left, the next one included.
    pub len: usize,
}

impl ChainRest {
    /// Read the rest of a chain: `None` when it is empty or holds no step that can be read.
    /// A next step that cannot be read is reported in `problems` and skipped (the one before it
    /// is next); the steps after the next one are read when their turn comes.
    fn read(text: &RawJson, problems: &mut Vec<Problem>) -> Option<ChainRest> {
        let bad_list = |problems: &mut Vec<Problem>, v: &Value| {
            problems.push(Problem {
                field: "chain",
                task_id: id_of(v),
                error: CanvasError::BadEmbed {
                    field: "chain",
                    reason: format!("expected a list of signatures, got {}", super::short(v)),
                },
            })
        };
        let read_step = |v: &Value, problems: &mut Vec<Problem>| match Signature::from_value(v)
            .and_then(|s| s.shape().map(|_| s))
        {
            Ok(sig) => Some(sig),
            Err(error) => {
                problems.push(Problem { field: "chain", task_id: id_of(v), error });
                None
            }
        };
        if let Some(items) = text.items() {
            // Strict JSON (the common case): decode steps from the end until one reads.
            let mut left = items.len();
            while left > 0 {
                left -= 1;
                let step = crate::pyjson::from_str(items[left].get()).unwrap_or(Value::Null);
                if let Some(next) = read_step(&step, problems) {
                    let after = RawJson::list(items[..left].iter().map(|i| i.get()));
                    return Some(ChainRest { next, after, len: left + 1 });
                }
            }
            return None;
        }
        // Text strict JSON refuses (`NaN` in a step, or not a list at all).
        let mut steps = match text.to_value() {
            Ok(Value::Array(steps)) => steps,
            Ok(other) => {
                bad_list(problems, &other);
                return None;
            }
            Err(e) => {
                bad_list(problems, &Value::String(e.to_string()));
                return None;
            }
        };
        while let Some(step) = steps.pop() {
            if let Some(next) = read_step(&step, problems) {
                let len = steps.len() + 1;
                return Some(ChainRest { next, after: RawJson::from_value(&Value::Array(steps)), len });
            }
        }
        None
    }

    /// Every step left, last first as on the wire (the next one last); steps after the next one
    /// that cannot be read are left out. For failing the chain: each step's id gets the FAILURE.
    pub fn steps(&self) -> Vec<Signature> {
        let mut steps: Vec<Signature> = match self.after.to_value() {
            Ok(Value::Array(items)) => items.iter().filter_map(|v| Signature::from_value(v).ok()).collect(),
            _ => Vec::new(),
        };
        steps.push(self.next.clone());
        steps
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
        Some(one @ Value::Object(_)) => vec![one],
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
            chain: Some(RawJson::from_value(&json!({"task": "not-a-list"}))),
            chord: Some(json!({"task": "body", "subtask_type": "weird", "options": {"task_id": "B"}})),
        };
        let c = Continuations::read(&embed);
        assert_eq!(c.callbacks.len(), 1);
        assert!(c.chain.is_none() && c.chord.is_none());
        let fields: Vec<_> = c.problems.iter().map(|p| (p.field, p.task_id.clone())).collect();
        assert_eq!(fields, vec![("callbacks", Some("cb2".into())), ("chain", None), ("chord", Some("B".into()))]);
        assert!(matches!(c.problems[2].error, CanvasError::UnknownSubtaskType { .. }));
    }

    #[test]
    fn the_next_step_is_read_and_the_rest_kept_as_text() {
        let step = |id: &str| json!({"task": "add", "args": [1], "options": {"task_id": id}});
        let text = RawJson::from_value(&json!([step("C"), step("B"), step("A")]));
        let embed = Embed { chain: Some(text), ..Embed::default() };
        let c = Continuations::read(&embed);
        let chain = c.chain.as_ref().unwrap();
        assert_eq!((chain.next.task_id(), chain.len), (Some("A"), 3));
        assert_eq!(chain.after.to_value().unwrap(), json!([step("C"), step("B")]));
        let ids: Vec<_> = chain.steps().iter().map(|s| s.task_id().unwrap().to_string()).collect();
        assert_eq!(ids, ["C", "B", "A"]);
        // Passed on as the next step's `chain`.
        let after = c.after_success(&json!(2), "P", "R");
        assert_eq!(after.len(), 1);
        assert_eq!((after[0].0.task_id(), after[0].1.args.clone()), (Some("A"), vec![json!(2)]));
        assert_eq!(after[0].1.chain.as_ref().unwrap().as_str(), chain.after.as_str());

        // A next step that cannot be read is reported and skipped; NaN is read too.
        let text = RawJson::from_value(&json!([step("B"), {"args": [], "options": {"task_id": "bad"}}]));
        let c = Continuations::read(&Embed { chain: Some(text), ..Embed::default() });
        assert_eq!(c.chain.as_ref().unwrap().next.task_id(), Some("B"));
        assert_eq!(c.chain.as_ref().unwrap().after.to_value().unwrap(), json!([]));
        assert_eq!(c.problems.iter().map(|p| p.task_id.clone()).collect::<Vec<_>>(), vec![Some("bad".to_string())]);
        let nan = format!(r#"[{}, {{"task": "x", "args": [NaN], "options": {{"task_id": "N"}}}}]"#, step("B"));
        let body = format!(r#"[[], {{}}, {{"chain": {nan}}}]"#);
        let body = crate::TaskBody::decode(body.as_bytes(), crate::protocol::CONTENT_TYPE_JSON, "utf-8").unwrap();
        let c = Continuations::read(&body.embed);
        let chain = c.chain.unwrap();
        assert_eq!((chain.next.task_id(), chain.next.args[0].to_string()), (Some("N"), "NaN".to_string()));
        assert_eq!(chain.after.to_value().unwrap(), json!([step("B")]));
        // An empty rest is no chain.
        let c = Continuations::read(&Embed { chain: Some(RawJson::from_value(&json!([]))), ..Embed::default() });
        assert!(c.chain.is_none() && c.problems.is_empty());
    }
}
