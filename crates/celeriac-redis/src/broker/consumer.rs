//! Consuming from Redis: a background fetcher, a settler, a lease renewer and a sweeper that
//! restores expired messages.
//!
//! - The **fetcher** owns the popping, so [`Consumer::next`] is only a channel receive and is
//!   cancel-safe. It takes prefetch permits first, then pops and records up to that many ready
//!   messages in one atomic script (`FETCH`); only when every list is empty does it block on
//!   `BRPOP` (1 s, on a connection of its own; never cancelled mid-flight, since a reply lost
//!   after the server popped would lose the message) and records the message it gets. On
//!   connection loss it logs, waits with a capped backoff (0.25 s doubling to 10 s) and goes on;
//!   the worker never sees the outage. A fetch whose answer was lost (the server may have run it)
//!   is remembered by its score, and the messages it recorded are put back once Redis answers.
//! - The **settler** applies settlements in order, batched into one pipeline: acknowledge
//!   (`ZREM` and `HDEL`, as kombu), reject with requeue (back of the queue), put back a dropped
//!   delivery (front of the queue, as kombu's restore at shutdown), dead-letter. All are
//!   idempotent scripts keyed on the `unacked` entry, so while Redis is away the batch is retried
//!   (0.1 s doubling to 5 s) until it lands; an acker waits for its own outcome at most one
//!   operation deadline.
//! - The **renewer** re-scores (`ZADD unacked_index XX CH`) every message the consumer still
//!   holds, every third of the visibility timeout, until it is settled (and after the consumer is
//!   closed, for as long as deliveries it handed out are unsettled).
//! - The **sweeper**, while the consumer consumes, puts expired messages back into their queues
//!   (at start, then every quarter of the visibility timeout, between 0.25 s and 30 s), skipping
//!   those this consumer holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use celeriac_core::broker::{Acker, Consumer, Delivery};
use celeriac_core::{envelope, BrokerError};
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::keys::{self, UNACKED, UNACKED_INDEX};
use super::restore::{self, dead_keys};
use super::scripts::{self, DEAD_LETTER, FETCH, REQUEUE};
use super::{wire, Inner, BRPOP_TIMEOUT};
use crate::conn::Failure;

/// The most messages one fetch takes.
const MAX_BATCH: usize = 256;
/// The most settlements sent in one pipeline.
const SETTLE_BATCH: usize = 256;
/// Backoff of the fetcher after a failure.
const FETCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// Backoff of the settler while Redis is away.
const SETTLE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How long `flush` waits for the settler.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a popped message is retried into `unacked` (or back into its list) once the consumer
/// is stopping, before giving up on it (it is logged in full).
const STOPPING_RECORD_LIMIT: Duration = Duration::from_secs(30);

/// Delivery tags a consumer holds (delivered, not yet settled in Redis), each marked once its
/// settlement is on its way.
#[derive(Default)]
pub(crate) struct Held(Mutex<HashMap<String, bool>>);

impl Held {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, bool>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn contains(&self, tag: &str) -> bool {
        self.lock().contains_key(tag)
    }

    fn insert(&self, tag: &str) {
        self.lock().insert(tag.to_string(), false);
    }

    fn settling(&self, tag: &str) {
        if let Some(s) = self.lock().get_mut(tag) {
            *s = true;
        }
    }

    fn remove(&self, tag: &str) {
        self.lock().remove(tag);
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn snapshot(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Forget a tag whose entry vanished from `unacked_index`; true if nobody was settling it
    /// (so it was taken away, not acknowledged).
    fn lost(&self, tag: &str) -> bool {
        let mut held = self.lock();
        match held.get(tag).copied() {
            Some(false) => {
                held.remove(tag);
                true
            }
            _ => false,
        }
    }
}

/// What a consumer's tasks share.
struct Shared {
    inner: Arc<Inner>,
    held: Held,
    /// The consumer stopped consuming: no more sweeps.
    closed: AtomicBool,
    /// The consumer is gone: the renewer stops once nothing is held.
    done: AtomicBool,
}

impl Shared {
    fn deadline(&self) -> Duration {
        self.inner.redis.deadline()
    }
}

/// One settlement.
enum Op {
    /// Acknowledge (or reject without requeue): remove from `unacked`.
    Ack { tag: String },
    /// Push back: `front` for the front of the queue (`RPUSH`), else the back (`LPUSH`).
    Requeue { tag: String, payload: Vec<u8>, key: String, front: bool },
    /// Move to the dead letters (`tag` empty for a message never recorded in `unacked`).
    DeadLetter { tag: String, record: Vec<u8>, queue: String },
}

impl Op {
    fn tag(&self) -> &str {
        match self {
            Op::Ack { tag } | Op::Requeue { tag, .. } | Op::DeadLetter { tag, .. } => tag,
        }
    }

    fn add_to(&self, pipe: &mut redis::Pipeline) {
        match self {
            Op::Ack { tag } => {
                pipe.cmd("ZREM").arg(UNACKED_INDEX).arg(tag).ignore();
                pipe.cmd("HDEL").arg(UNACKED).arg(tag);
            }
            Op::Requeue { tag, payload, key, front } => {
                let keys = vec![UNACKED.to_string(), UNACKED_INDEX.to_string(), key.clone()];
                let side = if *front { "R" } else { "L" };
                pipe.add_command(scripts::eval(REQUEUE, &keys).arg(tag).arg(payload).arg(side).arg("").to_owned());
            }
            Op::DeadLetter { tag, record, queue } => {
                pipe.add_command(scripts::eval(DEAD_LETTER, &dead_keys()).arg(tag).arg(record).arg(queue).to_owned());
            }
        }
    }
}

type Reply = oneshot::Sender<Result<bool, Failure>>;

enum SettleMsg {
    Job(Op, Option<Reply>),
    Flush(oneshot::Sender<()>),
}

/// A consumer on one or more Redis queues.
pub(crate) struct RedisConsumer {
    rx: mpsc::UnboundedReceiver<Delivery>,
    stop: watch::Sender<bool>,
    fetcher: Option<JoinHandle<()>>,
    settle: mpsc::UnboundedSender<SettleMsg>,
    shared: Arc<Shared>,
    /// One permit per delivery that may be unsettled; `prefetch` of them in all.
    permits: Arc<Semaphore>,
    prefetch: usize,
}

impl RedisConsumer {
    /// Start the fetcher, settler, renewer and sweeper. The caller has checked that Redis answers.
    pub(crate) fn start(inner: Arc<Inner>, queues: Vec<String>, prefetch: usize) -> Self {
        let shared = Arc::new(Shared {
            inner,
            held: Held::default(),
            closed: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let (settle, settle_rx) = mpsc::unbounded_channel();
        tokio::spawn(settler(shared.clone(), settle_rx));
        tokio::spawn(renewer(shared.clone()));
        tokio::spawn(sweeper(shared.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        tracing::debug!(queues = %queues.join(","), prefetch, broker = %shared.inner.url(), "consuming from Redis");
        let prefetch = prefetch.max(1);
        let permits = Arc::new(Semaphore::new(prefetch));
        let fetcher = Fetcher {
            shared: shared.clone(),
            queues,
            permits: permits.clone(),
            tx,
            settle: settle.clone(),
            blocking: None,
            lost_fetches: Vec::new(),
            stop: stop_rx,
        };
        let fetcher = tokio::spawn(fetcher.run());
        RedisConsumer { rx, stop, fetcher: Some(fetcher), settle, shared, permits, prefetch }
    }

    fn stop_consuming(&mut self) {
        let _ = self.stop.send(true);
        self.shared.closed.store(true, Ordering::Release);
        self.rx.close();
        // Fetched but not handed out: dropping them puts them back at the front.
        while let Ok(d) = self.rx.try_recv() {
            drop(d);
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.rx.recv().await.ok_or(BrokerError::Closed)
    }

    async fn close(&mut self) {
        self.stop_consuming();
    }

    fn set_prefetch(&mut self, prefetch: usize) -> bool {
        let prefetch = prefetch.max(1);
        if prefetch > self.prefetch {
            self.permits.add_permits(prefetch - self.prefetch);
        } else if prefetch < self.prefetch {
            // Take the surplus out as deliveries settle (until the consumer is gone).
            let (permits, shared) = (self.permits.clone(), self.shared.clone());
            let surplus = u32::try_from(self.prefetch - prefetch).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        taken = permits.clone().acquire_many_owned(surplus) => {
                            if let Ok(taken) = taken {
                                taken.forget();
                            }
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if shared.done.load(Ordering::Acquire) {
                                return;
                            }
                        }
                    }
                }
            });
        }
        self.prefetch = prefetch;
        true
    }

    async fn flush(&mut self) {
        self.stop_consuming();
        if let Some(fetcher) = self.fetcher.take() {
            // A BRPOP in flight ends within its timeout; a popped message is recorded first.
            let limit = BRPOP_TIMEOUT + self.shared.deadline() * 2;
            if tokio::time::timeout(limit, fetcher).await.is_err() {
                tracing::warn!("the Redis fetcher did not stop in time");
            }
        }
        let (tx, rx) = oneshot::channel();
        if self.settle.send(SettleMsg::Flush(tx)).is_ok() && tokio::time::timeout(FLUSH_TIMEOUT, rx).await.is_err() {
            tracing::warn!(
                broker = %self.shared.inner.url(),
                "settlements did not reach Redis in time; unsettled messages come back after the visibility timeout"
            );
        }
        self.shared.done.store(true, Ordering::Release);
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        self.stop_consuming();
        self.shared.done.store(true, Ordering::Release);
    }
}

/// Pops messages and hands them over as deliveries.
struct Fetcher {
    shared: Arc<Shared>,
    /// Consumed queues, in the current round-robin order.
    queues: Vec<String>,
    permits: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Delivery>,
    settle: mpsc::UnboundedSender<SettleMsg>,
    /// The connection for `BRPOP`, while it works.
    blocking: Option<MultiplexedConnection>,
    /// Scores of fetches whose answer was lost: what they recorded is put back.
    lost_fetches: Vec<String>,
    stop: watch::Receiver<bool>,
}

/// One popped message.
struct Popped {
    queue: String,
    key: String,
    raw: Vec<u8>,
    /// Its delivery tag, if it was recorded in `unacked`.
    tag: Option<String>,
}

impl Fetcher {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Wait `pause` unless asked to stop; true if asked to stop.
    async fn pause(&mut self, pause: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(pause) => self.stopping(),
            _ = self.stop.changed() => true,
        }
    }

    async fn run(mut self) {
        let mut backoff = FETCH_BACKOFF.0;
        let mut failing = false;
        loop {
            if self.stopping() {
                return;
            }
            // Stop first: a permit freed by a delivery dropped after `close` (whose put-back is
            // still on its way to Redis) must not start a fetch, which would pop the message
            // behind it and put that one back in front of it.
            let first = tokio::select! {
                biased;
                _ = self.stop.changed() => return,
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            if self.stopping() {
                return;
            }
            let mut permits = vec![first];
            while permits.len() < MAX_BATCH {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            match self.fetch(permits.len()).await {
                Ok(popped) => {
                    if failing {
                        tracing::info!(broker = %self.shared.inner.url(), "Redis answers again; consuming");
                        celeriac_core::telemetry::broker_reconnected();
                        failing = false;
                        backoff = FETCH_BACKOFF.0;
                    }
                    self.recover_lost_fetches().await;
                    if !popped.is_empty() {
                        for (p, permit) in popped.into_iter().zip(permits) {
                            self.hand_over(p, permit);
                        }
                        continue;
                    }
                }
                Err(failure) => {
                    self.failed(&failure, &mut failing, backoff);
                    if self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(FETCH_BACKOFF.1);
                    continue;
                }
            }
            // Every list is empty: block until something comes, holding one permit.
            permits.truncate(1);
            let Some(permit) = permits.pop() else { continue };
            match self.block().await {
                Ok(Some(mut popped)) => {
                    self.record(&mut popped).await;
                    self.hand_over(popped, permit);
                }
                Ok(None) => {}
                Err(failure) => {
                    self.blocking = None;
                    self.failed(&failure, &mut failing, backoff);
                    if self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(FETCH_BACKOFF.1);
                }
            }
        }
    }

    fn failed(&self, failure: &Failure, failing: &mut bool, retry_in: Duration) {
        let broker = self.shared.inner.url();
        match (failure, *failing) {
            (_, true) => tracing::debug!(%broker, error = ?failure, ?retry_in, "Redis still failing"),
            (Failure::Unreachable(reason), false) => {
                tracing::warn!(%broker, error = %reason, ?retry_in, "lost the Redis connection; retrying")
            }
            (Failure::Command(reason), false) => {
                tracing::warn!(%broker, error = %reason, ?retry_in, "Redis refused to hand out messages; retrying")
            }
        }
        *failing = true;
    }

    /// The lists to pop, in kombu's order, with their queues.
    fn key_order(&self) -> Vec<(String, usize)> {
        keys::consume_keys(&self.queues)
    }

    /// kombu's round robin: the queue just served goes last.
    fn rotate(&mut self, queue: &str) {
        if let Some(i) = self.queues.iter().position(|q| q == queue) {
            let q = self.queues.remove(i);
            self.queues.push(q);
        }
    }

    /// Pop and record up to `n` ready messages in one atomic step.
    async fn fetch(&mut self, n: usize) -> Result<Vec<Popped>, Failure> {
        let order = self.key_order();
        let mut all = vec![UNACKED.to_string(), UNACKED_INDEX.to_string()];
        all.extend(order.iter().map(|(k, _)| k.clone()));
        let score = wire::score(SystemTime::now());
        let cmd = scripts::eval(FETCH, &all).arg(n).arg(&score).to_owned();
        let rows: Vec<(usize, Vec<u8>, String)> =
            match self.shared.inner.redis.run_once(|mut conn| async move { cmd.query_async(&mut conn).await }).await {
                Ok(rows) => rows,
                Err(failure) => {
                    // The script may have run without its answer reaching us.
                    self.lost_fetches.push(score);
                    return Err(failure);
                }
            };
        let mut popped = Vec::with_capacity(rows.len());
        for (index, raw, tag) in rows {
            let Some((key, q)) = index.checked_sub(1).and_then(|i| order.get(i)) else { continue };
            popped.push(Popped {
                queue: self.queues[*q].clone(),
                key: key.clone(),
                raw,
                tag: Some(tag).filter(|t| !t.is_empty()),
            });
        }
        if let Some(last) = popped.last() {
            let queue = last.queue.clone();
            self.rotate(&queue);
        }
        Ok(popped)
    }

    /// Put back what fetches whose answer was lost recorded (nobody else knows they are ours).
    async fn recover_lost_fetches(&mut self) {
        while let Some(score) = self.lost_fetches.last().cloned() {
            let redis = &self.shared.inner.redis;
            let bound = &score;
            let tags: Result<Vec<String>, Failure> = redis
                .run(|mut conn| async move {
                    redis::cmd("ZRANGE")
                        .arg(UNACKED_INDEX)
                        .arg(bound)
                        .arg(bound)
                        .arg("BYSCORE")
                        .query_async(&mut conn)
                        .await
                })
                .await;
            let Ok(tags) = tags else { return };
            let mut restored = 0;
            for tag in &tags {
                match restore::restore_tag(&self.shared.inner, tag, &score).await {
                    Ok(true) => restored += 1,
                    Ok(false) => {}
                    Err(_) => return,
                }
            }
            if restored > 0 {
                tracing::warn!(restored, "put back messages fetched while the connection was lost");
            }
            self.lost_fetches.pop();
        }
    }

    /// Block on `BRPOP` for at most [`BRPOP_TIMEOUT`].
    async fn block(&mut self) -> Result<Option<Popped>, Failure> {
        let order = self.key_order();
        if self.blocking.is_none() {
            self.blocking = Some(self.shared.inner.redis.blocking_connection(BRPOP_TIMEOUT).await?);
        }
        let Some(conn) = self.blocking.as_mut() else { return Ok(None) };
        let mut cmd = redis::cmd("BRPOP");
        for (k, _) in &order {
            cmd.arg(k);
        }
        cmd.arg(BRPOP_TIMEOUT.as_secs().max(1));
        let reply: Option<(String, Vec<u8>)> = cmd.query_async(conn).await.map_err(|e| Failure::from_redis(&e))?;
        let Some((key, raw)) = reply else { return Ok(None) };
        let queue = match order.iter().find(|(k, _)| *k == key) {
            Some((_, q)) => self.queues[*q].clone(),
            None => keys::queue_of_key(&key).to_string(),
        };
        self.rotate(&queue);
        Ok(Some(Popped { queue, key, raw, tag: None }))
    }

    /// Record a message `BRPOP` handed over in `unacked` (as kombu's `QoS.append`), retrying
    /// until Redis takes it; once stopping, push it back to the front of its list instead.
    async fn record(&mut self, popped: &mut Popped) {
        let info = celeriac_core::pyjson::from_slice(&popped.raw).ok().as_ref().and_then(wire::envelope_info);
        let mut backoff = FETCH_BACKOFF.0;
        let mut failing_since: Option<Instant> = None;
        loop {
            let stopping = self.stopping();
            let result = match (&info, stopping) {
                (Some(info), false) => {
                    let value = wire::unacked_value(&popped.raw, &info.exchange, &info.routing_key);
                    let score = wire::score(SystemTime::now());
                    let (tag, value, score) = (&info.tag, &value, &score);
                    self.shared
                        .inner
                        .redis
                        .run(|mut conn| async move {
                            redis::pipe()
                                .atomic()
                                .cmd("ZADD")
                                .arg(UNACKED_INDEX)
                                .arg(score)
                                .arg(tag)
                                .ignore()
                                .cmd("HSET")
                                .arg(UNACKED)
                                .arg(tag)
                                .arg(value)
                                .ignore()
                                .exec_async(&mut conn)
                                .await
                        })
                        .await
                        .map(|()| Some(info.tag.clone()))
                }
                // Not a kombu envelope: handed over untracked, to be dead-lettered.
                (None, false) => Ok(None),
                (_, true) => {
                    let (key, raw) = (&popped.key, &popped.raw);
                    let pushed = self
                        .shared
                        .inner
                        .redis
                        .run(
                            |mut conn| async move { redis::cmd("RPUSH").arg(key).arg(raw).exec_async(&mut conn).await },
                        )
                        .await;
                    if pushed.is_ok() {
                        popped.raw.clear();
                        return;
                    }
                    pushed.map(|()| None)
                }
            };
            match result {
                Ok(tag) => {
                    popped.tag = tag;
                    return;
                }
                Err(failure) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if stopping && since.elapsed() > STOPPING_RECORD_LIMIT {
                        tracing::error!(
                            queue = %popped.queue,
                            message = %String::from_utf8_lossy(&popped.raw),
                            error = ?failure,
                            "Redis is gone: a message taken from the queue could not be put back and is lost"
                        );
                        popped.raw.clear();
                        return;
                    }
                    tracing::warn!(error = ?failure, ?backoff, "cannot record a delivered message in Redis; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(FETCH_BACKOFF.1);
                }
            }
        }
    }

    /// Turn a popped message into a delivery, or dead-letter it.
    fn hand_over(&self, popped: Popped, permit: OwnedSemaphorePermit) {
        if popped.raw.is_empty() {
            return; // put back (or lost) while stopping
        }
        let parsed = celeriac_core::pyjson::from_slice(&popped.raw).ok();
        let info = parsed.as_ref().and_then(wire::envelope_info);
        let (exchange, routing_key) =
            info.as_ref().map(|i| (i.exchange.clone(), i.routing_key.clone())).unwrap_or_default();
        let Some(tag) = popped.tag.clone() else {
            self.dead_letter(&popped, "", "not a kombu message envelope (no properties.delivery_tag)", None);
            return;
        };
        let decoded = envelope::decode(&popped.raw);
        let mut message = match decoded {
            Ok(m) => m,
            Err(e) => {
                self.shared.held.insert(&tag);
                self.dead_letter(&popped, &tag, &e.to_string(), None);
                return;
            }
        };
        // kombu marks a put-back message in its headers; that is not a task header.
        message.headers.shift_remove("redelivered");
        let redelivered = info.as_ref().is_some_and(|i| i.redelivered);
        let step = keys::priority_step(parsed.as_ref().map_or(0, keys::envelope_priority));
        self.shared.held.insert(&tag);
        let acker = RedisAcker {
            shared: self.shared.clone(),
            settle: self.settle.clone(),
            tag,
            queue: popped.queue.clone(),
            key: keys::queue_key(&popped.queue, step),
            task_id: message.task_id().map(str::to_string),
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            raw: popped.raw,
            permit: Some(permit),
            settled: false,
        };
        // kombu's `delivery_info` in the envelope: the exchange and routing key it was sent with.
        let delivery = Delivery::new(message, popped.queue, if redelivered { 2 } else { 1 }, Box::new(acker))
            .with_route(exchange, routing_key);
        // A closed channel drops the delivery, which puts it back at the front of its queue.
        let _ = self.tx.send(delivery);
    }

    fn dead_letter(&self, popped: &Popped, tag: &str, reason: &str, task_id: Option<&str>) {
        tracing::error!(queue = %popped.queue, %reason, "dead-lettering a message that cannot be read");
        let parsed = celeriac_core::pyjson::from_slice(&popped.raw).ok();
        let info = parsed.as_ref().and_then(wire::envelope_info);
        let (ex, rk) = info.map(|i| (i.exchange, i.routing_key)).unwrap_or_default();
        let record = wire::dead_record(&popped.queue, task_id, reason, wire::now_ms(), &ex, &rk, &popped.raw);
        let op = Op::DeadLetter { tag: tag.to_string(), record, queue: popped.queue.clone() };
        let _ = self.settle.send(SettleMsg::Job(op, None));
    }
}

/// Settles one delivery.
struct RedisAcker {
    shared: Arc<Shared>,
    settle: mpsc::UnboundedSender<SettleMsg>,
    tag: String,
    queue: String,
    /// The list it was taken from (its queue at its priority).
    key: String,
    task_id: Option<String>,
    exchange: String,
    routing_key: String,
    raw: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
    settled: bool,
}

impl RedisAcker {
    async fn settle(&mut self, op: Op, what: &str) -> Result<(), BrokerError> {
        self.settled = true;
        self.shared.held.settling(&self.tag);
        let (tx, rx) = oneshot::channel();
        if self.settle.send(SettleMsg::Job(op, Some(tx))).is_err() {
            self.permit.take();
            return Err(BrokerError::Closed);
        }
        let deadline = self.shared.deadline();
        let outcome = tokio::time::timeout(deadline, rx).await;
        self.permit.take();
        let url = self.shared.inner.url().to_string();
        match outcome {
            Ok(Ok(Ok(true))) => Ok(()),
            Ok(Ok(Ok(false))) => {
                tracing::warn!(
                    task_id = self.task_id.as_deref().unwrap_or(""),
                    queue = %self.queue,
                    "{what}: the message had already been put back by another worker (its lease lapsed); it may run again"
                );
                Ok(())
            }
            Ok(Ok(Err(failure))) => Err(self.shared.inner.error(failure)),
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => Err(BrokerError::Timeout { url, operation: what.to_string(), elapsed: deadline }),
        }
    }

    fn requeue_op(&self, front: bool) -> Op {
        Op::Requeue { tag: self.tag.clone(), payload: wire::redelivered_raw(&self.raw), key: self.key.clone(), front }
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        let op = Op::Ack { tag: self.tag.clone() };
        self.settle(op, "acknowledge").await
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        if requeue {
            // kombu's reject(requeue=True): back of the queue.
            let op = self.requeue_op(false);
            self.settle(op, "requeue").await
        } else {
            let op = Op::Ack { tag: self.tag.clone() };
            self.settle(op, "reject").await
        }
    }

    async fn release(mut self: Box<Self>) -> Result<(), BrokerError> {
        // Never started: back to the front of its list as it came (no redelivery flag), so the
        // next consumer to pop takes it first.
        let op = Op::Requeue { tag: self.tag.clone(), payload: self.raw.clone(), key: self.key.clone(), front: true };
        self.settle(op, "release").await
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        let record = wire::dead_record(
            &self.queue,
            self.task_id.as_deref(),
            reason,
            wire::now_ms(),
            &self.exchange,
            &self.routing_key,
            &self.raw,
        );
        let op = Op::DeadLetter { tag: self.tag.clone(), record, queue: self.queue.clone() };
        self.settle(op, "dead-letter").await
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        if !self.settled {
            // As kombu's restore of unacked messages at shutdown: front of the queue.
            self.shared.held.settling(&self.tag);
            let op = self.requeue_op(true);
            let _ = self.settle.send(SettleMsg::Job(op, None));
        }
    }
}

/// Apply settlements in order, batched, retrying while Redis is away.
async fn settler(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<SettleMsg>) {
    while let Some(first) = rx.recv().await {
        let mut jobs: Vec<(Op, Option<Reply>)> = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                SettleMsg::Job(op, reply) => jobs.push((op, reply)),
                SettleMsg::Flush(done) => flushes.push(done),
            }
            if jobs.len() < SETTLE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !jobs.is_empty() {
            settle_batch(&shared, jobs).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn settle_batch(shared: &Shared, jobs: Vec<(Op, Option<Reply>)>) {
    let mut backoff = SETTLE_BACKOFF.0;
    let mut warned = false;
    let results = loop {
        let mut pipe = redis::pipe();
        for (op, _) in &jobs {
            op.add_to(&mut pipe);
        }
        let pipe = &pipe;
        match shared.inner.redis.run(|mut conn| async move { pipe.query_async::<Vec<i64>>(&mut conn).await }).await {
            Ok(results) if results.len() == jobs.len() => break results.into_iter().map(|n| Ok(n > 0)).collect(),
            Ok(results) => {
                let failure = Failure::Command(format!("{} answers to {} settlements", results.len(), jobs.len()));
                break jobs.iter().map(|_| Err(failure.clone())).collect::<Vec<_>>();
            }
            Err(Failure::Unreachable(reason)) => {
                if !warned {
                    tracing::warn!(pending = jobs.len(), %reason, "cannot settle deliveries in Redis; retrying");
                    warned = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SETTLE_BACKOFF.1);
            }
            // One settlement was refused: settle them one by one to give each its own answer.
            Err(Failure::Command(_)) => break settle_one_by_one(shared, &jobs).await,
        }
    };
    if warned {
        tracing::info!(settled = jobs.len(), "settlements reached Redis");
    }
    for ((op, reply), result) in jobs.into_iter().zip(results) {
        shared.held.remove(op.tag());
        if let Err(failure) = &result {
            tracing::error!(tag = op.tag(), error = ?failure, "Redis refused a settlement");
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

async fn settle_one_by_one(shared: &Shared, jobs: &[(Op, Option<Reply>)]) -> Vec<Result<bool, Failure>> {
    let mut out = Vec::with_capacity(jobs.len());
    for (op, _) in jobs {
        let mut pipe = redis::pipe();
        op.add_to(&mut pipe);
        let pipe = &pipe;
        let r = shared.inner.redis.run(|mut conn| async move { pipe.query_async::<Vec<i64>>(&mut conn).await }).await;
        out.push(r.map(|v| v.first().is_some_and(|n| *n > 0)));
    }
    out
}

/// Renew the leases of held messages, every third of the visibility timeout, until the
/// consumer is gone and nothing is held.
async fn renewer(shared: Arc<Shared>) {
    let every = (shared.inner.config.visibility_timeout / 3).max(Duration::from_millis(50));
    let mut next = tokio::time::Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        if shared.done.load(Ordering::Acquire) && shared.held.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        next = match renew(&shared).await {
            Ok(()) => now + every,
            // Try again soon: the leases must be fresh before another worker sweeps.
            Err(_) => now + every.min(Duration::from_secs(1)),
        };
    }
}

/// While the consumer consumes, put expired messages back into their queues: at once, then
/// every quarter of the visibility timeout (between 0.25 s and 30 s). A task of its own, so a
/// long sweep never delays lease renewals.
async fn sweeper(shared: Arc<Shared>) {
    let every = (shared.inner.config.visibility_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = restore::sweep(&shared.inner, &shared.held).await {
            tracing::debug!(error = ?e, "could not restore expired unacked messages");
        }
        tokio::time::sleep(every).await;
    }
}

/// Re-score every held message (`ZADD XX CH`: never re-creating an entry that is gone).
async fn renew(shared: &Shared) -> Result<(), Failure> {
    let tags = shared.held.snapshot();
    if tags.is_empty() {
        return Ok(());
    }
    let score = wire::score(SystemTime::now());
    let (tags_ref, score) = (&tags, &score);
    let changed: Vec<i64> = shared
        .inner
        .redis
        .run(|mut conn| async move {
            let mut pipe = redis::pipe();
            for tag in tags_ref {
                pipe.cmd("ZADD").arg(UNACKED_INDEX).arg("XX").arg("CH").arg(score).arg(tag);
            }
            pipe.query_async(&mut conn).await
        })
        .await?;
    for (tag, n) in tags.iter().zip(changed) {
        if n == 0 && shared.held.lost(tag) {
            tracing::warn!(%tag, "a held message was put back by another worker (its lease lapsed); it may run twice");
        }
    }
    tracing::trace!(renewed = tags.len(), "renewed leases");
    Ok(())
}
