//! One call per point of a task's life, feeding both the metrics and the events.
//!
//! The worker's code calls these hooks where the thing happens (a request prepared, a task
//! started, an outcome settled) and knows nothing of what they feed; [`crate::metrics`] and
//! [`crate::events`] know nothing of the worker's flow.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{ExceptionInfo, TaskState};
use chrono::Utc;
use serde_json::Value;

use crate::events::{exception_repr, Dispatcher};
use crate::metrics::{InFlight, Metrics};
use crate::request::Request;

/// The worker's observers.
pub(crate) struct Observer {
    pub metrics: Arc<Metrics>,
    pub events: Option<Arc<Dispatcher>>,
}

impl Observer {
    fn task_event(&self, kind: &str, uuid: &str, fields: Vec<(&str, Value)>) {
        if let Some(d) = &self.events {
            d.task(kind, uuid, fields);
        }
    }

    /// A delivery became a runnable request (Celery: `task-received`).
    pub fn received(&self, req: &mut Request) {
        req.reserved = self.metrics.reserve();
        if self.events.as_ref().is_none_or(|d| !d.task_events()) {
            return;
        }
        let h = &req.headers;
        let time = |t: Option<chrono::DateTime<Utc>>| t.map(|t| Value::from(t.to_rfc3339())).unwrap_or(Value::Null);
        self.task_event(
            "task-received",
            &h.id,
            vec![
                ("name", Value::from(h.task.as_str())),
                (
                    "args",
                    Value::from(
                        h.argsrepr.clone().unwrap_or_else(|| celeriac_core::pyrepr::args_repr(&req.body.args, true)),
                    ),
                ),
                (
                    "kwargs",
                    Value::from(
                        h.kwargsrepr.clone().unwrap_or_else(|| celeriac_core::pyrepr::kwargs_repr(&req.body.kwargs)),
                    ),
                ),
                ("root_id", h.root_id.clone().map(Value::from).unwrap_or(Value::Null)),
                ("parent_id", h.parent_id.clone().map(Value::from).unwrap_or(Value::Null)),
                ("retries", Value::from(h.retries)),
                ("eta", time(h.eta_time())),
                ("expires", time(h.expires_time())),
                // Keys of celeriac's (Celery's worker sends neither; Flower shows
                // `routing_key` when present): the queue the message came from, which is also
                // its routing key as `inspect`'s `delivery_info` reports it. The dashboard
                // counts each queue's rate out with them.
                ("queue", Value::from(req.delivery.queue.as_str())),
                ("routing_key", Value::from(req.delivery.queue.as_str())),
            ],
        );
    }

    /// The task starts running (Celery: `task-started`); the guard counts it as in flight.
    pub fn started(&self, req: &mut Request) -> InFlight {
        req.reserved.release();
        let delivered = req.reserved.since().elapsed();
        // Due at the later of delivery and ETA: how long ago that was.
        let since_eta = req.headers.eta_time().and_then(|eta| (Utc::now() - eta).to_std().ok());
        let wait = since_eta.map_or(delivered, |e| e.min(delivered));
        self.metrics.observe_queue_wait(&req.headers.task, wait);
        self.task_event("task-started", &req.headers.id, vec![]);
        self.metrics.start()
    }

    /// The task returned (Celery: `task-succeeded` with the result's repr and the runtime).
    pub fn succeeded(&self, req: &Request, value: &Value, runtime: Duration) {
        self.metrics.task_done(&req.headers.task, TaskState::Success.as_str());
        self.metrics.observe_runtime(&req.headers.task, runtime);
        self.task_event(
            "task-succeeded",
            &req.headers.id,
            vec![
                ("result", Value::from(celeriac_core::pyrepr::repr(value))),
                ("runtime", Value::from(runtime.as_secs_f64())),
            ],
        );
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
        self.task_event(
            "task-failed",
            id,
            vec![
                ("exception", Value::from(exception_repr(exc))),
                ("traceback", traceback.map(Value::from).unwrap_or(Value::Null)),
            ],
        );
    }

    /// A retry was scheduled (Celery: `task-retried`).
    pub fn retried(&self, req: &Request, exc: &ExceptionInfo, traceback: Option<&str>, runtime: Duration) {
        self.metrics.task_done(&req.headers.task, TaskState::Retry.as_str());
        self.metrics.observe_runtime(&req.headers.task, runtime);
        self.task_event(
            "task-retried",
            &req.headers.id,
            vec![
                ("exception", Value::from(exception_repr(exc))),
                ("traceback", traceback.map(Value::from).unwrap_or(Value::Null)),
            ],
        );
    }

    /// The task raised Celery's `Ignore` (no event, as Celery sends none; counted as IGNORED).
    pub fn ignored(&self, name: &str, runtime: Duration) {
        self.metrics.task_done(name, "IGNORED");
        self.metrics.observe_runtime(name, runtime);
    }

    /// The task was revoked before running: expired (Celery: `task-revoked`).
    pub fn revoked(&self, id: &str, name: &str, expired: bool) {
        self.metrics.task_done(name, TaskState::Revoked.as_str());
        self.task_event(
            "task-revoked",
            id,
            vec![("terminated", Value::from(false)), ("signum", Value::Null), ("expired", Value::from(expired))],
        );
    }

    /// The task was revoked by remote control: not run, or `terminated` while it ran with
    /// `signum` (Celery: `task-revoked`).
    pub fn revoked_by_control(&self, id: &str, name: &str, terminated: bool, signum: Option<i32>) {
        self.metrics.task_done(name, TaskState::Revoked.as_str());
        self.task_event(
            "task-revoked",
            id,
            vec![
                ("terminated", Value::from(terminated)),
                ("signum", signum.map(Value::from).unwrap_or(Value::Null)),
                ("expired", Value::from(false)),
            ],
        );
    }

    /// The message was refused without running (dead-lettered), or rejected by the task itself
    /// (Celery's `Reject`), back to its queue when `requeue` (Celery: `task-rejected`).
    pub fn rejected(&self, id: &str, name: &str, requeue: bool) {
        self.metrics.task_done(name, "REJECTED");
        self.task_event("task-rejected", id, vec![("requeue", Value::from(requeue))]);
    }
}
