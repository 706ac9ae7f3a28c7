//! One call per point of a task's life, feeding both the metrics and the events.
//!
//! The worker's code calls these hooks where the thing happens (a request prepared, a task
//! started, an outcome settled) and knows nothing of what they feed; [`crate::metrics`] and
//! [`crate::events`] know nothing of the worker's flow.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{ExceptionInfo, TaskState};
use chrono::Utc;
use serde_json::Value;

use crate::events::{exception_repr, Dispatcher, Received, TaskEvent};
use crate::metrics::{InFlight, Metrics};
use crate::request::Request;

/// What a task message says of its workflow beyond `root_id`/`parent_id`, as extra keys of
/// `task-received` (Celery's readers, `celery/events/state.py` and Flower, keep unknown keys as
/// they are): `group` (the `group` header) and `group_index`; `chord`, the chord body a header
/// task joins (`{"id", "name"}`); `chain`, the steps after this one, next first (`[{"id",
/// "name"}]`); `link` and `errback`, the callbacks' and errbacks' `[{"id", "name"}]`. An id is a
/// signature's `options.task_id` (set once the canvas was frozen, as every applied one is), a
/// name its `task`. Keys with nothing to say are left out.
fn workflow_fields(req: &Request) -> Vec<(&'static str, Value)> {
    fn reference(sig: &Value) -> Option<Value> {
        let id = sig.pointer("/options/task_id").and_then(Value::as_str)?;
        let name = sig.get("task").and_then(Value::as_str).unwrap_or("");
        Some(serde_json::json!({"id": id, "name": name}))
    }
    fn references(sigs: Option<&Value>) -> Option<Value> {
        let list: Vec<Value> = match sigs? {
            Value::Array(items) => items.iter().filter_map(reference).collect(),
            one @ Value::Object(_) => reference(one).into_iter().collect(),
            _ => Vec::new(),
        };
        (!list.is_empty()).then_some(Value::Array(list))
    }
    let (h, embed) = (&req.headers, &req.body.embed);
    let mut out = Vec::new();
    if let Some(g) = &h.group {
        out.push(("group", Value::from(g.as_str())));
        if let Some(i) = h.group_index {
            out.push(("group_index", Value::from(i)));
        }
    }
    if let Some(body) = embed.chord.as_ref().and_then(reference) {
        out.push(("chord", body));
    }
    // The rest of a chain travels last step first.
    let chain = embed.chain.as_ref().and_then(|c| c.to_value().ok()).map(|v| match v {
        Value::Array(mut steps) => {
            steps.reverse();
            Value::Array(steps)
        }
        other => other,
    });
    if let Some(steps) = references(chain.as_ref()) {
        out.push(("chain", steps));
    }
    if let Some(links) = references(embed.callbacks.as_ref()) {
        out.push(("link", links));
    }
    if let Some(errbacks) = references(embed.errbacks.as_ref()) {
        out.push(("errback", errbacks));
    }
    out
}

/// The worker's observers.
pub(crate) struct Observer {
    pub metrics: Arc<Metrics>,
    pub events: Option<Arc<Dispatcher>>,
}

impl Observer {
    fn task_event(&self, uuid: &str, event: TaskEvent<'_>) {
        if let Some(d) = &self.events {
            d.task(uuid, event);
        }
    }

    /// A delivery became a runnable request (Celery: `task-received`).
    pub fn received(&self, req: &mut Request) {
        req.reserved = self.metrics.reserve();
        if self.events.as_ref().is_none_or(|d| !d.task_events()) {
            return;
        }
        let h = &req.headers;
        let event = Received {
            name: &h.task,
            args: h
                .argsrepr
                .as_deref()
                .map_or_else(|| Cow::Owned(celeriac_core::pyrepr::args_repr(&req.body.args, true)), Cow::Borrowed),
            kwargs: h
                .kwargsrepr
                .as_deref()
                .map_or_else(|| Cow::Owned(celeriac_core::pyrepr::kwargs_repr(&req.body.kwargs)), Cow::Borrowed),
            root_id: h.root_id.as_deref(),
            parent_id: h.parent_id.as_deref(),
            retries: h.retries,
            eta: h.eta_time().map(|t| t.to_rfc3339()),
            expires: h.expires_time().map(|t| t.to_rfc3339()),
            queue: &req.delivery.queue,
            workflow: workflow_fields(req),
        };
        self.task_event(&h.id, TaskEvent::Received(event));
    }

    /// The task starts running (Celery: `task-started`); the guard counts it as in flight.
    pub fn started(&self, req: &mut Request) -> InFlight {
        req.reserved.release();
        let delivered = req.reserved.since().elapsed();
        // Due at the later of delivery and ETA: how long ago that was.
        let since_eta = req.headers.eta_time().and_then(|eta| (Utc::now() - eta).to_std().ok());
        let wait = since_eta.map_or(delivered, |e| e.min(delivered));
        self.metrics.observe_queue_wait(&req.headers.task, wait);
        self.task_event(&req.headers.id, TaskEvent::Started);
        self.metrics.start()
    }

    /// The task returned (Celery: `task-succeeded` with the result's repr and the runtime).
    pub fn succeeded(&self, req: &Request, value: &Value, runtime: Duration) {
        self.metrics.task_done(&req.headers.task, TaskState::Success.as_str());
        self.metrics.observe_runtime(&req.headers.task, runtime);
        if self.events.as_ref().is_some_and(|d| d.task_events()) {
            let result = celeriac_core::pyrepr::repr(value);
            self.task_event(&req.headers.id, TaskEvent::Succeeded { result: &result, runtime: runtime.as_secs_f64() });
        }
    }

    /// The task ended in FAILURE (Celery: `task-failed`). `runtime` is `None` when it never ran
    /// (unknown task, poison message).
    pub fn failed(
        &self,
        id: &str,
        name: &str,
        exc: &ExceptionInfo,
        traceback: Option<&str>,
        runtime: Option<Duration>,
    ) {
        self.metrics.task_done(name, TaskState::Failure.as_str());
        if let Some(r) = runtime {
            self.metrics.observe_runtime(name, r);
        }
        if self.events.as_ref().is_some_and(|d| d.task_events()) {
            let exception = exception_repr(exc);
            let runtime = runtime.map(|r| r.as_secs_f64());
            self.task_event(id, TaskEvent::Failed { exception: &exception, traceback, runtime });
        }
    }

    /// A retry was scheduled (Celery: `task-retried`).
    pub fn retried(&self, req: &Request, exc: &ExceptionInfo, traceback: Option<&str>, runtime: Duration) {
        self.metrics.task_done(&req.headers.task, TaskState::Retry.as_str());
        self.metrics.observe_runtime(&req.headers.task, runtime);
        if self.events.as_ref().is_some_and(|d| d.task_events()) {
            let exception = exception_repr(exc);
            self.task_event(&req.headers.id, TaskEvent::Retried { exception: &exception, traceback });
        }
    }

    /// The task raised Celery's `Ignore` (no event, as Celery sends none; counted as IGNORED).
    pub fn ignored(&self, name: &str, runtime: Duration) {
        self.metrics.task_done(name, "IGNORED");
        self.metrics.observe_runtime(name, runtime);
    }

    /// The task was revoked before running: expired (Celery: `task-revoked`).
    pub fn revoked(&self, id: &str, name: &str, expired: bool) {
        self.metrics.task_done(name, TaskState::Revoked.as_str());
        self.task_event(id, TaskEvent::Revoked { terminated: false, signum: None, expired });
    }

    /// The task was revoked by remote control: not run, or `terminated` while it ran with
    /// `signum` (Celery: `task-revoked`).
    pub fn revoked_by_control(&self, id: &str, name: &str, terminated: bool, signum: Option<i32>) {
        self.metrics.task_done(name, TaskState::Revoked.as_str());
        self.task_event(id, TaskEvent::Revoked { terminated, signum, expired: false });
    }

    /// The message was refused without running (dead-lettered), or rejected by the task itself
    /// (Celery's `Reject`), back to its queue when `requeue` (Celery: `task-rejected`).
    pub fn rejected(&self, id: &str, name: &str, requeue: bool) {
        self.metrics.task_done(name, "REJECTED");
        self.task_event(id, TaskEvent::Rejected { requeue });
    }
}
