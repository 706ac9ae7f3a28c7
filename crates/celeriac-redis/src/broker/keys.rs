//! kombu's Redis key layout: queue lists and their priority sublists, binding sets, the unacked
//! hash and index, and celeriac's own dead-letter keys. Pure functions, no I/O.
//!
//! What kombu 5.7 (`kombu/transport/redis.py`) does, and so what is done here:
//!
//! - A queue is a list named after it. Publishers `LPUSH`, consumers `BRPOP`/`RPOP`: the list is
//!   FIFO from left to right.
//! - Priority is emulated with up to four lists per queue. A message's priority is
//!   `properties.priority` clamped to 0..=9 (not a number: 0); it goes to the list of the
//!   highest step of `[0, 3, 6, 9]` not above it, named `<queue>` for step 0 and
//!   `<queue>\x06\x16<step>` otherwise. Consumers pop the lists in step order, so on Redis a
//!   **lower** number is a **higher** priority (the opposite of RabbitMQ).
//! - A consumer pops from the keys "every queue at step 0, then every queue at step 3, ...".
//! - Declaring a queue adds `<routing key>\x06\x16<pattern>\x06\x16<queue>` to the set
//!   `_kombu.binding.<exchange>`, and (5.7, queues without `x-expires`) to
//!   `_kombu.binding_permanent.<exchange>`. Celery names the exchange after the queue.
//! - Delivered, unacknowledged messages live in the hash `unacked` (delivery tag →
//!   `[envelope, exchange, routing_key]` as JSON) and the sorted set `unacked_index` (delivery
//!   tag scored by the delivery time in Unix seconds); `unacked_mutex` serialises the restore of
//!   expired ones.
//!
//! kombu has no dead-letter store; celeriac keeps one under `_celeriac.dead*` (the `_celeriac.`
//! prefix mirrors kombu's `_kombu.`, so it never collides with a queue name).

use serde_json::Value;

/// kombu's separator inside priority list names and binding members (`Channel.sep`).
pub const SEP: &str = "\x06\x16";
/// kombu's priority steps (`PRIORITY_STEPS`).
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// The highest priority number kombu accepts (`max_priority`); lower numbers are clamped to 0.
pub const MAX_PRIORITY: i64 = 9;
/// The hash of delivered, unacknowledged messages (`unacked_key`).
pub const UNACKED: &str = "unacked";
/// Delivery tags of [`UNACKED`] scored by delivery time (`unacked_index_key`).
pub const UNACKED_INDEX: &str = "unacked_index";
/// The lock taken while restoring expired unacknowledged messages (`unacked_mutex_key`).
pub const UNACKED_MUTEX: &str = "unacked_mutex";
/// Prefix of the binding sets (`keyprefix_queue`).
pub const BINDING_PREFIX: &str = "_kombu.binding.";
/// Prefix of the permanent binding sets kombu 5.7 adds (`keyprefix_binding_permanent`).
pub const BINDING_PERMANENT_PREFIX: &str = "_kombu.binding_permanent.";
/// celeriac's dead letters: a list of JSON records, newest first.
pub const DEAD: &str = "_celeriac.dead";
/// Prefix of beat state keys (`_celeriac.beat.<schedule>`: a hash, entry → last run in Unix ms).
pub const BEAT_PREFIX: &str = "_celeriac.beat.";
/// Prefix of lease keys (`_celeriac.lease.<name>`: the holder, with an expiry).
pub const LEASE_PREFIX: &str = "_celeriac.lease.";
/// The counter that numbers dead letters.
pub const DEAD_SEQ: &str = "_celeriac.dead.seq";
/// Dead letters per queue: a hash of queue → count.
pub const DEAD_COUNTS: &str = "_celeriac.dead.counts";

/// The priority step a message priority falls in: kombu's `priority(n)` after clamping to 0..=9.
pub fn priority_step(priority: i64) -> u8 {
    let p = priority.clamp(0, MAX_PRIORITY);
    PRIORITY_STEPS.iter().copied().rev().find(|step| i64::from(*step) <= p).unwrap_or(0)
}

/// The list holding a queue's messages of one priority step: `<queue>` for step 0, otherwise
/// `<queue>\x06\x16<step>` (kombu's `_q_for_pri`).
pub fn queue_key(queue: &str, step: u8) -> String {
    if step == 0 {
        queue.to_string()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// The four lists of a queue, highest priority first.
pub fn queue_keys(queue: &str) -> Vec<String> {
    PRIORITY_STEPS.iter().map(|step| queue_key(queue, *step)).collect()
}

/// The lists a consumer pops from, in kombu's order (every queue at step 0, then at step 3, ...),
/// each with the index of its queue in `queues`.
pub fn consume_keys(queues: &[String]) -> Vec<(String, usize)> {
    PRIORITY_STEPS
        .iter()
        .flat_map(|step| queues.iter().enumerate().map(move |(i, q)| (queue_key(q, *step), i)))
        .collect()
}

/// The queue a list belongs to: the name before the last separator (kombu's `rsplit(sep, 1)`).
pub fn queue_of_key(key: &str) -> &str {
    key.rsplit_once(SEP).map_or(key, |(queue, _)| queue)
}

/// The binding set of an exchange.
pub fn binding_key(exchange: &str) -> String {
    format!("{BINDING_PREFIX}{exchange}")
}

/// The permanent binding set of an exchange (kombu 5.7).
pub fn binding_permanent_key(exchange: &str) -> String {
    format!("{BINDING_PERMANENT_PREFIX}{exchange}")
}

/// A member of a binding set: `<routing key>\x06\x16<pattern>\x06\x16<queue>`.
pub fn binding_member(routing_key: &str, pattern: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{pattern}{SEP}{queue}")
}

/// One binding read back from a binding set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Routing key.
    pub routing_key: String,
    /// Pattern (empty for direct exchanges).
    pub pattern: String,
    /// Bound queue.
    pub queue: String,
}

/// Parse a binding-set member; `None` if it does not have kombu's three parts.
pub fn parse_binding_member(member: &str) -> Option<Binding> {
    let mut parts = member.split(SEP);
    let (routing_key, pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some(Binding { routing_key: routing_key.into(), pattern: pattern.into(), queue: queue.into() })
}

/// The queues a message published to `exchange` with `routing_key` goes to, given the exchange's
/// bindings: the routing key itself for the default exchange `""` (kombu's anonymous exchange),
/// otherwise the queues bound with that routing key (direct routing, what Celery declares).
pub fn route(exchange: &str, routing_key: &str, bindings: &[Binding]) -> Vec<String> {
    if exchange.is_empty() {
        return vec![routing_key.to_string()];
    }
    let mut queues: Vec<String> =
        bindings.iter().filter(|b| b.routing_key == routing_key).map(|b| b.queue.clone()).collect();
    queues.dedup();
    queues
}

/// The pub/sub channel a fanout exchange broadcasts on (kombu's `_get_publish_topic` with its
/// defaults `fanout_prefix` and `fanout_patterns`): `/<db>.<exchange>`, or
/// `/<db>.<exchange>/<routing key>` when there is a routing key. Subscribers `PSUBSCRIBE` to the
/// same name with `#` in their binding key written as `*`.
pub fn fanout_channel(db: i64, exchange: &str, routing_key: &str) -> String {
    if routing_key.is_empty() {
        format!("/{db}.{exchange}")
    } else {
        format!("/{db}.{exchange}/{routing_key}")
    }
}

/// The pattern kombu stores for a topic binding (`TopicExchange.key_to_pattern`): a regular
/// expression, words joined by `\.`, `*` as `.*?[^\.]`, `#` as `.*?`, every other character
/// that is not alphanumeric escaped with a backslash.
pub fn topic_pattern(binding_key: &str) -> String {
    let escaped: String = binding_key
        .chars()
        .map(|c| if c.is_alphanumeric() || ".#*".contains(c) { c.to_string() } else { format!("\\{c}") })
        .collect();
    let words: Vec<&str> = escaped
        .split('.')
        .map(|w| match w {
            "*" => ".*?[^\\.]",
            "#" => ".*?",
            w => w,
        })
        .collect();
    format!("^{}$", words.join("\\."))
}

/// Whether a topic binding key matches a routing key the way kombu's virtual topic exchange
/// decides it (the regular expression of [`topic_pattern`]): `#` stands for any text, dots
/// included, possibly empty; `*` for any text ending in a character other than a dot. Looser than
/// AMQP (`task.*` matches `task.a.b`), and what Python consumers on Redis get.
pub fn topic_matches(binding_key: &str, routing_key: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Token<'a> {
        Text(&'a str),
        Any,
        NotDot,
    }
    let mut tokens = Vec::new();
    for (i, word) in binding_key.split('.').enumerate() {
        if i > 0 {
            tokens.push(Token::Text("."));
        }
        match word {
            "#" => tokens.push(Token::Any),
            "*" => tokens.extend([Token::Any, Token::NotDot]),
            w => tokens.push(Token::Text(w)),
        }
    }
    fn matches(tokens: &[Token<'_>], s: &str) -> bool {
        match tokens.split_first() {
            None => s.is_empty(),
            Some((Token::Text(t), rest)) => s.strip_prefix(t).is_some_and(|s| matches(rest, s)),
            Some((Token::NotDot, rest)) => {
                s.chars().next().is_some_and(|c| c != '.' && matches(rest, &s[c.len_utf8()..]))
            }
            Some((Token::Any, rest)) => {
                s.char_indices().map(|(i, _)| i).chain([s.len()]).any(|i| matches(rest, &s[i..]))
            }
        }
    }
    matches(&tokens, routing_key)
}

/// A message's priority as kombu reads it (`_get_message_priority`): `int(properties.priority)`
/// clamped to 0..=9, and 0 when it is absent or not a number.
pub fn envelope_priority(envelope: &Value) -> i64 {
    let p = envelope.get("properties").and_then(|p| p.get("priority"));
    let n = match p {
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.trunc() as i64)),
        Some(Value::Bool(b)) => Some(i64::from(*b)),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.unwrap_or(0).clamp(0, MAX_PRIORITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn priority_steps_follow_kombu() {
        let steps: Vec<u8> = (-2..=12).map(priority_step).collect();
        assert_eq!(steps, vec![0, 0, 0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9, 9]);
    }

    #[test]
    fn queue_keys_carry_kombu_suffixes() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 6), "celery\x06\x166");
        // The fixture's priority-7 message went to this list.
        assert_eq!(queue_key("celeriac-fixtures-priority", priority_step(7)), "celeriac-fixtures-priority\x06\x166");
        assert_eq!(queue_keys("q"), vec!["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]);
        assert_eq!(queue_of_key("q\x06\x169"), "q");
        assert_eq!(queue_of_key("q"), "q");
    }

    #[test]
    fn consumers_pop_every_queue_at_a_step_before_the_next_step() {
        let keys: Vec<String> = consume_keys(&["a".into(), "b".into()]).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec!["a", "b", "a\x06\x163", "b\x06\x163", "a\x06\x166", "b\x06\x166", "a\x06\x169", "b\x06\x169"]
        );
        assert_eq!(consume_keys(&["a".into(), "b".into()])[3].1, 1);
    }

    #[test]
    fn bindings_match_the_fixture() {
        let fixture: Value =
            serde_json::from_str(include_str!("../../../../tests/fixtures/celery/redis_bindings.json"))
                .expect("redis_bindings.json");
        for queue in ["celeriac-fixtures", "celeriac-fixtures-priority"] {
            let member = binding_member(queue, "", queue);
            for key in [binding_key(queue), binding_permanent_key(queue)] {
                assert_eq!(fixture[&key]["members"], json!([member]), "{key}");
            }
            let parsed = parse_binding_member(&member).unwrap();
            assert_eq!(
                (parsed.routing_key.as_str(), parsed.pattern.as_str(), parsed.queue.as_str()),
                (queue, "", queue)
            );
        }
        assert_eq!(parse_binding_member("only\x06\x16two"), None);
    }

    #[test]
    fn routing_by_exchange() {
        assert_eq!(route("", "celery", &[]), vec!["celery"]);
        let b = |rk: &str, q: &str| Binding { routing_key: rk.into(), pattern: String::new(), queue: q.into() };
        let bindings = [b("images", "images"), b("video", "video"), b("images", "thumbs")];
        assert_eq!(route("media", "images", &bindings), vec!["images", "thumbs"]);
        assert!(route("media", "nothing", &bindings).is_empty());
    }

    #[test]
    fn fanout_channels_and_topic_bindings_as_kombu_writes_them() {
        assert_eq!(fanout_channel(4, "celery.pidbox", ""), "/4.celery.pidbox");
        assert_eq!(fanout_channel(0, "ex", "a.b"), "/0.ex/a.b");
        assert_eq!(topic_pattern("#"), "^.*?$");
        assert_eq!(topic_pattern("task.*"), "^task\\..*?[^\\.]$");
        assert_eq!(topic_pattern("worker-x.#"), "^worker\\-x\\..*?$");
    }

    #[test]
    fn topic_matching_follows_kombus_regular_expressions() {
        assert!(topic_matches("#", "worker.heartbeat") && topic_matches("#", ""));
        assert!(topic_matches("task.#", "task.succeeded") && topic_matches("task.#", "task.a.b"));
        assert!(!topic_matches("task.#", "task") && !topic_matches("task.#", "worker.online"));
        assert!(topic_matches("task.*", "task.failed") && topic_matches("task.*", "task.a.b"));
        assert!(!topic_matches("task.*", "task.") && !topic_matches("*.online", "online"));
        assert!(topic_matches("worker.heartbeat", "worker.heartbeat") && !topic_matches("worker.x", "worker.y"));
        assert!(topic_matches("*.*", "a.b") && !topic_matches("*.*", "ab"));
    }

    #[test]
    fn envelope_priorities_as_kombu_reads_them() {
        let p = |v: Value| envelope_priority(&json!({"properties": {"priority": v}}));
        assert_eq!((p(json!(7)), p(json!(12)), p(json!(-1)), p(json!(4.9))), (7, 9, 0, 4));
        assert_eq!((p(json!("5")), p(json!(null)), p(json!([1])), p(json!(true))), (5, 0, 0, 1));
        assert_eq!(envelope_priority(&json!({})), 0);
        // The fixture's priority-7 message, and the list kombu pushed it to.
        let raw: Value =
            serde_json::from_str(include_str!("../../../../tests/fixtures/celery/messages/priority.raw.json")).unwrap();
        let decoded: Value =
            serde_json::from_str(include_str!("../../../../tests/fixtures/celery/messages/priority.decoded.json"))
                .unwrap();
        let queue = raw["properties"]["delivery_info"]["routing_key"].as_str().unwrap();
        assert_eq!(json!(queue_key(queue, priority_step(envelope_priority(&raw)))), decoded["redis_key"]);
    }
}
