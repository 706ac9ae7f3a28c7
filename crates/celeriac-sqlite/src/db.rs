//! One SQLite file per process, behind a writer thread with group commit.
//!
//! rusqlite is synchronous, so each open file gets one thread owning its connection. Callers send
//! [`Op`]s over a channel and await the reply; the thread takes every queued operation, runs them
//! all in one `BEGIN IMMEDIATE` transaction and commits once. Under load this turns thousands of
//! small writes (publishes, acks, results) into a few commits per millisecond; idle, it costs
//! nothing. Opening the same path twice in a process shares the thread (see [`Db::open`]).
//!
//! A handle opened for reading ([`Db::open_read_only`], a monitor's) runs the operations that
//! only read on a read-only connection of its own thread, in deferred transactions: the file is
//! neither created, nor given missing tables, nor locked for writing. Its first operation that
//! writes (an action a user asked for: purge, revoke) opens the writer as [`Db::open`] does.
//! A writer opening the same file is never handed a read-only handle (its reads would not follow
//! its own writes); a reader opening it after a writer shares the writer's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celeriac_core::QueueInfo;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{oneshot, Notify};

/// Most operations run in one transaction.
const MAX_BATCH: usize = 512;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A fetched message row.
#[derive(Debug)]
pub struct Row {
    pub id: i64,
    pub queue: String,
    pub delivery_count: u32,
    pub payload: Vec<u8>,
}

/// A dead-lettered message.
#[derive(Debug, Clone)]
pub struct DeadRow {
    pub id: i64,
    pub queue: String,
    pub task_id: Option<String>,
    pub reason: String,
    pub dead_at_ms: i64,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// One unit of work for the writer thread. `GetResult` reads a result unless it was stored
/// before `stored_after` (ms; then it has expired); `ExpireResults` deletes the results stored
/// before `before` (ms). `StoreOutcome` writes a result unless the row holds an unexpired
/// REVOKED state (stored at or after `stored_after`) and the new state is not REVOKED itself;
/// it replies whether it wrote. `RecordRevokes` keeps ids revoked at `at_ms` and deletes those
/// revoked before `expired_before` and beyond the `keep` newest; `RevokedSince` reads those
/// revoked at or after `since_ms`, oldest first.
pub enum Op {
    Publish { queue: String, priority: i64, visible_at: i64, payload: Vec<u8>, reply: Reply<()> },
    Fetch { queues: Vec<String>, limit: usize, owner: String, lease_ms: i64, reply: Reply<Vec<Row>> },
    Ack { id: i64, reply: Option<Reply<()>> },
    Requeue { id: i64, owner: String, reply: Option<Reply<()>> },
    DeadLetter { id: i64, reason: String, task_id: Option<String>, reply: Option<Reply<()>> },
    RecordDeadLetter { queue: String, task_id: Option<String>, reason: String, payload: Vec<u8>, reply: Reply<()> },
    Lease { name: String, holder: String, ttl_ms: i64, reply: Reply<bool> },
    ReleaseLease { name: String, holder: String, reply: Reply<()> },
    LastRuns { schedule: String, reply: Reply<HashMap<String, i64>> },
    RecordRuns { schedule: String, runs: Vec<(String, i64)>, reply: Reply<()> },
    Renew { owner: String, lease_ms: i64 },
    Purge { queue: String, reply: Reply<u64> },
    Depths { queues: Vec<String>, reply: Reply<Vec<QueueInfo>> },
    DeadLetters { limit: usize, reply: Reply<Vec<DeadRow>> },
    StoreResult { task_id: String, status: String, meta: Vec<u8>, reply: Reply<()> },
    GetResult { task_id: String, stored_after: i64, reply: Reply<Option<Vec<u8>>> },
    ExpireResults { before: i64 },
    ForgetResult { task_id: String, reply: Reply<()> },
    StoreOutcome { task_id: String, status: String, meta: Vec<u8>, stored_after: i64, reply: Reply<bool> },
    RecordRevokes { task_ids: Vec<String>, at_ms: i64, expired_before: i64, keep: usize, reply: Reply<()> },
    RevokedSince { since_ms: i64, reply: Reply<Vec<(String, i64)>> },
    SetChordSize { group_id: String, size: i64, reply: Reply<()> },
    StoreChordPart { outcome: Outcome, part: PartRow, claim: String, lease_ms: i64, reply: Reply<Joining> },
    ClearChord { group_id: String, claim: String, reply: Reply<bool> },
}

/// A result to store as `StoreOutcome` stores it.
pub struct Outcome {
    pub task_id: String,
    pub status: String,
    pub meta: Vec<u8>,
    pub stored_after: i64,
}

/// A chord header task's part: its chord, its place (`None`: after every indexed part), and
/// Celery's member bytes.
pub struct PartRow {
    pub group_id: String,
    pub task_id: String,
    pub index: Option<i64>,
    pub member: Vec<u8>,
}

/// What `StoreChordPart` did: whether the result was written, and the join's state.
pub struct Joining {
    pub written: bool,
    pub state: JoinState,
}

/// The join after a part: still waiting, complete and claimed by the caller (with every member,
/// in header order), complete and claimed by another, or done.
pub enum JoinState {
    Waiting,
    Claimed(Vec<Vec<u8>>),
    ClaimedElsewhere,
    Done,
}

impl Op {
    /// Whether the operation only reads (a read-only handle runs it on its reader).
    fn only_reads(&self) -> bool {
        matches!(
            self,
            Op::Depths { .. }
                | Op::DeadLetters { .. }
                | Op::GetResult { .. }
                | Op::RevokedSince { .. }
                | Op::LastRuns { .. }
        )
    }
}

/// A shared handle on one database file.
pub struct Db {
    /// The writer thread's queue: started at [`Db::open`], or at the first operation that writes
    /// through a handle from [`Db::open_read_only`].
    writer: Mutex<Option<mpsc::Sender<Op>>>,
    /// A read-only handle's reader thread, for the operations that only read.
    reader: Option<Mutex<mpsc::Sender<Op>>>,
    path: PathBuf,
    /// Woken when this process publishes, so local consumers need not wait for their next poll.
    pub published: Notify,
    /// Woken when this process stores a result.
    pub stored: Notify,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Db>>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<Db>>>> = OnceLock::new();
    OPEN.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Db {
    /// Open (or share the already open) database at `path`, creating the schema.
    pub fn open(path: &Path) -> Result<Arc<Db>, String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(format!("directory {} does not exist", parent.display()));
            }
        }
        let key = registry_key(path);
        let mut open = registry().lock().unwrap_or_else(|e| e.into_inner());
        // A read-only handle (a monitor's) is not shared with a writer: its reads run on a
        // connection of their own, so a write sent without waiting and a read after it would
        // not be ordered. The writer's handle takes its place for later opens.
        if let Some(db) = open.get(&key).and_then(Weak::upgrade).filter(|db| db.reader.is_none()) {
            return Ok(db);
        }
        let writer = start_writer(path)?;
        let db = Arc::new(Db {
            writer: Mutex::new(Some(writer)),
            reader: None,
            path: path.to_path_buf(),
            published: Notify::new(),
            stored: Notify::new(),
        });
        open.insert(key, Arc::downgrade(&db));
        Ok(db)
    }

    /// Open the existing database at `path` for reading (or share the handle already open in
    /// this process): nothing is written to the file until an operation that writes is sent.
    ///
    /// # Errors
    /// The file does not exist (it is not created) or SQLite cannot open it.
    pub fn open_read_only(path: &Path) -> Result<Arc<Db>, String> {
        if !path.is_file() {
            return Err(format!("no SQLite database at {}", path.display()));
        }
        let key = registry_key(path);
        let mut open = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(db);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(path, flags).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let reader = spawn_loop(path, conn, TransactionBehavior::Deferred)?;
        let db = Arc::new(Db {
            writer: Mutex::new(None),
            reader: Some(Mutex::new(reader)),
            path: path.to_path_buf(),
            published: Notify::new(),
            stored: Notify::new(),
        });
        open.insert(key, Arc::downgrade(&db));
        Ok(db)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue an operation without waiting for it. On a read-only handle, the first operation
    /// that writes opens the writer; if that fails, the operation fails with the reason.
    pub fn send(&self, op: Op) {
        if let Some(reader) = self.reader.as_ref().filter(|_| op.only_reads()) {
            // The thread only stops when every sender is gone, and we hold one.
            let _ = reader.lock().unwrap_or_else(|e| e.into_inner()).send(op);
            return;
        }
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if writer.is_none() {
            // Opened on the writer's own thread: the file's write lock can be held by another
            // process for up to the busy timeout, and this runs on an async caller's thread.
            match start_writer_lazily(&self.path) {
                Ok(tx) => *writer = Some(tx),
                Err(e) => return fail(op, &e),
            }
        }
        if let Some(tx) = writer.as_ref() {
            if let Err(mpsc::SendError(op)) = tx.send(op) {
                // The lazily opened writer could not open the file and has stopped: the next
                // write tries again.
                *writer = None;
                fail(op, &format!("cannot open {} for writing (see the log); will try again", self.path.display()));
            }
        }
    }

    /// Run an operation and wait for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply));
        rx.await.map_err(|_| "the SQLite thread stopped".to_string())?
    }
}

/// The registry's key for `path`: the file's canonical path, or the path made absolute.
fn registry_key(path: &Path) -> PathBuf {
    match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Open `path` for writing (creating it and its schema) and start its writer thread.
fn start_writer(path: &Path) -> Result<mpsc::Sender<Op>, String> {
    let conn = Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    init_schema(&conn).map_err(|e| format!("cannot initialise {}: {e}", path.display()))?;
    spawn_loop(path, conn, TransactionBehavior::Immediate)
}

/// Start the writer's thread, which opens `path` for writing (creating its schema) itself; if
/// that fails, every operation sent to it by then fails with the reason, and the thread stops.
fn start_writer_lazily(path: &Path) -> Result<mpsc::Sender<Op>, String> {
    let (tx, rx) = mpsc::channel::<Op>();
    let path = path.to_path_buf();
    let name = format!("celeriac-sqlite:{}", path.display());
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || {
            let opened =
                Connection::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display())).and_then(|conn| {
                    init_schema(&conn).map_err(|e| format!("cannot initialise {}: {e}", path.display()))?;
                    Ok(conn)
                });
            match opened {
                Ok(conn) => writer_loop(conn, rx, TransactionBehavior::Immediate),
                Err(e) => {
                    tracing::warn!(error = %e, "SQLite: could not open the file for writing");
                    rx.try_iter().for_each(|op| fail(op, &e));
                }
            }
        })
        .map_err(|e| format!("cannot start the SQLite thread: {e}"))?;
    Ok(tx)
}

/// Start the thread that owns `conn` and runs the operations sent to it, each batch in one
/// transaction of `behavior`.
fn spawn_loop(path: &Path, conn: Connection, behavior: TransactionBehavior) -> Result<mpsc::Sender<Op>, String> {
    let (tx, rx) = mpsc::channel();
    let name = format!("celeriac-sqlite:{}", path.display());
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || writer_loop(conn, rx, behavior))
        .map_err(|e| format!("cannot start the SQLite thread: {e}"))?;
    Ok(tx)
}

fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS messages (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             queue TEXT NOT NULL,
             priority INTEGER NOT NULL DEFAULT 0,
             visible_at INTEGER NOT NULL,
             owner TEXT,
             delivery_count INTEGER NOT NULL DEFAULT 0,
             published_at INTEGER NOT NULL,
             payload BLOB NOT NULL);
         CREATE INDEX IF NOT EXISTS messages_fetch ON messages(queue, priority DESC, id, visible_at);
         CREATE INDEX IF NOT EXISTS messages_owner ON messages(owner) WHERE owner IS NOT NULL;
         CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS dead_letters (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             queue TEXT NOT NULL,
             task_id TEXT,
             reason TEXT NOT NULL,
             dead_at INTEGER NOT NULL,
             delivery_count INTEGER NOT NULL DEFAULT 0,
             payload BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS results (
             task_id TEXT PRIMARY KEY,
             status TEXT NOT NULL,
             date_done INTEGER NOT NULL,
             meta BLOB NOT NULL);
         CREATE INDEX IF NOT EXISTS results_expiry ON results(date_done);
         CREATE TABLE IF NOT EXISTS revoked (task_id TEXT PRIMARY KEY, revoked_at INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS revoked_time ON revoked(revoked_at);
         CREATE TABLE IF NOT EXISTS chords (
             group_id TEXT PRIMARY KEY,
             size INTEGER NOT NULL,
             claim TEXT,
             claim_until INTEGER NOT NULL DEFAULT 0,
             done INTEGER NOT NULL DEFAULT 0,
             updated_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS chord_parts (
             group_id TEXT NOT NULL,
             task_id TEXT NOT NULL,
             idx INTEGER,
             member BLOB NOT NULL,
             PRIMARY KEY (group_id, task_id, idx));
         CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS beat_runs (
             schedule TEXT NOT NULL, entry TEXT NOT NULL, last_ms INTEGER NOT NULL,
             PRIMARY KEY (schedule, entry));
         COMMIT;",
    )
}

/// A reply to send once the batch's transaction has committed.
type Pending = Box<dyn FnOnce(Option<&str>) + Send>;

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Op>, behavior: TransactionBehavior) {
    let mut fetch_rotation = 0usize;
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let tx = match conn.transaction_with_behavior(behavior) {
            Ok(tx) => tx,
            Err(e) => {
                let msg = format!("cannot lock the database: {e}");
                tracing::warn!(error = %msg, "SQLite batch failed");
                for op in ops {
                    fail(op, &msg);
                }
                continue;
            }
        };
        let mut pending: Vec<Pending> = Vec::with_capacity(ops.len());
        for op in ops {
            fetch_rotation = fetch_rotation.wrapping_add(1);
            pending.push(execute(&tx, op, fetch_rotation));
        }
        let commit_error = tx.commit().err().map(|e| format!("commit failed: {e}"));
        if let Some(e) = &commit_error {
            tracing::warn!(error = %e, "SQLite batch failed");
        }
        for p in pending {
            p(commit_error.as_deref());
        }
    }
}

fn fail(op: Op, msg: &str) {
    let m = msg.to_string();
    match op {
        Op::Publish { reply, .. } | Op::StoreResult { reply, .. } | Op::ForgetResult { reply, .. } => {
            drop(reply.send(Err(m)))
        }
        Op::Fetch { reply, .. } => drop(reply.send(Err(m))),
        Op::Ack { reply, .. } | Op::Requeue { reply, .. } | Op::DeadLetter { reply, .. } => {
            if let Some(r) = reply {
                let _ = r.send(Err(m));
            }
        }
        Op::Purge { reply, .. } => drop(reply.send(Err(m))),
        Op::RecordDeadLetter { reply, .. } => drop(reply.send(Err(m))),
        Op::Lease { reply, .. } => drop(reply.send(Err(m))),
        Op::ReleaseLease { reply, .. } => drop(reply.send(Err(m))),
        Op::LastRuns { reply, .. } => drop(reply.send(Err(m))),
        Op::RecordRuns { reply, .. } => drop(reply.send(Err(m))),
        Op::Depths { reply, .. } => drop(reply.send(Err(m))),
        Op::DeadLetters { reply, .. } => drop(reply.send(Err(m))),
        Op::GetResult { reply, .. } => drop(reply.send(Err(m))),
        Op::StoreOutcome { reply, .. } => drop(reply.send(Err(m))),
        Op::RecordRevokes { reply, .. } => drop(reply.send(Err(m))),
        Op::RevokedSince { reply, .. } => drop(reply.send(Err(m))),
        Op::SetChordSize { reply, .. } => drop(reply.send(Err(m))),
        Op::StoreChordPart { reply, .. } => drop(reply.send(Err(m))),
        Op::ClearChord { reply, .. } => drop(reply.send(Err(m))),
        Op::Renew { .. } | Op::ExpireResults { .. } => {}
    }
}

/// Build the deferred reply: the operation's own result, unless the commit failed.
fn deferred<T: Send + 'static>(reply: Reply<T>, result: rusqlite::Result<T>) -> Pending {
    Box::new(move |commit_error| {
        let out = match (result, commit_error) {
            (_, Some(e)) => Err(e.to_string()),
            (Ok(v), None) => Ok(v),
            (Err(e), None) => Err(e.to_string()),
        };
        let _ = reply.send(out);
    })
}

fn deferred_opt(reply: Option<Reply<()>>, result: rusqlite::Result<()>) -> Pending {
    match reply {
        Some(r) => deferred(r, result),
        None => {
            if let Err(e) = result {
                tracing::warn!(error = %e, "SQLite operation failed");
            }
            Box::new(|_| {})
        }
    }
}

fn execute(tx: &rusqlite::Transaction<'_>, op: Op, rotation: usize) -> Pending {
    match op {
        Op::Publish { queue, priority, visible_at, payload, reply } => {
            let r = (|| {
                tx.prepare_cached("INSERT OR IGNORE INTO queues(name) VALUES (?1)")?.execute(params![queue])?;
                tx.prepare_cached("INSERT INTO messages(queue, priority, visible_at, published_at, payload) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![queue, priority, visible_at, now_ms(), payload])?;
                Ok(())
            })();
            deferred(reply, r)
        }
        Op::Fetch { queues, limit, owner, lease_ms, reply } => {
            deferred(reply, fetch(tx, &queues, limit, &owner, lease_ms, rotation))
        }
        Op::Ack { id, reply } => {
            let r = tx
                .prepare_cached("DELETE FROM messages WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id]))
                .map(|_| ());
            deferred_opt(reply, r)
        }
        Op::Requeue { id, owner, reply } => {
            let r = tx
                .prepare_cached(
                    "UPDATE messages SET owner = NULL, visible_at = ?3, delivery_count = MAX(delivery_count - 1, 0)
                     WHERE id = ?1 AND owner = ?2",
                )
                .and_then(|mut s| s.execute(params![id, owner, now_ms()]))
                .map(|_| ());
            deferred_opt(reply, r)
        }
        Op::DeadLetter { id, reason, task_id, reply } => {
            let r = (|| {
                tx.prepare_cached(
                    "INSERT INTO dead_letters(queue, task_id, reason, dead_at, delivery_count, payload)
                     SELECT queue, ?2, ?3, ?4, delivery_count, payload FROM messages WHERE id = ?1",
                )?
                .execute(params![id, task_id, reason, now_ms()])?;
                tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?.execute(params![id])?;
                Ok(())
            })();
            deferred_opt(reply, r)
        }
        Op::RecordDeadLetter { queue, task_id, reason, payload, reply } => {
            let r = tx
                .prepare_cached(
                    "INSERT INTO dead_letters(queue, task_id, reason, dead_at, delivery_count, payload)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                )
                .and_then(|mut s| s.execute(params![queue, task_id, reason, now_ms(), payload]))
                .map(|_| ());
            deferred(reply, r)
        }
        Op::Lease { name, holder, ttl_ms, reply } => {
            // Taken when free or lapsed, renewed by its holder; one statement.
            let r = (|| {
                let now = now_ms();
                tx.prepare_cached(
                    "INSERT INTO leases(name, holder, until) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                     WHERE leases.holder = excluded.holder OR leases.until <= ?4",
                )?
                .execute(params![name, holder, now + ttl_ms, now])?;
                let held: String = tx
                    .prepare_cached("SELECT holder FROM leases WHERE name = ?1")?
                    .query_row(params![name], |r| r.get(0))?;
                Ok(held == holder)
            })();
            deferred(reply, r)
        }
        Op::LastRuns { schedule, reply } => {
            let r = (|| {
                let mut s = tx.prepare_cached("SELECT entry, last_ms FROM beat_runs WHERE schedule = ?1")?;
                let rows = s.query_map(params![schedule], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })();
            deferred(reply, r)
        }
        Op::RecordRuns { schedule, runs, reply } => {
            let r = (|| {
                let mut s = tx.prepare_cached(
                    "INSERT INTO beat_runs(schedule, entry, last_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT(schedule, entry) DO UPDATE SET last_ms = excluded.last_ms
                     WHERE excluded.last_ms > beat_runs.last_ms",
                )?;
                for (entry, at) in &runs {
                    s.execute(params![schedule, entry, at])?;
                }
                Ok(())
            })();
            deferred(reply, r)
        }
        Op::ReleaseLease { name, holder, reply } => {
            let r = tx
                .prepare_cached("DELETE FROM leases WHERE name = ?1 AND holder = ?2")
                .and_then(|mut s| s.execute(params![name, holder]))
                .map(|_| ());
            deferred(reply, r)
        }
        Op::Renew { owner, lease_ms } => {
            let r = tx
                .prepare_cached("UPDATE messages SET visible_at = ?2 WHERE owner = ?1")
                .and_then(|mut s| s.execute(params![owner, now_ms() + lease_ms]))
                .map(|_| ());
            deferred_opt(None, r)
        }
        Op::Purge { queue, reply } => {
            let r = tx
                // Ready only, as RabbitMQ's queue.purge: not what a worker holds (owner set) nor
                // what is scheduled for later (an ETA or countdown, visible_at in the future).
                .prepare_cached("DELETE FROM messages WHERE queue = ?1 AND owner IS NULL AND visible_at <= ?2")
                .and_then(|mut s| s.execute(params![queue, now_ms()]))
                .map(|n| n as u64);
            deferred(reply, r)
        }
        Op::Depths { queues, reply } => deferred(reply, depths(tx, &queues)),
        Op::DeadLetters { limit, reply } => {
            let r = (|| {
                let mut s = tx.prepare_cached(
                    "SELECT id, queue, task_id, reason, dead_at FROM dead_letters ORDER BY id DESC LIMIT ?1",
                )?;
                let rows = s.query_map(params![limit as i64], |r| {
                    Ok(DeadRow {
                        id: r.get(0)?,
                        queue: r.get(1)?,
                        task_id: r.get(2)?,
                        reason: r.get(3)?,
                        dead_at_ms: r.get(4)?,
                    })
                })?;
                rows.collect()
            })();
            deferred(reply, r)
        }
        Op::StoreResult { task_id, status, meta, reply } => {
            let r = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO results(task_id, status, date_done, meta) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![task_id, status, now_ms(), meta]))
                .map(|_| ());
            deferred(reply, r)
        }
        Op::GetResult { task_id, stored_after, reply } => {
            let r = tx
                .prepare_cached("SELECT meta FROM results WHERE task_id = ?1 AND date_done >= ?2")
                .and_then(|mut s| s.query_row(params![task_id, stored_after], |r| r.get::<_, Vec<u8>>(0)).optional());
            deferred(reply, r)
        }
        Op::ExpireResults { before } => {
            match tx
                .prepare_cached("DELETE FROM results WHERE date_done < ?1")
                .and_then(|mut s| s.execute(params![before]))
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "expired results deleted"),
                Err(e) => tracing::warn!(error = %e, "could not delete expired results"),
            }
            // Chords untouched for as long expire with them (their parts first).
            let chords = tx
                .prepare_cached(
                    "DELETE FROM chord_parts WHERE group_id IN (SELECT group_id FROM chords WHERE updated_at < ?1)",
                )
                .and_then(|mut s| s.execute(params![before]))
                .and_then(|_| tx.prepare_cached("DELETE FROM chords WHERE updated_at < ?1")?.execute(params![before]));
            if let Err(e) = chords {
                tracing::warn!(error = %e, "could not delete expired chords");
            }
            Box::new(|_| {})
        }
        Op::ForgetResult { task_id, reply } => {
            let r = tx
                .prepare_cached("DELETE FROM results WHERE task_id = ?1")
                .and_then(|mut s| s.execute(params![task_id]))
                .map(|_| ());
            deferred(reply, r)
        }
        Op::StoreOutcome { task_id, status, meta, stored_after, reply } => {
            let r = store_outcome(tx, &Outcome { task_id, status, meta, stored_after });
            deferred(reply, r)
        }
        Op::SetChordSize { group_id, size, reply } => {
            let r = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO chords(group_id, size, claim, claim_until, done, updated_at)
                     VALUES (?1, ?2, NULL, 0, 0, ?3)",
                )
                .and_then(|mut s| s.execute(params![group_id, size, now_ms()]))
                .map(|_| ());
            deferred(reply, r)
        }
        Op::StoreChordPart { outcome, part, claim, lease_ms, reply } => {
            // The result and the part in the same transaction: no worker dies between the two.
            let r = (|| {
                let written = store_outcome(tx, &outcome)?;
                let state = join_part(tx, &part, &claim, lease_ms)?;
                Ok(Joining { written, state })
            })();
            deferred(reply, r)
        }
        Op::ClearChord { group_id, claim, reply } => {
            let r = (|| {
                let held = tx
                    .prepare_cached(
                        "UPDATE chords SET done = 1, claim = NULL, updated_at = ?3 WHERE group_id = ?1 AND claim = ?2",
                    )?
                    .execute(params![group_id, claim, now_ms()])?;
                if held > 0 {
                    tx.prepare_cached("DELETE FROM chord_parts WHERE group_id = ?1")?.execute(params![group_id])?;
                }
                Ok(held > 0)
            })();
            deferred(reply, r)
        }
        Op::RecordRevokes { task_ids, at_ms, expired_before, keep, reply } => {
            let r = (|| {
                let mut insert =
                    tx.prepare_cached("INSERT OR REPLACE INTO revoked(task_id, revoked_at) VALUES (?1, ?2)")?;
                for id in &task_ids {
                    insert.execute(params![id, at_ms])?;
                }
                tx.prepare_cached("DELETE FROM revoked WHERE revoked_at < ?1")?.execute(params![expired_before])?;
                tx.prepare_cached(
                    "DELETE FROM revoked WHERE task_id IN
                     (SELECT task_id FROM revoked ORDER BY revoked_at DESC LIMIT -1 OFFSET ?1)",
                )?
                .execute(params![keep as i64])?;
                Ok(())
            })();
            deferred(reply, r)
        }
        Op::RevokedSince { since_ms, reply } => {
            let r = (|| {
                let mut s = tx.prepare_cached(
                    "SELECT task_id, revoked_at FROM revoked WHERE revoked_at >= ?1 ORDER BY revoked_at",
                )?;
                let rows = s.query_map(params![since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })();
            deferred(reply, r)
        }
    }
}

/// Write a result unless the row holds an unexpired REVOKED state and the new state is not
/// REVOKED itself; whether it wrote. One statement: the check and the write cannot be separated
/// by another writer.
fn store_outcome(tx: &rusqlite::Transaction<'_>, o: &Outcome) -> rusqlite::Result<bool> {
    tx.prepare_cached(
        "INSERT INTO results(task_id, status, date_done, meta) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(task_id) DO UPDATE
         SET status = excluded.status, date_done = excluded.date_done, meta = excluded.meta
         WHERE results.status != 'REVOKED' OR excluded.status = 'REVOKED' OR results.date_done < ?5",
    )?
    .execute(params![o.task_id, o.status, now_ms(), o.meta, o.stored_after])
    .map(|changed| changed > 0)
}

/// Count a chord header task's part into its chord (once per task and place), as the Redis
/// backend does: when the parts reach the chord's size, the first caller to find no live claim
/// takes one for `lease_ms` and gets every member in header order (parts without a place last).
fn join_part(
    tx: &rusqlite::Transaction<'_>,
    part: &PartRow,
    claim: &str,
    lease_ms: i64,
) -> rusqlite::Result<JoinState> {
    let now = now_ms();
    let chord: Option<(i64, Option<String>, i64, i64)> = tx
        .prepare_cached("SELECT size, claim, claim_until, done FROM chords WHERE group_id = ?1")?
        .query_row(params![part.group_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    if chord.as_ref().is_some_and(|c| c.3 != 0) {
        return Ok(JoinState::Done);
    }
    tx.prepare_cached("INSERT OR IGNORE INTO chord_parts(group_id, task_id, idx, member) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![part.group_id, part.task_id, part.index, part.member])?;
    let Some((size, held, held_until, _)) = chord else { return Ok(JoinState::Waiting) };
    let count: i64 = tx
        .prepare_cached("SELECT count(*) FROM chord_parts WHERE group_id = ?1")?
        .query_row(params![part.group_id], |r| r.get(0))?;
    if count < size {
        return Ok(JoinState::Waiting);
    }
    if held.is_some() && held_until > now {
        return Ok(JoinState::ClaimedElsewhere);
    }
    tx.prepare_cached("UPDATE chords SET claim = ?2, claim_until = ?3, updated_at = ?3 WHERE group_id = ?1")?
        .execute(params![part.group_id, claim, now + lease_ms])?;
    let mut s =
        tx.prepare_cached("SELECT member FROM chord_parts WHERE group_id = ?1 ORDER BY idx IS NULL, idx, member")?;
    let members = s.query_map(params![part.group_id], |r| r.get::<_, Vec<u8>>(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(JoinState::Claimed(members))
}

/// Lease up to `limit` visible messages, taking queues in turn (starting at a rotating queue so
/// none starves), highest priority first, then oldest first.
fn fetch(
    tx: &rusqlite::Transaction<'_>,
    queues: &[String],
    limit: usize,
    owner: &str,
    lease_ms: i64,
    rotation: usize,
) -> rusqlite::Result<Vec<Row>> {
    let now = now_ms();
    let mut out = Vec::new();
    let n = queues.len();
    for i in 0..n {
        let remaining = limit.saturating_sub(out.len());
        if remaining == 0 {
            break;
        }
        let queue = &queues[(rotation + i) % n];
        let mut stmt = tx.prepare_cached(
            "UPDATE messages SET owner = ?1, visible_at = ?2, delivery_count = delivery_count + 1
             WHERE id IN (SELECT id FROM messages WHERE queue = ?3 AND visible_at <= ?4
                          ORDER BY priority DESC, id LIMIT ?5)
             RETURNING id, queue, delivery_count, payload, priority",
        )?;
        let rows = stmt.query_map(params![owner, now + lease_ms, queue, now, remaining as i64], |r| {
            Ok((
                r.get::<_, i64>(4)?,
                Row { id: r.get(0)?, queue: r.get(1)?, delivery_count: r.get::<_, i64>(2)? as u32, payload: r.get(3)? },
            ))
        })?;
        let mut batch: Vec<(i64, Row)> = rows.collect::<rusqlite::Result<_>>()?;
        // RETURNING gives no order guarantee: restore priority, then publication order.
        batch.sort_by_key(|(priority, r)| (-priority, r.id));
        out.extend(batch.into_iter().map(|(_, r)| r));
    }
    Ok(out)
}

fn depths(tx: &rusqlite::Transaction<'_>, queues: &[String]) -> rusqlite::Result<Vec<QueueInfo>> {
    let names: Vec<String> = if queues.is_empty() {
        let mut s =
            tx.prepare_cached("SELECT name FROM queues UNION SELECT DISTINCT queue FROM dead_letters ORDER BY 1")?;
        let rows = s.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    } else {
        queues.to_vec()
    };
    let now = now_ms();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let (ready, scheduled, unacked): (i64, i64, i64) = tx
            .prepare_cached(
                "SELECT COALESCE(SUM(owner IS NULL AND visible_at <= ?2), 0),
                        COALESCE(SUM(owner IS NULL AND visible_at > ?2), 0),
                        COALESCE(SUM(owner IS NOT NULL), 0)
                 FROM messages WHERE queue = ?1",
            )?
            .query_row(params![name, now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let dead: i64 = tx
            .prepare_cached("SELECT COUNT(*) FROM dead_letters WHERE queue = ?1")?
            .query_row(params![name], |r| r.get(0))?;
        out.push(QueueInfo {
            name,
            ready: ready as u64,
            scheduled: scheduled as u64,
            unacked: unacked as u64,
            consumers: None,
            dead: dead as u64,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_is_never_handed_a_read_only_handle_and_a_reader_shares_the_writer() {
        // As `celeriac worker --dashboard` on SQLite: the dashboard's read-only handle may be open
        // when the worker opens the same file; the worker must get a handle whose reads follow its
        // own writes (one connection), not the reader's.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        drop(Db::open(&path).unwrap());
        let ro = Db::open_read_only(&path).unwrap();
        assert!(ro.reader.is_some());
        let rw = Db::open(&path).unwrap();
        assert!(!Arc::ptr_eq(&ro, &rw) && rw.reader.is_none(), "the writer got the read-only handle");
        assert!(Arc::ptr_eq(&rw, &Db::open(&path).unwrap()), "writers share one handle");
        assert!(Arc::ptr_eq(&rw, &Db::open_read_only(&path).unwrap()), "a later reader shares the writer's");
    }

    #[test]
    fn the_first_write_on_a_read_only_handle_does_not_wait_for_the_file_s_write_lock() {
        // As a dashboard's first action on a file a worker is writing: the writer opens (and
        // waits out another process's write lock) on its own thread, not the async caller's.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        drop(Db::open(&path).unwrap());
        let ro = Db::open_read_only(&path).unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (reply, mut rx) = oneshot::channel();
        let asked = std::time::Instant::now();
        ro.send(Op::Purge { queue: "q".into(), reply });
        // The bound is the feature: with the writer opened on the caller's thread this waits
        // for the lock (30 s busy timeout).
        assert!(asked.elapsed() < Duration::from_secs(5), "send waited {:?}", asked.elapsed());
        assert!(rx.try_recv().is_err(), "nothing can be written while the lock is held");
        holder.execute_batch("COMMIT").unwrap();
        let purged = rx.blocking_recv().expect("a reply").expect("the purge ran once the lock was free");
        assert_eq!(purged, 0);
    }
}
