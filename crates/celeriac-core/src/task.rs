//! Tasks: the registry, task options, the context a running task sees, and the error it returns.
//!
//! A task is anything implementing [`Task`]: a name, [`TaskOptions`], and a call taking the
//! decoded arguments. `#[celeriac::task]` generates the implementation for a Rust function; the
//! [`Registry`] maps task names to tasks for the worker. Argument decoding follows Python's
//! rules (positional first, then keywords by parameter name) and reports mistakes as Python's
//! `TypeError` would, so a Python caller sees the error it expects.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::result::ExceptionInfo;
use crate::retry::Backoff;

/// A boxed future returned by a task.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send + 'static>>;

/// A registered task.
pub trait Task: Send + Sync + 'static {
    /// The task's name, as it appears on the wire.
    fn name(&self) -> &str;
    /// The task's options.
    fn options(&self) -> TaskOptions;
    /// Run the task with the given arguments.
    fn call(&self, ctx: TaskContext, args: Vec<Value>, kwargs: Map<String, Value>) -> TaskFuture;
}

/// Per-task options, with Celery's names and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Queue to send to when the caller names none (`None`: the client's default queue).
    pub queue: Option<String>,
    /// How many times the task may be retried (`None`: forever). Celery's default is 3.
    pub max_retries: Option<u32>,
    /// Delay schedule between retries.
    pub backoff: Backoff,
    /// Error type names (`exc_type`) that trigger an automatic retry.
    pub autoretry_for: Vec<String>,
    /// Hard time limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
    /// Do not store the result: no SUCCESS, nor, unless `store_errors_even_if_ignored`, a
    /// FAILURE, RETRY or REVOKED (Celery's `ignore_result`, `celery/app/trace.py`).
    pub ignore_result: bool,
    /// With `ignore_result`, still store a FAILURE, RETRY or REVOKED (Celery's
    /// `store_errors_even_if_ignored`, false by default).
    pub store_errors_even_if_ignored: bool,
    /// Celery's `rate_limit`: at most this many starts per second, minute or hour on each
    /// worker (`"10/s"`, `"100/m"`, `"1000/h"`, a bare number per second; `None`: no limit).
    /// The worker reads it at start-up and refuses to start on a value it cannot parse; remote
    /// control's `rate_limit` replaces it while the worker runs.
    pub rate_limit: Option<String>,
    /// Whether the function blocks a thread (runs on the blocking pool) rather than being async.
    pub blocking: bool,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            queue: None,
            max_retries: Some(3),
            backoff: Backoff::default(),
            autoretry_for: Vec::new(),
            time_limit: None,
            soft_time_limit: None,
            ignore_result: false,
            store_errors_even_if_ignored: false,
            rate_limit: None,
            blocking: false,
        }
    }
}

/// What a running task knows about itself (Celery's `self.request`).
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task id.
    pub id: String,
    /// The task name.
    pub name: String,
    /// How many times this task has been retried so far.
    pub retries: u32,
    /// The maximum retries allowed for it.
    pub max_retries: Option<u32>,
    /// The queue it was delivered from.
    pub queue: String,
    /// ETA it was scheduled for.
    pub eta: Option<DateTime<Utc>>,
    /// When it expires.
    pub expires: Option<DateTime<Utc>>,
    /// Root task of its workflow.
    pub root_id: Option<String>,
    /// Task that sent it.
    pub parent_id: Option<String>,
    /// Its group.
    pub group: Option<String>,
    /// How many times the message has been delivered (1 on first delivery).
    pub delivery_count: u32,
    /// The worker running it.
    pub hostname: String,
    soft_limit: Option<tokio::sync::watch::Receiver<bool>>,
}

impl TaskContext {
    /// A context for running a task outside a worker (tests, direct calls).
    pub fn detached(id: impl Into<String>, name: impl Into<String>) -> Self {
        TaskContext {
            id: id.into(),
            name: name.into(),
            retries: 0,
            max_retries: None,
            queue: crate::DEFAULT_QUEUE.into(),
            eta: None,
            expires: None,
            root_id: None,
            parent_id: None,
            group: None,
            delivery_count: 1,
            hostname: String::new(),
            soft_limit: None,
        }
    }

    /// Attach the soft time limit signal (set by the worker).
    pub fn with_soft_limit(mut self, rx: tokio::sync::watch::Receiver<bool>) -> Self {
        self.soft_limit = Some(rx);
        self
    }

    /// Whether the soft time limit has passed. A long task checks this and stops cleanly.
    pub fn soft_time_limit_exceeded(&self) -> bool {
        self.soft_limit.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Wait until the soft time limit passes (forever if there is none). Use in `select!` to
    /// stop cleanly.
    pub async fn soft_time_limit(&self) {
        match &self.soft_limit {
            Some(rx) => {
                let mut rx = rx.clone();
                while !*rx.borrow_and_update() {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
            None => std::future::pending().await,
        }
    }

    /// An error asking the worker to retry this task after its backoff delay.
    pub fn retry(&self) -> TaskError {
        TaskError::retry(None)
    }

    /// An error asking the worker to retry this task after `countdown`.
    pub fn retry_in(&self, countdown: Duration) -> TaskError {
        TaskError::retry(Some(countdown))
    }
}

/// A request for a retry carried by a [`TaskError`].
#[derive(Debug, Clone, PartialEq)]
pub struct RetryRequest {
    /// Delay before the retry (`None`: the task's backoff schedule).
    pub countdown: Option<Duration>,
    /// The retry's message was already published by the task's own code (a Python task's
    /// `self.retry()`, which sends the new message as Celery's does): the worker stores RETRY
    /// and does not publish another.
    pub sent: bool,
}

/// The error a task returns: a Python-style exception (type, message, module), optionally asking
/// for a retry.
///
/// Any `std::error::Error` converts into it (the type name becomes `exc_type`), so `?` works in
/// tasks. `TaskError` itself deliberately does not implement `std::error::Error`, which is what
/// makes that blanket conversion possible.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    /// Exception type name (`ValueError`, `ParseIntError`, ...).
    pub exc_type: String,
    /// The message.
    pub message: String,
    /// Module of the type (`builtins` for Python's own exceptions).
    pub module: String,
    /// The error chain or traceback text, if any.
    pub traceback: Option<String>,
    /// Set when the task asks to be retried.
    pub retry: Option<RetryRequest>,
    /// The exception's arguments as Python has them (`exc.args`), when they are not just the
    /// message (a Python task's exception); stored as the result's `exc_message`.
    pub args: Option<Box<Value>>,
}

impl TaskError {
    /// An error of the given type with a message.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError {
            exc_type: exc_type.into(),
            message: message.into(),
            module: "builtins".into(),
            traceback: None,
            retry: None,
            args: None,
        }
    }

    /// Set the module of the error type.
    pub fn with_module(mut self, module: impl Into<String>) -> Self {
        self.module = module.into();
        self
    }

    /// An error from anything displayable, typed `Error`.
    pub fn msg(message: impl fmt::Display) -> Self {
        TaskError::new("Error", message.to_string()).with_module("celeriac")
    }

    /// Celery's `NotRegistered(name)` (`celery.exceptions`): its argument is the name, its
    /// message the name quoted, as Python's `str()` of the `KeyError` it is.
    pub fn not_registered(name: &str) -> Self {
        let mut e = TaskError::new("NotRegistered", format!("'{name}'")).with_module("celery.exceptions");
        e.args = Some(Box::new(Value::Array(vec![Value::String(name.to_string())])));
        e
    }

    /// Python's `TypeError`: wrong arguments.
    pub fn type_error(message: impl Into<String>) -> Self {
        TaskError::new("TypeError", message)
    }

    /// Ask for a retry after `countdown` (or the task's backoff when `None`).
    pub fn retry(countdown: Option<Duration>) -> Self {
        TaskError {
            exc_type: "Retry".into(),
            message: "Retry requested".into(),
            module: "celery.exceptions".into(),
            traceback: None,
            retry: Some(RetryRequest { countdown, sent: false }),
            args: None,
        }
    }

    /// This error, asking for a retry.
    pub fn and_retry(mut self, countdown: Option<Duration>) -> Self {
        self.retry = Some(RetryRequest { countdown, sent: false });
        self
    }

    /// The error as Celery's stored exception.
    pub fn to_exception(&self) -> ExceptionInfo {
        let mut exc = ExceptionInfo::new(self.exc_type.clone(), self.message.clone(), self.module.clone());
        if let Some(args) = &self.args {
            exc.exc_message = Value::clone(args);
        }
        exc
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message)
    }
}

impl<E: std::error::Error + 'static> From<E> for TaskError {
    fn from(err: E) -> Self {
        let full = std::any::type_name::<E>();
        let path = full.split('<').next().unwrap_or(full);
        let (module, name) = path.rsplit_once("::").unwrap_or(("", path));
        let mut chain = Vec::new();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push(format!("caused by: {s}"));
            source = s.source();
        }
        TaskError {
            exc_type: name.to_string(),
            message: err.to_string(),
            module: module.replace("::", "."),
            traceback: (!chain.is_empty()).then(|| chain.join("\n")),
            retry: None,
            args: None,
        }
    }
}

/// Decodes a task's arguments by Python's rules, one parameter at a time.
///
/// Used by the code `#[celeriac::task]` generates.
#[derive(Debug)]
pub struct ArgDecoder {
    task: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    params: usize,
}

impl ArgDecoder {
    /// Start decoding `args` and `kwargs` for the named task.
    pub fn new(task: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        ArgDecoder { task: task.to_string(), args, kwargs, params: 0 }
    }

    /// Decode the parameter at `index` called `name`.
    ///
    /// A `Value`, `Option<Value>` or `Number` parameter receives the argument exactly as it came. For other types
    /// every number is checked on the way in ([`crate::strict`]): one the type cannot hold fails
    /// with Python's `OverflowError` (an `i64` given `2**70`, an `f64` given `10**400`) or
    /// `TypeError` (an integer type given `1.5`), naming the argument and the value; nothing is
    /// rounded, wrapped or turned into `inf` in silence.
    pub fn take<T: DeserializeOwned + 'static>(&mut self, index: usize, name: &str) -> Result<T, TaskError> {
        self.params = self.params.max(index + 1);
        let value = if index < self.args.len() {
            if self.kwargs.contains_key(name) {
                return Err(TaskError::type_error(format!(
                    "{}() got multiple values for argument '{name}'",
                    self.task
                )));
            }
            std::mem::take(&mut self.args[index])
        } else if let Some(v) = self.kwargs.remove(name) {
            v
        } else {
            // A missing argument is `null`: fine for `Option<T>`, an error for anything else.
            return serde_json::from_value(Value::Null)
                .map_err(|_| TaskError::type_error(format!("{}() missing required argument: '{name}'", self.task)));
        };
        decode_arg(&self.task, name, value)
    }

    /// Check that no argument was left over.
    pub fn finish(self) -> Result<(), TaskError> {
        if self.args.len() > self.params {
            return Err(TaskError::type_error(format!(
                "{}() takes {} positional argument{} but {} were given",
                self.task,
                self.params,
                if self.params == 1 { "" } else { "s" },
                self.args.len()
            )));
        }
        if let Some(k) = self.kwargs.keys().next() {
            return Err(TaskError::type_error(format!("{}() got an unexpected keyword argument '{k}'", self.task)));
        }
        Ok(())
    }
}

/// One argument as `T`, refusing a number `T` cannot hold (see [`ArgDecoder::take`]).
fn decode_arg<T: DeserializeOwned + 'static>(task: &str, name: &str, value: Value) -> Result<T, TaskError> {
    let any = std::any::TypeId::of::<T>();
    if any == std::any::TypeId::of::<serde_json::Number>() && !value.is_number() {
        let shown = crate::pyrepr::repr(&value);
        return Err(TaskError::type_error(format!("{task}() argument '{name}' must be a number, not {shown}")));
    }
    if any == std::any::TypeId::of::<Value>() || any == std::any::TypeId::of::<serde_json::Number>() {
        return crate::pyjson::from_value(value)
            .map_err(|e| TaskError::type_error(format!("{task}() argument '{name}': {e}")));
    }
    if any == std::any::TypeId::of::<Option<Value>>() {
        let v: Option<Value> = (!value.is_null()).then_some(value);
        let boxed: Box<dyn std::any::Any> = Box::new(v);
        // `T` is `Option<Value>`, so the downcast succeeds.
        return boxed
            .downcast::<T>()
            .map(|t| *t)
            .map_err(|_| TaskError::type_error(format!("{task}() argument '{name}'")));
    }
    let problem = std::cell::Cell::new(None);
    let shown = matches!(value, Value::Number(_)).then(|| crate::pyrepr::repr(&value));
    T::deserialize(crate::strict::Strict::new(value, &problem)).map_err(|e| match problem.take() {
        Some(p) => {
            let exc = match p.kind {
                crate::strict::ProblemKind::Overflow => "OverflowError",
                crate::strict::ProblemKind::Type => "TypeError",
            };
            TaskError::new(exc, format!("{task}() argument '{name}': {}", p.message))
        }
        None => match shown {
            Some(v) => TaskError::type_error(format!("{task}() argument '{name}': {e}, got {v}")),
            None => TaskError::type_error(format!("{task}() argument '{name}': {e}")),
        },
    })
}

/// Serialize a task's return value. A `Value`, `Number` or float is kept exactly, `NaN` and the
/// infinities included (see [`crate::pyjson::to_value`]).
pub fn to_result_value<T: Serialize + 'static>(value: T) -> Result<Value, TaskError> {
    crate::pyjson::to_value(value).map_err(|e| {
        TaskError::new("EncodeError", format!("cannot serialize the result: {e}")).with_module("kombu.exceptions")
    })
}

/// A task made from a closure, for registering tasks without the macro.
pub struct FnTask<F> {
    name: String,
    options: TaskOptions,
    f: F,
}

impl<F, Fut> FnTask<F>
where
    F: Fn(TaskContext, Vec<Value>, Map<String, Value>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    /// A task called `name` running `f`.
    pub fn new(name: impl Into<String>, options: TaskOptions, f: F) -> Self {
        FnTask { name: name.into(), options, f }
    }
}

impl<F, Fut> Task for FnTask<F>
where
    F: Fn(TaskContext, Vec<Value>, Map<String, Value>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn options(&self) -> TaskOptions {
        self.options.clone()
    }
    fn call(&self, ctx: TaskContext, args: Vec<Value>, kwargs: Map<String, Value>) -> TaskFuture {
        Box::pin((self.f)(ctx, args, kwargs))
    }
}

/// Task names to tasks.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn Task>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.tasks.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a task under its name, replacing any task of the same name.
    pub fn register<T: Task>(&mut self, task: T) -> &mut Self {
        self.tasks.insert(task.name().to_string(), Arc::new(task));
        self
    }

    /// Register an already shared task.
    pub fn register_arc(&mut self, task: Arc<dyn Task>) -> &mut Self {
        self.tasks.insert(task.name().to_string(), task);
        self
    }

    /// The task called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        self.tasks.get(name).cloned()
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Number of registered tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is registered.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode2(args: Value, kwargs: Value) -> Result<(i64, Option<String>), TaskError> {
        let mut d = ArgDecoder::new("t", serde_json::from_value(args).unwrap(), kwargs.as_object().unwrap().clone());
        let a = d.take(0, "a")?;
        let b = d.take(1, "b")?;
        d.finish()?;
        Ok((a, b))
    }

    #[test]
    fn arguments_decode_by_position_then_name() {
        assert_eq!(decode2(json!([1, "x"]), json!({})).unwrap(), (1, Some("x".into())));
        assert_eq!(decode2(json!([]), json!({"a": 2})).unwrap(), (2, None));
        assert_eq!(decode2(json!([1]), json!({"b": "y"})).unwrap(), (1, Some("y".into())));
    }

    #[test]
    fn argument_mistakes_are_type_errors() {
        let e = decode2(json!(["one"]), json!({})).unwrap_err();
        assert_eq!(e.exc_type, "TypeError");
        assert!(e.message.contains("'a'"), "{}", e.message);
        assert!(decode2(json!([]), json!({})).unwrap_err().message.contains("missing required argument: 'a'"));
        assert!(decode2(json!([1, "x", 3]), json!({}))
            .unwrap_err()
            .message
            .contains("takes 2 positional arguments but 3"));
        assert!(decode2(json!([1]), json!({"c": 1})).unwrap_err().message.contains("unexpected keyword argument 'c'"));
        assert!(decode2(json!([1]), json!({"a": 1})).unwrap_err().message.contains("multiple values"));
    }

    fn one<T: DeserializeOwned + 'static>(text: &str) -> Result<T, TaskError> {
        let args = match crate::pyjson::from_str(&format!("[{text}]")).unwrap() {
            Value::Array(a) => a,
            _ => unreachable!(),
        };
        let mut d = ArgDecoder::new("t", args, Map::new());
        d.take(0, "x")
    }

    #[test]
    fn numbers_a_rust_type_cannot_hold_are_refused_by_name_and_value() {
        let e = one::<i64>("1180591620717411303424").unwrap_err();
        assert_eq!(e.exc_type, "OverflowError");
        assert_eq!(e.message, "t() argument 'x': int 1180591620717411303424 is out of range for i64");
        assert_eq!(one::<i64>("9223372036854775807").unwrap(), i64::MAX);
        assert_eq!(one::<i64>("9223372036854775808").unwrap_err().exc_type, "OverflowError");
        assert_eq!(one::<i64>("-9223372036854775809").unwrap_err().exc_type, "OverflowError");
        assert_eq!(one::<u64>("18446744073709551615").unwrap(), u64::MAX);
        assert_eq!(one::<u8>("256").unwrap_err().exc_type, "OverflowError");
        assert_eq!(one::<u32>("-1").unwrap_err().exc_type, "OverflowError");
        assert_eq!(one::<i128>("-170141183460469231731687303715884105728").unwrap(), i128::MIN);
        let e = one::<i64>("1.5").unwrap_err();
        assert_eq!(
            (e.exc_type.as_str(), e.message.as_str()),
            ("TypeError", "t() argument 'x': expected an integer (i64), got float 1.5")
        );
        assert_eq!(one::<i64>("NaN").unwrap_err().exc_type, "TypeError");
        // Nested: the element that does not fit is named.
        let e = one::<Vec<i64>>("[1, 18446744073709551617]").unwrap_err();
        assert_eq!(e.message, "t() argument 'x': int 18446744073709551617 is out of range for i64");
        let e = one::<BTreeMap<String, Option<u16>>>(r#"{"a": null, "b": 65536}"#).unwrap_err();
        assert_eq!(e.exc_type, "OverflowError");
        // Floats read as Python's float(): integers round, beyond the range is an OverflowError.
        assert_eq!(one::<f64>("18446744073709551617").unwrap(), 18446744073709551616.0);
        assert_eq!(one::<f64>("123456789.12345679").unwrap(), 123_456_789.123_456_79);
        assert!(one::<f64>("NaN").unwrap().is_nan());
        assert_eq!(one::<f64>("-Infinity").unwrap(), f64::NEG_INFINITY);
        let e = one::<f64>(&format!("1{}", "0".repeat(400))).unwrap_err();
        assert_eq!(e.exc_type, "OverflowError");
        assert!(e.message.contains("too large to convert to float"), "{}", e.message);
        assert_eq!(one::<f32>("1e+300").unwrap_err().exc_type, "OverflowError");
        assert_eq!(one::<Vec<f64>>("[1, 0.5, -0.0]").unwrap(), vec![1.0, 0.5, -0.0]);
        // Value and Number receive the argument as it came.
        let v: Value = one("[18446744073709551617, NaN, 1e+16]").unwrap();
        assert_eq!(crate::pyjson::to_string(&v).unwrap(), "[18446744073709551617, NaN, 1e+16]");
        let o: Option<Value> = one("NaN").unwrap();
        assert_eq!(crate::pyjson::to_string(&o).unwrap(), "NaN");
        assert_eq!(one::<Option<Value>>("null").unwrap(), None);
        let n: serde_json::Number = one("NaN").unwrap();
        assert_eq!(n.as_str(), "NaN");
        assert_eq!(one::<serde_json::Number>(r#""7""#).unwrap_err().exc_type, "TypeError");
        assert_eq!(one::<Option<i64>>("null").unwrap(), None);
        assert_eq!(one::<String>("1").unwrap_err().exc_type, "TypeError");
    }

    #[test]
    fn results_keep_non_finite_floats() {
        let v = to_result_value(f64::NAN).unwrap();
        assert_eq!(crate::pyjson::to_string(&v).unwrap(), "NaN");
        let v =
            to_result_value(crate::pyjson::from_str("[Infinity, 10000000000000000000000000000001]").unwrap()).unwrap();
        assert_eq!(crate::pyjson::to_string(&v).unwrap(), "[Infinity, 10000000000000000000000000000001]");
        assert_eq!(to_result_value(0.1f64).unwrap(), crate::pyjson::from_str("0.1").unwrap());
    }

    #[test]
    fn std_errors_convert_with_their_type_name() {
        let e: TaskError = "x".parse::<i32>().unwrap_err().into();
        assert_eq!(e.exc_type, "ParseIntError");
        assert_eq!(e.module, "core.num.error");
    }
}
