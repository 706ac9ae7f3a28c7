//! Consuming from RabbitMQ: reconnection, prefetch, and batched acknowledgements.
//!
//! A background task owns the connection. It declares the queues, sets `basic.qos` to the
//! prefetch, starts one consumer per queue on one channel and forwards deliveries over a channel
//! (so [`Consumer::next`] is cancel-safe). When the connection or channel dies it logs, waits with
//! a capped backoff (0.5 s doubling to 30 s) and starts again; the worker never exits because the
//! broker went away.
//!
//! Each channel has a *settler* task. Rejections are sent at once; acknowledgements are collected
//! and sent as one `basic.ack(multiple)` up to the highest tag below which every delivery is
//! settled. They are sent
//! - at once when every delivery received so far is settled (nothing else could join the batch
//!   soon, so waiting would only delay the next deliveries and the publisher's confirm);
//! - at once when a batch is full: 100, or a quarter of the prefetch when that is smaller, since
//!   RabbitMQ delivers nothing more while `prefetch` deliveries are unacknowledged and a batch as
//!   large as the window would stall it;
//! - otherwise 2 ms after the last settlement, and on flush.
//!
//! The prefetch is a channel-wide limit (`basic.qos` with `global`, as Celery sets it on
//! RabbitMQ): one window for all the worker's queues, which the worker may widen or narrow while
//! consuming ([`Consumer::set_prefetch`]). Quorum queues do not support a channel-wide limit;
//! there it is per consumer and fixed.
//!
//! A delivery's settlement goes to the settler of the channel it came from: if that channel is
//! gone, nothing is sent (a tag is meaningless on another channel) and RabbitMQ redelivers the
//! message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celeriac_core::broker::{Acker, Consumer, Delivery};
use celeriac_core::{BrokerError, Message, Properties};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::broker::{connect, unreachable};
use crate::url::AmqpConfig;
use crate::{fields, topology};

/// Send the acknowledgements collected so far after this long without a new one.
const ACK_FLUSH_DELAY: Duration = Duration::from_millis(2);
/// Or as soon as this many are waiting (or a quarter of the prefetch, if smaller).
const ACK_FLUSH_BATCH: u64 = 100;

enum SettleOp {
    Ack(u64),
    Reject(u64, bool),
    Flush(oneshot::Sender<()>),
}

/// A consumer on one or more RabbitMQ queues.
pub struct AmqpConsumer {
    rx: mpsc::UnboundedReceiver<Result<Delivery, BrokerError>>,
    stop: watch::Sender<bool>,
    current: Arc<Mutex<Option<Live>>>,
    /// The prefetch wanted now (read again on reconnection).
    prefetch: watch::Sender<u16>,
    /// Whether the prefetch can change while consuming (not on quorum queues).
    adjustable: bool,
}

/// The connection in use and its settler.
#[derive(Clone)]
struct Live {
    conn: Arc<Connection>,
    settle: mpsc::UnboundedSender<SettleOp>,
}

impl AmqpConsumer {
    /// Connect, declare, and start consuming. The first connection must succeed; later losses are
    /// recovered in the background.
    pub async fn start(config: AmqpConfig, queues: Vec<String>, prefetch: usize) -> Result<Self, BrokerError> {
        let prefetch = clamp_prefetch(prefetch);
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let (prefetch_tx, prefetch_rx) = watch::channel(prefetch);
        let current = Arc::new(Mutex::new(None));
        let session = open_session(&config, &queues, prefetch).await?;
        let adjustable = !config.quorum;
        tokio::spawn(run(config, queues, prefetch_rx, tx, stop_rx, current.clone(), Some(session)));
        Ok(AmqpConsumer { rx, stop, current, prefetch: prefetch_tx, adjustable })
    }
}

/// The prefetch wanted now, marked as seen (a guard must not be held across an await).
fn current_prefetch(rx: &mut watch::Receiver<u16>) -> u16 {
    *rx.borrow_and_update()
}

fn clamp_prefetch(prefetch: usize) -> u16 {
    u16::try_from(prefetch.clamp(1, usize::from(u16::MAX))).unwrap_or(u16::MAX)
}

/// `basic.qos` options: channel-wide, except on quorum queues, which refuse a global limit.
fn qos_options(config: &AmqpConfig) -> BasicQosOptions {
    BasicQosOptions { global: !config.quorum }
}

struct Session {
    conn: Arc<Connection>,
    channel: Channel,
    consumers: Vec<lapin::Consumer>,
}

async fn open_session(config: &AmqpConfig, queues: &[String], prefetch: u16) -> Result<Session, BrokerError> {
    let conn = connect(config, "celeriac worker").await?;
    let channel = conn.create_channel().await.map_err(|e| unreachable(config, e))?;
    channel.basic_qos(prefetch, qos_options(config)).await.map_err(|e| unreachable(config, e))?;
    let mut consumers = Vec::new();
    for q in queues {
        topology::declare(&channel, config, q).await.map_err(|e| {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") {
                BrokerError::Rejected {
                    url: config.redacted.clone(),
                    reason: format!("queue {q:?} exists with other arguments: {text}"),
                }
            } else {
                unreachable(config, e)
            }
        })?;
        let tag = format!("celeriac-{}-{q}", uuid::Uuid::new_v4());
        let c = channel
            .basic_consume(
                q.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| unreachable(config, e))?;
        consumers.push(c);
    }
    Ok(Session { conn: Arc::new(conn), channel, consumers })
}

async fn run(
    config: AmqpConfig,
    queues: Vec<String>,
    mut prefetch: watch::Receiver<u16>,
    tx: mpsc::UnboundedSender<Result<Delivery, BrokerError>>,
    mut stop: watch::Receiver<bool>,
    current: Arc<Mutex<Option<Live>>>,
    mut first: Option<Session>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        let session = match first.take() {
            Some(s) => s,
            None => match open_session(&config, &queues, current_prefetch(&mut prefetch)).await {
                Ok(s) => {
                    tracing::info!(broker = %config.redacted, "reconnected to the broker; consuming again");
                    celeriac_core::telemetry::broker_reconnected();
                    backoff = Duration::from_millis(500);
                    s
                }
                Err(e) => {
                    tracing::warn!(broker = %config.redacted, error = %e, retry_in = ?backoff, "cannot reach the broker");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        // The highest delivery tag handed to the worker on this channel.
        let delivered = Arc::new(AtomicU64::new(0));
        let window = Arc::new(AtomicU16::new(*prefetch.borrow()));
        tokio::spawn(settler(session.channel.clone(), settle_rx, window.clone(), delivered.clone()));
        *current.lock().await = Some(Live { conn: session.conn.clone(), settle: settle_tx.clone() });
        let tags: Vec<String> = session.consumers.iter().map(|c| c.tag().as_str().to_string()).collect();
        let mut stream = futures::stream::select_all(session.consumers.into_iter().map(|c| c.boxed()));
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(d)) => {
                        delivered.fetch_max(d.delivery_tag, Ordering::Release);
                        let delivery = to_delivery(d, settle_tx.clone());
                        if tx.send(Ok(delivery)).is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(broker = %config.redacted, error = %e, "lost the broker connection; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!(broker = %config.redacted, "the broker cancelled the consumer; reconnecting");
                        break;
                    }
                },
                Ok(()) = prefetch.changed() => {
                    let n = current_prefetch(&mut prefetch);
                    match session.channel.basic_qos(n, qos_options(&config)).await {
                        Ok(()) => {
                            window.store(n, Ordering::Release);
                            tracing::debug!(prefetch = n, "prefetch changed");
                        }
                        Err(e) => {
                            tracing::warn!(broker = %config.redacted, error = %e, "lost the broker connection; reconnecting");
                            break;
                        }
                    }
                }
                _ = stop.changed() => {
                    for tag in &tags {
                        let _ = session.channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    }
                    return;
                }
            }
        }
        // This channel is dead: its settler drops whatever comes; RabbitMQ redelivers.
        let _ = session.conn.close(320, "reconnecting".into()).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The message of a delivery: headers, properties and body.
pub(crate) fn to_message(p: &lapin::BasicProperties, body: Vec<u8>) -> Message {
    let headers = p.headers().as_ref().map(fields::from_table).unwrap_or_default();
    let properties = Properties {
        correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_string()),
        content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default(),
        content_encoding: p.content_encoding().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default(),
        delivery_mode: p.delivery_mode().unwrap_or(2),
        priority: *p.priority(),
        reply_to: p.reply_to().as_ref().map(|s| s.as_str().to_string()).filter(|s| !s.is_empty()),
        expiration: p.expiration().as_ref().map(|s| s.as_str().to_string()),
    };
    Message { headers, properties, body }
}

fn to_delivery(d: lapin::message::Delivery, settle: mpsc::UnboundedSender<SettleOp>) -> Delivery {
    let message = to_message(&d.properties, d.data);
    // Quorum queues count deliveries; classic queues only say "redelivered".
    let count = message
        .headers
        .get("x-delivery-count")
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as u32 + 1)
        .unwrap_or(if d.redelivered { 2 } else { 1 });
    let queue = d.routing_key.as_str().to_string();
    Delivery::new(message, queue, count, Box::new(AmqpAcker { tag: d.delivery_tag, settle, settled: false }))
}

struct AmqpAcker {
    tag: u64,
    settle: mpsc::UnboundedSender<SettleOp>,
    settled: bool,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        self.settled = true;
        // A closed settler means the channel died: RabbitMQ redelivers the message.
        let _ = self.settle.send(SettleOp::Ack(self.tag));
        Ok(())
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        self.settled = true;
        let _ = self.settle.send(SettleOp::Reject(self.tag, requeue));
        Ok(())
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.settle.send(SettleOp::Reject(self.tag, true));
        }
    }
}

/// How many contiguous acknowledgements make a full batch for a consumer with this prefetch.
fn ack_batch(prefetch: u16) -> u64 {
    (u64::from(prefetch) / 4).clamp(1, ACK_FLUSH_BATCH)
}

/// Settle deliveries of one channel, acknowledging in batches. `delivered` is the highest tag
/// handed out on the channel so far.
async fn settler(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<SettleOp>,
    window: Arc<AtomicU16>,
    delivered: Arc<AtomicU64>,
) {
    // Tags settled but not yet covered by the contiguous prefix: tag -> is an ack.
    let mut done: BTreeMap<u64, bool> = BTreeMap::new();
    let mut next_expected = 1u64;
    let mut ack_upto = 0u64; // highest acked tag in the settled prefix
    let mut sent_upto = 0u64; // highest tag acknowledged to RabbitMQ
    loop {
        let dirty = ack_upto > sent_upto;
        let op = if dirty {
            tokio::select! {
                op = rx.recv() => op,
                _ = tokio::time::sleep(ACK_FLUSH_DELAY) => {
                    flush(&channel, ack_upto, &mut sent_upto).await;
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        match op {
            Some(SettleOp::Ack(tag)) => {
                done.insert(tag, true);
            }
            Some(SettleOp::Reject(tag, requeue)) => {
                if let Err(e) = channel.basic_reject(tag, BasicRejectOptions { requeue }).await {
                    tracing::debug!(error = %e, tag, "reject not sent; the message will be redelivered");
                }
                done.insert(tag, false);
            }
            Some(SettleOp::Flush(reply)) => {
                flush(&channel, ack_upto, &mut sent_upto).await;
                let _ = reply.send(());
                continue;
            }
            None => {
                flush(&channel, ack_upto, &mut sent_upto).await;
                return;
            }
        }
        while let Some(is_ack) = done.remove(&next_expected) {
            if is_ack {
                ack_upto = next_expected;
            }
            next_expected += 1;
        }
        // Every tag below `next_expected` is settled; if that covers every delivery so far, no
        // acknowledgement is about to join this batch.
        let caught_up = next_expected > delivered.load(Ordering::Acquire);
        let batch = ack_batch(window.load(Ordering::Acquire));
        if ack_upto >= sent_upto + batch || (caught_up && ack_upto > sent_upto) {
            flush(&channel, ack_upto, &mut sent_upto).await;
        }
    }
}

async fn flush(channel: &Channel, ack_upto: u64, sent_upto: &mut u64) {
    if ack_upto > *sent_upto {
        if let Err(e) = channel.basic_ack(ack_upto, BasicAckOptions { multiple: true }).await {
            tracing::debug!(error = %e, ack_upto, "acks not sent; the messages will be redelivered");
        }
        *sent_upto = ack_upto;
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.rx.recv().await.unwrap_or(Err(BrokerError::Closed))
    }

    fn set_prefetch(&mut self, prefetch: usize) -> bool {
        if !self.adjustable {
            return false;
        }
        let n = clamp_prefetch(prefetch);
        self.prefetch.send_if_modified(|p| std::mem::replace(p, n) != n);
        true
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        self.rx.close();
        while let Ok(d) = self.rx.try_recv() {
            drop(d); // unsettled: requeued by its acker
        }
    }

    async fn flush(&mut self) {
        let live = self.current.lock().await.clone();
        if let Some(live) = live {
            let (tx, rx) = oneshot::channel();
            if live.settle.send(SettleOp::Flush(tx)).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), live.conn.close(200, "worker stopped".into())).await;
        }
    }
}
