//! The RabbitMQ broker (AMQP 0-9-1, on lapin), declared and published as Celery does.
//!
//! - [`url`]: `amqp://user:pass@host:port/vhost` parsed Celery's way (`//` is the vhost `/`).
//! - [`topology`]: what is declared for a queue: a durable direct exchange named after the queue,
//!   the durable queue (with `x-max-priority` / `x-queue-type` when asked), bound by the queue's
//!   name. This is what Celery declares, so both can run on the same queues.
//! - [`broker`]: the publisher: one connection with publisher confirms, `mandatory` publishes,
//!   many confirms in flight at once (callers await their own).
//! - [`consumer`]: one connection per consumer, prefetch by `basic.qos`, a background task that
//!   reconnects with capped backoff, and a settler that acknowledges in batches (`multiple` up to
//!   the highest contiguous completed tag; sent at once when every delivery so far is settled or
//!   a batch is full, at most a quarter of the prefetch, else within 2 ms). Settlements for a
//!   channel that died are dropped: RabbitMQ redelivers those messages.
//! - [`exchanges`]: fanout, direct and topic exchanges (remote control, events): declared as
//!   Celery declares them, consumed without acknowledgement on a connection of their own.
//! - [`fields`]: JSON headers to AMQP field tables and back.
//! - [`beat`]: beat's leader lease (an exclusive queue on a connection of its own) and last runs
//!   (one message in a queue of `x-max-length` 1).
//! - [`rpc`]: Celery's RPC result backend (`rpc://`): results published to the sending client's
//!   reply queue, read there by correlation id.

pub mod beat;
pub mod broker;
pub mod consumer;
pub mod exchanges;
pub mod fields;
pub mod rpc;
pub mod topology;
pub mod url;

pub use broker::AmqpBroker;
pub use rpc::RpcBackend;
pub use url::AmqpConfig;
