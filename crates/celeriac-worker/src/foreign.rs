//! What a pool child that runs Celery's own tasks (a Python child, `--python-app`) needs from
//! the worker: the registry entries of the tasks it announced, Celery's request dict for each
//! task it runs (`task.request` in Python), and publishing on its behalf what its tasks send
//! (`apply_async`, `delay`, `self.retry()`), through the worker's broker under the publish
//! deadline; and how their messages are settled, as Celery's worker settles them
//! (`celery/worker/request.py`): `acks_late`, `reject_on_worker_lost`, and the control
//! exceptions `Ignore` and `Reject`.
//!
//! The supervisor stays the only process that talks to the broker: a child writes a
//! `publish` frame and waits for the answer, as a Celery task waits for its publish.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::broker::Acker;
use celeriac_core::{BrokerError, Delivery, Message, Properties, Registry, Task, TaskContext, TaskError, TaskOptions};
use futures::future::BoxFuture;
use serde_json::{Map, Value};

use crate::prefork::protocol::{ChildTask, PublishRequest};
use crate::prefork::ChildPublisher;
use crate::request::Request;
use crate::Shared;

/// How long one publish asked for by a child may take before the task is told it failed.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(10);

/// A task that runs only in a pool child: the supervisor knows its name and options.
struct ChildOnly {
    name: String,
    options: TaskOptions,
}

impl Task for ChildOnly {
    fn name(&self) -> &str {
        &self.name
    }

    fn options(&self) -> TaskOptions {
        self.options.clone()
    }

    fn call(
        &self,
        _ctx: TaskContext,
        _args: Vec<Value>,
        _kwargs: Map<String, Value>,
    ) -> celeriac_core::task::TaskFuture {
        let name = self.name.clone();
        Box::pin(async move {
            Err(TaskError::new(
                "NotImplementedError",
                format!("{name} runs only in a pool child (a Python task), not in the worker's own process"),
            ))
        })
    }
}

/// The options the supervisor acts on, from a child's announcement (Celery's task attributes).
/// Retries are the child's business (Celery's `Task.retry` counts `max_retries` and sends the
/// new message itself), so the supervisor sets no limit and no automatic retry of its own.
fn options_of(task: &ChildTask) -> TaskOptions {
    let o = &task.options;
    let seconds = |k: &str| o.get(k).and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0);
    TaskOptions {
        queue: o.get("queue").and_then(Value::as_str).map(str::to_string),
        max_retries: None,
        autoretry_for: Vec::new(),
        time_limit: seconds("time_limit"),
        soft_time_limit: seconds("soft_time_limit"),
        ignore_result: o.get("ignore_result").and_then(Value::as_bool).unwrap_or(false),
        store_errors_even_if_ignored: o.get("store_errors_even_if_ignored").and_then(Value::as_bool).unwrap_or(false),
        // Celery's `rate_limit` attribute: the task's own, an annotation's, or the app's
        // `task_default_rate_limit` (Celery's `Task.bind` fills it in); a number is per second.
        rate_limit: o.get("rate_limit").and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }),
        ..TaskOptions::default()
    }
}

/// The registry of a worker whose children run the announced `tasks`: those tasks, and the
/// Celery builtins the worker runs itself (`celery.*` from `registry`). The worker's other
/// tasks are dropped: its children cannot run them.
pub(crate) fn registry(registry: &Registry, tasks: &[ChildTask]) -> Registry {
    let mut out = Registry::new();
    for name in registry.names().filter(|n| crate::builtins::runs_in_worker(n)) {
        if let Some(task) = registry.get(name) {
            out.register_arc(task);
        }
    }
    for task in tasks {
        out.register_arc(Arc::new(ChildOnly { name: task.name.clone(), options: options_of(task) }));
    }
    out
}

/// How a child's task's message is settled: Celery's `acks_late` and `reject_on_worker_lost`
/// task attributes, as `celery/worker/request.py` acts on them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AckPolicy {
    /// Acknowledged once the outcome is settled; otherwise before the task runs (Celery's
    /// default: a task whose child dies is then not run again).
    pub acks_late: bool,
    /// With `acks_late`, a task whose child died is requeued (bounded by the poison guard)
    /// instead of stored as FAILURE `WorkerLostError`.
    pub reject_on_worker_lost: bool,
    /// Celery 5.7's `retry_on_worker_lost`: a task whose child died is retried as `self.retry()`
    /// would retry it (`max_retries`, `default_retry_delay`), before anything else is considered.
    pub retry_on_worker_lost: bool,
    /// The task's `max_retries` (`None`: no limit).
    pub max_retries: Option<u32>,
    /// The task's `default_retry_delay`, seconds.
    pub retry_delay: f64,
    /// With `acks_late`, a FAILURE's message is acknowledged (else rejected without requeue,
    /// to the queue's dead-letter exchange on RabbitMQ): Celery's `acks_on_failure`, before 5.7
    /// `acks_on_failure_or_timeout`.
    pub acks_on_failure: bool,
    /// With `acks_late`, the message of a task killed at its hard time limit is acknowledged
    /// after its FAILURE is stored (else requeued): Celery 5.7's `acks_on_timeout`, before it
    /// `acks_on_failure_or_timeout`.
    pub acks_on_timeout: bool,
}

impl AckPolicy {
    /// Whether a task whose child died goes back to its queue (else FAILURE `WorkerLostError`),
    /// after `retries` retries. As Celery, a task whose `retry_on_worker_lost` ran out of
    /// retries is not requeued either.
    pub(crate) fn requeues_lost(policy: Option<AckPolicy>, retries: u32) -> bool {
        policy.is_none_or(|p| {
            p.acks_late && p.reject_on_worker_lost && !(p.retry_on_worker_lost && p.out_of_retries(retries))
        })
    }

    /// The delay before retrying a task whose child died, after `retries` retries, when it is
    /// to be retried (`retry_on_worker_lost` and retries left).
    pub(crate) fn retry_lost_after(policy: Option<AckPolicy>, retries: u32) -> Option<Duration> {
        let p = policy.filter(|p| p.retry_on_worker_lost && !p.out_of_retries(retries))?;
        Some(Duration::from_secs_f64(if p.retry_delay.is_finite() { p.retry_delay.max(0.0) } else { 0.0 }))
    }

    /// Whether the message of a task killed at its hard time limit is requeued (after its
    /// FAILURE is stored) rather than acknowledged: `acks_late` without `acks_on_timeout`, as
    /// `celery/worker/request.py` (`on_failure`, `on_timeout`). A task no child announced (a
    /// Rust task) is acknowledged, Celery's default.
    pub(crate) fn requeues_timeout(policy: Option<AckPolicy>) -> bool {
        policy.is_some_and(|p| p.acks_late && !p.acks_on_timeout)
    }

    /// Whether a FAILURE's message is rejected (without requeue) rather than acknowledged.
    pub(crate) fn rejects_failure(policy: Option<AckPolicy>) -> bool {
        policy.is_some_and(|p| p.acks_late && !p.acks_on_failure)
    }

    fn out_of_retries(&self, retries: u32) -> bool {
        self.max_retries.is_some_and(|max| retries >= max)
    }
}

/// The settle policy of each announced task, by name (a missing attribute is Celery's default,
/// false).
pub(crate) fn ack_policies(tasks: &[ChildTask]) -> HashMap<String, AckPolicy> {
    let flag = |t: &ChildTask, k: &str| t.options.get(k).and_then(Value::as_bool).unwrap_or(false);
    tasks
        .iter()
        .map(|t| {
            let policy = AckPolicy {
                acks_late: flag(t, "acks_late"),
                reject_on_worker_lost: flag(t, "reject_on_worker_lost"),
                retry_on_worker_lost: flag(t, "retry_on_worker_lost"),
                max_retries: t
                    .options
                    .get("max_retries")
                    .and_then(Value::as_u64)
                    .map(|n| n.min(u32::MAX.into()) as u32),
                // Celery's default `default_retry_delay`: 3 minutes.
                retry_delay: t.options.get("default_retry_delay").and_then(Value::as_f64).unwrap_or(180.0),
                acks_on_failure: ["acks_on_failure", "acks_on_failure_or_timeout"]
                    .iter()
                    .find_map(|k| t.options.get(*k).and_then(Value::as_bool))
                    .unwrap_or(true),
                acks_on_timeout: ["acks_on_timeout", "acks_on_failure_or_timeout"]
                    .iter()
                    .find_map(|k| t.options.get(*k).and_then(Value::as_bool))
                    .unwrap_or(true),
            };
            (t.name.clone(), policy)
        })
        .collect()
}

/// Acknowledge a delivery before its task runs (a task that is not `acks_late`, as Celery's
/// worker acknowledges it when the pool accepts it). What settles it afterwards does nothing,
/// and says so where it would have given the message back.
pub(crate) async fn ack_early(delivery: Delivery) -> Delivery {
    let (exchange, routing_key) = (delivery.exchange.clone(), delivery.routing_key.clone());
    let (message, queue, count, acker) = delivery.into_parts();
    if let Err(e) = acker.ack().await {
        tracing::warn!(error = %e, "could not acknowledge the message before the task (not acks_late) runs; the broker may deliver it again");
    }
    Delivery::new(message, queue, count, Box::new(AckedEarly)).with_route(exchange, routing_key)
}

/// The settlement of a delivery acknowledged before its task ran.
struct AckedEarly;

#[async_trait::async_trait]
impl Acker for AckedEarly {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        if requeue {
            tracing::warn!("not requeued: the message was acknowledged before the task ran (the task is not acks_late, as in Celery)");
        }
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        tracing::warn!(%reason, "not dead-lettered: the message was acknowledged before the task ran (the task is not acks_late)");
        Ok(())
    }
}

/// Celery's control exceptions (`celery.exceptions.Ignore`, `Reject`) raised by a task, as a
/// child reports them: an error of that type and module; `Reject`'s `args` are
/// `[reason, requeue]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// `Ignore`: nothing stored, the message acknowledged.
    Ignore,
    /// `Reject(requeue=...)`: the message rejected, back to its queue or not.
    Reject {
        /// Back to its queue.
        requeue: bool,
    },
}

impl Control {
    /// The control exception `err` is, if any.
    pub(crate) fn of(err: &TaskError) -> Option<Control> {
        if err.module != "celery.exceptions" {
            return None;
        }
        match err.exc_type.as_str() {
            "Ignore" => Some(Control::Ignore),
            "Reject" => {
                let requeue = err.args.as_deref().and_then(|a| a.get(1)).is_some_and(|r| match r {
                    Value::Bool(b) => *b,
                    Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                    Value::Null => false,
                    _ => true,
                });
                Some(Control::Reject { requeue })
            }
            _ => None,
        }
    }
}

/// Celery's request dict for `req` (what `celery/worker/request.py` hands its tracer): the
/// message's headers, `delivery_info`, `reply_to`, `correlation_id`, `hostname`, and the embed
/// (`callbacks`, `errbacks`, `chain`, `chord`). The worker carries out the embed itself; the
/// child only shows it to the task.
pub(crate) fn celery_request(req: &Request, hostname: &str) -> Value {
    let message = &req.delivery.message;
    let mut r: Map<String, Value> = message.headers.clone();
    let text = |v: &Option<String>| v.as_ref().map_or(Value::Null, |s| Value::String(s.clone()));
    r.insert("reply_to".into(), text(&message.properties.reply_to));
    r.insert("correlation_id".into(), text(&message.properties.correlation_id));
    r.insert("hostname".into(), Value::String(hostname.to_string()));
    let mut delivery = Map::new();
    delivery.insert("exchange".into(), Value::String(req.delivery.exchange.clone()));
    delivery.insert("routing_key".into(), Value::String(req.delivery.routing_key.clone()));
    delivery.insert("priority".into(), message.properties.priority.map_or(Value::Null, Value::from));
    delivery.insert("redelivered".into(), Value::Bool(req.delivery.delivery_count > 1));
    r.insert("delivery_info".into(), Value::Object(delivery));
    let embed = &req.body.embed;
    let opt = |v: &Option<Value>| v.clone().unwrap_or(Value::Null);
    r.insert("callbacks".into(), opt(&embed.callbacks));
    r.insert("errbacks".into(), opt(&embed.errbacks));
    r.insert("chain".into(), embed.chain.as_ref().and_then(|c| c.to_value().ok()).unwrap_or(Value::Null));
    r.insert("chord".into(), opt(&embed.chord));
    Value::Object(r)
}

/// Publishes for the task `own_id` running in a child. A message under the task's own id (its
/// retry) is held, not published: the worker publishes it once the RETRY is stored
/// ([`publish_held`]).
pub(crate) struct Publisher<'a> {
    shared: &'a Shared,
    own_id: &'a str,
    held: std::sync::Mutex<Vec<(String, Message)>>,
}

impl<'a> Publisher<'a> {
    pub(crate) fn new(shared: &'a Shared, own_id: &'a str) -> Self {
        Publisher { shared, own_id, held: Default::default() }
    }

    /// The messages held back (the task's retry), in the order sent.
    pub(crate) fn into_held(self) -> Vec<(String, Message)> {
        self.held.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// Publish messages a child's task sent under its own id, after its RETRY is stored.
pub(crate) async fn publish_held(shared: &Shared, held: &[(String, Message)]) -> Result<(), String> {
    for (queue, message) in held {
        publish_one(shared, queue, message).await?;
    }
    Ok(())
}

async fn publish_one(shared: &Shared, queue: &str, message: &Message) -> Result<(), String> {
    let id = message.headers.get("id").and_then(Value::as_str).unwrap_or("");
    let task = message.headers.get("task").and_then(Value::as_str).unwrap_or("");
    match tokio::time::timeout(PUBLISH_DEADLINE, shared.broker.publish(queue, message)).await {
        Ok(Ok(())) => {
            tracing::debug!(sent_id = %id, sent_task = %task, queue = %queue, "published for the task");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("could not publish {task}[{id}] to {queue}: {e}")),
        Err(_) => Err(format!("could not publish {task}[{id}] to {queue} within {PUBLISH_DEADLINE:?}")),
    }
}

impl ChildPublisher for Publisher<'_> {
    fn publish<'b>(&'b self, req: PublishRequest) -> BoxFuture<'b, Result<(), String>> {
        Box::pin(async move {
            let (queue, message) = message_of(req)?;
            if message.headers.get("id").and_then(Value::as_str) == Some(self.own_id) {
                tracing::debug!(queue = %queue, "the task sent a message under its own id (its retry): held until its RETRY is stored");
                self.held.lock().unwrap_or_else(|p| p.into_inner()).push((queue, message));
                return Ok(());
            }
            publish_one(self.shared, &queue, &message).await
        })
    }
}

/// The queue and message of a child's publish. The queue is the routing key (Celery routes a
/// task to the queue of that name through its same-named direct exchange, or the default
/// exchange); another exchange is logged, and the routing key still names the queue.
fn message_of(req: PublishRequest) -> Result<(String, Message), String> {
    if req.routing_key.is_empty() {
        return Err("a publish with no routing key (no queue)".into());
    }
    if !req.exchange.is_empty() && req.exchange != req.routing_key && req.exchange != "celery" {
        tracing::warn!(exchange = %req.exchange, routing_key = %req.routing_key, "a task published to an exchange celeriac does not route through: sent to the queue named by the routing key");
    }
    let p = &req.properties;
    let text = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
    let defaults = Properties::default();
    let properties = Properties {
        correlation_id: text("correlation_id"),
        reply_to: text("reply_to").filter(|r| !r.is_empty()),
        priority: p.get("priority").and_then(Value::as_u64).map(|n| n.min(255) as u8),
        expiration: p.get("expiration").and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }),
        content_type: text("content_type").unwrap_or(defaults.content_type),
        content_encoding: text("content_encoding").unwrap_or(defaults.content_encoding),
        ..defaults
    };
    let mut ignored: Vec<&str> = p
        .keys()
        .map(String::as_str)
        .filter(|k| {
            !matches!(
                *k,
                "correlation_id"
                    | "reply_to"
                    | "priority"
                    | "expiration"
                    | "content_type"
                    | "content_encoding"
                    | "delivery_mode"
            )
        })
        .collect();
    if !ignored.is_empty() {
        ignored.sort_unstable();
        tracing::debug!(properties = %ignored.join(","), "message properties a child sent that celeriac does not carry");
    }
    let message = Message { headers: req.headers, properties, body: req.body.into_bytes() };
    Ok((req.routing_key, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_child_publish_becomes_a_message_on_the_routing_key_s_queue() {
        let req = PublishRequest {
            exchange: "celery".into(),
            routing_key: "celery".into(),
            headers: json!({"task": "t", "id": "I", "retries": 1}).as_object().unwrap().clone(),
            properties: json!({"correlation_id": "I", "reply_to": "r", "priority": 3, "content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2})
                .as_object()
                .unwrap()
                .clone(),
            body: "[[1], {}, {}]".into(),
        };
        let (queue, m) = message_of(req).unwrap();
        assert_eq!(queue, "celery");
        assert_eq!((m.properties.correlation_id.as_deref(), m.properties.priority), (Some("I"), Some(3)));
        assert_eq!(m.body, b"[[1], {}, {}]");
        assert_eq!(m.task_headers().unwrap().retries, 1);
        let none = PublishRequest {
            exchange: String::new(),
            routing_key: String::new(),
            headers: Map::new(),
            properties: Map::new(),
            body: String::new(),
        };
        assert!(message_of(none).unwrap_err().contains("no routing key"));
    }

    #[test]
    fn celery_s_control_exceptions_are_told_from_errors() {
        let err = |t: &str, m: &str, args: Value| {
            let mut e = TaskError::new(t, "x").with_module(m);
            e.args = Some(Box::new(args));
            e
        };
        assert_eq!(Control::of(&err("Ignore", "celery.exceptions", json!([]))), Some(Control::Ignore));
        let reject = |requeue: Value| Control::of(&err("Reject", "celery.exceptions", json!(["why", requeue])));
        assert_eq!(reject(json!(true)), Some(Control::Reject { requeue: true }));
        assert_eq!(reject(json!(false)), Some(Control::Reject { requeue: false }));
        assert_eq!(reject(Value::Null), Some(Control::Reject { requeue: false }));
        assert_eq!(Control::of(&err("Ignore", "myapp", json!([]))), None, "another module's Ignore is an error");
        let task = |o: Value| ChildTask { name: "t".into(), options: o.as_object().unwrap().clone() };
        let policies = ack_policies(&[task(json!({"acks_late": true, "reject_on_worker_lost": true}))]);
        assert!(AckPolicy::requeues_lost(policies.get("t").copied(), 9));
        assert_eq!(AckPolicy::retry_lost_after(policies.get("t").copied(), 0), None);
        let policies = ack_policies(&[task(json!({"acks_late": true}))]);
        assert!(!AckPolicy::requeues_lost(policies.get("t").copied(), 0));
        assert!(!policies["t"].reject_on_worker_lost && policies["t"].acks_late);
        // A task the children did not announce (this binary's own): requeued, as ever.
        assert!(AckPolicy::requeues_lost(None, 0));
        // retry_on_worker_lost: retried while retries are left, then neither retried nor requeued.
        let policies = ack_policies(&[task(
            json!({"acks_late": true, "reject_on_worker_lost": true, "retry_on_worker_lost": true, "max_retries": 1, "default_retry_delay": 2}),
        )]);
        let p = policies.get("t").copied();
        assert_eq!(AckPolicy::retry_lost_after(p, 0), Some(Duration::from_secs(2)));
        assert_eq!(AckPolicy::retry_lost_after(p, 1), None);
        assert!(!AckPolicy::requeues_lost(p, 1));
        assert!(!AckPolicy::rejects_failure(p));
        let rejects = |o: Value| AckPolicy::rejects_failure(ack_policies(&[task(o)]).get("t").copied());
        assert!(rejects(json!({"acks_late": true, "acks_on_failure": false})));
        assert!(rejects(json!({"acks_late": true, "acks_on_failure_or_timeout": false})));
        assert!(!rejects(json!({"acks_on_failure": false})), "not acks_late: acknowledged as it started");
        let requeues = |o: Value| AckPolicy::requeues_timeout(ack_policies(&[task(o)]).get("t").copied());
        assert!(requeues(json!({"acks_late": true, "acks_on_timeout": false})));
        assert!(requeues(json!({"acks_late": true, "acks_on_failure_or_timeout": false})));
        assert!(!requeues(json!({"acks_late": true, "acks_on_failure": false})), "acks_on_failure is not for timeouts");
        assert!(!requeues(json!({"acks_late": true})));
        assert!(!requeues(json!({"acks_on_timeout": false})), "not acks_late: acknowledged as it started");
        assert!(!AckPolicy::requeues_timeout(None), "a Rust task: acknowledged, Celery's default");
    }

    #[test]
    fn announced_options_keep_retries_in_the_child() {
        let t = ChildTask {
            name: "proj.add".into(),
            options:
                json!({"time_limit": 5, "soft_time_limit": 3.5, "ignore_result": true, "max_retries": 2, "queue": "q", "rate_limit": "2/s"})
                    .as_object()
                    .unwrap()
                    .clone(),
        };
        let o = options_of(&t);
        assert_eq!((o.time_limit, o.soft_time_limit, o.ignore_result), (Some(5.0), Some(3.5), true));
        assert_eq!((o.max_retries, o.queue.as_deref()), (None, Some("q")));
        assert_eq!(o.rate_limit.as_deref(), Some("2/s"));
    }
}
