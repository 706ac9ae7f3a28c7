//! Exchanges beyond plain queues: what remote control (Celery's pidbox) and events (`celeryev`)
//! travel on.
//!
//! Tasks go to named queues ([`Broker::publish`](crate::Broker::publish)). Remote control and
//! events need AMQP's other routing shapes, which Celery uses and which every operator tool
//! (`celery inspect`, Flower) expects:
//! - a **fanout** exchange (`celery.pidbox`): a command reaches every worker's own mailbox queue;
//! - a **direct** exchange (`reply.celery.pidbox`): a reply reaches the asking client's queue by its
//!   routing key;
//! - a **topic** exchange (`celeryev`): events routed by type (`worker.heartbeat`,
//!   `task.succeeded`) to every monitor bound with a pattern (`#`, `task.#`).
//!
//! A transport maps these onto what it has: RabbitMQ declares them for real; Redis follows kombu's
//! virtual exchanges (bindings kept in `_kombu.binding.<exchange>` sets, fanout over pub/sub). The
//! messages are transient and consumed without acknowledgement, as kombu's pidbox and event
//! receivers consume them: a control command or an event lost with a connection is not redelivered.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::BrokerError;
use crate::protocol::Message;

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// To the queues bound with exactly the routing key.
    Direct,
    /// To every bound queue, whatever the routing key.
    Fanout,
    /// To the queues whose binding pattern (`*` one word, `#` any words) matches the routing key.
    Topic,
}

impl ExchangeKind {
    /// The AMQP name of the kind (`direct`, `fanout`, `topic`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
        }
    }
}

/// An exchange, declared as Celery declares it (so neither side meets a PRECONDITION_FAILED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    /// Exchange name (`celery.pidbox`, `reply.celery.pidbox`, `celeryev`).
    pub name: String,
    /// How it routes.
    pub kind: ExchangeKind,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted by the broker when its last binding goes.
    pub auto_delete: bool,
}

/// A queue to create (if missing) and bind to an exchange, to receive from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Queue name (`<hostname>.celery.pidbox`, `<uuid>.reply.celery.pidbox`, `celeryev.<uuid>`).
    pub queue: String,
    /// Binding key: the routing key (direct), a pattern (topic); ignored for fanout.
    pub routing_key: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Only this connection may use it; deleted with it.
    pub exclusive: bool,
    /// Messages older than this are dropped (`x-message-ttl`).
    pub message_ttl: Option<Duration>,
    /// The queue is deleted after being unused this long (`x-expires`).
    pub expires: Option<Duration>,
}

/// Messages arriving on a [`Binding`], taken without acknowledgement.
#[async_trait]
pub trait Subscription: Send {
    /// Wait for the next message. Returns [`BrokerError::Closed`] once closed. Cancel-safe.
    async fn next(&mut self) -> Result<Message, BrokerError>;

    /// Stop receiving and remove what the subscription created that should not outlive it.
    async fn close(&mut self) {}
}

/// The exchange operations of a transport that has them (see the module documentation).
#[async_trait]
pub trait Exchanges: Send + Sync {
    /// Publish a message to an exchange (declaring it first if needed) with a routing key. A
    /// message no queue is bound to is dropped, as AMQP drops it: a broadcast nobody listens to
    /// is not an error.
    async fn publish_to(
        &self,
        exchange: &ExchangeSpec,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BrokerError>;

    /// Declare the exchange and the queue, bind them, and start receiving.
    async fn subscribe(&self, exchange: &ExchangeSpec, binding: &Binding)
        -> Result<Box<dyn Subscription>, BrokerError>;
}
