//! Remote control: the worker's node in Celery's pidbox, so `celery inspect`, `celery control`,
//! Flower and `celeriac inspect` see and steer it.
//!
//! # Wire format (kombu's `pidbox.Mailbox` as Celery configures it)
//!
//! - The node consumes the queue `<hostname>.celery.pidbox` (transient, auto-delete, exclusive,
//!   `x-message-ttl` 300 s, `x-expires` 10 s) bound to the fanout exchange `celery.pidbox`.
//! - A command is a JSON body `{"method", "arguments", "destination", "pattern", "matcher"}`,
//!   plus `"ticket"` and `"reply_to": {"exchange", "routing_key"}` when the sender waits for
//!   replies; headers `clock` (Lamport clock) and `expires` (Unix time, 0 for none).
//! - A node runs the command when `destination` is empty or names it (`pattern` with the `glob`
//!   matcher is honoured too), and, when asked to, replies `{"<hostname>": <reply>}` to the
//!   direct exchange `reply.celery.pidbox` with the sender's routing key and the headers `ticket`
//!   and `clock`, transient.
//! - Replies follow `celery/worker/control.py`: `{"ok": ...}`, `{"error": ...}`, or the data
//!   itself (`active`, `stats`, ...). An unknown command or a malformed message gets an error reply
//!   when it says where to reply, and is logged; the worker carries on.
//!
//! # Commands
//!
//! `ping`, `active`, `reserved`, `scheduled`, `revoked`, `stats`, `registered`, `active_queues`,
//! `clock`, `report`, `conf`, `revoke` / `terminate` (with `terminate` and `signal`: the prefork child running the
//! task gets the signal; in the async pool the task is dropped at its next await), `shutdown`
//! (warm), `pool_grow` / `pool_shrink`, `rate_limit`, `add_consumer`, `cancel_consumer`,
//! `enable_events` / `disable_events` (task events on or off, as Flower asks).
//!
//! `revoke` stores nothing for the ids it names (Celery's `celery/worker/control.py` `_revoke`):
//! it remembers them (and records them for the fleet, [`crate::revokes`]); the worker that
//! discards a revoked request stores REVOKED then, a running task not terminated finishes and
//! stores its outcome, and a finished task keeps its result. A task terminated here is stored
//! REVOKED at once, as Celery's `Request.terminate` does.
//!
//! `active` (and `query_task`) entries are Celery's `Request.info()` plus keys of celeriac's: a
//! running task's `runtime`, and in the prefork pool what the child's thread running it is
//! blocked on (`worker_tid`, `proc_state`, `wchan`, `syscall`, `blocked_on`), its
//! `hard_time_left` and `soft_time_left`; Celery's `inspect active` prints them with the rest.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::broadcast::{Binding, ExchangeKind, ExchangeSpec};
use celeriac_core::protocol::{format_datetime, to_python_json};
use celeriac_core::result::ExceptionInfo;
use celeriac_core::{Message, Properties, ResultMeta, TaskState};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::consumers::QueueCommand;
use crate::prefork::{proc_info, TaskDiagnosis};
use crate::state::{parse_rate, Phase, RequestInfo};
use crate::{Shared, Shutdown};

/// Celery's `control_exchange` default.
pub const NAMESPACE: &str = "celery";

/// The fanout exchange commands are broadcast on (`celery.pidbox`).
pub fn pidbox_exchange() -> ExchangeSpec {
    ExchangeSpec { name: format!("{NAMESPACE}.pidbox"), kind: ExchangeKind::Fanout, durable: false, auto_delete: false }
}

/// The direct exchange replies go to (`reply.celery.pidbox`).
pub fn reply_exchange() -> ExchangeSpec {
    ExchangeSpec {
        name: format!("reply.{NAMESPACE}.pidbox"),
        kind: ExchangeKind::Direct,
        durable: false,
        auto_delete: false,
    }
}

/// The queue of a node or of a client waiting for replies, as Celery declares it: transient,
/// auto-delete, exclusive, messages dropped after 300 s, the queue after 10 s unused.
pub fn mailbox_binding(queue: String, routing_key: String) -> Binding {
    Binding {
        queue,
        routing_key,
        durable: false,
        auto_delete: true,
        exclusive: true,
        message_ttl: Some(Duration::from_secs(300)),
        expires: Some(Duration::from_secs(10)),
    }
}

/// A transient JSON message with the given headers.
pub fn json_message(body: &Value, headers: Map<String, Value>) -> Message {
    Message {
        headers,
        properties: Properties { delivery_mode: 1, ..Properties::default() },
        // A `Value` always serializes.
        body: to_python_json(body).unwrap_or_default(),
    }
}

/// Whether `hostname` matches a shell-style pattern (`*`, `?`), kombu's `glob` matcher.
pub fn glob_matches(pattern: &str, hostname: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some(('?', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), hostname.chars().collect());
    go(&p, &s)
}

/// A running node; [`Node::stop`] unsubscribes.
pub(crate) struct Node {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Stop listening and remove the node's queue.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// What the command handlers reach.
pub(crate) struct Context {
    pub shared: Arc<Shared>,
    pub shutdown: Shutdown,
    pub queues: mpsc::UnboundedSender<QueueCommand>,
    /// The queues consumed now.
    pub queue_list: Arc<std::sync::Mutex<Vec<String>>>,
    pub prefetch: usize,
    pub started: Instant,
    /// Slots of the pool (tasks at once), as grown or shrunk.
    pub concurrency: Arc<AtomicUsize>,
    /// Lamport clock.
    pub clock: AtomicU64,
}

/// Subscribe to the pidbox and serve commands in the background. `None` (with one log line) when
/// the broker has no exchanges or the subscription fails: the worker runs without remote control.
pub(crate) async fn start(ctx: Context) -> Option<Node> {
    let hostname = ctx.shared.config.hostname.clone();
    let Some(exchanges) = ctx.shared.broker.exchanges() else {
        tracing::info!(broker = %ctx.shared.broker.url(), "remote control is off: it needs an amqp:// or redis:// broker");
        return None;
    };
    let binding = mailbox_binding(format!("{hostname}.{NAMESPACE}.pidbox"), String::new());
    let mut sub = match exchanges.subscribe(&pidbox_exchange(), &binding).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "remote control is off: cannot subscribe to the pidbox");
            return None;
        }
    };
    tracing::info!(queue = %binding.queue, "remote control ready");
    let ctx = Arc::new(ctx);
    let (stop, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Ok(m) => {
                        // One at a time, in order, as a kombu node; handlers never block for long.
                        handle(&ctx, m).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "remote control subscription ended");
                        break;
                    }
                },
                _ = stop_rx.changed() => break,
            }
        }
        sub.close().await;
    });
    Some(Node { stop, task })
}

/// A command addressed to this node.
#[derive(Debug)]
struct Command {
    method: String,
    arguments: Map<String, Value>,
    reply_to: Option<(String, String)>,
    ticket: Option<Value>,
}

/// Read a pidbox message; `Err` carries the error reply and where to send it, if known.
#[allow(clippy::result_large_err)] // built once per control message
fn parse(message: &Message, hostname: &str) -> Result<Option<Command>, (String, Option<Command>)> {
    let body = match celeriac_core::pyjson::from_slice(&message.body) {
        Ok(v) => v,
        Err(e) => return Err((format!("malformed control message (not JSON: {e})"), None)),
    };
    let Value::Object(body) = body else {
        return Err(("malformed control message (not a JSON object)".into(), None));
    };
    let reply_to = body
        .get("reply_to")
        .and_then(|r| Some((r.get("exchange")?.as_str()?.to_string(), r.get("routing_key")?.as_str()?.to_string())));
    let ticket = body.get("ticket").cloned().filter(|t| !t.is_null());
    let method = body.get("method").and_then(Value::as_str).unwrap_or_default().to_string();
    let arguments = match body.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(other) => {
            let cmd = Command { method, arguments: Map::new(), reply_to, ticket };
            return Err((format!("malformed control message: arguments must be an object, got {other}"), Some(cmd)));
        }
    };
    let cmd = Command { method, arguments, reply_to, ticket };
    // Addressing, as kombu's Node.handle_message: a destination list, else a pattern, else all.
    let addressed = match body.get("destination") {
        Some(Value::Array(names)) if !names.is_empty() => names.iter().any(|n| n.as_str() == Some(hostname)),
        Some(Value::String(name)) if !name.is_empty() => name == hostname,
        None | Some(Value::Null) | Some(Value::Array(_)) | Some(Value::String(_)) => {
            match (body.get("pattern").and_then(Value::as_str), body.get("matcher").and_then(Value::as_str)) {
                (Some(pattern), Some("glob")) => glob_matches(pattern, hostname),
                (Some(pattern), Some(_)) => pattern == hostname,
                _ => true,
            }
        }
        Some(other) => return Err((format!("malformed control message: bad destination {other}"), Some(cmd))),
    };
    if !addressed {
        return Ok(None);
    }
    check_method(Some(cmd))
}

#[allow(clippy::result_large_err)]
fn check_method(cmd: Option<Command>) -> Result<Option<Command>, (String, Option<Command>)> {
    match cmd {
        Some(c) if c.method.is_empty() => Err(("malformed control message: no method".into(), Some(c))),
        other => Ok(other),
    }
}

async fn handle(ctx: &Context, message: Message) {
    let hostname = ctx.shared.config.hostname.as_str();
    if let Some(clock) = message.headers.get("clock").and_then(Value::as_u64) {
        ctx.clock.fetch_max(clock, Ordering::Relaxed);
    }
    ctx.clock.fetch_add(1, Ordering::Relaxed);
    let expires = message.headers.get("expires").and_then(Value::as_f64).unwrap_or(0.0);
    let (cmd, reply) = match parse(&message, hostname) {
        Ok(None) => return,
        Ok(Some(cmd)) => {
            if expires > 0.0 && expires < chrono::Utc::now().timestamp_micros() as f64 / 1e6 {
                tracing::debug!(method = %cmd.method, "control command expired before it arrived; ignored");
                return;
            }
            tracing::debug!(method = %cmd.method, arguments = ?cmd.arguments, "control command");
            let reply = dispatch(ctx, &cmd.method, &cmd.arguments).await;
            (cmd, reply)
        }
        Err((error, cmd)) => {
            tracing::warn!(%error, "bad control message");
            match cmd {
                Some(cmd) => (cmd, json!({"error": error})),
                None => return,
            }
        }
    };
    if let Some((exchange, routing_key)) = &cmd.reply_to {
        send_reply(ctx, exchange, routing_key, cmd.ticket.clone().unwrap_or(Value::Null), reply).await;
    }
}

async fn send_reply(ctx: &Context, exchange: &str, routing_key: &str, ticket: Value, reply: Value) {
    let Some(exchanges) = ctx.shared.broker.exchanges() else { return };
    let mut headers = Map::new();
    headers.insert("ticket".into(), ticket);
    headers.insert("clock".into(), json!(ctx.clock.fetch_add(1, Ordering::Relaxed) + 1));
    // Built by hand: `json!` would copy `reply` through `serde_json::to_value`, which refuses a
    // `NaN` in a task's arguments.
    let mut body = Map::new();
    body.insert(ctx.shared.config.hostname.clone(), reply);
    let body = Value::Object(body);
    let spec = ExchangeSpec { name: exchange.to_string(), ..reply_exchange() };
    if let Err(e) = exchanges.publish_to(&spec, routing_key, &json_message(&body, headers)).await {
        tracing::warn!(error = %e, %exchange, "could not send a control reply");
    }
}

fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

fn nok(text: impl Into<String>) -> Value {
    json!({"error": text.into()})
}

/// Run one command.
async fn dispatch(ctx: &Context, method: &str, args: &Map<String, Value>) -> Value {
    let hostname = ctx.shared.config.hostname.as_str();
    match method {
        "ping" => ok("pong"),
        "clock" => json!({"clock": ctx.clock.load(Ordering::Relaxed)}),
        "active" | "dump_active" => list(ctx, |p| matches!(p, Phase::Active(_))),
        "reserved" | "dump_reserved" => list(ctx, |p| matches!(p, Phase::Reserved)),
        "scheduled" | "dump_schedule" => Value::Array(
            ctx.shared
                .state
                .requests()
                .iter()
                .filter_map(|r| match r.phase {
                    Phase::Scheduled(eta) => {
                        let mut entry = Map::new();
                        entry.insert("eta".into(), Value::from(format_datetime(eta)));
                        entry.insert("priority".into(), Value::from(r.priority));
                        entry.insert("request".into(), r.to_celery(hostname, None));
                        Some(Value::Object(entry))
                    }
                    _ => None,
                })
                .collect(),
        ),
        "revoked" | "dump_revoked" => json!(ctx.shared.state.revoked()),
        "query_task" => query_task(ctx, args),
        "report" => ok(format!("celeriac {} ({})", env!("CARGO_PKG_VERSION"), ctx.shared.broker.url())),
        "conf" | "dump_conf" => {
            let cfg = &ctx.shared.config;
            json!({
                "broker_url": ctx.shared.broker.url(),
                "worker_concurrency": ctx.concurrency.load(Ordering::Relaxed),
                "worker_prefetch_multiplier": cfg.prefetch_multiplier,
                "task_time_limit": cfg.time_limit,
                "task_soft_time_limit": cfg.soft_time_limit,
                "task_acks_late": true,
                "control_exchange": NAMESPACE,
            })
        }
        "stats" => stats(ctx),
        "registered" | "dump_tasks" => {
            // As Celery's `registered`: its builtins (`celery.*`) only when asked for; those
            // listed are the ones this worker runs (see `crate::builtins`).
            let builtins = args.get("builtins").is_some_and(|b| b.as_bool().unwrap_or(!b.is_null()));
            let mut names: Vec<String> = ctx
                .shared
                .registry
                .names()
                .filter(|n| builtins || !n.starts_with("celery."))
                .map(|n| match ctx.shared.state.rate_limit(n) {
                    Some(r) => format!("{n} [rate_limit={r}]"),
                    None => n.to_string(),
                })
                .collect();
            names.sort();
            json!(names)
        }
        "active_queues" => active_queues(ctx),
        "revoke" => revoke(ctx, args).await,
        "terminate" => {
            let mut args = args.clone();
            args.insert("terminate".into(), json!(true));
            revoke(ctx, &args).await
        }
        "shutdown" => {
            tracing::warn!("Got shutdown from remote");
            ctx.shutdown.warm();
            ok("shutting down")
        }
        "enable_events" | "disable_events" => {
            // Flower sends enable_events so that workers started without -E report their tasks.
            let Some(events) = &ctx.shared.observe.events else {
                return nok("events are off on this worker (started with --without-heartbeat and without -E)");
            };
            let on = method == "enable_events";
            if events.task_events() == on {
                return ok(format!("task events already {}", if on { "enabled" } else { "disabled" }));
            }
            events.set_task_events(on);
            let state = if on { "enabled" } else { "disabled" };
            tracing::info!("Events of group {{task}} {state} by remote.");
            ok(format!("task events {state}"))
        }
        "pool_grow" => pool_resize(ctx, args, true).await,
        "pool_shrink" => pool_resize(ctx, args, false).await,
        "rate_limit" => rate_limit(ctx, args),
        "time_limit" => time_limit(ctx, args),
        "pool_restart" => match &ctx.shared.pool {
            Some(pool) => {
                pool.restart();
                ok("reload started")
            }
            None => nok("pool_restart needs the prefork pool (-P prefork): the async pool has no processes"),
        },
        "add_consumer" | "cancel_consumer" => {
            let Some(queue) = args.get("queue").and_then(Value::as_str).map(str::to_string) else {
                return nok(format!("{method} needs a queue name"));
            };
            let queue_name = queue.clone();
            let (tx, rx) = oneshot::channel();
            let command =
                if method == "add_consumer" { QueueCommand::Add(queue, tx) } else { QueueCommand::Cancel(queue, tx) };
            if ctx.queues.send(command).is_err() {
                return nok("the worker is stopping");
            }
            // The main loop applies it; while every slot is busy it may not get to it at once,
            // and commands are served one at a time, so do not wait long for its answer.
            match tokio::time::timeout(Duration::from_secs(2), rx).await {
                Ok(Ok(Ok(text))) => ok(text),
                Ok(Ok(Err(e))) => nok(e),
                Ok(Err(_)) => nok("the worker is stopping"),
                Err(_) => ok(format!("{method} {queue_name}: will apply when a pool slot frees")),
            }
        }
        other => nok(format!("unknown control command {other:?}")),
    }
}

/// The requests in a phase, as Celery's `Request.info()`, with the pid running each; a running
/// one also has its `runtime` and, in the prefork pool, what its child's thread is blocked on
/// ([`diagnosis_keys`]).
fn list(ctx: &Context, phase: impl Fn(&Phase) -> bool) -> Value {
    let children = ctx.shared.pool.as_ref().map(|p| p.children()).unwrap_or_default();
    let own = std::process::id();
    let hostname = ctx.shared.config.hostname.as_str();
    Value::Array(
        ctx.shared
            .state
            .requests()
            .iter()
            .filter(|r| phase(&r.phase))
            .map(|r: &RequestInfo| {
                let Phase::Active(started) = r.phase else { return r.to_celery(hostname, None) };
                let (pid, extra) = match &ctx.shared.pool {
                    None => {
                        let runtime = (chrono::Utc::now() - started).num_microseconds().unwrap_or(0) as f64 / 1e6;
                        (Some(own), Map::from_iter([("runtime".to_string(), json!(runtime.max(0.0)))]))
                    }
                    Some(_) => {
                        let child = children.iter().find(|c| c.task.as_ref().is_some_and(|t| t.id == r.id));
                        let extra = child.and_then(|c| c.diagnose()).map(|d| diagnosis_keys(&d)).unwrap_or_default();
                        (child.map(|c| c.pid), extra)
                    }
                };
                let mut info = r.to_celery(hostname, pid);
                if let Value::Object(m) = &mut info {
                    m.extend(extra);
                }
                info
            })
            .collect(),
    )
}

/// What celeriac adds to an `active` request of the prefork pool (Celery's clients print or
/// ignore extra keys): `worker_tid` (the thread running the task), `runtime` and
/// `hard_time_left` (seconds; `null` without a hard limit), `soft_time_left` (seconds, negative
/// once passed; `null` without a soft limit), `proc_state`, `wchan`, `syscall`
/// (from `/proc/<pid>/task/<tid>/`; `null` when not sleeping in one) and `blocked_on`, the three
/// in one phrase.
fn diagnosis_keys(d: &TaskDiagnosis) -> Map<String, Value> {
    let wait = d.wait.as_ref();
    let keys = json!({
        "worker_tid": d.tid,
        "runtime": d.runtime,
        "hard_time_left": d.hard_time_left,
        "soft_time_left": d.soft_time_left,
        "proc_state": wait.map(|w| w.state.as_str()),
        "wchan": wait.and_then(|w| w.wchan.as_deref()),
        "syscall": wait.and_then(|w| w.syscall.as_deref()),
        "blocked_on": d.blocked_on(),
    });
    match keys {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Celery's `query_task`: for each of `ids` this worker holds, its state (`active` or
/// `reserved`; an ETA task is reserved, as Celery counts it) and the request as `active` lists it.
fn query_task(ctx: &Context, args: &Map<String, Value>) -> Value {
    let ids: Vec<&str> = match args.get("ids") {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(id)) => vec![id.as_str()],
        _ => Vec::new(),
    };
    let active = list(ctx, |p| matches!(p, Phase::Active(_)));
    let held = list(ctx, |p| !matches!(p, Phase::Active(_)));
    let mut found = Map::new();
    for (state, requests) in [("active", active), ("reserved", held)] {
        for request in requests.as_array().into_iter().flatten() {
            if let Some(id) = request["id"].as_str().filter(|id| ids.contains(id)) {
                found.insert(id.to_string(), Value::Array(vec![Value::from(state), request.clone()]));
            }
        }
    }
    Value::Object(found)
}

/// A signal by name (`TERM`, `SIGKILL`) or number.
fn parse_signal(text: &str) -> Result<nix::sys::signal::Signal, String> {
    use nix::sys::signal::Signal;
    let t = text.trim().to_ascii_uppercase();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("unknown signal {text:?}"));
    }
    let name = if t.starts_with("SIG") { t } else { format!("SIG{t}") };
    Signal::from_str(&name).map_err(|_| format!("unknown signal {text:?}"))
}

async fn revoke(ctx: &Context, args: &Map<String, Value>) -> Value {
    let ids: Vec<String> = match args.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => return nok("revoke needs task_id: an id or a list of ids"),
    };
    let terminate = match args.get("terminate") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"),
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        _ => false,
    };
    let signal = match args.get("signal").and_then(Value::as_str).map(parse_signal).transpose() {
        Ok(s) => s.unwrap_or(nix::sys::signal::Signal::SIGTERM),
        Err(e) => return nok(e),
    };
    // As Celery's `_revoke`: the ids are only remembered here (and recorded for other and later
    // workers). Nothing is stored for them now: a request held or received later is discarded
    // with REVOKED stored (`request::prepare`, `execute::run`), a running task runs on and stores
    // its real outcome, a finished one keeps it. Only a task this worker terminates is stored
    // REVOKED at once (Celery's `Request.terminate` -> `_announce_revoked`).
    let running = ctx.shared.state.revoke(&ids);
    crate::revokes::record(&ctx.shared, &ids).await;
    if !terminate {
        tracing::info!(ids = %ids.join(", "), "tasks flagged as revoked");
        return ok(format!("tasks {} flagged as revoked", ids.join(", ")));
    }
    let mut terminated = Vec::new();
    for id in &running {
        tracing::info!(task_id = %id, signal = %signal, "terminating");
        match &ctx.shared.pool {
            Some(pool) => match pool.terminate(id, signal) {
                Some(_) => terminated.push(id.clone()),
                None => tracing::warn!(task_id = %id, "no child runs it now"),
            },
            None => {
                ctx.shared.state.terminate(id, signal as i32);
                terminated.push(id.clone());
            }
        }
    }
    for id in &terminated {
        let exc = ExceptionInfo::new("TaskRevokedError", "terminated", "celery.exceptions");
        if let Err(e) = ctx.shared.backend.store(&ResultMeta::exception(id, TaskState::Revoked, &exc, None)).await {
            tracing::warn!(task_id = %id, error = %e, "could not mark the terminated task revoked in the result backend");
        }
    }
    if terminated.is_empty() {
        ok("terminate: tasks unknown")
    } else {
        ok(format!("terminate: {}", terminated.join(", ")))
    }
}

fn rate_limit(ctx: &Context, args: &Map<String, Value>) -> Value {
    let Some(task) = args.get("task_name").and_then(Value::as_str) else {
        return nok("rate_limit needs task_name");
    };
    let text = match args.get("rate_limit") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        None | Some(Value::Null) => String::new(),
        Some(other) => return nok(format!("Invalid rate limit string: {other}")),
    };
    let interval = match parse_rate(&text) {
        Ok(i) => i,
        Err(e) => return nok(format!("Invalid rate limit string: {e}")),
    };
    if ctx.shared.registry.get(task).is_none() {
        tracing::error!(task_name = %task, "rate limit attempt for unknown task");
        return nok("unknown task");
    }
    ctx.shared.state.set_rate_limit(task, &text, interval);
    if interval.is_none() {
        tracing::info!(task_name = %task, "rate limits disabled");
        ok("rate limit disabled successfully")
    } else {
        tracing::info!(task_name = %task, rate_limit = %text, "new rate limit");
        ok("new rate limit set successfully")
    }
}

/// Celery's `time_limit`: set a task's soft and hard limits (seconds; absent or null: none).
fn time_limit(ctx: &Context, args: &Map<String, Value>) -> Value {
    let Some(task) = args.get("task_name").and_then(Value::as_str) else {
        return nok("time_limit needs task_name");
    };
    let seconds = |key: &str| -> Result<Option<f64>, String> {
        match args.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| (s > 0.0).then_some(s))
                .ok_or_else(|| format!("{key} time limit must be a number of seconds, got {v}")),
        }
    };
    let (soft, hard) = match (seconds("soft"), seconds("hard")) {
        (Ok(soft), Ok(hard)) => (soft, hard),
        (Err(e), _) | (_, Err(e)) => return nok(e),
    };
    if ctx.shared.registry.get(task).is_none() {
        tracing::error!(task_name = %task, "time limit change for unknown task");
        return nok("unknown task");
    }
    ctx.shared.state.set_time_limits(task, crate::state::TimeLimits { soft, hard });
    tracing::info!(task_name = %task, ?soft, ?hard, "new time limits");
    ok("time limits set successfully")
}

async fn pool_resize(ctx: &Context, args: &Map<String, Value>, grow: bool) -> Value {
    let n = match args.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())) {
            Some(n) if n > 0 => n as usize,
            _ => return nok(format!("n must be a positive number, got {v}")),
        },
    };
    let current = ctx.concurrency.load(Ordering::Relaxed);
    if grow {
        if let Some(pool) = &ctx.shared.pool {
            if let Err(e) = pool.grow(n).await {
                return nok(format!("could not grow the pool: {e}"));
            }
        }
        ctx.shared.slots.add_permits(n);
        ctx.concurrency.fetch_add(n, Ordering::Relaxed);
        tracing::info!(from = current, to = current + n, "pool grown (remote control)");
        return ok("pool will grow");
    }
    if n >= current {
        return nok(format!("cannot shrink a pool of {current} by {n}: at least one slot must remain"));
    }
    ctx.concurrency.fetch_sub(n, Ordering::Relaxed);
    // Slots are taken as running tasks finish, then that many idle children retire.
    let (slots, pool) = (ctx.shared.slots.clone(), ctx.shared.pool.clone());
    tokio::spawn(async move {
        if let Ok(permits) = slots.acquire_many_owned(n as u32).await {
            permits.forget();
            if let Some(pool) = pool {
                pool.shrink(n).await;
            }
            tracing::info!(from = current, to = current - n, "pool shrunk (remote control)");
        }
    });
    ok("pool will shrink")
}

fn active_queues(ctx: &Context) -> Value {
    let queues = ctx.queue_list.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Value::Array(
        queues
            .iter()
            .map(|q| {
                // kombu's Queue.as_dict(recurse=True) for a queue declared as Celery declares it.
                json!({
                    "name": q,
                    "exchange": {"name": q, "type": "direct", "arguments": null, "durable": true, "passive": false,
                                 "auto_delete": false, "delivery_mode": null, "no_declare": false},
                    "routing_key": q, "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
                    "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null,
                    "bindings": [], "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
                    "max_length_bytes": null, "max_priority": null,
                })
            })
            .collect(),
    )
}

/// The broker as Celery's `stats` describes it, from the (password-free) URL.
fn broker_info(url: &str) -> Value {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (userinfo, hostpart) = rest.rsplit_once('@').unwrap_or(("", rest));
    let userid = userinfo.split(':').next().filter(|u| !u.is_empty());
    let (hostport, path) = hostpart.split_once('/').unwrap_or((hostpart, ""));
    let path = path.split('?').next().unwrap_or("");
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()),
        None => (hostport, None),
    };
    json!({
        "hostname": host,
        "userid": userid,
        "virtual_host": if scheme.starts_with("amqp") { json!(if path.is_empty() { "/" } else { path }) } else { json!(path) },
        "port": port,
        "transport": scheme,
        "url": url,
    })
}

/// Celery's `rusage` block, from `getrusage(RUSAGE_SELF)`.
fn rusage() -> Value {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            json!({
                "utime": secs(u.user_time()), "stime": secs(u.system_time()), "maxrss": u.max_rss(),
                "ixrss": u.shared_integral(), "idrss": u.unshared_data_integral(), "isrss": u.unshared_stack_integral(),
                "minflt": u.minor_page_faults(), "majflt": u.major_page_faults(), "nswap": u.full_swaps(),
                "inblock": u.block_reads(), "oublock": u.block_writes(), "msgsnd": u.ipc_sends(),
                "msgrcv": u.ipc_receives(), "nsignals": u.signals(), "nvcsw": u.voluntary_context_switches(),
                "nivcsw": u.involuntary_context_switches(),
            })
        }
        Err(_) => json!("N/A"),
    }
}

/// Celery's `stats` reply (the keys `celery inspect stats` and Flower read), plus celeriac's pool
/// details (per-child pids, tasks done, RSS, recycles and why, hard-limit kills) and counters.
fn stats(ctx: &Context) -> Value {
    let cfg = &ctx.shared.config;
    let concurrency = ctx.concurrency.load(Ordering::Relaxed);
    let limit = |v: Option<f64>| v.map_or(json!(0), |s| json!(s));
    let mut pool = json!({
        "max-concurrency": concurrency,
        "put-guarded-by-semaphore": false,
        "timeouts": [limit(cfg.soft_time_limit), limit(cfg.time_limit)],
    });
    match &ctx.shared.pool {
        Some(p) => {
            let children = p.children();
            let s = p.stats();
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let pc = cfg.prefork.as_ref();
            pool["implementation"] = json!("celeriac:prefork");
            pool["processes"] = json!(children.iter().map(|c| c.pid).collect::<Vec<_>>());
            pool["max-tasks-per-child"] = pc.and_then(|c| c.max_tasks_per_child).map_or(json!("N/A"), |v| json!(v));
            pool["max-memory-per-child"] =
                pc.and_then(|c| c.max_memory_per_child_kib).map_or(json!("N/A"), |v| json!(v));
            pool["children"] = json!(children
                .iter()
                .map(|c| json!({
                    "slot": c.slot, "pid": c.pid, "tasks_done": c.tasks_done, "rss_kib": c.rss_kib,
                    "task": c.task.as_ref().map(|t| json!({"id": t.id, "name": t.name, "started": format_datetime(t.started)})),
                }))
                .collect::<Vec<_>>());
            pool["recycles"] = json!({"max_tasks": n(&s.recycled_max_tasks), "max_memory": n(&s.recycled_memory)});
            pool["hard_limit_kills"] = json!(n(&s.hard_limit_kills));
            pool["worker_lost"] = json!(n(&s.worker_lost));
            pool["spawn_failures"] = json!(n(&s.spawn_failures));
            pool["degraded"] = json!(p.degraded());
            pool["fresh_child_rss_kib"] = json!(p.fresh_rss_kib());
        }
        None => {
            pool["implementation"] = json!("celeriac:async");
            pool["processes"] = json!([std::process::id()]);
            pool["max-tasks-per-child"] = json!("N/A");
        }
    }
    let c = ctx.shared.stats.snapshot();
    json!({
        "total": ctx.shared.state.totals(),
        "pid": std::process::id(),
        "clock": ctx.clock.load(Ordering::Relaxed).to_string(),
        "uptime": ctx.started.elapsed().as_secs(),
        "pool": pool,
        "broker": broker_info(ctx.shared.broker.url()),
        "prefetch_count": ctx.prefetch,
        "rusage": rusage(),
        "rss_kib": proc_info::rss_kib(std::process::id()),
        "counters": {
            "received": c.received, "succeeded": c.succeeded, "failed": c.failed, "retried": c.retried,
            "revoked": c.revoked, "dead_lettered": c.dead_lettered, "requeued": c.requeued,
            "released": c.released,
        },
        "sw_ident": "celeriac",
        "sw_ver": env!("CARGO_PKG_VERSION"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: Value) -> Message {
        json_message(&body, Map::new())
    }

    #[test]
    fn commands_are_addressed_as_kombu_does() {
        let body = |dest: Value| {
            json!({"method": "ping", "arguments": {}, "destination": dest, "pattern": null, "matcher": null,
                   "ticket": "t1", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "oid"}})
        };
        let c = parse(&msg(body(Value::Null)), "a@h").unwrap().unwrap();
        assert_eq!((c.method.as_str(), c.reply_to.unwrap().1.as_str(), c.ticket), ("ping", "oid", Some(json!("t1"))));
        assert!(parse(&msg(body(json!(["a@h"]))), "a@h").unwrap().is_some());
        assert!(parse(&msg(body(json!(["b@h"]))), "a@h").unwrap().is_none());
        let glob = json!({"method": "ping", "pattern": "a@*", "matcher": "glob"});
        assert!(parse(&msg(glob.clone()), "a@h").unwrap().is_some());
        assert!(parse(&msg(glob), "b@h").unwrap().is_none());
    }

    #[test]
    fn malformed_messages_are_named() {
        let not_json = Message { body: b"{nope".to_vec(), ..msg(json!({})) };
        assert!(parse(&not_json, "a@h").unwrap_err().0.contains("not JSON"));
        let bad_args = json!({"method": "ping", "arguments": [1], "reply_to": {"exchange": "x", "routing_key": "k"}});
        let (error, cmd) = parse(&msg(bad_args), "a@h").unwrap_err();
        assert!(error.contains("arguments") && cmd.unwrap().reply_to.is_some(), "{error}");
        assert!(parse(&msg(json!({"arguments": {}})), "a@h").unwrap_err().0.contains("no method"));
    }

    #[test]
    fn signals_by_name_or_number() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGKILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn broker_info_from_urls() {
        let b = broker_info("amqp://guest:***@127.0.0.1:5672/vh");
        assert_eq!(
            (b["hostname"].clone(), b["port"].clone(), b["virtual_host"].clone()),
            (json!("127.0.0.1"), json!(5672), json!("vh"))
        );
        assert_eq!(broker_info("redis://127.0.0.1:6379/4")["transport"], json!("redis"));
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_matches("celeriac@*", "celeriac@host") && glob_matches("w?@h", "w1@h"));
        assert!(!glob_matches("x*", "celeriac@host"));
    }
}
