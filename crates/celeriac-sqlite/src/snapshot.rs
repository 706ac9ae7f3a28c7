//! A read-only look at an SQLite broker file, for a monitor that has no events to follow (the
//! dashboard): the most recent messages (ready, scheduled by `visible_at`, or held by a
//! consumer: `owner`) and the most recent stored results, as rows. The file is opened read-only
//! and never created; the schema is [`crate::db`]'s.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// One row of the `messages` table.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The queue it is on.
    pub queue: String,
    /// Unix milliseconds from which it may be fetched: its ETA while not held, the end of the
    /// lease while a consumer holds it.
    pub visible_at_ms: i64,
    /// The consumer holding it (a uuid per consumer, not the worker's node name), if any.
    pub owner: Option<String>,
    /// Unix milliseconds when it was published.
    pub published_at_ms: i64,
    /// kombu's JSON envelope (`celeriac_core::envelope::decode`).
    pub payload: Vec<u8>,
}

/// One row of the `results` table.
#[derive(Debug, Clone)]
pub struct StoredResult {
    /// The task id (or `celery-taskset-meta-<group id>` for a saved group).
    pub task_id: String,
    /// The state stored.
    pub status: String,
    /// Unix milliseconds when it was stored.
    pub stored_at_ms: i64,
    /// Celery's result JSON (`celeriac_core::result::ResultMeta::from_json`).
    pub meta: Vec<u8>,
}

/// The most recent rows of an SQLite broker file.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// At most `limit` messages, newest first.
    pub messages: Vec<StoredMessage>,
    /// At most `limit` results, most recently stored first.
    pub results: Vec<StoredResult>,
}

/// Read the newest `limit` messages and `limit` results of the file at `path`, opened read-only
/// (a file that does not exist is an error, never created).
///
/// # Errors
/// SQLite's: the file is missing or not a celeriac database, or stays locked past 5 s.
pub fn read_snapshot(path: &Path, limit: usize) -> Result<Snapshot, rusqlite::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let limit = limit as i64;
    let mut stmt =
        conn.prepare("SELECT queue, visible_at, owner, published_at, payload FROM messages ORDER BY id DESC LIMIT ?1")?;
    let messages = stmt
        .query_map([limit], |r| {
            Ok(StoredMessage {
                queue: r.get(0)?,
                visible_at_ms: r.get(1)?,
                owner: r.get(2)?,
                published_at_ms: r.get(3)?,
                payload: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT task_id, status, date_done, meta FROM results
         WHERE task_id NOT LIKE 'celery-taskset-meta-%' ORDER BY date_done DESC LIMIT ?1",
    )?;
    let results = stmt
        .query_map([limit], |r| {
            Ok(StoredResult { task_id: r.get(0)?, status: r.get(1)?, stored_at_ms: r.get(2)?, meta: r.get(3)? })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Snapshot { messages, results })
}
