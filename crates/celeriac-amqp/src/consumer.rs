//! Consuming from RabbitMQ: reconnection, prefetch, and batched acknowledgements.
//!
//! A background task owns the connection. It declares the queues, sets `basic.qos` to the
//! prefetch, starts one consumer per queue on one channel and forwards deliveries over a channel
//! (so [`Consumer::next`] is cancel-safe). When the connection or channel dies it logs, waits with
//! a capped backoff (0.5 s doubling to 30 s) and starts again; the worker never exits because the
//! broker went away.
//!
//! Each channel has a *settler* task. Rejections are sent at once. Acknowledgements are collected
//! and sent as one `basic.ack(multiple)` for those below the lowest delivery the worker still
//! holds, and one `basic.ack` each for those above it (a multiple acknowledgement would take the
//! held delivery with it), so a delivery held for a long time (an ETA task waiting for its time, a
//! long task) never delays the acknowledgement of another. They are sent
//! - at once when every delivery received so far is settled (nothing else could join the batch
//!   soon, so waiting would only delay the next deliveries and the publisher's confirm);
//! - at once when a batch is full: 100, or a quarter of the prefetch when that is smaller, since
//!   RabbitMQ delivers nothing more while `prefetch` deliveries are unacknowledged and a batch as
//!   large as the window would stall it (counted separately below and above the lowest held
//!   delivery, so acknowledgements above a held one go out one by one only when a batch of them
//!   has waited);
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
    /// The warning that the window hit RabbitMQ's limit was logged.
    clamp_logged: bool,
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
        Ok(AmqpConsumer { rx, stop, current, prefetch: prefetch_tx, adjustable, clamp_logged: false })
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
        .with_route(d.exchange.as_str(), d.routing_key.as_str())
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

/// How many acknowledgements make a full batch for a consumer with this prefetch.
fn ack_batch(prefetch: u16) -> u64 {
    (u64::from(prefetch) / 4).clamp(1, ACK_FLUSH_BATCH)
}

/// What one channel's settler knows: the deliveries the worker still holds and the
/// acknowledgements not yet sent. Both are bounded by the prefetch window (plus the ETA tasks held,
/// which widen it), whatever the channel's age.
///
/// An acknowledgement can go out in two ways. `basic.ack(multiple)` at tag T acknowledges every
/// unacknowledged delivery up to T, so it may only be sent for the acknowledgements *below the
/// lowest delivery still held* (the prefix); those go as one frame. An acknowledgement above a
/// held delivery (an ETA task waiting for its time, a long task) can only go alone
/// (`basic.ack(tag)`), which is what keeps a held delivery from blocking every acknowledgement
/// after it, and with them RabbitMQ's window.
#[derive(Debug, Default)]
struct AckBook {
    /// The highest tag the settler has seen handed out.
    delivered: u64,
    /// Tags handed to the worker and not yet settled by it.
    held: std::collections::BTreeSet<u64>,
    /// Tags the worker acknowledged that RabbitMQ has not been told of.
    ready: std::collections::BTreeSet<u64>,
}

/// Frames to send for the acknowledgements collected so far.
#[derive(Debug, Default, PartialEq, Eq)]
struct AckFrames {
    /// One `basic.ack(multiple)` at this tag.
    multiple: Option<u64>,
    /// One `basic.ack` each.
    singles: Vec<u64>,
}

impl AckBook {
    /// Deliveries up to `tag` have been handed out (tags are consecutive on a channel).
    fn delivered_upto(&mut self, tag: u64) {
        if tag > self.delivered {
            self.held.extend(self.delivered + 1..=tag);
            self.delivered = tag;
        }
    }

    /// The worker acknowledged `tag`.
    fn acked(&mut self, tag: u64) {
        self.delivered_upto(tag);
        if self.held.remove(&tag) {
            self.ready.insert(tag);
        }
    }

    /// The worker rejected `tag` (sent at once, so it is settled).
    fn rejected(&mut self, tag: u64) {
        self.delivered_upto(tag);
        self.held.remove(&tag);
    }

    /// The lowest tag still held, or one past the last delivery.
    fn lowest_held(&self) -> u64 {
        self.held.first().copied().unwrap_or(self.delivered + 1)
    }

    /// Whether anything is waiting to be sent.
    fn dirty(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether the acknowledgements waiting make a batch worth sending now: `batch` of them in
    /// the prefix, or `batch` above a held delivery (which can only go one by one), or every
    /// delivery settled (nothing else could join the batch soon, so waiting would only delay the
    /// next deliveries and the publisher's confirm).
    fn due(&self, batch: u64) -> bool {
        if self.ready.is_empty() {
            return false;
        }
        if self.held.is_empty() {
            return true;
        }
        let n = self.ready.len() as u64;
        n >= batch && {
            let low = self.lowest_held();
            let below = self.ready.range(..low).count() as u64;
            below >= batch || n - below >= batch
        }
    }

    /// Take the frames that acknowledge everything waiting: the prefix as one multiple
    /// acknowledgement, the rest one by one.
    fn take(&mut self) -> AckFrames {
        let low = self.lowest_held();
        let above = self.ready.split_off(&low);
        let multiple = self.ready.last().copied();
        self.ready.clear();
        AckFrames { multiple, singles: above.into_iter().collect() }
    }
}

/// Settle deliveries of one channel, acknowledging in batches. `delivered` is the highest tag
/// handed out on the channel so far.
async fn settler(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<SettleOp>,
    window: Arc<AtomicU16>,
    delivered: Arc<AtomicU64>,
) {
    let mut book = AckBook::default();
    loop {
        let op = if book.dirty() {
            tokio::select! {
                op = rx.recv() => op,
                _ = tokio::time::sleep(ACK_FLUSH_DELAY) => {
                    flush(&channel, &mut book).await;
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        match op {
            Some(SettleOp::Ack(tag)) => book.acked(tag),
            Some(SettleOp::Reject(tag, requeue)) => {
                if let Err(e) = channel.basic_reject(tag, BasicRejectOptions { requeue }).await {
                    tracing::debug!(error = %e, tag, "reject not sent; the message will be redelivered");
                }
                book.rejected(tag);
            }
            Some(SettleOp::Flush(reply)) => {
                flush(&channel, &mut book).await;
                let _ = reply.send(());
                continue;
            }
            None => {
                flush(&channel, &mut book).await;
                return;
            }
        }
        book.delivered_upto(delivered.load(Ordering::Acquire));
        if book.due(ack_batch(window.load(Ordering::Acquire))) {
            flush(&channel, &mut book).await;
        }
    }
}

async fn flush(channel: &Channel, book: &mut AckBook) {
    let frames = book.take();
    if let Some(tag) = frames.multiple {
        if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple: true }).await {
            tracing::debug!(error = %e, tag, "acks not sent; the messages will be redelivered");
        }
    }
    for tag in frames.singles {
        if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple: false }).await {
            tracing::debug!(error = %e, tag, "ack not sent; the message will be redelivered");
        }
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
        if n as usize != prefetch.max(1) && !self.clamp_logged {
            self.clamp_logged = true;
            tracing::warn!(
                wanted = prefetch,
                prefetch = n,
                "RabbitMQ's prefetch count cannot exceed 65535: with this many ETA tasks held, ready tasks get what is left of the window"
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_go_as_one_multiple_ack() {
        let mut book = AckBook::default();
        book.delivered_upto(5);
        for tag in 1..=4 {
            book.acked(tag);
            assert!(!book.due(100), "tag 5 is still held and the batch is not full");
        }
        book.acked(5);
        assert!(book.due(100), "everything delivered is settled");
        assert_eq!(book.take(), AckFrames { multiple: Some(5), singles: vec![] });
        assert!(!book.dirty());
    }

    #[test]
    fn a_held_delivery_never_blocks_the_acks_after_it() {
        // Tag 1 is an ETA task held for an hour; 2..=6 are quick tasks acknowledged in turn.
        let mut book = AckBook::default();
        book.delivered_upto(6);
        for tag in 2..=6 {
            book.acked(tag);
        }
        assert!(book.due(4), "a batch of acknowledgements waits above the held delivery");
        assert_eq!(book.take(), AckFrames { multiple: None, singles: vec![2, 3, 4, 5, 6] });
        // More deliveries after it: still one by one, and never a multiple ack covering tag 1.
        book.delivered_upto(8);
        book.acked(8);
        book.acked(7);
        assert_eq!(book.take(), AckFrames { multiple: None, singles: vec![7, 8] });
        // The held one settles at last: it goes alone (everything below it is long settled).
        book.acked(1);
        assert!(book.due(100));
        assert_eq!(book.take(), AckFrames { multiple: Some(1), singles: vec![] });
    }

    #[test]
    fn the_prefix_goes_as_one_frame_and_the_rest_alone() {
        let mut book = AckBook::default();
        book.delivered_upto(10);
        for tag in [1, 2, 3, 5, 6] {
            book.acked(tag);
        }
        book.rejected(7);
        // 4 is held (a long task): 1..=3 as one multiple ack, 5 and 6 alone; 7 was rejected.
        assert_eq!(book.take(), AckFrames { multiple: Some(3), singles: vec![5, 6] });
        book.acked(4);
        book.acked(8);
        // 9 and 10 held: 4 and 8 are below the lowest held tag, one multiple ack covers both,
        // and skips 5, 6 (acknowledged) and 7 (rejected), which RabbitMQ no longer holds.
        assert_eq!(book.take(), AckFrames { multiple: Some(8), singles: vec![] });
    }

    #[test]
    fn a_full_batch_is_counted_on_each_side_of_a_held_delivery() {
        let mut book = AckBook::default();
        book.delivered_upto(20);
        // 1 held; 2..=4 acked above it: below the batch of 4.
        for tag in 2..=4 {
            book.acked(tag);
        }
        assert!(!book.due(4));
        book.acked(5);
        assert!(book.due(4));
        let mut book = AckBook::default();
        book.delivered_upto(20);
        for tag in 1..=4 {
            book.acked(tag);
        }
        assert!(book.due(4), "four in the prefix, 5..=20 still held");
    }

    #[test]
    fn acks_for_tags_not_yet_seen_as_delivered_count() {
        let mut book = AckBook::default();
        book.acked(3);
        assert_eq!(book.held.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(book.take(), AckFrames { multiple: None, singles: vec![3] });
    }
}
