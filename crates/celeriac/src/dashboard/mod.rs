//! The built-in web dashboard (`celeriac dashboard`, `celeriac worker --dashboard ADDR`):
//! workers, queues and recent tasks on one page, updated live, with actions behind a token.
//!
//! It reads the broker only through what the CLI uses: the events on `celeryev` (as
//! `celeriac events`), remote control (`crate::control::broadcast`: `stats`, `active` every
//! `active_queues` every [`POLL`], and the actions) and `Broker::queues` (as `celeriac queues`), plus the result
//! backend for a task's stored result; on an SQLite broker, the file itself ([`file`]). State is
//! in memory ([`state::State`]).
//!
//! HTTP (axum, http1): `GET /` the page (assets embedded with `include_str!`, no CDN);
//! `GET /api/overview`, `/api/workers`, `/api/queues`, `/api/file` (SQLite: the consumers holding
//! messages and what the file cannot show),
//! `/api/tasks?state=&name=&worker=&id=&offset=&limit=` (worker: a part of the node name; id: a
//! prefix), `/api/charts` (per-minute outcomes and run-time percentiles, per-name percentiles,
//! queue depths over the last hour), `/api/dead_letters`, `/api/tasks/{id}` (404 with `"state": "unknown"` for an id never seen), `/task/{id}` (the
//! task as a server-rendered page, every value HTML-escaped), `/api/stream` (server-sent events:
//! `update` with the state's version when it changes, at most one per [`STREAM_INTERVAL`]: the
//! first change after a quiet second at once, then the changes of each second as one).
//!
//! An open page costs at most one build of what it shows per update: the
//! overview, workers, queues, charts and task-list answers are kept as the JSON text they were
//! built into, with the state's version they were built at (`Views`), and a request for the
//! same view at the same version is answered with that text while it is under [`VIEW_MAX_AGE`]
//! old (ages, heartbeats and the last minute's window are computed when an answer is built).
//! Pages asking at the same version share one build; each stream keeps its own one-second
//! timer, so under steady traffic pages out of step ask at different versions and each builds.
//! Actions (`POST`): `/api/tasks/{id}/revoke` (`{"terminate": bool}`), `/api/tasks/{id}/retry`,
//! `/api/queues/{name}/purge`, `/api/workers/{node}/pool` (`{"grow": n}` or `{"shrink": n}`),
//! `/api/rate_limit` (`{"task_name", "rate_limit", "worker"?}`). A remote-control action is
//! broadcast valid for [`ACTION_VALID_FOR`] (60 s: a worker busy for a few seconds still carries
//! it out) and answered with the replies that came within [`ACTION_REPLY_WINDOW`]
//! (`{"replies": {node: reply}, "valid_for": 60}`); a terminate waits up to
//! [`TERMINATE_REPLY_WINDOW`] for the worker running the task, named in `pending` if it has not
//! replied by then.
//!
//! Safety: an action needs the configured token in the `X-Celeriac-Token` header; with no token
//! configured every action is refused with 403 (read-only). A header cannot be set by a form or
//! a cross-site request without CORS, which the server never grants, and an `Origin` that is not
//! this server's `Host` is refused too (CSRF). Every action is logged with the remote address.
//! The page builds its DOM with `textContent` only, so task arguments, results and tracebacks
//! are shown as text. Every answer carries [`SECURITY_HEADERS`] (a `'self'`-only CSP, no
//! framing, no sniffing, no referrer).
//!
//! Connection: "connected" only while both the poll and the event subscription are up
//! (`Shared::link`), with one WARN line when the broker goes away and one INFO line when both
//! are back.

mod file;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State as Ax};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use celeriac_core::{Broker, ResultBackend};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::control::{broadcast, broadcast_with, ControlError, Wait};
use state::{State, TaskFilter};

/// How long an action's request stays valid for the workers (its `expires` header): a worker
/// busy for a few seconds still carries out a revoke, a terminate or a pool change it reads late,
/// where kombu's pidbox lets it expire with the reply window (Celery's default: 1 s).
pub const ACTION_VALID_FOR: Duration = Duration::from_secs(60);
/// How long an action waits for the workers' replies.
pub const ACTION_REPLY_WINDOW: Duration = Duration::from_secs(2);
/// How long a terminate waits for the worker running the task to reply (it answers as soon as it
/// has signalled the child).
pub const TERMINATE_REPLY_WINDOW: Duration = Duration::from_secs(10);

/// How often workers are asked for `stats` and `active`, and queue depths read.
pub const POLL: Duration = Duration::from_secs(2);
/// The live stream sends at most one `update` per this (a busy worker's events change the state
/// thousands of times a second; a page refetches what it shows on each update).
pub const STREAM_INTERVAL: Duration = Duration::from_secs(1);
/// How long a kept answer (`Views`) may be reused at the same state version: it holds ages
/// (a heartbeat's, a running task's) that were true when it was built.
pub const VIEW_MAX_AGE: Duration = Duration::from_secs(1);
/// How many answers of one version `Views` keeps (one per path and query: a page asks for a
/// few; filters typed in make more).
const VIEWS_KEPT: usize = 64;
/// How long a poll waits for replies.
const REPLY_WINDOW: Duration = Duration::from_millis(800);
/// The most tasks one `/api/tasks` answer holds (`limit` above it is capped, and the answer's
/// `limit` says so): each is a JSON copy, so an unbounded page would be a memory spike.
pub const MAX_PAGE: usize = 1_000;
/// The task states `/api/tasks?state=` accepts (Celery's, as task events set them).
pub const TASK_STATES: [&str; 8] =
    ["PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED", "REJECTED"];
/// Headers on every answer: no script or style but the dashboard's own files, not framed,
/// no type sniffing, no referrer sent when a link is followed.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];
/// The header an action carries its token in.
pub const TOKEN_HEADER: &str = "x-celeriac-token";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// How to run a dashboard.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// Where to listen (loopback by default in the CLI).
    pub listen: SocketAddr,
    /// The token actions need; `None` makes the dashboard read-only.
    pub token: Option<String>,
    /// Queues to show on brokers that cannot list them (RabbitMQ over AMQP); tasks' routing keys
    /// are added as they are seen.
    pub queues: Vec<String>,
}

/// Why the dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

struct Shared {
    state: Mutex<State>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    config: DashboardConfig,
    version: watch::Sender<u64>,
    link: Mutex<Link>,
    /// Whether the last poll got through (`None` before the first): the event tail drops its
    /// subscription when a poll fails and subscribes again when one gets through.
    polled: watch::Sender<Option<bool>>,
    /// On an SQLite broker, what the file last told beyond tasks: `{note, consumers}`
    /// ([`file::Reading::summary`]); `None` on other brokers.
    file: Mutex<Option<Value>>,
    /// Whether the event tail has tried to subscribe once (up, down, or no events on this
    /// broker): "dashboard ready" waits for it, so a task sent once the dashboard says it is
    /// ready has its events seen.
    events_tried: watch::Sender<bool>,
    /// The JSON answers last built, per path and query.
    views: Mutex<Views>,
}

/// The JSON answers last built, per path and query, each with the state version it was built at
/// and when: N pages refetching the same view at the same version cost one build. Only the
/// newest version's are kept, so it holds at most what one refresh of each open view fetched.
#[derive(Default)]
struct Views {
    kept: std::collections::HashMap<String, View>,
}

struct View {
    version: u64,
    at: Instant,
    body: Bytes,
}

impl Views {
    /// The answer kept for `key` if it was built at `version` less than [`VIEW_MAX_AGE`] before
    /// `now`.
    fn fresh(&self, key: &str, version: u64, now: Instant) -> Option<Bytes> {
        self.kept
            .get(key)
            .filter(|v| v.version == version && now.saturating_duration_since(v.at) < VIEW_MAX_AGE)
            .map(|v| v.body.clone())
    }

    /// Keep `body` as the answer to `key` at `version`, built at `at`. Only answers of the
    /// newest version are kept (the version only grows, so older ones are never served again):
    /// an answer older than one kept is not, and keeping a newer one drops the rest. At most
    /// [`VIEWS_KEPT`] of them (a burst of distinct filters starts afresh).
    fn keep(&mut self, key: &str, version: u64, at: Instant, body: Bytes) {
        if self.kept.values().any(|v| v.version > version) {
            return;
        }
        self.kept.retain(|_, v| v.version == version);
        if self.kept.len() >= VIEWS_KEPT && !self.kept.contains_key(key) {
            self.kept.clear();
        }
        self.kept.insert(key.to_string(), View { version, at, body });
    }
}

/// What each of the dashboard's two readers last found: `None` before its first try, then
/// `Some(None)` when up (or, for events, when the broker carries none) and `Some(Some(why))` when
/// down. The dashboard is connected only when both are up, so the page does not say "connected"
/// while task events are still being lost.
#[derive(Debug, Default)]
struct Link {
    poll: Option<Option<String>>,
    events: Option<Option<String>>,
    /// What was last logged: `Some(true)` the broker is read, `Some(false)` it went away.
    said_up: Option<bool>,
}

impl Shared {
    /// Record what the poll or the event tail found (in `f`), then the connection state: one
    /// WARN line when the broker goes away, one INFO line when both readers are back.
    fn link(&self, f: impl FnOnce(&mut Link)) {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut link);
        if link.events.is_some() {
            self.events_tried.send_replace(true);
        }
        let error = match (&link.poll, &link.events) {
            (Some(Some(e)), _) => Some(e.clone()),
            (_, Some(Some(e))) => Some(format!("event subscription: {e}")),
            (Some(None), Some(None)) => None,
            _ => return, // A reader has not tried yet: still connecting.
        };
        match (&error, link.said_up) {
            (None, Some(true)) | (Some(_), Some(false)) => {}
            (None, _) => tracing::info!("the dashboard reads the broker: polls and events"),
            (Some(e), _) => tracing::warn!(
                error = %e,
                "the broker went away: the dashboard shows what it last read, and reconnects"
            ),
        }
        link.said_up = Some(error.is_none());
        drop(link);
        self.with(|s| s.set_connected(error));
    }

    /// The answer to `key` (a path and its query) built by `build`, or the one kept for `key`
    /// when it was built at the state's current version less than [`VIEW_MAX_AGE`] ago. The
    /// state is locked while the version is read and the answer built, so an answer is always
    /// the state at its version.
    fn view(&self, key: &str, build: impl FnOnce(&State) -> Value) -> Response {
        let (version, value) = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let version = st.version;
            let kept = self.views.lock().unwrap_or_else(|e| e.into_inner()).fresh(key, version, Instant::now());
            if let Some(body) = kept {
                return json_response(StatusCode::OK, body);
            }
            (version, build(&st))
        };
        // Written out of the state's lock: events are applied meanwhile.
        let body = Bytes::from(celeriac_core::pyjson::to_compact_string(&value));
        self.views.lock().unwrap_or_else(|e| e.into_inner()).keep(key, version, Instant::now(), body.clone());
        json_response(StatusCode::OK, body)
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = s.version;
        let r = f(&mut s);
        if s.version != before {
            self.version.send_replace(s.version);
        }
        r
    }
}

/// A running dashboard: its address, and its tasks, stopped when this is dropped.
pub struct Dashboard {
    /// The address it listens on.
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Dashboard {
    /// Bind `config.listen` (an error at once if it cannot), then serve, tail events and poll in
    /// background tasks of the current runtime.
    pub async fn start(
        config: DashboardConfig,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
    ) -> Result<Dashboard, DashboardError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| DashboardError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| DashboardError::Bind { addr: config.listen, source })?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, read_only = config.token.is_none(), "the dashboard listens beyond this machine");
        }
        let (version, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            broker,
            backend,
            config,
            version,
            link: Mutex::new(Link::default()),
            polled: watch::channel(None).0,
            file: Mutex::new(None),
            events_tried: watch::channel(false).0,
            views: Mutex::new(Views::default()),
        });
        let app = router(shared.clone());
        let server = tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service).await {
                tracing::error!(error = %e, "the dashboard's server stopped");
            }
        });
        let events = tokio::spawn(tail_events(shared.clone()));
        let poller = tokio::spawn(poll(shared.clone()));
        // "Ready" once the event subscription is up (or has failed, or the broker has no events):
        // before it, a task's events would be lost while the page already answers.
        let mut tried = shared.events_tried.subscribe();
        if tokio::time::timeout(READY_WAIT, tried.wait_for(|t| *t)).await.is_err() {
            tracing::warn!(waited = ?READY_WAIT, "the event subscription is not up yet: events sent meanwhile are not seen");
        }
        tracing::info!(url = %format!("http://{addr}/"), read_only = shared.config.token.is_none(), "dashboard ready");
        Ok(Dashboard { addr, tasks: vec![server, events, poller] })
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/overview", get(overview))
        .route("/api/file", get(file_summary))
        .route("/api/workers", get(|Ax(s): Ax<Arc<Shared>>| async move { s.view("/api/workers", State::workers_json) }))
        .route("/api/queues", get(|Ax(s): Ax<Arc<Shared>>| async move { s.view("/api/queues", State::queues_json) }))
        .route("/api/dead_letters", get(dead_letters))
        .route("/api/charts", get(charts))
        .route("/api/tasks", get(tasks))
        .route("/api/tasks/{id}", get(task))
        .route("/task/{id}", get(task_page))
        .route("/api/stream", get(stream))
        .route("/api/tasks/{id}/revoke", post(revoke))
        .route("/api/tasks/{id}/retry", post(retry))
        .route("/api/queues/{name}/purge", post(purge))
        .route("/api/workers/{node}/pool", post(pool))
        .route("/api/rate_limit", post(rate_limit))
        .with_state(shared)
        .layer(axum::middleware::from_fn(log_action))
        .layer(axum::middleware::map_response(secure))
}

/// One line per action answered: its path (which names the task, queue or worker; a rate
/// limit's task and limit are in its own line) and its outcome, carried out or refused with the
/// status.
async fn log_action(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    if response.status().is_success() {
        tracing::info!(path = %path, status, "dashboard action answered: carried out");
    } else {
        tracing::warn!(path = %path, status, "dashboard action answered: refused");
    }
    response
}

/// Add [`SECURITY_HEADERS`] to an answer.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn reply(status: StatusCode, v: Value) -> Response {
    json_response(status, Bytes::from(celeriac_core::pyjson::to_compact_string(&v)))
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn ok(v: Value) -> Response {
    reply(StatusCode::OK, v)
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    reply(status, json!({"error": why.into()}))
}

/// How long "dashboard ready" waits for the event subscription's first try.
const READY_WAIT: Duration = Duration::from_secs(10);
/// The longest wait between two tries to subscribe to events while polls get through.
const EVENTS_RETRY_MAX: Duration = Duration::from_secs(2);

/// Tail `celeryev` as `celeriac events` does. The subscription follows the poll: it is made
/// while polls get through (at start, before the first), dropped when one fails (the broker went
/// away; the transport's own reconnection waits up to 30 s, and the events sent meanwhile would
/// be lost while the page says "connected"), and made again as soon as a poll gets through; a
/// failed try is retried within [`EVENTS_RETRY_MAX`].
async fn tail_events(shared: Arc<Shared>) {
    let Some(exchanges) = shared.broker.exchanges() else {
        tracing::warn!(broker = %shared.broker.url(), "this broker carries no events: the dashboard shows what it polls");
        shared.link(|l| l.events = Some(None));
        return;
    };
    let spec = celeriac_worker::events::exchange(exchanges.events_as_fanout());
    let mut polled = shared.polled.subscribe();
    let mut backoff = Duration::from_millis(250);
    loop {
        if polled.wait_for(|ok| *ok != Some(false)).await.is_err() {
            return; // The dashboard is gone.
        }
        match exchanges.subscribe(&spec, &celeriac_worker::events::monitor_binding("#")).await {
            Ok(mut sub) => {
                backoff = Duration::from_millis(250);
                shared.link(|l| l.events = Some(None));
                loop {
                    tokio::select! {
                        next = sub.next() => match next {
                            Ok(message) => apply_body(&shared, &message.body),
                            Err(e) => {
                                tracing::debug!(error = %e, "the event subscription ended; subscribing again");
                                shared.link(|l| l.events = Some(Some(e.to_string())));
                                break;
                            }
                        },
                        _ = polled.wait_for(|ok| *ok == Some(false)) => {
                            tracing::debug!("a poll failed: the event subscription is dropped until one gets through");
                            shared.link(|l| l.events = Some(Some("the broker went away".into())));
                            break;
                        }
                    }
                }
                sub.close().await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to events");
                shared.link(|l| l.events = Some(Some(e.to_string())));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(EVENTS_RETRY_MAX);
            }
        }
    }
}

/// Apply one event message (an object, or a list of them as Celery's `task.multi`); each
/// malformed one is skipped with one log line. The events are read as they come
/// ([`state::parse_body`]: their values are read where they are used, strings borrowed from the
/// message), not built into JSON values: at 10,000 tasks a second that was most of the
/// dashboard's time. A body strict JSON refuses is read as Python writes JSON (`NaN`).
fn apply_body(shared: &Shared, body: &[u8]) {
    let items = match state::parse_body(body) {
        Ok(items) => items,
        Err(why) => {
            match celeriac_core::pyjson::from_slice(body) {
                Ok(Value::Object(ev)) => {
                    apply_one(shared, &state::RawEvent::from_map(&ev), || Value::Object(ev.clone()))
                }
                Ok(Value::Array(items)) => shared.with(|s| {
                    for item in items {
                        match &item {
                            Value::Object(ev) => {
                                if let Err(e) = s.apply(&state::RawEvent::from_map(ev)) {
                                    tracing::warn!(event = %item, "malformed event skipped: {e}");
                                }
                            }
                            _ => tracing::warn!(event = %item, "malformed event skipped: not a JSON object"),
                        }
                    }
                }),
                _ => tracing::warn!(bytes = body.len(), "malformed event skipped: {why}"),
            }
            return;
        }
    };
    shared.with(|s| {
        for item in items {
            match item {
                Ok((ev, text)) => {
                    if let Err(why) = s.apply(&ev) {
                        tracing::warn!(event = text, "malformed event skipped: {why}");
                    }
                }
                Err(why) => tracing::warn!("malformed event skipped: {why}"),
            }
        }
    });
}

/// Apply one event read by Python's JSON rules; `shown` is it for the log line if it is refused.
fn apply_one(shared: &Shared, ev: &state::RawEvent<'_>, shown: impl FnOnce() -> Value) {
    if let Err(e) = shared.with(|s| s.apply(ev)) {
        tracing::warn!(event = %shown(), "malformed event skipped: {e}");
    }
}

/// Every [`POLL`]: `stats`, `active`, `active_queues`, `reserved` and `scheduled` from every
/// worker (at once), then queue depths, with what the dashboard adds to them (`fill_queue_rows`).
async fn poll(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut file = crate::connect::sqlite_path(shared.broker.url()).map(file::FileReader::new);
    loop {
        tick.tick().await;
        let mut outcome = poll_once(&shared).await;
        if let (Some(reader), Ok(())) = (file.as_mut(), &outcome) {
            outcome = match reader.poll().await {
                Ok(reading) => {
                    shared.with(|st| {
                        for ev in &reading.events {
                            if let Err(e) = st.apply_event(ev) {
                                tracing::warn!(error = %e, "a row of the SQLite file skipped");
                            }
                        }
                    });
                    *shared.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(reading.summary);
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        if let Err(e) = &outcome {
            tracing::debug!(error = %e, "dashboard poll failed");
        }
        let polled = outcome.is_ok();
        shared.link(|l| l.poll = Some(outcome.err()));
        shared.polled.send_replace(Some(polled));
    }
}

async fn poll_once(shared: &Shared) -> Result<(), String> {
    let broker = shared.broker.as_ref();
    // At once, each with its own reply queue: one reply window per poll, not one per command.
    let methods = ["stats", "active", "active_queues", "reserved", "scheduled"];
    let asked = methods.map(|method| broadcast(broker, method, Map::new(), &[], REPLY_WINDOW));
    for (method, answer) in methods.into_iter().zip(futures::future::join_all(asked).await) {
        match answer {
            Ok(replies) => shared.with(|s| s.apply_replies(method, replies)),
            Err(ControlError::Unsupported(_)) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    let names = if broker.url().starts_with("amqp") {
        let mut names = shared.config.queues.clone();
        names.extend(shared.with(|s| s.known_queues()));
        names.sort();
        names.dedup();
        names
    } else {
        Vec::new()
    };
    let row = |q: &celeriac_core::broker::QueueInfo| serde_json::to_value(q).unwrap_or(Value::Null);
    let queues = if names.is_empty() {
        let listed = broker.queues(&names).await.map_err(|e| e.to_string())?;
        listed.iter().filter(|q| !is_plumbing(&q.name)).map(row).collect()
    } else {
        // One by one, so a queue that does not exist (yet) is shown as such and the others
        // still are; only a broker that does not answer fails the poll.
        let mut rows = Vec::new();
        for name in names {
            match broker.queues(std::slice::from_ref(&name)).await {
                Ok(infos) => rows.extend(infos.iter().map(row)),
                Err(celeriac_core::BrokerError::Rejected { reason, .. }) => {
                    rows.push(json!({"name": name, "error": reason}))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        rows
    };
    let from_workers = broker.url().starts_with("amqp");
    shared.with(|s| {
        let rows = s.fill_queue_rows(queues, from_workers);
        s.set_queues(rows)
    });
    Ok(())
}

/// Queues of remote control and events (kombu's pidbox and event receivers), not of tasks.
fn is_plumbing(queue: &str) -> bool {
    queue.starts_with("celeryev.") || queue.ends_with(".celery.pidbox")
}

/// On an SQLite broker, what its file tells beyond tasks: `{note, consumers: [{consumer, holding,
/// queues}]}` (see [`file`]); `{}` on other brokers.
async fn file_summary(Ax(s): Ax<Arc<Shared>>) -> Response {
    ok(s.file.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| json!({})))
}

async fn overview(Ax(s): Ax<Arc<Shared>>) -> Response {
    s.view("/api/overview", |st| {
        json!({
            "connected": st.connected,
            "error": st.last_error,
            "version": st.version,
            "broker": crate::connect::redact(s.broker.url()),
            "read_only": s.config.token.is_none(),
            "throughput": st.throughput_json(),
        })
    })
}

/// What the charts draw: `{minutes: [{minute, succeeded, failed, runtime: {count, p50, p95,
/// p99}}], runtimes: [{name, count, p50, p95, p99}], depths: {queue: [[t, ready, unacked,
/// scheduled]]}, poll_seconds}`; times in Unix seconds, run times in seconds (see
/// [`State::throughput_json`], [`State::runtimes_json`], [`State::depths_json`]).
async fn charts(Ax(s): Ax<Arc<Shared>>) -> Response {
    s.view("/api/charts", |st| {
        json!({
            "minutes": st.throughput_json(),
            "runtimes": st.runtimes_json(),
            "depths": st.depths_json(),
            "poll_seconds": POLL.as_secs_f64(),
        })
    })
}

/// The 100 most recent dead letters with their reasons (`celeriac dead-letters`), read from the
/// broker on each request; `{"unsupported": reason}` where the transport keeps none (RabbitMQ).
async fn dead_letters(Ax(s): Ax<Arc<Shared>>) -> Response {
    match s.broker.dead_letters(100).await {
        Ok(dead) => ok(json!({"dead_letters": serde_json::to_value(&dead).unwrap_or(Value::Null)})),
        Err(celeriac_core::BrokerError::Rejected { reason, .. }) => {
            ok(json!({"dead_letters": [], "unsupported": reason}))
        }
        Err(e) => refuse(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `key=value&...` with `%XX` and `+` decoded.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn tasks(Ax(s): Ax<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let mut filter = TaskFilter::default();
    let (mut limit, mut offset) = (500, 0);
    for (k, v) in query_pairs(q.as_deref().unwrap_or("")) {
        let v = Some(v).filter(|v| !v.is_empty());
        let whole = |v: Option<String>, what: &str| match v.as_deref().map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n.min(state::MAX_TASKS))),
            Some(Err(_)) => Err(refuse(StatusCode::BAD_REQUEST, format!("{what}: expected a whole number"))),
            None => Ok(None),
        };
        match k.as_str() {
            "state" => match v.map(|v| v.to_uppercase()) {
                Some(st) if !TASK_STATES.contains(&st.as_str()) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        format!("unknown state {st:?}: expected one of {}", TASK_STATES.join(", ")),
                    )
                }
                st => filter.state = st,
            },
            "name" => filter.name = v,
            "worker" => filter.worker = v,
            "id" => filter.id = v,
            "limit" => match whole(v, "limit") {
                Ok(n) => limit = n.unwrap_or(limit),
                Err(r) => return r,
            },
            "offset" => match whole(v, "offset") {
                Ok(n) => offset = n.unwrap_or(0),
                Err(r) => return r,
            },
            other => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("unknown filter {other:?} (state, name, worker, id, limit, offset)"),
                )
            }
        }
    }
    let limit = limit.min(MAX_PAGE);
    // Kept per filter, offset and limit as decoded (two spellings of one query share an answer).
    let key = format!("/api/tasks?{filter:?}&offset={offset}&limit={limit}");
    s.view(&key, |st| {
        let mut answer = st.tasks_json(&filter, offset, limit);
        answer["limit"] = json!(limit);
        answer
    })
}

/// A task from its events, with what the result backend stored for it; `None` if neither knows
/// it. A ready stored state is the task's state, and a stored exception fills what its events
/// did not say (a `task-failed` the dashboard did not get): `exception` as Python's repr of the
/// stored exception, and `traceback`. (A stored value is `stored.result`.)
async fn task_value(s: &Shared, id: &str) -> Option<Value> {
    let mut task = s.with(|st| st.task_json(id));
    let stored = match s.backend.get(id).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(task_id = %id, error = %e, "no stored result");
            None
        }
    };
    if let Some(meta) = stored {
        let t = task.get_or_insert_with(|| json!({"id": id, "child_ids": []}));
        let v = meta.to_value();
        t["stored"] = v;
        if meta.status.is_ready() {
            t["state"] = json!(meta.status.to_string());
            fill_from_stored(t, &meta);
        }
    }
    task
}

/// A ready task's exception and traceback its events did not give, from its stored result.
fn fill_from_stored(t: &mut Value, meta: &celeriac_core::ResultMeta) {
    let unknown = |t: &Value, key: &str| !t[key].is_string();
    if meta.exception_info().is_none() {
        return;
    }
    if unknown(t, "exception") {
        t["exception"] = json!(celeriac_core::canvas::join::exception_repr(&meta.result));
    }
    if let Some(tb) = meta.traceback.as_deref().filter(|_| unknown(t, "traceback")) {
        t["traceback"] = json!(tb);
    }
}

async fn task(Ax(s): Ax<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match task_value(&s, &id).await {
        Some(t) => ok(t),
        // A group's id is no task's: its members, when any is kept (`group_members`, empty if not).
        None => {
            let members = s.with(|st| st.group_members(&id));
            reply(StatusCode::NOT_FOUND, json!({"id": id, "state": "unknown", "group_members": members}))
        }
    }
}

/// `&`, `<`, `>`, `"` and `'` as HTML entities.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The task's page without script: every field as escaped text.
async fn task_page(Ax(s): Ax<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let task = task_value(&s, &id).await;
    let mut rows = String::new();
    match &task {
        Some(Value::Object(fields)) => {
            for (k, v) in fields {
                let v = match v {
                    Value::String(t) => t.clone(),
                    other => celeriac_core::pyjson::to_compact_string(other),
                };
                rows.push_str(&format!(
                    "<tr><th>{}</th><td><pre>{}</pre></td></tr>\n",
                    escape_html(k),
                    escape_html(&v)
                ));
            }
        }
        _ => rows.push_str("<tr><th>state</th><td>unknown</td></tr>\n"),
    }
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>task {id}</title>\
         <link rel=\"stylesheet\" href=\"/style.css\"></head><body><main><h1>Task {id}</h1>\
         <p><a href=\"/#/tasks\">all tasks</a></p><table class=\"fields\">\n{rows}</table></main></body></html>",
        id = escape_html(&id)
    );
    let status = if task.is_some() { StatusCode::OK } else { StatusCode::NOT_FOUND };
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

/// `update` with the state's version ([`versions`]).
async fn stream(Ax(s): Ax<Arc<Shared>>) -> Response {
    let updates = versions(s.version.subscribe())
        .map(|v| Ok::<_, std::convert::Infallible>(Event::default().event("update").data(v.to_string())));
    Sse::new(updates).keep_alive(KeepAlive::default()).into_response()
}

/// The version at once, then whenever it changes, at most one per [`STREAM_INTERVAL`]: a change
/// less than an interval after the last one sent waits for the interval's end, and every change
/// meanwhile goes out as that one (the `watch` keeps only the latest version). Ends when the
/// state is dropped.
fn versions(rx: watch::Receiver<u64>) -> impl futures::Stream<Item = u64> {
    futures::stream::unfold((rx, None), |(mut rx, last): (_, Option<tokio::time::Instant>)| async move {
        if let Some(last) = last {
            rx.changed().await.ok()?;
            tokio::time::sleep_until(last + STREAM_INTERVAL).await;
        }
        let version = *rx.borrow_and_update();
        Some((version, (rx, Some(tokio::time::Instant::now()))))
    })
}

/// Let an action through only with the token, from this server's own page; log who asked.
fn authorize(s: &Shared, headers: &HeaderMap, peer: SocketAddr, action: &str) -> Result<(), Response> {
    let Some(token) = &s.config.token else {
        tracing::warn!(%peer, action, "action refused: the dashboard is read-only (no --auth-token)");
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "read-only: start the dashboard with --auth-token or CELERIAC_DASHBOARD_TOKEN to allow actions",
        ));
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let same = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host);
        if !same {
            tracing::warn!(%peer, action, origin, host, "action refused: cross-origin request");
            return Err(refuse(StatusCode::FORBIDDEN, "cross-origin request refused"));
        }
    }
    let given = headers.get(TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or(b"");
    if !constant_time_eq(given, token.as_bytes()) {
        tracing::warn!(%peer, action, "action refused: missing or wrong token");
        return Err(refuse(StatusCode::FORBIDDEN, format!("a valid token is needed in the {TOKEN_HEADER} header")));
    }
    tracing::info!(%peer, action, "dashboard action");
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request body as a JSON object (an empty body is `{}`).
fn body_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    match celeriac_core::pyjson::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(refuse(StatusCode::BAD_REQUEST, "the body must be a JSON object")),
    }
}

/// An action's JSON object body, once [`authorize`] let the action through.
fn authorized_body(
    s: &Shared,
    headers: &HeaderMap,
    peer: SocketAddr,
    action: &str,
    body: &Bytes,
) -> Result<Map<String, Value>, Response> {
    authorize(s, headers, peer, action)?;
    body_object(body)
}

/// Broadcast an action, valid for [`ACTION_VALID_FOR`]; the replies that came within
/// [`ACTION_REPLY_WINDOW`] (or `awaited`'s window, ended early once that node replied), or 502
/// naming why not. A node awaited that did not reply is named in the answer as `pending`.
async fn act(s: &Shared, method: &str, args: Value, destination: &[String], awaited: Option<&str>) -> Response {
    let args = match args {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // The target as the log line names it: the task ids, task name and limit, or pool size asked.
    let target = Value::Object(args.clone());
    let to = if destination.is_empty() { "every worker".to_string() } else { destination.join(", ") };
    let awaited: Vec<String> = awaited.map(str::to_string).into_iter().collect();
    let timeout = if awaited.is_empty() { ACTION_REPLY_WINDOW } else { TERMINATE_REPLY_WINDOW };
    let wait = Wait { timeout, valid_for: ACTION_VALID_FOR, awaited: &awaited };
    match broadcast_with(s.broker.as_ref(), method, args, destination, wait).await {
        Ok(replies) => {
            let answered: Vec<String> = replies
                .iter()
                .map(|(node, r)| format!("{node}: {}", r.get("ok").or_else(|| r.get("error")).unwrap_or(r)))
                .collect();
            let pending: Vec<&String> = awaited.iter().filter(|a| !replies.iter().any(|(n, _)| n == *a)).collect();
            tracing::info!(
                action = method,
                %target,
                to,
                replies = %answered.join("; "),
                pending = ?pending,
                "dashboard action carried out"
            );
            let mut answer = json!({
                "replies": replies.iter().cloned().collect::<Map<String, Value>>(),
                "valid_for": ACTION_VALID_FOR.as_secs(),
            });
            if !pending.is_empty() {
                answer["pending"] = json!(pending);
            }
            ok(answer)
        }
        Err(e) => {
            tracing::warn!(action = method, %target, to, status = 502, error = %e, "dashboard action refused");
            refuse(StatusCode::BAD_GATEWAY, e.to_string())
        }
    }
}

type Caller = ConnectInfo<SocketAddr>;

async fn revoke(
    Ax(s): Ax<Arc<Shared>>,
    ConnectInfo(peer): Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let args = match authorized_body(&s, &headers, peer, "revoke", &body) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let terminate = match args.get("terminate") {
        None => false,
        Some(Value::Bool(t)) => *t,
        Some(other) => return refuse(StatusCode::BAD_REQUEST, format!("terminate must be true or false, not {other}")),
    };
    tracing::info!(%peer, task_id = %id, terminate, "revoke asked from the dashboard");
    let remote_control = s.broker.exchanges().is_some();
    if !remote_control && (terminate || !s.backend.keeps_revokes()) {
        // Refused before anything is recorded: without remote control only the result backend's
        // record reaches the workers, and that record cannot terminate a running task.
        let why = if terminate {
            "terminate needs remote control (an amqp:// or redis:// broker); a plain revoke is recorded in the result backend"
        } else {
            "revoke needs remote control (an amqp:// or redis:// broker) or a result backend that keeps revokes"
        };
        tracing::warn!(%peer, task_id = %id, terminate, status = 400, "revoke refused: {why}");
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    if s.backend.keeps_revokes() {
        if let Err(e) = s.backend.record_revokes(std::slice::from_ref(&id), celeriac_core::backend::unix_now()).await {
            tracing::warn!(%peer, task_id = %id, error = %e, status = 502, "revoke refused: cannot record it");
            return refuse(StatusCode::BAD_GATEWAY, format!("cannot record the revoke: {e}"));
        }
        if !remote_control {
            tracing::info!(%peer, task_id = %id, "revoke recorded in the result backend (no remote control on this broker)");
            return ok(json!({
                "recorded": "recorded in the result backend; workers apply it when they next read it (this broker has no remote control)"
            }));
        }
    }
    // Every worker records the revoke (a redelivered copy is discarded wherever it lands); a
    // terminate waits longer for the worker running the task, and no longer than its reply.
    let holder = if terminate { s.with(|st| st.holder(&id)) } else { None };
    let args = json!({"task_id": [id], "terminate": terminate, "signal": "SIGTERM"});
    act(&s, "revoke", args, &[], holder.as_deref()).await
}

/// Send a task again with the same name and arguments, as a new task; to the queue in the body
/// (`{"queue": "q"}`), else the one its events named, else the one queue its worker consumes.
async fn retry(
    Ax(s): Ax<Arc<Shared>>,
    ConnectInfo(peer): Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let asked = match authorized_body(&s, &headers, peer, "retry", &body) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(task) = task_value(&s, &id).await else {
        return refuse(StatusCode::NOT_FOUND, format!("task {id} is unknown"));
    };
    let Some(name) = task["name"].as_str().map(str::to_string) else {
        return refuse(StatusCode::CONFLICT, "the task's name is not known (no task-received event was seen)");
    };
    let (args, kwargs) = match (py_literal(task["args"].as_str()), py_literal(task["kwargs"].as_str())) {
        (Some(Value::Array(a)), Some(Value::Object(k))) => (a, k),
        _ => {
            return refuse(
                StatusCode::CONFLICT,
                format!(
                    "the task's arguments are known only as Python reprs ({} / {}), which are not plain literals; \
                     resend it with `celeriac send`",
                    task["args"], task["kwargs"]
                ),
            )
        }
    };
    let named = |v: &Value| v.as_str().filter(|q| !q.is_empty()).map(str::to_string);
    let queue = named(asked.get("queue").unwrap_or(&Value::Null))
        .or_else(|| named(&task["queue"]))
        .or_else(|| named(&task["routing_key"]))
        .or_else(|| {
            let worker = task["worker"].as_str().unwrap_or("");
            let queues = s.with(|st| st.worker_queues(worker));
            (queues.len() == 1).then(|| queues[0].clone())
        });
    let Some(queue) = queue else {
        return refuse(
            StatusCode::CONFLICT,
            "the task's queue is not known (its worker consumes several, or none was seen): say which, {\"queue\": \"name\"}",
        );
    };
    let client = crate::Client::new(s.broker.clone(), s.backend.clone());
    let options = crate::client::SendOptions { queue: Some(queue.clone()), ..Default::default() };
    match client.send_task(&name, args, kwargs, options).await {
        Ok(sent) => {
            tracing::info!(%peer, task_id = %id, new_id = %sent.id(), task_name = %name, "retried from the dashboard");
            // What was sent is known here: the new task is listed at once, with its name and
            // arguments, whether or not a worker's events about it arrive.
            let ev = json!({
                "type": "task-sent",
                "hostname": "",
                "uuid": sent.id(),
                "name": name,
                "args": task["args"],
                "kwargs": task["kwargs"],
                "queue": queue,
                "timestamp": state::now(),
            });
            let listed = ev.as_object().map(|ev| s.with(|st| st.apply_event(ev)));
            if let Some(Err(e)) = listed {
                tracing::warn!(task_id = %sent.id(), error = %e, "the retried task could not be listed");
            }
            ok(json!({"task_id": sent.id()}))
        }
        Err(e) => refuse(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// A Python repr of plain literals (`(1, 'a', None)`, `{'x': [True]}`) as JSON: tuples become
/// lists; anything else (objects, sets, bytes) is `None`.
fn py_literal(text: Option<&str>) -> Option<Value> {
    let text = text?.trim();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| -> Option<()> {
        if !word.is_empty() {
            match word.as_str() {
                "True" => out.push_str("true"),
                "False" => out.push_str("false"),
                "None" => out.push_str("null"),
                w if w.parse::<f64>().is_ok() => out.push_str(w),
                _ => return None,
            }
            word.clear();
        }
        Some(())
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                flush(&mut word, &mut out)?;
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => match chars.next()? {
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            '\\' => s.push('\\'),
                            '\'' => s.push('\''),
                            '"' => s.push('"'),
                            _ => return None,
                        },
                        q if q == c => break,
                        other => s.push(other),
                    }
                }
                out.push_str(&serde_json::to_string(&s).ok()?);
            }
            '(' => {
                flush(&mut word, &mut out)?;
                out.push('[');
            }
            ')' => {
                flush(&mut word, &mut out)?;
                // `(1,)`: a one-tuple's trailing comma.
                if out.ends_with(',') {
                    out.pop();
                }
                out.push(']');
            }
            '[' | ']' | '{' | '}' | ',' | ':' => {
                flush(&mut word, &mut out)?;
                out.push(c);
            }
            c if c.is_whitespace() => flush(&mut word, &mut out)?,
            c => word.push(c),
        }
    }
    flush(&mut word, &mut out)?;
    celeriac_core::pyjson::from_str(&out).ok()
}

async fn purge(
    Ax(s): Ax<Arc<Shared>>,
    ConnectInfo(peer): Caller,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = authorize(&s, &headers, peer, "purge") {
        return r;
    }
    // Redis and SQLite purge a queue they do not have as an empty one; they list theirs, so an
    // unknown name is said to be one (RabbitMQ refuses it itself, below).
    if !s.broker.url().starts_with("amqp") {
        if let Ok(listed) = s.broker.queues(&[]).await {
            if !listed.iter().any(|q| q.name == name) {
                let names: Vec<&str> = listed.iter().map(|q| q.name.as_str()).filter(|q| !is_plumbing(q)).collect();
                return refuse(
                    StatusCode::NOT_FOUND,
                    format!("no queue {name} on this broker (queues: {})", names.join(", ")),
                );
            }
        }
    }
    match s.broker.purge(&name).await {
        Ok(n) => {
            tracing::info!(%peer, queue = %name, purged = n, "queue purged from the dashboard");
            ok(json!({"purged": n}))
        }
        // RabbitMQ closes the channel with 404 NOT_FOUND for a queue it does not have.
        Err(celeriac_core::BrokerError::Rejected { reason, .. }) if reason.contains("NOT_FOUND") => {
            refuse(StatusCode::NOT_FOUND, format!("no queue {name} on this broker ({reason})"))
        }
        Err(celeriac_core::BrokerError::Rejected { reason, .. }) => {
            refuse(StatusCode::CONFLICT, format!("the broker refused to purge {name}: {reason}"))
        }
        Err(e) => refuse(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `None` when every worker named was seen; else a 404 naming the unknown one and those known.
fn unknown_worker(s: &Shared, nodes: &[String]) -> Option<Response> {
    let (missing, all) = s.with(|st| (nodes.iter().find(|n| !st.knows_worker(n)).cloned(), st.worker_names()));
    missing.map(|node| {
        let all = if all.is_empty() { "none yet".to_string() } else { all.join(", ") };
        refuse(StatusCode::NOT_FOUND, format!("no worker {node} (workers seen: {all})"))
    })
}

async fn pool(
    Ax(s): Ax<Arc<Shared>>,
    ConnectInfo(peer): Caller,
    headers: HeaderMap,
    Path(node): Path<String>,
    body: Bytes,
) -> Response {
    let args = match authorized_body(&s, &headers, peer, "pool", &body) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let (method, n) = match (args.get("grow").and_then(Value::as_u64), args.get("shrink").and_then(Value::as_u64)) {
        (Some(n), None) => ("pool_grow", n),
        (None, Some(n)) => ("pool_shrink", n),
        _ => return refuse(StatusCode::BAD_REQUEST, "expected {\"grow\": n} or {\"shrink\": n}"),
    };
    let node = [node];
    if let Some(refused) = unknown_worker(&s, &node) {
        return refused;
    }
    tracing::info!(%peer, worker = %node[0], method, n, "pool change asked from the dashboard");
    act(&s, method, json!({"n": n}), &node, None).await
}

async fn rate_limit(Ax(s): Ax<Arc<Shared>>, ConnectInfo(peer): Caller, headers: HeaderMap, body: Bytes) -> Response {
    let args = match authorized_body(&s, &headers, peer, "rate_limit", &body) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let task_name = args.get("task_name").and_then(Value::as_str).filter(|t| !t.trim().is_empty());
    let (Some(task_name), Some(limit)) = (task_name, args.get("rate_limit")) else {
        return refuse(StatusCode::BAD_REQUEST, "expected {\"task_name\": ..., \"rate_limit\": \"10/m\"}");
    };
    // Checked here as the worker checks it (Celery's `celery/utils/time.py` `rate`), so a bad
    // limit is one 400 before anything is broadcast, not each worker's error.
    let text = match limit {
        Value::String(t) => t.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => format!("{other}"),
    };
    let limit_ok = matches!(limit, Value::String(_) | Value::Number(_) | Value::Null);
    if let Err(why) = celeriac_worker::state::parse_rate(&text).and_then(|r| match limit_ok {
        true => Ok(r),
        false => Err(format!("{text} is not a rate limit (e.g. 10/s, 100/m, 1000/h)")),
    }) {
        tracing::warn!(%peer, task_name, rate_limit = %limit, status = 400, "rate limit refused: {why}");
        return refuse(StatusCode::BAD_REQUEST, format!("invalid rate limit: {why}"));
    }
    let destination: Vec<String> = args.get("worker").and_then(Value::as_str).map(str::to_string).into_iter().collect();
    if let Some(refused) = unknown_worker(&s, &destination) {
        return refused;
    }
    tracing::info!(%peer, task_name, rate_limit = %limit, "rate limit set from the dashboard");
    act(&s, "rate_limit", json!({"task_name": task_name, "rate_limit": limit}), &destination, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_outcome_fills_what_the_events_did_not_say_and_never_what_they_did() {
        use celeriac_core::{ExceptionInfo, ResultMeta, TaskState};
        let exc = ExceptionInfo::new("RuntimeError", "boom <b>", "builtins");
        let failed = ResultMeta::exception("t1", TaskState::Failure, &exc, Some("Traceback …\nRuntimeError".into()));
        // Seen started, its task-failed not received.
        let mut t = json!({"id": "t1", "state": "FAILURE", "name": "celeriac.fail"});
        fill_from_stored(&mut t, &failed);
        assert_eq!(t["exception"], json!("RuntimeError('boom <b>')"));
        assert_eq!(t["traceback"], json!("Traceback …\nRuntimeError"));
        // What an event said stays.
        let mut t = json!({"exception": "RuntimeError('from the event')", "traceback": "tb"});
        fill_from_stored(&mut t, &failed);
        assert_eq!((&t["exception"], &t["traceback"]), (&json!("RuntimeError('from the event')"), &json!("tb")));
        // A success's value is `stored.result` only.
        let mut t = json!({});
        fill_from_stored(&mut t, &ResultMeta::success("t2", json!({"a": [1, null]})));
        assert_eq!(t, json!({}));
    }

    #[test]
    fn python_literal_reprs_read_as_json() {
        assert_eq!(py_literal(Some("(1, 'a', None, True)")), Some(json!([1, "a", null, true])));
        assert_eq!(py_literal(Some("(5,)")), Some(json!([5])));
        assert_eq!(py_literal(Some("{'x': [1.5, \"it's\"]}")), Some(json!({"x": [1.5, "it's"]})));
        assert_eq!(py_literal(Some("[<object at 0x1>]")), None);
        assert_eq!(py_literal(Some("{1, 2}")), None);
    }

    #[test]
    fn remote_control_and_event_queues_are_not_shown() {
        assert!(is_plumbing("celeryev.2c9b2475") && is_plumbing("w@h.celery.pidbox"));
        assert!(is_plumbing("abc.reply.celery.pidbox") && !is_plumbing("celery") && !is_plumbing("images"));
    }

    #[test]
    fn queries_and_html_are_decoded_and_escaped() {
        assert_eq!(
            query_pairs("state=FAILURE&name=a%2Eb+c"),
            vec![("state".into(), "FAILURE".into()), ("name".into(), "a.b c".into())]
        );
        assert_eq!(escape_html("<script>'&\"</script>"), "&lt;script&gt;&#39;&amp;&quot;&lt;/script&gt;");
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_sends_one_update_a_second_while_busy_and_at_once_after_quiet() {
        use tokio::time::Instant;
        let (tx, rx) = watch::channel(0u64);
        let mut updates = Box::pin(versions(rx));
        let t0 = Instant::now();
        assert_eq!(updates.next().await, Some(0));
        assert_eq!(t0.elapsed(), Duration::ZERO, "the first update goes at once");
        // A busy second: a change every millisecond, sent as one update at the interval's end.
        let busy = tokio::spawn(async move {
            for v in 1..=2500 {
                tx.send_replace(v);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tx
        });
        let mut sent = Vec::new();
        while let Some(v) = updates.next().await {
            sent.push((t0.elapsed(), v));
            if v == 2500 {
                break;
            }
        }
        // (The paused clock fires a timer at the millisecond tick after its deadline.)
        let on_time = |at: Duration, s: u64| at >= Duration::from_secs(s) && at < Duration::from_millis(s * 1000 + 5);
        assert_eq!(sent.len(), 3, "one update per second over 2.5 s: {sent:?}");
        assert!(sent.iter().zip(1..).all(|(s, n)| on_time(s.0, n)), "at 1, 2 and 3 s: {sent:?}");
        assert!(sent.windows(2).all(|w| w[0].1 < w[1].1), "each the latest version: {sent:?}");
        // After a quiet time, a change goes out at once.
        let tx = busy.await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let quiet = Instant::now();
        tx.send_replace(9000);
        assert_eq!(updates.next().await, Some(9000));
        assert!(quiet.elapsed() < Duration::from_millis(5), "at once: {:?}", quiet.elapsed());
        drop(tx);
        assert_eq!(updates.next().await, None, "the stream ends with the state");
    }

    #[test]
    fn an_answer_is_reused_at_its_version_for_under_a_second() {
        let t0 = Instant::now();
        let mut views = Views::default();
        views.keep("/api/workers", 7, t0, Bytes::from_static(b"[1]"));
        assert_eq!(views.fresh("/api/workers", 7, t0 + Duration::from_millis(900)).as_deref(), Some(&b"[1]"[..]));
        assert_eq!(views.fresh("/api/workers", 8, t0), None, "another version is built again");
        assert_eq!(views.fresh("/api/workers", 7, t0 + VIEW_MAX_AGE), None, "ages go stale");
        assert_eq!(views.fresh("/api/queues", 7, t0), None);
        // A newer version drops the older answers; an older one is not kept over a newer.
        views.keep("/api/queues", 8, t0, Bytes::from_static(b"[2]"));
        assert_eq!(views.fresh("/api/workers", 7, t0), None);
        views.keep("/api/workers", 7, t0, Bytes::from_static(b"[1]"));
        assert_eq!(views.kept.len(), 1);
        assert!(views.fresh("/api/queues", 8, t0).is_some());
        // Bounded: distinct filters at one version.
        for i in 0..3 * VIEWS_KEPT {
            views.keep(&format!("/api/tasks?id={i}"), 8, t0, Bytes::from_static(b"{}"));
            assert!(views.kept.len() <= VIEWS_KEPT);
        }
    }
}
