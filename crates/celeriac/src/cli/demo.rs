//! `celeriac demo`: the whole path on the embedded default, with nothing to set up.
//!
//! Starts a worker on a fresh SQLite file, sends a mixed batch (additions, one failure, one task
//! that fails twice and is retried, one countdown task), shows progress, prints a table of final
//! states and the throughput, and exits 0 only if every outcome is the expected one.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use celeriac_core::{TaskState, DEFAULT_QUEUE};
use clap::Args;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::{CliError, CliResult};
use crate::client::SendOptions;
use crate::{connect, App, Shutdown, Worker, WorkerConfig};

/// Options of `celeriac demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of `celeriac.add` tasks in the batch.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Worker concurrency.
    #[arg(short = 'c', long, default_value_t = 8)]
    concurrency: usize,
    /// SQLite file to use (default: a fresh file in the temporary directory).
    #[arg(long)]
    db: Option<std::path::PathBuf>,
    /// Keep the SQLite file afterwards.
    #[arg(long)]
    keep: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

struct Expected {
    id: String,
    what: String,
    check: Box<dyn Fn(&celeriac_core::ResultMeta) -> bool + Send>,
}

pub(super) async fn run(app: App, args: DemoArgs) -> CliResult {
    if args.concurrency == 0 {
        return Err(CliError::usage("--concurrency must be at least 1"));
    }
    let path = args.db.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "celeriac-demo-{}-{}.db",
            std::process::id(),
            chrono::Utc::now().timestamp_millis()
        ))
    });
    if path.exists() {
        return Err(CliError::usage(format!("{} already exists; the demo needs a fresh file", path.display())));
    }
    let url = format!("sqlite://{}", path.display());
    let outcome = demo(app, &args, &url).await;
    if !args.keep {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    } else {
        eprintln!("kept {}", path.display());
    }
    outcome
}

async fn demo(mut app: App, args: &DemoArgs, url: &str) -> CliResult {
    crate::builtins::register(app.registry_mut());
    let broker = connect::broker(url)?;
    let backend = connect::backend(None, url)?;
    let client = super::client_for(broker.clone(), backend.clone());
    let config =
        WorkerConfig { queues: vec![DEFAULT_QUEUE.into()], concurrency: args.concurrency, ..WorkerConfig::default() };
    let worker = Worker::new(config, app.shared_registry(), broker, backend.clone());
    let stats = worker.stats();
    let shutdown = Shutdown::new();
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));

    println!("celeriac demo: worker on {url}, concurrency {}", args.concurrency);
    let started = Instant::now();
    let mut expected: Vec<Expected> = Vec::with_capacity(args.tasks + 3);
    let send = |name: &'static str, args: Value, opts: SendOptions| {
        let client = client.clone();
        async move {
            let args: Vec<Value> = serde_json::from_value(args).unwrap_or_default();
            client
                .send_task(name, args, Map::new(), opts)
                .await
                .map_err(|e| CliError { code: 3, message: e.to_string() })
        }
    };
    // The additions go out with up to 64 publishes in flight, so the SQLite writer commits them
    // in groups.
    let ids: Vec<Result<String, CliError>> = futures::stream::iter(0..args.tasks as i64)
        .map(|i| {
            let send = &send;
            async move { send("celeriac.add", json!([i, i]), SendOptions::default()).await.map(|r| r.id().to_string()) }
        })
        .buffered(64)
        .collect()
        .await;
    for (i, id) in ids.into_iter().enumerate() {
        let i = i as i64;
        expected.push(Expected {
            id: id?,
            what: "add".into(),
            check: Box::new(move |m| m.status == TaskState::Success && m.result == json!(2 * i)),
        });
    }
    let r = send("celeriac.fail", json!(["this one fails on purpose"]), SendOptions::default()).await?;
    expected.push(Expected {
        id: r.id().into(),
        what: "fail".into(),
        check: Box::new(|m| {
            m.status == TaskState::Failure && m.exception_info().is_some_and(|e| e.exc_type == "RuntimeError")
        }),
    });
    let r = send("celeriac.flaky", json!([2]), SendOptions::default()).await?;
    expected.push(Expected {
        id: r.id().into(),
        what: "flaky (2 retries)".into(),
        check: Box::new(|m| m.status == TaskState::Success && m.result == json!(2)),
    });
    let countdown_sent = chrono::Utc::now();
    let r =
        send("celeriac.add", json!([40, 2]), SendOptions { countdown: Some(1.0), ..SendOptions::default() }).await?;
    expected.push(Expected {
        id: r.id().into(),
        what: "countdown 1s".into(),
        check: Box::new(move |m| {
            let done = m.date_done.as_deref().and_then(|d| celeriac_core::protocol::parse_datetime(d).ok());
            m.status == TaskState::Success
                && m.result == json!(42)
                && done.is_some_and(|d| d >= countdown_sent + chrono::Duration::seconds(1))
        }),
    });
    let sent_in = started.elapsed();

    // Progress: tasks in a final state, as counted by the in-process worker.
    let total = expected.len() as u64;
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout.max(1.0));
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} tasks {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut last_line = Instant::now();
    let mut batch_done: Option<Duration> = None;
    loop {
        let s = stats.snapshot();
        let done = s.succeeded + s.failed + s.revoked;
        if batch_done.is_none() && done >= args.tasks as u64 {
            batch_done = Some(started.elapsed());
        }
        if let Some(bar) = &bar {
            bar.set_position(done.min(total));
            bar.set_message(format!("({} retries)", s.retried));
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("progress: {done}/{total} tasks done, {} retries", s.retried);
            last_line = Instant::now();
        }
        if done >= total {
            break;
        }
        if Instant::now() >= deadline {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            shutdown.cold();
            return Err(CliError::failed(format!("only {done} of {total} tasks finished within {}s", args.timeout)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    if let Some(bar) = &bar {
        bar.finish();
    }
    shutdown.warm();
    let snapshot = worker_task
        .await
        .map_err(|e| CliError::failed(format!("the worker stopped abnormally: {e}")))?
        .map_err(|e| CliError::failed(e.to_string()))?;

    // Verify every outcome against the result backend.
    let mut by_state: BTreeMap<TaskState, u64> = BTreeMap::new();
    let mut wrong = Vec::new();
    for e in &expected {
        match backend.get(&e.id).await? {
            Some(meta) => {
                *by_state.entry(meta.status).or_default() += 1;
                if !(e.check)(&meta) {
                    wrong.push(format!("{} [{}]: unexpected {} {}", e.what, e.id, meta.status, meta.result));
                }
            }
            None => {
                *by_state.entry(TaskState::Pending).or_default() += 1;
                wrong.push(format!("{} [{}]: no result", e.what, e.id));
            }
        }
    }
    println!();
    println!("{:<10} {:>8}", "STATE", "TASKS");
    for (state, n) in &by_state {
        println!("{:<10} {:>8}", state.as_str(), n);
    }
    println!("{:<10} {:>8}", "retries", snapshot.retried);
    println!();
    let batch = batch_done.unwrap_or(elapsed);
    println!(
        "throughput: the first {} tasks sent and done in {:.2}s: {:.0} tasks/s end to end (publishing alone: {:.0} tasks/s)",
        args.tasks,
        batch.as_secs_f64(),
        args.tasks as f64 / batch.as_secs_f64().max(1e-9),
        total as f64 / sent_in.as_secs_f64().max(1e-9)
    );
    println!(
        "all {} tasks done in {:.2}s (the last ones wait for a 1 s countdown and two retries)",
        total,
        elapsed.as_secs_f64()
    );
    if wrong.is_empty() {
        println!("every outcome is as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        for w in wrong.iter().take(20) {
            eprintln!("{w}");
        }
        Err(CliError::failed(format!("{} outcome(s) differ from what was expected", wrong.len())))
    }
}
