//! kombu's virtual exchanges on Redis, so remote control and events reach Python too.
//!
//! What kombu 5.7's Redis transport does, and so what is done here:
//! - **Bindings** live in the set `_kombu.binding.<exchange>` as
//!   `<routing key>\x06\x16<pattern>\x06\x16<queue>` (the pattern is the regular expression kombu
//!   derives from a topic binding key, empty otherwise). Subscribing adds the member; closing an
//!   auto-delete subscription removes it and the queue's lists, as kombu's `queue_delete` does.
//! - **Fanout** goes over pub/sub: publishing is `PUBLISH /<db>.<exchange>` of the JSON envelope
//!   ([`keys::fanout_channel`]); a subscriber `PSUBSCRIBE`s to that name. Nothing is stored, so a
//!   subscriber only sees what is published while it is connected.
//! - **Direct and topic** exchanges route by the binding set: publishing reads it, picks the
//!   queues whose routing key is equal (direct) or whose binding key matches as kombu's regular
//!   expressions do (topic, [`keys::topic_matches`]), and `LPUSH`es the envelope onto each queue's
//!   list (its priority sublist, as a task). A subscriber pops with `BRPOP` and does not
//!   acknowledge (kombu's `no_ack` consumers record nothing in `unacked`).
//!
//! A subscription runs in a background task that reconnects with a capped backoff (0.25 s
//! doubling to 10 s) when Redis goes away.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::broadcast::{Binding, ExchangeKind, ExchangeSpec, ForwardedSubscription};
use celeriac_core::{envelope, BrokerError, Message};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use super::{keys, Inner, BRPOP_TIMEOUT};
use crate::conn::Failure;

/// The binding-set member of a binding to an exchange of this kind.
fn member(kind: ExchangeKind, binding: &Binding) -> String {
    let pattern = match kind {
        ExchangeKind::Topic => keys::topic_pattern(&binding.routing_key),
        ExchangeKind::Direct | ExchangeKind::Fanout => String::new(),
    };
    keys::binding_member(&binding.routing_key, &pattern, &binding.queue)
}

/// Publish to an exchange as kombu's virtual exchange of that kind delivers.
pub(crate) async fn publish_to(
    inner: &Inner,
    exchange: &ExchangeSpec,
    routing_key: &str,
    message: &Message,
) -> Result<(), BrokerError> {
    let tag = uuid::Uuid::new_v4().to_string();
    let payload = envelope::encode(message, &exchange.name, routing_key, &tag);
    if exchange.kind == ExchangeKind::Fanout {
        let channel = keys::fanout_channel(inner.config.server.db, &exchange.name, routing_key);
        let (channel, payload) = (&channel, &payload);
        return inner
            .redis
            .run(|mut conn| async move { redis::cmd("PUBLISH").arg(channel).arg(payload).exec_async(&mut conn).await })
            .await
            .map_err(|e| inner.error(e));
    }
    let set = keys::binding_key(&exchange.name);
    let set = &set;
    let members: Vec<String> = inner
        .redis
        .run(|mut conn| async move { redis::cmd("SMEMBERS").arg(set).query_async(&mut conn).await })
        .await
        .map_err(|e| inner.error(e))?;
    let mut queues: Vec<String> = members
        .iter()
        .filter_map(|m| keys::parse_binding_member(m))
        .filter(|b| match exchange.kind {
            ExchangeKind::Topic => keys::topic_matches(&b.routing_key, routing_key),
            _ => b.routing_key == routing_key,
        })
        .map(|b| b.queue)
        .collect();
    queues.sort();
    queues.dedup();
    if queues.is_empty() {
        tracing::trace!(exchange = %exchange.name, routing_key, "no queue bound; message dropped");
        return Ok(());
    }
    let step = keys::priority_step(i64::from(message.properties.priority.unwrap_or(0)));
    let mut pipe = redis::pipe();
    for q in &queues {
        pipe.cmd("LPUSH").arg(keys::queue_key(q, step)).arg(&payload).ignore();
    }
    let pipe = &pipe;
    inner.redis.run(|mut conn| async move { pipe.exec_async(&mut conn).await }).await.map_err(|e| inner.error(e))
}

/// What one subscription bound and reads.
struct Plan {
    inner: Arc<Inner>,
    exchange: ExchangeSpec,
    binding: Binding,
}

impl Plan {
    /// Add the binding to the exchange's set (idempotent).
    async fn bind(&self) -> Result<(), Failure> {
        let (set, member) = (keys::binding_key(&self.exchange.name), member(self.exchange.kind, &self.binding));
        let (set, member) = (&set, &member);
        self.inner
            .redis
            .run(|mut conn| async move { redis::cmd("SADD").arg(set).arg(member).exec_async(&mut conn).await })
            .await
    }

    /// Remove the binding and the queue's lists, as kombu deletes an auto-delete queue.
    async fn unbind(&self) {
        let (set, member) = (keys::binding_key(&self.exchange.name), member(self.exchange.kind, &self.binding));
        let lists = keys::queue_keys(&self.binding.queue);
        let (set, member, lists) = (&set, &member, &lists);
        let result = self
            .inner
            .redis
            .run(|mut conn| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("SREM").arg(set).arg(member).ignore();
                for l in lists {
                    pipe.cmd("DEL").arg(l).ignore();
                }
                pipe.exec_async(&mut conn).await
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(queue = %self.binding.queue, error = ?e, "could not remove the binding");
        }
    }

    /// The pattern a fanout subscriber listens on.
    fn fanout_pattern(&self) -> String {
        keys::fanout_channel(
            self.inner.config.server.db,
            &self.exchange.name,
            &self.binding.routing_key.replace('#', "*"),
        )
    }
}

/// A connection that delivers the subscription's messages.
enum Source {
    Fanout(redis::aio::PubSubStream),
    Queue(redis::aio::MultiplexedConnection),
}

impl Plan {
    /// Bind and open the connection to read from; for fanout the subscription is confirmed when
    /// this returns.
    async fn open(&self) -> Result<Source, Failure> {
        self.bind().await?;
        match self.exchange.kind {
            ExchangeKind::Fanout => {
                let mut pubsub = self.inner.redis.pubsub().await?;
                let pattern = self.fanout_pattern();
                self.inner.redis.pubsub_command(pubsub.psubscribe(&pattern)).await?;
                Ok(Source::Fanout(pubsub.into_on_message()))
            }
            ExchangeKind::Direct | ExchangeKind::Topic => {
                Ok(Source::Queue(self.inner.redis.blocking_connection(BRPOP_TIMEOUT).await?))
            }
        }
    }
}

fn decode(raw: &[u8], queue: &str) -> Option<Message> {
    match envelope::decode(raw) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(queue, error = %e, "dropped a message that is not a kombu envelope");
            None
        }
    }
}

/// Read from `source` until it fails (returns) or the subscription is stopped or dropped
/// (returns `true`).
async fn pump(plan: &Plan, source: Source, tx: &mpsc::Sender<Message>, stop: &mut watch::Receiver<bool>) -> bool {
    let queue = plan.binding.queue.as_str();
    match source {
        Source::Fanout(mut stream) => loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => {
                        if let Some(m) = decode(msg.get_payload_bytes(), queue) {
                            if tx.send(m).await.is_err() {
                                return true;
                            }
                        }
                    }
                    None => {
                        tracing::warn!(queue, "lost the Redis pub/sub connection; resubscribing");
                        return false;
                    }
                },
                _ = stop.changed() => return true,
            }
        },
        Source::Queue(mut conn) => {
            let lists = keys::queue_keys(queue);
            loop {
                // Never cancelled mid-flight: a popped message would be lost.
                let popped: Result<Option<(String, Vec<u8>)>, _> =
                    redis::cmd("BRPOP").arg(&lists).arg(BRPOP_TIMEOUT.as_secs_f64()).query_async(&mut conn).await;
                match popped {
                    Ok(Some((_, raw))) => {
                        if let Some(m) = decode(&raw, queue) {
                            if tx.send(m).await.is_err() {
                                return true;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(queue, error = %e, "lost the Redis connection; reconnecting");
                        return false;
                    }
                }
                if *stop.borrow() || tx.is_closed() {
                    return true;
                }
            }
        }
    }
}

async fn run(plan: Plan, first: Source, tx: mpsc::Sender<Message>, mut stop: watch::Receiver<bool>) {
    let mut source = Some(first);
    let mut backoff = Duration::from_millis(250);
    loop {
        let current = match source.take() {
            Some(s) => s,
            None => match plan.open().await {
                Ok(s) => {
                    tracing::info!(queue = %plan.binding.queue, exchange = %plan.exchange.name, "subscription restored");
                    backoff = Duration::from_millis(250);
                    s
                }
                Err(e) => {
                    tracing::warn!(queue = %plan.binding.queue, error = ?e, retry_in = ?backoff, "cannot resubscribe");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        if pump(&plan, current, &tx, &mut stop).await {
            break;
        }
    }
    if plan.binding.auto_delete || plan.binding.exclusive {
        plan.unbind().await;
    }
}

/// Bind and start receiving; the first connection must succeed.
pub(crate) async fn subscribe(
    inner: Arc<Inner>,
    exchange: &ExchangeSpec,
    binding: &Binding,
) -> Result<ForwardedSubscription, BrokerError> {
    let plan = Plan { inner, exchange: exchange.clone(), binding: binding.clone() };
    let source = plan.open().await.map_err(|e| plan.inner.error(e))?;
    // A queue subscriber finishes its current BRPOP (at most 1 s) before it stops.
    Ok(ForwardedSubscription::spawn(BRPOP_TIMEOUT + Duration::from_secs(2), move |tx, stop| {
        run(plan, source, tx, stop)
    }))
}
