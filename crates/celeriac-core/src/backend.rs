//! The `ResultBackend` trait: where task outcomes are stored and read back.
//!
//! The worker stores an outcome *before* it acknowledges the message (acks late), so a stored
//! result is never lost with its message. Clients read results with [`ResultBackend::get`] and
//! wait with [`ResultBackend::wait`], whose default polls with a growing interval (1 ms up to
//! 50 ms) so it neither spins nor adds much latency; backends with notifications override it.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::BackendError;
use crate::result::ResultMeta;

/// A store of task results.
#[async_trait]
pub trait ResultBackend: Send + Sync + 'static {
    /// The backend's URL with any password removed.
    fn url(&self) -> &str;

    /// Store (or replace) the result of a task.
    async fn store(&self, meta: &ResultMeta) -> Result<(), BackendError>;

    /// Read the result of a task, `None` when nothing is stored (PENDING).
    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError>;

    /// Remove the result of a task.
    async fn forget(&self, task_id: &str) -> Result<(), BackendError>;

    /// Wait until the task's result is ready (SUCCESS, FAILURE or REVOKED), or time out.
    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultMeta, BackendError> {
        let start = Instant::now();
        let mut interval = Duration::from_millis(1);
        loop {
            if let Some(meta) = self.get(task_id).await? {
                if meta.status.is_ready() {
                    return Ok(meta);
                }
            }
            if let Some(limit) = timeout {
                let waited = start.elapsed();
                if waited >= limit {
                    return Err(BackendError::Timeout { task_id: task_id.to_string(), waited });
                }
                interval = interval.min(limit - waited);
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(50));
        }
    }
}

/// The backend used when results are disabled: stores nothing, reads nothing.
#[derive(Debug, Default, Clone)]
pub struct DisabledBackend;

#[async_trait]
impl ResultBackend for DisabledBackend {
    fn url(&self) -> &str {
        "disabled://"
    }

    async fn store(&self, _meta: &ResultMeta) -> Result<(), BackendError> {
        Ok(())
    }

    async fn get(&self, _task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        Err(BackendError::Disabled)
    }

    async fn forget(&self, _task_id: &str) -> Result<(), BackendError> {
        Ok(())
    }

    async fn wait(&self, _task_id: &str, _timeout: Option<Duration>) -> Result<ResultMeta, BackendError> {
        Err(BackendError::Disabled)
    }
}
