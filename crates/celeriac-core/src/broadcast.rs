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
use tokio::sync::{mpsc, watch};

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

    /// Whether Celery's events exchange (`celeryev`) is a fanout on this transport rather than a
    /// topic exchange. Celery's `get_exchange` makes it a fanout on kombu's Redis transport, so
    /// Flower and `celery events` there listen on the fanout channel. Default: `false`.
    fn events_as_fanout(&self) -> bool {
        false
    }
}

/// A [`Subscription`] fed by a background task of the transport (which reads the connection,
/// reconnects, and forwards each message), the usual way to implement one.
pub struct ForwardedSubscription {
    rx: mpsc::Receiver<Message>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    close_wait: Duration,
}

impl ForwardedSubscription {
    /// Spawn `task` with the sender to forward messages on and a stop flag. The task must return
    /// soon after the flag turns `true` (or its sender is dropped with the subscription), and
    /// clean up what should not outlive the subscription before it does; [`Subscription::close`]
    /// waits up to `close_wait` for it.
    pub fn spawn<F, Fut>(close_wait: Duration, task: F) -> Self
    where
        F: FnOnce(mpsc::Sender<Message>, watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(task(tx, stop_rx));
        ForwardedSubscription { rx, stop, task: Some(task), close_wait }
    }
}

#[async_trait]
impl Subscription for ForwardedSubscription {
    async fn next(&mut self) -> Result<Message, BrokerError> {
        self.rx.recv().await.ok_or(BrokerError::Closed)
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        self.rx.close();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(self.close_wait, task).await;
        }
    }
}

impl Drop for ForwardedSubscription {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
