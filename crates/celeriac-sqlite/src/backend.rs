//! The SQLite result backend: one row per task, holding Celery's result JSON.
//!
//! Results expire after `result_expires` (URL parameter, seconds; default one day as Celery's
//! setting, `0` keeps them): an expired result reads as missing at once, and its row is deleted
//! by the next store once the last clean-up is older than a minute (or than `result_expires`,
//! if shorter), so no beat task is needed.
//!
//! An outcome the worker stores ([`ResultBackend::store_outcome`]) never replaces an unexpired
//! REVOKED state: the check and the write are one `INSERT ... ON CONFLICT DO UPDATE ... WHERE`
//! statement. Revoked ids are kept in the table `revoked` (task id, time of the revoke), trimmed
//! to Celery's three hours and 50,000 newest on every write, so every worker on the file sees them
//! and a restart keeps them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celeriac_core::backend::{Joined, ReplyTo, Revoke, Stored, REVOKES_MAX, REVOKE_EXPIRES};
use celeriac_core::canvas::join::ChordPart;
use celeriac_core::canvas::{read_saved_group, saved_group, ResultRef};
use celeriac_core::{BackendError, ResultBackend, ResultMeta};

use crate::db::{now_ms, Db, JoinState, Op, Outcome, PartRow};

/// How long one worker's claim to send a chord's body lasts.
const CHORD_CLAIM: Duration = Duration::from_secs(30);
use crate::url::SqliteConfig;

/// The longest pause between two deletions of expired results.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// A result backend on one SQLite file (usually the broker's own).
#[derive(Clone)]
pub struct SqliteBackend {
    db: Arc<Db>,
    config: SqliteConfig,
    /// When expired rows were last deleted (ms since the epoch; 0: not yet).
    last_cleanup_ms: Arc<AtomicI64>,
}

impl SqliteBackend {
    /// Open the backend described by a `sqlite://` URL.
    pub fn open(url: &str) -> Result<Self, BackendError> {
        let config =
            SqliteConfig::from_url(url).map_err(|reason| BackendError::BadUrl { url: url.to_string(), reason })?;
        let db = Db::open(&config.path).map_err(|reason| BackendError::Unreachable { url: url.to_string(), reason })?;
        Ok(SqliteBackend { db, config, last_cleanup_ms: Default::default() })
    }

    /// Open the backend of an existing file for a monitor: results and revoked ids are read on
    /// a read-only connection, and the file is opened for writing only when something is
    /// stored (a revoke recorded). `Unreachable` if the file does not exist.
    pub fn open_read_only(url: &str) -> Result<Self, BackendError> {
        let config =
            SqliteConfig::from_url(url).map_err(|reason| BackendError::BadUrl { url: url.to_string(), reason })?;
        let db = Db::open_read_only(&config.path)
            .map_err(|reason| BackendError::Unreachable { url: url.to_string(), reason })?;
        Ok(SqliteBackend { db, config, last_cleanup_ms: Default::default() })
    }

    /// Results stored before this instant (ms) have expired.
    fn expired_before(&self, now: i64) -> i64 {
        match self.config.result_expires {
            Some(keep) => now - keep.as_millis() as i64,
            None => i64::MIN,
        }
    }

    /// Queue the deletion of expired rows when the last one is old enough.
    fn clean_up_if_due(&self) {
        let Some(keep) = self.config.result_expires else { return };
        let every = keep.min(CLEANUP_EVERY).as_millis() as i64;
        let now = now_ms();
        let last = self.last_cleanup_ms.load(Ordering::Relaxed);
        if now - last < every {
            return;
        }
        if self.last_cleanup_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.db.send(Op::ExpireResults { before: self.expired_before(now) });
        }
    }

    fn io(&self, reason: String) -> BackendError {
        BackendError::Io { url: self.config.url.clone(), reason }
    }
}

#[async_trait]
impl ResultBackend for SqliteBackend {
    fn url(&self) -> &str {
        &self.config.url
    }

    async fn store(&self, meta: &ResultMeta) -> Result<(), BackendError> {
        self.clean_up_if_due();
        let (task_id, status, json) = (meta.task_id.clone(), meta.status.as_str().to_string(), meta.to_json());
        self.db.call(|reply| Op::StoreResult { task_id, status, meta: json, reply }).await.map_err(|e| self.io(e))?;
        self.db.stored.notify_waiters();
        Ok(())
    }

    async fn store_outcome(&self, meta: &ResultMeta, _reply: ReplyTo<'_>) -> Result<Stored, BackendError> {
        self.clean_up_if_due();
        let (task_id, status, json) = (meta.task_id.clone(), meta.status.as_str().to_string(), meta.to_json());
        let stored_after = self.expired_before(now_ms());
        let written = self
            .db
            .call(|reply| Op::StoreOutcome { task_id, status, meta: json, stored_after, reply })
            .await
            .map_err(|e| self.io(e))?;
        if !written {
            return Ok(Stored::KeptRevoked);
        }
        self.db.stored.notify_waiters();
        Ok(Stored::Written)
    }

    fn keeps_revokes(&self) -> bool {
        true
    }

    fn supports_chords(&self) -> bool {
        true
    }

    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        let (group_id, size) = (group_id.to_string(), size as i64);
        self.db.call(|reply| Op::SetChordSize { group_id, size, reply }).await.map_err(|e| self.io(e))
    }

    async fn store_chord_part(
        &self,
        meta: &ResultMeta,
        _reply: ReplyTo<'_>,
        part: &ChordPart,
    ) -> Result<(Stored, Joined), BackendError> {
        self.clean_up_if_due();
        let outcome = Outcome {
            task_id: meta.task_id.clone(),
            status: meta.status.as_str().to_string(),
            meta: meta.to_json(),
            stored_after: self.expired_before(now_ms()),
        };
        let row = PartRow {
            group_id: part.group_id.clone(),
            task_id: part.task_id.clone(),
            index: part.group_index,
            member: part.encode(),
        };
        let claim = uuid::Uuid::new_v4().simple().to_string();
        let lease_ms = CHORD_CLAIM.as_millis() as i64;
        let token = claim.clone();
        let joining = self
            .db
            .call(|reply| Op::StoreChordPart { outcome, part: row, claim: token, lease_ms, reply })
            .await
            .map_err(|e| self.io(e))?;
        let stored = if joining.written {
            self.db.stored.notify_waiters();
            Stored::Written
        } else {
            Stored::KeptRevoked
        };
        let joined = match joining.state {
            JoinState::Waiting => Joined::Waiting,
            JoinState::Done => Joined::Done,
            JoinState::ClaimedElsewhere => Joined::ClaimedElsewhere,
            JoinState::Claimed(members) => {
                let parts = members
                    .iter()
                    .map(|m| ChordPart::decode(&part.group_id, m))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|reason| BackendError::Corrupt { task_id: format!("chord {}", part.group_id), reason })?;
                Joined::Complete { parts, claim }
            }
        };
        Ok((stored, joined))
    }

    /// Kept in the results table under Celery's key, `celery-taskset-meta-<id>` (state `GROUP`),
    /// so it expires with the results.
    async fn save_group(&self, group: &ResultRef) -> Result<(), BackendError> {
        let (task_id, meta) = (format!("celery-taskset-meta-{}", group.id()), saved_group(group));
        let status = "GROUP".to_string();
        self.db.call(|reply| Op::StoreResult { task_id, status, meta, reply }).await.map_err(|e| self.io(e))
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<ResultRef>, BackendError> {
        let task_id = format!("celery-taskset-meta-{group_id}");
        let stored_after = self.expired_before(now_ms());
        let raw = self.db.call(|reply| Op::GetResult { task_id, stored_after, reply }).await.map_err(|e| self.io(e))?;
        raw.map(|bytes| {
            read_saved_group(&bytes).ok_or_else(|| BackendError::Corrupt {
                task_id: format!("group {group_id}"),
                reason: "not a saved group".into(),
            })
        })
        .transpose()
    }

    async fn clear_chord(&self, group_id: &str, claim: &str) -> Result<(), BackendError> {
        let (group, token) = (group_id.to_string(), claim.to_string());
        let held = self
            .db
            .call(|reply| Op::ClearChord { group_id: group, claim: token, reply })
            .await
            .map_err(|e| self.io(e))?;
        if !held {
            tracing::warn!(group = %group_id, "the chord's claim had lapsed when its body was sent: another worker may send it too");
        }
        Ok(())
    }

    async fn record_revokes(&self, task_ids: &[String], at: f64) -> Result<(), BackendError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        let task_ids = task_ids.to_vec();
        let at_ms = (at * 1000.0) as i64;
        let expired_before = now_ms() - REVOKE_EXPIRES.as_millis() as i64;
        self.db
            .call(|reply| Op::RecordRevokes { task_ids, at_ms, expired_before, keep: REVOKES_MAX, reply })
            .await
            .map_err(|e| self.io(e))
    }

    async fn revokes_since(&self, since: f64) -> Result<Vec<Revoke>, BackendError> {
        let since_ms = ((since * 1000.0) as i64).max(now_ms() - REVOKE_EXPIRES.as_millis() as i64);
        let rows = self.db.call(|reply| Op::RevokedSince { since_ms, reply }).await.map_err(|e| self.io(e))?;
        Ok(rows.into_iter().map(|(task_id, at_ms)| Revoke { task_id, at: at_ms as f64 / 1000.0 }).collect())
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        let id = task_id.to_string();
        let stored_after = self.expired_before(now_ms());
        let raw =
            self.db.call(|reply| Op::GetResult { task_id: id, stored_after, reply }).await.map_err(|e| self.io(e))?;
        raw.map(|bytes| {
            ResultMeta::from_json(&bytes)
                .map_err(|e| BackendError::Corrupt { task_id: task_id.to_string(), reason: e.to_string() })
        })
        .transpose()
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        let task_id = task_id.to_string();
        self.db.call(|reply| Op::ForgetResult { task_id, reply }).await.map_err(|e| self.io(e))
    }

    /// Wait by polling with a growing interval, woken early when this process stores a result.
    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultMeta, BackendError> {
        let start = Instant::now();
        let max_idle = self.config.poll_interval;
        let mut idle = Duration::from_millis(1).min(max_idle);
        loop {
            let notified = self.db.stored.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(meta) = self.get(task_id).await? {
                if meta.status.is_ready() {
                    return Ok(meta);
                }
            }
            let mut pause = idle;
            if let Some(limit) = timeout {
                let waited = start.elapsed();
                if waited >= limit {
                    return Err(BackendError::Timeout { task_id: task_id.to_string(), waited });
                }
                pause = pause.min(limit - waited);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(pause) => {}
            }
            idle = (idle * 2).min(max_idle);
        }
    }
}
