//! Declaring a queue the way Celery does.
//!
//! For a queue `q` Celery (kombu) declares: exchange `q`, type `direct`, durable, not
//! auto-deleted; queue `q`, durable, not exclusive, not auto-deleted, with `x-max-priority` when
//! `task_queue_max_priority` is set and `x-queue-type: quorum` for quorum queues; a binding of `q`
//! to exchange `q` with routing key `q`.
//! Declaring the same thing twice is harmless; declaring it differently is a
//! `PRECONDITION_FAILED` from RabbitMQ, reported with the server's words. Like Celery, tasks are
//! published to the default exchange (`""`) with the queue's name as routing key; the named
//! exchange and binding are declared for those who route through them.

use celeriac_core::broadcast::{ExchangeKind as Kind, ExchangeSpec};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::url::AmqpConfig;

/// The queue arguments celeriac declares (and Celery would, configured the same way).
pub fn queue_arguments(config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(p) = config.max_priority {
        args.insert("x-max-priority".into(), AMQPValue::LongLongInt(i64::from(p)));
    }
    if config.quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    }
    args
}

/// Declare the exchange, the queue and the binding for `queue`. Returns the queue's message and
/// consumer counts.
pub async fn declare(channel: &Channel, config: &AmqpConfig, queue: &str) -> Result<(u32, u32), lapin::Error> {
    channel
        .exchange_declare(
            queue.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        )
        .await?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() },
            queue_arguments(config),
        )
        .await?;
    channel
        .queue_bind(queue.into(), queue.into(), queue.into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// The lapin kind of an exchange.
fn lapin_kind(kind: Kind) -> ExchangeKind {
    match kind {
        Kind::Direct => ExchangeKind::Direct,
        Kind::Fanout => ExchangeKind::Fanout,
        Kind::Topic => ExchangeKind::Topic,
    }
}

/// Declare an exchange as the spec says (remote control's and events' exchanges).
pub(crate) async fn declare_exchange(channel: &Channel, exchange: &ExchangeSpec) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.name.as_str().into(),
            lapin_kind(exchange.kind),
            ExchangeDeclareOptions {
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}
