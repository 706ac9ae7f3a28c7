//! The core of celeriac: everything that is shared by the client, the worker and the transports,
//! and nothing that talks to a network or a disk.
//!
//! - [`protocol`]: Celery's message protocol v2 (headers, properties, body `[args, kwargs, embed]`)
//!   and its JSON encoding, byte-compatible with what Python Celery publishes.
//! - [`pyjson`]: Python's JSON exactly: integers of any size, floats as `repr` writes them, `NaN`
//!   and `Infinity`; every JSON that crosses a boundary is read and written through it.
//! - [`envelope`]: kombu's JSON envelope, the form a message takes in key-value transports
//!   (the embedded SQLite broker, and Redis).
//! - [`broker`] and [`backend`]: the two traits every transport implements.
//! - [`canvas`]: signatures, chains, groups and chords in Celery's JSON form, and what applying
//!   one publishes.
//! - [`broadcast`]: fanout, direct and topic exchanges, for remote control and events.
//! - [`task`]: the task registry, task options and the context a running task sees.
//! - [`task_thread`]: the hook a blocking task calls on the thread it runs on (for diagnosis).
//! - [`result`]: task states and the stored result layout (Celery's `celery-task-meta` JSON).
//! - [`retry`]: backoff schedules for task retries.
//! - [`error`]: typed errors.
//! - [`telemetry`]: process-wide counters of reconnects and publish retries, for metrics.
#![deny(missing_docs)]

pub mod backend;
pub mod broadcast;
pub mod broker;
pub mod canvas;
pub mod compression;
pub mod envelope;
pub mod error;
pub mod panics;
pub mod protocol;
pub mod pyjson;
pub mod pyrepr;
pub mod result;
pub mod retry;
mod strict;
pub mod task;
pub mod task_thread;
pub mod telemetry;

pub use backend::{ReplyTo, ResultBackend};
pub use broadcast::{Binding, ExchangeKind, ExchangeSpec, Exchanges, ForwardedSubscription, Subscription};
pub use broker::{Acker, Broker, Consumer, DeadLetter, Delivery, QueueInfo};
pub use compression::{Codec, CompressionError};
pub use error::{BackendError, BrokerError, ProtocolError};
pub use protocol::{Embed, Message, Properties, TaskBody, TaskHeaders};
pub use result::{ExceptionInfo, ResultMeta, TaskState};
pub use retry::{Backoff, PublishPolicy};
pub use task::{Registry, Task, TaskContext, TaskError, TaskOptions};

/// The default queue (and routing key) Celery uses when a task names none.
pub const DEFAULT_QUEUE: &str = "celery";
