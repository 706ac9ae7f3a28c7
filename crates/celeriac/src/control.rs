//! The remote-control client: broadcast a command to workers (celeriac's or Python Celery's) and
//! collect their replies, as `celery inspect` / `celery control` do.
//!
//! [`broadcast`] binds a reply queue `<oid>.reply.celery.pidbox` to the direct exchange
//! `reply.celery.pidbox` (routing key `<oid>`), publishes `{"method", "arguments",
//! "destination", "pattern", "matcher", "ticket", "reply_to"}` to the fanout exchange
//! `celery.pidbox` with the headers `clock` and `expires`, and gathers the replies carrying its
//! ticket until the timeout passes (or, with a destination, every named node has answered). The
//! wire format is kombu's (`kombu/pidbox.py`); the worker's side is
//! [`celeriac_worker::control`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = celeriac::connect::broker("amqp://guest:guest@127.0.0.1:5672//")?;
//! let replies = celeriac::control::broadcast(
//!     broker.as_ref(), "ping", serde_json::Map::new(), &[], std::time::Duration::from_secs(1),
//! ).await?;
//! for (node, reply) in replies {
//!     println!("{node}: {reply}");
//! }
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use celeriac_core::{Broker, BrokerError};
use celeriac_worker::control::{json_message, mailbox_binding, pidbox_exchange, reply_exchange};
use serde_json::{json, Map, Value};

/// Why a broadcast could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The broker has no exchanges to broadcast on (the embedded SQLite broker).
    #[error("remote control needs an amqp:// or redis:// broker; {0} has no broadcast exchanges")]
    Unsupported(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Broadcast `method` with `arguments` to the workers named in `destination` (every worker when
/// empty), and return each node's reply, in the order they came, within `timeout`. The request
/// expires for the workers when the timeout passes, as kombu's pidbox sets it
/// (`kombu/pidbox.py`, `Mailbox._publish`: `expires` = now + timeout).
pub async fn broadcast(
    broker: &dyn Broker,
    method: &str,
    arguments: Map<String, Value>,
    destination: &[String],
    timeout: Duration,
) -> Result<Vec<(String, Value)>, ControlError> {
    let wait = Wait { timeout, valid_for: timeout, awaited: &[] };
    broadcast_with(broker, method, arguments, destination, wait).await
}

/// How long [`broadcast_with`] waits for replies, and how long its request stays valid.
#[derive(Debug, Clone, Copy)]
pub struct Wait<'a> {
    /// The longest it gathers replies.
    pub timeout: Duration,
    /// The request's `expires` header, from now: a worker that reads it later drops it unread.
    /// Longer than `timeout` for a request that must not be lost to a worker busy for a few
    /// seconds (a revoke): the caller stops waiting, the workers still carry it out.
    pub valid_for: Duration,
    /// Stop gathering as soon as every node named here has replied (with a `destination`, when
    /// every named node has; with neither, at the timeout).
    pub awaited: &'a [String],
}

/// [`broadcast`] with the wait and the validity apart: each node's reply, in the order they came.
pub async fn broadcast_with(
    broker: &dyn Broker,
    method: &str,
    arguments: Map<String, Value>,
    destination: &[String],
    wait: Wait<'_>,
) -> Result<Vec<(String, Value)>, ControlError> {
    let Wait { timeout, valid_for, awaited } = wait;
    let exchanges = broker.exchanges().ok_or_else(|| ControlError::Unsupported(broker.url().to_string()))?;
    let oid = uuid::Uuid::new_v4().to_string();
    let ticket = uuid::Uuid::new_v4().to_string();
    let reply_ex = reply_exchange();
    let reply_queue = format!("{oid}.{}", reply_ex.name);
    let mut replies = exchanges.subscribe(&reply_ex, &mailbox_binding(reply_queue, oid.clone())).await?;
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    let body = json!({
        "method": method,
        "arguments": arguments,
        "destination": if destination.is_empty() { Value::Null } else { json!(destination) },
        "pattern": null,
        "matcher": null,
        "ticket": ticket,
        "reply_to": {"exchange": reply_ex.name, "routing_key": oid},
    });
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(1));
    headers.insert("expires".into(), json!(now + valid_for.as_secs_f64()));
    let sent = exchanges.publish_to(&pidbox_exchange(), "", &json_message(&body, headers)).await;
    if let Err(e) = sent {
        replies.close().await;
        return Err(e.into());
    }
    let deadline = Instant::now() + timeout;
    let mut out: Vec<(String, Value)> = Vec::new();
    let awaited = if awaited.is_empty() { destination } else { awaited };
    while awaited.is_empty() || !awaited.iter().all(|node| out.iter().any(|(n, _)| n == node)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left, replies.next()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reply queue closed");
                break;
            }
            Err(_) => break,
        };
        if message.headers.get("ticket").and_then(Value::as_str).is_some_and(|t| t != ticket) {
            continue;
        }
        match celeriac_core::pyjson::from_slice(&message.body) {
            Ok(Value::Object(nodes)) => out.extend(nodes),
            _ => tracing::warn!("ignored a reply that is not a JSON object"),
        }
    }
    replies.close().await;
    Ok(out)
}
