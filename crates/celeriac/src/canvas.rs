//! Workflows from Rust: [`chain`], [`group`], [`chord`] and callbacks
//! ([`Signature::link`], [`Signature::link_error`], [`Signature::si`]), sent as Celery sends
//! them, so Python and celeriac workers carry them out alike.
//!
//! ```no_run
//! use celeriac::canvas::{chain, chord, group};
//! use celeriac::{Client, Signature};
//! # async fn demo(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
//! let add = |x: i64, y: i64| Signature::new("celeriac.add").arg(x).arg(y);
//! // ((1 + 2) + 10) + 100
//! let sum = chain([add(1, 2), Signature::new("celeriac.add").arg(10), Signature::new("celeriac.add").arg(100)])
//!     .apply_async(client)
//!     .await?;
//! assert_eq!(sum.get(None).await?, 113);
//! // sum([0, 2, 4, ...]) once every addition is done
//! let total = chord((0..10).map(|i| add(i, i)), Signature::new("celeriac.tsum")).apply_async(client).await?;
//! let parts = group((0..10).map(|i| add(i, i))).apply_async(client).await?;
//! let each = parts.as_group().expect("a group").get(None).await?;
//! # Ok(()) }
//! ```
//!
//! A workflow is a [`Canvas`]: Celery's signature dict (`celeriac_core::canvas::Signature`), which
//! [`Canvas::to_json`] writes and [`Canvas::from_json`] reads, so one built in Python
//! (`json.dumps(sig)`) can be sent from Rust and the other way round. Sending one returns a
//! [`ResultHandle`]: a task's [`AsyncResult`] (with its [`parent`](AsyncResult::parent), the
//! step before it in a chain, or a chord's header group) or a [`GroupResult`].
//!
//! A chord needs a result backend that joins chords (Redis, SQLite): on any other, sending one
//! (or a chain that reaches one, such as a group followed by a step) fails at once with
//! [`PublishError::Chord`], rather than leave its body never run.

use std::time::Duration;

use celeriac_core::canvas::{self as core, Call, ResultRef, Sender};
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use serde_json::{Map, Value};

use crate::client::{AsyncResult, Client, PublishError, ResultError, Signature};

/// Messages of one workflow published at a time, waiting for their confirms together.
const PUBLISH_IN_FLIGHT: usize = 256;

/// A workflow, in Celery's signature form: one task, a chain, a group or a chord.
#[derive(Debug, Clone, PartialEq)]
pub struct Canvas(pub core::Signature);

impl Canvas {
    /// Celery's JSON form (`json.dumps(dict(sig))`).
    pub fn to_json(&self) -> String {
        String::from_utf8(celeriac_core::pyjson::to_vec(&self.0.to_value()).unwrap_or_default()).unwrap_or_default()
    }

    /// Read Celery's JSON form; the error names what is wrong.
    pub fn from_json(text: &str) -> Result<Self, core::CanvasError> {
        let value = celeriac_core::pyjson::from_slice(text.as_bytes())
            .map_err(|e| core::CanvasError::NotASignature(format!("not JSON: {e}")))?;
        let sig = core::Signature::from_value(&value)?;
        sig.shape()?;
        Ok(Canvas(sig))
    }

    /// Add a callback: applied with this workflow's result (`link`).
    pub fn link(mut self, callback: impl Into<Canvas>) -> Self {
        self.0 = self.0.link(callback.into().0);
        self
    }

    /// Add an errback: applied with the failed task's id (`link_error`).
    pub fn link_error(mut self, errback: impl Into<Canvas>) -> Self {
        self.0 = self.0.link_error(errback.into().0);
        self
    }

    /// Send the workflow.
    pub async fn apply_async(self, client: &Client) -> Result<ResultHandle, PublishError> {
        client.apply_canvas(&self).await
    }
}

impl From<Signature> for Canvas {
    fn from(sig: Signature) -> Self {
        sig.to_canvas()
    }
}

impl From<&Signature> for Canvas {
    fn from(sig: &Signature) -> Self {
        sig.to_canvas()
    }
}

/// A chain: each task's result is the first argument of the next (Celery's `chain`).
pub fn chain<I: IntoIterator<Item = S>, S: Into<Canvas>>(tasks: I) -> Canvas {
    Canvas(core::Signature::chain(tasks.into_iter().map(|t| t.into().0).collect()))
}

/// A group: the tasks run in parallel; its result is the list of theirs, in order.
pub fn group<I: IntoIterator<Item = S>, S: Into<Canvas>>(tasks: I) -> Canvas {
    Canvas(core::Signature::group(tasks.into_iter().map(|t| t.into().0).collect()))
}

/// A chord: the `header` tasks run in parallel, then `body` with the list of their results.
pub fn chord<I: IntoIterator<Item = S>, S: Into<Canvas>>(header: I, body: impl Into<Canvas>) -> Canvas {
    Canvas(core::Signature::chord(header.into_iter().map(|t| t.into().0).collect(), body.into().0))
}

/// The result of a sent workflow.
#[derive(Debug, Clone)]
pub enum ResultHandle {
    /// One task's (a chain's last step, a chord's body).
    Task(AsyncResult),
    /// A group's.
    Group(GroupResult),
}

impl ResultHandle {
    /// The task or group id.
    pub fn id(&self) -> &str {
        match self {
            ResultHandle::Task(r) => r.id(),
            ResultHandle::Group(g) => &g.id,
        }
    }

    /// The group, if this is one.
    pub fn as_group(&self) -> Option<&GroupResult> {
        match self {
            ResultHandle::Group(g) => Some(g),
            ResultHandle::Task(_) => None,
        }
    }

    /// The task, if this is one.
    pub fn as_task(&self) -> Option<&AsyncResult> {
        match self {
            ResultHandle::Task(r) => Some(r),
            ResultHandle::Group(_) => None,
        }
    }

    /// The result before this one in the workflow that was sent: a chain's previous step, a
    /// chord body's header group (see [`AsyncResult::parent`]).
    pub fn parent(&self) -> Option<&ResultHandle> {
        match self {
            ResultHandle::Task(r) => r.parent(),
            ResultHandle::Group(g) => g.parent.as_deref(),
        }
    }

    /// Wait for it: a task's value, or a group's list of values in order.
    pub async fn get(&self, timeout: Option<Duration>) -> Result<Value, ResultError> {
        match self {
            ResultHandle::Task(r) => r.get(timeout).await,
            ResultHandle::Group(g) => g.get(timeout).await.map(Value::Array),
        }
    }

    pub(crate) fn from_ref(r: &ResultRef, client: &Client) -> Self {
        match r {
            ResultRef::Task { id, parent } => {
                let mut result = client.result(id.clone());
                result.parent = parent.as_ref().map(|p| Box::new(Self::from_ref(p, client)));
                ResultHandle::Task(result)
            }
            ResultRef::Group { id, parent, results } => ResultHandle::Group(GroupResult {
                id: id.clone(),
                results: results.iter().map(|r| Self::from_ref(r, client)).collect(),
                parent: parent.as_ref().map(|p| Box::new(Self::from_ref(p, client))),
            }),
        }
    }
}

/// The results of a group's tasks (Celery's `GroupResult`).
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// The group id.
    pub id: String,
    /// Its members, in order.
    pub results: Vec<ResultHandle>,
    /// The result before it in the workflow that was sent (a chain's previous step), as
    /// [`AsyncResult::parent`].
    pub parent: Option<Box<ResultHandle>>,
}

impl GroupResult {
    /// Save the group in the result backend, so any client (Python's `GroupResult.restore`,
    /// [`Client::restore_group`]) finds it by id (Celery's `GroupResult.save`).
    pub async fn save(&self, client: &Client) -> Result<(), ResultError> {
        client.backend().save_group(&self.to_ref()).await.map_err(ResultError::Backend)
    }

    fn to_ref(&self) -> ResultRef {
        fn one(h: &ResultHandle) -> ResultRef {
            match h {
                ResultHandle::Task(r) => ResultRef::task(r.id()),
                ResultHandle::Group(g) => g.to_ref(),
            }
        }
        ResultRef::Group { id: self.id.clone(), parent: None, results: self.results.iter().map(one).collect() }
    }

    /// Wait for every member and return their values in the group's order (a member that is
    /// itself a group gives a list); the first failure, in that order, is the error. `timeout`
    /// bounds the whole wait.
    pub async fn get(&self, timeout: Option<Duration>) -> Result<Vec<Value>, ResultError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut out = Vec::with_capacity(self.results.len());
        for member in &self.results {
            let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            out.push(Box::pin(member.get(left)).await?);
        }
        Ok(out)
    }
}

impl Client {
    /// A group saved with [`GroupResult::save`] or Python's `GroupResult.save()`, `None` when
    /// there is none (Celery's `GroupResult.restore`).
    pub async fn restore_group(&self, group_id: &str) -> Result<Option<GroupResult>, ResultError> {
        let saved = self.backend().restore_group(group_id).await.map_err(ResultError::Backend)?;
        Ok(saved.map(|r| ResultHandle::from_ref(&r, self)).and_then(|h| match h {
            ResultHandle::Group(g) => Some(g),
            ResultHandle::Task(_) => None,
        }))
    }

    /// Send a workflow: every message it starts with, after recording the size of each chord it
    /// sends (refused at once when the result backend cannot join chords and the workflow runs
    /// one, now or in a later step of a chain).
    pub async fn apply_canvas(&self, canvas: &Canvas) -> Result<ResultHandle, PublishError> {
        let name = canvas.0.task.clone();
        let no_task_options = |_: &str| None;
        let sender = Sender {
            origin: self.origin(),
            default_queue: self.default_queue(),
            now: Utc::now(),
            task_options: &no_task_options,
        };
        let applied = core::apply(&canvas.0, Call::new(), &sender)
            .map_err(|e| PublishError::Canvas { task: name.clone(), source: e })?;
        for option in &applied.ignored_options {
            tracing::warn!(task_name = %name, %option, "option not supported by celeriac: ignored");
        }
        if applied.uses_chords && !self.backend().supports_chords() {
            return Err(PublishError::Chord { task: name, backend: self.backend().url().to_string() });
        }
        for (group_id, size) in &applied.chord_sizes {
            self.backend()
                .set_chord_size(group_id, *size)
                .await
                .map_err(|source| PublishError::ReplyQueue { task: name.clone(), source })?;
        }
        let reply_to = self
            .backend()
            .reply_to()
            .await
            .map_err(|source| PublishError::ReplyQueue { task: name.clone(), source })?;
        // Pipelined: a chord of 10,000 header tasks waited 10,000 confirms one after another
        // before. Started in order, so the broker receives them in the plan's order; on a
        // failure the first error is returned and the publishes not yet started are not sent.
        let publishes = applied.publish.into_iter().map(|mut out| {
            if out.message.properties.reply_to.is_none() {
                out.message.properties.reply_to = reply_to.clone();
            }
            async move { self.publish_message(&out.task, &out.queue, &out.message).await }
        });
        futures::stream::iter(publishes).buffered(PUBLISH_IN_FLIGHT).try_collect::<()>().await?;
        Ok(ResultHandle::from_ref(&applied.result, self))
    }
}

impl Signature {
    /// Add a callback, applied with this task's result (Celery's `link`).
    pub fn link(mut self, callback: impl Into<Canvas>) -> Self {
        self.options.link.push(callback.into().0.to_value());
        self
    }

    /// Add an errback, applied with this task's id if it fails (Celery's `link_error`).
    pub fn link_error(mut self, errback: impl Into<Canvas>) -> Self {
        self.options.link_error.push(errback.into().0.to_value());
        self
    }

    /// An immutable signature (Celery's `si`): in a chain or as a callback it takes no argument
    /// from the task before it.
    pub fn si(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Celery's signature dict of this call: its options as `apply_async` names them.
    pub fn to_canvas(&self) -> Canvas {
        let o = &self.options;
        let mut options = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                options.insert(k.to_string(), v);
            }
        };
        put("task_id", o.task_id.clone().map(Value::String));
        put("countdown", o.countdown.and_then(celeriac_core::protocol::seconds_number).map(Value::Number));
        put("eta", o.eta.map(|t| Value::String(celeriac_core::protocol::format_datetime(t))));
        put("expires", o.expires.map(|t| Value::String(celeriac_core::protocol::format_datetime(t))));
        put("queue", o.queue.clone().map(Value::String));
        put("priority", o.priority.map(Value::from));
        put("time_limit", o.time_limit.and_then(celeriac_core::protocol::seconds_number).map(Value::Number));
        put("soft_time_limit", o.soft_time_limit.and_then(celeriac_core::protocol::seconds_number).map(Value::Number));
        put("ignore_result", o.ignore_result.map(Value::Bool));
        put("link", (!o.link.is_empty()).then(|| Value::Array(o.link.clone())));
        put("link_error", (!o.link_error.is_empty()).then(|| Value::Array(o.link_error.clone())));
        Canvas(core::Signature {
            task: self.name.clone(),
            args: self.args.clone(),
            kwargs: self.kwargs.clone(),
            options,
            subtask_type: None,
            immutable: self.immutable,
            extra: Map::new(),
        })
    }
}
