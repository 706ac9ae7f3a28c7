//! A prefork child: the current binary re-executed in child mode, running one task at a time.
//!
//! On start it asks the kernel to SIGKILL it when its parent dies (`PR_SET_PDEATHSIG`) and then
//! checks that the parent it was started by is still its parent — if the supervisor died between
//! the fork and the `prctl`, the child exits at once. So a child never outlives its supervisor,
//! whatever kills the supervisor.
//!
//! It keeps its original stdout for the frame protocol and points fd 1 at stderr, so a task that
//! prints cannot corrupt the stream. Then: say `Ready`, and loop: read `Run`, run the task on a
//! single-threaded runtime (blocking tasks on its blocking pool), answer `Done` with the outcome
//! and its resident set size. `Exit` or the end of stdin ends the loop. `Ready` names the main
//! thread (`gettid`), where async tasks run; a blocking task's thread is reported with a
//! `Thread` frame when it starts ([`celeriac_core::task_thread`]), so the supervisor reads what
//! the task itself is blocked on.

use std::io::{BufReader, BufWriter};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{Registry, TaskContext, TaskError};
use futures::FutureExt;
use tokio::sync::watch;

use super::proc_info;
use super::protocol::{read_frame, write_frame, ChildOutcome, FromChild, RunRequest, ToChild};

/// Environment variable marking a child process; its value is the supervisor's pid.
pub const CHILD_ENV: &str = "CELERIAC_PREFORK_PARENT";

/// If this process was started as a prefork child, the supervisor's pid.
pub fn child_parent_pid() -> Option<u32> {
    std::env::var(CHILD_ENV).ok().and_then(|v| v.parse().ok())
}

/// Run the child loop with these tasks. Returns when told to exit or when the supervisor goes.
pub fn run(registry: Arc<Registry>, parent: u32) -> ExitCode {
    celeriac_core::panics::install_hook();
    if let Err(e) = proc_info::die_with_parent(parent) {
        eprintln!("celeriac child: {e}");
        return ExitCode::from(1);
    }
    let protocol_out = match proc_info::take_stdout_for_protocol() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("celeriac child: cannot set up the protocol pipe: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("celeriac child: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = BufWriter::new(protocol_out);
    let mut input = BufReader::new(std::io::stdin().lock());
    // A blocking task runs on the runtime's blocking pool: its thread says so (`task_thread`),
    // and `run_one` reports it to the supervisor.
    let (moved_tx, mut moved_rx) = watch::channel(None);
    celeriac_core::task_thread::listen(move || {
        moved_tx.send_replace(Some(proc_info::thread_id()));
    });
    let tid = proc_info::thread_id();
    if write_frame(&mut out, &FromChild::Ready { pid: std::process::id(), tasks: Vec::new(), tid: Some(tid) }).is_err()
    {
        return ExitCode::from(1);
    }
    let rss = proc_info::OwnRss::open();
    loop {
        let msg = match read_frame::<ToChild>(&mut input) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return ExitCode::SUCCESS,
        };
        match msg {
            ToChild::Exit => return ExitCode::SUCCESS,
            // Only ever an answer to a publish, which this child does not ask for.
            ToChild::Published { .. } => continue,
            ToChild::Run(req) => {
                let id = req.id.clone();
                let span = tracing::error_span!("task", id = %req.id, name = %req.name, queue = %req.queue, hostname = %req.hostname);
                moved_rx.mark_unchanged();
                let moved = report_moves(&id, tid, &mut moved_rx, &mut out);
                let outcome = runtime.block_on(tracing::Instrument::instrument(run_one(&registry, *req, moved), span));
                let rss_kib = rss.kib().unwrap_or(0);
                if write_frame(&mut out, &FromChild::Done { id, outcome, rss_kib, chain_stopped: false }).is_err() {
                    return ExitCode::from(1);
                }
            }
        }
    }
}

/// Tell the supervisor each thread other than `main` the task `id` moves to (a [`FromChild::Thread`]
/// frame); never completes.
async fn report_moves(
    id: &str,
    main: u32,
    moved: &mut watch::Receiver<Option<u32>>,
    out: &mut impl std::io::Write,
) -> std::convert::Infallible {
    loop {
        if moved.changed().await.is_err() {
            return std::future::pending().await;
        }
        let tid = *moved.borrow_and_update();
        if let Some(tid) = tid.filter(|t| *t != main) {
            // A write that fails is the supervisor gone: the task's `Done` fails the same way.
            let _ = write_frame(out, &FromChild::Thread { id: id.to_string(), tid });
        }
    }
}

async fn run_one(
    registry: &Registry,
    req: RunRequest,
    moved: impl std::future::Future<Output = std::convert::Infallible>,
) -> ChildOutcome {
    let Some(task) = registry.get(&req.name) else {
        return ChildOutcome::from_result(Err(TaskError::not_registered(&req.name)));
    };
    let (soft_tx, soft_rx) = watch::channel(false);
    let mut ctx = TaskContext::detached(req.id, req.name);
    ctx.retries = req.retries;
    ctx.max_retries = task.options().max_retries;
    ctx.queue = req.queue;
    ctx.root_id = req.root_id;
    ctx.parent_id = req.parent_id;
    ctx.group = req.group;
    ctx.delivery_count = req.delivery_count;
    ctx.hostname = req.hostname;
    let ctx = ctx.with_soft_limit(soft_rx);
    let fut = AssertUnwindSafe(task.call(ctx, req.args, req.kwargs)).catch_unwind();
    let soft = async {
        match req.soft_time_limit {
            Some(s) => {
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
                tracing::warn!(soft_time_limit = s, "soft time limit exceeded");
                let _ = soft_tx.send(true);
                std::future::pending::<()>().await
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = fut => match r {
            Ok(result) => ChildOutcome::from_result(result),
            Err(panic) => {
                let e = celeriac_core::panics::to_task_error(panic.as_ref());
                ChildOutcome::Panic { message: e.message, location: e.traceback }
            }
        },
        _ = soft => unreachable!("the soft timer never completes"),
        never = moved => match never {},
    }
}
