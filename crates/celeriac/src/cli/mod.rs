//! The `celeriac` command line, shared by the stock binary and by user binaries
//! ([`App::run_cli`](crate::App::run_cli)).
//!
//! Configuration comes from flags, then the environment (`CELERIAC_BROKER_URL`,
//! `CELERIAC_RESULT_BACKEND`), then, for `worker --python-app`, the Celery app's `app.conf`
//! (`python::AppConf`), then defaults (`sqlite://celeriac.db`). Exit codes: 0 success,
//! 1 the work failed (a task's FAILURE with `--wait`), 2 bad usage or configuration, 3 broker
//! unreachable.

mod beat;
#[cfg(feature = "dashboard")]
mod dashboard;
mod demo;
mod events;
pub mod logging;
mod python;
mod remote;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{BackendError, BrokerError, ResultMeta, TaskState};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::client::{into_value, Client, ResultError, SendOptions};
use crate::connect::{self, ConnectError, DEFAULT_BROKER_URL};
use crate::App;

/// An error ending a command, with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// One line saying what went wrong.
    pub message: String,
}

impl CliError {
    /// Bad usage or configuration (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError { code: 2, message: message.into() }
    }

    /// The work failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        CliError { code: 1, message: message.into() }
    }
}

impl From<ConnectError> for CliError {
    fn from(e: ConnectError) -> Self {
        let code = if e.is_configuration() { 2 } else { 3 };
        CliError { code, message: e.to_string() }
    }
}

impl From<BrokerError> for CliError {
    fn from(e: BrokerError) -> Self {
        let code = match e {
            BrokerError::BadUrl { .. } => 2,
            BrokerError::Unreachable { .. } | BrokerError::Timeout { .. } => 3,
            _ => 1,
        };
        CliError { code, message: e.to_string() }
    }
}

impl From<BackendError> for CliError {
    fn from(e: BackendError) -> Self {
        let code = match e {
            BackendError::BadUrl { .. } | BackendError::Disabled | BackendError::Unsupported { .. } => 2,
            BackendError::Unreachable { .. } => 3,
            _ => 1,
        };
        CliError { code, message: e.to_string() }
    }
}

type CliResult = Result<ExitCode, CliError>;

#[derive(Debug, Parser)]
#[command(name = "celeriac", version, about = "A task queue that speaks Celery's protocol", propagate_version = true)]
struct Cli {
    /// Broker URL (sqlite://path.db, amqp://..., redis://host:6379/db) [default:
    /// sqlite://celeriac.db; with worker --python-app, the app's broker_url].
    #[arg(short = 'b', long, global = true, env = "CELERIAC_BROKER_URL")]
    broker: Option<String>,
    /// Result backend URL (default: with worker --python-app the app's result_backend, else the
    /// broker's SQLite file; none for other brokers).
    #[arg(long = "result-backend", global = true, env = "CELERIAC_RESULT_BACKEND")]
    result_backend: Option<String>,
    /// Log level: error, warn, info, debug, trace (or a filter: `info,celeriac_worker=debug`).
    #[arg(short = 'l', long = "loglevel", visible_alias = "log-level", global = true, default_value = "info")]
    loglevel: String,
    /// Log lines as human text or one JSON object per line.
    #[arg(long = "log-format", global = true, env = "CELERIAC_LOG_FORMAT", value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a worker.
    Worker(WorkerArgs),
    /// Send a task by name.
    Send(SendArgs),
    /// Show (or wait for) a task's result.
    Result(ResultArgs),
    /// Show queue depths.
    Queues(QueuesArgs),
    /// Remove every ready message from queues.
    Purge(PurgeArgs),
    /// List dead-lettered messages and why they were set aside.
    DeadLetters(DeadLettersArgs),
    /// Print the events workers send (Celery's `celeryev`), one line each, as they come.
    Events(events::EventsArgs),
    /// Run a worker and a batch of tasks on a fresh SQLite file, and report.
    Demo(demo::DemoArgs),
    /// Ask running workers what they are doing (ping, active, stats, ...), celeriac's and Celery's.
    Inspect(remote::InspectArgs),
    /// Tell running workers what to do (revoke, shutdown, pool-grow, rate-limit, ...).
    Control(remote::ControlArgs),
    /// Send periodic tasks from a schedule file (any number of beats; one leader sends).
    Beat(beat::BeatArgs),
    /// Serve the web dashboard: workers, queues and recent tasks, live; actions with a token.
    #[cfg(feature = "dashboard")]
    Dashboard(dashboard::DashboardArgs),
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Queues to consume, comma-separated [default: celery; with --python-app, the queues
    /// Celery's worker consumes for the app: its task_queues, else its task_default_queue].
    #[arg(short = 'Q', long = "queues", value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Tasks run at once (default: with --python-app the app's worker_concurrency, else the
    /// number of CPUs).
    #[arg(short = 'c', long)]
    concurrency: Option<usize>,
    /// Pool: `async` (tasks in this process; the default) or `prefork` (each task in a child
    /// process: hard kills, memory recycling, crash isolation; the default with --python-app).
    #[arg(short = 'P', long = "pool")]
    pool: Option<String>,
    /// Run an existing Celery app's Python tasks (MODULE:ATTR, e.g. proj.celery:app, or MODULE
    /// found as `celery -A` finds it: proj finds proj/celery.py's app) in prefork children under this worker: each child imports the app once and
    /// runs the tasks handed to it; this worker consumes, stores results and supervises. The
    /// app's configuration fills in what no flag or environment variable gives (broker,
    /// backend, queues, limits); the settings celeriac does not act on are named at start-up.
    #[arg(long = "python-app", value_name = "MODULE:ATTR")]
    python_app: Option<String>,
    /// The Python interpreter of --python-app (default: $VIRTUAL_ENV's, else python3 on PATH);
    /// it needs celery installed.
    #[arg(long = "python", value_name = "PATH")]
    python: Option<std::path::PathBuf>,
    /// prefork: replace a child after this many tasks.
    #[arg(long = "max-tasks-per-child")]
    max_tasks_per_child: Option<u64>,
    /// prefork: replace a child whose memory passes this after a task (200MB, 512MiB; a bare
    /// number is KiB, as in Celery).
    #[arg(long = "max-memory-per-child")]
    max_memory_per_child: Option<String>,
    /// Node name, as Celery's: `name@%h` (%h host name, %n its first label, %d its domain,
    /// %i/%I pool process index; a name without `@` gets `@<host>`).
    #[arg(short = 'n', long, default_value = celeriac_worker::nodename::DEFAULT_NODENAME)]
    hostname: String,
    /// Messages reserved per slot (the prefetch window for long tasks, and its floor)
    /// [default: 4, or the --python-app app's worker_prefetch_multiplier].
    #[arg(long = "prefetch-multiplier")]
    prefetch_multiplier: Option<usize>,
    /// How wide the prefetch window may grow while tasks are short (it holds about 100 ms of
    /// work at the current rate); 0 keeps it at concurrency x multiplier, as Celery does
    /// [default: 1024, or 256 with --python-app].
    #[arg(long = "max-prefetch")]
    max_prefetch: Option<usize>,
    /// Seconds a warm shutdown waits for running tasks before requeueing them.
    #[arg(long = "shutdown-timeout", default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Default hard time limit, seconds.
    #[arg(long = "time-limit")]
    time_limit: Option<f64>,
    /// Default soft time limit, seconds.
    #[arg(long = "soft-time-limit")]
    soft_time_limit: Option<f64>,
    /// Deliveries of one message before it is failed with WorkerLostError and dead-lettered.
    #[arg(long = "max-deliveries", default_value_t = 3)]
    max_deliveries: u32,
    /// Send task events (task-received, -started, -succeeded, ...) for monitors such as Flower.
    #[arg(short = 'E', long = "events", visible_alias = "task-events")]
    events: bool,
    /// Send no worker events (worker-online, -heartbeat, -offline); as in Celery, they are sent
    /// otherwise, on brokers with exchanges (RabbitMQ, Redis).
    #[arg(long = "without-heartbeat")]
    without_heartbeat: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port, e.g. 127.0.0.1:9808).
    #[arg(long = "metrics-addr", value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Also run a beat in this worker (Celery's `-B`), sending the periodic tasks of
    /// `--schedule`; any number of workers may run one, one leader sends.
    #[arg(short = 'B', long = "beat")]
    beat: bool,
    /// The schedule file of `-B` (see `celeriac beat`).
    #[arg(long, value_name = "FILE")]
    schedule: Option<std::path::PathBuf>,
    /// The name of `-B`'s schedule (`celeriac beat --name`): beats with the same name share one
    /// leader and one record of runs; give each different schedule its own.
    #[arg(long = "beat-name", value_name = "NAME", default_value = "default")]
    beat_name: String,
    /// Where continuations go (callbacks, chain steps, chord bodies, errbacks) whose signature
    /// names no queue and whose task has none registered here: Celery's `task_default_queue`
    /// [default: celery, or the --python-app app's task_default_queue].
    #[arg(long = "default-queue", value_name = "QUEUE")]
    default_queue: Option<String>,
    /// Also serve the web dashboard at http://ADDR/ (host:port, e.g. 127.0.0.1:5555; see
    /// `celeriac dashboard`).
    #[cfg(feature = "dashboard")]
    #[arg(long = "dashboard", value_name = "ADDR")]
    dashboard: Option<String>,
    /// The token the dashboard's actions need (without one it is read-only).
    #[cfg(feature = "dashboard")]
    #[arg(long = "dashboard-token", env = "CELERIAC_DASHBOARD_TOKEN", hide_env_values = true)]
    dashboard_token: Option<String>,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Task name, e.g. celeriac.add.
    name: String,
    /// Positional arguments, a JSON list.
    #[arg(long, default_value = "[]")]
    args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    kwargs: String,
    /// Queue to send to.
    #[arg(short = 'Q', long)]
    queue: Option<String>,
    /// Run no sooner than this many seconds from now.
    #[arg(long)]
    countdown: Option<f64>,
    /// Run no sooner than this time: ISO 8601 in any form Celery reads (2015-12-05,
    /// 2015-12-05T10:20:30, 2015-12-05 10:20:30.5+02:00, 20151205T1020Z, 2015-W49-6, ...).
    /// A time without an offset is UTC, as in Celery.
    #[arg(long, value_name = "TIME")]
    eta: Option<String>,
    /// Discard if not started within this many seconds, or by this ISO 8601 time (any form
    /// --eta takes; a time without an offset is UTC).
    #[arg(long, value_name = "SECONDS|TIME")]
    expires: Option<String>,
    /// Compress the body as kombu does: zlib, bzip2, lzma or zstd (or any kombu name for them:
    /// gzip, bzip, xz, zstandard, application/x-gzip, application/x-bz2, application/x-lzma,
    /// application/zstd). Celery and celeriac workers decompress it (zstd: Celery on Python 3.14,
    /// or with backports.zstd installed).
    #[arg(long, value_name = "CODEC", value_parser = parse_codec)]
    compression: Option<celeriac_core::Codec>,
    /// Priority 0-255 (higher first; on a redis:// broker, as in Celery, 0-9 with 0 first).
    #[arg(long)]
    priority: Option<u8>,
    /// Whether the worker stores no result (`true`) or stores it (`false`), over the task's own
    /// `ignore_result` (Celery's `apply_async(ignore_result=...)`); unset, the task decides.
    #[arg(long = "ignore-result", value_name = "true|false")]
    ignore_result: Option<bool>,
    /// Use this task id.
    #[arg(long = "task-id")]
    task_id: Option<String>,
    /// A callback: the task NAME is sent with this task's result as its first argument once it
    /// succeeds (Celery's `link`), to the same queue. Repeatable.
    #[arg(long = "link", value_name = "NAME")]
    link: Vec<String>,
    /// An errback: the task NAME is sent with this task's id if it fails (Celery's
    /// `link_error`), to the same queue. Repeatable.
    #[arg(long = "link-error", value_name = "NAME")]
    link_error: Vec<String>,
    /// Also send a task-sent event (Celery's `task_send_sent_event`).
    #[arg(long = "sent-event")]
    sent_event: bool,
    /// Give up publishing after this many seconds in all (connection, confirm, retries and the
    /// waits between them; Celery's retry_policy `timeout`). A refused connection is retried 3
    /// times, 0, 0.2 and 0.4 s apart, within it.
    #[arg(long = "publish-timeout", value_name = "SECONDS", default_value_t = 5.0)]
    publish_timeout: f64,
    #[command(flatten)]
    out: WaitArgs,
}

/// How a command waits for and prints a result.
#[derive(Debug, Args)]
struct WaitArgs {
    /// Wait until the task is done and print its result.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ResultArgs {
    /// Task id.
    id: String,
    #[command(flatten)]
    out: WaitArgs,
}

#[derive(Debug, Args)]
struct QueuesArgs {
    /// Queues to show (default: every queue the broker can list; on RabbitMQ, which cannot list
    /// over AMQP, the default queue `celery`).
    names: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PurgeArgs {
    /// Queues to purge, comma-separated. Only ready messages are removed: not those a worker
    /// holds, nor countdown/ETA tasks waiting for their time (as RabbitMQ's queue.purge).
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    queues: Vec<String>,
    /// Do not ask for confirmation.
    #[arg(short = 'f', long)]
    force: bool,
}

#[derive(Debug, Args)]
struct DeadLettersArgs {
    /// How many to show, newest first.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Parse `args` and run the command; never panics on bad input.
pub fn main(app: App, args: impl IntoIterator<Item = OsString>) -> ExitCode {
    // A prefork child: this binary re-executed by a worker's supervisor.
    if let Some(parent) = celeriac_worker::prefork::child::child_parent_pid() {
        let level = std::env::var("CELERIAC_LOG").unwrap_or_else(|_| "warn".into());
        let format = std::env::var("CELERIAC_LOG_FORMAT").map(|f| logging::LogFormat::from_env_value(&f));
        logging::init(&level, format.unwrap_or_default());
        return celeriac_worker::prefork::child::run(app.shared_registry(), parent);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Err(e) = logging::check_level(&cli.loglevel) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Commands other than `worker`, `beat` and `dashboard` only log warnings unless asked: their output is
    // the point.
    let worker = match &cli.command {
        Command::Worker(_) => true,
        Command::Beat(b) => b.runs(),
        #[cfg(feature = "dashboard")]
        Command::Dashboard(_) => true,
        _ => false,
    };
    logging::init(if worker || cli.loglevel != "info" { &cli.loglevel } else { "warn" }, cli.log_format);
    if !worker {
        // A command whose output is piped into `head` stops quietly when the reader goes, as
        // Unix tools do, instead of panicking on the failed write (Rust ignores SIGPIPE). Not
        // for the worker and beat, which write to sockets and must see EPIPE as an error.
        // SAFETY: restoring the default disposition of one signal, before any thread starts.
        let _ = unsafe {
            nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
        };
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(&cli.command, Command::Worker(w) if w.pool.as_deref() == Some("prefork") || w.python_app.is_some()) {
        // A prefork supervisor only routes messages between the broker and its children: one
        // runtime thread does that with fewer wake-ups (about 15% less CPU per task in the
        // benchmark), leaving the cores to the children and the broker.
        builder.worker_threads(1);
    }
    #[cfg(feature = "dashboard")]
    if matches!(&cli.command, Command::Dashboard(_)) {
        // `celeriac dashboard` needs an eighth of one core beside a worker at 10,000 tasks a
        // second: one runtime thread is enough, and its resident memory was the lower in the
        // runs measured (docs/benchmarks.md, "The dashboard watching a busy worker").
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(app, cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

async fn run(app: App, cli: Cli) -> CliResult {
    let backend_url = cli.result_backend.as_deref();
    let broker = cli.broker.as_deref().unwrap_or(DEFAULT_BROKER_URL);
    match cli.command {
        Command::Worker(args) => {
            worker(app, cli.broker.as_deref(), backend_url, (&cli.loglevel, cli.log_format), args).await
        }
        Command::Send(args) => send(broker, backend_url, args).await,
        Command::Result(args) => result(broker, backend_url, args).await,
        Command::Queues(args) => queues(broker, args).await,
        Command::Purge(args) => purge(broker, args).await,
        Command::DeadLetters(args) => dead_letters(broker, args).await,
        Command::Events(args) => events::run(broker, args).await,
        Command::Demo(args) => demo::run(app, args).await,
        Command::Inspect(args) => remote::inspect(cli.broker.as_deref(), backend_url, args).await,
        Command::Control(args) => remote::control(cli.broker.as_deref(), backend_url, args).await,
        Command::Beat(args) => beat::run(broker, args, beat::AppEntries::of(&app)).await,
        #[cfg(feature = "dashboard")]
        Command::Dashboard(args) => dashboard::run(broker, backend_url, args).await,
    }
}

fn positive_secs(flag: &str, v: f64) -> Result<Duration, CliError> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(CliError::usage(format!("{flag} must be a non-negative number of seconds, got {v}")))
    }
}

async fn worker(
    app: App,
    broker_url: Option<&str>,
    backend_url: Option<&str>,
    (loglevel, log_format): (&str, logging::LogFormat),
    args: WorkerArgs,
) -> CliResult {
    let hostname = celeriac_worker::nodename::expand(&args.hostname)
        .map_err(|e| CliError::usage(format!("-n/--hostname: {e}")))?;
    logging::set_hostname(&hostname);
    let pool = args.pool.as_deref().unwrap_or(if args.python_app.is_some() { "prefork" } else { "async" });
    if args.python.is_some() && args.python_app.is_none() {
        return Err(CliError::usage("--python names the interpreter of --python-app, which is not given"));
    }
    if pool == "async" && args.python_app.is_some() {
        return Err(CliError::usage(
            "--python-app runs Python tasks in prefork children: use -P prefork (the default with --python-app)",
        ));
    }
    // A Python app's configuration, read once before anything else starts.
    let python_app = match &args.python_app {
        Some(spec) => {
            python::check_app_spec(spec)?;
            let interpreter = python::interpreter(args.python.as_deref());
            let dir = python::install()?;
            let conf = python::describe(&interpreter, spec, &dir).await?;
            tracing::info!(app = %spec, python = %interpreter.display(), celery = %conf.celery, "Python children run the app's tasks");
            Some((spec, interpreter, dir, conf))
        }
        None => None,
    };
    let conf = python_app.as_ref().map(|(.., conf)| conf);
    let from_app = python::FromApp(conf);
    let prefork = match pool {
        "async" => {
            if args.max_tasks_per_child.is_some() || args.max_memory_per_child.is_some() {
                return Err(CliError::usage("--max-tasks-per-child and --max-memory-per-child need --pool prefork"));
            }
            None
        }
        "prefork" => {
            let mut pc = celeriac_worker::prefork::PreforkConfig::new(0)
                .map_err(|e| CliError::failed(format!("cannot find this executable for the pool: {e}")))?;
            if args.max_tasks_per_child == Some(0) {
                return Err(CliError::usage("--max-tasks-per-child must be at least 1"));
            }
            pc.max_tasks_per_child = match args.max_tasks_per_child {
                Some(n) => Some(n),
                None => from_app.count("worker_max_tasks_per_child")?,
            };
            pc.max_memory_per_child_kib = match args.max_memory_per_child.as_deref() {
                Some(text) => Some(
                    celeriac_worker::prefork::parse_size_kib(text)
                        .map_err(|e| CliError::usage(format!("--max-memory-per-child: {e}")))?,
                ),
                // Celery's worker_max_memory_per_child is in KiB.
                None => from_app.count("worker_max_memory_per_child")?,
            };
            pc.log_level = loglevel.to_string();
            pc.log_format = log_format.as_str().to_string();
            if let Some((spec, interpreter, dir, _)) = &python_app {
                (pc.program, pc.args, pc.env) = python::child_command(interpreter.clone(), spec, dir);
            }
            Some(pc)
        }
        other => return Err(CliError::usage(format!("--pool {other:?} is not a pool (available: async, prefork)"))),
    };
    let queues: Vec<String> = match &args.queues {
        Some(given) => given.iter().map(|q| q.trim().to_string()).filter(|q| !q.is_empty()).collect(),
        None => match conf {
            Some(c) => {
                tracing::info!(queues = %c.queues.join(","), from = %c.queues_from, "queues taken from the app's configuration (no -Q)");
                c.queues.clone()
            }
            None => vec![celeriac_core::DEFAULT_QUEUE.to_string()],
        },
    };
    if queues.is_empty() {
        return Err(CliError::usage("-Q/--queues names no queue"));
    }
    let concurrency = match args.concurrency {
        Some(n) => n,
        None => from_app
            .count("worker_concurrency")?
            .map(|n| n as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
    };
    if concurrency == 0 {
        return Err(CliError::usage("--concurrency must be at least 1"));
    }
    for (flag, v) in [("--time-limit", args.time_limit), ("--soft-time-limit", args.soft_time_limit)] {
        if let Some(v) = v {
            if !(v.is_finite() && v > 0.0) {
                return Err(CliError::usage(format!("{flag} must be a positive number of seconds, got {v}")));
            }
        }
    }
    let default_queue = match &args.default_queue {
        Some(q) => q.clone(),
        None => from_app.text("task_default_queue").unwrap_or(celeriac_core::DEFAULT_QUEUE).to_string(),
    };
    let config = crate::WorkerConfig {
        queues,
        concurrency,
        prefetch_multiplier: match args.prefetch_multiplier {
            Some(n) => n,
            None => from_app.count("worker_prefetch_multiplier")?.map_or(4, |n| n as usize),
        }
        .max(1),
        max_prefetch: args.max_prefetch.unwrap_or(if python_app.is_some() {
            celeriac_worker::DEFAULT_MAX_PREFETCH_PYTHON
        } else {
            celeriac_worker::DEFAULT_MAX_PREFETCH
        }),
        shutdown_timeout: positive_secs("--shutdown-timeout", args.shutdown_timeout)?,
        hostname,
        time_limit: args.time_limit.map_or_else(|| from_app.seconds("task_time_limit"), |v| Ok(Some(v)))?,
        soft_time_limit: args
            .soft_time_limit
            .map_or_else(|| from_app.seconds("task_soft_time_limit"), |v| Ok(Some(v)))?,
        max_deliveries: args.max_deliveries.max(1),
        prefork,
        events: celeriac_worker::events::EventsConfig {
            task_events: args.events || from_app.flag("worker_send_task_events"),
            worker_events: !args.without_heartbeat,
        },
        metrics_addr: args.metrics_addr.as_deref().map(parse_socket_addr).transpose()?,
        default_queue: default_queue.clone(),
    };
    let (broker, backend) = from_app.connect(broker_url, backend_url, &config.queues)?;
    let beat = match args.beat {
        true => Some(beat::start(
            broker.clone(),
            args.schedule.as_deref(),
            beat::AppEntries::of(&app),
            &default_queue,
            &args.beat_name,
        )?),
        false => {
            if args.schedule.is_some() {
                tracing::warn!(
                    "--schedule is given without -B: no beat runs in this worker (add -B, or run celeriac beat)"
                );
            }
            None
        }
    };
    let shutdown = crate::Shutdown::new();
    shutdown.install_signal_handlers().map_err(|e| CliError::failed(format!("cannot install signal handlers: {e}")))?;
    #[cfg(feature = "dashboard")]
    let _dashboard = match &args.dashboard {
        Some(addr) => Some(
            dashboard::start(
                addr,
                args.dashboard_token.clone(),
                config.queues.clone(),
                broker.clone(),
                backend.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let memory_limit_from_app = args.max_memory_per_child.is_none();
    let worker = crate::Worker::new(config, app.shared_registry(), broker, backend);
    if let Some(beat) = &beat {
        let m = beat.metrics.clone();
        worker.metrics().also_encode(move |out| m.encode_into(out));
    }
    worker.run(shutdown).await.map_err(|e| match e {
        celeriac_worker::WorkerError::Config(m) => CliError::usage(m),
        celeriac_worker::WorkerError::Pool(
            p @ celeriac_worker::prefork::PoolError::MemoryLimitBelowFreshChild { .. },
        ) => {
            // Name the limit where the user set it: the flag, or the app's configuration.
            let text = p.to_string();
            CliError::usage(match memory_limit_from_app {
                true => text.replacen("--max-memory-per-child", "the app's worker_max_memory_per_child", 1),
                false => text,
            })
        }
        celeriac_worker::WorkerError::Pool(p @ celeriac_worker::prefork::PoolError::ChildFailed { .. }) => {
            CliError::usage(p.to_string())
        }
        celeriac_worker::WorkerError::Pool(p) => CliError::failed(p.to_string()),
        celeriac_worker::WorkerError::Broker(b) => CliError::from(b),
        celeriac_worker::WorkerError::Metrics(m) => CliError::usage(format!("--metrics-addr: {m}")),
    })?;
    if let Some(beat) = beat {
        beat.stop().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `host:port` of `--metrics-addr` (a name is resolved; the first address is used).
fn parse_socket_addr(text: &str) -> Result<std::net::SocketAddr, CliError> {
    parse_listen("--metrics-addr", text, "127.0.0.1:9808")
}

/// `host:port` given to `flag` (a name is resolved; the first address is used).
fn parse_listen(flag: &str, text: &str, example: &str) -> Result<std::net::SocketAddr, CliError> {
    use std::net::ToSocketAddrs;
    let bad = |why: String| CliError::usage(format!("{flag} {text:?}: {why} (expected host:port, e.g. {example})"));
    let mut addrs = text.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
    addrs.next().ok_or_else(|| bad("resolves to no address".into()))
}

/// A JSON flag read as Python's `json.loads` reads it (integers of any size, `NaN`, `Infinity`),
/// so `--args '[18446744073709551617]'` sends that integer.
fn parse_json(flag: &str, text: &str) -> Result<Value, CliError> {
    celeriac_core::pyjson::from_str(text).map_err(|e| CliError::usage(format!("{flag}: not valid JSON ({e}): {text}")))
}

/// An ISO 8601 time as Celery reads it (naive = UTC).
fn parse_time(flag: &str, text: &str) -> Result<chrono::DateTime<chrono::Utc>, CliError> {
    celeriac_core::protocol::parse_datetime(text).map_err(|e| CliError::usage(format!("{flag}: {e}")))
}

/// Seconds from now (a plain number), or else an ISO 8601 time.
fn parse_secs_or_time(flag: &str, text: &str) -> Result<chrono::DateTime<chrono::Utc>, CliError> {
    if let Ok(secs) = text.parse::<f64>() {
        let d = positive_secs(flag, secs)?;
        return Ok(chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
    }
    parse_time(flag, text)
}

fn parse_codec(text: &str) -> Result<celeriac_core::Codec, String> {
    text.parse().map_err(|e: celeriac_core::CompressionError| e.to_string())
}

async fn send(broker_url: &str, backend_url: Option<&str>, args: SendArgs) -> CliResult {
    let Value::Array(positional) = parse_json("--args", &args.args)? else {
        return Err(CliError::usage(format!("--args: expected a JSON list, e.g. [2, 3], got {}", args.args)));
    };
    let Value::Object(kwargs) = parse_json("--kwargs", &args.kwargs)? else {
        return Err(CliError::usage(format!(
            "--kwargs: expected a JSON object, e.g. {{\"x\": 1}}, got {}",
            args.kwargs
        )));
    };
    if let Some(c) = args.countdown {
        positive_secs("--countdown", c)?;
    }
    let timeout = positive_secs("--timeout", args.out.timeout)?;
    let linked = |name: &String| {
        let mut sig = crate::Signature::new(name.clone());
        if let Some(q) = &args.queue {
            sig = sig.queue(q.clone());
        }
        sig.to_canvas().0.to_value()
    };
    let (link, link_error) = (args.link.iter().map(linked).collect(), args.link_error.iter().map(linked).collect());
    let options = SendOptions {
        link,
        link_error,
        task_id: args.task_id,
        countdown: args.countdown,
        eta: args.eta.as_deref().map(|t| parse_time("--eta", t)).transpose()?,
        expires: args.expires.as_deref().map(|t| parse_secs_or_time("--expires", t)).transpose()?,
        compression: args.compression,
        queue: args.queue,
        priority: args.priority,
        ignore_result: args.ignore_result,
        ..SendOptions::default()
    };
    let publish_timeout = positive_secs("--publish-timeout", args.publish_timeout)?;
    let policy = celeriac_core::PublishPolicy { timeout: Some(publish_timeout), ..Default::default() };
    let client =
        Client::connect(broker_url, backend_url).await?.with_sent_events(args.sent_event).with_publish_policy(policy);
    let res = client.send_task(&args.name, positional, kwargs, options).await.map_err(|e| match e {
        e @ crate::PublishError::Unreachable { .. } => CliError { code: 3, message: e.to_string() },
        crate::PublishError::Broker { source, .. } => CliError::from(source),
        e @ crate::PublishError::ReplyQueue { .. } => CliError { code: 3, message: e.to_string() },
        other => CliError::usage(other.to_string()),
    })?;
    if !args.out.wait {
        if args.out.json {
            println!("{}", serde_json::json!({"task_id": res.id()}));
        } else {
            println!("{}", res.id());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let meta = client.backend().wait(res.id(), Some(timeout)).await.map_err(|e| match e {
        BackendError::Timeout { .. } => {
            CliError::failed(format!("no result for task {} within {}s", res.id(), args.out.timeout))
        }
        other => CliError::from(other),
    })?;
    print_outcome(meta, args.out.json)
}

fn print_outcome(meta: ResultMeta, json: bool) -> CliResult {
    let status = meta.status;
    if json {
        println!("{}", celeriac_core::pyjson::to_compact_string(&meta.to_value()));
        return Ok(if status == TaskState::Success { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    match into_value(meta) {
        Ok(v) => {
            println!("{}", celeriac_core::pyjson::to_compact_string(&v));
            Ok(ExitCode::SUCCESS)
        }
        Err(ResultError::Failed { exc_type, message, .. }) => {
            Err(CliError::failed(format!("{status}: {exc_type}: {message}")))
        }
        Err(e) => Err(CliError::failed(format!("{status}: {e}"))),
    }
}

async fn result(broker_url: &str, backend_url: Option<&str>, args: ResultArgs) -> CliResult {
    let backend = connect::backend(backend_url, broker_url)?;
    let meta = if args.out.wait {
        let timeout = positive_secs("--timeout", args.out.timeout)?;
        match backend.wait(&args.id, Some(timeout)).await {
            Ok(m) => Some(m),
            Err(BackendError::Timeout { .. }) => {
                return Err(CliError::failed(format!("no result for task {} within {}s", args.id, args.out.timeout)))
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        backend.get(&args.id).await?
    };
    match meta {
        None => {
            if args.out.json {
                println!("{}", serde_json::json!({"status": "PENDING", "task_id": args.id}));
                return Ok(ExitCode::SUCCESS);
            }
            // No task has this id; a group saved under it (GroupResult.save()) is shown instead.
            match backend.restore_group(&args.id).await? {
                Some(celeriac_core::canvas::ResultRef::Group { results, .. }) => {
                    println!("GROUP (saved) of {} results", results.len());
                    for member in &results {
                        let id = member.id().to_string();
                        let state = backend.get(&id).await?.map_or("PENDING".to_string(), |m| m.status.to_string());
                        println!("  {id}: {state}");
                    }
                }
                _ => println!("PENDING"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(m) if !m.status.is_ready() && !args.out.json => {
            println!("{}", m.status);
            Ok(ExitCode::SUCCESS)
        }
        Some(m) => {
            if args.out.json {
                return print_outcome(m, true);
            }
            println!("{}", m.status);
            let workflow = m.clone();
            let outcome = print_outcome(m, false);
            print_workflow(&workflow);
            outcome
        }
    }
}

/// The workflow a result belongs to, in text: its group, its parent, and what it sent
/// (`children`: callbacks, the next chain step, groups with their members).
fn print_workflow(meta: &ResultMeta) {
    use celeriac_core::canvas::ResultRef;
    if let Some(group) = meta.extra.get("group_id").and_then(Value::as_str) {
        println!("group: {group}");
    }
    if let Some(parent) = meta.extra.get("parent_id").and_then(Value::as_str) {
        println!("parent: {parent}");
    }
    fn describe(r: &ResultRef) -> String {
        match r {
            ResultRef::Task { id, .. } => id.clone(),
            ResultRef::Group { id, results, .. } => {
                format!("group {id} [{}]", results.iter().map(describe).collect::<Vec<_>>().join(", "))
            }
        }
    }
    let children: Vec<String> = meta
        .children
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(ResultRef::from_tuple)
        .map(|r| describe(&r))
        .collect();
    if !children.is_empty() {
        println!("children: {}", children.join(", "));
    }
}

async fn queues(broker_url: &str, args: QueuesArgs) -> CliResult {
    let broker = connect::broker(broker_url)?;
    let mut names = args.names;
    if names.is_empty() && broker.url().starts_with("amqp") {
        // AMQP has no "list queues"; RabbitMQ's management API does, but is often not enabled.
        eprintln!(
            "RabbitMQ cannot list queues over AMQP: showing the default queue {q:?}; name others to see them \
             (celeriac queues {q} images ...)",
            q = celeriac_core::DEFAULT_QUEUE
        );
        names.push(celeriac_core::DEFAULT_QUEUE.to_string());
    }
    let infos = broker.queues(&names).await?;
    if args.json {
        println!("{}", serde_json::to_string(&infos).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let width = infos.iter().map(|q| q.name.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}",
        "QUEUE", "READY", "SCHEDULED", "UNACKED", "DEAD", "CONSUMERS"
    );
    for q in &infos {
        let consumers = q.consumers.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}",
            q.name, q.ready, q.scheduled, q.unacked, q.dead, consumers
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn purge(broker_url: &str, args: PurgeArgs) -> CliResult {
    let broker = connect::broker(broker_url)?;
    if !args.force {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::usage("purge deletes messages: pass -f/--force to confirm"));
        }
        eprint!("Delete every ready message in {}? [y/N] ", args.queues.join(", "));
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(CliError::failed("not purged"));
        }
    }
    for q in &args.queues {
        let n = broker.purge(q).await?;
        println!("purged {n} message{} from {q}", if n == 1 { "" } else { "s" });
    }
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(broker_url: &str, args: DeadLettersArgs) -> CliResult {
    let broker = connect::broker(broker_url)?;
    let dead = broker.dead_letters(args.limit).await?;
    if args.json {
        println!("{}", serde_json::to_string(&dead).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    for d in &dead {
        println!("{}  {}  {}  {}", d.id, d.queue, d.task_id.as_deref().unwrap_or("-"), d.reason);
    }
    if dead.is_empty() {
        println!("no dead letters");
    }
    Ok(ExitCode::SUCCESS)
}

/// Shared by the demo: a client bound to one broker and backend.
pub(crate) fn client_for(
    broker: Arc<dyn celeriac_core::Broker>,
    backend: Arc<dyn celeriac_core::ResultBackend>,
) -> Client {
    Client::new(broker, backend)
}
