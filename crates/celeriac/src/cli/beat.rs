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

use chrono::Utc;
use clap::Args;

use super::{CliError, CliResult};
use crate::connect;

/// `celeriac beat` options.
#[derive(Debug, Args)]
pub(crate) struct BeatArgs {
    /// The schedule: a TOML file of `[[entry]]` tables (see the README). Optional when the
    /// binary declares its entries in Rust (`App::periodic`); both are used when both are given.
    #[arg(long, value_name = "FILE")]
    schedule: Option<std::path::PathBuf>,
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
    /// Serve Prometheus metrics at http://ADDR/metrics (runs sent per entry, leadership changes,
    /// whether this beat leads).
    #[arg(long = "metrics-addr", value_name = "ADDR")]
    metrics_addr: Option<String>,
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

/// On SIGHUP, read the schedule file again: a good one replaces the schedule, a bad one is
/// logged (naming file, entry and field) and the old schedule runs on.
fn reload_on_sighup(beat: Arc<celeriac_beat::Beat>, file: Option<std::path::PathBuf>, app: AppEntries) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the schedule is not reloaded");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match load(file.as_deref(), &app) {
                Ok(s) => {
                    tracing::info!(entries = s.entries.len(), "schedule reloaded");
                    beat.replace_schedule(s);
                }
                Err(e) => tracing::error!(error = %e.message, "the new schedule cannot be used; keeping the old one"),
            }
        }
    });
}

/// The app's own entries (`App::periodic`), kept for reloads.
#[derive(Clone, Default)]
pub(crate) struct AppEntries {
    entries: Vec<celeriac_beat::Entry>,
    timezone: Option<chrono_tz::Tz>,
}

impl AppEntries {
    pub(crate) fn of(app: &crate::App) -> Self {
        let (entries, timezone) = app.periodic_entries();
        AppEntries { entries: entries.to_vec(), timezone }
    }
}

/// Read and check the schedule: the file's entries (if a file is given) and the app's.
fn load(path: Option<&std::path::Path>, app: &AppEntries) -> Result<celeriac_beat::Schedule, CliError> {
    let mut schedule = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::usage(format!("{}: cannot read the schedule: {e}", path.display())))?;
            celeriac_beat::parse(&text, &path.display().to_string()).map_err(|e| CliError::usage(e.to_string()))?
        }
        None if app.entries.is_empty() => {
            return Err(CliError::usage("no schedule: give --schedule FILE (or declare entries with App::periodic)"))
        }
        None => celeriac_beat::Schedule { timezone: app.timezone.unwrap_or(chrono_tz::Tz::UTC), entries: Vec::new() },
    };
    schedule.extend(&app.entries).map_err(|e| CliError::usage(e.to_string()))?;
    Ok(schedule)
}

/// `--list`: a table of the entries (name, task, when, next run in the schedule's timezone and
/// in UTC, last run sent), columns aligned. An SQLite broker file that does not exist yet is not
/// created: no run has been sent.
async fn list(broker_url: &str, name: &str, schedule: &celeriac_beat::Schedule) -> CliResult {
    let sqlite_missing = connect::sqlite_path(broker_url).filter(|p| !p.exists());
    let last = match &sqlite_missing {
        Some(_) => Default::default(),
        None => connect::broker(broker_url)?.last_runs(name).await?,
    };
    let now = Utc::now();
    let utc = |t: chrono::DateTime<Utc>| format!("{} UTC", t.format("%Y-%m-%d %H:%M:%S%.3f"));
    let mut rows = vec![["NAME", "TASK", "WHEN", "NEXT", "NEXT (UTC)", "LAST RUN"].map(String::from)];
    for e in &schedule.entries {
        let record = last.get(&e.name).and_then(|v| celeriac_beat::Record::decode(*v));
        let next = e.next_after(schedule.timezone, record.map_or(now, |r| r.time()).max(now));
        let when = match &e.when {
            celeriac_beat::When::Every(d) => format!("every {d:?}"),
            celeriac_beat::When::Cron { text, .. } => format!("cron {text:?}"),
        };
        let last_run = match record {
            Some(celeriac_beat::Record::Sent(t)) => utc(t),
            Some(celeriac_beat::Record::Started(t)) => format!("never (followed since {})", utc(t)),
            None => "never".to_string(),
        };
        rows.push([
            e.name.clone(),
            e.task.clone(),
            when,
            next.with_timezone(&schedule.timezone).format("%Y-%m-%d %H:%M:%S%.3f %Z").to_string(),
            utc(next),
            last_run,
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
    if let Some(path) = sqlite_missing {
        println!("(no runs recorded: {} does not exist yet)", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A beat running inside a worker (`worker -B`).
pub(crate) struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Its metrics, served with the worker's (`--metrics-addr`).
    pub(crate) metrics: Arc<celeriac_beat::metrics::BeatMetrics>,
}

impl Running {
    /// Stop it (it gives its lease up) and wait.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Start a beat on `broker` with the schedule in `file` (checked first: a bad file is a usage
/// error before anything runs).
pub(crate) fn start(
    broker: Arc<dyn celeriac_core::Broker>,
    file: Option<&std::path::Path>,
    app: AppEntries,
    default_queue: &str,
    name: &str,
) -> Result<Running, CliError> {
    let schedule = load(file, &app)?;
    let config = celeriac_beat::BeatConfig {
        name: name.to_string(),
        default_queue: default_queue.to_string(),
        ..Default::default()
    };
    tracing::info!(entries = schedule.entries.len(), holder = %config.holder, "beat starting in this worker");
    let beat = Arc::new(celeriac_beat::Beat::new(schedule, broker, Arc::new(celeriac_beat::SystemClock), config));
    reload_on_sighup(beat.clone(), file.map(|f| f.to_path_buf()), app);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(celeriac_beat::metrics::BeatMetrics::default());
    let events = observe(metrics.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = beat.run(rx, Some(events)).await {
            tracing::error!(error = %e, "beat stopped: the broker cannot hold its lease (use a Redis or SQLite broker)");
        }
    });
    Ok(Running { stop, task, metrics })
}

/// A beat's event channel, counted into `metrics`.
fn observe(
    metrics: Arc<celeriac_beat::metrics::BeatMetrics>,
) -> tokio::sync::mpsc::UnboundedSender<celeriac_beat::Event> {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            metrics.observe(&e);
        }
    });
    events
}

pub(crate) async fn run(broker_url: &str, args: BeatArgs, app: AppEntries) -> CliResult {
    let schedule = load(args.schedule.as_deref(), &app)?;
    if args.list {
        return list(broker_url, &args.name, &schedule).await;
    }
    let broker = connect::broker(broker_url)?;
    let config = celeriac_beat::BeatConfig {
        name: args.name,
        lease: match args.lease {
            l if l.is_finite() && l > 0.0 => std::time::Duration::from_secs_f64(l),
            l => return Err(CliError::usage(format!("--lease must be a positive number of seconds, got {l}"))),
        },
        default_queue: args.default_queue,
        ..Default::default()
    };
    tracing::info!(entries = schedule.entries.len(), holder = %config.holder, broker = %broker.url(), "beat starting");
    let beat = Arc::new(celeriac_beat::Beat::new(schedule, broker, Arc::new(celeriac_beat::SystemClock), config));
    reload_on_sighup(beat.clone(), args.schedule.clone(), app);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(celeriac_beat::metrics::BeatMetrics::default());
    let _server = match args.metrics_addr.as_deref().map(super::parse_socket_addr).transpose()? {
        Some(addr) => {
            let m = metrics.clone();
            Some(
                celeriac_worker::metrics::serve_text(addr, move || m.encode())
                    .await
                    .map_err(|e| CliError::usage(format!("--metrics-addr: {e}")))?,
            )
        }
        None => None,
    };
    let events = observe(metrics);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = stop_tx.send(true);
    });
    beat.run(stop, Some(events))
        .await
        .map_err(|e| CliError::usage(format!("{e} (beat needs a Redis or SQLite broker)")))?;
    tracing::info!("beat stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_beat::Entry;

    #[test]
    fn app_entries_join_the_file_and_a_name_in_both_is_refused() {
        let app = crate::App::new()
            .periodic(Entry::every("rust-side", "celeriac.noop", std::time::Duration::from_secs(5)).arg(1))
            .periodic(Entry::cron("nightly", "celeriac.noop", "0 3 * * *").unwrap().queue("q"))
            .timezone(chrono_tz::Europe::Berlin);
        let entries = AppEntries::of(&app);
        let alone = load(None, &entries).unwrap();
        assert_eq!((alone.entries.len(), alone.timezone), (2, chrono_tz::Europe::Berlin));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("beat.toml");
        std::fs::write(&file, "[[entry]]\nname = \"from-file\"\ntask = \"t\"\nevery = \"1s\"\n").unwrap();
        assert_eq!(load(Some(&file), &entries).unwrap().entries.len(), 3);
        std::fs::write(&file, "[[entry]]\nname = \"nightly\"\ntask = \"t\"\nevery = \"1s\"\n").unwrap();
        let err = load(Some(&file), &entries).unwrap_err().message;
        assert!(err.starts_with("App::periodic: entry \"nightly\": name: "), "{err}");
        assert!(load(None, &AppEntries::default()).unwrap_err().message.contains("--schedule"));
        assert!(Entry::cron("bad", "t", "61 * * * *")
            .unwrap_err()
            .to_string()
            .starts_with("App::periodic: entry \"bad\": cron: "));
    }
}
