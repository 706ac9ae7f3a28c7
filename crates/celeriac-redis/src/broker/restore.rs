//! Putting back unacknowledged messages whose visibility timeout passed, as kombu's
//! `QoS.restore_visible` does, and compatibly with Python workers doing it at the same time.
//!
//! A sweep takes kombu's lock (`SET unacked_mutex <token> NX PX <ms>`; skipped if another worker
//! holds it), lists the expired delivery tags newest first (`ZRANGE unacked_index <now -
//! visibility timeout> -inf BYSCORE REV`, kombu's query), and puts each message back at the
//! front of the queues its exchange and routing key lead to, marked as redelivered, with the
//! [`REQUEUE`](super::scripts::REQUEUE) script. That script acts only if the entry is still
//! expired (a renewed lease wins) and is still in `unacked` (so one of several sweepers wins), in
//! one atomic step. The lock is released only if it still holds this sweep's token.
//!
//! The lock expires after the visibility timeout, clamped to 5 s–300 s (kombu uses 300 s), so a
//! worker killed in the middle of a sweep delays restores by at most that.

use std::time::{Duration, Instant, SystemTime};

use super::consumer::Held;
use super::keys::{self, UNACKED, UNACKED_INDEX, UNACKED_MUTEX};
use super::scripts::{self, DEAD_LETTER, RELEASE_LOCK, REQUEUE};
use super::{wire, Inner};
use crate::conn::Failure;

/// At most this many expired messages are put back per sweep.
const SWEEP_LIMIT: usize = 1000;

/// How long the restore lock is held at most.
pub(crate) fn mutex_expire(visibility_timeout: Duration) -> Duration {
    visibility_timeout.clamp(Duration::from_secs(5), Duration::from_secs(300))
}

/// One sweep; returns how many messages were put back.
pub(crate) async fn sweep(inner: &Inner, held: &Held) -> Result<usize, Failure> {
    let expire = mutex_expire(inner.config.visibility_timeout);
    let token = uuid::Uuid::new_v4().simple().to_string();
    let token = &token;
    let expire_ms = expire.as_millis() as u64;
    let locked: Option<String> = inner
        .redis
        .run(|mut conn| async move {
            redis::cmd("SET")
                .arg(UNACKED_MUTEX)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(expire_ms)
                .query_async(&mut conn)
                .await
        })
        .await?;
    if locked.is_none() {
        tracing::trace!("another worker is restoring unacked messages");
        return Ok(0);
    }
    let result = restore_locked(inner, held, expire / 2).await;
    let release = scripts::eval(RELEASE_LOCK, &[UNACKED_MUTEX.to_string()]).arg(token).to_owned();
    let release = &release;
    if let Err(e) = inner.redis.run(|mut conn| async move { release.query_async::<i64>(&mut conn).await }).await {
        tracing::debug!(error = ?e, "could not release the restore lock; it expires by itself");
    }
    result
}

async fn restore_locked(inner: &Inner, held: &Held, budget: Duration) -> Result<usize, Failure> {
    let started = Instant::now();
    let ceil = wire::score(SystemTime::now() - inner.config.visibility_timeout);
    let ceil_ref = &ceil;
    let expired: Vec<String> = inner
        .redis
        .run(|mut conn| async move {
            redis::cmd("ZRANGE")
                .arg(UNACKED_INDEX)
                .arg(ceil_ref)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_LIMIT)
                .query_async(&mut conn)
                .await
        })
        .await?;
    let mut restored = 0;
    for tag in expired {
        if held.contains(&tag) {
            // Ours, and alive: its lease is renewed by its renewer (maybe it could not reach
            // Redis for a while).
            continue;
        }
        if started.elapsed() > budget {
            break;
        }
        if restore_tag(inner, &tag, &ceil).await? {
            restored += 1;
        }
    }
    if restored > 0 {
        tracing::info!(restored, "put back unacknowledged messages whose visibility timeout passed");
    }
    Ok(restored)
}

/// Put back the unacked message `tag` at the front of its queues if its index score is at most
/// `ceil`; returns whether this call put it back.
pub(crate) async fn restore_tag(inner: &Inner, tag: &str, ceil: &str) -> Result<bool, Failure> {
    let value: Option<Vec<u8>> = inner
        .redis
        .run(|mut conn| async move { redis::cmd("HGET").arg(UNACKED).arg(tag).query_async(&mut conn).await })
        .await?;
    let base = vec![UNACKED.to_string(), UNACKED_INDEX.to_string()];
    let Some(value) = value else {
        // Only in the index: settled or put back since it was listed, or a stray entry (the
        // script removes those, as kombu's transaction does).
        requeue(inner, base, tag, &[], ceil).await?;
        return Ok(false);
    };
    let entry = match wire::parse_unacked(&value) {
        Ok(entry) => entry,
        Err(reason) => {
            let reason = format!("its unacked entry cannot be read: {reason}");
            dead_letter(inner, tag, "unacked", &reason, "", "", &value).await?;
            return Ok(false);
        }
    };
    let queues = route(inner, &entry.exchange, &entry.routing_key).await?;
    if queues.is_empty() {
        let reason = format!(
            "no queue is bound to exchange {:?} with routing key {:?} to put it back in",
            entry.exchange, entry.routing_key
        );
        let raw = celeriac_core::protocol::to_python_json(&entry.envelope).unwrap_or_default();
        dead_letter(inner, tag, &entry.routing_key, &reason, &entry.exchange, &entry.routing_key, &raw).await?;
        return Ok(false);
    }
    let step = keys::priority_step(keys::envelope_priority(&entry.envelope));
    let mut all = base;
    all.extend(queues.iter().map(|q| keys::queue_key(q, step)));
    let payload = wire::redelivered_payload(entry.envelope);
    let done = requeue(inner, all, tag, &payload, ceil).await?;
    if done {
        tracing::debug!(%tag, queues = %queues.join(","), "put back an expired unacked message");
    }
    Ok(done)
}

/// The queues a message restored from `unacked` goes back to.
async fn route(inner: &Inner, exchange: &str, routing_key: &str) -> Result<Vec<String>, Failure> {
    if exchange.is_empty() {
        return Ok(keys::route(exchange, routing_key, &[]));
    }
    let key = keys::binding_key(exchange);
    let key = &key;
    let members: Vec<String> =
        inner.redis.run(|mut conn| async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await }).await?;
    let bindings: Vec<keys::Binding> = members.iter().filter_map(|m| keys::parse_binding_member(m)).collect();
    let mut queues = keys::route(exchange, routing_key, &bindings);
    queues.sort();
    queues.dedup();
    Ok(queues)
}

async fn requeue(inner: &Inner, keys: Vec<String>, tag: &str, payload: &[u8], ceil: &str) -> Result<bool, Failure> {
    let cmd = scripts::eval(REQUEUE, &keys).arg(tag).arg(payload).arg("R").arg(ceil).to_owned();
    let cmd = &cmd;
    let n: i64 = inner.redis.run(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
    Ok(n == 1)
}

async fn dead_letter(
    inner: &Inner,
    tag: &str,
    queue: &str,
    reason: &str,
    exchange: &str,
    routing_key: &str,
    raw: &[u8],
) -> Result<(), Failure> {
    tracing::error!(%tag, %queue, %reason, "dead-lettering an unacked message that cannot be put back");
    let record = wire::dead_record(queue, None, reason, wire::now_ms(), exchange, routing_key, raw);
    let cmd = scripts::eval(DEAD_LETTER, &dead_keys()).arg(tag).arg(record).arg(queue).to_owned();
    let cmd = &cmd;
    inner.redis.run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await }).await?;
    Ok(())
}

/// The keys of the [`DEAD_LETTER`] script.
pub(crate) fn dead_keys() -> Vec<String> {
    [UNACKED, UNACKED_INDEX, keys::DEAD, keys::DEAD_SEQ, keys::DEAD_COUNTS].iter().map(|k| k.to_string()).collect()
}
