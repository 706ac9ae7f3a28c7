//! The embedded broker and result backend: one SQLite file, zero setup.
//!
//! `sqlite://path/to/file.db` (relative) or `sqlite:///abs/path.db`, with optional query
//! parameters `visibility_timeout` (seconds, default 30) and `poll_interval` (the longest idle
//! poll, in milliseconds, default 50), and for results `result_expires` (seconds, default one
//! day as Celery's setting; 0 keeps results forever).
//!
//! How it works:
//! - [`db`]: one connection per file per process, owned by a writer thread that executes queued
//!   operations in one transaction per batch (group commit), so thousands of publishes, acks and
//!   result writes per second cost a few commits. WAL mode and a busy timeout let several
//!   processes share the file.
//! - [`broker`]: messages are rows holding kombu's JSON envelope. Delivery is by *lease*: fetching
//!   a row sets its `visible_at` to now + the visibility timeout and records the consumer as its
//!   owner. While the consumer lives it renews the leases of everything it holds, so a running
//!   task is never redelivered; when the process dies the leases lapse and the rows become
//!   visible to other workers. An ETA message is stored with `visible_at` = its ETA, so it is not
//!   delivered before its time.
//! - [`backend`]: results in Celery's JSON layout, one row per task; expired results read as
//!   missing and their rows are deleted by a later store.
//! - [`snapshot`]: the newest messages and results, read through a read-only connection, for a
//!   monitor (the dashboard) that has no events on this broker.

mod backend;
mod broker;
mod db;
pub mod snapshot;
mod url;

pub use backend::SqliteBackend;
pub use broker::SqliteBroker;
pub use snapshot::{read_snapshot, Snapshot, StoredMessage, StoredResult};
pub use url::SqliteConfig;
