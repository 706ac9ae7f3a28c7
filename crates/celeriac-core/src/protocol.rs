//! Celery's message protocol v2.
//!
//! A task message has three parts:
//! - **properties** (AMQP basic properties): `correlation_id` = task id, `content_type`,
//!   `content_encoding`, `delivery_mode`, `priority`, `reply_to`, and `expiration` (milliseconds
//!   left, as text) when the task has `expires`;
//! - **headers**: `lang`, `task`, `id`, `eta`, `expires`, `retries`, `timelimit`, ... — see
//!   [`TaskHeaders`], whose field order is the order Celery writes them;
//! - **body**: `[args, kwargs, embed]` where `embed` is
//!   `{"callbacks", "errbacks", "chain", "chord"}`.
//!
//! [`Message`] is what transports carry: headers as a JSON map (so a message with a broken header
//! still reaches the worker, which can then report it), properties, and the encoded body bytes.
//! [`TaskHeaders`] and [`TaskBody`] are the typed views used to build and to read one.
//!
//! JSON is written the way Python's `json.dumps` writes it (`", "` and `": "` separators, non-ASCII
//! escaped), so a body celeriac publishes is byte-for-byte the body Celery would publish for the
//! same call.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::error::ProtocolError;

/// JSON content type, the default serializer.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// A task message as carried by a transport.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Message headers (protocol v2 task headers, plus anything else the sender set).
    pub headers: Map<String, Value>,
    /// Transport-neutral message properties.
    pub properties: Properties,
    /// The encoded body.
    pub body: Vec<u8>,
}

/// Message properties (AMQP basic properties that Celery uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// The task id.
    pub correlation_id: Option<String>,
    /// MIME type of the body.
    pub content_type: String,
    /// Encoding of the body (`utf-8` for JSON).
    pub content_encoding: String,
    /// 2 = persistent.
    pub delivery_mode: u8,
    /// Message priority (0-255; higher first on RabbitMQ).
    pub priority: Option<u8>,
    /// Reply queue for the RPC result backend.
    pub reply_to: Option<String>,
    /// Message TTL: the milliseconds left until `expires` when it was sent, as a decimal string
    /// (`"60000"`), as kombu writes it; see [`expiration_property`].
    pub expiration: Option<String>,
}

impl Default for Properties {
    fn default() -> Self {
        Properties {
            correlation_id: None,
            content_type: CONTENT_TYPE_JSON.to_string(),
            content_encoding: "utf-8".to_string(),
            delivery_mode: 2,
            priority: None,
            reply_to: None,
            expiration: None,
        }
    }
}

/// The typed protocol v2 headers, in the order Celery 5.x writes them.
///
/// Every field is present on the wire, `null` when unset, as Celery does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskHeaders {
    /// Language of the sender (`"py"` for Celery; celeriac writes `"py"` too so Python workers
    /// treat its messages as their own).
    pub lang: String,
    /// The task name.
    pub task: String,
    /// The task id.
    pub id: String,
    /// Name to show in logs instead of the task name.
    pub shadow: Option<String>,
    /// Not before this time (ISO 8601).
    pub eta: Option<String>,
    /// Not after this time (ISO 8601).
    pub expires: Option<String>,
    /// Group id, when the task is part of a group.
    pub group: Option<String>,
    /// Position in its group.
    pub group_index: Option<i64>,
    /// How many times this task has been retried.
    pub retries: u32,
    /// `[hard, soft]` time limits in seconds (Celery's order: hard first).
    pub timelimit: (Option<Number>, Option<Number>),
    /// Id of the first task of the workflow.
    pub root_id: Option<String>,
    /// Id of the task that sent this one.
    pub parent_id: Option<String>,
    /// Python `repr` of the arguments, for logs and monitors.
    pub argsrepr: Option<String>,
    /// Python `repr` of the keyword arguments.
    pub kwargsrepr: Option<String>,
    /// Node name of the sender.
    pub origin: Option<String>,
    /// Do not store a result.
    pub ignore_result: bool,
    /// How many times the task was replaced (`Task.replace`).
    pub replaced_task_nesting: u32,
    /// Names of stamped headers.
    pub stamped_headers: Option<Value>,
    /// Stamps.
    pub stamps: Map<String, Value>,
}

impl TaskHeaders {
    /// Headers for a new task with every optional field unset.
    pub fn new(task: impl Into<String>, id: impl Into<String>) -> Self {
        TaskHeaders {
            lang: "py".into(),
            task: task.into(),
            id: id.into(),
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: (None, None),
            root_id: None,
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
        }
    }

    /// The headers as a JSON map, in Celery's order.
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // A struct of strings, numbers and maps always serializes to an object.
            _ => Map::new(),
        }
    }

    /// Read the typed headers out of a message's header map, naming the first bad header.
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, ProtocolError> {
        fn opt_str(map: &Map<String, Value>, name: &'static str) -> Result<Option<String>, ProtocolError> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => {
                    Err(ProtocolError::BadHeader { name, reason: format!("expected a string, got {other}") })
                }
            }
        }
        let task = opt_str(map, "task")?.ok_or(ProtocolError::MissingHeader("task"))?;
        let id = opt_str(map, "id")?.ok_or(ProtocolError::MissingHeader("id"))?;
        if id.is_empty() {
            return Err(ProtocolError::BadHeader { name: "id", reason: "empty task id".into() });
        }
        let mut h = TaskHeaders::new(task, id);
        h.lang = opt_str(map, "lang")?.unwrap_or_else(|| "py".into());
        h.shadow = opt_str(map, "shadow")?;
        h.eta = opt_str(map, "eta")?;
        h.expires = opt_str(map, "expires")?;
        h.group = opt_str(map, "group")?;
        h.root_id = opt_str(map, "root_id")?;
        h.parent_id = opt_str(map, "parent_id")?;
        h.argsrepr = opt_str(map, "argsrepr")?;
        h.kwargsrepr = opt_str(map, "kwargsrepr")?;
        h.origin = opt_str(map, "origin")?;
        h.group_index = match map.get("group_index") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| ProtocolError::BadHeader {
                name: "group_index",
                reason: format!("expected an integer, got {v}"),
            })?),
        };
        h.retries = match map.get("retries") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| ProtocolError::BadHeader {
                name: "retries",
                reason: format!("expected a non-negative integer, got {v}"),
            })?,
        };
        h.timelimit = match map.get("timelimit") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Array(items)) if items.len() == 2 => {
                let num = |v: &Value| match v {
                    Value::Null => Ok(None),
                    Value::Number(n) if n.as_f64().is_some_and(|f| f >= 0.0) => Ok(Some(n.clone())),
                    other => Err(ProtocolError::BadHeader {
                        name: "timelimit",
                        reason: format!("expected seconds or null, got {other}"),
                    }),
                };
                (num(&items[0])?, num(&items[1])?)
            }
            Some(other) => {
                return Err(ProtocolError::BadHeader {
                    name: "timelimit",
                    reason: format!("expected [hard, soft], got {other}"),
                })
            }
        };
        h.ignore_result = map.get("ignore_result").and_then(Value::as_bool).unwrap_or(false);
        h.replaced_task_nesting = map.get("replaced_task_nesting").and_then(Value::as_u64).unwrap_or(0) as u32;
        h.stamped_headers = map.get("stamped_headers").cloned().filter(|v| !v.is_null());
        h.stamps = map.get("stamps").and_then(Value::as_object).cloned().unwrap_or_default();
        if let Some(eta) = &h.eta {
            parse_datetime(eta).map_err(|reason| ProtocolError::BadHeader { name: "eta", reason })?;
        }
        if let Some(expires) = &h.expires {
            parse_datetime(expires).map_err(|reason| ProtocolError::BadHeader { name: "expires", reason })?;
        }
        Ok(h)
    }

    /// The parsed `eta`, if any.
    pub fn eta_time(&self) -> Option<DateTime<Utc>> {
        self.eta.as_deref().and_then(|s| parse_datetime(s).ok())
    }

    /// The parsed `expires`, if any.
    pub fn expires_time(&self) -> Option<DateTime<Utc>> {
        self.expires.as_deref().and_then(|s| parse_datetime(s).ok())
    }

    /// The hard time limit in seconds.
    pub fn hard_time_limit(&self) -> Option<f64> {
        self.timelimit.0.as_ref().and_then(Number::as_f64)
    }

    /// The soft time limit in seconds.
    pub fn soft_time_limit(&self) -> Option<f64> {
        self.timelimit.1.as_ref().and_then(Number::as_f64)
    }
}

/// Seconds as a JSON number the way Python prints them: `10`, not `10.0`.
pub fn seconds_number(secs: f64) -> Option<Number> {
    if secs.fract() == 0.0 && secs.abs() < 9.0e15 {
        Some(Number::from(secs as i64))
    } else {
        Number::from_f64(secs)
    }
}

/// Format a time the way Celery writes `eta`/`expires`: Python's `datetime.isoformat()` of an
/// aware UTC datetime, `+00:00` offset, six fractional digits unless the microseconds are zero.
pub fn format_datetime(t: DateTime<Utc>) -> String {
    if t.timestamp_subsec_micros() == 0 {
        t.to_rfc3339_opts(SecondsFormat::Secs, false)
    } else {
        t.to_rfc3339_opts(SecondsFormat::Micros, false)
    }
}

/// The `expiration` property of a message sent at `now` that expires at `expires`: the
/// milliseconds left as text, `"0"` once past. Computed as Celery and kombu do,
/// `str(int(max((expires - now).total_seconds(), 0) * 1000))`, float steps included, so the
/// digits are Celery's.
pub fn expiration_property(expires: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let micros = (expires - now).num_microseconds().unwrap_or(i64::MAX).max(0);
    let secs = micros as f64 / 1e6;
    ((secs * 1000.0) as i64).to_string()
}

/// Parse an ISO 8601 time as Celery writes it. A time without an offset is taken as UTC.
pub fn parse_datetime(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(naive.and_utc());
        }
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Ok(t.with_timezone(&Utc));
    }
    Err(format!("{s:?} is not an ISO 8601 time"))
}

/// The `embed` part of a body: workflow links, each `null` or a list/dict of signatures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Embed {
    /// Signatures to apply with the result on success (`link`).
    #[serde(default)]
    pub callbacks: Option<Value>,
    /// Signatures to apply on failure (`link_error`).
    #[serde(default)]
    pub errbacks: Option<Value>,
    /// The rest of a chain, last task first.
    #[serde(default)]
    pub chain: Option<Value>,
    /// The chord callback.
    #[serde(default)]
    pub chord: Option<Value>,
}

/// A decoded body: `[args, kwargs, embed]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskBody {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Workflow links.
    pub embed: Embed,
}

impl TaskBody {
    /// Encode as JSON, exactly as Python's `json.dumps` would.
    pub fn to_json(&self) -> Result<Vec<u8>, ProtocolError> {
        let value = Value::Array(vec![
            Value::Array(self.args.clone()),
            Value::Object(self.kwargs.clone()),
            serde_json::to_value(&self.embed).map_err(|e| ProtocolError::Encode(e.to_string()))?,
        ]);
        to_python_json(&value)
    }

    /// Decode a body of the given content type and encoding.
    pub fn decode(body: &[u8], content_type: &str, content_encoding: &str) -> Result<Self, ProtocolError> {
        match content_encoding.to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" | "binary" | "" => {}
            other => return Err(ProtocolError::UnsupportedContentEncoding(other.to_string())),
        }
        if content_type != CONTENT_TYPE_JSON {
            return Err(ProtocolError::UnsupportedContentType(content_type.to_string()));
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ProtocolError::MalformedBody(format!("not JSON: {e}")))?;
        let Value::Array(mut parts) = value else {
            return Err(ProtocolError::MalformedBody("expected [args, kwargs, embed]".into()));
        };
        if !(2..=3).contains(&parts.len()) {
            return Err(ProtocolError::MalformedBody(format!(
                "expected [args, kwargs, embed], got a list of {}",
                parts.len()
            )));
        }
        let embed = if parts.len() == 3 { parts.pop() } else { None };
        let kwargs = match parts.pop() {
            Some(Value::Object(m)) => m,
            Some(Value::Null) => Map::new(),
            other => {
                return Err(ProtocolError::MalformedBody(format!(
                    "kwargs must be an object, got {}",
                    other.unwrap_or(Value::Null)
                )))
            }
        };
        let args = match parts.pop() {
            Some(Value::Array(a)) => a,
            Some(Value::Null) => Vec::new(),
            other => {
                return Err(ProtocolError::MalformedBody(format!(
                    "args must be a list, got {}",
                    other.unwrap_or(Value::Null)
                )))
            }
        };
        let embed = match embed {
            None | Some(Value::Null) => Embed::default(),
            Some(v @ Value::Object(_)) => {
                serde_json::from_value(v).map_err(|e| ProtocolError::MalformedBody(format!("embed: {e}")))?
            }
            Some(other) => return Err(ProtocolError::MalformedBody(format!("embed must be an object, got {other}"))),
        };
        Ok(TaskBody { args, kwargs, embed })
    }
}

impl Message {
    /// Build a task message from typed headers and a body, with JSON content.
    pub fn new_task(
        headers: &TaskHeaders,
        body: &TaskBody,
        priority: Option<u8>,
        reply_to: Option<String>,
    ) -> Result<Self, ProtocolError> {
        Ok(Message {
            headers: headers.to_map(),
            properties: Properties {
                correlation_id: Some(headers.id.clone()),
                priority,
                reply_to,
                ..Properties::default()
            },
            body: body.to_json()?,
        })
    }

    /// The task id from the headers (or the correlation id), if any.
    pub fn task_id(&self) -> Option<&str> {
        self.headers.get("id").and_then(Value::as_str).or(self.properties.correlation_id.as_deref())
    }

    /// The task name from the headers, if any.
    pub fn task_name(&self) -> Option<&str> {
        self.headers.get("task").and_then(Value::as_str)
    }

    /// The typed headers.
    pub fn task_headers(&self) -> Result<TaskHeaders, ProtocolError> {
        TaskHeaders::from_map(&self.headers)
    }

    /// The decoded body.
    pub fn task_body(&self) -> Result<TaskBody, ProtocolError> {
        TaskBody::decode(&self.body, &self.properties.content_type, &self.properties.content_encoding)
    }
}

/// Serialize a JSON value exactly as Python's `json.dumps(value)` does: `", "` and `": "`
/// separators and non-ASCII characters escaped as `\uXXXX`.
pub fn to_python_json(value: &Value) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value.serialize(&mut ser).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(out)
}

/// A `serde_json` formatter that writes what CPython's `json.dumps` writes with default options.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut buf = [0u16; 2];
        for ch in fragment.chars() {
            if ch.is_ascii() {
                writer.write_all(&[ch as u8])?;
            } else {
                for unit in ch.encode_utf16(&mut buf) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_spacing_and_ascii_escapes() {
        let v = json!([[2, 3], {"z": 4, "m": "héllo"}, {"callbacks": null}]);
        let s = String::from_utf8(to_python_json(&v).unwrap()).unwrap();
        assert_eq!(s, r#"[[2, 3], {"z": 4, "m": "h\u00e9llo"}, {"callbacks": null}]"#);
    }

    #[test]
    fn body_round_trips() {
        let body = TaskBody {
            args: vec![json!(1)],
            kwargs: json!({"a": "b"}).as_object().unwrap().clone(),
            embed: Embed::default(),
        };
        let bytes = body.to_json().unwrap();
        assert_eq!(TaskBody::decode(&bytes, CONTENT_TYPE_JSON, "utf-8").unwrap(), body);
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(matches!(TaskBody::decode(b"{", CONTENT_TYPE_JSON, "utf-8"), Err(ProtocolError::MalformedBody(_))));
        assert!(matches!(TaskBody::decode(b"{}", CONTENT_TYPE_JSON, "utf-8"), Err(ProtocolError::MalformedBody(_))));
        assert!(matches!(
            TaskBody::decode(b"[1, {}]", CONTENT_TYPE_JSON, "utf-8"),
            Err(ProtocolError::MalformedBody(_))
        ));
        assert!(matches!(
            TaskBody::decode(b"[]", "application/x-python-serialize", "binary"),
            Err(ProtocolError::UnsupportedContentType(_))
        ));
    }

    #[test]
    fn headers_need_an_id() {
        let mut m = TaskHeaders::new("t", "x").to_map();
        m.remove("id");
        assert_eq!(TaskHeaders::from_map(&m), Err(ProtocolError::MissingHeader("id")));
    }

    #[test]
    fn datetimes_parse_in_celery_forms() {
        let t = parse_datetime("2030-01-02T03:04:05.000006+00:00").unwrap();
        assert_eq!(format_datetime(t), "2030-01-02T03:04:05.000006+00:00");
        let whole = parse_datetime("2030-01-02T05:04:05+02:00").unwrap();
        assert_eq!(format_datetime(whole), "2030-01-02T03:04:05+00:00");
        assert!(parse_datetime("2030-01-02T03:04:05").is_ok());
        assert!(parse_datetime("tomorrow").is_err());
    }

    #[test]
    fn expiration_is_milliseconds_left_as_text() {
        let now = parse_datetime("2025-01-02T03:04:05.678901+00:00").unwrap();
        assert_eq!(expiration_property(now + chrono::Duration::seconds(60), now), "60000");
        assert_eq!(expiration_property(parse_datetime("2030-01-02T03:04:05+00:00").unwrap(), now), "157766399321");
        assert_eq!(expiration_property(now - chrono::Duration::seconds(1), now), "0");
        // Truncated, as Python's int(), not rounded.
        assert_eq!(expiration_property(now + chrono::Duration::microseconds(999_600), now), "999");
    }

    #[test]
    fn whole_seconds_print_as_integers() {
        assert_eq!(seconds_number(10.0).unwrap().to_string(), "10");
        assert_eq!(seconds_number(2.5).unwrap().to_string(), "2.5");
    }
}
