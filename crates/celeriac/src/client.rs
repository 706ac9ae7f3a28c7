//! Sending tasks and reading their results.
//!
//! - [`Client`]: a broker and a result backend; `send_task` by name for tasks not linked into
//!   this binary, `apply` for a [`Signature`].
//! - [`Signature`]: a task call (name, arguments, options) not sent yet; the `s()` of a
//!   `#[celeriac::task]` builds one.
//! - [`AsyncResult`]: a handle on a sent task: `state`, `get`, `forget`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::protocol::{expiration_property, format_datetime, seconds_number};
use celeriac_core::{
    pyrepr, BackendError, Broker, BrokerError, Codec, Message, ProtocolError, PublishPolicy, ResultBackend, ResultMeta,
    Task, TaskBody, TaskHeaders, TaskOptions, TaskState,
};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::connect::{self, ConnectError};

/// Why a task could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// An argument or option could not be encoded.
    #[error("cannot encode task {task}: {source}")]
    Encode {
        /// The task name.
        task: String,
        /// What failed.
        source: ProtocolError,
    },
    /// The broker refused the message (unroutable, nacked, declared differently): retrying
    /// would not help.
    #[error("cannot publish task {task}: {source}")]
    Broker {
        /// The task name.
        task: String,
        /// The broker's error.
        source: BrokerError,
    },
    /// The broker could not be reached within the publish retry policy.
    #[error(
        "cannot publish task {task}: broker {broker} unreachable after {attempts} attempt{} in {:.2}s: {source}",
        if *attempts == 1 { "" } else { "s" },
        elapsed.as_secs_f64()
    )]
    Unreachable {
        /// The task name.
        task: String,
        /// The broker URL (password removed).
        broker: String,
        /// Attempts made.
        attempts: u32,
        /// Time from the first attempt to giving up.
        elapsed: Duration,
        /// The last attempt's error.
        source: BrokerError,
    },
    /// The workflow is malformed (a chain with no task, a signature with no `task`, ...).
    #[error("cannot send workflow {task}: {source}")]
    Canvas {
        /// The workflow's task name (`celery.chain`, ...).
        task: String,
        /// What is wrong.
        source: celeriac_core::canvas::CanvasError,
    },
    /// The workflow holds a chord and the result backend cannot join chords: its body would
    /// never run, so nothing is sent.
    #[error("cannot send workflow {task}: it holds a chord, and the result backend {backend} cannot join chords (use a Redis or SQLite result backend)")]
    Chord {
        /// The workflow's task name.
        task: String,
        /// The backend URL.
        backend: String,
    },
    /// The result backend could not set up the queue the result is to come back on (`rpc://`
    /// declares the client's reply queue before the first send).
    #[error("cannot send task {task}: no reply queue for its result: {source}")]
    ReplyQueue {
        /// The task name.
        task: String,
        /// The backend's error.
        source: BackendError,
    },
}

/// Why a result could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// The task failed; this is its error.
    #[error("task {task_id} failed: {exc_type}: {message}")]
    Failed {
        /// The task id.
        task_id: String,
        /// The error type (`ValueError`, `TimeLimitExceeded`, ...).
        exc_type: String,
        /// The error message.
        message: String,
        /// The module of the error type.
        exc_module: String,
        /// The traceback, when there is one.
        traceback: Option<String>,
    },
    /// The task was revoked (or expired) before it ran.
    #[error("task {task_id} was revoked: {reason}")]
    Revoked {
        /// The task id.
        task_id: String,
        /// Why.
        reason: String,
    },
    /// No result arrived in time.
    #[error("no result for task {task_id} within {waited:?}")]
    Timeout {
        /// The task id.
        task_id: String,
        /// How long was waited.
        waited: Duration,
    },
    /// The result could not be turned into the requested type.
    #[error("the result of task {task_id} is not the expected type: {reason}")]
    Decode {
        /// The task id.
        task_id: String,
        /// Why.
        reason: String,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(BackendError),
}

/// Options for sending one task (Celery's `apply_async` options).
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Use this id instead of a fresh UUID.
    pub task_id: Option<String>,
    /// Run no sooner than this many seconds from now.
    pub countdown: Option<f64>,
    /// Run no sooner than this time (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// Discard if not started by this time (also sets the message's `expiration` property, the
    /// milliseconds left, as Celery does).
    pub expires: Option<DateTime<Utc>>,
    /// Queue to send to.
    pub queue: Option<String>,
    /// Priority. RabbitMQ and SQLite deliver higher numbers first (0-255); Redis, as kombu
    /// emulates priorities there, delivers *lower* numbers first (0 highest, 9 lowest).
    pub priority: Option<u8>,
    /// Retries already made (Celery's `retries`).
    pub retries: u32,
    /// Hard time limit, seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit, seconds.
    pub soft_time_limit: Option<f64>,
    /// Do not store a result. `None` (a task sent by name) writes `null`, as Celery's
    /// `send_task` of a task it does not know: the worker's task option decides.
    pub ignore_result: Option<bool>,
    /// Compress the body with this codec, as kombu's `compression=` does: the body is the
    /// compressed JSON and the `compression` header names the codec (Celery and celeriac
    /// workers decompress it).
    pub compression: Option<Codec>,
    /// Callbacks (Celery's `link`): signature dicts applied with the task's result after it
    /// succeeds (see [`Signature::link`]).
    pub link: Vec<Value>,
    /// Errbacks (Celery's `link_error`): signature dicts applied with the task's id if it fails.
    pub link_error: Vec<Value>,
}

impl SendOptions {
    /// Options taking a task's own defaults (queue, time limits, ignore_result).
    pub fn from_task_options(o: &TaskOptions) -> Self {
        SendOptions {
            queue: o.queue.clone(),
            time_limit: o.time_limit,
            soft_time_limit: o.soft_time_limit,
            ignore_result: Some(o.ignore_result),
            ..SendOptions::default()
        }
    }
}

/// A task call not sent yet: name, arguments and options.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The task name.
    pub name: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Send options.
    pub options: SendOptions,
    /// Takes no argument from the task before it in a chain or as a callback (Celery's `si`).
    pub immutable: bool,
    encode_error: Option<String>,
}

impl Signature {
    /// A call of the task named `name` with no arguments.
    pub fn new(name: impl Into<String>) -> Self {
        Signature {
            name: name.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            options: SendOptions::default(),
            immutable: false,
            encode_error: None,
        }
    }

    /// A call of `task`, with the task's own default options.
    pub fn for_task<T: Task>(task: &T) -> Self {
        let mut s = Signature::new(task.name());
        s.options = SendOptions::from_task_options(&task.options());
        s
    }

    fn value<T: Serialize + 'static>(&mut self, v: T) -> Value {
        celeriac_core::pyjson::to_value(v).unwrap_or_else(|e| {
            self.encode_error.get_or_insert_with(|| e.to_string());
            Value::Null
        })
    }

    /// Add a positional argument.
    pub fn arg<T: Serialize + 'static>(mut self, v: T) -> Self {
        let v = self.value(v);
        self.args.push(v);
        self
    }

    /// Add a keyword argument.
    pub fn kwarg<T: Serialize + 'static>(mut self, name: impl Into<String>, v: T) -> Self {
        let v = self.value(v);
        self.kwargs.insert(name.into(), v);
        self
    }

    /// Run no sooner than `secs` seconds after sending.
    pub fn countdown(mut self, secs: f64) -> Self {
        self.options.countdown = Some(secs);
        self
    }

    /// Run no sooner than `eta`.
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.options.eta = Some(eta);
        self
    }

    /// Discard if not started by `at`.
    pub fn expires(mut self, at: DateTime<Utc>) -> Self {
        self.options.expires = Some(at);
        self
    }

    /// Use this task id instead of a fresh UUID (Celery's `set(task_id=...)`): a callback,
    /// errback or chain step whose result is to be read is given its id before it is sent.
    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.options.task_id = Some(id.into());
        self
    }

    /// Send to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.options.queue = Some(queue.into());
        self
    }

    /// Send with `priority`.
    pub fn priority(mut self, priority: u8) -> Self {
        self.options.priority = Some(priority);
        self
    }

    /// Send with the body compressed by `codec`.
    pub fn compression(mut self, codec: Codec) -> Self {
        self.options.compression = Some(codec);
        self
    }

    /// Replace all options.
    pub fn with_options(mut self, options: SendOptions) -> Self {
        self.options = options;
        self
    }

    /// Send it.
    pub async fn apply_async(self, client: &Client) -> Result<AsyncResult, PublishError> {
        client.apply(self).await
    }
}

/// Sends tasks and reads results.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    default_queue: String,
    origin: String,
    policy: PublishPolicy,
    /// Send a `task-sent` event after each publish (Celery's `task_send_sent_event`).
    sent_events: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("broker", &self.broker.url()).field("backend", &self.backend.url()).finish()
    }
}

impl Client {
    /// A client on an already open broker and backend.
    pub fn new(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> Self {
        let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        Client {
            broker,
            backend,
            default_queue: celeriac_core::DEFAULT_QUEUE.into(),
            origin: format!("gen{}@{host}", std::process::id()),
            policy: PublishPolicy::default(),
            sent_events: false,
        }
    }

    /// Send a `task-sent` event on `celeryev` after each task is published, as Celery does with
    /// `task_send_sent_event` (off by default; only on brokers with exchanges).
    pub fn with_sent_events(mut self, on: bool) -> Self {
        self.sent_events = on;
        self
    }

    /// Publish the `task-sent` event of a message just sent to `queue`; failures are logged and
    /// ignored (an event is never worth failing a send for).
    async fn send_sent_event(&self, queue: &str, message: &Message) {
        use celeriac_worker::events;
        let Some(exchanges) = self.broker.exchanges() else { return };
        let Ok(h) = message.task_headers() else { return };
        let opt = |v: Option<String>| v.map(Value::from).unwrap_or(Value::Null);
        let mut fields = Map::new();
        fields.insert("uuid".into(), Value::from(h.id.as_str()));
        fields.insert("root_id".into(), opt(h.root_id.clone()));
        fields.insert("parent_id".into(), opt(h.parent_id.clone()));
        fields.insert("name".into(), Value::from(h.task.as_str()));
        fields.insert("args".into(), opt(h.argsrepr.clone()));
        fields.insert("kwargs".into(), opt(h.kwargsrepr.clone()));
        fields.insert("retries".into(), Value::from(h.retries));
        fields.insert("eta".into(), opt(h.eta_time().map(|t| t.to_rfc3339())));
        fields.insert("expires".into(), opt(h.expires_time().map(|t| t.to_rfc3339())));
        fields.insert("queue".into(), Value::from(queue));
        fields.insert("exchange".into(), Value::from(queue));
        fields.insert("routing_key".into(), Value::from(queue));
        static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let clock = CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let body = events::event_body("task-sent", &self.origin, std::process::id(), clock, fields);
        let event = events::event_message(&self.origin, &Value::Object(body));
        let spec = events::exchange(exchanges.events_as_fanout());
        let sent = exchanges.publish_to(&spec, "task.sent", &event);
        match tokio::time::timeout(std::time::Duration::from_secs(2), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(task_id = %h.id, error = %e, "cannot publish the task-sent event"),
            Err(_) => tracing::debug!(task_id = %h.id, "publishing the task-sent event timed out"),
        }
    }

    /// Open the broker at `broker_url` and the result backend at `backend_url` (by default the
    /// broker's own SQLite file, or none for other brokers).
    pub async fn connect(broker_url: &str, backend_url: Option<&str>) -> Result<Self, ConnectError> {
        let broker = connect::broker(broker_url)?;
        let backend = connect::backend(backend_url, broker_url)?;
        Ok(Client::new(broker, backend))
    }

    /// Send to `queue` when a task names no queue (default `celery`).
    pub fn with_default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = queue.into();
        self
    }

    /// Name this client as the `origin` of its messages (default `gen<pid>@<host>`, as Celery).
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &Arc<dyn ResultBackend> {
        &self.backend
    }

    /// Send a task by name (Celery's `send_task`).
    pub async fn send_task(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<AsyncResult, PublishError> {
        self.publish(name, args, kwargs, options, false).await
    }

    /// Send a signature.
    pub async fn apply(&self, sig: Signature) -> Result<AsyncResult, PublishError> {
        if let Some(e) = sig.encode_error {
            return Err(PublishError::Encode { task: sig.name, source: ProtocolError::Encode(e) });
        }
        self.publish(&sig.name, sig.args, sig.kwargs, sig.options, true).await
    }

    /// Build the protocol v2 message for a call, as Celery's `apply_async` would.
    pub fn build_message(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: &SendOptions,
        args_tuple: bool,
    ) -> Result<Message, ProtocolError> {
        self.build_message_at(name, args, kwargs, options, args_tuple, Utc::now())
    }

    /// [`build_message`](Self::build_message) as sent at `now` (Celery's `app.now()`): `countdown`
    /// and the `expiration` property are counted from it.
    pub fn build_message_at(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: &SendOptions,
        args_tuple: bool,
        now: DateTime<Utc>,
    ) -> Result<Message, ProtocolError> {
        let id = options.task_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut h = TaskHeaders::new(name, id.clone());
        let eta = options.eta.or_else(|| {
            options.countdown.filter(|c| *c > 0.0).map(|c| now + chrono::Duration::microseconds((c * 1e6) as i64))
        });
        h.eta = eta.map(format_datetime);
        h.expires = options.expires.map(format_datetime);
        h.retries = options.retries;
        h.timelimit = (options.time_limit.and_then(seconds_number), options.soft_time_limit.and_then(seconds_number));
        h.root_id = Some(id);
        h.argsrepr = Some(pyrepr::args_repr(&args, args_tuple));
        h.kwargsrepr = Some(pyrepr::kwargs_repr(&kwargs));
        h.origin = Some(self.origin.clone());
        h.ignore_result = options.ignore_result;
        let list = |v: &Vec<Value>| (!v.is_empty()).then(|| Value::Array(v.clone()));
        let embed = celeriac_core::Embed {
            callbacks: list(&options.link),
            errbacks: list(&options.link_error),
            ..Default::default()
        };
        let body = TaskBody { args, kwargs, embed };
        let mut message = Message::new_task(&h, &body, options.priority, None)?;
        message.properties.expiration = options.expires.map(|at| expiration_property(at, now));
        if let Some(codec) = options.compression {
            // After every other header, where kombu's producer adds it.
            message.compress(codec)?;
        }
        Ok(message)
    }

    async fn publish(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
        args_tuple: bool,
    ) -> Result<AsyncResult, PublishError> {
        let queue = options.queue.clone().unwrap_or_else(|| self.default_queue.clone());
        let mut message = self
            .build_message(name, args, kwargs, &options, args_tuple)
            .map_err(|source| PublishError::Encode { task: name.to_string(), source })?;
        // The RPC backend's results come back on this client's reply queue (Celery's `reply_to`).
        message.properties.reply_to = self
            .backend
            .reply_to()
            .await
            .map_err(|source| PublishError::ReplyQueue { task: name.to_string(), source })?;
        let id = message.task_id().unwrap_or_default().to_string();
        self.publish_message(name, &queue, &message).await?;
        Ok(self.result(id))
    }

    /// Publish a built message under the retry policy (and its `task-sent` event, if on).
    pub(crate) async fn publish_message(&self, name: &str, queue: &str, message: &Message) -> Result<(), PublishError> {
        self.publish_with_policy(name, queue, message).await?;
        tracing::debug!(task_id = message.task_id().unwrap_or_default(), task_name = %name, %queue, "task sent");
        if self.sent_events {
            self.send_sent_event(queue, message).await;
        }
        Ok(())
    }

    /// The `origin` header of the messages this client sends.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The queue of a task sent with none named.
    pub fn default_queue(&self) -> &str {
        &self.default_queue
    }

    /// Publish under the retry policy: retry what may pass (unreachable, timed out, connection
    /// lost), never what the broker refused, and give up by the policy's bound.
    async fn publish_with_policy(&self, task: &str, queue: &str, message: &Message) -> Result<(), PublishError> {
        let policy = self.policy;
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = self.broker.publish(queue, message);
            let result = match policy.timeout {
                Some(total) => {
                    let left = total.saturating_sub(started.elapsed());
                    match tokio::time::timeout(left, attempt).await {
                        Ok(r) => r,
                        Err(_) => Err(BrokerError::Timeout {
                            url: self.broker.url().to_string(),
                            operation: "publish".into(),
                            elapsed: started.elapsed(),
                        }),
                    }
                }
                None => attempt.await,
            };
            let error = match result {
                Ok(()) => return Ok(()),
                Err(e @ (BrokerError::Rejected { .. } | BrokerError::BadUrl { .. })) => {
                    return Err(PublishError::Broker { task: task.to_string(), source: e })
                }
                Err(e) => e,
            };
            let pause = policy.interval(attempts - 1);
            let out_of_time = policy.timeout.is_some_and(|t| started.elapsed() + pause >= t);
            if attempts > policy.max_retries || out_of_time {
                return Err(PublishError::Unreachable {
                    task: task.to_string(),
                    broker: self.broker.url().to_string(),
                    attempts,
                    elapsed: started.elapsed(),
                    source: error,
                });
            }
            tracing::warn!(task_name = %task, broker = %self.broker.url(), attempt = attempts, error = %error, retry_in = ?pause, "publish failed; retrying");
            celeriac_core::telemetry::publish_retried();
            tokio::time::sleep(pause).await;
        }
    }

    /// Use this publish retry policy (default: Celery's, 3 retries 0.2 s apart).
    pub fn with_publish_policy(mut self, policy: PublishPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// A handle on the result of the task with this id.
    pub fn result(&self, id: impl Into<String>) -> AsyncResult {
        AsyncResult { id: id.into(), backend: self.backend.clone(), client: self.clone(), parent: None }
    }
}

/// A handle on a sent task's result.
#[derive(Clone)]
pub struct AsyncResult {
    id: String,
    backend: Arc<dyn ResultBackend>,
    client: Client,
    /// The result before it in a workflow, when this handle came from sending one.
    pub(crate) parent: Option<Box<crate::canvas::ResultHandle>>,
}

impl std::fmt::Debug for AsyncResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult").field("id", &self.id).finish()
    }
}

impl AsyncResult {
    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored result, if any.
    pub async fn meta(&self) -> Result<Option<ResultMeta>, ResultError> {
        self.backend.get(&self.id).await.map_err(ResultError::Backend)
    }

    /// The task's state (`PENDING` when nothing is stored).
    pub async fn state(&self) -> Result<TaskState, ResultError> {
        Ok(self.meta().await?.map(|m| m.status).unwrap_or(TaskState::Pending))
    }

    /// Wait for the task to finish and return its value, or its error.
    pub async fn get(&self, timeout: Option<Duration>) -> Result<Value, ResultError> {
        let meta = self.backend.wait(&self.id, timeout).await.map_err(|e| match e {
            BackendError::Timeout { task_id, waited } => ResultError::Timeout { task_id, waited },
            other => ResultError::Backend(other),
        })?;
        into_value(meta)
    }

    /// Wait for the task and decode its value as `T`.
    pub async fn get_as<T: DeserializeOwned + 'static>(&self, timeout: Option<Duration>) -> Result<T, ResultError> {
        let v = self.get(timeout).await?;
        celeriac_core::pyjson::from_value(v)
            .map_err(|e| ResultError::Decode { task_id: self.id.clone(), reason: e.to_string() })
    }

    /// The result before this one in the workflow that was sent: a chain's previous step, a
    /// chord body's header group. Known only to the handle returned by sending the workflow (as
    /// in Celery, where `parent` is never read back from the backend).
    pub fn parent(&self) -> Option<&crate::canvas::ResultHandle> {
        self.parent.as_deref()
    }

    /// What the task sent (its stored `children`: callbacks, the next chain step, groups), as
    /// handles; empty when the task has not finished or sent nothing.
    pub async fn children(&self) -> Result<Vec<crate::canvas::ResultHandle>, ResultError> {
        let Some(meta) = self.meta().await? else { return Ok(Vec::new()) };
        let client = &self.client;
        let items = meta.children.as_array().cloned().unwrap_or_default();
        Ok(items
            .iter()
            .filter_map(celeriac_core::canvas::ResultRef::from_tuple)
            .map(|r| crate::canvas::ResultHandle::from_ref(&r, client))
            .collect())
    }

    /// Remove the stored result.
    pub async fn forget(&self) -> Result<(), ResultError> {
        self.backend.forget(&self.id).await.map_err(ResultError::Backend)
    }
}

/// Turn a ready result into the task's value or its error.
pub fn into_value(meta: ResultMeta) -> Result<Value, ResultError> {
    match meta.status {
        TaskState::Success => Ok(meta.result),
        TaskState::Revoked => {
            let reason = meta.exception_info().map(|e| e.message()).unwrap_or_else(|| "revoked".into());
            Err(ResultError::Revoked { task_id: meta.task_id, reason })
        }
        _ => {
            let exc = meta.exception_info();
            Err(ResultError::Failed {
                task_id: meta.task_id.clone(),
                exc_type: exc.as_ref().map(|e| e.exc_type.clone()).unwrap_or_else(|| "Exception".into()),
                message: exc.as_ref().map(|e| e.message()).unwrap_or_else(|| meta.result.to_string()),
                exc_module: exc.map(|e| e.exc_module).unwrap_or_else(|| "builtins".into()),
                traceback: meta.traceback,
            })
        }
    }
}
