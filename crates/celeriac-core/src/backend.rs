//! The `ResultBackend` trait: where task outcomes are stored and read back.
//!
//! The worker stores an outcome *before* it acknowledges the message (acks late), so a stored
//! result is never lost with its message. Clients read results with [`ResultBackend::get`] and
//! wait with [`ResultBackend::wait`], whose default polls with a growing interval (1 ms up to
//! 50 ms) so it neither spins nor adds much latency; backends with notifications override it.
//!
//! Most backends keep results by task id, where any process reads them. Celery's RPC backend
//! (`rpc://`, in `celeriac-amqp`) instead sends each result to the queue of the client that sent
//! the task: the worker calls [`ResultBackend::store_for`] with the message's [`ReplyTo`], and the
//! client asks [`ResultBackend::reply_to`] for the queue to name in each task it sends. Both have
//! defaults that keep the by-id backends as they are.
//!
//! Two guarantees about revokes live here too, so that every worker of a fleet honours them and
//! a restart forgets none (Celery needs `--statedb` for the second):
//! - **Revoked ids are kept** ([`ResultBackend::record_revokes`], [`ResultBackend::revokes_since`]):
//!   a worker that hears a revoke records it here with the time, a worker that starts loads the
//!   ids revoked in the last [`REVOKE_EXPIRES`] (at most [`REVOKES_MAX`], Celery's limits) and
//!   keeps its in-memory set current from broadcasts and from a periodic read of what was
//!   recorded since. The defaults keep nothing ([`ResultBackend::keeps_revokes`] is false): a
//!   worker on such a backend remembers revokes in memory only, and says so at start.
//! - **A REVOKED result is final** ([`ResultBackend::store_outcome`]): the worker stores every
//!   outcome through it, and a backend that can check and write in one step refuses to replace a
//!   stored REVOKED state, so a task revoked while it ran, or run by a worker that never heard of
//!   the revoke, stays REVOKED. The default stores unconditionally.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::canvas::join::ChordPart;
use crate::error::BackendError;
use crate::protocol::Message;
use crate::result::ResultMeta;

/// Where the sender of a task waits for its result: the task message's `reply_to` and
/// `correlation_id` properties (Celery's `Request.reply_to` / `Request.correlation_id`, used by
/// its RPC backend's `destination_for`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyTo<'a> {
    /// The queue the sender consumes results from (`None` or empty: it named none).
    pub queue: Option<&'a str>,
    /// The id to answer with; Celery falls back to the task id when it is absent.
    pub correlation_id: Option<&'a str>,
}

impl<'a> ReplyTo<'a> {
    /// The reply destination a task message names.
    pub fn of(message: &'a Message) -> Self {
        ReplyTo {
            queue: message.properties.reply_to.as_deref().filter(|q| !q.is_empty()),
            correlation_id: message.properties.correlation_id.as_deref().filter(|c| !c.is_empty()),
        }
    }
}

/// How long a revoked id is remembered (Celery's `REVOKE_EXPIRES`, three hours).
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(3 * 3600);

/// How many revoked ids are remembered at most (Celery's `REVOKES_MAX`); the oldest go first.
pub const REVOKES_MAX: usize = 50_000;

/// What [`ResultBackend::store_outcome`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The result was written.
    Written,
    /// The task's stored state is REVOKED; it was kept and the new result dropped.
    KeptRevoked,
}

/// A revoked task id and when it was revoked (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Revoke {
    /// The task id.
    pub task_id: String,
    /// When it was revoked, Unix seconds.
    pub at: f64,
}

/// How a chord header task's outcome joined its chord ([`ResultBackend::store_chord_part`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Joined {
    /// Counted (or counted already, by an earlier run of the same task); other parts are still
    /// to come.
    Waiting,
    /// Every part is in and this worker holds the claim to send the body: apply it with the
    /// parts (in header order), then [`ResultBackend::clear_chord`] with the claim.
    Complete {
        /// Every part, in header order.
        parts: Vec<ChordPart>,
        /// The claim token, for `clear_chord`.
        claim: String,
    },
    /// Every part is in and another worker holds the claim (it is sending the body now, or died
    /// doing so and its claim will lapse): ask again later.
    ClaimedElsewhere,
    /// The body was sent already (or the chord failed and was settled): nothing to do.
    Done,
}

/// The current time in Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A store of task results.
#[async_trait]
pub trait ResultBackend: Send + Sync + 'static {
    /// The backend's URL with any password removed.
    fn url(&self) -> &str;

    /// Store (or replace) the result of a task.
    async fn store(&self, meta: &ResultMeta) -> Result<(), BackendError>;

    /// Store the result of a task whose message named `reply` as where its sender waits. The
    /// worker calls this whenever it has the task's message. Default: [`store`](Self::store), as
    /// a backend that keeps results by task id has no use for the sender's queue; the RPC
    /// backend publishes the result to `reply.queue` instead.
    async fn store_for(&self, meta: &ResultMeta, reply: ReplyTo<'_>) -> Result<(), BackendError> {
        let _ = reply;
        self.store(meta).await
    }

    /// The queue this client's results come back on, to be named as `reply_to` in every task it
    /// sends, for backends that deliver results to the sender (the RPC backend, which declares
    /// the queue and starts consuming it on the first call). Default: `None`, results are kept
    /// where any process can read them and the client names no reply queue.
    async fn reply_to(&self) -> Result<Option<String>, BackendError> {
        Ok(None)
    }

    /// Store a task's outcome (for the sender at `reply`, as [`store_for`](Self::store_for))
    /// unless its stored state is REVOKED (see the module documentation). A REVOKED outcome is
    /// always written. Default: [`store_for`](Self::store_for), unconditionally (a backend that
    /// cannot check and write in one step, or that keeps no state, as the RPC backend).
    async fn store_outcome(&self, meta: &ResultMeta, reply: ReplyTo<'_>) -> Result<Stored, BackendError> {
        self.store_for(meta, reply).await.map(|()| Stored::Written)
    }

    /// Whether revokes recorded here are kept across restarts and seen by every worker using
    /// this backend. Default: no.
    fn keeps_revokes(&self) -> bool {
        false
    }

    /// Record task ids as revoked at `at` (Unix seconds), forgetting those older than
    /// [`REVOKE_EXPIRES`] and beyond the [`REVOKES_MAX`] newest. Recording an id again moves its
    /// time. Default: nothing is kept.
    async fn record_revokes(&self, task_ids: &[String], at: f64) -> Result<(), BackendError> {
        let _ = (task_ids, at);
        Ok(())
    }

    /// The ids recorded as revoked at or after `since` (Unix seconds) and not yet expired, oldest
    /// first. Default: none.
    async fn revokes_since(&self, since: f64) -> Result<Vec<Revoke>, BackendError> {
        let _ = since;
        Ok(Vec::new())
    }

    /// Whether this backend joins chords (counts the header tasks and tells the worker that
    /// finishes the last one to apply the body). A client refuses to send a chord to a backend
    /// that does not, rather than let its body never run. Default: no.
    fn supports_chords(&self) -> bool {
        false
    }

    /// Record how many header tasks the chord with this group id has, before any is sent
    /// (Celery's `set_chord_size`). Default: unsupported.
    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        let _ = (group_id, size);
        Err(self.no_chords())
    }

    /// Store a chord header task's outcome and count it into its chord's join, in one step. A
    /// part is counted once per task and place (a header task run twice is not counted twice),
    /// and once every part is in, one caller at a time gets the claim to send the body
    /// ([`Joined::Complete`]); after [`clear_chord`](Self::clear_chord) the chord is done for
    /// every later caller. The REVOKED rule of [`store_outcome`](Self::store_outcome) applies.
    /// Default: unsupported.
    async fn store_chord_part(
        &self,
        meta: &ResultMeta,
        reply: ReplyTo<'_>,
        part: &ChordPart,
    ) -> Result<(Stored, Joined), BackendError> {
        let _ = (meta, reply, part);
        Err(self.no_chords())
    }

    /// Forget a chord's join once its body has been sent (or the chord failed), if `claim` is
    /// still the claim held, and mark the chord done. Default: nothing kept.
    async fn clear_chord(&self, group_id: &str, claim: &str) -> Result<(), BackendError> {
        let _ = (group_id, claim);
        Ok(())
    }

    /// Save a group's result handle so any client can restore it by the group's id (Celery's
    /// `GroupResult.save`: `celery-taskset-meta-<id>` holding `{"result": <tuple>}`, see
    /// `celery/backends/base.py` `_save_group`). Default: unsupported.
    async fn save_group(&self, group: &crate::canvas::ResultRef) -> Result<(), BackendError> {
        let _ = group;
        Err(BackendError::Unsupported {
            url: self.url().to_string(),
            operation: "save a group".into(),
            reason: "this result backend keeps no group results".into(),
        })
    }

    /// A group saved with [`save_group`](Self::save_group) (by celeriac or Celery), `None` when
    /// there is none. Default: none.
    async fn restore_group(&self, group_id: &str) -> Result<Option<crate::canvas::ResultRef>, BackendError> {
        let _ = group_id;
        Ok(None)
    }

    /// The error of a backend that does not join chords.
    fn no_chords(&self) -> BackendError {
        BackendError::Unsupported {
            url: self.url().to_string(),
            operation: "join a chord".into(),
            reason:
                "this result backend does not count chord header tasks; use a Redis or SQLite result backend for chords"
                    .into(),
        }
    }

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
