//! `celeriac inspect ...` and `celeriac control ...`: remote control of running workers, celeriac's
//! and Python Celery's alike, through [`crate::control::broadcast`].
//!
//! Output is a readable table per command (or each node's raw reply with `--json`, an object keyed
//! by node name, as `celery inspect --json` prints). Exit codes: 0 when at least one node replied
//! and none replied with an error, 1 when no node replied in time or one replied with an error,
//! 2 for a broker without broadcast (SQLite), 3 when the broker is unreachable.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use super::{positive_secs, CliError, CliResult};
use crate::connect;
use crate::control::{broadcast, ControlError};

/// Options every remote command takes.
#[derive(Debug, Args)]
pub(crate) struct RemoteOpts {
    /// Only these nodes (comma-separated node names, e.g. celeriac@host).
    #[arg(short = 'd', long, value_delimiter = ',', global = true)]
    destination: Vec<String>,
    /// Seconds to wait for replies.
    #[arg(short = 't', long, default_value_t = 1.0, global = true)]
    timeout: f64,
    /// Print each node's reply as JSON (an object keyed by node name).
    #[arg(short = 'j', long, global = true)]
    json: bool,
    /// Take the broker (and result backend) from this Celery app's configuration when neither
    /// --broker nor CELERIAC_BROKER_URL names one, as `celery -A proj inspect` does (MODULE:ATTR,
    /// or MODULE found as `celery -A` finds it; read as worker --python-app reads it).
    #[arg(long = "python-app", value_name = "MODULE:ATTR", global = true)]
    python_app: Option<String>,
    /// The Python interpreter of --python-app (default: $VIRTUAL_ENV's, else python3 on PATH).
    #[arg(long = "python", value_name = "PATH", global = true)]
    python: Option<std::path::PathBuf>,
}

impl RemoteOpts {
    /// The broker and result backend URLs: `broker` and `backend` (flags or environment), else
    /// with --python-app the app's `broker_url` and `result_backend` (read once with `python -m
    /// celeriac_child --describe`, as the worker reads them; not read when the flags give all
    /// that is needed: the broker, and the backend if `needs_backend`), else celeriac's default
    /// broker.
    async fn urls(
        &self,
        broker: Option<&str>,
        backend: Option<&str>,
        needs_backend: bool,
    ) -> Result<(String, Option<String>), CliError> {
        let Some(spec) = &self.python_app else {
            if self.python.is_some() {
                return Err(CliError::usage("--python names the interpreter of --python-app, which is not given"));
            }
            return Ok((broker.unwrap_or(connect::DEFAULT_BROKER_URL).to_string(), backend.map(str::to_string)));
        };
        if let Some(broker) = broker.filter(|_| backend.is_some() || !needs_backend) {
            return Ok((broker.to_string(), backend.map(str::to_string)));
        }
        super::python::check_app_spec(spec)?;
        let interpreter = super::python::interpreter(self.python.as_deref());
        let dir = super::python::install()?;
        let conf = super::python::describe(&interpreter, spec, &dir).await?;
        let (broker, _) = super::python::FromApp(Some(&conf)).broker_url(broker)?;
        let backend = backend.map(str::to_string).or(conf.result_backend);
        Ok((broker, backend))
    }
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    #[command(subcommand)]
    command: InspectCommand,
    #[command(flatten)]
    opts: RemoteOpts,
}

#[derive(Debug, Subcommand)]
enum InspectCommand {
    /// Which workers are online.
    Ping,
    /// Tasks running now: the pid and thread running each, its runtime, the time left to its
    /// hard limit, and what it is blocked on (state, wait channel, syscall, from /proc).
    Active,
    /// Tasks taken from the broker, waiting for a slot.
    Reserved,
    /// Tasks held until their ETA.
    Scheduled,
    /// Pool, children, totals, broker, resource usage.
    Stats,
    /// Registered task names (without Celery's builtins, `celery.*`, unless --builtins).
    Registered {
        /// Also list the Celery builtins the workers run (Celery's `builtins` argument).
        #[arg(long)]
        builtins: bool,
    },
    /// Queues consumed.
    #[command(name = "active_queues", alias = "active-queues")]
    ActiveQueues,
    /// Revoked task ids remembered.
    Revoked,
    /// The state (active or reserved) and request of each task id a worker holds.
    #[command(name = "query_task", alias = "query-task")]
    QueryTask {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ControlArgs {
    #[command(subcommand)]
    command: ControlCommand,
    #[command(flatten)]
    opts: RemoteOpts,
}

#[derive(Debug, Subcommand)]
enum ControlCommand {
    /// Revoke tasks: they will not run; with --terminate, running ones are killed.
    Revoke {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also terminate the task if it is running (the prefork child gets --signal).
        #[arg(long)]
        terminate: bool,
        /// Signal for --terminate (TERM, KILL, INT, or a number).
        #[arg(short = 's', long, default_value = "TERM")]
        signal: String,
    },
    /// Warm shutdown of the workers.
    Shutdown,
    /// Add N slots (prefork: children) to the pool.
    #[command(name = "pool-grow", alias = "pool_grow")]
    PoolGrow {
        /// How many.
        #[arg(default_value_t = 1)]
        n: u64,
    },
    /// Remove N slots (prefork: children) from the pool, as running tasks finish.
    #[command(name = "pool-shrink", alias = "pool_shrink")]
    PoolShrink {
        /// How many.
        #[arg(default_value_t = 1)]
        n: u64,
    },
    /// Limit how often a task starts (10/s, 100/m, 1000/h; 0 removes the limit).
    #[command(name = "rate-limit", alias = "rate_limit")]
    RateLimit {
        /// Task name.
        task_name: String,
        /// Rate.
        rate_limit: String,
    },
    /// Replace every prefork child with a fresh one (idle ones now, busy ones after their task),
    /// e.g. after upgrading the binary.
    #[command(name = "pool-restart", alias = "pool_restart")]
    PoolRestart,
    /// Set a task's soft and hard time limits in seconds (0 or none: no limit), replacing its own.
    #[command(name = "time-limit", alias = "time_limit")]
    TimeLimit {
        /// Task name.
        task_name: String,
        /// Soft limit, seconds.
        soft: f64,
        /// Hard limit, seconds.
        hard: Option<f64>,
    },
    /// Start consuming a queue.
    #[command(name = "add-consumer", alias = "add_consumer")]
    AddConsumer {
        /// Queue name.
        queue: String,
    },
    /// Stop consuming a queue.
    #[command(name = "cancel-consumer", alias = "cancel_consumer")]
    CancelConsumer {
        /// Queue name.
        queue: String,
    },
    /// Turn task events on (workers started without -E; what Flower asks for).
    #[command(name = "enable-events", alias = "enable_events")]
    EnableEvents,
    /// Turn task events off.
    #[command(name = "disable-events", alias = "disable_events")]
    DisableEvents,
}

/// Send one command; print the replies.
async fn call(broker_url: &str, method: &str, arguments: Value, opts: &RemoteOpts) -> CliResult {
    // SQLite has no broadcast: refused before its database file is opened (which creates it).
    if connect::sqlite_path(broker_url).is_some() {
        return Err(CliError::usage(ControlError::Unsupported(broker_url.to_string()).to_string()));
    }
    let broker = connect::broker(broker_url)?;
    let timeout: Duration = positive_secs("--timeout", opts.timeout)?;
    let arguments = match arguments {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let replies =
        broadcast(broker.as_ref(), method, arguments, &opts.destination, timeout).await.map_err(|e| match e {
            ControlError::Unsupported(_) => CliError::usage(e.to_string()),
            ControlError::Broker(b) => CliError::from(b),
        })?;
    if opts.json {
        let all: Map<String, Value> = replies.iter().cloned().collect();
        println!("{}", Value::Object(all));
    } else {
        for (node, reply) in &replies {
            print_reply(method, node, reply);
        }
    }
    if replies.is_empty() {
        return Err(CliError::failed(format!("no node replied within {:.1}s", timeout.as_secs_f64())));
    }
    if !opts.json {
        println!("{} node{} replied.", replies.len(), if replies.len() == 1 { "" } else { "s" });
    }
    if replies.iter().any(|(_, r)| r.get("error").is_some()) {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `celeriac inspect ...` (`broker`, `backend`: the flags' or the environment's).
pub(crate) async fn inspect(broker: Option<&str>, backend: Option<&str>, args: InspectArgs) -> CliResult {
    let (broker_url, _) = args.opts.urls(broker, backend, false).await?;
    let broker_url = broker_url.as_str();
    let mut arguments = json!({});
    let method = match args.command {
        InspectCommand::QueryTask { ids } => {
            arguments = json!({ "ids": ids });
            "query_task"
        }
        InspectCommand::Ping => "ping",
        InspectCommand::Active => "active",
        InspectCommand::Reserved => "reserved",
        InspectCommand::Scheduled => "scheduled",
        InspectCommand::Stats => "stats",
        InspectCommand::Registered { builtins } => {
            if builtins {
                arguments = json!({ "builtins": true });
            }
            "registered"
        }
        InspectCommand::ActiveQueues => "active_queues",
        InspectCommand::Revoked => "revoked",
    };
    call(broker_url, method, arguments, &args.opts).await
}

/// Record revoked ids in the result backend (when it keeps revokes), before the broadcast, so
/// workers that start later, or miss the broadcast, skip the tasks too. Returns whether they
/// were recorded.
async fn record_revokes(broker_url: &str, backend_url: Option<&str>, ids: &[String]) -> Result<bool, CliError> {
    let backend = connect::backend(backend_url, broker_url)?;
    if !backend.keeps_revokes() {
        return Ok(false);
    }
    backend.record_revokes(ids, celeriac_core::backend::unix_now()).await?;
    eprintln!(
        "revoke recorded in {}: workers starting later skip these tasks, running ones learn it within {}s",
        backend.url(),
        celeriac_worker::revokes::REFRESH.as_secs()
    );
    Ok(true)
}

/// `celeriac control ...`.
pub(crate) async fn control(broker: Option<&str>, backend: Option<&str>, args: ControlArgs) -> CliResult {
    let (broker_url, backend_url) = args.opts.urls(broker, backend, true).await?;
    let (broker_url, backend_url) = (broker_url.as_str(), backend_url.as_deref());
    let (method, arguments) = match args.command {
        ControlCommand::Revoke { ids, terminate, signal } => {
            let recorded = record_revokes(broker_url, backend_url, &ids).await?;
            let arguments = json!({"task_id": ids, "terminate": terminate, "signal": signal});
            return match call(broker_url, "revoke", arguments, &args.opts).await {
                // A broker without broadcast (SQLite): the recorded revoke is what workers see.
                Err(e) if recorded && e.code == 2 => {
                    eprintln!("{} (workers read the recorded revoke instead)", e.message);
                    Ok(ExitCode::SUCCESS)
                }
                other => other,
            };
        }
        ControlCommand::Shutdown => ("shutdown", json!({})),
        ControlCommand::PoolGrow { n } => ("pool_grow", json!({"n": n})),
        ControlCommand::PoolShrink { n } => ("pool_shrink", json!({"n": n})),
        ControlCommand::RateLimit { task_name, rate_limit } => {
            ("rate_limit", json!({"task_name": task_name, "rate_limit": rate_limit}))
        }
        ControlCommand::PoolRestart => ("pool_restart", json!({"reload": false})),
        ControlCommand::TimeLimit { task_name, soft, hard } => {
            ("time_limit", json!({"task_name": task_name, "soft": soft, "hard": hard}))
        }
        ControlCommand::AddConsumer { queue } => {
            ("add_consumer", json!({"queue": queue, "exchange": null, "exchange_type": "direct", "routing_key": null}))
        }
        ControlCommand::CancelConsumer { queue } => ("cancel_consumer", json!({"queue": queue})),
        ControlCommand::EnableEvents => ("enable_events", json!({})),
        ControlCommand::DisableEvents => ("disable_events", json!({})),
    };
    call(broker_url, method, arguments, &args.opts).await
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Seconds since a Unix time, as `12.3s`.
fn runtime(time_start: &Value) -> String {
    match time_start.as_f64() {
        Some(t) => {
            let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
            format!("{:.1}s", (now - t).max(0.0))
        }
        None => "-".into(),
    }
}

fn print_reply(method: &str, node: &str, reply: &Value) {
    if let Some(error) = reply.get("error") {
        println!("{node}: error: {}", text(error));
        return;
    }
    if let Some(ok) = reply.get("ok") {
        println!("{node}: {}", text(ok));
        return;
    }
    match (method, reply) {
        ("active", Value::Array(tasks)) => print_active(node, tasks),
        ("reserved", Value::Array(tasks)) => {
            println!("{node}: {} task{}", tasks.len(), if tasks.len() == 1 { "" } else { "s" });
            if !tasks.is_empty() {
                println!("  {:<36}  {:<24}  {:>8}  {:>9}  ARGS", "ID", "NAME", "PID", "RUNTIME");
            }
            for t in tasks {
                println!(
                    "  {:<36}  {:<24}  {:>8}  {:>9}  {} {}",
                    text(&t["id"]),
                    text(&t["name"]),
                    text(&t["worker_pid"]),
                    runtime(&t["time_start"]),
                    t["args"],
                    t["kwargs"]
                );
            }
        }
        ("scheduled", Value::Array(entries)) => {
            println!("{node}: {} task{}", entries.len(), if entries.len() == 1 { "" } else { "s" });
            for e in entries {
                let r = &e["request"];
                println!("  {:<36}  {:<24}  eta {}", text(&r["id"]), text(&r["name"]), text(&e["eta"]));
            }
        }
        ("registered" | "revoked", Value::Array(items)) => {
            println!("{node}: {}", if items.is_empty() { "(none)".to_string() } else { String::new() });
            for i in items {
                println!("  {}", text(i));
            }
        }
        ("active_queues", Value::Array(queues)) => {
            let names: Vec<String> = queues.iter().map(|q| text(&q["name"])).collect();
            println!("{node}: {}", names.join(", "));
        }
        ("query_task", Value::Object(found)) => {
            println!("{node}: {}", if found.is_empty() { "(none of these)" } else { "" });
            for (id, entry) in found {
                println!("  {:<36}  {:<8}  {}", id, text(&entry[0]), text(&entry[1]["name"]));
            }
        }
        ("stats", Value::Object(s)) => print_stats(node, s),
        _ => println!("{node}: {reply}"),
    }
}

/// `inspect active`: a row per running task with the pid and thread running it, its runtime,
/// the time left to its hard limit and what it is blocked on (celeriac's prefork workers; `-`
/// where a worker does not say, as Celery's).
fn print_active(node: &str, tasks: &[Value]) {
    println!("{node}: {} task{}", tasks.len(), if tasks.len() == 1 { "" } else { "s" });
    if !tasks.is_empty() {
        println!(
            "  {:<36}  {:<24}  {:>8}  {:>8}  {:>9}  {:>9}  {:<48}  ARGS",
            "ID", "NAME", "PID", "TID", "RUNTIME", "HARD IN", "BLOCKED ON"
        );
    }
    let secs = |v: &Value| v.as_f64().map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"));
    for t in tasks {
        let runtime = if t["runtime"].is_number() { secs(&t["runtime"]) } else { runtime(&t["time_start"]) };
        println!(
            "  {:<36}  {:<24}  {:>8}  {:>8}  {:>9}  {:>9}  {:<48}  {} {}",
            text(&t["id"]),
            text(&t["name"]),
            text(&t["worker_pid"]),
            text(&t["worker_tid"]),
            runtime,
            secs(&t["hard_time_left"]),
            text(&t["blocked_on"]),
            t["args"],
            t["kwargs"]
        );
    }
}

fn print_stats(node: &str, s: &Map<String, Value>) {
    let pool = &s.get("pool").cloned().unwrap_or_default();
    println!("{node}:");
    println!("  pid {}  uptime {}s  clock {}", text(&s["pid"]), text(&s["uptime"]), text(&s["clock"]));
    println!(
        "  pool {}  concurrency {}  processes {}",
        text(&pool["implementation"]),
        text(&pool["max-concurrency"]),
        pool["processes"]
    );
    if let Some(broker) = s.get("broker") {
        println!(
            "  broker {}://{}:{}/{}",
            text(&broker["transport"]),
            text(&broker["hostname"]),
            text(&broker["port"]),
            text(&broker["virtual_host"])
        );
    }
    if let Some(total) = s.get("total").and_then(Value::as_object) {
        let parts: Vec<String> = total.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  tasks {}", if parts.is_empty() { "(none yet)".into() } else { parts.join(" ") });
    }
    if let Some(recycles) = pool.get("recycles") {
        println!(
            "  recycles max-tasks {} max-memory {}  hard-limit kills {}  worker lost {}",
            text(&recycles["max_tasks"]),
            text(&recycles["max_memory"]),
            text(&pool["hard_limit_kills"]),
            text(&pool["worker_lost"])
        );
    }
    if let Some(children) = pool.get("children").and_then(Value::as_array) {
        println!("  {:>4}  {:>8}  {:>10}  {:>10}  TASK", "SLOT", "PID", "TASKS", "RSS");
        for c in children {
            let rss = c["rss_kib"].as_f64().map(|k| format!("{:.1} MB", k * 1024.0 / 1e6)).unwrap_or_default();
            let task = c["task"].as_object().map(|t| format!("{}[{}]", text(&t["name"]), text(&t["id"])));
            println!(
                "  {:>4}  {:>8}  {:>10}  {:>10}  {}",
                text(&c["slot"]),
                text(&c["pid"]),
                text(&c["tasks_done"]),
                rss,
                task.unwrap_or_else(|| "idle".into())
            );
        }
    }
    if let Some(maxrss) = s.get("rusage").and_then(|r| r.get("maxrss")) {
        // Celery's `rusage.maxrss`: the worker's own process (the supervisor), not its children.
        let children = pool.get("children").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
        let note = if children { " (its children's RSS is above)" } else { "" };
        println!("  worker process max rss {} KiB{note}", text(maxrss));
    }
}
