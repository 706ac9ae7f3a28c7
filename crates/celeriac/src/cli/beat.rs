//! `celeriac beat`: send the periodic tasks of a schedule file; any number of beats may run on
//! one broker, one of them (the lease holder) sends (see `celeriac_beat`).
//!
//! ```text
//! celeriac beat --schedule beat.toml            # run (Redis or SQLite broker)
//! celeriac beat --schedule beat.toml --list     # each entry, its next run (local, UTC), its last run
//! ```
//!
//! A schedule file that cannot be used exits 2 with one line naming the file, the entry and the
//! field.

use std::process::ExitCode;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use clap::Args;

use super::{positive_secs, CliError, CliResult};
use crate::connect;

/// `celeriac beat` options.
#[derive(Debug, Args)]
pub(crate) struct BeatArgs {
    /// The schedule: a TOML file of `[[entry]]` tables (see the README).
    #[arg(long, value_name = "FILE")]
    schedule: std::path::PathBuf,
    /// The schedule's name: beats with the same name share one leader and one record of the runs
    /// sent.
    #[arg(long, default_value = "default")]
    name: String,
    /// Seconds of the leader's lease: a dead leader is replaced within it plus a third of it.
    #[arg(long, default_value_t = 3.0)]
    lease: f64,
    /// The queue of entries that name none.
    #[arg(long = "default-queue", default_value = celeriac_core::DEFAULT_QUEUE)]
    default_queue: String,
    /// Print each entry with its next run (in the schedule's timezone and UTC) and its last run
    /// sent, then exit.
    #[arg(long)]
    list: bool,
}

impl BeatArgs {
    /// Whether this runs a beat (which logs as a worker does) rather than listing.
    pub(crate) fn runs(&self) -> bool {
        !self.list
    }
}

/// Read and check the schedule file.
fn load(path: &std::path::Path) -> Result<celeriac_beat::Schedule, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("{}: cannot read the schedule: {e}", path.display())))?;
    celeriac_beat::parse(&text, &path.display().to_string()).map_err(|e| CliError::usage(e.to_string()))
}

pub(crate) async fn run(broker_url: &str, args: BeatArgs) -> CliResult {
    let schedule = load(&args.schedule)?;
    let broker = connect::broker(broker_url)?;
    if args.list {
        let last = broker.last_runs(&args.name).await.unwrap_or_default();
        let now = Utc::now();
        for e in &schedule.entries {
            let last_run = last.get(&e.name).and_then(|ms| Utc.timestamp_millis_opt(*ms).single());
            let next = e.next_after(schedule.timezone, last_run.unwrap_or(now).max(now));
            let when = match &e.when {
                celeriac_beat::When::Every(d) => format!("every {d:?}"),
                celeriac_beat::When::Cron { text, .. } => format!("cron {text:?}"),
            };
            println!(
                "{}  {}  {when}  next {} ({} UTC)  last {}",
                e.name,
                e.task,
                next.with_timezone(&schedule.timezone).format("%Y-%m-%d %H:%M:%S%.3f %Z"),
                next.format("%Y-%m-%d %H:%M:%S%.3f"),
                last_run.map_or("never".to_string(), |t| format!("{} UTC", t.format("%Y-%m-%d %H:%M:%S%.3f"))),
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config = celeriac_beat::BeatConfig {
        name: args.name,
        lease: positive_secs("--lease", args.lease)?,
        default_queue: args.default_queue,
        ..Default::default()
    };
    tracing::info!(schedule = %args.schedule.display(), entries = schedule.entries.len(), holder = %config.holder, broker = %broker.url(), "beat starting");
    let beat = celeriac_beat::Beat::new(schedule, broker, Arc::new(celeriac_beat::SystemClock), config);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = stop_tx.send(true);
    });
    beat.run(stop, None).await.map_err(|e| CliError::usage(format!("{e} (beat needs a Redis or SQLite broker)")))?;
    tracing::info!("beat stopped");
    Ok(ExitCode::SUCCESS)
}
