//! `celeriac events`: tail the events workers send on `celeryev`, celeriac's and Celery's alike.
//!
//! It binds its own queue as Celery's event receiver does (`celeryev.<uuid>`, auto-deleted, short
//! TTL), so it sees events from the moment it starts, and prints one line per event:
//!
//! ```text
//! 15:40:01.123  celeriac@web1  task-succeeded  6f1e…  result='ok' runtime=0.0012
//! ```
//!
//! or each event's JSON body as it came (`--json`).

use std::process::ExitCode;

use clap::Args;
use serde_json::{Map, Value};

use super::{CliError, CliResult};
use crate::connect;
use celeriac_worker::events;

#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// Only events whose routing key matches this pattern (`task.#`, `worker.heartbeat`).
    #[arg(long = "routing-key", default_value = "#")]
    routing_key: String,
    /// Print each event's JSON body.
    #[arg(long)]
    json: bool,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

/// Fields every event has, left out of the readable line.
const COMMON: [&str; 12] = [
    "hostname",
    "utcoffset",
    "pid",
    "clock",
    "timestamp",
    "type",
    "uuid",
    "traceback",
    "sw_ident",
    "sw_ver",
    "sw_sys",
    "local_received",
];

/// One readable line for an event.
pub(crate) fn format_event(ev: &Map<String, Value>) -> String {
    let s = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let time = ev
        .get("timestamp")
        .and_then(Value::as_f64)
        .and_then(|t| chrono::DateTime::from_timestamp_micros((t * 1e6) as i64))
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "-".into());
    let mut line = format!("{time}  {}  {}", s("hostname"), s("type"));
    if let Some(id) = ev.get("uuid").and_then(Value::as_str) {
        line.push_str("  ");
        line.push_str(id);
    }
    let mut first = true;
    for (k, v) in ev {
        if COMMON.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        line.push_str(if first { "  " } else { " " });
        first = false;
        match v {
            Value::String(text) => line.push_str(&format!("{k}={text}")),
            other => line.push_str(&format!("{k}={other}")),
        }
    }
    line
}

pub(crate) async fn run(broker_url: &str, args: EventsArgs) -> CliResult {
    let broker = connect::broker(broker_url)?;
    let Some(exchanges) = broker.exchanges() else {
        return Err(CliError::usage(format!(
            "the broker {} has no exchanges to carry events (use RabbitMQ or Redis)",
            broker.url()
        )));
    };
    let spec = events::exchange(exchanges.events_as_fanout());
    let mut sub = exchanges.subscribe(&spec, &events::monitor_binding(&args.routing_key)).await?;
    eprintln!("listening for events on {} (Ctrl-C to stop)", broker.url());
    let mut seen = 0u64;
    let outcome = loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => break Err(CliError::from(e)),
        };
        for ev in events::bodies(&message.body) {
            if args.json {
                println!("{}", Value::Object(ev));
            } else {
                println!("{}", format_event(&ev));
            }
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                sub.close().await;
                return Ok(ExitCode::SUCCESS);
            }
        }
    };
    sub.close().await;
    outcome.map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_one_line() {
        let ev: Map<String, Value> = serde_json::from_str(
            r#"{"hostname":"w@h","utcoffset":0,"pid":1,"clock":4,"uuid":"abc","result":"3","runtime":0.5,
                "timestamp":1764085201.5,"type":"task-succeeded"}"#,
        )
        .unwrap();
        assert_eq!(format_event(&ev), "15:40:01.500  w@h  task-succeeded  abc  result=3 runtime=0.5");
    }
}
