//! celeriac's Redis transport, compatible with Celery's: results written here are read by
//! Python's `AsyncResult.get()`, and results written by Python Celery are read here; tasks
//! published here are consumed by Python workers, and tasks Python publishes are consumed here.
//!
//! `redis://[[user]:password@]host[:port][/db][?param=value&...]`; `rediss://` (TLS) is not
//! built in and is refused with a message saying so.
//!
//! - [`url`]: parsing of the URL and the parameters every Redis transport shares
//!   (`connect_timeout`, `command_timeout`), and password redaction.
//! - `conn`: connections with bounded waits: a self-healing command connection (the redis
//!   crate's `ConnectionManager`), pub/sub connections, and connections for blocking commands.
//! - `pubsub`: one shared pub/sub connection that wakes result waiters.
//! - [`backend`]: [`RedisBackend`], results under `celery-task-meta-<id>` (with
//!   `result_expires`), published on the key's channel when stored.
//! - [`broker`]: [`RedisBroker`], queues as kombu lays them out (lists, priority sublists,
//!   `_kombu.binding.*`, `unacked` + `unacked_index`), with lease renewal and dead letters.
#![deny(missing_docs)]

pub mod backend;
pub mod broker;
mod conn;
mod pubsub;
pub mod url;

pub use backend::{RedisBackend, RedisBackendConfig};
pub use broker::{RedisBroker, RedisBrokerConfig};
pub use url::RedisUrl;
