//! Log output for the CLI: human text or one JSON object per line (`--log-format json`).
//!
//! Text is tracing-subscriber's `fmt` output, spans inline (`task{id=.. name=..}: task succeeded`).
//! JSON lines are flat objects a log pipeline can index without knowing tracing's span model:
//!
//! ```json
//! {"ts":"2026-11-25T15:40:01.123456Z","level":"INFO","msg":"task succeeded","pid":4242,
//!  "hostname":"celeriac@web1","task_id":"6f1e..","task_name":"celeriac.add","queue":"celery",
//!  "runtime":"1.2ms"}
//! ```
//!
//! Every line has `ts`, `level`, `msg`, `target`, `pid` (the process that wrote it: in the
//! prefork pool a child writes its own lines to the shared stderr, with its own pid) and, once the
//! worker has a node name, `hostname`. Fields of the enclosing spans come next, outermost first,
//! then the event's own; a span's `id` and `name` fields are prefixed with the span's name
//! (`task{id, name}` gives `task_id`, `task_name`), so they never collide with other spans' fields.

use std::io::Write;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The worker's node name, added to every JSON line once set.
static HOSTNAME: OnceLock<String> = OnceLock::new();

/// Name the worker in every later JSON line (set once; later calls are ignored).
pub fn set_hostname(hostname: &str) {
    let _ = HOSTNAME.set(hostname.to_string());
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The flag's spelling (`text`, `json`), as handed to pool children.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    /// Parse the spelling from the environment of a pool child; anything else is text.
    pub fn from_env_value(v: &str) -> Self {
        if v.eq_ignore_ascii_case("json") {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// Check a `--loglevel` value (`info`, `DEBUG`, or a filter such as `celeriac_worker=debug`).
pub fn check_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map(|_| ())
        .map_err(|e| format!("--loglevel {level:?} is not a level (error, warn, info, debug, trace): {e}"))
}

/// Install the global subscriber. `CELERIAC_LOG`, if set, overrides `level` as a filter.
pub fn init(level: &str, format: LogFormat) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CELERIAC_LOG")
        .or_else(|_| EnvFilter::builder().parse(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(ExpectedRefusals);
    match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            let text = tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
                .with_writer(std::io::stderr);
            let _ = registry.with(text).try_init();
        }
        LogFormat::Json => {
            let _ = registry.with(JsonLines::stderr()).try_init();
        }
    }
}

/// Set by `celeriac dashboard`, which reports the broker's loss and return itself (one line
/// each): lapin's own lines, and the subscriptions' lines about their reconnection
/// ([`SUBSCRIPTION_LINES`]), would repeat it for each connection and each try, and are dropped.
static QUIET_LAPIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a subscription (`celeriac_amqp::exchanges`, `celeriac_redis::broker::exchanges`) logs
/// about its connection: (target, message).
const SUBSCRIPTION_LINES: [(&str, &str); 6] = [
    ("celeriac_amqp::exchanges", "subscription lost its connection"),
    ("celeriac_amqp::exchanges", "cannot resubscribe"),
    ("celeriac_amqp::exchanges", "subscription restored"),
    ("celeriac_redis::broker::exchanges", "lost the Redis connection; reconnecting"),
    ("celeriac_redis::broker::exchanges", "cannot resubscribe"),
    ("celeriac_redis::broker::exchanges", "subscription restored"),
];

/// Drop the connection lines of lapin and of subscriptions from now on (see [`QUIET_LAPIN`]).
pub(crate) fn quiet_lapin() {
    QUIET_LAPIN.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Once [`quiet_lapin`] was called: whether `event` is a connection line of a subscription.
fn subscription_line(event: &Event<'_>) -> bool {
    let target = event.metadata().target();
    if !SUBSCRIPTION_LINES.iter().any(|(t, _)| *t == target) {
        return false;
    }
    struct Message(String);
    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }
    let mut message = Message(String::new());
    event.record(&mut message);
    SUBSCRIPTION_LINES.iter().any(|(t, m)| *t == target && message.0 == *m)
}

/// Drops every lapin line and the subscriptions' connection lines once [`quiet_lapin`] was
/// called, and lapin's ERROR line for a channel the server closed with `RESOURCE_LOCKED` on a beat
/// lease queue (`celeriac.lease.*`): that is a follower beat asking for the lease the leader
/// holds, once a third of the term, and the answer is "not the leader", not an error (the beat
/// logs leadership changes itself). Every other channel close is still logged.
struct ExpectedRefusals;

impl<S: Subscriber> Layer<S> for ExpectedRefusals {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let quiet = QUIET_LAPIN.load(std::sync::atomic::Ordering::Relaxed);
        if !event.metadata().target().starts_with("lapin") {
            return !(quiet && subscription_line(event));
        }
        if quiet {
            return false;
        }
        struct Find(bool);
        impl Visit for Find {
            fn record_debug(&mut self, _field: &Field, value: &dyn std::fmt::Debug) {
                let text = format!("{value:?}");
                self.0 |= text.contains("RESOURCE_LOCKED") && text.contains("celeriac.lease.");
            }
        }
        let mut found = Find(false);
        event.record(&mut found);
        !found.0
    }
}

/// Where finished lines go.
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// The JSON line writer (see the module documentation).
struct JsonLines {
    sink: Sink,
}

impl JsonLines {
    fn stderr() -> Self {
        // One write per line: lines from concurrent threads (and from pool children sharing the
        // stream) never interleave within a line.
        JsonLines { sink: Box::new(|line| drop(std::io::stderr().lock().write_all(line))) }
    }
}

/// A span's fields, kept in its extensions.
struct SpanFields(Map<String, Value>);

/// Collects fields into a JSON map, naming them through `key`.
struct Collect<'a> {
    map: &'a mut Map<String, Value>,
    prefix: Option<&'a str>,
}

impl Collect<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        let key = match (self.prefix, name) {
            (Some(span), "id" | "name") => format!("{span}_{name}"),
            (None, "message") => "msg".to_string(),
            _ => name.to_string(),
        };
        self.map.insert(key, value);
    }
}

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

impl<S> Layer<S> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut map = Map::new();
        attrs.record(&mut Collect { map: &mut map, prefix: Some(span.name()) });
        span.extensions_mut().insert(SpanFields(map));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(map)) = ext.get_mut::<SpanFields>() {
            values.record(&mut Collect { map, prefix: Some(span.name()) });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "ts".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("msg".into(), Value::String(String::new()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        line.insert("pid".into(), Value::from(std::process::id()));
        if let Some(h) = HOSTNAME.get() {
            line.insert("hostname".into(), Value::String(h.clone()));
        }
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut Collect { map: &mut line, prefix: None });
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        (self.sink)(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn levels_are_checked() {
        assert!(check_level("info").is_ok());
        assert!(check_level("INFO").is_ok());
        assert!(check_level("celeriac_worker=debug,warn").is_ok());
        assert!(check_level("loud=[").is_err());
    }

    #[test]
    fn json_lines_flatten_task_spans() {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let layer = JsonLines { sink: Box::new(move |l| sink.lock().unwrap().extend_from_slice(l)) };
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let span =
                tracing::error_span!("task", id = "abc", name = "celeriac.add", child_pid = tracing::field::Empty);
            let _g = span.enter();
            span.record("child_pid", 77u64);
            tracing::info!(runtime = 3u64, "task succeeded");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["msg"], "task succeeded");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["task_id"], "abc");
        assert_eq!(line["task_name"], "celeriac.add");
        assert_eq!(line["child_pid"], 77);
        assert_eq!(line["runtime"], 3);
        assert_eq!(line["pid"], std::process::id());
    }
}
