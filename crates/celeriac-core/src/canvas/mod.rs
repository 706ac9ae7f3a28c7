//! Celery's canvas: signatures and the workflows built from them (chain, group, chord, link,
//! link_error), in Celery's JSON form, so a workflow built in Rust can be carried out by a Python
//! worker and the other way round.
//!
//! - [`Signature`]: one signature dict, `{"task", "args", "kwargs", "options", "subtask_type",
//!   "immutable"}` (Celery's `celery/canvas.py` `Signature`, serialized as `dict(sig)`), with the
//!   keys it does not know kept in place. [`Signature::shape`] reads what it stands for: a task, a
//!   chain (`kwargs.tasks`), a group (`kwargs.tasks`) or a chord (`kwargs.header`, `kwargs.body`).
//! - [`apply`]: what applying a signature publishes, as Celery's `Signature.apply_async`, `_chain.run`,
//!   `group.apply_async` and `chord.run` do: the messages in publish order, the chord sizes to
//!   record before them, and the result handle ([`ResultRef`]) whose tuple goes in the parent's
//!   `children`.
//! - [`continuation`]: what a finished task's embed asks for next (callbacks, the rest of its
//!   chain, errbacks), read out of a message's embed with every malformed part named.
//! - [`join`]: a chord header task's part of the join (`[1, task_id, state, result]`, Celery's
//!   Redis member) and the body's arguments once every part is in.
//!
//! Nothing here talks to a broker or a backend: the worker and the client carry the plans out.

mod apply;
pub mod continuation;
pub mod join;
mod result;

pub use apply::{apply, build_message, Applied, Call, CallOptions, Outgoing, Sender};
pub use result::{read_saved_group, saved_group, ResultRef};

use serde_json::{Map, Value};

/// Why a signature or an embed could not be read or applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CanvasError {
    /// The value is not a signature object.
    #[error("not a signature: {0}")]
    NotASignature(String),
    /// The signature names no task.
    #[error("a signature with no \"task\": {0}")]
    NoTask(String),
    /// A field of the signature has the wrong shape.
    #[error("signature {task:?}: field {field:?} is invalid: {reason}")]
    BadField {
        /// The task the signature names.
        task: String,
        /// The field (`args`, `kwargs`, `options.link`, ...).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A `subtask_type` Celery does not have.
    #[error("signature {task:?}: unknown subtask_type {subtask_type:?} (known: chain, group, chord, chunks, xmap, xstarmap)")]
    UnknownSubtaskType {
        /// The task the signature names.
        task: String,
        /// The type given.
        subtask_type: String,
    },
    /// An embed field has the wrong shape.
    #[error("embed field {field:?} is invalid: {reason}")]
    BadEmbed {
        /// `callbacks`, `errbacks`, `chain` or `chord`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The message could not be built.
    #[error("cannot build the message of {task:?}: {reason}")]
    Encode {
        /// The task name.
        task: String,
        /// Why.
        reason: String,
    },
}

/// One signature, in Celery's dict form (`celery/canvas.py` `Signature`: a `dict` subclass with
/// the keys `task`, `args`, `kwargs`, `options`, `subtask_type`, `immutable`; `chord_size` on
/// some). Keys beyond those are kept in [`extra`](Self::extra) and written back after them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    /// The task name (`celery.chain`, `celery.group`, `celery.chord` for the composites).
    pub task: String,
    /// Positional arguments; applying prepends the parent's result unless
    /// [`immutable`](Self::immutable).
    pub args: Vec<Value>,
    /// Keyword arguments (for composites: `tasks`, or `header`/`body`/`kwargs`).
    pub kwargs: Map<String, Value>,
    /// `apply_async` options (`task_id`, `queue`, `link`, `link_error`, `group_id`, ...), kept
    /// as JSON so options celeriac does not act on travel on unchanged.
    pub options: Map<String, Value>,
    /// `None` for a task, else `chain`, `group`, `chord` (or `chunks`, `xmap`, `xstarmap`).
    pub subtask_type: Option<String>,
    /// An immutable signature (`si()`) takes no arguments from its parent.
    pub immutable: bool,
    /// Other keys, in their order (`chord_size`, ...).
    pub extra: Map<String, Value>,
}

/// What a signature stands for (see [`Signature::shape`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// One task.
    Task,
    /// Tasks run one after another, each given the previous one's result.
    Chain(Vec<Signature>),
    /// Tasks run in parallel.
    Group(Vec<Signature>),
    /// A group (the header) whose results, in header order, are given to the body.
    Chord {
        /// The header tasks.
        header: Vec<Signature>,
        /// The body, applied with the list of the header's results.
        body: Box<Signature>,
    },
}

impl Signature {
    /// A call of the task named `task` with no arguments and no options.
    pub fn new(task: impl Into<String>) -> Self {
        Signature { task: task.into(), ..Signature::default() }
    }

    /// A chain of `tasks` (Celery's `chain(...)`: `celery.chain`, `kwargs.tasks`).
    pub fn chain(tasks: Vec<Signature>) -> Self {
        Self::composite(
            "celery.chain",
            "chain",
            [("tasks", Value::Array(tasks.iter().map(Signature::to_value).collect()))],
        )
    }

    /// A group of `tasks` (Celery's `group(...)`: `celery.group`, `kwargs.tasks`).
    pub fn group(tasks: Vec<Signature>) -> Self {
        Self::composite(
            "celery.group",
            "group",
            [("tasks", Value::Array(tasks.iter().map(Signature::to_value).collect()))],
        )
    }

    /// A chord: `header` run as a group, then `body` with their results (Celery's `chord(...)`:
    /// `celery.chord`, `kwargs` `{"kwargs": {}, "header": <group>, "body": <body>}`).
    pub fn chord(header: Vec<Signature>, body: Signature) -> Self {
        Self::composite(
            "celery.chord",
            "chord",
            [
                ("kwargs", Value::Object(Map::new())),
                ("header", Signature::group(header).to_value()),
                ("body", body.to_value()),
            ],
        )
    }

    fn composite<const N: usize>(task: &str, kind: &str, kwargs: [(&str, Value); N]) -> Self {
        Signature {
            task: task.into(),
            kwargs: kwargs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            subtask_type: Some(kind.into()),
            ..Signature::default()
        }
    }

    /// Read a signature dict. Celery accepts `args` as a list (a tuple on its side) and
    /// `kwargs`/`options` as objects; `null` stands for empty in each.
    pub fn from_value(value: &Value) -> Result<Self, CanvasError> {
        let Value::Object(map) = value else {
            return Err(CanvasError::NotASignature(format!("expected an object, got {}", short(value))));
        };
        let task = match map.get("task") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(CanvasError::NoTask(short(value))),
        };
        let bad =
            |field: &str, reason: String| CanvasError::BadField { task: task.clone(), field: field.into(), reason };
        let args = match map.get("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(other) => return Err(bad("args", format!("expected a list, got {}", short(other)))),
        };
        let object = |field: &str| match map.get(field) {
            None | Some(Value::Null) => Ok(Map::new()),
            Some(Value::Object(m)) => Ok(m.clone()),
            Some(other) => Err(bad(field, format!("expected an object, got {}", short(other)))),
        };
        let kwargs = object("kwargs")?;
        let options = object("options")?;
        let subtask_type = match map.get("subtask_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(bad("subtask_type", format!("expected a string, got {}", short(other)))),
        };
        let immutable = match map.get("immutable") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(bad("immutable", format!("expected true or false, got {}", short(other)))),
        };
        let extra = map
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_str(), "task" | "args" | "kwargs" | "options" | "subtask_type" | "immutable")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Signature { task, args, kwargs, options, subtask_type, immutable, extra })
    }

    /// The dict form, in Celery's key order.
    pub fn to_value(&self) -> Value {
        let mut m = Map::with_capacity(6 + self.extra.len());
        m.insert("task".into(), Value::String(self.task.clone()));
        m.insert("args".into(), Value::Array(self.args.clone()));
        m.insert("kwargs".into(), Value::Object(self.kwargs.clone()));
        m.insert("options".into(), Value::Object(self.options.clone()));
        m.insert("subtask_type".into(), self.subtask_type.clone().map_or(Value::Null, Value::String));
        m.insert("immutable".into(), Value::Bool(self.immutable));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// What the signature stands for, its parts read and checked.
    pub fn shape(&self) -> Result<Shape, CanvasError> {
        let bad = |field: &str, reason: String| CanvasError::BadField {
            task: self.task.clone(),
            field: field.into(),
            reason,
        };
        let list = |field: &str| -> Result<Vec<Signature>, CanvasError> {
            match self.kwargs.get(field) {
                Some(Value::Array(items)) => items.iter().map(Signature::from_value).collect(),
                // A group whose tasks were given as one signature (Celery's `group(sig)` keeps it).
                Some(v @ Value::Object(_)) => Ok(vec![Signature::from_value(v)?]),
                Some(other) => {
                    Err(bad(&format!("kwargs.{field}"), format!("expected a list of signatures, got {}", short(other))))
                }
                None => Err(bad(&format!("kwargs.{field}"), "missing".into())),
            }
        };
        match self.subtask_type.as_deref() {
            None => Ok(Shape::Task),
            Some("chain") => Ok(Shape::Chain(list("tasks")?)),
            Some("group") => Ok(Shape::Group(list("tasks")?)),
            Some("chord") => {
                let header = match self.kwargs.get("header") {
                    Some(v @ Value::Object(_)) => {
                        let sig = Signature::from_value(v)?;
                        match sig.shape()? {
                            Shape::Group(tasks) => tasks,
                            _ => vec![sig],
                        }
                    }
                    Some(Value::Array(items)) => items.iter().map(Signature::from_value).collect::<Result<_, _>>()?,
                    Some(other) => return Err(bad("kwargs.header", format!("expected a group, got {}", short(other)))),
                    None => return Err(bad("kwargs.header", "missing".into())),
                };
                let body = match self.kwargs.get("body") {
                    Some(v @ Value::Object(_)) => Signature::from_value(v)?,
                    Some(other) => {
                        return Err(bad("kwargs.body", format!("expected a signature, got {}", short(other))))
                    }
                    None => return Err(bad("kwargs.body", "missing".into())),
                };
                Ok(Shape::Chord { header, body: Box::new(body) })
            }
            Some("chunks" | "xmap" | "xstarmap") => Ok(Shape::Task),
            Some(other) => {
                Err(CanvasError::UnknownSubtaskType { task: self.task.clone(), subtask_type: other.to_string() })
            }
        }
    }

    /// The string option `name`, if set.
    pub fn option_str(&self, name: &str) -> Option<&str> {
        self.options.get(name).and_then(Value::as_str)
    }

    /// The id this signature's task (or, for a chord, its body; for a group, the group) will
    /// have, if it was frozen (Celery's `options.task_id`).
    pub fn task_id(&self) -> Option<&str> {
        self.option_str("task_id")
    }

    /// Set an option.
    pub fn set_option(&mut self, name: &str, value: Value) {
        self.options.insert(name.to_string(), value);
    }

    /// Add a callback (Celery's `Signature.link`: `options.link`, a list).
    pub fn link(mut self, callback: Signature) -> Self {
        push_option(&mut self.options, "link", callback.to_value());
        self
    }

    /// Add an errback (Celery's `Signature.link_error`: `options.link_error`, a list).
    pub fn link_error(mut self, errback: Signature) -> Self {
        push_option(&mut self.options, "link_error", errback.to_value());
        self
    }

    /// Make the signature immutable (Celery's `si()`): it ignores its parent's result.
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }
}

/// Append to a list option, turning a single value into a list first.
fn push_option(options: &mut Map<String, Value>, name: &str, value: Value) {
    match options.get_mut(name) {
        Some(Value::Array(list)) => list.push(value),
        Some(slot @ Value::Object(_)) => {
            let first = slot.take();
            *slot = Value::Array(vec![first, value]);
        }
        _ => {
            options.insert(name.to_string(), Value::Array(vec![value]));
        }
    }
}

/// A value cut to a length fit for an error message.
pub(crate) fn short(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 120 {
        let mut end = 117;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}
