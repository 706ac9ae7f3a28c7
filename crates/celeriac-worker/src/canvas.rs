//! Carrying out a finished task's embed, as Celery's worker does (`celery/app/trace.py`,
//! `celery/backends/base.py`): after a SUCCESS the callbacks and the next step of the chain are
//! sent (before the result is stored, so its `children` lists them); a chord header task's
//! outcome is stored and counted into the chord's join in one step, and the worker that completes
//! the join sends the body; after a FAILURE the rest of the chain is failed and the errbacks are
//! sent; a REVOKED task only joins its chord.
//!
//! Every message is published before the delivery is acknowledged, so a worker that dies on the
//! way runs the task again rather than lose a continuation; continuations carry the ids frozen in
//! the workflow, so a second run sends the same ids. A malformed part of an embed is logged once
//! with the task's id and the reason and, when it has an id, stored as that id's FAILURE; the
//! task itself and the rest of its embed go on. A continuation that reads well but cannot be
//! applied (an option of the wrong type, a nested part malformed) is logged once and stored as a
//! FAILURE on every id its signature names, its own and its members'.

use std::time::Duration;

use celeriac_core::backend::{Joined, Stored};
use celeriac_core::canvas::continuation::{self, errbacks_call, ChordFinish, Continuations, Problem};
use celeriac_core::canvas::join::{ChordError, ChordPart};
use celeriac_core::canvas::{apply, Applied, Call, Sender, Shape, Signature};
use celeriac_core::{ExceptionInfo, ReplyTo, ResultMeta, TaskState};
use serde_json::Value;

use crate::request::Request;
use crate::Shared;

/// How long one continuation's publish may take before the task is requeued instead.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(10);

/// How long a header task waits for another worker's claim on its chord to resolve before it
/// gives its delivery back to try again later.
const CLAIM_WAIT: Duration = Duration::from_secs(40);

/// Why a continuation could not be carried out now (the task is requeued, to try again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ContinueError {
    #[error("could not publish {task}[{id}]: {reason}")]
    Publish { task: String, id: String, reason: String },
    #[error("result backend: {0}")]
    Backend(#[from] celeriac_core::BackendError),
}

/// The message a continuation comes from: its headers, its body, the message itself and the
/// queue it came from (a [`Request`], or a message refused before it ran).
#[derive(Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub headers: &'a celeriac_core::TaskHeaders,
    pub body: &'a celeriac_core::TaskBody,
    pub message: &'a celeriac_core::Message,
    pub queue: &'a str,
}

impl<'a> From<&'a Request> for Origin<'a> {
    fn from(req: &'a Request) -> Self {
        Origin { headers: &req.headers, body: &req.body, message: &req.delivery.message, queue: &req.delivery.queue }
    }
}

/// The embed of a message, read once (empty for the common task with no workflow).
pub(crate) fn read(req: Origin<'_>) -> Continuations {
    let e = &req.body.embed;
    if e.callbacks.is_none() && e.errbacks.is_none() && e.chain.is_none() && e.chord.is_none() {
        return Continuations::default();
    }
    let mut cont = Continuations::read(e);
    if req.headers.group.is_none() {
        if let Some(body) = cont.chord.take() {
            cont.problems.push(Problem {
                field: "chord",
                task_id: body.task_id().map(str::to_string),
                error: celeriac_core::canvas::CanvasError::BadEmbed {
                    field: "chord",
                    reason: "a chord body on a message with no group: the chord it belongs to cannot be named".into(),
                },
            });
        }
    }
    cont
}

/// The root of the workflow this task belongs to (Celery: `root_id or id`).
fn root_of(req: Origin<'_>) -> String {
    req.headers.root_id.clone().unwrap_or_else(|| req.headers.id.clone())
}

fn with_sender<T>(shared: &Shared, f: impl FnOnce(&Sender<'_>) -> T) -> T {
    let registry = shared.registry.clone();
    let task_options = move |name: &str| registry.get(name).map(|t| t.options());
    let sender = Sender {
        origin: &shared.config.hostname,
        default_queue: &shared.config.default_queue,
        now: chrono::Utc::now(),
        task_options: &task_options,
    };
    f(&sender)
}

/// Log (once each) and record the parts of an embed that could not be read: a FAILURE stored on
/// the continuation's id when it has one, and the message among the dead letters (on the brokers
/// that keep them) with every reason.
pub(crate) async fn report_problems(shared: &Shared, req: Origin<'_>, problems: &[Problem]) {
    let reasons: Vec<String> =
        problems.iter().map(|p| format!("malformed {} continuation: {}", p.field, p.error)).collect();
    let reason = reasons.join("; ");
    match shared.broker.record_dead_letter(req.queue, req.message, &reason).await {
        Ok(true) => tracing::info!("message recorded among the dead letters, with the reason"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not record the malformed continuation among the dead letters"),
    }
    for p in problems {
        match &p.task_id {
            Some(id) => {
                tracing::error!(field = p.field, continuation_id = %id, reason = %p.error, "malformed continuation in the embed: not carried out")
            }
            None => {
                tracing::error!(field = p.field, reason = %p.error, "malformed continuation in the embed (it names no id): not carried out")
            }
        }
        if let Some(id) = &p.task_id {
            let exc = ExceptionInfo::new(
                "ValueError",
                format!("malformed {} continuation: {}", p.field, p.error),
                "builtins",
            );
            let meta = ResultMeta::exception(id, TaskState::Failure, &exc, None);
            if let Err(e) = shared.backend.store(&meta).await {
                tracing::warn!(error = %e, continuation_id = %id, "could not store the FAILURE of the malformed continuation");
            }
        }
    }
}

/// What a finished task sends: the applied continuations, and the ones that could not be applied
/// (each stored as a FAILURE by [`publish`] on every id it names, never dropped in silence).
#[derive(Default)]
pub(crate) struct Plans {
    pub applied: Vec<Applied>,
    refused: Vec<Refused>,
}

/// A continuation whose signature cannot be applied (a nested part malformed, a message that
/// cannot be built).
struct Refused {
    task: String,
    /// Its own id and those of the signatures nested in it, found in its JSON form.
    ids: Vec<String>,
    reason: String,
}

/// Every `options.task_id` in a signature's JSON form, its own first: a part of a workflow that
/// will not run because the whole cannot be applied.
fn ids_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(m) => {
            if m.contains_key("task") {
                if let Some(id) = m.get("options").and_then(|o| o.get("task_id")).and_then(Value::as_str) {
                    if !out.iter().any(|seen| seen == id) {
                        out.push(id.to_string());
                    }
                }
            }
            m.values().for_each(|v| ids_in(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| ids_in(v, out)),
        _ => {}
    }
}

/// Apply each signature (a plan each); the ones that cannot be applied are kept as refused, with
/// the ids they name.
fn plan(shared: &Shared, sigs: impl IntoIterator<Item = (Signature, Call)>) -> Plans {
    let mut out = Plans::default();
    for (sig, call) in sigs {
        match with_sender(shared, |sender| apply(&sig, call, sender)) {
            Ok(applied) => {
                for name in &applied.ignored_options {
                    tracing::warn!(continuation = %sig.task, option = %name, "option not supported by celeriac: ignored");
                }
                out.applied.push(applied)
            }
            Err(e) => {
                let mut ids = Vec::new();
                ids_in(&sig.to_value(), &mut ids);
                out.refused.push(Refused { task: sig.task.clone(), ids, reason: e.to_string() });
            }
        }
    }
    out
}

/// Publish the applied continuations (see [`publish_applied`]), then store a FAILURE on every id
/// a refused one names, logging each once.
pub(crate) async fn publish(shared: &Shared, plans: &Plans) -> Result<(), ContinueError> {
    publish_applied(shared, &plans.applied).await?;
    for r in &plans.refused {
        tracing::error!(continuation = %r.task, continuation_ids = ?r.ids, reason = %r.reason, "continuation cannot be applied: not carried out, stored as FAILURE");
        let exc = ExceptionInfo::new("ValueError", format!("continuation cannot be applied: {}", r.reason), "builtins");
        for id in &r.ids {
            shared.backend.store(&ResultMeta::exception(id, TaskState::Failure, &exc, None)).await?;
        }
    }
    Ok(())
}

/// Record the chord sizes, then publish every message of the plans, in order.
pub(crate) async fn publish_applied(shared: &Shared, plans: &[Applied]) -> Result<(), ContinueError> {
    for applied in plans {
        if !applied.chord_sizes.is_empty() && !shared.backend.supports_chords() {
            let id = applied.result.id().to_string();
            tracing::error!(continuation_id = %id, backend = %shared.backend.url(), "a chord continuation on a result backend that cannot join chords: not sent, stored as FAILURE");
            let exc =
                ChordError(format!("the result backend {} cannot join chords", shared.backend.url())).to_exception();
            shared.backend.store(&ResultMeta::exception(&id, TaskState::Failure, &exc, None)).await?;
            continue;
        }
        for (group_id, size) in &applied.chord_sizes {
            shared.backend.set_chord_size(group_id, *size).await?;
        }
        for out in &applied.publish {
            let sent = tokio::time::timeout(PUBLISH_DEADLINE, shared.broker.publish(&out.queue, &out.message)).await;
            let failed =
                |reason: String| ContinueError::Publish { task: out.task.clone(), id: out.task_id.clone(), reason };
            match sent {
                Ok(Ok(())) => {
                    tracing::debug!(continuation = %out.task, continuation_id = %out.task_id, queue = %out.queue, "continuation sent");
                    warn_default_queue_not_consumed(shared, &out.queue);
                }
                Ok(Err(e)) => return Err(failed(e.to_string())),
                Err(_) => return Err(failed(format!("no confirmation within {PUBLISH_DEADLINE:?}"))),
            }
        }
    }
    Ok(())
}

/// Once per worker: a continuation went to the default queue (where those that name no queue
/// go) and this worker does not consume it, the usual reason a workflow stops after its first
/// step when the client's default queue is not `celery`.
fn warn_default_queue_not_consumed(shared: &Shared, queue: &str) {
    let config = &shared.config;
    if queue == config.default_queue
        && !config.queues.iter().any(|q| q == queue)
        && !shared.warned_default_queue.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            queue,
            "a continuation (callback, chain step, chord body or errback) went to the default queue {queue:?}, which this worker does not consume; continuations whose signature names no queue go there: if no worker consumes it, start the workers with --default-queue <the clients' default queue>"
        );
    }
}

/// After a SUCCESS: the callbacks and the next step of the chain (see
/// [`Continuations::after_success`]). Returns the plans; their results are the task's children.
pub(crate) fn after_success(shared: &Shared, req: Origin<'_>, cont: &Continuations, value: &Value) -> Plans {
    plan(shared, cont.after_success(value, &req.headers.id, &root_of(req)))
}

/// The `children` of a result: the tuples of what the task sent.
pub(crate) fn children(plans: &Plans) -> Value {
    Value::Array(plans.applied.iter().map(|p| p.result.as_tuple()).collect())
}

/// The errbacks of a failed task, sent as one group (see [`errbacks_call`]).
fn errbacks(shared: &Shared, errbacks: &[Signature], failed_id: &str, root_id: &str) -> Plans {
    plan(shared, errbacks_call(errbacks, failed_id, root_id))
}

/// Store the outcome of a task, joining its chord when it is a chord header task (its message
/// has a `chord` body and a `group`), then carry out what the join asks for.
pub(crate) async fn store(
    shared: &Shared,
    req: Origin<'_>,
    cont: &Continuations,
    meta: &ResultMeta,
) -> Result<Stored, ContinueError> {
    let reply = ReplyTo::of(req.message);
    let (Some(body), Some(group)) = (&cont.chord, &req.headers.group) else {
        return Ok(shared.backend.store_outcome(meta, reply).await?);
    };
    if !shared.backend.supports_chords() {
        // Celery's RPC backend refuses chords too; here the header task's message says it is
        // part of one, so the body is failed (its waiter learns why) rather than left pending.
        let stored = shared.backend.store_outcome(meta, reply).await?;
        let error = ChordError(format!(
            "the result backend {} cannot join chords: the chord's body will not run",
            shared.backend.url()
        ));
        // One header task speaks for the chord (the first, or each when the sender numbered
        // none): the body's errbacks run once, not once per header task.
        if req.headers.group_index.is_none_or(|i| i == 0) {
            tracing::error!(group = %group, body = %body.task, %error, "chord header task on a backend without chords");
            chord_error(shared, body, &error).await?;
        } else {
            tracing::debug!(group = %group, body = %body.task, "chord header task on a backend without chords (the first header task reports it)");
        }
        return Ok(stored);
    }
    let part = ChordPart::of(group, req.headers.group_index, meta);
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let (stored, joined) = shared.backend.store_chord_part(meta, reply, &part).await?;
        match joined {
            Joined::Waiting | Joined::Done => return Ok(stored),
            Joined::Complete { parts, claim } => {
                finish_chord(shared, req, body, group, &parts).await?;
                shared.backend.clear_chord(group, &claim).await?;
                return Ok(stored);
            }
            Joined::ClaimedElsewhere if started.elapsed() < CLAIM_WAIT => {
                tracing::debug!(group = %group, "another worker holds the chord's claim; waiting for it to finish or lapse");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Joined::ClaimedElsewhere => {
                return Err(ContinueError::Publish {
                    task: body.task.clone(),
                    id: body.task_id().unwrap_or_default().to_string(),
                    reason: format!("another worker has held the claim on chord {group} for {CLAIM_WAIT:?}"),
                })
            }
        }
    }
}

/// Every part of the chord is in: send the body with the list of results, or, when a header
/// task failed, fail the body as Celery does (see [`ChordFinish`]).
async fn finish_chord(
    shared: &Shared,
    req: Origin<'_>,
    body: &Signature,
    group: &str,
    parts: &[ChordPart],
) -> Result<(), ContinueError> {
    match continuation::finish_chord(body, parts, &req.headers.id, &root_of(req)) {
        ChordFinish::Body(sig, call) => {
            tracing::info!(group = %group, parts = parts.len(), body = %body.task, "chord complete: sending its body");
            publish(shared, &plan(shared, [(sig, call)])).await
        }
        failed @ ChordFinish::Failed { .. } => {
            tracing::error!(group = %group, body = %body.task, "chord failed: its body will not run");
            chord_failed(shared, failed).await
        }
    }
}

/// Celery's `chord_error_from_stack`: the body's errbacks get its id, its FAILURE
/// (`ChordError`) is stored, and the rest of its chain fails with it.
async fn chord_failed(shared: &Shared, failed: ChordFinish) -> Result<(), ContinueError> {
    let ChordFinish::Failed { body_id, error, errbacks, chain } = failed else { return Ok(()) };
    tracing::error!(body_id = %body_id, %error, "chord body failed");
    publish(shared, &plan(shared, errbacks)).await?;
    let exc = error.to_exception();
    shared.backend.store(&ResultMeta::exception(&body_id, TaskState::Failure, &exc, None)).await?;
    fail_chain(shared, &chain, &exc).await;
    Ok(())
}

/// A chord that cannot complete (its backend cannot join it): fail its body.
async fn chord_error(shared: &Shared, body: &Signature, error: &ChordError) -> Result<(), ContinueError> {
    let failed = ChordPart {
        group_id: String::new(),
        task_id: String::new(),
        group_index: None,
        state: TaskState::Failure,
        result: error.to_exception().to_value(),
    };
    match continuation::finish_chord(body, &[failed], "", "") {
        ChordFinish::Failed { body_id, errbacks, chain, .. } => {
            chord_failed(shared, ChordFinish::Failed { body_id, error: error.clone(), errbacks, chain }).await
        }
        ChordFinish::Body(..) => Ok(()),
    }
}

/// After a FAILURE (or a chord's failure): Celery's `_fail_chain`: every later step of the chain
/// is stored as FAILURE with the same error, so nothing waits on a step that will never run.
async fn fail_chain(shared: &Shared, chain: &[Signature], exc: &ExceptionInfo) {
    let mut work: Vec<Signature> = chain.to_vec();
    while let Some(step) = work.pop() {
        if let Ok(Shape::Chord { body, .. }) = step.shape() {
            work.push(*body);
        }
        let Some(id) = step.task_id() else { continue };
        let meta = ResultMeta::exception(id, TaskState::Failure, exc, None);
        if let Err(e) = shared.backend.store(&meta).await {
            tracing::warn!(error = %e, step_id = %id, "could not store the FAILURE of a chain step that will not run");
        }
    }
}

/// After a final FAILURE: the rest of the chain fails, then the errbacks are sent.
pub(crate) async fn after_failure(
    shared: &Shared,
    req: Origin<'_>,
    cont: &Continuations,
    exc: &ExceptionInfo,
    store_result: bool,
) -> Result<(), ContinueError> {
    if let Some(chain) = cont.chain.as_ref().filter(|_| store_result) {
        tracing::info!(steps = chain.len, "the chain stops here: its later steps are failed");
        fail_chain(shared, &chain.steps(), exc).await;
    }
    let plans = errbacks(shared, &cont.errbacks, &req.headers.id, &root_of(req));
    publish(shared, &plans).await
}

/// Store an outcome (joining the task's chord if it is a header task), then, for a final
/// FAILURE, fail the rest of its chain and send its errbacks.
///
/// With `store_result` false (a task that ignores its result and does not keep its errors,
/// Celery's `store_errors` off), nothing is stored for the task nor for the later steps of its
/// chain, and its errbacks are still sent, as Celery's `mark_as_failure(store_result=False)`;
/// a chord header task's outcome is stored all the same, since its join is that store.
pub(crate) async fn store_and_continue(
    shared: &Shared,
    origin: Origin<'_>,
    cont: &Continuations,
    meta: &ResultMeta,
    store_result: bool,
) -> Result<(), ContinueError> {
    let store_result = store_result || cont.chord.is_some();
    if store_result && store(shared, origin, cont, meta).await? == Stored::KeptRevoked {
        tracing::warn!(state = %meta.status, "the task was revoked: its stored state stays REVOKED and this outcome is not stored");
        return Ok(());
    }
    if !store_result {
        tracing::debug!(state = %meta.status, "not stored: the task ignores its result (ignore_result, without store_errors_even_if_ignored)");
    }
    if meta.status == TaskState::Failure {
        if let Some(exc) = meta.exception_info() {
            after_failure(shared, origin, cont, &exc, store_result).await?;
        }
    }
    Ok(())
}
