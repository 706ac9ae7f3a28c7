//! celeriac: a distributed task queue for Rust that speaks Celery's wire protocol.
//!
//! ```no_run
//! use celeriac::{App, Client, TaskError};
//!
//! #[celeriac::task(name = "math.add")]
//! async fn add(x: i64, y: i64) -> Result<i64, TaskError> {
//!     Ok(x + y)
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("sqlite://celeriac.db", None).await?;
//! let result = add::delay(&client, 2, 3).await?;
//! let sum: i64 = result.get_as(Some(std::time::Duration::from_secs(10))).await?;
//! # Ok(()) }
//! ```
//!
//! A worker binary registers its tasks on an [`App`] and hands control to [`App::run_cli`], which
//! gives it the `celeriac` subcommands (`worker`, `send`, `result`, `queues`, `purge`, ...).
//!
//! Modules:
//! - [`client`]: [`Client`], [`Signature`], [`AsyncResult`]: sending tasks and reading results;
//! - [`canvas`]: workflows: [`canvas::chain`], [`canvas::group`], [`canvas::chord`], callbacks;
//! - [`app`]: [`App`], the task registry plus configuration;
//! - [`connect`]: URL → broker / result backend;
//! - [`control`]: remote control of running workers (Celery's pidbox);
//! - [`builtins`]: the diagnostic tasks (`celeriac.ping`, `celeriac.add`, ...);
//! - [`cli`]: the command line, shared by the `celeriac` binary and user binaries.
#![deny(missing_docs)]

extern crate self as celeriac;

pub mod app;
pub mod builtins;
pub mod canvas;
pub mod cli;
pub mod client;
pub mod connect;
pub mod control;
#[cfg(feature = "dashboard")]
pub mod dashboard;

pub use app::App;
pub use celeriac_core::{
    protocol, Backoff, Broker, Codec, ExceptionInfo, Registry, ResultBackend, ResultMeta, Task, TaskContext, TaskError,
    TaskOptions, TaskState,
};
pub use celeriac_macros::task;
pub use celeriac_worker::{Shutdown, Worker, WorkerConfig};
pub use client::{AsyncResult, Client, PublishError, ResultError, SendOptions, Signature};

/// Periodic tasks declared in Rust ([`App::periodic`]): `Entry::every`, `Entry::cron`, and the
/// schedule's timezone ([`App::timezone`]).
pub mod periodic {
    pub use celeriac_beat::{CatchUp, Entry};
    pub use chrono_tz::Tz;
}
pub use connect::ConnectError;

/// Items used by the code `#[celeriac::task]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use celeriac_core::panics;
    pub use celeriac_core::task::{to_result_value, ArgDecoder, TaskFuture};
    pub use celeriac_core::task_thread;
    pub use serde_json::{Map, Value};
    pub use tokio;
}
