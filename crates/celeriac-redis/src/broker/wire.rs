//! The bytes kombu keeps around a message on Redis, beyond the envelope itself: the `unacked`
//! hash's values, the redelivery flags set when a message is put back, the `unacked_index`
//! scores, and celeriac's dead-letter records. Pure functions, no I/O.

use std::time::{SystemTime, UNIX_EPOCH};

use celeriac_core::broker::DeadLetter;
use celeriac_core::protocol::to_python_json;
use serde_json::{Map, Value};

/// What the broker needs from an envelope besides the message.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvelopeInfo {
    /// `properties.delivery_tag`: the key of the message in `unacked`.
    pub tag: String,
    /// `properties.delivery_info.exchange` (`""` when absent).
    pub exchange: String,
    /// `properties.delivery_info.routing_key` (`""` when absent).
    pub routing_key: String,
    /// Whether kombu marked it as put back (`headers.redelivered` or
    /// `properties.delivery_info.redelivered`).
    pub redelivered: bool,
}

/// Read the delivery tag, routing and redelivery flag of a parsed envelope; `None` without a
/// string `properties.delivery_tag` (kombu cannot track such a message either).
pub fn envelope_info(envelope: &Value) -> Option<EnvelopeInfo> {
    let props = envelope.get("properties")?;
    let tag = props.get("delivery_tag")?.as_str()?.to_string();
    let info = props.get("delivery_info");
    let text = |key: &str| info.and_then(|i| i.get(key)).and_then(Value::as_str).unwrap_or("").to_string();
    let flag = |v: Option<&Value>| v.and_then(|v| v.get("redelivered")).and_then(Value::as_bool).unwrap_or(false);
    Some(EnvelopeInfo {
        tag,
        exchange: text("exchange"),
        routing_key: text("routing_key"),
        redelivered: flag(envelope.get("headers")) || flag(info),
    })
}

/// A JSON string as Python's `json.dumps` writes it.
fn py_string(text: &str) -> Vec<u8> {
    to_python_json(&Value::String(text.to_string())).unwrap_or_else(|_| b"\"\"".to_vec())
}

/// The `unacked` hash value of a delivered message: `[envelope, exchange, routing_key]`, the
/// envelope kept verbatim (what kombu's `dumps([message._raw, EX, RK])` writes for an envelope
/// that Python wrote).
pub fn unacked_value(raw: &[u8], exchange: &str, routing_key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + exchange.len() + routing_key.len() + 12);
    out.push(b'[');
    out.extend_from_slice(raw);
    out.extend_from_slice(b", ");
    out.extend_from_slice(&py_string(exchange));
    out.extend_from_slice(b", ");
    out.extend_from_slice(&py_string(routing_key));
    out.push(b']');
    out
}

/// One entry of the `unacked` hash, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct UnackedEntry {
    /// The envelope (key order kept).
    pub envelope: Value,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
}

/// Parse an `unacked` hash value written by kombu or by celeriac.
pub fn parse_unacked(value: &[u8]) -> Result<UnackedEntry, String> {
    let parsed = celeriac_core::pyjson::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Array(mut parts) = parsed else { return Err("not a JSON array".into()) };
    if parts.len() != 3 {
        return Err(format!("expected [envelope, exchange, routing_key], got {} items", parts.len()));
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    let (exchange, routing_key) = (text(&parts[1]), text(&parts[2]));
    let envelope = parts.swap_remove(0);
    if !envelope.is_object() {
        return Err("the envelope is not a JSON object".into());
    }
    Ok(UnackedEntry { envelope, exchange, routing_key })
}

/// The envelope to push back when a message is restored, as kombu's `_do_restore_message`
/// writes it: `headers.redelivered` and then `properties.delivery_info.redelivered` set to
/// `true` (the second only if the first could be set; neither without `headers`), written as
/// Python's `json.dumps` writes it.
pub fn redelivered_payload(mut envelope: Value) -> Vec<u8> {
    if let Some(Value::Object(headers)) = envelope.get_mut("headers") {
        headers.insert("redelivered".into(), Value::Bool(true));
        if let Some(Value::Object(info)) = envelope.get_mut("properties").and_then(|p| p.get_mut("delivery_info")) {
            info.insert("redelivered".into(), Value::Bool(true));
        }
    }
    to_python_json(&envelope).unwrap_or_default()
}

/// [`redelivered_payload`] of raw envelope bytes; bytes that are not a JSON object go back as
/// they are.
pub fn redelivered_raw(raw: &[u8]) -> Vec<u8> {
    match celeriac_core::pyjson::from_slice(raw) {
        Ok(v @ Value::Object(_)) => redelivered_payload(v),
        _ => raw.to_vec(),
    }
}

/// An `unacked_index` score: Unix time in seconds, as kombu's `time()`, with microseconds.
pub fn score(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    format!("{secs:.6}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A dead-letter record *without* its `id` (the script that stores it numbers it and puts the id
/// first): `{"queue", "task_id", "reason", "dead_at_ms", "exchange", "routing_key", "message"}`,
/// the message being the envelope as JSON (or its text, if it is not JSON).
pub fn dead_record(
    queue: &str,
    task_id: Option<&str>,
    reason: &str,
    dead_at_ms: i64,
    exchange: &str,
    routing_key: &str,
    raw: &[u8],
) -> Vec<u8> {
    let message = match celeriac_core::pyjson::from_slice(raw) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(raw).into_owned()),
    };
    let mut record = Map::new();
    record.insert("queue".into(), Value::from(queue));
    record.insert("task_id".into(), task_id.map_or(Value::Null, Value::from));
    record.insert("reason".into(), Value::from(reason));
    record.insert("dead_at_ms".into(), Value::from(dead_at_ms));
    record.insert("exchange".into(), Value::from(exchange));
    record.insert("routing_key".into(), Value::from(routing_key));
    record.insert("message".into(), message);
    to_python_json(&Value::Object(record)).unwrap_or_default()
}

/// Parse a stored dead-letter record (with its id).
pub fn parse_dead_record(bytes: &[u8]) -> Option<DeadLetter> {
    let v = celeriac_core::pyjson::from_slice(bytes).ok()?;
    Some(DeadLetter {
        id: v.get("id")?.as_i64()?,
        queue: v.get("queue")?.as_str()?.to_string(),
        task_id: v.get("task_id").and_then(Value::as_str).map(str::to_string),
        reason: v.get("reason").and_then(Value::as_str).unwrap_or_default().to_string(),
        dead_at_ms: v.get("dead_at_ms").and_then(Value::as_i64).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RAW: &str = include_str!("../../../../tests/fixtures/celery/messages/args_kwargs.raw.json");

    #[test]
    fn unacked_values_are_kombus() {
        let value = unacked_value(RAW.as_bytes(), "", "celeriac-fixtures");
        // What Python's `dumps([loads(raw), "", "celeriac-fixtures"])` gives for an envelope
        // Python wrote: the same bytes, in a list.
        let expected = format!("[{RAW}, \"\", \"celeriac-fixtures\"]");
        assert_eq!(String::from_utf8(value.clone()).unwrap(), expected);
        let entry = parse_unacked(&value).unwrap();
        assert_eq!((entry.exchange.as_str(), entry.routing_key.as_str()), ("", "celeriac-fixtures"));
        assert_eq!(to_python_json(&entry.envelope).unwrap(), RAW.as_bytes());
        assert_eq!(unacked_value(b"{}", "\u{e9}x", "q\"1"), br#"[{}, "\u00e9x", "q\"1"]"#.to_vec());
        assert!(parse_unacked(b"[1, 2]").is_err());
        assert!(parse_unacked(b"[1, \"\", \"q\"]").is_err());
        assert!(parse_unacked(b"nope").is_err());
    }

    #[test]
    fn envelope_info_reads_tag_routing_and_flags() {
        let env: Value = serde_json::from_str(RAW).unwrap();
        let info = envelope_info(&env).unwrap();
        assert_eq!(info.exchange, "");
        assert_eq!(info.routing_key, "celeriac-fixtures");
        assert!(info.tag.starts_with("de11ba00-"), "{}", info.tag);
        assert!(!info.redelivered);
        let again: Value = serde_json::from_slice(&redelivered_payload(env)).unwrap();
        assert!(envelope_info(&again).unwrap().redelivered);
        assert_eq!(envelope_info(&json!({"properties": {}})), None);
        assert_eq!(envelope_info(&json!({"properties": {"delivery_tag": 5}})), None);
    }

    #[test]
    fn restored_payloads_carry_kombus_flags_in_place() {
        let env: Value = serde_json::from_str(RAW).unwrap();
        let restored = String::from_utf8(redelivered_payload(env)).unwrap();
        // Appended last to `headers` and to `delivery_info`, everything else untouched.
        let expected = RAW.replace(r#""stamps": {}}"#, r#""stamps": {}, "redelivered": true}"#).replace(
            r#""routing_key": "celeriac-fixtures"}"#,
            r#""routing_key": "celeriac-fixtures", "redelivered": true}"#,
        );
        assert_eq!(restored, expected);
        // Already flagged: the keys stay where they are.
        assert_eq!(redelivered_raw(expected.as_bytes()), expected.as_bytes());
        // No headers: nothing is set (kombu's KeyError), but the JSON is rewritten as Python would.
        assert_eq!(
            redelivered_payload(json!({"properties": {"delivery_info": {}}})),
            br#"{"properties": {"delivery_info": {}}}"#.to_vec()
        );
        assert_eq!(redelivered_raw(b"not json"), b"not json".to_vec());
    }

    #[test]
    fn scores_are_unix_seconds_with_microseconds() {
        let at = UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(score(at), "1700000000.123456");
    }

    #[test]
    fn dead_records_round_trip() {
        let record = dead_record("q", Some("id-1"), "bad \"input\"", 1234, "", "q", b"{\"body\": 1}");
        assert_eq!(
            String::from_utf8(record.clone()).unwrap(),
            r#"{"queue": "q", "task_id": "id-1", "reason": "bad \"input\"", "dead_at_ms": 1234, "exchange": "", "routing_key": "q", "message": {"body": 1}}"#
        );
        // The storing script puts the id first.
        let mut stored = br#"{"id": 7, "#.to_vec();
        stored.extend_from_slice(&record[1..]);
        let d = parse_dead_record(&stored).unwrap();
        assert_eq!(
            (d.id, d.queue.as_str(), d.task_id.as_deref(), d.reason.as_str(), d.dead_at_ms),
            (7, "q", Some("id-1"), "bad \"input\"", 1234)
        );
        let text = dead_record("q", None, "r", 0, "", "q", b"\xffgarbage");
        assert!(String::from_utf8(text).unwrap().contains(r#""task_id": null"#));
        assert_eq!(parse_dead_record(b"{}"), None);
    }
}
