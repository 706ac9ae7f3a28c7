//! The task queues a worker consumes, changeable while it runs (`add_consumer`,
//! `cancel_consumer`).
//!
//! The worker starts with one [`Consumer`] on its configured queues; each added queue gets a
//! consumer of its own. Cancelling a queue closes the consumer that reads it (and, when that
//! consumer read other queues too, starts a new one for them). A closed consumer is kept until the
//! worker stops, because deliveries it handed out may still be running and are settled through
//! it; it is flushed with the others at the end.

use std::sync::{Arc, Mutex};

use celeriac_core::{Broker, BrokerError, Consumer, Delivery};
use tokio::sync::oneshot;

/// A change asked for by remote control, answered with the reply text or an error.
pub(crate) enum QueueCommand {
    /// Start consuming a queue.
    Add(String, oneshot::Sender<Result<String, String>>),
    /// Stop consuming a queue.
    Cancel(String, oneshot::Sender<Result<String, String>>),
}

/// Every consumer of the worker.
pub(crate) struct Consumers {
    broker: Arc<dyn Broker>,
    prefetch: usize,
    active: Vec<(Vec<String>, Box<dyn Consumer>)>,
    closed: Vec<Box<dyn Consumer>>,
    /// The queues consumed, readable from elsewhere (remote control's `active_queues`).
    listing: Arc<Mutex<Vec<String>>>,
}

impl Consumers {
    /// Start consuming `queues` with one consumer.
    pub(crate) async fn start(
        broker: Arc<dyn Broker>,
        queues: &[String],
        prefetch: usize,
    ) -> Result<Self, BrokerError> {
        let first = broker.consume(queues, prefetch).await?;
        let listing = Arc::new(Mutex::new(queues.to_vec()));
        Ok(Consumers { broker, prefetch, active: vec![(queues.to_vec(), first)], closed: Vec::new(), listing })
    }

    /// The queues consumed now.
    pub(crate) fn queues(&self) -> Vec<String> {
        self.active.iter().flat_map(|(q, _)| q.iter().cloned()).collect()
    }

    /// A live view of [`Consumers::queues`].
    pub(crate) fn listing(&self) -> Arc<Mutex<Vec<String>>> {
        self.listing.clone()
    }

    fn update_listing(&self) {
        *self.listing.lock().unwrap_or_else(|p| p.into_inner()) = self.queues();
    }

    /// The next delivery from any consumer; pending forever when there is none. Cancel-safe, as
    /// each consumer's `next` is.
    pub(crate) async fn next(&mut self) -> Result<Delivery, BrokerError> {
        if self.active.is_empty() {
            return std::future::pending().await;
        }
        let nexts = self.active.iter_mut().map(|(_, c)| c.next());
        futures::future::select_all(nexts).await.0
    }

    /// Change the prefetch of every consumer (and of those added later); false when a transport
    /// cannot (see [`Consumer::set_prefetch`]).
    pub(crate) fn set_prefetch(&mut self, prefetch: usize) -> bool {
        self.prefetch = prefetch;
        self.active.iter_mut().fold(true, |all, (_, c)| c.set_prefetch(prefetch) && all)
    }

    /// Apply a remote-control change.
    pub(crate) async fn apply(&mut self, command: QueueCommand) {
        let (result, reply) = match command {
            QueueCommand::Add(queue, reply) => (self.add(&queue).await, reply),
            QueueCommand::Cancel(queue, reply) => (self.cancel(&queue).await, reply),
        };
        self.update_listing();
        if let Err(e) = &result {
            tracing::error!(error = %e, "remote control could not change the queues");
        }
        let _ = reply.send(result);
    }

    async fn add(&mut self, queue: &str) -> Result<String, String> {
        if self.queues().iter().any(|q| q == queue) {
            return Ok(format!("already consuming from {queue}"));
        }
        let consumer = self.broker.consume(&[queue.to_string()], self.prefetch).await.map_err(|e| e.to_string())?;
        self.active.push((vec![queue.to_string()], consumer));
        tracing::info!(%queue, "started consuming (remote control)");
        Ok(format!("add consumer {queue}"))
    }

    async fn cancel(&mut self, queue: &str) -> Result<String, String> {
        let Some(i) = self.active.iter().position(|(qs, _)| qs.iter().any(|q| q == queue)) else {
            return Ok(format!("not consuming from {queue}"));
        };
        let (queues, mut consumer) = self.active.remove(i);
        consumer.close().await;
        self.closed.push(consumer);
        let rest: Vec<String> = queues.into_iter().filter(|q| q != queue).collect();
        if !rest.is_empty() {
            match self.broker.consume(&rest, self.prefetch).await {
                Ok(c) => self.active.push((rest, c)),
                Err(e) => {
                    tracing::error!(queues = %rest.join(","), error = %e, "could not resume the other queues");
                    return Err(format!("stopped {queue}, but could not resume {}: {e}", rest.join(",")));
                }
            }
        }
        tracing::info!(%queue, "stopped consuming (remote control)");
        Ok(format!("no longer consuming from {queue}"))
    }

    /// Stop receiving on every consumer.
    pub(crate) async fn close(&mut self) {
        for (_, c) in &mut self.active {
            c.close().await;
        }
    }

    /// Flush every consumer, the closed ones too (see [`Consumer::flush`]).
    pub(crate) async fn flush(mut self) {
        for (_, c) in &mut self.active {
            c.flush().await;
        }
        for c in &mut self.closed {
            c.flush().await;
        }
    }
}
