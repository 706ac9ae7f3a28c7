//! Applying a signature: the messages it publishes, as Celery's canvas publishes them
//! (`celery/canvas.py`: `Signature.apply_async` and `_merge`, `_chain.run` and `prepare_steps`,
//! `group.apply_async` and `_apply_tasks`, `_chord.run`; `celery/app/amqp.py` `as_task_v2` for
//! the message itself).
//!
//! [`apply`] is pure: it returns an [`Applied`] plan (messages in publish order, chord sizes to
//! record before the first of them, whether a chord runs now or later, the result handle, whose
//! ids are frozen up front as Celery's `freeze` does) and the caller carries it out, so the
//! worker and the client send workflows the same way and the plans are tested without a broker.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{short, CanvasError, ResultRef, Shape, Signature};
use crate::protocol::{expiration_property, format_datetime, parse_datetime, seconds_number};
use crate::pyjson::RawJson;
use crate::{pyrepr, Message, TaskBody, TaskHeaders};

/// Who sends, and where tasks go by default.
pub struct Sender<'a> {
    /// The `origin` header (`name@host` of the sender).
    pub origin: &'a str,
    /// The queue of a task that names none and has no route.
    pub default_queue: &'a str,
    /// The time `countdown` and `expires` in seconds count from.
    pub now: DateTime<Utc>,
    /// The options of a task the sender has registered, by name (its queue, and whether it
    /// keeps results, as Celery's `Task.apply_async` takes them from the task); `None` for a
    /// task it does not know (sent as `send_task` sends it: `ignore_result` `null`).
    pub task_options: &'a (dyn Fn(&str) -> Option<crate::TaskOptions> + Sync),
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The queue (routing key) to publish to.
    pub queue: String,
    /// The message.
    pub message: Message,
    /// Its task id.
    pub task_id: String,
    /// Its task name.
    pub task: String,
}

/// What applying a signature does.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Chords whose header this plan sends: `(group id, number of header tasks)`, to record
    /// (Celery's `set_chord_size`) before any message is published.
    pub chord_sizes: Vec<(String, usize)>,
    /// The messages, in publish order.
    pub publish: Vec<Outgoing>,
    /// The result handle of what was applied (its tuple goes in the parent's `children`).
    pub result: ResultRef,
    /// Options seen that celeriac does not act on, to log (`"name"` each, once).
    pub ignored_options: Vec<String>,
    /// The workflow runs a chord, now (see [`chord_sizes`](Self::chord_sizes)) or when a worker
    /// sends a later step of a chain: a sender whose result backend cannot join chords refuses
    /// it (Celery's `ensure_chords_allowed`, which `prepare_steps` calls for every chord step).
    pub uses_chords: bool,
}

impl Applied {
    fn new(result: ResultRef) -> Self {
        Applied {
            chord_sizes: Vec::new(),
            publish: Vec::new(),
            result,
            ignored_options: Vec::new(),
            uses_chords: false,
        }
    }
}

/// The options of one call, read from a signature's merged `options` (Celery's `apply_async`
/// keyword arguments).
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// `task_id`.
    pub task_id: Option<String>,
    /// `countdown`, seconds.
    pub countdown: Option<f64>,
    /// `eta`.
    pub eta: Option<DateTime<Utc>>,
    /// `expires` (a time, or seconds from now).
    pub expires: Option<DateTime<Utc>>,
    /// `queue` (or the `routing_key`).
    pub queue: Option<String>,
    /// `priority`.
    pub priority: Option<u8>,
    /// `time_limit`, seconds.
    pub time_limit: Option<f64>,
    /// `soft_time_limit`, seconds.
    pub soft_time_limit: Option<f64>,
    /// `ignore_result`.
    pub ignore_result: Option<bool>,
    /// `shadow`.
    pub shadow: Option<String>,
    /// `group_id`.
    pub group_id: Option<String>,
    /// `group_index`.
    pub group_index: Option<i64>,
    /// `parent_id`.
    pub parent_id: Option<String>,
    /// `root_id`.
    pub root_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `link`: callbacks.
    pub link: Vec<Value>,
    /// `link_error`: errbacks.
    pub link_error: Vec<Value>,
    /// `chain`: the rest of a chain, last step first, as JSON text (`Some([])` is written as
    /// `[]`, as Celery's worker passes the empty rest on).
    pub chain: Option<RawJson>,
    /// `chord`: the body of the chord this task is a header task of.
    pub chord: Option<Value>,
    /// `retries`.
    pub retries: u32,
    /// `headers`: extra message headers.
    pub headers: Map<String, Value>,
    /// `stamped_headers` and `stamps`, carried as received.
    pub stamped_headers: Option<Value>,
    /// `stamps`.
    pub stamps: Map<String, Value>,
    /// `replaced_task_nesting`.
    pub replaced_task_nesting: u32,
}

/// Options Celery's `apply_async` takes that change nothing on the wire celeriac writes, or that
/// are the sender's business (`add_to_parent`, the producer, ...): read and not logged.
const SILENT_OPTIONS: &[&str] = &[
    "add_to_parent",
    "producer",
    "connection",
    "router",
    "retry",
    "retry_policy",
    "serializer",
    "exchange",
    "exchange_type",
    "delivery_mode",
    "mandatory",
    "publisher",
    "subtask_type",
    "chord_size",
    "is_eager",
];

impl CallOptions {
    /// Read the options of a call; `ignored` collects the names celeriac does not act on. The
    /// values are moved, not copied: a chain step's `chain` holds the rest of the chain.
    pub fn from_map(
        task: &str,
        options: Map<String, Value>,
        now: DateTime<Utc>,
        ignored: &mut Vec<String>,
    ) -> Result<Self, CanvasError> {
        let bad = |field: &str, reason: String| CanvasError::BadField {
            task: task.to_string(),
            field: format!("options.{field}"),
            reason,
        };
        let text = |name: &str, v: &Value| -> Result<Option<String>, CanvasError> {
            match v {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                other => Err(bad(name, format!("expected a string, got {}", short(other)))),
            }
        };
        let seconds = |name: &str, v: &Value| -> Result<Option<f64>, CanvasError> {
            match v {
                Value::Null => Ok(None),
                Value::Number(n) => n.as_f64().map(Some).ok_or_else(|| bad(name, format!("not a number: {n}"))),
                other => Err(bad(name, format!("expected seconds, got {}", short(other)))),
            }
        };
        let time = |name: &str, v: &Value| -> Result<Option<DateTime<Utc>>, CanvasError> {
            match v {
                Value::Null => Ok(None),
                Value::String(s) => parse_datetime(s).map(Some).map_err(|e| bad(name, e)),
                Value::Number(n) => {
                    let secs = n.as_f64().unwrap_or(0.0);
                    Ok(Some(now + chrono::Duration::microseconds((secs * 1e6) as i64)))
                }
                other => Err(bad(name, format!("expected a time, got {}", short(other)))),
            }
        };
        let sigs = |name: &str, v: Value| -> Result<Vec<Value>, CanvasError> {
            match v {
                Value::Null => Ok(Vec::new()),
                Value::Array(items) => Ok(items),
                v @ Value::Object(_) => Ok(vec![v]),
                other => Err(bad(name, format!("expected signatures, got {}", short(&other)))),
            }
        };
        let mut o = CallOptions::default();
        let mut routing_key = None;
        for (name, owned) in options {
            let (name, v) = (name.as_str(), &owned);
            match name {
                "task_id" => o.task_id = text(name, v)?,
                "countdown" => o.countdown = seconds(name, v)?,
                "eta" => o.eta = time(name, v)?,
                "expires" => o.expires = time(name, v)?,
                "queue" => {
                    o.queue = match v {
                        // A kombu Queue serialized as its declaration.
                        Value::Object(q) => q.get("name").and_then(Value::as_str).map(str::to_string),
                        other => text(name, other)?,
                    }
                }
                "routing_key" => routing_key = text(name, v)?,
                "priority" => {
                    o.priority = match v {
                        Value::Null => None,
                        Value::Number(n) => Some(
                            n.as_u64()
                                .filter(|p| *p <= 255)
                                .ok_or_else(|| bad(name, format!("expected 0-255, got {n}")))?
                                as u8,
                        ),
                        other => return Err(bad(name, format!("expected 0-255, got {}", short(other)))),
                    }
                }
                "time_limit" => o.time_limit = seconds(name, v)?,
                "soft_time_limit" => o.soft_time_limit = seconds(name, v)?,
                "ignore_result" => o.ignore_result = v.as_bool(),
                "shadow" => o.shadow = text(name, v)?,
                "group_id" => o.group_id = text(name, v)?,
                "group_index" => {
                    o.group_index = match v {
                        Value::Null => None,
                        other => Some(
                            other
                                .as_i64()
                                .ok_or_else(|| bad(name, format!("expected an integer, got {}", short(other))))?,
                        ),
                    }
                }
                "parent_id" => o.parent_id = text(name, v)?,
                "root_id" => o.root_id = text(name, v)?,
                "reply_to" => o.reply_to = text(name, v)?,
                "link" => o.link = sigs(name, owned)?,
                "link_error" => o.link_error = sigs(name, owned)?,
                "chain" => {
                    o.chain =
                        if v.is_null() { None } else { Some(RawJson::from_value(&Value::Array(sigs(name, owned)?))) }
                }
                "chord" => o.chord = (!v.is_null()).then_some(owned),
                "retries" => o.retries = v.as_u64().unwrap_or(0) as u32,
                "headers" => {
                    if let Value::Object(h) = owned {
                        o.headers = h;
                    }
                }
                "stamped_headers" => o.stamped_headers = (!v.is_null()).then_some(owned),
                "stamps" => {
                    if let Value::Object(s) = owned {
                        o.stamps = s;
                    }
                }
                "replaced_task_nesting" => o.replaced_task_nesting = v.as_u64().unwrap_or(0) as u32,
                other if SILENT_OPTIONS.contains(&other) => {}
                other => {
                    // A stamp (Celery 5.3 puts each stamped header's value among the options too).
                    if !o.stamps.contains_key(other) && !ignored.iter().any(|i| i == other) {
                        ignored.push(other.to_string());
                    }
                }
            }
        }
        if o.queue.is_none() {
            o.queue = routing_key;
        }
        Ok(o)
    }
}

/// Build the protocol v2 message of one task call, as Celery's `as_task_v2` writes it: the id
/// (`task_id`, else a new UUID) is also the `correlation_id`; `root_id` defaults to the id;
/// `eta` comes from `eta` or `countdown`; the embed carries `link`, `link_error`, `chain` and
/// `chord` (moved out of `o`, not copied).
pub fn build_message(
    task: &str,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    mut o: CallOptions,
    sender: &Sender<'_>,
) -> Result<(String, Message), CanvasError> {
    let id = o.task_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut h = TaskHeaders::new(task, id.clone());
    let eta = o.eta.or_else(|| {
        o.countdown.filter(|c| *c > 0.0).map(|c| sender.now + chrono::Duration::microseconds((c * 1e6) as i64))
    });
    h.shadow = o.shadow.clone();
    h.eta = eta.map(format_datetime);
    h.expires = o.expires.map(format_datetime);
    h.group = o.group_id.clone();
    h.group_index = o.group_index;
    h.retries = o.retries;
    h.timelimit = (o.time_limit.and_then(seconds_number), o.soft_time_limit.and_then(seconds_number));
    h.root_id = Some(o.root_id.clone().unwrap_or_else(|| id.clone()));
    h.parent_id = o.parent_id.clone();
    // Celery's canvas applies arguments as a tuple.
    h.argsrepr = Some(pyrepr::args_repr(&args, true));
    h.kwargsrepr = Some(pyrepr::kwargs_repr(&kwargs));
    h.origin = Some(sender.origin.to_string());
    // `null` when unset, as Celery's `send_task` writes it for a task the sender does not know
    // (the worker's task option decides).
    h.ignore_result = o.ignore_result;
    h.replaced_task_nesting = o.replaced_task_nesting;
    h.stamped_headers = o.stamped_headers.clone();
    h.stamps = o.stamps.clone();
    let list = |v: Vec<Value>| (!v.is_empty()).then_some(Value::Array(v));
    let embed = crate::Embed {
        callbacks: list(std::mem::take(&mut o.link)),
        errbacks: list(std::mem::take(&mut o.link_error)),
        chain: o.chain.take(),
        chord: o.chord.take(),
    };
    let body = TaskBody { args, kwargs, embed };
    let mut message = Message::new_task(&h, &body, o.priority, o.reply_to.clone())
        .map_err(|e| CanvasError::Encode { task: task.to_string(), reason: e.to_string() })?;
    // Celery merges the `headers` option over its own.
    for (k, v) in std::mem::take(&mut o.headers) {
        message.headers.insert(k, v);
    }
    message.properties.expiration = o.expires.map(|at| expiration_property(at, sender.now));
    Ok((id, message))
}

/// How a signature is applied: arguments to prepend and options that override its own (Celery's
/// `sig.apply_async(args, **options)`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Call {
    /// Prepended to the signature's arguments unless it is immutable.
    pub args: Vec<Value>,
    /// Override the signature's options (but not a `group_id` it has). A task's message drops
    /// the `null` ones; a chain, group or chord passes them on in the signatures it embeds, as
    /// Celery does.
    pub options: Map<String, Value>,
    /// Filled into every task message the call sends that lacks them (Celery's `send_task`
    /// fills `parent_id` and `root_id` from the task it runs in; a chord's body is sent so).
    pub fill: Map<String, Value>,
    /// The `chain` option as JSON text (the rest of a chain a worker passes on, undecoded):
    /// first among the options, over the signature's own.
    pub chain: Option<RawJson>,
}

impl Call {
    /// A call with the parent's result as the first argument, from the task `parent_id` of the
    /// workflow `root_id`, with no priority (what Celery's worker passes to callbacks and the
    /// next chain step: `parent_id`, `root_id`, `priority=None`).
    pub fn with_result(result: Value, parent_id: &str, root_id: &str) -> Self {
        Call { args: vec![result], ..Call::default() }.ids(parent_id, root_id).option("priority", Value::Null)
    }

    /// [`with_result`](Self::with_result) for the next step of a chain, `rest` (the steps after
    /// it, last first) passed on first, in Celery's order of options.
    pub fn next_step(result: Value, rest: RawJson, parent_id: &str, root_id: &str) -> Self {
        Call { args: vec![result], chain: Some(rest), ..Call::default() }
            .ids(parent_id, root_id)
            .option("priority", Value::Null)
    }

    /// A call with no arguments from a parent.
    pub fn new() -> Self {
        Call::default()
    }

    /// Set `parent_id` and `root_id`.
    pub fn ids(self, parent_id: &str, root_id: &str) -> Self {
        self.option("parent_id", Value::String(parent_id.into())).option("root_id", Value::String(root_id.into()))
    }

    /// Sent from inside the task `parent_id` of the workflow `root_id` (Celery's `send_task`
    /// defaults), with `args` first: how the worker that completes a chord sends its body.
    pub fn from_task(args: Vec<Value>, parent_id: &str, root_id: &str) -> Self {
        let mut fill = Map::new();
        fill.insert("parent_id".into(), Value::String(parent_id.into()));
        fill.insert("root_id".into(), Value::String(root_id.into()));
        Call { args, options: Map::new(), fill, chain: None }
    }

    /// Add an option.
    pub fn option(mut self, name: &str, value: Value) -> Self {
        self.options.insert(name.into(), value);
        self
    }
}

/// Apply `sig` as called by `call`: the messages to publish and the result handle.
pub fn apply(sig: &Signature, call: Call, sender: &Sender<'_>) -> Result<Applied, CanvasError> {
    let mut applied = Applied::new(ResultRef::task(""));
    applied.result = apply_into(sig, call, sender, &mut applied)?;
    applied.uses_chords = !applied.chord_sizes.is_empty() || holds_chord(sig)?;
    Ok(applied)
}

fn apply_into(
    sig: &Signature,
    mut call: Call,
    sender: &Sender<'_>,
    out: &mut Applied,
) -> Result<ResultRef, CanvasError> {
    let shape = sig.shape()?;
    if !matches!(shape, Shape::Task) {
        // A group or chord step reads the chain it passes on as values.
        if let Some(text) = call.chain.take() {
            let rest = text.to_value().map_err(|e| CanvasError::BadEmbed {
                field: "chain",
                reason: format!("the rest of the chain is not JSON: {e}"),
            })?;
            let mut options = Map::with_capacity(call.options.len() + 1);
            options.insert("chain".into(), rest);
            options.extend(std::mem::take(&mut call.options));
            call.options = options;
        }
    }
    match shape {
        Shape::Task => apply_task(sig, call, sender, out),
        Shape::Group(tasks) => apply_group(sig, tasks, call, sender, out),
        Shape::Chord { header, body } => apply_chord(sig, header, *body, call, sender, out),
        Shape::Chain(tasks) => apply_chain(sig, tasks, call, sender, out),
    }
}

/// Celery's `_merge` of options: the call's over the signature's, except a `group_id` the
/// signature already has. `Signature.apply_async` (a task) drops `null` call options first;
/// the composites keep them.
fn merge_options(sig: &Map<String, Value>, call: Map<String, Value>, drop_nulls: bool) -> Map<String, Value> {
    let mut options = sig.clone();
    for (k, v) in call {
        if (drop_nulls && v.is_null()) || (k == "group_id" && sig.get("group_id").is_some_and(|g| !g.is_null())) {
            continue;
        }
        options.insert(k, v);
    }
    options
}

/// The arguments of a call: the call's before the signature's, or the signature's alone when
/// it is immutable.
fn merge_args(sig: &Signature, call_args: Vec<Value>) -> Vec<Value> {
    if sig.immutable || call_args.is_empty() {
        sig.args.clone()
    } else {
        let mut args = call_args;
        args.extend(sig.args.iter().cloned());
        args
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn take_str(options: &mut Map<String, Value>, name: &str) -> Option<String> {
    match options.shift_remove(name) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

fn apply_task(sig: &Signature, call: Call, sender: &Sender<'_>, out: &mut Applied) -> Result<ResultRef, CanvasError> {
    let args = merge_args(sig, call.args);
    let mut options = merge_options(&sig.options, call.options, true);
    for (k, v) in call.fill {
        if options.get(&k).is_none_or(Value::is_null) {
            options.insert(k, v);
        }
    }
    let mut o = CallOptions::from_map(&sig.task, options, sender.now, &mut out.ignored_options)?;
    if call.chain.is_some() {
        o.chain = call.chain;
    }
    let known = (sender.task_options)(&sig.task);
    if o.ignore_result.is_none() {
        o.ignore_result = known.as_ref().map(|t| t.ignore_result);
    }
    let queue =
        o.queue.clone().or_else(|| known.and_then(|t| t.queue)).unwrap_or_else(|| sender.default_queue.to_string());
    let (id, message) = build_message(&sig.task, args, sig.kwargs.clone(), o, sender)?;
    out.publish.push(Outgoing { queue, message, task_id: id.clone(), task: sig.task.clone() });
    Ok(ResultRef::task(id))
}

/// A group's members with nested groups flattened into it (their own options dropped), as
/// Celery's `group._prepared` does.
fn flatten_group(tasks: Vec<Signature>) -> Result<Vec<Signature>, CanvasError> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.shape()? {
            Shape::Group(inner) => out.extend(flatten_group(inner)?),
            Shape::Chain(steps) if steps.is_empty() => {}
            _ => out.push(task),
        }
    }
    Ok(out)
}

/// How many parts a signature adds to a chord it is a header member of (Celery's `_descend`):
/// a group the sum of its members, a chain its last step that counts, a chord its body, a task 1.
fn chord_parts(sig: &Signature) -> Result<usize, CanvasError> {
    Ok(match sig.shape()? {
        Shape::Task => 1,
        Shape::Group(tasks) => tasks.iter().map(chord_parts).sum::<Result<usize, _>>()?,
        Shape::Chain(steps) => {
            let mut n = 0;
            for step in steps.iter().rev() {
                n = chord_parts(step)?;
                if n > 0 {
                    break;
                }
            }
            n
        }
        Shape::Chord { body, .. } => chord_parts(&body)?,
    })
}

/// Celery's `group.apply_async`: the group id is the `task_id` option (or new); every member is
/// applied with the call's arguments before its own and with every group option over its own,
/// plus `group_id` and its `group_index`. A group that is a chord's header (a `chord` option)
/// records the chord's size first.
fn apply_group(
    sig: &Signature,
    tasks: Vec<Signature>,
    call: Call,
    sender: &Sender<'_>,
    out: &mut Applied,
) -> Result<ResultRef, CanvasError> {
    let partial = merge_args(sig, call.args);
    let mut options = merge_options(&sig.options, call.options, false);
    let gid = take_str(&mut options, "task_id").unwrap_or_else(new_id);
    options.shift_remove("group_index");
    let members = flatten_group(tasks)?;
    if options.get("chord").is_some_and(|c| !c.is_null()) {
        let size = members.iter().map(chord_parts).sum::<Result<usize, _>>()?;
        out.chord_sizes.push((gid.clone(), size));
    }
    let mut results = Vec::with_capacity(members.len());
    for (index, member) in members.iter().enumerate() {
        let mut opts = options.clone();
        opts.insert("group_id".into(), Value::String(gid.clone()));
        opts.insert("group_index".into(), Value::from(index));
        results.push(apply_into(
            member,
            Call { args: partial.clone(), options: opts, fill: call.fill.clone(), chain: None },
            sender,
            out,
        )?);
    }
    Ok(ResultRef::Group { id: gid, parent: None, results })
}

/// Celery's `_chord.run`: the header runs as a group whose id is the chord's (`task_id`) and
/// whose every task carries the body (`chord`); the body gets the chord's options but
/// `parent_id` (its `chain`, `link`, `link_error`, `root_id`, and an enclosing chord's
/// `group_id`/`group_index`/`chord`), its own id, and the header's group id unless it has one.
/// `countdown`/`eta` delay the header. An empty header applies the body at once with `[]`.
fn apply_chord(
    sig: &Signature,
    header: Vec<Signature>,
    mut body: Signature,
    call: Call,
    sender: &Sender<'_>,
    out: &mut Applied,
) -> Result<ResultRef, CanvasError> {
    let partial = merge_args(sig, call.args);
    let mut options = merge_options(&sig.options, call.options, false);
    let header_group_id = sig
        .kwargs
        .get("header")
        .and_then(|h| h.get("options"))
        .and_then(|o| o.get("task_id"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let gid = take_str(&mut options, "task_id").or(header_group_id).unwrap_or_else(new_id);
    let mut header_options = Map::new();
    for delay in ["countdown", "eta"] {
        if let Some(v) = options.shift_remove(delay) {
            header_options.insert(delay.into(), v);
        }
    }
    // Everything but parent_id goes to the body (its own group_id kept).
    let mut body_call = options.clone();
    body_call.shift_remove("parent_id");
    body.options = merge_options(&body.options, body_call, false);
    freeze(&mut body)?;
    if body.options.get("group_id").is_none_or(Value::is_null) {
        body.set_option("group_id", Value::String(gid.clone()));
    }
    let body_result = frozen_result(&body)?;
    let members = flatten_group(header)?;
    if members.is_empty() {
        let result = apply_into(
            &body,
            Call { args: vec![Value::Array(Vec::new())], options: Map::new(), fill: call.fill, chain: None },
            sender,
            out,
        )?;
        return Ok(result);
    }
    for (k, v) in &options {
        if !matches!(k.as_str(), "chain" | "chord" | "link" | "link_error" | "group_id" | "group_index") {
            header_options.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    header_options.insert("task_id".into(), Value::String(gid));
    header_options.insert("chord".into(), body.to_value());
    if let Some(root) = body.options.get("root_id").filter(|r| !r.is_null()) {
        header_options.insert("root_id".into(), root.clone());
    }
    let group = Signature::group(members);
    let header_result =
        apply_into(&group, Call { args: partial, options: header_options, fill: call.fill, chain: None }, sender, out)?;
    Ok(body_result.after(Some(header_result)))
}

/// A chain's steps as Celery's `prepare_steps` makes them: nested chains spliced in, a group
/// followed by another step turned into a chord with that step as its body, every step frozen
/// (given its ids in advance, see [`freeze`]).
fn prepare_steps(tasks: Vec<Signature>) -> Result<Vec<Signature>, CanvasError> {
    let mut flat = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.shape()? {
            Shape::Chain(inner) => flat.extend(prepare_steps(inner)?),
            Shape::Group(inner) if inner.is_empty() => {}
            _ => flat.push(task),
        }
    }
    let mut steps: Vec<Signature> = Vec::with_capacity(flat.len());
    // From the last step back: a group that has a next step becomes that step's chord.
    while let Some(mut task) = flat.pop() {
        if let Shape::Group(header) = task.shape()? {
            if let Some(body) = steps.pop() {
                let mut chord = Signature::chord(header, body);
                chord.options = std::mem::take(&mut task.options);
                task = chord;
            }
        }
        freeze(&mut task)?;
        steps.push(task);
    }
    steps.reverse();
    Ok(steps)
}

/// Give `sig` the ids it will run with, as Celery's `freeze` does: a task its `task_id`; a
/// group its id and every member theirs; a chain every step (its last step takes the chain's
/// own `task_id`, as applying it does); a chord its body. Ids it has are kept, and a signature
/// that had them all is left as it was. [`frozen_result`] reads the handle back. Returns
/// whether anything was added.
fn freeze(sig: &mut Signature) -> Result<bool, CanvasError> {
    let list = |items: &[Signature]| Value::Array(items.iter().map(Signature::to_value).collect());
    let mut changed = false;
    let shape = sig.shape()?;
    if matches!(shape, Shape::Task | Shape::Group(_)) && sig.task_id().is_none() {
        sig.set_option("task_id", Value::String(new_id()));
        changed = true;
    }
    match shape {
        Shape::Task => {}
        Shape::Group(mut members) => {
            let mut inner = false;
            for member in &mut members {
                inner |= freeze(member)?;
            }
            if inner {
                sig.kwargs.insert("tasks".into(), list(&members));
            }
            changed |= inner;
        }
        Shape::Chain(mut steps) => {
            let mut inner = false;
            if let (Some(id), Some(last)) = (sig.task_id().map(str::to_string), steps.last_mut()) {
                if last.shape()? == Shape::Task && last.task_id() != Some(id.as_str()) {
                    last.set_option("task_id", Value::String(id));
                    inner = true;
                }
            }
            for step in &mut steps {
                inner |= freeze(step)?;
            }
            if inner {
                sig.kwargs.insert("tasks".into(), list(&steps));
            }
            changed |= inner;
        }
        Shape::Chord { body, .. } => {
            let mut body = *body;
            if freeze(&mut body)? {
                sig.kwargs.insert("body".into(), body.to_value());
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// The result handle of a [`freeze`]d signature: a task's, a group's with its members' (nested
/// groups flattened, as applying it does), a chain's last step's (the steps before it its
/// parents), a chord's body's.
fn frozen_result(sig: &Signature) -> Result<ResultRef, CanvasError> {
    let id = || sig.task_id().unwrap_or_default().to_string();
    Ok(match sig.shape()? {
        Shape::Task => ResultRef::task(id()),
        Shape::Group(tasks) => ResultRef::Group {
            id: id(),
            parent: None,
            results: flatten_group(tasks)?.iter().map(frozen_result).collect::<Result<_, _>>()?,
        },
        Shape::Chain(steps) => {
            let mut result: Option<ResultRef> = None;
            for step in &steps {
                result = Some(frozen_result(step)?.after(result));
            }
            result.unwrap_or_else(|| ResultRef::task(""))
        }
        Shape::Chord { body, .. } => frozen_result(&body)?,
    })
}

/// Whether applying `sig` runs a chord, now or when a worker sends a later step of a chain (a
/// group followed by a step is one).
fn holds_chord(sig: &Signature) -> Result<bool, CanvasError> {
    let any = |sigs: Vec<Signature>| -> Result<bool, CanvasError> {
        for s in &sigs {
            if holds_chord(s)? {
                return Ok(true);
            }
        }
        Ok(false)
    };
    match sig.shape()? {
        Shape::Task => Ok(false),
        Shape::Chord { .. } => Ok(true),
        Shape::Group(tasks) => any(tasks),
        Shape::Chain(steps) => any(prepare_steps(steps)?),
    }
}

/// Celery's `_chain.run`: the first step is applied with the call's arguments, the other steps
/// travel in its `chain` (last step first). The chain keeps `task_id` (its last step's id),
/// `link` (on the last step), `link_error` (on every step), `group_id`, `group_index` and
/// `chord` (on the last step: an enclosing group or chord counts the chain's end), `root_id`
/// and `parent_id`; its other options go to the first step.
fn apply_chain(
    sig: &Signature,
    tasks: Vec<Signature>,
    call: Call,
    sender: &Sender<'_>,
    out: &mut Applied,
) -> Result<ResultRef, CanvasError> {
    let partial = merge_args(sig, call.args);
    let mut options = merge_options(&sig.options, call.options, false);
    let mut steps = prepare_steps(tasks)?;
    if steps.is_empty() {
        return Err(CanvasError::BadField {
            task: sig.task.clone(),
            field: "kwargs.tasks".into(),
            reason: "an empty chain".into(),
        });
    }
    let mut own = Map::new();
    for key in ["task_id", "link", "link_error", "group_id", "group_index", "chord", "root_id", "parent_id"] {
        if let Some(v) = options.shift_remove(key).filter(|v| !v.is_null()) {
            own.insert(key.into(), v);
        }
    }
    {
        let last = steps.last_mut().expect("not empty");
        for key in ["group_id", "group_index", "chord"] {
            if let Some(v) = own.get(key) {
                last.set_option(key, v.clone());
            }
        }
        if let (Some(id), Ok(Shape::Task)) = (own.get("task_id"), last.shape()) {
            last.set_option("task_id", id.clone());
        }
        if let Some(link) = own.get("link") {
            for cb in as_list(link) {
                super::push_option(&mut last.options, "link", cb);
            }
        }
    }
    if let Some(link_error) = own.get("link_error") {
        for step in &mut steps {
            for eb in as_list(link_error) {
                super::push_option(&mut step.options, "link_error", eb);
            }
        }
    }
    // An explicit root goes on every step (Celery's `prepare_steps(root_id=...)`); without one
    // the first message's is filled in or is its own id, and the worker passes it on.
    let root_id = own.get("root_id").and_then(Value::as_str).map(str::to_string);
    if let Some(root) = &root_id {
        for step in steps.iter_mut().skip(1) {
            step.set_option("root_id", Value::String(root.clone()));
        }
    }
    // The result handle: the last step, its parents the steps before it.
    let mut result: Option<ResultRef> = None;
    for step in &steps {
        result = Some(frozen_result(step)?.after(result));
    }
    let first = steps.remove(0);
    let mut chain = match options.shift_remove("chain") {
        Some(Value::Array(outer)) => outer,
        _ => Vec::new(),
    };
    chain.extend(steps.iter().rev().map(Signature::to_value));
    options.insert("chain".into(), Value::Array(chain));
    if let Some(root) = root_id {
        options.insert("root_id".into(), Value::String(root));
    }
    if let Some(parent) = own.get("parent_id") {
        options.insert("parent_id".into(), parent.clone());
    }
    apply_into(&first, Call { args: partial, options, fill: call.fill, chain: None }, sender, out)?;
    Ok(result.expect("not empty"))
}

fn as_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sender() -> Sender<'static> {
        Sender { origin: "test@host", default_queue: "celery", now: Utc::now(), task_options: &|_| None }
    }

    fn add(args: Value) -> Signature {
        Signature { args: args.as_array().unwrap().clone(), ..Signature::new("add") }
    }

    /// The messages a worker sends after the first task of `applied` succeeds with `value`.
    fn next_step(applied: &Applied, value: Value) -> Applied {
        let body = applied.publish[0].message.task_body().unwrap();
        let cont = super::super::continuation::Continuations::read(&body.embed);
        let (sig, call) = cont.after_success(&value, &applied.publish[0].task_id, "root").pop().unwrap();
        apply(&sig, call, &sender()).unwrap()
    }

    #[test]
    fn a_chain_ending_in_a_group_gives_the_group_with_the_ids_its_members_will_run_with() {
        let chain =
            Signature::chain(vec![add(json!([1, 1])), Signature::group(vec![add(json!([10])), add(json!([20]))])]);
        let applied = apply(&chain, Call::new(), &sender()).unwrap();
        let ResultRef::Group { id, parent, results } = &applied.result else { panic!("{:?}", applied.result) };
        assert_eq!(parent.as_deref().map(ResultRef::id), Some(applied.publish[0].task_id.as_str()));
        let later = next_step(&applied, json!(2));
        let sent: Vec<&str> = later.publish.iter().map(|o| o.task_id.as_str()).collect();
        assert_eq!(sent, results.iter().map(ResultRef::id).collect::<Vec<_>>());
        assert_eq!(later.result.id(), id);
        assert!(!applied.uses_chords);
    }

    #[test]
    fn a_chord_with_a_chain_body_gives_the_body_s_last_step_after_the_header() {
        let body = Signature::chain(vec![Signature::new("tsum"), add(json!([100]))]);
        let chord = Signature::chord(vec![add(json!([1, 1])), add(json!([2, 2]))], body);
        let applied = apply(&chord, Call::new(), &sender()).unwrap();
        let body = applied.publish[0].message.task_body().unwrap();
        let body = Signature::from_value(body.embed.chord.as_ref().unwrap()).unwrap();
        let Ok(Shape::Chain(steps)) = body.shape() else { panic!("{body:?}") };
        let ResultRef::Task { id, parent } = &applied.result else { panic!("{:?}", applied.result) };
        assert_eq!(Some(id.as_str()), steps[1].task_id(), "the handle is the body's last step");
        let first = parent.as_deref().unwrap();
        assert_eq!(Some(first.id()), steps[0].task_id());
        let ResultRef::Task { parent: Some(header), .. } = first else { panic!("{first:?}") };
        assert!(matches!(**header, ResultRef::Group { .. }), "{header:?}");
        assert!(applied.uses_chords && applied.chord_sizes.len() == 1);
    }

    #[test]
    fn a_chain_that_reaches_a_chord_later_uses_chords_now() {
        let steps =
            vec![add(json!([1, 1])), Signature::group(vec![add(json!([1])), add(json!([2]))]), Signature::new("tsum")];
        let applied = apply(&Signature::chain(steps), Call::new(), &sender()).unwrap();
        assert!(applied.chord_sizes.is_empty() && applied.uses_chords);
        let plain =
            Signature::group(vec![add(json!([1, 1])), Signature::chain(vec![add(json!([1, 1])), add(json!([1]))])]);
        assert!(!apply(&plain, Call::new(), &sender()).unwrap().uses_chords);
    }
}
