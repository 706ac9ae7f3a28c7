//! The Redis result backend, laid out exactly as Celery's `RedisBackend` lays it out.
//!
//! - A result is the string key `celery-task-meta-<task id>` holding the result JSON
//!   ([`ResultMeta::to_json`], Celery's bytes), written with an expiry of `result_expires`
//!   seconds (default 86400, as Celery's `result_expires`; `0` keeps results forever).
//! - Storing also `PUBLISH`es the same bytes on a channel named like the key, in the same
//!   `MULTI`/`EXEC` pipeline, as Celery does; this is what wakes Python's `AsyncResult.get()`, and
//!   celeriac's [`RedisBackend::wait`].
//! - [`RedisBackend::wait`] subscribes to the key's channel *before* reading the key, so a result
//!   stored in between is seen by the read, and one stored after wakes the waiter. It re-reads the
//!   key every second as well, in case a message is lost (a dropped pub/sub connection).
//!
//! - An outcome the worker stores ([`ResultBackend::store_outcome`]) goes through one Lua script
//!   ([`STORE_OUTCOME`]) that reads the key and writes only if the stored state is not REVOKED, so
//!   a revoked task never turns SUCCESS: the same one round trip as the `MULTI` pipeline.
//! - Revoked ids are kept in the sorted set [`REVOKED_KEY`] (member: task id, score: Unix time
//!   of the revoke), trimmed to Celery's three hours and 50,000 newest on every write, the key
//!   itself expiring three hours after the last revoke. Workers load it at start and read what
//!   was added since, so a revoke outlives a restart and reaches every worker.
//!
//! - Chords are joined as Celery's Redis backend joins them ([`STORE_CHORD_PART`]): the header
//!   tasks' parts in the sorted set `celery-taskset-meta-<group id>.j`, the size in `.s` (and
//!   Celery's adjustment in `.t`), so Python and celeriac workers can share one chord's header.
//!   Storing a part's result and counting it is one script, and a task whose final result is
//!   already stored is not counted twice.
//!
//! URL: `redis://[[user]:password@]host[:port][/db][?result_expires=S&connect_timeout=S&command_timeout=S]`
//! (the connection parameters are described in [`crate::url`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celeriac_core::backend::{unix_now, Joined, ReplyTo, Revoke, Stored, REVOKES_MAX, REVOKE_EXPIRES};
use celeriac_core::canvas::join::ChordPart;
use celeriac_core::canvas::{read_saved_group, saved_group, ResultRef};
use celeriac_core::{BackendError, ResultBackend, ResultMeta, TaskState};

use crate::conn::{Failure, Redis};
use crate::pubsub::Hub;
use crate::url::{redact, RedisUrl};

/// Celery's prefix of result keys (and of the channels results are published on).
pub const KEY_PREFIX: &str = "celery-task-meta-";

/// Celery's default `result_expires`: one day.
pub const DEFAULT_RESULT_EXPIRES: Duration = Duration::from_secs(86_400);

/// The sorted set of revoked task ids (score: Unix time of the revoke).
pub const REVOKED_KEY: &str = "_celeriac.revoked";

/// Store a result unless the stored one is REVOKED, and publish it; returns 1 if written, 0 if
/// the REVOKED state was kept.
///
/// `KEYS[1]` = the result key; `ARGV[1]` = the result JSON, `ARGV[2]` = the expiry in seconds
/// (`""`: none), `ARGV[3]` = `1` when the new state is itself REVOKED (always written). Celery and
/// celeriac write `status` first, so the stored state is read from the start of the value; a value
/// laid out otherwise that mentions REVOKED is decoded to be sure.
pub const STORE_OUTCOME: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[3] ~= '1' then
  local revoked = string.find(cur, '^%s*{%s*"status"%s*:%s*"REVOKED"') ~= nil
  if not revoked and string.find(cur, 'REVOKED', 1, true) then
    local ok, meta = pcall(cjson.decode, cur)
    revoked = ok and type(meta) == 'table' and meta.status == 'REVOKED'
  end
  if revoked then return 0 end
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

/// The SHA-1 of [`STORE_OUTCOME`], as `SCRIPT LOAD` names it (checked against the server by the
/// tests): the script is sent by hash, and in full only when the server does not have it yet.
pub const STORE_OUTCOME_SHA1: &str = "7cece5677fa5967188090200a21d53cc54fe1111";

/// Store a chord header task's result and count it into the chord's join as Celery 5.7's Redis
/// backend counts it (`celery/backends/redis.py`, `on_chord_part_return` and its Lua): unless the
/// chord is `done`, the part `[1, id, state, result]` goes into the sorted set `.j` at its
/// `group_index`, once per `id:index` (remembered in the set `.d`); the count of `.j` against
/// `.s` (+ `.t`) says whether every part is in; then one caller takes the claim `.c` (`SET NX`
/// with a lease) to send the body. The expiry of the join's keys is renewed on every part.
/// Storing the result is the same script, so no worker can die between the two; a stored
/// REVOKED state is kept as in [`STORE_OUTCOME`].
///
/// `KEYS` = the result key, `.j`, `.t`, `.s`, `.d`, `.c`; `ARGV` = the result JSON, the result
/// expiry in seconds (`""`: none), `1` when the new state is REVOKED, the member, its score, the
/// claim token, the claim lease in seconds, `<task id>:<score>` (the member of `.d`). Returns `{written, parts in .j, .t or false, .s or
/// false, claim}` where claim is `1` (taken), `0` (not complete, or held by another), `-1` (done).
pub const STORE_CHORD_PART: &str = r#"
local cur = redis.call('GET', KEYS[1])
local written = 1
local revoked = false
if cur and ARGV[3] ~= '1' then
  revoked = string.find(cur, '^%s*{%s*"status"%s*:%s*"REVOKED"') ~= nil
  if not revoked and string.find(cur, 'REVOKED', 1, true) then
    local ok, meta = pcall(cjson.decode, cur)
    revoked = ok and type(meta) == 'table' and meta.status == 'REVOKED'
  end
end
if revoked then
  written = 0
elseif ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PUBLISH', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
if redis.call('GET', KEYS[6]) == 'done' then
  return {written, 0, false, false, -1}
end
if redis.call('SADD', KEYS[5], ARGV[8]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
end
local ready = redis.call('ZCOUNT', KEYS[2], '-inf', '+inf')
local total_diff = redis.call('GET', KEYS[3])
local size = redis.call('GET', KEYS[4])
if ARGV[2] ~= '' then
  for i = 2, 5 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
end
local claim = 0
if size and ready == tonumber(size) + tonumber(total_diff or '0') then
  if redis.call('SET', KEYS[6], ARGV[6], 'NX', 'EX', ARGV[7]) then claim = 1 end
end
return {written, ready, total_diff, size, claim}
"#;

/// Forget a chord's join and mark it done, if the claim is still this caller's (Celery 5.7's
/// cleanup): `KEYS` = `.j`, `.t`, `.s`, `.d`, `.c`; `ARGV` = the claim token, how long the `done`
/// mark lasts in seconds.
pub const CLEAR_CHORD: &str = r#"
if redis.call('GET', KEYS[5]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[5], 'done', 'EX', ARGV[2])
  return 1
end
return 0
"#;

/// How long one worker's claim to send a chord's body lasts (it clears the chord well within
/// it: the body's publish is bounded by the publish deadline).
pub const CHORD_CLAIM: Duration = Duration::from_secs(30);

/// How long a chord stays marked done after its body was sent (Celery 5.7: 300 s): a header task
/// run again within it does nothing.
pub const CHORD_DONE: Duration = Duration::from_secs(300);

/// Celery's prefix of group keys (`celery-taskset-meta-<group id>`; the chord join adds `.j`,
/// `.t`, `.s`).
pub const GROUP_KEY_PREFIX: &str = "celery-taskset-meta-";

/// The key of a group (`suffix` `""`) or of a part of its chord join (`.j`, `.t`, `.s`).
pub fn group_key(group_id: &str, suffix: &str) -> String {
    format!("{GROUP_KEY_PREFIX}{group_id}{suffix}")
}

/// How often a waiter re-reads the result even without a message.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The Redis key (and pub/sub channel) of a task's result.
pub fn result_key(task_id: &str) -> String {
    format!("{KEY_PREFIX}{task_id}")
}

/// Settings of the result backend, read from its URL.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisBackendConfig {
    /// Where the server is and how long to wait for it.
    pub server: RedisUrl,
    /// How long results are kept; `None` keeps them until deleted.
    pub result_expires: Option<Duration>,
}

impl RedisBackendConfig {
    /// Parse a backend URL: the common connection settings plus `result_expires` (whole seconds,
    /// `0` for never).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let mut server = RedisUrl::parse(url)?;
        let mut result_expires = Some(DEFAULT_RESULT_EXPIRES);
        for (key, value) in std::mem::take(&mut server.params) {
            match key.as_str() {
                "result_expires" => {
                    let secs = value.parse::<u64>().map_err(|_| {
                        format!("result_expires={value:?} is not a whole number of seconds (0 = never expire)")
                    })?;
                    result_expires = (secs > 0).then(|| Duration::from_secs(secs));
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (known: result_expires, connect_timeout, command_timeout)"
                    ))
                }
            }
        }
        let config = RedisBackendConfig { server, result_expires };
        Ok(config)
    }
}

/// A Celery-compatible result backend on Redis. Cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct RedisBackend {
    config: Arc<RedisBackendConfig>,
    redis: Arc<Redis>,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").field("config", &self.config).finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Prepare the backend a `redis://` URL describes, without touching the network: the
    /// connection is opened by the first operation (and an unreachable server is reported by it,
    /// within the connect timeout). Does not need to run inside a Tokio runtime; the operations do.
    pub fn open(url: &str) -> Result<Self, BackendError> {
        let bad = |reason: String| BackendError::BadUrl { url: redact(url), reason };
        let config = RedisBackendConfig::from_url(url).map_err(bad)?;
        let redis = Arc::new(Redis::new(&config.server).map_err(bad)?);
        let hub = Arc::new(Hub::new(redis.clone()));
        Ok(RedisBackend { config: Arc::new(config), redis, hub })
    }

    /// Open the backend and connect at once: an unreachable server (or a wrong password) is
    /// reported here as [`BackendError::Unreachable`], within the connect timeout.
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        let backend = Self::open(url)?;
        backend.redis.ping().await.map_err(|e| backend.error(e))?;
        Ok(backend)
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisBackendConfig {
        &self.config
    }

    fn error(&self, failure: Failure) -> BackendError {
        let url = self.config.server.redacted.clone();
        match failure {
            Failure::Unreachable(reason) => BackendError::Unreachable { url, reason },
            Failure::Command(reason) => BackendError::Io { url, reason },
        }
    }

    /// Every part of a chord's join, in header order (the sorted set's order: `group_index`).
    async fn chord_parts(&self, group_id: &str) -> Result<Vec<ChordPart>, BackendError> {
        let key = &group_key(group_id, ".j");
        let raw: Vec<Vec<u8>> = self
            .redis
            .run(|mut conn| async move { redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).query_async(&mut conn).await })
            .await
            .map_err(|e| self.error(e))?;
        raw.iter()
            .map(|m| ChordPart::decode(group_id, m))
            .collect::<Result<_, _>>()
            .map_err(|reason| BackendError::Corrupt { task_id: format!("chord {group_id}"), reason })
    }

    fn decode(task_id: &str, bytes: &[u8]) -> Result<ResultMeta, BackendError> {
        ResultMeta::from_json(bytes)
            .map_err(|e| BackendError::Corrupt { task_id: task_id.to_string(), reason: e.to_string() })
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    fn url(&self) -> &str {
        &self.config.server.redacted
    }

    async fn store(&self, meta: &ResultMeta) -> Result<(), BackendError> {
        let key = result_key(&meta.task_id);
        let json = meta.to_json();
        let mut pipe = redis::pipe();
        pipe.atomic();
        match self.config.result_expires {
            Some(ttl) => pipe.cmd("SET").arg(&key).arg(&json).arg("EX").arg(ttl.as_secs()).ignore(),
            None => pipe.cmd("SET").arg(&key).arg(&json).ignore(),
        };
        pipe.cmd("PUBLISH").arg(&key).arg(&json).ignore();
        let pipe = &pipe;
        self.redis.run(|mut conn| async move { pipe.exec_async(&mut conn).await }).await.map_err(|e| self.error(e))?;
        tracing::trace!(task_id = %meta.task_id, status = %meta.status, "result stored");
        Ok(())
    }

    async fn store_outcome(&self, meta: &ResultMeta, _reply: ReplyTo<'_>) -> Result<Stored, BackendError> {
        let key = &result_key(&meta.task_id);
        let json = &meta.to_json();
        let ttl = self.config.result_expires.map(|t| t.as_secs().to_string()).unwrap_or_default();
        let (ttl, revoked) = (&ttl, if meta.status == TaskState::Revoked { "1" } else { "0" });
        let written: i64 = self
            .redis
            .run(|mut conn| async move {
                let call = |command: &str, script: &str| {
                    let mut cmd = redis::cmd(command);
                    cmd.arg(script).arg(1).arg(key).arg(json).arg(ttl).arg(revoked);
                    cmd
                };
                match call("EVALSHA", STORE_OUTCOME_SHA1).query_async(&mut conn).await {
                    Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                        call("EVAL", STORE_OUTCOME).query_async(&mut conn).await
                    }
                    other => other,
                }
            })
            .await
            .map_err(|e| self.error(e))?;
        if written == 1 {
            tracing::trace!(task_id = %meta.task_id, status = %meta.status, "result stored");
            Ok(Stored::Written)
        } else {
            Ok(Stored::KeptRevoked)
        }
    }

    fn keeps_revokes(&self) -> bool {
        true
    }

    fn supports_chords(&self) -> bool {
        true
    }

    /// `DEL .c`, then `SET <group key>.s <size>` with the result expiry (Celery 5.7's
    /// `set_chord_size`).
    async fn set_chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        let (sizes, claim) = (&group_key(group_id, ".s"), &group_key(group_id, ".c"));
        let ttl = self.config.result_expires;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("DEL").arg(claim).ignore();
        match ttl {
            Some(ttl) => pipe.cmd("SET").arg(sizes).arg(size).arg("EX").arg(ttl.as_secs()).ignore(),
            None => pipe.cmd("SET").arg(sizes).arg(size).ignore(),
        };
        let pipe = &pipe;
        self.redis.run(|mut conn| async move { pipe.exec_async(&mut conn).await }).await.map_err(|e| self.error(e))
    }

    async fn store_chord_part(
        &self,
        meta: &ResultMeta,
        _reply: ReplyTo<'_>,
        part: &ChordPart,
    ) -> Result<(Stored, Joined), BackendError> {
        let keys = [
            result_key(&meta.task_id),
            group_key(&part.group_id, ".j"),
            group_key(&part.group_id, ".t"),
            group_key(&part.group_id, ".s"),
            group_key(&part.group_id, ".d"),
            group_key(&part.group_id, ".c"),
        ];
        let json = meta.to_json();
        let ttl = self.config.result_expires.map(|t| t.as_secs().to_string()).unwrap_or_default();
        let revoked = if meta.status == TaskState::Revoked { "1" } else { "0" };
        let member = part.encode();
        let score = part.score();
        let dedup = format!("{}:{score}", part.task_id);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let lease = CHORD_CLAIM.as_secs().to_string();
        let (keys, json, ttl, member, score, token, lease, dedup) =
            (&keys, &json, &ttl, &member, &score, &token, &lease, &dedup);
        let (written, ready, total_diff, size, claim): (i64, i64, Option<i64>, Option<i64>, i64) = self
            .redis
            .run(|mut conn| async move {
                redis::cmd("EVAL")
                    .arg(STORE_CHORD_PART)
                    .arg(keys.len())
                    .arg(&keys[..])
                    .arg(json)
                    .arg(ttl)
                    .arg(revoked)
                    .arg(member)
                    .arg(score)
                    .arg(token)
                    .arg(lease)
                    .arg(dedup)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| self.error(e))?;
        let stored = if written == 1 { Stored::Written } else { Stored::KeptRevoked };
        let joined = match claim {
            -1 => Joined::Done,
            1 => Joined::Complete { parts: self.chord_parts(&part.group_id).await?, claim: token.clone() },
            // Complete by the count but not claimed: another caller holds the claim.
            _ if size.is_some_and(|s| ready == s + total_diff.unwrap_or(0)) => Joined::ClaimedElsewhere,
            _ => Joined::Waiting,
        };
        tracing::trace!(task_id = %meta.task_id, group = %part.group_id, ready, ?size, ?joined, "chord part stored");
        Ok((stored, joined))
    }

    /// `SET celery-taskset-meta-<id> {"result": <tuple>}` with the result expiry, and `PUBLISH`
    /// it, as Celery's `_set_with_state` does.
    async fn save_group(&self, group: &ResultRef) -> Result<(), BackendError> {
        let key = &group_key(group.id(), "");
        let value = &saved_group(group);
        let mut pipe = redis::pipe();
        pipe.atomic();
        match self.config.result_expires {
            Some(ttl) => pipe.cmd("SET").arg(key).arg(value).arg("EX").arg(ttl.as_secs()).ignore(),
            None => pipe.cmd("SET").arg(key).arg(value).ignore(),
        };
        pipe.cmd("PUBLISH").arg(key).arg(value).ignore();
        let pipe = &pipe;
        self.redis.run(|mut conn| async move { pipe.exec_async(&mut conn).await }).await.map_err(|e| self.error(e))
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<ResultRef>, BackendError> {
        let key = &group_key(group_id, "");
        let raw: Option<Vec<u8>> = self
            .redis
            .run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
            .map_err(|e| self.error(e))?;
        raw.map(|bytes| {
            read_saved_group(&bytes).ok_or_else(|| BackendError::Corrupt {
                task_id: format!("group {group_id}"),
                reason: "not a saved group ({\"result\": [[id, parent], [members]]})".into(),
            })
        })
        .transpose()
    }

    /// Celery 5.7's cleanup: if the claim is still ours, `DEL` `.j`, `.t`, `.s`, `.d` and mark
    /// the chord done for [`CHORD_DONE`].
    async fn clear_chord(&self, group_id: &str, claim: &str) -> Result<(), BackendError> {
        let keys = [".j", ".t", ".s", ".d", ".c"].map(|suffix| group_key(group_id, suffix));
        let done = CHORD_DONE.as_secs();
        let keys = &keys;
        let cleared: i64 = self
            .redis
            .run(|mut conn| async move {
                redis::cmd("EVAL")
                    .arg(CLEAR_CHORD)
                    .arg(keys.len())
                    .arg(&keys[..])
                    .arg(claim)
                    .arg(done)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| self.error(e))?;
        if cleared == 0 {
            tracing::warn!(group = %group_id, "the chord's claim had lapsed when its body was sent: another worker may send it too");
        }
        Ok(())
    }

    async fn record_revokes(&self, task_ids: &[String], at: f64) -> Result<(), BackendError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let zadd = pipe.cmd("ZADD").arg(REVOKED_KEY);
        for id in task_ids {
            zadd.arg(at).arg(id);
        }
        zadd.ignore();
        let oldest_kept = unix_now() - REVOKE_EXPIRES.as_secs_f64();
        pipe.cmd("ZREMRANGEBYSCORE").arg(REVOKED_KEY).arg("-inf").arg(format!("({oldest_kept}")).ignore();
        pipe.cmd("ZREMRANGEBYRANK").arg(REVOKED_KEY).arg(0).arg(-(REVOKES_MAX as i64) - 1).ignore();
        pipe.cmd("EXPIRE").arg(REVOKED_KEY).arg(REVOKE_EXPIRES.as_secs()).ignore();
        let pipe = &pipe;
        self.redis.run(|mut conn| async move { pipe.exec_async(&mut conn).await }).await.map_err(|e| self.error(e))
    }

    async fn revokes_since(&self, since: f64) -> Result<Vec<Revoke>, BackendError> {
        let from = since.max(unix_now() - REVOKE_EXPIRES.as_secs_f64());
        let rows: Vec<(String, f64)> = self
            .redis
            .run(|mut conn| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(REVOKED_KEY)
                    .arg(from)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| self.error(e))?;
        Ok(rows.into_iter().map(|(task_id, at)| Revoke { task_id, at }).collect())
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        let key = &result_key(task_id);
        let raw: Option<Vec<u8>> = self
            .redis
            .run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
            .map_err(|e| self.error(e))?;
        raw.map(|bytes| Self::decode(task_id, &bytes)).transpose()
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        let key = &result_key(task_id);
        self.redis
            .run(|mut conn| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut conn).await })
            .await
            .map_err(|e| self.error(e))
    }

    /// Subscribe to the result's channel, then read the result; then wait for a message (whose
    /// payload is the stored result), re-reading the key every second in case one is missed.
    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultMeta, BackendError> {
        let start = Instant::now();
        let deadline = timeout.map(|limit| start + limit);
        let mut sub = self.hub.subscribe(&result_key(task_id)).await.map_err(|e| self.error(e))?;
        let mut hub_gone = false;
        loop {
            if let Some(meta) = self.get(task_id).await? {
                if meta.status.is_ready() {
                    return Ok(meta);
                }
            }
            // Pub/sub lost its connection since the last look: open a new one (best effort).
            self.hub.revive().await;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(BackendError::Timeout { task_id: task_id.to_string(), waited: start.elapsed() });
            }
            let recheck = now + RECHECK_INTERVAL;
            let wake = deadline.map_or(recheck, |d| d.min(recheck));
            // Wait for a message that carries a ready result; any other message, the periodic
            // re-check and the deadline all go back to reading the key.
            tokio::select! {
                changed = sub.latest.changed(), if !hub_gone => match changed {
                    Ok(()) => {
                        let payload = sub.latest.borrow_and_update().clone();
                        let meta = payload.and_then(|bytes| Self::decode(task_id, &bytes).ok());
                        if let Some(meta) = meta.filter(|m| m.status.is_ready() && m.task_id == task_id) {
                            return Ok(meta);
                        }
                    }
                    // The hub is gone (cannot happen while `sub` lives); keep re-reading.
                    Err(_) => hub_gone = true,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}
