//! Running one request in the async pool and settling it.
//!
//! Order of events for one task: wait for its ETA if the broker delivered it early (without
//! holding a pool slot, see [`hold_then_run`]) → run it
//! under its soft and hard time limits → store the outcome → acknowledge. A retry republishes the
//! message (same id, `retries + 1`, ETA = now + backoff) *before* the original is acknowledged, so
//! a crash between the two duplicates a retry but never loses one. When the outcome cannot be
//! stored, the message is requeued rather than acknowledged.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::protocol::format_datetime;
use celeriac_core::result::{format_traceback, ExceptionInfo};
use celeriac_core::task::TaskError;
use celeriac_core::{ReplyTo, ResultMeta, TaskContext, TaskState};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::foreign::AckPolicy;
use crate::prefork::protocol::RunRequest;
use crate::prefork::PoolOutcome;
use crate::request::Request;
use crate::stats::Stats;
use crate::Shared;
use crate::ShutdownLevel;

/// How a task run ended.
enum Outcome {
    Value(Value),
    Error(TaskError),
    TimeLimit(f64),
    /// Panicked: the message, and where (`panicked at file:line:col`) when known.
    Panicked(String, Option<String>),
    /// The prefork child running it died (how).
    WorkerLost(String),
    /// The task raised Celery's `Ignore`: nothing stored, the message acknowledged.
    Ignored,
    /// The task raised Celery's `Reject`: the message rejected, back to its queue or not.
    Rejected {
        requeue: bool,
        err: TaskError,
    },
    /// Revoked by remote control before it ran, or terminated while it ran (the reason).
    Revoked(&'static str, Option<i32>),
    Aborted,
}

/// The span every log line about a task runs in: id, name and queue, and the pid of the prefork
/// child running it once one does (recorded by the pool).
fn task_span(req: &Request) -> tracing::Span {
    tracing::error_span!(
        "task",
        id = %req.headers.id,
        name = %req.headers.task,
        queue = %req.delivery.queue,
        child_pid = tracing::field::Empty
    )
}

/// Run a request holding a pool slot, then settle its delivery.
pub(crate) async fn run(shared: Arc<Shared>, req: Request, permit: OwnedSemaphorePermit) {
    // An ERROR-level span is enabled whenever any event is, so every line carries the id and name.
    let span = task_span(&req);
    run_inner(shared, req, permit).instrument(span).await
}

async fn run_inner(shared: Arc<Shared>, mut req: Request, permit: OwnedSemaphorePermit) {
    let mut abort = shared.abort.clone();
    if shared.state.is_revoked(&req.headers.id) {
        drop(permit);
        return settle(&shared, req, Outcome::Revoked("revoked", None), Duration::ZERO).await;
    }
    // A task whose turn was not taken before it got its slot (an ETA task come due) waits here.
    let wait = if req.rate_turn_taken { None } else { shared.state.rate_wait(&req.headers.task) };
    if let Some(wait) = wait {
        tracing::debug!(wait = ?wait, "rate limited");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = aborted(&mut abort) => return settle(&shared, req, Outcome::Aborted, Duration::ZERO).await,
        }
    }
    let in_flight = shared.observe.started(&mut req);
    // A child's task that is not acks_late is acknowledged as it starts, as Celery's worker does.
    if shared.acks.get(&req.headers.task).is_some_and(|p| !p.acks_late) {
        req.delivery = crate::foreign::ack_early(req.delivery).await;
        shared.state.acknowledged(&req.headers.id);
    }
    let mut terminate = shared.state.start(&req.headers.id);
    let opts = req.task.options();
    // The message's limits, else those remote control set for the task, else the task's own,
    // else the worker's.
    let set = shared.state.time_limits(&req.headers.task);
    let (task_hard, task_soft) = set.map_or((opts.time_limit, opts.soft_time_limit), |l| (l.hard, l.soft));
    let hard = req.headers.hard_time_limit().or(task_hard).or(shared.config.time_limit).filter(|s| *s > 0.0);
    let soft = req.headers.soft_time_limit().or(task_soft).or(shared.config.soft_time_limit).filter(|s| *s > 0.0);
    let (soft_tx, soft_rx) = watch::channel(false);
    let mut ctx = TaskContext::detached(req.headers.id.clone(), req.headers.task.clone());
    ctx.retries = req.headers.retries;
    ctx.max_retries = opts.max_retries;
    ctx.queue = req.delivery.queue.clone();
    ctx.eta = req.headers.eta_time();
    ctx.expires = req.headers.expires_time();
    ctx.root_id = req.headers.root_id.clone();
    ctx.parent_id = req.headers.parent_id.clone();
    ctx.group = req.headers.group.clone();
    ctx.delivery_count = req.delivery.delivery_count;
    ctx.hostname = shared.config.hostname.clone();
    let ctx = ctx.with_soft_limit(soft_rx);

    tracing::info!(retries = req.headers.retries, "task received");
    let started = std::time::Instant::now();
    let publisher = crate::foreign::Publisher::new(&shared, &req.headers.id);
    let run = async {
        match &shared.pool {
            // Celery's builtins run here: they call the application's tasks and publish.
            Some(pool) if !crate::builtins::runs_in_worker(&req.headers.task) => {
                let run = RunRequest {
                    id: req.headers.id.clone(),
                    name: req.headers.task.clone(),
                    args: req.body.args.clone(),
                    kwargs: req.body.kwargs.clone(),
                    retries: req.headers.retries,
                    queue: req.delivery.queue.clone(),
                    root_id: req.headers.root_id.clone(),
                    parent_id: req.headers.parent_id.clone(),
                    group: req.headers.group.clone(),
                    delivery_count: req.delivery.delivery_count,
                    hostname: shared.config.hostname.clone(),
                    soft_time_limit: soft,
                    request: (!pool.child_tasks().is_empty())
                        .then(|| crate::foreign::celery_request(&req, &shared.config.hostname)),
                };
                drop((ctx, soft_tx));
                let outcome = match pool.run(run, hard.map(Duration::from_secs_f64), abort.clone(), &publisher).await {
                    PoolOutcome::Done { result, chain_stopped } => {
                        return (pool_result(result), chain_stopped);
                    }
                    PoolOutcome::TimeLimit => Outcome::TimeLimit(hard.unwrap_or_default()),
                    PoolOutcome::WorkerLost(how) => Outcome::WorkerLost(how),
                    PoolOutcome::Terminated(signal, how) => {
                        tracing::info!(child_exit = %how, "terminated by remote control");
                        Outcome::Revoked("terminated", Some(signal))
                    }
                    PoolOutcome::Aborted => Outcome::Aborted,
                };
                (outcome, false)
            }
            _ => (run_in_process(&req, ctx, soft, soft_tx, hard, &mut abort).await, false),
        }
    };
    let (outcome, chain_stopped) = tokio::select! {
        outcome = run => outcome,
        // `revoke --terminate` in the async pool: the task is dropped at its next await.
        Ok(signal) = terminate.wait_for(Option::is_some) => (Outcome::Revoked("terminated", *signal), false),
    };
    let held = publisher.into_held();
    req.deferred = held;
    req.chain_stopped = chain_stopped;
    let runtime = started.elapsed();
    shared.runtimes.lock().unwrap_or_else(|p| p.into_inner()).record(runtime);
    // The slot is free as soon as the task is done; settling does not need it.
    drop((permit, in_flight));
    settle(&shared, req, outcome, runtime).await;
}

/// How a task in a pool child ended, from its result: Celery's control exceptions (`Ignore`,
/// `Reject`) and a Rust child's panic are told apart from other errors.
fn pool_result(result: Result<Value, TaskError>) -> Outcome {
    match result {
        Ok(v) => Outcome::Value(v),
        Err(e) if e.exc_type == "Panic" && e.module == "celeriac" => Outcome::Panicked(e.message, e.traceback),
        Err(e) => match crate::foreign::Control::of(&e) {
            Some(crate::foreign::Control::Ignore) => Outcome::Ignored,
            Some(crate::foreign::Control::Reject { requeue }) => Outcome::Rejected { requeue, err: e },
            None => Outcome::Error(e),
        },
    }
}

/// Run a task in this process (the async pool), under its time limits.
async fn run_in_process(
    req: &Request,
    ctx: TaskContext,
    soft: Option<f64>,
    soft_tx: watch::Sender<bool>,
    hard: Option<f64>,
    abort: &mut watch::Receiver<bool>,
) -> Outcome {
    // Where a panic happens is recorded by the hook (installed once) on the panicking thread.
    celeriac_core::panics::install_hook();
    let fut = AssertUnwindSafe(req.task.call(ctx, req.body.args.clone(), req.body.kwargs.clone())).catch_unwind();
    let soft_timer = async {
        match soft {
            Some(s) => {
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
                tracing::warn!(soft_time_limit = s, "soft time limit exceeded");
                let _ = soft_tx.send(true);
                std::future::pending::<()>().await
            }
            None => std::future::pending().await,
        }
    };
    let hard_timer = async {
        match hard {
            Some(h) => tokio::time::sleep(Duration::from_secs_f64(h)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = fut => match r {
            Ok(Ok(v)) => Outcome::Value(v),
            Ok(Err(e)) => Outcome::Error(e),
            Err(panic) => {
                let e = celeriac_core::panics::to_task_error(panic.as_ref());
                Outcome::Panicked(e.message, e.traceback)
            }
        },
        _ = hard_timer => Outcome::TimeLimit(hard.unwrap_or_default()),
        _ = soft_timer => unreachable!("the soft timer never completes"),
        _ = aborted(abort) => Outcome::Aborted,
    }
}

/// Hold a request whose ETA is in the future (the broker delivered it early), without taking a
/// pool slot, then run it. A warm shutdown gives it back to the queue at once. When the ETA is
/// further away than the broker lets a delivery stay unacknowledged (RabbitMQ's
/// `consumer_timeout`), the message is republished unchanged after that long and the original
/// acknowledged, so a far-future task never gets the channel closed.
pub(crate) async fn hold_then_run(
    shared: Arc<Shared>,
    req: Request,
    eta: DateTime<Utc>,
    slots: Arc<Semaphore>,
    mut level: watch::Receiver<ShutdownLevel>,
    held: HeldGuard,
) {
    let span = task_span(&req);
    async move {
        let wait = (eta - Utc::now()).to_std().unwrap_or_default();
        if req.rate_turn_taken {
            tracing::debug!(wait = ?wait, "rate limited: waiting for its turn without a pool slot");
        } else {
            tracing::info!(eta = %eta, "holding until ETA");
        }
        if let Some(max) = shared.broker.max_unacked_hold().filter(|max| wait > *max) {
            tokio::select! {
                _ = tokio::time::sleep(max) => {
                    match shared.broker.publish(&req.delivery.queue, &req.delivery.message).await {
                        Ok(()) => {
                            tracing::info!(eta = %eta, "ETA beyond the broker's unacked limit: republished to wait again");
                            if let Err(e) = req.delivery.ack().await {
                                tracing::warn!(error = %e, "could not acknowledge the original; it may run twice");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not republish; requeueing");
                            req.requeue().await;
                        }
                    }
                }
                _ = stopping(&mut level) => {
                    Stats::bump(&shared.stats.requeued);
                    req.requeue().await;
                }
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopping(&mut level) => {
                Stats::bump(&shared.stats.requeued);
                req.requeue().await;
                return;
            }
        }
        let permit = tokio::select! {
            p = slots.acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => { req.requeue().await; return; }
            },
            _ = stopping(&mut level) => {
                Stats::bump(&shared.stats.requeued);
                req.requeue().await;
                return;
            }
        };
        // Running now: counted among the slots in use, no longer among the held.
        drop(held);
        run_inner(shared, req, permit).await
    }
    .instrument(span)
    .await
}

/// One delivery held for its ETA (or its turn under a rate limit) without a slot, counted while
/// it lives: the worker widens the prefetch window by the number held (see
/// [`crate::prefetch::wanted`]).
pub(crate) struct HeldGuard(Arc<std::sync::atomic::AtomicUsize>);

impl HeldGuard {
    /// Count one more held delivery until the guard is dropped.
    pub(crate) fn new(count: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HeldGuard(count)
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Resolves once shutdown has begun.
async fn stopping(level: &mut watch::Receiver<ShutdownLevel>) {
    let _ = level.wait_for(|l| *l != ShutdownLevel::Running).await;
}

/// Resolves once the worker asks running tasks to abort.
async fn aborted(abort: &mut watch::Receiver<bool>) {
    let _ = abort.wait_for(|a| *a).await;
}

async fn settle(shared: &Shared, req: Request, outcome: Outcome, runtime: Duration) {
    let id = req.headers.id.clone();
    let opts = req.task.options();
    // The message's own say overrides the task's (Celery 5.7's `get_actual_ignore_result`).
    let ignore_result = req.headers.ignore_result.unwrap_or(opts.ignore_result);
    // Celery's `store_errors` (`celery/app/trace.py`, `celery/worker/request.py`): a task that
    // ignores its result stores no FAILURE, RETRY or REVOKED either, unless it keeps its errors
    // (`store_errors_even_if_ignored`); its errbacks are still sent.
    let store_errors = !ignore_result || opts.store_errors_even_if_ignored;
    // The workflow the message carries (callbacks, errbacks, the rest of its chain, its chord).
    let mut cont = crate::canvas::read((&req).into());
    if !cont.problems.is_empty() {
        crate::canvas::report_problems(shared, (&req).into(), &cont.problems).await;
    }
    if req.chain_stopped && cont.chain.take().is_some() {
        tracing::info!(
            "the task emptied its request's chain (request.chain = None): the rest of the chain is not sent"
        );
    }
    // Settled by rejecting without requeue, not acknowledging (Celery's `Reject(requeue=False)`,
    // or a FAILURE of a task that is not `acks_on_failure`).
    let mut reject_after = false;
    let outcome = retry_if_lost(shared, &req, outcome);
    // Losses (a dead child, a hard time limit that requeues) are counted for the poison guard.
    if !matches!(outcome, Outcome::WorkerLost(_) | Outcome::TimeLimit(_)) {
        shared.forget_lost(&id);
    }
    let meta = match outcome {
        Outcome::Aborted => {
            tracing::warn!(runtime = ?runtime, "task interrupted by shutdown; requeueing");
            Stats::bump(&shared.stats.requeued);
            req.requeue().await;
            return;
        }
        Outcome::Revoked(reason, signum) => {
            tracing::info!(runtime = ?runtime, reason, "task revoked");
            Stats::bump(&shared.stats.revoked);
            shared.observe.revoked_by_control(&id, &req.headers.task, reason == "terminated", signum);
            let exc = ExceptionInfo::new("TaskRevokedError", reason, "celery.exceptions");
            Some(ResultMeta::exception(&id, TaskState::Revoked, &exc, None))
        }
        Outcome::Value(value) => {
            tracing::info!(runtime = ?runtime, "task succeeded");
            Stats::bump(&shared.stats.succeeded);
            shared.observe.succeeded(&req, &value, runtime);
            // Callbacks and the chain's next step go out before the result is stored, as
            // Celery's worker sends them, so the result's `children` lists them.
            let plans = if cont.callbacks.is_empty() && cont.chain.is_none() {
                crate::canvas::Plans::default()
            } else {
                crate::canvas::after_success(shared, (&req).into(), &cont, &value)
            };
            if let Err(e) = crate::canvas::publish(shared, &plans).await {
                tracing::error!(error = %e, "could not send the task's continuations; requeueing so it runs again");
                Stats::bump(&shared.stats.requeued);
                req.requeue().await;
                return;
            }
            let mut children = crate::canvas::children(&plans);
            if req.headers.task == "celery.chunks" {
                // Its value is the group it sent, which Celery also lists among its children.
                if let Value::Array(c) = &mut children {
                    c.insert(0, value.clone());
                }
            }
            let mut meta = ResultMeta::success(&id, value);
            meta.children = children;
            // A chord header task joins its chord even when it keeps no result (as Celery).
            (!ignore_result || cont.chord.is_some()).then_some(meta)
        }
        Outcome::TimeLimit(limit) => {
            tracing::error!(time_limit = limit, "hard time limit exceeded");
            Stats::bump(&shared.stats.failed);
            // Celery's worker stores `TimeLimitExceeded(<the limit in seconds>)`
            // (`celery/worker/request.py`, `on_timeout`): the number is its one argument.
            let seconds = if limit.fract() == 0.0 && limit.abs() < 1e15 { json!(limit as i64) } else { json!(limit) };
            let exc = ExceptionInfo {
                exc_type: "TimeLimitExceeded".into(),
                exc_message: json!([seconds]),
                exc_module: "billiard.exceptions".into(),
            };
            let tb = traceback(&req, &exc, Some("killed at its hard time limit"));
            shared.observe.failed(&id, &req.headers.task, &exc, Some(&tb), Some(runtime));
            // Stored with no traceback, as Celery's worker stores it (the task's frames died
            // with its process); the event above carries ours.
            let mut meta = ResultMeta::exception(&id, TaskState::Failure, &exc, None);
            let policy = shared.acks.get(&req.headers.task).copied();
            if !AckPolicy::requeues_timeout(policy) {
                // Acknowledged (Celery's `acks_on_timeout`, which is not `acks_on_failure`).
                shared.forget_lost(&id);
                Some(meta)
            } else {
                // An acks_late task that is not acks_on_timeout: Celery's worker stores the
                // FAILURE and requeues the message (`on_timeout`, `on_failure`), so the task runs
                // again; celeriac bounds that with the poison guard. The errbacks and the rest of
                // the chain wait for the outcome of a run that is not requeued.
                let deliveries = poison_count(shared.note_lost(&id), req.delivery.delivery_count);
                with_request_fields(&mut meta, &req);
                if deliveries >= shared.config.max_deliveries {
                    shared.forget_lost(&id);
                    let reason = format!(
                        "task {}[{id}] was killed at its hard time limit {deliveries} times (limit {})",
                        req.headers.task, shared.config.max_deliveries
                    );
                    tracing::error!(%reason, "poison message: failing and dead-lettering");
                    let stored = crate::canvas::store_and_continue(shared, (&req).into(), &cont, &meta, store_errors);
                    if let Err(e) = stored.await {
                        tracing::error!(error = %e, "could not store the result; requeueing");
                        req.requeue().await;
                        return;
                    }
                    Stats::bump(&shared.stats.dead_lettered);
                    if let Err(e) = req.delivery.dead_letter(&reason).await {
                        tracing::warn!(error = %e, "could not dead-letter the message");
                    }
                    return;
                }
                if store_errors {
                    if let Err(e) = shared.backend.store_outcome(&meta, ReplyTo::of(&req.delivery.message)).await {
                        tracing::warn!(error = %e, "could not store the FAILURE of the timed-out run");
                    }
                }
                tracing::warn!(times = deliveries, "acks_late and not acks_on_timeout: FAILURE stored and the message requeued, as Celery's worker does");
                Stats::bump(&shared.stats.requeued);
                req.requeue().await;
                return;
            }
        }
        Outcome::WorkerLost(how) => {
            // A child's task that is not acks_late with reject_on_worker_lost is not run again:
            // FAILURE WorkerLostError, as Celery stores it (`celery/worker/request.py`).
            let requeues = AckPolicy::requeues_lost(shared.acks.get(&req.headers.task).copied(), req.headers.retries);
            // Deliveries of this message that lost their worker: those seen in this process, or
            // the broker's count, whichever is more. Both count this one. Neither is summed with
            // the other: a broker that counts (SQLite leases, quorum queues) already counts the
            // deliveries seen here, and one that only says "redelivered" (classic AMQP, Redis)
            // reports 2 for every redelivery.
            let deliveries = poison_count(shared.note_lost(&id), req.delivery.delivery_count);
            if !requeues || deliveries >= shared.config.max_deliveries {
                let reason = if requeues {
                    format!(
                        "Worker exited prematurely: {how}; task {}[{id}] lost its worker {deliveries} times (limit {})",
                        req.headers.task, shared.config.max_deliveries
                    )
                } else {
                    format!("Worker exited prematurely: {how}")
                };
                let content_type = crate::request::content_of(&req.delivery.message);
                if requeues {
                    tracing::error!(%content_type, %reason, "poison message: failing and dead-lettering");
                } else {
                    tracing::error!(%reason, "the child running the task died; the task is not acks_late with reject_on_worker_lost, so it is not run again: FAILURE, as in Celery");
                }
                Stats::bump(&shared.stats.failed);
                let exc = ExceptionInfo::new("WorkerLostError", reason.clone(), "billiard.exceptions");
                let tb = traceback(&req, &exc, Some(&format!("the child running it died: {how}")));
                shared.observe.failed(&id, &req.headers.task, &exc, Some(&tb), Some(runtime));
                let mut meta = ResultMeta::exception(&id, TaskState::Failure, &exc, Some(tb));
                with_request_fields(&mut meta, &req);
                if let Err(e) =
                    crate::canvas::store_and_continue(shared, (&req).into(), &cont, &meta, store_errors).await
                {
                    tracing::error!(error = %e, "could not store the result; requeueing");
                    req.requeue().await;
                    return;
                }
                shared.forget_lost(&id);
                if !requeues {
                    let rejects = AckPolicy::rejects_failure(shared.acks.get(&req.headers.task).copied());
                    let settled = if rejects { req.delivery.reject(false).await } else { req.delivery.ack().await };
                    if let Err(e) = settled {
                        tracing::warn!(error = %e, "could not settle the message; the broker will redeliver");
                    }
                    return;
                }
                Stats::bump(&shared.stats.dead_lettered);
                if let Err(e) = req.delivery.dead_letter(&reason).await {
                    tracing::warn!(error = %e, "could not dead-letter the message");
                }
                return;
            }
            tracing::error!(child_exit = %how, times = deliveries, "the child running the task died; requeueing it");
            Stats::bump(&shared.stats.requeued);
            req.requeue().await;
            return;
        }
        Outcome::Ignored => {
            tracing::info!(runtime = ?runtime, "task ignored (celery.exceptions.Ignore): nothing stored, the message acknowledged");
            shared.observe.ignored(&req.headers.task, runtime);
            None
        }
        Outcome::Rejected { requeue: true, err } => {
            tracing::warn!(reason = %err.message, runtime = ?runtime, "the task rejected its message (celery.exceptions.Reject, requeue=True): back to its queue");
            Stats::bump(&shared.stats.requeued);
            shared.observe.rejected(&id, &req.headers.task, true);
            req.requeue().await;
            return;
        }
        Outcome::Rejected { requeue: false, err } => {
            // Celery stores the Reject as the task's FAILURE, then rejects the message.
            tracing::warn!(reason = %err.message, runtime = ?runtime, "the task rejected its message (celery.exceptions.Reject, requeue=False): FAILURE stored, the message dropped");
            Stats::bump(&shared.stats.failed);
            let exc = err.to_exception();
            let tb = traceback(&req, &exc, err.traceback.as_deref());
            shared.observe.failed(&id, &req.headers.task, &exc, Some(&tb), Some(runtime));
            shared.observe.rejected(&id, &req.headers.task, false);
            reject_after = true;
            Some(ResultMeta::exception(&id, TaskState::Failure, &exc, Some(tb)))
        }
        Outcome::Panicked(msg, at) => {
            tracing::error!(panic = %msg, location = at.as_deref().unwrap_or("unknown"), "task panicked");
            Stats::bump(&shared.stats.failed);
            let exc = ExceptionInfo::new("Panic", msg, "celeriac");
            let tb = traceback(&req, &exc, at.as_deref());
            shared.observe.failed(&id, &req.headers.task, &exc, Some(&tb), Some(runtime));
            Some(ResultMeta::exception(&id, TaskState::Failure, &exc, Some(tb)))
        }
        Outcome::Error(err) => {
            let wants_retry = err.retry.is_some() || opts.autoretry_for.contains(&err.exc_type);
            let retries = req.headers.retries;
            let may_retry = opts.max_retries.is_none_or(|max| retries < max);
            if wants_retry && may_retry {
                let countdown =
                    err.retry.as_ref().and_then(|r| r.countdown).unwrap_or_else(|| opts.backoff.delay(retries));
                // RETRY is stored before the retry's message exists: published first, the retry
                // could run, finish and store its final state, which the RETRY would then
                // overwrite. A worker that dies in between runs the task again: nothing lost.
                let exc = err.to_exception();
                let tb = traceback(&req, &exc, err.traceback.as_deref());
                let mut meta = ResultMeta::exception(&id, TaskState::Retry, &exc, Some(tb.clone()));
                with_request_fields(&mut meta, &req);
                if let Err(e) =
                    crate::canvas::store_and_continue(shared, (&req).into(), &cont, &meta, store_errors).await
                {
                    tracing::error!(error = %e, "could not store the RETRY; requeueing so it runs again");
                    Stats::bump(&shared.stats.requeued);
                    req.requeue().await;
                    return;
                }
                // A Python task's `self.retry()` sent the new message itself (held until now).
                let sent = err.retry.as_ref().is_some_and(|r| r.sent);
                let published = if sent {
                    crate::foreign::publish_held(shared, &req.deferred).await
                } else {
                    republish(shared, &req, countdown).await.map_err(|e| e.to_string())
                };
                match published {
                    Ok(()) => {
                        tracing::info!(error = %err, retry_in = ?countdown, retries = retries + 1, "task failed; retry scheduled");
                        Stats::bump(&shared.stats.retried);
                        shared.observe.retried(&req, &exc, Some(&tb), runtime);
                        if let Err(e) = req.delivery.ack().await {
                            tracing::warn!(error = %e, "could not acknowledge; the broker will redeliver");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not publish the retry; requeueing the original");
                        Stats::bump(&shared.stats.requeued);
                        req.requeue().await;
                    }
                }
                return;
            } else {
                let exc = if wants_retry && err.retry.is_some() && err.exc_type == "Retry" {
                    ExceptionInfo::new(
                        "MaxRetriesExceededError",
                        format!(
                            "Can't retry {}[{}] args:{:?} kwargs:{:?}",
                            req.headers.task, id, req.body.args, req.body.kwargs
                        ),
                        "celery.exceptions",
                    )
                } else {
                    err.to_exception()
                };
                tracing::error!(error = %err, runtime = ?runtime, "task failed");
                Stats::bump(&shared.stats.failed);
                // An acks_late task that is not acks_on_failure: its message is rejected.
                reject_after = AckPolicy::rejects_failure(shared.acks.get(&req.headers.task).copied());
                let tb = traceback(&req, &exc, err.traceback.as_deref());
                shared.observe.failed(&id, &req.headers.task, &exc, Some(&tb), Some(runtime));
                Some(ResultMeta::exception(&id, TaskState::Failure, &exc, Some(tb)))
            }
        }
    };
    if let Some(mut meta) = meta {
        // A SUCCESS here is one to store; another state only when the task keeps its errors.
        let store = meta.status == TaskState::Success || store_errors;
        with_request_fields(&mut meta, &req);
        if let Err(e) = crate::canvas::store_and_continue(shared, (&req).into(), &cont, &meta, store).await {
            tracing::error!(error = %e, "could not store the result or carry out its continuations; requeueing so it runs again");
            Stats::bump(&shared.stats.requeued);
            req.requeue().await;
            return;
        }
    }
    // A message a child's task sent under its own id without retrying (`retry(throw=False)`).
    if let Err(e) = crate::foreign::publish_held(shared, &req.deferred).await {
        tracing::error!(error = %e, "could not publish what the task sent; requeueing so it runs again");
        Stats::bump(&shared.stats.requeued);
        req.requeue().await;
        return;
    }
    let settled = if reject_after { req.delivery.reject(false).await } else { req.delivery.ack().await };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle the message; the broker will redeliver");
    }
}

/// A child's task whose child died and that asks for it (Celery 5.7's `retry_on_worker_lost`,
/// with retries left) is retried as `self.retry()` would: its lost worker becomes an error
/// asking for a retry after its `default_retry_delay`.
fn retry_if_lost(shared: &Shared, req: &Request, outcome: Outcome) -> Outcome {
    let Outcome::WorkerLost(how) = outcome else { return outcome };
    let policy = shared.acks.get(&req.headers.task).copied();
    match AckPolicy::retry_lost_after(policy, req.headers.retries) {
        Some(countdown) => {
            tracing::warn!(child_exit = %how, "the child running the task died; retrying it (retry_on_worker_lost)");
            let mut err = TaskError::new("WorkerLostError", format!("Worker exited prematurely: {how}"))
                .with_module("billiard.exceptions");
            err.retry = Some(celeriac_core::task::RetryRequest { countdown: Some(countdown), sent: false });
            Outcome::Error(err)
        }
        None => Outcome::WorkerLost(how),
    }
}

/// Celery's request fields in a stored result: `group_id` and `parent_id`, when the message
/// has them (`celery/backends/base.py` `_get_result_meta`).
fn with_request_fields(meta: &mut ResultMeta, req: &Request) {
    if let Some(group) = &req.headers.group {
        meta.extra.insert("group_id".into(), Value::String(group.clone()));
    }
    if let Some(parent) = &req.headers.parent_id {
        meta.extra.insert("parent_id".into(), Value::String(parent.clone()));
    }
}

/// The traceback stored with a failure of this request: a Python child's own, as it came
/// (Celery's `ExceptionInfo.traceback`, the text Celery's worker stores), else
/// [`format_traceback`]'s with `detail`.
fn traceback(req: &Request, exc: &ExceptionInfo, detail: Option<&str>) -> String {
    match detail {
        Some(tb) if tb.starts_with("Traceback (most recent call last):") => tb.to_string(),
        _ => format_traceback(&req.headers.task, &req.headers.id, exc, detail),
    }
}

/// How many deliveries of a message lost their worker, from the losses this process saw and the
/// broker's delivery count (see the `WorkerLost` branch of `settle`).
fn poison_count(lost_here: u32, delivery_count: u32) -> u32 {
    lost_here.max(delivery_count)
}

/// Publish the retry: the same message with `retries + 1` and a new ETA. The body is kept as
/// received (compressed or not, with its `compression` header), so body and header stay
/// consistent. A protocol v1 message is republished as protocol v2 (its fields are in the body,
/// which a header change would not reach), as Celery's worker retries in its configured
/// protocol (v2 by default); every Celery 5 worker and celeriac accept it.
async fn republish(shared: &Shared, req: &Request, countdown: Duration) -> Result<(), celeriac_core::BrokerError> {
    let eta = Utc::now() + chrono::Duration::from_std(countdown).unwrap_or_default();
    let message = if req.delivery.message.is_protocol_v1() {
        let mut headers = req.headers.clone();
        headers.retries += 1;
        headers.eta = Some(format_datetime(eta));
        req.delivery.message.to_v2(&headers, &req.body).map_err(|e| celeriac_core::BrokerError::Rejected {
            url: shared.broker.url().to_string(),
            reason: format!("cannot re-encode the protocol v1 task as v2: {e}"),
        })?
    } else {
        let mut message = req.delivery.message.clone();
        message.headers.insert("retries".into(), Value::from(req.headers.retries + 1));
        message.headers.insert("eta".into(), Value::from(format_datetime(eta)));
        message
    };
    shared.broker.publish(&req.delivery.queue, &message).await
}

#[cfg(test)]
mod tests {
    use super::poison_count;

    #[test]
    fn the_poison_count_is_the_deliveries_that_lost_their_worker() {
        // Classic AMQP and Redis say 2 for any redelivery: the second loss here is the second.
        assert_eq!(poison_count(2, 2), 2);
        assert_eq!(poison_count(3, 2), 3);
        // SQLite does not count a requeue: the losses seen here are the count.
        assert_eq!(poison_count(3, 1), 3);
        // Deliveries whose worker itself died (lease lapsed) count from the broker.
        assert_eq!(poison_count(1, 3), 3);
    }
}
