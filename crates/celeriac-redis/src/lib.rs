//! celeriac's Redis transport, compatible with Celery's: results written here are read by
//! Python's `AsyncResult.get()`, and results written by Python Celery are read here.
//!
//! `redis://[[user]:password@]host[:port][/db][?param=value&...]`; `rediss://` (TLS) is not
//! built in and is refused with a message saying so.
//!
//! - [`url`]: parsing of the URL and the parameters every Redis transport shares
//!   (`connect_timeout`, `command_timeout`), and password redaction.
//! - `conn`: connections with bounded waits: a self-healing command connection (the redis
//!   crate's `ConnectionManager`) and pub/sub connections.
//! - `pubsub`: one shared pub/sub connection that wakes result waiters.
//! - [`backend`]: [`RedisBackend`], results under `celery-task-meta-<id>` (with
//!   `result_expires`), published on the key's channel when stored.
//!
//! A Redis broker will sit beside the backend as a `broker` module sharing `url` and `conn`.
#![deny(missing_docs)]

pub mod backend;
mod conn;
mod pubsub;
pub mod url;

pub use backend::{RedisBackend, RedisBackendConfig};
pub use url::RedisUrl;
