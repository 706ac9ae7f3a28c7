//! From a delivery to a runnable request — or to a clear refusal.
//!
//! Every way a message can be unusable ends here, once, with one log line and a settled message:
//! - no task id, or headers that are not protocol v2: dead-lettered with the reason;
//! - a body that cannot be decoded (malformed, unknown content type, an unknown `compression`
//!   codec, a corrupt or oversized compressed body, a protocol v1 `kwargs` that is not a
//!   mapping): FAILURE stored with `InvalidTaskError` (so a waiting client learns why) and
//!   dead-lettered;
//! - an unknown task name: FAILURE stored with `NotRegistered`, acknowledged;
//! - delivered more often than the poison-message limit: FAILURE `WorkerLostError`,
//!   dead-lettered;
//! - expired, or revoked by remote control: REVOKED stored, acknowledged.
//!
//! Wrong argument types are found when the task decodes its arguments and end as a `TypeError`
//! FAILURE in [`crate::execute`].

use std::sync::Arc;

use celeriac_core::result::ExceptionInfo;
use celeriac_core::{Delivery, ReplyTo, ResultMeta, Task, TaskBody, TaskHeaders, TaskState};
use chrono::{DateTime, Utc};

use crate::stats::Stats;
use crate::Shared;

/// A delivery that can be run.
pub struct Request {
    /// The delivery, to be settled after the outcome is stored.
    pub delivery: Delivery,
    /// Its typed headers.
    pub headers: TaskHeaders,
    /// Its decoded body.
    pub body: TaskBody,
    /// The task to run.
    pub task: Arc<dyn Task>,
    /// Counted as prefetched (metrics) until it starts; when it reached the worker.
    pub(crate) reserved: crate::metrics::Reserved,
    /// Its entry in the worker's state (for `inspect`), removed when the request is dropped.
    pub tracked: Option<crate::state::Tracked>,
    /// Its turn under its task's rate limit is already taken (and waited for without a slot).
    pub(crate) rate_turn_taken: bool,
    /// Messages a task in a pool child sent under its own id (a Python task's `self.retry()`),
    /// held until its RETRY is stored: published first, the retry could finish and store its
    /// final state before the RETRY, which would then overwrite it.
    pub(crate) deferred: Vec<(String, celeriac_core::Message)>,
    /// The task in a pool child emptied its request's chain (Celery's
    /// `self.request.chain = None`): the rest of its chain is not sent.
    pub(crate) chain_stopped: bool,
}

impl Request {
    /// When it may run, if that is in the future.
    pub fn eta_in_future(&self) -> Option<DateTime<Utc>> {
        self.headers.eta_time().filter(|eta| *eta > Utc::now())
    }

    /// Give the delivery back unstarted, for another worker (`Delivery::release`: in its place
    /// where the transport allows, not counted as a failed delivery).
    pub async fn release(self) {
        let id = self.headers.id.clone();
        if let Err(e) = self.delivery.release().await {
            tracing::warn!(task_id = %id, task_name = %self.headers.task, error = %e, "could not give the task back; the broker will redeliver it after its lease");
        }
    }

    /// Give the delivery back to its queue.
    pub async fn requeue(self) {
        let id = self.headers.id.clone();
        if let Err(e) = self.delivery.reject(true).await {
            tracing::warn!(task_id = %id, error = %e, "could not requeue; the broker will redeliver it after its lease");
        }
    }
}

/// Validate a delivery. Returns `None` when the message was unusable and has been settled.
pub(crate) async fn prepare(shared: &Shared, delivery: Delivery) -> Option<Request> {
    Stats::bump(&shared.stats.received);
    let headers = match delivery.message.task_headers() {
        Ok(h) => h,
        Err(e) => {
            let reason = format!("invalid message from queue {}: {e}", delivery.queue);
            let task_id = delivery.message.task_id().map(str::to_string);
            match &task_id {
                Some(id) if !id.is_empty() => {
                    let name = delivery.message.task_name().unwrap_or("?").to_string();
                    tracing::error!(task_id = %id, task_name = %name, content_type = %content_of(&delivery.message), %reason, "dead-lettering message");
                    store_failure(
                        shared,
                        &delivery.message,
                        id,
                        &ExceptionInfo::new("InvalidTaskError", reason.clone(), "celery.exceptions"),
                    )
                    .await;
                }
                _ => tracing::error!(content_type = %content_of(&delivery.message), %reason, "dead-lettering message"),
            }
            let name = delivery.message.task_name().unwrap_or("unknown").to_string();
            shared.observe.rejected(task_id.as_deref().unwrap_or(""), &name, false);
            dead_letter(shared, delivery, &reason).await;
            return None;
        }
    };
    let (id, name) = (headers.id.clone(), headers.task.clone());
    let body = match delivery.message.task_body() {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("cannot decode the body of task {name}[{id}]: {e}");
            tracing::error!(task_id = %id, task_name = %name, content_type = %content_of(&delivery.message), %reason, "dead-lettering message");
            store_failure(
                shared,
                &delivery.message,
                &id,
                &ExceptionInfo::new("InvalidTaskError", reason.clone(), "celery.exceptions"),
            )
            .await;
            shared.observe.rejected(&id, &name, false);
            dead_letter(shared, delivery, &reason).await;
            return None;
        }
    };
    let Some(task) = shared.registry.get(&name) else {
        tracing::error!(task_id = %id, task_name = %name, queue = %delivery.queue, "received an unregistered task; storing NotRegistered");
        // Celery's `NotRegistered(name)`: the name is its argument (a KeyError, so Python's
        // `str()` quotes it).
        let mut exc = ExceptionInfo::new("NotRegistered", format!("'{name}'"), "celery.exceptions");
        exc.exc_message = serde_json::Value::Array(vec![serde_json::Value::String(name.clone())]);
        // A task of a workflow fails its workflow as a failed run does: its chord counts the
        // failure (a chord never hangs on it), the rest of its chain fails, its errbacks run.
        let origin = crate::canvas::Origin {
            headers: &headers,
            body: &body,
            message: &delivery.message,
            queue: &delivery.queue,
        };
        let cont = crate::canvas::read(origin);
        if cont.is_empty() && cont.problems.is_empty() {
            store_failure(shared, &delivery.message, &id, &exc).await;
        } else {
            if !cont.problems.is_empty() {
                crate::canvas::report_problems(shared, origin, &cont.problems).await;
            }
            let tb = celeriac_core::result::format_traceback(&name, &id, &exc, Some("refused before it ran"));
            let meta = ResultMeta::exception(&id, TaskState::Failure, &exc, Some(tb));
            if let Err(e) = crate::canvas::store_and_continue(shared, origin, &cont, &meta, true).await {
                tracing::error!(task_id = %id, task_name = %name, error = %e, "could not store the failure or carry out its workflow; requeueing");
                let _ = delivery.reject(true).await;
                return None;
            }
        }
        Stats::bump(&shared.stats.failed);
        shared.observe.failed(&id, &name, &exc, None, None);
        ack(delivery, &id).await;
        return None;
    };
    if delivery.delivery_count > shared.config.max_deliveries {
        let reason = format!(
            "task {name}[{id}] was delivered {} times without completing (limit {}); its worker kept dying",
            delivery.delivery_count, shared.config.max_deliveries
        );
        tracing::error!(task_id = %id, task_name = %name, content_type = %content_of(&delivery.message), %reason, "poison message: failing and dead-lettering");
        let exc = ExceptionInfo::new("WorkerLostError", reason.clone(), "billiard.exceptions");
        store_failure(shared, &delivery.message, &id, &exc).await;
        Stats::bump(&shared.stats.failed);
        shared.observe.failed(&id, &name, &exc, None, None);
        dead_letter(shared, delivery, &reason).await;
        return None;
    }
    if let Some(expires) = headers.expires_time().filter(|t| *t <= Utc::now()) {
        tracing::warn!(task_id = %id, task_name = %name, expires = %expires, "task expired before it ran; revoking");
        // Celery's `store_errors`: stored unless the result is ignored (the message's say over
        // the task's) and the task does not keep its errors.
        let opts = task.options();
        if !headers.ignore_result.unwrap_or(opts.ignore_result) || opts.store_errors_even_if_ignored {
            let exc = ExceptionInfo::new("TaskRevokedError", "expired", "celery.exceptions");
            store_meta(
                shared,
                ReplyTo::of(&delivery.message),
                &ResultMeta::exception(&id, TaskState::Revoked, &exc, None),
            )
            .await;
        }
        Stats::bump(&shared.stats.revoked);
        shared.observe.revoked(&id, &name, true);
        ack(delivery, &id).await;
        return None;
    }
    if shared.state.is_revoked(&id) {
        tracing::info!(task_id = %id, task_name = %name, "task was revoked; not running it");
        shared.observe.revoked_by_control(&id, &name, false, None);
        let exc = ExceptionInfo::new("TaskRevokedError", "revoked", "celery.exceptions");
        store_meta(shared, ReplyTo::of(&delivery.message), &ResultMeta::exception(&id, TaskState::Revoked, &exc, None))
            .await;
        Stats::bump(&shared.stats.revoked);
        ack(delivery, &id).await;
        return None;
    }
    if let Some(run) = delivery.message.headers.get(BEAT_RUN_HEADER).and_then(|v| v.as_str()) {
        // A beat run: its id is its entry's and scheduled time's, so a copy sent again across a
        // beat failover is the same run; once a result is stored, a copy is not run again.
        match shared.backend.get(&id).await {
            Ok(Some(meta)) if meta.status.is_ready() => {
                tracing::info!(task_id = %id, task_name = %name, beat_run = %run, state = %meta.status, "this beat run already ran; not running it again");
                ack(delivery, &id).await;
                return None;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(task_id = %id, error = %e, "cannot tell whether this beat run already ran; running it")
            }
        }
    }
    let mut req = Request {
        delivery,
        headers,
        body,
        task,
        reserved: crate::metrics::Reserved::untracked(),
        tracked: None,
        rate_turn_taken: false,
        deferred: Vec::new(),
        chain_stopped: false,
    };
    shared.observe.received(&mut req);
    req.tracked = Some(shared.state.track(&req, req.eta_in_future()));
    Some(req)
}

/// The header beat puts on the tasks it sends (`<schedule>/<entry>`): a worker runs a beat run
/// once, however many times it was sent.
pub const BEAT_RUN_HEADER: &str = "celeriac_beat_run";

/// The content type of a message as a dead-letter log line names it, with its encoding and, when
/// compressed, kombu's `compression` header: `application/json; utf-8`,
/// `application/json; utf-8; compression application/x-gzip`.
pub(crate) fn content_of(message: &celeriac_core::Message) -> String {
    let p = &message.properties;
    let mut text = if p.content_type.is_empty() { "(none)".to_string() } else { p.content_type.clone() };
    if !p.content_encoding.is_empty() {
        text = format!("{text}; {}", p.content_encoding);
    }
    if let Some(codec) = message.headers.get("compression").and_then(serde_json::Value::as_str) {
        text = format!("{text}; compression {codec}");
    }
    text
}

/// Store the FAILURE of a message refused before it ran, with a traceback saying why.
async fn store_failure(shared: &Shared, message: &celeriac_core::Message, id: &str, exc: &ExceptionInfo) {
    let name = message.task_name().unwrap_or("?");
    let tb = celeriac_core::result::format_traceback(name, id, exc, Some("refused before it ran"));
    let meta = ResultMeta::exception(id, TaskState::Failure, exc, Some(tb));
    store_meta(shared, ReplyTo::of(message), &meta).await;
}

async fn store_meta(shared: &Shared, reply: ReplyTo<'_>, meta: &ResultMeta) {
    if let Err(e) = store_outcome(shared, reply, meta).await {
        tracing::warn!(task_id = %meta.task_id, error = %e, "could not store the result");
    }
}

/// Store a task's outcome, unless its stored state is REVOKED (kept, and logged): a task revoked
/// while it ran, or run by a worker that never heard of the revoke, stays REVOKED.
pub(crate) async fn store_outcome(
    shared: &Shared,
    reply: ReplyTo<'_>,
    meta: &ResultMeta,
) -> Result<(), celeriac_core::BackendError> {
    if shared.backend.store_outcome(meta, reply).await? == celeriac_core::backend::Stored::KeptRevoked {
        tracing::warn!(task_id = %meta.task_id, state = %meta.status, "the task was revoked: its stored state stays REVOKED and this outcome is not stored");
    }
    Ok(())
}

async fn dead_letter(shared: &Shared, delivery: Delivery, reason: &str) {
    Stats::bump(&shared.stats.dead_lettered);
    if let Err(e) = delivery.dead_letter(reason).await {
        tracing::warn!(error = %e, "could not dead-letter the message");
    }
}

async fn ack(delivery: Delivery, id: &str) {
    if let Err(e) = delivery.ack().await {
        tracing::warn!(task_id = %id, error = %e, "could not acknowledge");
    }
}
