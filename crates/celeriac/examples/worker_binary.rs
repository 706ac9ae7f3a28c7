//! A worker binary with its own tasks: the same commands as `celeriac`, with these tasks linked in.
//!
//! ```text
//! cargo run -p celeriac --example worker_binary -- worker -Q images,celery
//! cargo run -p celeriac --example worker_binary -- send images.thumbnail --args '["cat.png", 128]' --wait
//! cargo run -p celeriac --example worker_binary -- beat --list   # the periodic tasks declared below
//! ```

use std::time::Duration;

use celeriac::{App, TaskContext, TaskError};

/// An async task with a queue, retries with exponential backoff, and a time limit.
#[celeriac::task(name = "images.thumbnail", queue = "images", max_retries = 5, retry_backoff = 1.0, autoretry_for = ["IoError"], time_limit = 30)]
async fn thumbnail(ctx: &TaskContext, path: String, size: u32) -> Result<String, TaskError> {
    if size == 0 {
        return Err(TaskError::new("ValueError", "size must be positive"));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(format!("{path} -> {size}px (attempt {})", ctx.retries + 1))
}

/// A blocking task: runs on the blocking thread pool.
#[celeriac::task(name = "reports.word_count")]
fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}

/// A task that asks for its own retry.
#[celeriac::task(name = "net.fetch", max_retries = 3)]
async fn fetch(ctx: &TaskContext, url: String) -> Result<String, TaskError> {
    if url.starts_with("retry:") && ctx.retries < 2 {
        return Err(ctx.retry_in(Duration::from_millis(200)));
    }
    Ok(format!("fetched {url}"))
}

fn main() -> std::process::ExitCode {
    use celeriac::periodic::{Entry, Tz};
    App::with_builtins()
        .task(thumbnail)
        .task(word_count)
        .task(fetch)
        // Sent by `worker_binary beat` (or `worker -B`), with any entries of `--schedule`.
        .periodic(Entry::every("ping-every-minute", "celeriac.ping", Duration::from_secs(60)))
        .periodic(
            Entry::cron("nightly-count", "reports.word_count", "30 2 * * *").expect("a cron expression").arg("a b c"),
        )
        .timezone(Tz::Europe__Berlin)
        .run_cli()
}
