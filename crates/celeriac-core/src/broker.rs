//! The `Broker` trait: one interface for every transport.
//!
//! A broker publishes [`Message`]s to named queues and hands them to consumers as
//! [`Delivery`]s. A delivery is settled exactly once, by [`Delivery::ack`] (done),
//! [`Delivery::reject`] (give up, or put back with `requeue`) or [`Delivery::dead_letter`]
//! (unprocessable, kept aside with a reason). A delivery dropped without being settled is put back
//! by the transport. Nothing above this trait knows which transport it talks to; a capability only
//! some transports have is a trait method with a documented default.

use async_trait::async_trait;

use crate::error::BrokerError;
use crate::protocol::Message;

/// Depth of one queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Messages ready to be delivered now.
    pub ready: u64,
    /// Messages waiting for their ETA (transports that hold them natively), else 0.
    pub scheduled: u64,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    /// Consumers attached, where the transport knows.
    pub consumers: Option<u64>,
    /// Dead-lettered messages from this queue, where the transport keeps them.
    pub dead: u64,
}

/// A message set aside as unprocessable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The transport's id for it.
    pub id: i64,
    /// Queue it came from.
    pub queue: String,
    /// Its task id, if it had one.
    pub task_id: Option<String>,
    /// Why it was set aside.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub dead_at_ms: i64,
}

/// A message transport.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The broker's URL with any password removed, for messages and logs.
    fn url(&self) -> &str;

    /// Publish a message to a queue. Returns once the broker has taken responsibility for it.
    async fn publish(&self, queue: &str, message: &Message) -> Result<(), BrokerError>;

    /// Start consuming from the given queues, with at most `prefetch` deliveries unsettled.
    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError>;

    /// Remove every message ready in the queue (as RabbitMQ's `queue.purge`: not those a consumer
    /// holds, nor those scheduled for a later ETA); returns how many were removed.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Depths of the given queues, or of every queue the broker knows when `queues` is empty.
    async fn queues(&self, queues: &[String]) -> Result<Vec<QueueInfo>, BrokerError>;

    /// The most recent dead-lettered messages, newest first. Transports that keep no
    /// dead-letter store of their own (RabbitMQ hands them to a dead-letter exchange) say so with
    /// [`BrokerError::Rejected`].
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let _ = limit;
        Err(BrokerError::Rejected {
            url: self.url().to_string(),
            reason: "this broker keeps no dead-letter store".into(),
        })
    }

    /// Set a copy of `message` aside among the dead letters with `reason`, without taking
    /// anything from a queue: what a worker records of a message it ran but could not carry out
    /// in full (a malformed continuation in its embed), for `celeriac dead-letters` to show.
    /// Returns whether it was recorded. Default: `false`, the transport keeps no dead-letter
    /// store (RabbitMQ's dead letters go to an exchange, through a rejected delivery).
    async fn record_dead_letter(&self, queue: &str, message: &Message, reason: &str) -> Result<bool, BrokerError> {
        let _ = (queue, message, reason);
        Ok(false)
    }

    /// Take, or renew, the lease `name` for `holder` until `ttl` from now: whether `holder`
    /// holds it afterwards. At most one holder has a lease at a time, through the broker itself
    /// (no other service): what lets any number of beats run with one sending. A holder that
    /// stops renewing loses the lease when `ttl` has passed, and only then can another take it.
    /// Default: unsupported ([`BrokerError::Rejected`]).
    async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool, BrokerError> {
        let _ = (name, holder, ttl);
        Err(BrokerError::Rejected { url: self.url().to_string(), reason: "this broker holds no leases".into() })
    }

    /// The last run sent of each entry of the schedule `schedule` (entry name → scheduled time,
    /// Unix milliseconds), as [`record_runs`](Self::record_runs) kept them, where every beat
    /// sees them. Default: unsupported.
    async fn last_runs(&self, schedule: &str) -> Result<std::collections::HashMap<String, i64>, BrokerError> {
        let _ = schedule;
        Err(BrokerError::Rejected { url: self.url().to_string(), reason: "this broker keeps no beat state".into() })
    }

    /// Record the last run sent of entries of `schedule` (entry name, scheduled time in Unix
    /// milliseconds; beat writes a negated time for an entry followed but not yet run,
    /// `celeriac_beat::Record`); a kept value is replaced only by a larger one. Default:
    /// unsupported.
    async fn record_runs(&self, schedule: &str, runs: &[(String, i64)]) -> Result<(), BrokerError> {
        let _ = (schedule, runs);
        Err(BrokerError::Rejected { url: self.url().to_string(), reason: "this broker keeps no beat state".into() })
    }

    /// Give the lease `name` up if `holder` holds it, so another can take it at once.
    /// Default: nothing to give up.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let _ = (name, holder);
        Ok(())
    }

    /// How long a delivery may stay unacknowledged before the broker takes it back (RabbitMQ's
    /// `consumer_timeout` closes the channel). A worker holding an early ETA message longer than
    /// this republishes it instead. Default: no limit.
    fn max_unacked_hold(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether the transport itself withholds a message until its `eta` header. When it does
    /// (the embedded SQLite broker), a worker never holds a delivery for an ETA; when it does not
    /// (the default), the worker keeps an early delivery unacked until its time.
    fn delivers_eta_natively(&self) -> bool {
        false
    }

    /// The transport's exchanges (fanout, direct, topic), which remote control and events need;
    /// `None` when it has none (the embedded SQLite broker).
    fn exchanges(&self) -> Option<&dyn crate::broadcast::Exchanges> {
        None
    }
}

/// A stream of deliveries from one or more queues.
#[async_trait]
pub trait Consumer: Send {
    /// Wait for the next delivery. Returns [`BrokerError::Closed`] once the consumer is closed.
    ///
    /// Must be cancel-safe: the worker races it against other events, and dropping a pending
    /// call must not lose a message.
    async fn next(&mut self) -> Result<Delivery, BrokerError>;

    /// Stop receiving. Deliveries already handed out stay valid and must still be settled;
    /// deliveries fetched but not yet handed out are put back.
    async fn close(&mut self);

    /// Make sure every settlement made so far has reached the broker (transports that batch
    /// acknowledgements send them now), then release the connection. Called once, last.
    async fn flush(&mut self) {}

    /// Change how many deliveries may be unsettled at once, from now on (deliveries already
    /// handed out stay valid). Returns false when the transport cannot change it while consuming
    /// (the default), and the prefetch given to [`Broker::consume`] stays in force.
    fn set_prefetch(&mut self, prefetch: usize) -> bool {
        let _ = prefetch;
        false
    }
}

/// How a transport settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message was processed: remove it.
    async fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    /// The message was not processed: put it back (`requeue`) or drop it.
    async fn reject(self: Box<Self>, requeue: bool) -> Result<(), BrokerError>;
    /// The message cannot be processed: keep it aside with the reason. Transports without a
    /// dead-letter store drop it (RabbitMQ routes it to the queue's dead-letter exchange, if any).
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        let _ = reason;
        self.reject(false).await
    }
    /// The message was never started: give it back so that another consumer can take it, as
    /// near the front of its queue as the transport allows, and without counting it as a failed
    /// delivery where the transport can avoid it. Default: [`Acker::reject`] with `requeue`
    /// (RabbitMQ puts a rejected message back in its place).
    async fn release(self: Box<Self>) -> Result<(), BrokerError> {
        self.reject(true).await
    }
}

/// One message handed to a consumer, to be settled exactly once.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// The queue it came from.
    pub queue: String,
    /// The exchange it was published to, as the transport saw it (`""`: the default exchange,
    /// or a transport that keeps none). Celery's `delivery_info["exchange"]`.
    pub exchange: String,
    /// The routing key it was published with (the queue's name unless the transport says
    /// otherwise). Celery's `delivery_info["routing_key"]`.
    pub routing_key: String,
    /// How many times it has been delivered, this time included (1 on first delivery). Transports
    /// that only know "redelivered or not" report 1 or 2.
    pub delivery_count: u32,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("task_id", &self.message.task_id())
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

impl Delivery {
    /// Wrap a message with the transport's settlement handle. Its route is the default
    /// exchange and the queue's name until [`Delivery::with_route`] says otherwise.
    pub fn new(message: Message, queue: impl Into<String>, delivery_count: u32, acker: Box<dyn Acker>) -> Self {
        let queue = queue.into();
        Delivery { message, routing_key: queue.clone(), queue, exchange: String::new(), delivery_count, acker }
    }

    /// The exchange and routing key the message was published with, as the transport knows
    /// them (AMQP's `basic.deliver`, kombu's `delivery_info` in a Redis envelope). An empty
    /// routing key keeps the queue's name.
    pub fn with_route(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        let routing_key = routing_key.into();
        if !routing_key.is_empty() {
            self.routing_key = routing_key;
        }
        self
    }

    /// Whether this message was delivered before.
    pub fn redelivered(&self) -> bool {
        self.delivery_count > 1
    }

    /// Acknowledge: the message is done and removed.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    /// Reject: put back (`requeue`) or drop.
    pub async fn reject(self, requeue: bool) -> Result<(), BrokerError> {
        self.acker.reject(requeue).await
    }

    /// Give back a message that was never started, for another consumer (see [`Acker::release`]).
    pub async fn release(self) -> Result<(), BrokerError> {
        self.acker.release().await
    }

    /// Move aside as unprocessable, with the reason.
    pub async fn dead_letter(self, reason: &str) -> Result<(), BrokerError> {
        self.acker.dead_letter(reason).await
    }

    /// Split into the message and its settlement handle (for settling from elsewhere).
    pub fn into_parts(self) -> (Message, String, u32, Box<dyn Acker>) {
        (self.message, self.queue, self.delivery_count, self.acker)
    }
}

/// What every [`Broker`] that holds leases must do, checked on a real one: for transport
/// implementers' tests (celeriac's Redis and SQLite brokers run it). Uses a fresh lease name;
/// returns what did not hold. Takes about `3 × ttl`.
///
/// One holder at a time; the holder renews; another cannot take it while it is valid, can once
/// it has lapsed, and at once after a release.
pub async fn check_lease_contract(broker: &dyn Broker, ttl: std::time::Duration) -> Result<(), String> {
    let name = format!("contract-{}", uuid::Uuid::new_v4().simple());
    let err = |e: BrokerError| e.to_string();
    let take = |holder: &'static str| {
        let name = name.clone();
        async move { broker.lease(&name, holder, ttl).await }
    };
    if !take("a").await.map_err(err)? {
        return Err("a free lease must be taken".into());
    }
    if take("b").await.map_err(err)? {
        return Err("a lease held by another must not be taken".into());
    }
    let started = std::time::Instant::now();
    // Renewed by its holder past its first term: still not another's.
    while started.elapsed() < ttl * 2 {
        if !take("a").await.map_err(err)? {
            return Err("the holder must be able to renew its lease".into());
        }
        if take("b").await.map_err(err)? {
            return Err("a renewed lease must not be taken by another".into());
        }
        tokio::time::sleep(ttl / 4).await;
    }
    // Not renewed: lapses after its term, not before.
    let last_renewal = std::time::Instant::now();
    if !take("a").await.map_err(err)? {
        return Err("the holder must be able to renew its lease".into());
    }
    loop {
        let taken = take("b").await.map_err(err)?;
        let waited = last_renewal.elapsed();
        if taken {
            if waited < ttl {
                return Err(format!("another took the lease {waited:?} after its renewal, within its term of {ttl:?}"));
            }
            break;
        }
        if waited > ttl * 3 {
            return Err(format!("a lease not renewed for {waited:?} (term {ttl:?}) was never given to another"));
        }
        tokio::time::sleep(ttl / 10).await;
    }
    broker.release_lease(&name, "b").await.map_err(err)?;
    if !take("c").await.map_err(err)? {
        return Err("a released lease must be free at once".into());
    }
    broker.release_lease(&name, "c").await.map_err(err)
}
