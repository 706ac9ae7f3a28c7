//! The Redis broker, laid out exactly as kombu's Redis transport lays it out, so Python Celery
//! clients and workers share queues with celeriac.
//!
//! # Layout (the wire contract, from kombu 5.7's `kombu/transport/redis.py`)
//!
//! - **Queues** are lists. Publishing `LPUSH`es kombu's JSON envelope
//!   ([`celeriac_core::envelope`]) onto the list; consumers take from the right (`BRPOP`/`RPOP`),
//!   so each list is first in, first out.
//! - **Priorities** are emulated with four lists per queue: `<queue>` for priorities 0–2 and
//!   `<queue>\x06\x16<step>` for steps 3, 6 and 9 ([`keys`]). Consumers empty the lists in step
//!   order, so on Redis **0 is the highest priority** and 9 the lowest (RabbitMQ is the other way
//!   round).
//! - **Bindings**: declaring a queue adds `<queue>\x06\x16\x06\x16<queue>` to the sets
//!   `_kombu.binding.<queue>` and `_kombu.binding_permanent.<queue>` (Celery names the exchange
//!   after the queue), which Python publishers that route through an exchange look up.
//! - **Unacknowledged messages** are recorded, when delivered, in the hash `unacked` (delivery
//!   tag → `[envelope, exchange, routing_key]`) and the sorted set `unacked_index` (delivery tag
//!   scored by the delivery time, Unix seconds). Acknowledging removes both entries; rejecting
//!   with requeue pushes the message to the back of its list (`LPUSH`).
//! - **Restore**: an entry older than the visibility timeout (URL parameter
//!   `visibility_timeout`, seconds, kombu's default 3600) is pushed back to the *front* of its
//!   queue (`RPUSH`) with `headers.redelivered` and `properties.delivery_info.redelivered` set,
//!   by whichever worker sweeps first. Sweeps take kombu's lock (`SET unacked_mutex <token> NX
//!   PX`, released only by its owner), and each message is moved by one atomic script that first
//!   removes it from `unacked` (`HDEL` must return 1), so it is put back once per expiry even
//!   with Python workers sweeping with their `WATCH unacked` transactions at the same time.
//!
//! # What celeriac adds
//!
//! - **Lease renewal.** kombu scores an unacked message once, at delivery, so a Python worker
//!   that holds an ETA task (or runs a task) longer than the visibility timeout sees it restored
//!   and run a second time by another worker: Celery's well-known duplicate execution of long
//!   ETA tasks on Redis. A celeriac consumer re-scores (`ZADD XX`) every message it holds, every
//!   third of the visibility timeout, for as long as it holds it (running, or waiting for its
//!   ETA). So the visibility timeout only bounds how long the messages of a worker that *died*
//!   wait, and can be short; a celeriac worker never has its own messages taken away while it
//!   lives. (Python workers sharing the queues should use the same `visibility_timeout` in their
//!   `broker_transport_options`, since they do not renew.)
//! - **Atomic fetch.** Messages that are ready are popped *and* recorded in `unacked` by one
//!   script, so a worker killed at any point loses nothing. Only when every list is empty does
//!   the consumer block, on `BRPOP` with kombu's 1 s timeout; a message that `BRPOP` hands over
//!   is recorded right after, the same small window kombu has (a process killed in between loses
//!   that one message; a lost connection does not: the message is held and recorded once Redis
//!   answers again).
//! - **Dead letters.** kombu has none. celeriac `LPUSH`es a JSON record (`id`, `queue`,
//!   `task_id`, `reason`, `dead_at_ms`, `exchange`, `routing_key`, and the envelope as
//!   `message`) onto the list `_celeriac.dead` (newest first, numbered by `_celeriac.dead.seq`)
//!   and counts them per queue in the hash `_celeriac.dead.counts`; Python never looks there.
//!
//! # Exchanges
//!
//! Remote control and events use kombu's virtual exchanges (the `exchanges` module): fanout
//! over pub/sub on `/<db>.<exchange>`, direct and topic routed through `_kombu.binding.<exchange>`
//! onto plain lists.
//!
//! Needs Redis 6.2 or
//! later (`RPOP` with a count, `ZRANGE ... BYSCORE REV`, which kombu 5.7 uses too).
//!
//! URL: `redis://[[user]:password@]host[:port][/db][?visibility_timeout=S&connect_timeout=S&command_timeout=S]`.

mod consumer;
mod exchanges;
pub mod keys;
mod restore;
mod scripts;
pub mod wire;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celeriac_core::broadcast::{Binding, ExchangeSpec, Exchanges, Subscription};
use celeriac_core::broker::{Consumer, DeadLetter, QueueInfo};
use celeriac_core::{envelope, Broker, BrokerError, Message};

use crate::conn::{Failure, Redis};
use crate::url::{redact, RedisUrl};

/// kombu's default visibility timeout: one hour.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long one `BRPOP` blocks (kombu's `brpop_timeout`).
pub(crate) const BRPOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Above this many unacknowledged messages, `queues()` does not read them to count them per
/// queue (each `unacked` value is a whole message).
const UNACKED_COUNT_LIMIT: u64 = 10_000;

/// Settings of the broker, read from its URL.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisBrokerConfig {
    /// Where the server is and how long to wait for it.
    pub server: RedisUrl,
    /// How long a delivered message may go without its lease being renewed before any worker
    /// puts it back in its queue.
    pub visibility_timeout: Duration,
}

impl RedisBrokerConfig {
    /// Parse a broker URL: the common connection settings plus `visibility_timeout` (seconds).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let mut server = RedisUrl::parse(url)?;
        let mut visibility_timeout = DEFAULT_VISIBILITY_TIMEOUT;
        for (key, value) in std::mem::take(&mut server.params) {
            match key.as_str() {
                "visibility_timeout" => {
                    visibility_timeout = value
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite() && *v >= 0.1 && *v < 1e9)
                        .map(Duration::from_secs_f64)
                        .ok_or_else(|| {
                            format!("visibility_timeout={value:?} is not a number of seconds (at least 0.1)")
                        })?;
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (known: visibility_timeout, connect_timeout, command_timeout)"
                    ))
                }
            }
        }
        Ok(RedisBrokerConfig { server, visibility_timeout })
    }
}

/// What the broker, its consumers and their deliveries share.
pub(crate) struct Inner {
    pub(crate) config: RedisBrokerConfig,
    pub(crate) redis: Arc<Redis>,
    /// Queues whose bindings this process has written.
    declared: Mutex<HashSet<String>>,
}

impl Inner {
    pub(crate) fn url(&self) -> &str {
        &self.config.server.redacted
    }

    pub(crate) fn error(&self, failure: Failure) -> BrokerError {
        let url = self.url().to_string();
        match failure {
            Failure::Unreachable(reason) => BrokerError::Unreachable { url, reason },
            Failure::Command(reason) => BrokerError::Rejected { url, reason },
        }
    }

    /// Add the bindings of queues not declared yet by this process to `pipe`; returns them.
    fn undeclared(&self, queues: &[String], pipe: &mut redis::Pipeline) -> Vec<String> {
        let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = Vec::new();
        for q in queues {
            if !declared.contains(q) && !fresh.contains(q) {
                let member = keys::binding_member(q, "", q);
                pipe.cmd("SADD").arg(keys::binding_key(q)).arg(&member).ignore();
                pipe.cmd("SADD").arg(keys::binding_permanent_key(q)).arg(&member).ignore();
                fresh.push(q.clone());
            }
        }
        fresh
    }

    fn mark_declared(&self, queues: Vec<String>) {
        self.declared.lock().unwrap_or_else(|p| p.into_inner()).extend(queues);
    }

    /// Declare queues as Celery does: write their bindings (once per process).
    pub(crate) async fn declare(&self, queues: &[String]) -> Result<(), Failure> {
        let mut pipe = redis::pipe();
        let fresh = self.undeclared(queues, &mut pipe);
        if fresh.is_empty() {
            return Ok(());
        }
        let pipe = &pipe;
        self.redis.run(|mut conn| async move { pipe.exec_async(&mut conn).await }).await?;
        self.mark_declared(fresh);
        Ok(())
    }
}

/// A Celery-compatible broker on Redis. Cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Prepare the broker a `redis://` URL describes, without touching the network: the
    /// connection is opened by the first operation (an unreachable server is reported by it,
    /// within the connect timeout). Does not need to run inside a Tokio runtime; the operations do.
    pub fn open(url: &str) -> Result<Self, BrokerError> {
        let bad = |reason: String| BrokerError::BadUrl { url: redact(url), reason };
        let config = RedisBrokerConfig::from_url(url).map_err(bad)?;
        let redis = Arc::new(Redis::new(&config.server).map_err(bad)?);
        Ok(RedisBroker { inner: Arc::new(Inner { config, redis, declared: Mutex::new(HashSet::new()) }) })
    }

    /// Open the broker and connect at once: an unreachable server (or a wrong password) is
    /// reported here as [`BrokerError::Unreachable`], within the connect timeout.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let broker = Self::open(url)?;
        broker.inner.redis.ping().await.map_err(|e| broker.inner.error(e))?;
        Ok(broker)
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisBrokerConfig {
        &self.inner.config
    }

    /// Put back every unacknowledged message whose visibility timeout has passed, as a consumer's
    /// periodic sweep does; returns how many were put back (0 if another worker holds the restore
    /// lock). Messages held by consumers of this process are never put back.
    pub async fn restore_expired(&self) -> Result<usize, BrokerError> {
        restore::sweep(&self.inner, &consumer::Held::default()).await.map_err(|e| self.inner.error(e))
    }

    /// Names of the queues that have bindings (declared by Celery or celeriac) or dead letters.
    async fn known_queues(&self) -> Result<Vec<String>, Failure> {
        let pattern = format!("{}*", keys::BINDING_PREFIX);
        let pattern = &pattern;
        let (binding_keys, dead): (Vec<String>, Vec<String>) = self
            .inner
            .redis
            .run(|mut conn| async move {
                let mut found = Vec::new();
                let mut cursor = 0u64;
                loop {
                    let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    found.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
                let dead: Vec<String> = redis::cmd("HKEYS").arg(keys::DEAD_COUNTS).query_async(&mut conn).await?;
                Ok((found, dead))
            })
            .await?;
        let mut names: Vec<String> = dead;
        if !binding_keys.is_empty() {
            let binding_keys = &binding_keys;
            let members: Vec<Vec<String>> = self
                .inner
                .redis
                .run(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    for k in binding_keys {
                        pipe.cmd("SMEMBERS").arg(k);
                    }
                    pipe.query_async(&mut conn).await
                })
                .await?;
            names.extend(members.iter().flatten().filter_map(|m| keys::parse_binding_member(m)).map(|b| b.queue));
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Unacknowledged messages per queue, if there are few enough to read.
    async fn unacked_per_queue(&self) -> Result<BTreeMap<String, u64>, Failure> {
        let values: Option<Vec<Vec<u8>>> = self
            .inner
            .redis
            .run(|mut conn| async move {
                let n: u64 = redis::cmd("HLEN").arg(keys::UNACKED).query_async(&mut conn).await?;
                if n > UNACKED_COUNT_LIMIT {
                    return Ok(None);
                }
                redis::cmd("HVALS").arg(keys::UNACKED).query_async(&mut conn).await.map(Some)
            })
            .await?;
        let mut counts = BTreeMap::new();
        match values {
            None => tracing::debug!(limit = UNACKED_COUNT_LIMIT, "too many unacked messages to count per queue"),
            Some(values) => {
                for v in values {
                    if let Ok(entry) = wire::parse_unacked(&v) {
                        *counts.entry(entry.routing_key).or_insert(0) += 1;
                    }
                }
            }
        }
        Ok(counts)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        let tag = uuid::Uuid::new_v4().to_string();
        let payload = envelope::encode(message, "", queue, &tag);
        let step = keys::priority_step(i64::from(message.properties.priority.unwrap_or(0)));
        let key = keys::queue_key(queue, step);
        let mut pipe = redis::pipe();
        let fresh = self.inner.undeclared(&[queue.to_string()], &mut pipe);
        pipe.cmd("LPUSH").arg(&key).arg(&payload).ignore();
        let pipe = &pipe;
        self.inner
            .redis
            .run(|mut conn| async move { pipe.exec_async(&mut conn).await })
            .await
            .map_err(|e| self.inner.error(e))?;
        self.inner.mark_declared(fresh);
        tracing::trace!(task_id = message.task_id().unwrap_or(""), %queue, priority_step = step, "published");
        Ok(())
    }

    /// A key `_celeriac.lease.<name>` holding the holder, with an expiry: taken with `SET NX PX`,
    /// renewed by its holder only (one script).
    async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool, BrokerError> {
        let key = format!("{}{name}", keys::LEASE_PREFIX);
        let ms = ttl.as_millis().max(1) as u64;
        let cmd = scripts::eval(scripts::LEASE, &[key]).arg(holder).arg(ms).to_owned();
        let cmd = &cmd;
        let held: i64 = self
            .inner
            .redis
            .run(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
            .map_err(|e| self.inner.error(e))?;
        Ok(held == 1)
    }

    async fn last_runs(&self, schedule: &str) -> Result<std::collections::HashMap<String, i64>, BrokerError> {
        let key = &format!("{}{schedule}", keys::BEAT_PREFIX);
        self.inner
            .redis
            .run(|mut conn| async move { redis::cmd("HGETALL").arg(key).query_async(&mut conn).await })
            .await
            .map_err(|e| self.inner.error(e))
    }

    async fn record_runs(&self, schedule: &str, runs: &[(String, i64)]) -> Result<(), BrokerError> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut cmd = scripts::eval(scripts::RECORD_RUNS, &[format!("{}{schedule}", keys::BEAT_PREFIX)]);
        for (entry, at) in runs {
            cmd.arg(entry).arg(at);
        }
        let cmd = &cmd;
        self.inner
            .redis
            .run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
            .await
            .map_err(|e| self.inner.error(e))?;
        Ok(())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let key = format!("{}{name}", keys::LEASE_PREFIX);
        let cmd = scripts::eval(scripts::RELEASE_LOCK, &[key]).arg(holder).to_owned();
        let cmd = &cmd;
        self.inner
            .redis
            .run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
            .await
            .map_err(|e| self.inner.error(e))?;
        Ok(())
    }

    async fn record_dead_letter(&self, queue: &str, message: &Message, reason: &str) -> Result<bool, BrokerError> {
        let tag = uuid::Uuid::new_v4().to_string();
        let payload = envelope::encode(message, "", queue, &tag);
        let record = wire::dead_record(queue, message.task_id(), reason, wire::now_ms(), "", queue, &payload);
        let cmd = scripts::eval(scripts::DEAD_LETTER, &restore::dead_keys()).arg("").arg(record).arg(queue).to_owned();
        let cmd = &cmd;
        self.inner
            .redis
            .run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
            .await
            .map_err(|e| self.inner.error(e))?;
        Ok(true)
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        if queues.is_empty() {
            return Err(BrokerError::Rejected {
                url: self.url().to_string(),
                reason: "no queue to consume from".into(),
            });
        }
        let mut unique = Vec::new();
        for q in queues {
            if !unique.contains(q) {
                unique.push(q.clone());
            }
        }
        self.inner.redis.ping().await.map_err(|e| self.inner.error(e))?;
        self.inner.declare(&unique).await.map_err(|e| self.inner.error(e))?;
        Ok(Box::new(consumer::RedisConsumer::start(self.inner.clone(), unique, prefetch)))
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let lists = keys::queue_keys(queue);
        let lists = &lists;
        let sizes: Vec<u64> = self
            .inner
            .redis
            .run(|mut conn| async move {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for k in lists {
                    pipe.cmd("LLEN").arg(k).cmd("DEL").arg(k).ignore();
                }
                pipe.query_async(&mut conn).await
            })
            .await
            .map_err(|e| self.inner.error(e))?;
        let purged = sizes.iter().sum();
        tracing::info!(%queue, purged, "purged");
        Ok(purged)
    }

    async fn queues(&self, queues: &[String]) -> Result<Vec<QueueInfo>, BrokerError> {
        let names = if queues.is_empty() {
            self.known_queues().await.map_err(|e| self.inner.error(e))?
        } else {
            queues.to_vec()
        };
        let names_ref = &names;
        let rows: Vec<(u64, u64, u64, u64, Option<u64>)> = self
            .inner
            .redis
            .run(|mut conn| async move {
                let mut pipe = redis::pipe();
                for q in names_ref {
                    for k in keys::queue_keys(q) {
                        pipe.cmd("LLEN").arg(k);
                    }
                    pipe.cmd("HGET").arg(keys::DEAD_COUNTS).arg(q);
                }
                let flat: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
                let mut rows = Vec::new();
                for chunk in flat.chunks(5) {
                    let n = |v: &redis::Value| redis::from_redis_value_ref::<Option<u64>>(v);
                    rows.push((
                        n(&chunk[0])?.unwrap_or(0),
                        n(&chunk[1])?.unwrap_or(0),
                        n(&chunk[2])?.unwrap_or(0),
                        n(&chunk[3])?.unwrap_or(0),
                        n(&chunk[4])?,
                    ));
                }
                Ok(rows)
            })
            .await
            .map_err(|e| self.inner.error(e))?;
        let unacked = self.unacked_per_queue().await.map_err(|e| self.inner.error(e))?;
        Ok(names
            .into_iter()
            .zip(rows)
            .map(|(name, (a, b, c, d, dead))| QueueInfo {
                unacked: unacked.get(&name).copied().unwrap_or(0),
                name,
                ready: a + b + c + d,
                scheduled: 0,
                consumers: None,
                dead: dead.unwrap_or(0),
            })
            .collect())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = i64::try_from(limit).unwrap_or(i64::MAX) - 1;
        let raw: Vec<Vec<u8>> = self
            .inner
            .redis
            .run(|mut conn| async move {
                redis::cmd("LRANGE").arg(keys::DEAD).arg(0).arg(stop).query_async(&mut conn).await
            })
            .await
            .map_err(|e| self.inner.error(e))?;
        Ok(raw.iter().filter_map(|r| wire::parse_dead_record(r)).collect())
    }

    /// The consumer renews the lease of every message it holds, so a held message is never
    /// taken back while its worker lives.
    fn max_unacked_hold(&self) -> Option<Duration> {
        None
    }

    fn delivers_eta_natively(&self) -> bool {
        false
    }

    fn exchanges(&self) -> Option<&dyn Exchanges> {
        Some(self)
    }
}

#[async_trait]
impl Exchanges for RedisBroker {
    async fn publish_to(
        &self,
        exchange: &ExchangeSpec,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BrokerError> {
        exchanges::publish_to(&self.inner, exchange, routing_key, message).await
    }

    async fn subscribe(
        &self,
        exchange: &ExchangeSpec,
        binding: &Binding,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        let s = exchanges::subscribe(self.inner.clone(), exchange, binding).await?;
        Ok(Box::new(s))
    }

    /// Celery's `get_exchange` makes `celeryev` a fanout on Redis (pub/sub).
    fn events_as_fanout(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters() {
        let c = RedisBrokerConfig::from_url("redis://h:1/5").unwrap();
        assert_eq!((c.server.db, c.visibility_timeout), (5, DEFAULT_VISIBILITY_TIMEOUT));
        let c = RedisBrokerConfig::from_url("redis://h/5?visibility_timeout=2.5&connect_timeout=1").unwrap();
        assert_eq!(
            (c.visibility_timeout, c.server.connect_timeout),
            (Duration::from_millis(2500), Duration::from_secs(1))
        );
        let err = RedisBrokerConfig::from_url("redis://h/5?visibility_timeout=0").unwrap_err();
        assert!(err.contains("visibility_timeout"), "{err}");
        let err = RedisBrokerConfig::from_url("redis://h/5?result_expires=5").unwrap_err();
        assert!(err.contains("result_expires") && err.contains("visibility_timeout"), "{err}");
        assert!(RedisBroker::open("rediss://h/0").unwrap_err().to_string().contains("TLS"));
        let e = RedisBroker::open("redis://:secret@h/x").unwrap_err();
        assert!(matches!(e, BrokerError::BadUrl { .. }) && !e.to_string().contains("secret"), "{e}");
    }
}
