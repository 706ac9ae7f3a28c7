//! Exchanges on RabbitMQ: the real thing, declared with the arguments Celery uses.
//!
//! Publishing to an exchange goes through the publisher (`broker`): the exchange is declared once
//! per connection ([`topology::declare_exchange`]) and the message is published on the confirm
//! channel, not `mandatory` (a broadcast nobody listens to is dropped, as kombu's is).
//!
//! [`subscribe`](celeriac_core::Exchanges::subscribe) opens a connection of its own, declares the
//! exchange, the queue (`x-message-ttl` and `x-expires` in milliseconds, as kombu writes them) and
//! the binding, and consumes without acknowledgement, as kombu's pidbox and event receivers do
//! (the default exchange `""`, which routes to every queue by its name and can be neither declared
//! nor bound to, only gets its queue declared: the RPC backend's reply queue). A
//! background task forwards messages and, when the connection is lost, reconnects with a capped
//! backoff (0.5 s doubling to 30 s) and declares everything again (an exclusive or auto-delete
//! queue went with the old connection). Messages published while it was away are lost, which is
//! what a broadcast promises.

use std::time::Duration;

use celeriac_core::broadcast::{Binding, ExchangeSpec, ForwardedSubscription};
use celeriac_core::{BrokerError, Message};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::{mpsc, watch};

use crate::broker::{connect, unreachable};
use crate::consumer::to_message;
use crate::topology;
use crate::url::AmqpConfig;

/// The queue arguments of a binding, as kombu writes them (milliseconds).
fn binding_arguments(binding: &Binding) -> FieldTable {
    let mut args = FieldTable::default();
    let millis = |d: Duration| AMQPValue::LongInt(i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
    if let Some(ttl) = binding.message_ttl {
        args.insert("x-message-ttl".into(), millis(ttl));
    }
    if let Some(expires) = binding.expires {
        args.insert("x-expires".into(), millis(expires));
    }
    args
}

/// What one subscription declared and consumes.
#[derive(Clone)]
struct Plan {
    config: AmqpConfig,
    exchange: ExchangeSpec,
    binding: Binding,
}

/// A live connection consuming the bound queue.
struct Live {
    conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

impl Plan {
    async fn open(&self) -> Result<Live, BrokerError> {
        let conn = connect(&self.config, "celeriac subscription").await?;
        let lost = |e| unreachable(&self.config, e);
        let channel = conn.create_channel().await.map_err(lost)?;
        let b = &self.binding;
        let default_exchange = self.exchange.name.is_empty();
        let setup = async {
            if !default_exchange {
                topology::declare_exchange(&channel, &self.exchange).await?;
            }
            channel
                .queue_declare(
                    b.queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: b.durable,
                        exclusive: b.exclusive,
                        auto_delete: b.auto_delete,
                        ..QueueDeclareOptions::default()
                    },
                    binding_arguments(b),
                )
                .await?;
            if !default_exchange {
                channel
                    .queue_bind(
                        b.queue.as_str().into(),
                        self.exchange.name.as_str().into(),
                        b.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            channel
                .basic_consume(
                    b.queue.as_str().into(),
                    format!("celeriac-{}", uuid::Uuid::new_v4().simple()).as_str().into(),
                    BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                    FieldTable::default(),
                )
                .await
        };
        match setup.await {
            Ok(consumer) => Ok(Live { conn, channel, consumer }),
            Err(e) => {
                let _ = conn.close(200, "declaration failed".into()).await;
                let text = e.to_string();
                if text.contains("PRECONDITION_FAILED")
                    || text.contains("ACCESS_REFUSED")
                    || text.contains("RESOURCE_LOCKED")
                {
                    Err(BrokerError::Rejected {
                        url: self.config.redacted.clone(),
                        reason: if default_exchange {
                            format!("cannot declare queue {:?}: {text}", b.queue)
                        } else {
                            format!("cannot bind queue {:?} to exchange {:?}: {text}", b.queue, self.exchange.name)
                        },
                    })
                } else {
                    Err(unreachable(&self.config, e))
                }
            }
        }
    }
}

/// Forward messages of the subscription, reconnecting when the connection is lost.
async fn run(plan: Plan, first: Live, tx: mpsc::Sender<Message>, mut stop: watch::Receiver<bool>) {
    let mut live = Some(first);
    let mut backoff = Duration::from_millis(500);
    loop {
        let Live { conn, channel, mut consumer } = match live.take() {
            Some(l) => l,
            None => match plan.open().await {
                Ok(l) => {
                    tracing::info!(queue = %plan.binding.queue, exchange = %plan.exchange.name, "subscription restored");
                    backoff = Duration::from_millis(500);
                    l
                }
                Err(e) => {
                    tracing::warn!(queue = %plan.binding.queue, error = %e, retry_in = ?backoff, "cannot resubscribe");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(d)) => {
                        if tx.send(to_message(&d.properties, d.data)).await.is_err() {
                            let _ = conn.close(200, "subscription dropped".into()).await;
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(queue = %plan.binding.queue, error = %e, "subscription lost its connection");
                        break;
                    }
                    None => {
                        tracing::warn!(queue = %plan.binding.queue, "the broker cancelled the subscription");
                        break;
                    }
                },
                _ = stop.changed() => {
                    let tag = consumer.tag();
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "unsubscribed".into())).await;
                    return;
                }
            }
        }
        let _ = conn.close(320, "reconnecting".into()).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Declare, bind and start consuming; the first connection must succeed.
pub(crate) async fn subscribe(
    config: AmqpConfig,
    exchange: &ExchangeSpec,
    binding: &Binding,
) -> Result<ForwardedSubscription, BrokerError> {
    let plan = Plan { config, exchange: exchange.clone(), binding: binding.clone() };
    let live = plan.open().await?;
    Ok(ForwardedSubscription::spawn(Duration::from_secs(3), move |tx, stop| run(plan, live, tx, stop)))
}
