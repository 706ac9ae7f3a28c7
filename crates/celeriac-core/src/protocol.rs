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
//! Reading goes through [`Message::task_headers`] and [`Message::task_body`], which give the v2
//! view of any message a Celery 5 worker accepts: the body is first decompressed when kombu's
//! `compression` header says so ([`crate::compression`]), and a **protocol v1** message (no
//! `task` header; `task`, `id`, `args`, `kwargs`, `eta`, `expires`, `retries`, `timelimit`,
//! `taskset`, `callbacks`, `errbacks`, `chord` all in a body object) is converted as Celery's
//! `celery/worker/strategy.py` (`proto1_to_proto2`) converts it. `eta`/`expires` are read by
//! [`parse_datetime`], Celery's ISO 8601 grammar.
//!
//! JSON is written the way Python's `json.dumps` writes it (`", "` and `": "` separators, non-ASCII
//! escaped), so a body celeriac publishes is byte-for-byte the body Celery would publish for the
//! same call.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::compression::{Codec, CompressionError};
use crate::error::ProtocolError;
use crate::pyjson::RawJson;

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
    /// Whether not to store a result, when the sender said (`Some`: it overrides the task's own
    /// `ignore_result`, as Celery 5.7's `get_actual_ignore_result`, `celery/app/task.py`); `None`
    /// (`null`, what Celery's `send_task` writes) leaves it to the task.
    pub ignore_result: Option<bool>,
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
            ignore_result: None,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
        }
    }

    /// The headers as a JSON map, in Celery's order. Built field by field rather than through
    /// `serde_json::to_value`, which refuses a `NaN` held in `stamps`.
    pub fn to_map(&self) -> Map<String, Value> {
        let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
        let n = |v: &Option<Number>| v.clone().map_or(Value::Null, Value::Number);
        let mut m = Map::with_capacity(19);
        m.insert("lang".into(), Value::String(self.lang.clone()));
        m.insert("task".into(), Value::String(self.task.clone()));
        m.insert("id".into(), Value::String(self.id.clone()));
        m.insert("shadow".into(), s(&self.shadow));
        m.insert("eta".into(), s(&self.eta));
        m.insert("expires".into(), s(&self.expires));
        m.insert("group".into(), s(&self.group));
        m.insert("group_index".into(), self.group_index.map_or(Value::Null, Value::from));
        m.insert("retries".into(), Value::from(self.retries));
        m.insert("timelimit".into(), Value::Array(vec![n(&self.timelimit.0), n(&self.timelimit.1)]));
        m.insert("root_id".into(), s(&self.root_id));
        m.insert("parent_id".into(), s(&self.parent_id));
        m.insert("argsrepr".into(), s(&self.argsrepr));
        m.insert("kwargsrepr".into(), s(&self.kwargsrepr));
        m.insert("origin".into(), s(&self.origin));
        m.insert("ignore_result".into(), self.ignore_result.map_or(Value::Null, Value::Bool));
        m.insert("replaced_task_nesting".into(), Value::from(self.replaced_task_nesting));
        m.insert("stamped_headers".into(), self.stamped_headers.clone().unwrap_or(Value::Null));
        m.insert("stamps".into(), Value::Object(self.stamps.clone()));
        m
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
        // Celery's `maybe_iso8601` reads an empty text as no time.
        h.eta = opt_str(map, "eta")?.filter(|s| !s.is_empty());
        h.expires = opt_str(map, "expires")?.filter(|s| !s.is_empty());
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
        h.ignore_result = map.get("ignore_result").and_then(Value::as_bool);
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

/// Parse an `eta`/`expires` time the way Celery 5 reads one: `dateutil.parser.isoparse`
/// (`celery/utils/time.py` `maybe_iso8601`, used by `celery/worker/request.py` and
/// `celery/app/base.py`), then a time without an offset taken as UTC (`maybe_make_aware`).
///
/// Accepted, as isoparse accepts them:
/// - a date: `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, `YYYYMMDD`, an ISO week `YYYY-Www`, `YYYYWww`,
///   `YYYY-Www-D`, `YYYYWwwD`, or an ordinal day `YYYY-DDD`, `YYYYDDD` (a date alone is its
///   midnight);
/// - optionally, after any one ASCII character (`T`, a space, ...; not after `YYYY` or
///   `YYYY-MM` alone), a time: `hh`, `hh:mm`, `hhmm`, `hh:mm:ss`, `hhmmss`, then a fraction
///   of the seconds after `.` or `,` (any number of digits, cut to microseconds), and
///   `24:00[:00[.0]]` as the next midnight;
/// - optionally, right after the time, an offset: `Z`, `z`, `±HH`, `±HHMM`, `±HH:MM`.
///
/// Anything else is refused with an error naming the value. (isoparse reads each field with
/// Python's `int()` on a fixed slice, so it also takes a sign, spaces or `_` inside a field, or
/// a one-digit day at the very end, and reads `YYYYDDD` alone as `YYYYMMD`; here every field
/// has its full digits and `YYYYDDD` is an ordinal day, as ISO 8601 says.)
pub fn parse_datetime(s: &str) -> Result<DateTime<Utc>, String> {
    iso8601::parse(s).map_err(|why| format!("{s:?} is not an ISO 8601 time: {why}"))
}

/// The grammar of [`parse_datetime`].
mod iso8601 {
    use chrono::{DateTime, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

    /// A cursor over the ASCII bytes of the text.
    struct Text<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl Text<'_> {
        fn rest(&self) -> &[u8] {
            &self.bytes[self.pos..]
        }

        fn at_end(&self) -> bool {
            self.pos >= self.bytes.len()
        }

        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.pos).copied()
        }

        fn eat(&mut self, b: u8) -> bool {
            if self.peek() == Some(b) {
                self.pos += 1;
                true
            } else {
                false
            }
        }

        /// Exactly `n` digits.
        fn digits(&mut self, n: usize, what: &str) -> Result<u32, String> {
            let field = self.rest().get(..n).filter(|d| d.iter().all(u8::is_ascii_digit));
            let Some(field) = field else { return Err(format!("expected {n} digits of {what}")) };
            let value = field.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0'));
            self.pos += n;
            Ok(value)
        }
    }

    pub(super) fn parse(s: &str) -> Result<DateTime<Utc>, String> {
        if !s.is_ascii() {
            return Err("only ASCII characters are allowed".into());
        }
        let mut t = Text { bytes: s.as_bytes(), pos: 0 };
        let (date, complete) = date(&mut t)?;
        if t.at_end() {
            return Ok(date.and_time(NaiveTime::MIN).and_utc());
        }
        if !complete {
            return Err("a year or year-month cannot take a time".into());
        }
        t.pos += 1; // the separator: any one character
        let (time, next_day, offset) = time(&mut t)?;
        let naive = NaiveDateTime::new(date, time) + Duration::days(i64::from(next_day));
        match offset {
            None => Ok(naive.and_utc()),
            Some(offset) => offset
                .from_local_datetime(&naive)
                .single()
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| "out of range".to_string()),
        }
    }

    /// The date, and whether it is a full date (which may take a time).
    fn date(t: &mut Text<'_>) -> Result<(NaiveDate, bool), String> {
        let year = t.digits(4, "the year")? as i32;
        if year == 0 {
            return Err("year 0 does not exist".into());
        }
        if t.at_end() {
            return Ok((ymd(year, 1, 1)?, false));
        }
        let dash = t.eat(b'-');
        if t.eat(b'W') {
            let week = t.digits(2, "the week")?;
            let mut day = 1;
            if !t.at_end() {
                // A week date without its day cannot take a time.
                if dash && !t.eat(b'-') {
                    return Err("expected '-' and a weekday after the week".into());
                }
                day = t.digits(1, "the weekday")?;
            }
            if !(1..=53).contains(&week) || !(1..=7).contains(&day) {
                return Err(format!("no week {week} day {day}"));
            }
            let weekday = chrono::Weekday::try_from(day as u8 - 1).map_err(|e| e.to_string())?;
            return NaiveDate::from_isoywd_opt(year, week, weekday)
                .map(|d| (d, true))
                .ok_or_else(|| format!("{year} has no week {week}"));
        }
        // Ordinal day: three digits after the year (and its dash), then the end or the time.
        let ordinal_len = |t: &Text<'_>| {
            let r = t.rest();
            r.len() >= 3 && r[..3].iter().all(u8::is_ascii_digit) && (r.len() == 3 || !r[3].is_ascii_digit())
        };
        let month_day = |t: &Text<'_>| {
            let r = t.rest();
            if dash {
                r.len() == 2 || (r.len() >= 5 && r[2] == b'-')
            } else {
                r.len() >= 4 && r[..4].iter().all(u8::is_ascii_digit)
            }
        };
        if !month_day(t) && ordinal_len(t) {
            let day = t.digits(3, "the day of the year")?;
            return NaiveDate::from_yo_opt(year, day)
                .map(|d| (d, true))
                .ok_or_else(|| format!("{year} has no day {day}"));
        }
        let month = t.digits(2, "the month")?;
        if dash && t.at_end() {
            return Ok((ymd(year, month, 1)?, false));
        }
        if dash && !t.eat(b'-') {
            return Err("expected '-' before the day".into());
        }
        let day = t.digits(2, "the day")?;
        Ok((ymd(year, month, day)?, true))
    }

    fn ymd(year: i32, month: u32, day: u32) -> Result<NaiveDate, String> {
        NaiveDate::from_ymd_opt(year, month, day).ok_or_else(|| format!("no day {year:04}-{month:02}-{day:02}"))
    }

    /// The time of day, whether it is 24:00 (the next day's midnight), and the offset if any.
    fn time(t: &mut Text<'_>) -> Result<(NaiveTime, bool, Option<FixedOffset>), String> {
        let hour = t.digits(2, "the hour")?;
        let (mut minute, mut second, mut micro) = (0, 0, 0);
        if !t.at_end() && !is_offset_start(t.peek()) {
            let colon = t.eat(b':');
            minute = t.digits(2, "the minutes")?;
            if !t.at_end() && !is_offset_start(t.peek()) {
                if colon && !t.eat(b':') {
                    return Err("expected ':' before the seconds".into());
                }
                if !colon && t.peek() == Some(b':') {
                    return Err("inconsistent ':' separators".into());
                }
                second = t.digits(2, "the seconds")?;
                if matches!(t.peek(), Some(b'.' | b',')) {
                    t.pos += 1;
                    let digits = t.rest().iter().take_while(|b| b.is_ascii_digit()).count();
                    if digits == 0 {
                        return Err("expected digits after the decimal mark".into());
                    }
                    let kept = &t.rest()[..digits.min(6)];
                    micro =
                        kept.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')) * 10u32.pow(6 - kept.len() as u32);
                    t.pos += digits;
                }
            }
        }
        let offset = if t.at_end() { None } else { Some(offset(t)?) };
        if hour == 24 {
            if (minute, second, micro) != (0, 0, 0) {
                return Err("hour 24 is only allowed as 24:00:00".into());
            }
            return Ok((NaiveTime::MIN, true, offset));
        }
        let time = NaiveTime::from_hms_micro_opt(hour, minute, second, micro)
            .ok_or_else(|| format!("no time {hour:02}:{minute:02}:{second:02}"))?;
        Ok((time, false, offset))
    }

    fn is_offset_start(b: Option<u8>) -> bool {
        matches!(b, Some(b'+' | b'-' | b'Z' | b'z'))
    }

    /// `Z`, `±HH`, `±HHMM` or `±HH:MM`, to the end of the text.
    fn offset(t: &mut Text<'_>) -> Result<FixedOffset, String> {
        let rest = t.rest();
        if rest == b"Z" || rest == b"z" {
            return Ok(FixedOffset::east_opt(0).expect("zero offset"));
        }
        let sign = match rest.first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(format!("unexpected {:?} after the time", String::from_utf8_lossy(rest))),
        };
        t.pos += 1;
        let hours = t.digits(2, "the offset hours")?;
        let minutes = if t.at_end() {
            0
        } else {
            t.eat(b':');
            t.digits(2, "the offset minutes")?
        };
        if !t.at_end() {
            return Err("the offset must be Z, ±HH, ±HHMM or ±HH:MM".into());
        }
        if hours > 23 || minutes > 59 {
            return Err(format!("no offset of {hours:02}:{minutes:02}"));
        }
        FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60) as i32).ok_or_else(|| "offset out of range".into())
    }
}

/// The `embed` part of a body: workflow links, each `null` or a list/dict of signatures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embed {
    /// Signatures to apply with the result on success (`link`).
    pub callbacks: Option<Value>,
    /// Signatures to apply on failure (`link_error`).
    pub errbacks: Option<Value>,
    /// The rest of a chain, last task first, as the JSON text it arrived as: every step passes
    /// it on minus one step, so it is decoded only where it is read
    /// ([`crate::canvas::continuation`]).
    pub chain: Option<RawJson>,
    /// The chord callback.
    pub chord: Option<Value>,
}

/// An embed as read straight from a body, the rest of the chain left undecoded.
#[derive(Deserialize)]
struct WireEmbed {
    #[serde(default)]
    callbacks: Option<Value>,
    #[serde(default)]
    errbacks: Option<Value>,
    #[serde(default)]
    chain: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    chord: Option<Value>,
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

impl Embed {
    /// The embed as a JSON object, in Celery's key order.
    pub fn to_value(&self) -> Value {
        let v = |v: &Option<Value>| v.clone().unwrap_or(Value::Null);
        let mut m = Map::new();
        m.insert("callbacks".into(), v(&self.callbacks));
        m.insert("errbacks".into(), v(&self.errbacks));
        m.insert("chain".into(), self.chain.as_ref().and_then(|c| c.to_value().ok()).unwrap_or(Value::Null));
        m.insert("chord".into(), v(&self.chord));
        Value::Object(m)
    }

    /// Read an embed object; missing keys are `None`. (By hand rather than through
    /// `serde_json::from_value`, which refuses a `NaN` inside a linked signature.)
    pub fn from_map(mut map: Map<String, Value>) -> Self {
        let mut take = |k: &str| map.remove(k).filter(|v| !v.is_null());
        Embed {
            callbacks: take("callbacks"),
            errbacks: take("errbacks"),
            chain: take("chain").map(|c| RawJson::from_value(&c)),
            chord: take("chord"),
        }
    }

    /// Write the embed as Python's `json.dumps` writes Celery's dict (keys in Celery's order),
    /// the rest of the chain as its text.
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let encode = |v: &Option<Value>, out: &mut Vec<u8>| -> Result<(), ProtocolError> {
            match v {
                None => out.extend_from_slice(b"null"),
                Some(v) => out.extend_from_slice(&to_python_json(v)?),
            }
            Ok(())
        };
        out.extend_from_slice(b"{\"callbacks\": ");
        encode(&self.callbacks, out)?;
        out.extend_from_slice(b", \"errbacks\": ");
        encode(&self.errbacks, out)?;
        out.extend_from_slice(b", \"chain\": ");
        match &self.chain {
            None => out.extend_from_slice(b"null"),
            Some(text) => out.extend_from_slice(text.as_str().as_bytes()),
        }
        out.extend_from_slice(b", \"chord\": ");
        encode(&self.chord, out)?;
        out.push(b'}');
        Ok(())
    }
}

impl TaskBody {
    /// Encode as JSON, exactly as Python's `json.dumps` would (the rest of a chain written as
    /// the text it is held as).
    pub fn to_json(&self) -> Result<Vec<u8>, ProtocolError> {
        let chain_len = self.embed.chain.as_ref().map_or(0, |c| c.as_str().len());
        let mut out = Vec::with_capacity(128 + chain_len);
        out.push(b'[');
        out.extend_from_slice(&crate::pyjson::to_vec(&self.args).map_err(|e| ProtocolError::Encode(e.to_string()))?);
        out.extend_from_slice(b", ");
        out.extend_from_slice(&crate::pyjson::to_vec(&self.kwargs).map_err(|e| ProtocolError::Encode(e.to_string()))?);
        out.extend_from_slice(b", ");
        self.embed.write_json(&mut out)?;
        out.push(b']');
        Ok(out)
    }

    /// Decode a body (already decompressed) of the given content type and encoding: a protocol
    /// v2 list `[args, kwargs, embed]`, or a protocol v1 object (see [`TaskBody::from_v1`]).
    ///
    /// A v2 body is read in one strict pass that leaves the rest of a chain as its text; a body
    /// that pass refuses (a v1 object, `NaN`, a malformed part) is read as values, which names
    /// what is wrong.
    pub fn decode(body: &[u8], content_type: &str, content_encoding: &str) -> Result<Self, ProtocolError> {
        check_content(content_type, content_encoding)?;
        if let Ok((args, kwargs, embed)) = serde_json::from_slice::<(Value, Value, Option<WireEmbed>)>(body) {
            let embed = embed.map_or_else(Embed::default, |e| Embed {
                callbacks: e.callbacks.filter(|v| !v.is_null()),
                errbacks: e.errbacks.filter(|v| !v.is_null()),
                chain: e.chain.filter(|c| c.get() != "null").map(RawJson::from_raw),
                chord: e.chord.filter(|v| !v.is_null()),
            });
            return Self::from_parts(Some(args), Some(kwargs), embed);
        }
        let value =
            crate::pyjson::from_slice(body).map_err(|e| ProtocolError::MalformedBody(format!("not JSON: {e}")))?;
        match value {
            Value::Array(parts) => Self::from_v2(parts),
            Value::Object(fields) => Self::from_v1(fields),
            other => Err(ProtocolError::MalformedBody(format!(
                "expected [args, kwargs, embed] (protocol v2) or an object (protocol v1), got {}",
                json_kind(&other)
            ))),
        }
    }

    fn from_v2(mut parts: Vec<Value>) -> Result<Self, ProtocolError> {
        if !(2..=3).contains(&parts.len()) {
            return Err(ProtocolError::MalformedBody(format!(
                "expected [args, kwargs, embed], got a list of {}",
                parts.len()
            )));
        }
        let embed = if parts.len() == 3 { parts.pop() } else { None };
        let embed = match embed {
            None | Some(Value::Null) => Embed::default(),
            Some(Value::Object(m)) => Embed::from_map(m),
            Some(other) => return Err(ProtocolError::MalformedBody(format!("embed must be an object, got {other}"))),
        };
        let kwargs = parts.pop();
        Self::from_parts(parts.pop(), kwargs, embed)
    }

    fn from_parts(args: Option<Value>, kwargs: Option<Value>, embed: Embed) -> Result<Self, ProtocolError> {
        let kwargs = match kwargs {
            Some(Value::Object(m)) => m,
            Some(Value::Null) => Map::new(),
            other => {
                return Err(ProtocolError::MalformedBody(format!(
                    "kwargs must be an object, got {}",
                    other.unwrap_or(Value::Null)
                )))
            }
        };
        let args = body_args(args)?;
        Ok(TaskBody { args, kwargs, embed })
    }

    /// The body of a protocol v1 message (everything in one object: `task`, `id`, `args`,
    /// `kwargs`, `callbacks`, `errbacks`, `chord`, ...), as Celery's worker converts it
    /// (`celery/worker/strategy.py` `proto1_to_proto2`, `hybrid_to_proto2`): a missing `args` is
    /// `[]`, a missing `kwargs` is `{}`, a `kwargs` that is not a mapping is refused; the links
    /// become the embed (v1 has no `chain`).
    pub fn from_v1(mut fields: Map<String, Value>) -> Result<Self, ProtocolError> {
        let kwargs = match fields.remove("kwargs") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(ProtocolError::MalformedBody(format!(
                    "Task keyword arguments must be a mapping, got {other}"
                )))
            }
        };
        let args = body_args(fields.remove("args"))?;
        let link = |fields: &mut Map<String, Value>, name: &str| fields.remove(name).filter(|v| !v.is_null());
        let embed = Embed {
            callbacks: link(&mut fields, "callbacks"),
            errbacks: link(&mut fields, "errbacks"),
            chain: None,
            chord: link(&mut fields, "chord"),
        };
        Ok(TaskBody { args, kwargs, embed })
    }
}

fn body_args(args: Option<Value>) -> Result<Vec<Value>, ProtocolError> {
    match args {
        Some(Value::Array(a)) => Ok(a),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(other) => Err(ProtocolError::MalformedBody(format!("args must be a list, got {other}"))),
    }
}

/// "a list", "a string", ... for messages about a JSON value of the wrong shape.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Check the content type and encoding celeriac reads: JSON, as text.
fn check_content(content_type: &str, content_encoding: &str) -> Result<(), ProtocolError> {
    match content_encoding.to_ascii_lowercase().as_str() {
        "utf-8" | "utf8" | "binary" | "" => {}
        other => return Err(ProtocolError::UnsupportedContentEncoding(other.to_string())),
    }
    if content_type != CONTENT_TYPE_JSON {
        return Err(ProtocolError::UnsupportedContentType(content_type.to_string()));
    }
    Ok(())
}

/// Check the content type and encoding, then parse the JSON body.
fn decode_json(body: &[u8], content_type: &str, content_encoding: &str) -> Result<Value, ProtocolError> {
    check_content(content_type, content_encoding)?;
    crate::pyjson::from_slice(body).map_err(|e| ProtocolError::MalformedBody(format!("not JSON: {e}")))
}

/// The headers of a protocol v1 message, read from its body as Celery's worker does
/// (`celery/worker/strategy.py` `proto1_to_proto2`): the task's fields become the v2 headers,
/// `taskset` is the group, `argsrepr`/`kwargsrepr` are computed; the message's own headers are
/// not consulted.
fn v1_headers(fields: &Map<String, Value>) -> Result<TaskHeaders, ProtocolError> {
    // The task's own fields, without the arguments and links (read by `TaskBody::from_v1`).
    let mut map: Map<String, Value> = fields
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "args" | "kwargs" | "callbacks" | "errbacks" | "chord"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(taskset) = fields.get("taskset").filter(|v| !v.is_null()) {
        map.insert("group".into(), taskset.clone());
    }
    if !map.contains_key("task") {
        return Err(ProtocolError::NotATask("a protocol v1 body without \"task\"".into()));
    }
    let mut headers = TaskHeaders::from_map(&map)?;
    // `saferepr(body.get('args', ()))`: the list sent, or the empty tuple.
    headers.argsrepr = match fields.get("args") {
        Some(Value::Array(args)) => Some(crate::pyrepr::args_repr(args, false)),
        None => Some(crate::pyrepr::args_repr(&[], true)),
        Some(_) => None,
    };
    headers.kwargsrepr = match fields.get("kwargs") {
        Some(Value::Object(kwargs)) => Some(crate::pyrepr::kwargs_repr(kwargs)),
        None => Some(crate::pyrepr::kwargs_repr(&Map::new())),
        Some(_) => None,
    };
    Ok(headers)
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

    /// Task protocol 1: the message has no `task` header, so everything is in the body. Celery 5
    /// still accepts it (`task_protocol=1`, old clients, hand-written producers).
    pub fn is_protocol_v1(&self) -> bool {
        !self.headers.contains_key("task")
    }

    /// The codec named by the `compression` header (kombu's), if the body is compressed. An
    /// empty header means none, as in kombu; an unknown name is an error.
    pub fn compression(&self) -> Result<Option<Codec>, ProtocolError> {
        match self.headers.get("compression") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(name)) if name.is_empty() => Ok(None),
            Some(Value::String(name)) => Ok(Some(Codec::from_name(name)?)),
            Some(other) => Err(CompressionError::Unsupported(other.to_string()).into()),
        }
    }

    /// The body as serialized: decompressed when the `compression` header says so (bounded by
    /// [`crate::compression::MAX_DECOMPRESSED_BODY`]).
    pub fn plain_body(&self) -> Result<Cow<'_, [u8]>, ProtocolError> {
        Ok(match self.compression()? {
            None => Cow::Borrowed(&self.body),
            Some(codec) => Cow::Owned(codec.decompress(&self.body)?),
        })
    }

    /// Compress the body with `codec` and set the `compression` header, as kombu's producer does.
    pub fn compress(&mut self, codec: Codec) -> Result<(), ProtocolError> {
        self.body = codec.compress(&self.body)?;
        self.headers.insert("compression".into(), Value::from(codec.content_type()));
        Ok(())
    }

    /// Replace the body with `plain` (serialized), compressed with the codec the message already
    /// uses, so the body and the `compression` header stay consistent.
    pub fn set_body(&mut self, plain: Vec<u8>) -> Result<(), ProtocolError> {
        self.body = match self.compression()? {
            None => plain,
            Some(codec) => codec.compress(&plain)?,
        };
        Ok(())
    }

    /// The typed headers: the v2 headers, or for a protocol v1 message the fields of its body
    /// (see [`Message::is_protocol_v1`]).
    pub fn task_headers(&self) -> Result<TaskHeaders, ProtocolError> {
        if !self.is_protocol_v1() {
            return TaskHeaders::from_map(&self.headers);
        }
        let plain = self.plain_body()?;
        let value = decode_json(&plain, &self.properties.content_type, &self.properties.content_encoding)
            .map_err(|e| ProtocolError::NotATask(e.to_string()))?;
        match value {
            Value::Object(fields) => v1_headers(&fields),
            other => Err(ProtocolError::NotATask(format!("a body that is {}", json_kind(&other)))),
        }
    }

    /// The decoded body (decompressed first if need be), in the v2 view whatever the protocol.
    pub fn task_body(&self) -> Result<TaskBody, ProtocolError> {
        TaskBody::decode(&self.plain_body()?, &self.properties.content_type, &self.properties.content_encoding)
    }

    /// This message as protocol v2, with `headers` (typically [`Message::task_headers`], changed)
    /// and `body` as its headers and body; properties, user headers and compression are kept.
    /// What a retry of a protocol v1 task publishes: Celery's worker also retries in the
    /// protocol its app is configured with (v2 by default), and accepts either.
    pub fn to_v2(&self, headers: &TaskHeaders, body: &TaskBody) -> Result<Message, ProtocolError> {
        let mut message = Message { headers: headers.to_map(), properties: self.properties.clone(), body: Vec::new() };
        // Other headers (a user's, `compression`) follow the task headers, as Celery appends them.
        for (k, v) in &self.headers {
            message.headers.entry(k.clone()).or_insert_with(|| v.clone());
        }
        message.properties.content_type = CONTENT_TYPE_JSON.into();
        message.properties.content_encoding = "utf-8".into();
        message.properties.correlation_id.get_or_insert_with(|| headers.id.clone());
        message.set_body(body.to_json()?)?;
        Ok(message)
    }

    /// This message in one allocation, for a worker to keep while it waits for a slot:
    /// `[u32 LE n][n bytes: the headers as JSON][u32 LE m][m bytes: the properties as JSON][body]`.
    /// About a quarter of the memory of the message itself (a header map allocates per entry,
    /// key and value). [`Message::unpack`] gives back an equal message: the headers' order, every
    /// number's text (`NaN` and `Infinity` included) and the body's bytes are kept.
    ///
    /// Errors only if a header cannot be written as JSON, which a map of JSON values always can
    /// ([`ProtocolError::MalformedEnvelope`]).
    pub fn pack(&self) -> Result<Vec<u8>, ProtocolError> {
        fn section(
            out: &mut Vec<u8>,
            write: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
        ) -> Result<(), ProtocolError> {
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            write(out).map_err(|e| ProtocolError::MalformedEnvelope(format!("cannot pack: {e}")))?;
            let len = u32::try_from(out.len() - at - 4)
                .map_err(|_| ProtocolError::MalformedEnvelope("cannot pack: headers over 4 GiB".into()))?;
            out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            Ok(())
        }
        let mut out = Vec::with_capacity(self.body.len() + 64 * self.headers.len() + 160);
        section(&mut out, |o| serde_json::to_writer(o, &self.headers))?;
        section(&mut out, |o| serde_json::to_writer(o, &self.properties))?;
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// The message [`Message::pack`] wrote. Errors ([`ProtocolError::MalformedEnvelope`]) only
    /// for bytes that did not come from `pack`.
    pub fn unpack(bytes: &[u8]) -> Result<Message, ProtocolError> {
        fn section(bytes: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
            let bad = || ProtocolError::MalformedEnvelope("packed message cut short".into());
            let len = bytes.get(..4).ok_or_else(bad)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let rest = &bytes[4..];
            Ok((rest.get(..len).ok_or_else(bad)?, &rest[len..]))
        }
        let bad = |what: &str, e: serde_json::Error| ProtocolError::MalformedEnvelope(format!("packed {what}: {e}"));
        let (headers, rest) = section(bytes)?;
        let (properties, body) = section(rest)?;
        let headers = match crate::pyjson::from_slice(headers).map_err(|e| bad("headers", e))? {
            Value::Object(map) => map,
            _ => return Err(ProtocolError::MalformedEnvelope("packed headers are not an object".into())),
        };
        let properties = serde_json::from_slice(properties).map_err(|e| bad("properties", e))?;
        Ok(Message { headers, properties, body: body.to_vec() })
    }
}

/// Serialize a JSON value exactly as Python's `json.dumps(value)` does (see [`crate::pyjson`]).
pub fn to_python_json(value: &Value) -> Result<Vec<u8>, ProtocolError> {
    crate::pyjson::to_vec(value).map_err(|e| ProtocolError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_packed_message_unpacks_equal() {
        // A user header first, numbers whose text a re-encoding would change, non-finite floats
        // (Python writes them), non-ASCII text, nesting; a body that is not UTF-8.
        let headers = crate::pyjson::from_str(
            r#"{"zz-user": {"b": [1, 2.50, 1E400, NaN, -Infinity]}, "lang": "py", "task": "t\u00e9",
               "id": "9", "big": 123456789012345678901234567890, "timelimit": [null, 3.0], "empty": {}}"#,
        )
        .unwrap();
        let message = Message {
            headers: headers.as_object().unwrap().clone(),
            properties: Properties {
                correlation_id: Some("9".into()),
                content_type: "application/x-python-serialize".into(),
                content_encoding: "binary".into(),
                delivery_mode: 1,
                priority: Some(7),
                reply_to: Some("reply.q".into()),
                expiration: Some("60000".into()),
            },
            body: vec![0x80, 0x04, 0xff, 0x00, b'"'],
        };
        let packed = message.pack().unwrap();
        let back = Message::unpack(&packed).unwrap();
        assert_eq!(back, message);
        let keys: Vec<&String> = back.headers.keys().collect();
        assert_eq!(keys, ["zz-user", "lang", "task", "id", "big", "timelimit", "empty"]);
        // Each number's text as it was read (serde_json spells an exponent its own way on reading).
        let text = |m: &Message| serde_json::to_string(&m.headers["zz-user"]["b"]).unwrap();
        assert_eq!(text(&back), text(&message));
        assert_eq!(text(&back), "[1,2.50,1e+400,NaN,-Infinity]");
        // An empty message too.
        let empty = Message { headers: Map::new(), properties: Properties::default(), body: Vec::new() };
        assert_eq!(Message::unpack(&empty.pack().unwrap()).unwrap(), empty);
    }

    #[test]
    fn bytes_that_were_not_packed_are_an_error() {
        for bytes in [&b""[..], &[5, 0, 0, 0, b'{'][..], &[2, 0, 0, 0, b'[', b']', 0, 0, 0, 0][..]] {
            let err = Message::unpack(bytes).unwrap_err();
            assert!(matches!(err, ProtocolError::MalformedEnvelope(_)), "{bytes:?}: {err}");
        }
    }

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
    fn bodies_from_python_keep_every_number() {
        // The issue's values as Python's json.dumps writes them, in args, kwargs and a linked
        // signature.
        let text = concat!(
            r#"[[18446744073709551617, 9223372036854775808, -9223372036854775809, 123456789.12345679, "#,
            r#"5e-324, 1.7976931348623157e+308, 1e+16, 1e+22, -0.0, NaN, Infinity, -Infinity], "#,
            r#"{"big": -18446744073709551616, "nested": [{"x": 1000000000000000000000000000000}, 0.1]}, "#,
            r#"{"callbacks": [{"task": "t", "args": [NaN, 18446744073709551617]}], "errbacks": null, "chain": null, "chord": null}]"#
        );
        let body = TaskBody::decode(text.as_bytes(), CONTENT_TYPE_JSON, "utf-8").unwrap();
        assert_eq!(body.args.len(), 12);
        assert_eq!(String::from_utf8(body.to_json().unwrap()).unwrap(), text);
        // A stamp holding NaN survives the headers' typed view.
        let mut headers = TaskHeaders::new("t", "id");
        headers.stamps.insert("s".into(), Value::Number(crate::pyjson::nan()));
        let map = headers.to_map();
        assert_eq!(crate::pyjson::to_string(&map["stamps"]).unwrap(), r#"{"s": NaN}"#);
        assert_eq!(TaskHeaders::from_map(&map).unwrap(), headers);
    }

    #[test]
    fn the_rest_of_a_chain_passes_through_as_its_text() {
        // Strict JSON (read in one pass, the chain left as text) and a step holding NaN (read as
        // values, written back as Python writes it): the bytes come back unchanged either way.
        for text in [
            concat!(
                r#"[[1], {}, {"callbacks": null, "errbacks": null, "chain": [{"task": "b", "args": [1E5, 1.50], "#,
                r#""kwargs": {}, "options": {"task_id": "B"}, "subtask_type": null, "immutable": false}], "chord": null}]"#
            ),
            concat!(
                r#"[[1], {}, {"callbacks": null, "errbacks": null, "chain": [{"task": "b", "args": [NaN], "#,
                r#""kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}], "chord": null}]"#
            ),
        ] {
            let body = TaskBody::decode(text.as_bytes(), CONTENT_TYPE_JSON, "utf-8").unwrap();
            let chain = body.embed.chain.as_ref().expect("a chain");
            assert_eq!(chain.to_value().unwrap()[0]["task"], "b");
            assert_eq!(String::from_utf8(body.to_json().unwrap()).unwrap(), text);
        }
        // A null chain is no chain; one that is not a list is kept for the reader to refuse.
        let b = TaskBody::decode(br#"[[], {}, {"chain": null}]"#, CONTENT_TYPE_JSON, "utf-8").unwrap();
        assert_eq!(b.embed, Embed::default());
        let b = TaskBody::decode(br#"[[], {}, {"chain": {"task": "x"}}]"#, CONTENT_TYPE_JSON, "utf-8").unwrap();
        assert_eq!(b.embed.chain.unwrap().to_value().unwrap(), json!({"task": "x"}));
        // Written as the whole body as values is written.
        let body = TaskBody {
            args: vec![json!("é"), json!(0.5)],
            kwargs: json!({"k": [1, {"a": null}]}).as_object().unwrap().clone(),
            embed: Embed {
                callbacks: Some(json!([{"task": "cb"}])),
                errbacks: None,
                chain: Some(RawJson::from_value(&json!([{"task": "n", "args": [2.0]}]))),
                chord: Some(json!({"task": "body"})),
            },
        };
        let as_values = Value::Array(vec![
            Value::Array(body.args.clone()),
            Value::Object(body.kwargs.clone()),
            body.embed.to_value(),
        ]);
        assert_eq!(body.to_json().unwrap(), to_python_json(&as_values).unwrap());
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(matches!(TaskBody::decode(b"{", CONTENT_TYPE_JSON, "utf-8"), Err(ProtocolError::MalformedBody(_))));
        assert!(matches!(TaskBody::decode(b"5", CONTENT_TYPE_JSON, "utf-8"), Err(ProtocolError::MalformedBody(_))));
        assert!(matches!(
            TaskBody::decode(b"[1, {}]", CONTENT_TYPE_JSON, "utf-8"),
            Err(ProtocolError::MalformedBody(_))
        ));
        assert!(matches!(
            TaskBody::decode(b"[]", "application/x-python-serialize", "binary"),
            Err(ProtocolError::UnsupportedContentType(_))
        ));
    }

    fn v1(body: Value) -> Message {
        Message {
            headers: Map::new(),
            properties: Properties { correlation_id: body["id"].as_str().map(str::to_string), ..Properties::default() },
            body: to_python_json(&body).unwrap(),
        }
    }

    #[test]
    fn a_protocol_v1_message_reads_as_v2() {
        // The issue's hand-written message: no kwargs at all.
        let m = v1(json!({"task": "celeriac.add", "id": "T", "args": [2, 3]}));
        assert!(m.is_protocol_v1());
        let h = m.task_headers().unwrap();
        assert_eq!((h.task.as_str(), h.id.as_str(), h.retries), ("celeriac.add", "T", 0));
        assert_eq!((h.argsrepr.as_deref(), h.kwargsrepr.as_deref()), (Some("[2, 3]"), Some("{}")));
        let b = m.task_body().unwrap();
        assert_eq!((b.args, b.kwargs, b.embed), (vec![json!(2), json!(3)], Map::new(), Embed::default()));

        // Everything Celery's as_task_v1 writes.
        let m = v1(json!({
            "task": "tasks.add", "id": "U", "args": [1], "kwargs": {"z": 4}, "group": "G",
            "group_index": 1, "retries": 2, "eta": "2030-01-02T03:04:05+02:00", "expires": "2030-01-03",
            "utc": true, "callbacks": [{"task": "cb"}], "errbacks": [{"task": "eb"}],
            "timelimit": [10, 5], "taskset": "G", "chord": {"task": "body"}
        }));
        let h = m.task_headers().unwrap();
        assert_eq!(h.group.as_deref(), Some("G"));
        assert_eq!(h.group_index, Some(1));
        assert_eq!(h.retries, 2);
        assert_eq!(h.eta_time(), parse_datetime("2030-01-02T01:04:05Z").ok());
        assert_eq!(h.expires_time(), parse_datetime("2030-01-03T00:00:00Z").ok());
        assert_eq!((h.hard_time_limit(), h.soft_time_limit()), (Some(10.0), Some(5.0)));
        let b = m.task_body().unwrap();
        assert_eq!(b.kwargs["z"], 4);
        assert_eq!(b.embed.callbacks, Some(json!([{"task": "cb"}])));
        assert_eq!(b.embed.errbacks, Some(json!([{"task": "eb"}])));
        assert_eq!(b.embed.chord, Some(json!({"task": "body"})));
        assert_eq!(b.embed.chain, None);
    }

    #[test]
    fn a_protocol_v1_body_with_bad_kwargs_is_refused_with_celerys_reason() {
        for kwargs in [json!([1]), json!("x"), json!(null), json!(3)] {
            let m = v1(json!({"task": "celeriac.add", "id": "T", "args": [], "kwargs": kwargs}));
            assert!(m.task_headers().is_ok(), "the headers are fine: the failure is stored for T");
            let err = m.task_body().unwrap_err().to_string();
            assert!(err.contains("Task keyword arguments must be a mapping"), "{err}");
        }
        let m = v1(json!({"task": "celeriac.add", "id": "T", "args": {"a": 1}}));
        assert!(m.task_body().unwrap_err().to_string().contains("args must be a list"));
    }

    #[test]
    fn a_message_neither_v1_nor_v2_is_named() {
        let mut m = Message::new_task(&TaskHeaders::new("t", "x"), &TaskBody::default(), None, None).unwrap();
        m.headers.remove("task");
        let err = m.task_headers().unwrap_err();
        assert!(matches!(err, ProtocolError::NotATask(_)), "{err}");
        assert!(err.to_string().starts_with("message has no \"task\" header"), "{err}");
        let no_task = v1(json!({"id": "T", "args": []}));
        assert!(matches!(no_task.task_headers(), Err(ProtocolError::NotATask(_))));
        let not_json = Message { body: b"{".to_vec(), ..no_task };
        assert!(matches!(not_json.task_headers(), Err(ProtocolError::NotATask(_))));
    }

    #[test]
    fn a_compressed_body_is_read_and_an_unknown_codec_refused() {
        let body = TaskBody { args: vec![json!("x".repeat(20_000))], ..TaskBody::default() };
        for codec in Codec::ALL {
            let mut m = Message::new_task(&TaskHeaders::new("celeriac.echo", "c"), &body, None, None).unwrap();
            m.compress(codec).unwrap();
            assert!(m.body.len() < 1000);
            assert_eq!(m.headers["compression"], codec.content_type());
            assert_eq!(m.task_body().unwrap(), body, "{codec}");
            // A v1 message compressed: its headers come out of the compressed body.
            let mut old = v1(json!({"task": "celeriac.echo", "id": "v", "args": ["y"]}));
            old.compress(codec).unwrap();
            assert_eq!(old.task_headers().unwrap().id, "v", "{codec}");
        }
        let mut m = Message::new_task(&TaskHeaders::new("celeriac.echo", "c"), &body, None, None).unwrap();
        m.headers.insert("compression".into(), json!("application/x-snappy"));
        assert!(m.task_headers().is_ok());
        let err = m.task_body().unwrap_err();
        assert!(err.to_string().starts_with("unsupported compression: application/x-snappy"), "{err}");
        m.headers.insert("compression".into(), json!(""));
        assert_eq!(m.task_body().unwrap(), body, "an empty header is no compression, as in kombu");
    }

    #[test]
    fn to_v2_keeps_the_codec_and_user_headers() {
        let mut m = v1(json!({"task": "celeriac.add", "id": "T", "args": [2, 3]}));
        m.headers.insert("x-tenant".into(), json!("acme"));
        m.compress(Codec::Bzip2).unwrap();
        let mut h = m.task_headers().unwrap();
        h.retries = 1;
        let v2 = m.to_v2(&h, &m.task_body().unwrap()).unwrap();
        assert!(!v2.is_protocol_v1());
        assert_eq!(v2.headers["compression"], "application/x-bz2");
        assert_eq!(v2.headers["x-tenant"], "acme");
        assert_eq!(v2.task_headers().unwrap(), h);
        assert_eq!(v2.task_body().unwrap().args, vec![json!(2), json!(3)]);
        assert_eq!(v2.properties.correlation_id.as_deref(), Some("T"));
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
        let err = parse_datetime("tomorrow").unwrap_err();
        assert!(err.starts_with("\"tomorrow\" is not an ISO 8601 time: "), "{err}");
    }

    /// Every text in `tests/fixtures/celery/times.json` reads as the instant Celery's worker
    /// reads in it (`maybe_iso8601` + `maybe_make_aware`), or is refused as Celery refuses it.
    #[test]
    fn datetimes_parse_as_celerys_parser_reads_them() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/celery/times.json");
        let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert!(cases.len() > 50, "{} cases", cases.len());
        let (mut accepted, mut refused) = (0, 0);
        for case in &cases {
            let text = case["text"].as_str().unwrap();
            let ours = parse_datetime(text);
            match (case.get("utc"), case.get("error")) {
                (Some(Value::String(want)), None) => {
                    let want = DateTime::parse_from_rfc3339(want).unwrap().with_timezone(&Utc);
                    assert_eq!(ours, Ok(want), "{text:?}");
                    accepted += 1;
                }
                (Some(Value::Null), None) => {
                    // Celery reads an empty text as no time at all.
                    assert_eq!(text, "");
                    let mut m = TaskHeaders::new("t", "x").to_map();
                    m.insert("eta".into(), json!(text));
                    m.insert("expires".into(), json!(text));
                    let h = TaskHeaders::from_map(&m).unwrap();
                    assert_eq!((h.eta_time(), h.expires_time()), (None, None));
                }
                (None, Some(why)) => {
                    let err = ours.expect_err(&format!("{text:?} is refused by Celery ({why})"));
                    assert!(err.starts_with(&format!("{text:?} is not an ISO 8601 time")), "{err}");
                    refused += 1;
                }
                other => panic!("bad fixture entry {case}: {other:?}"),
            }
        }
        assert!(accepted >= 30 && refused >= 20, "{accepted} accepted, {refused} refused");
    }

    #[test]
    fn datetimes_in_neighbouring_forms() {
        let utc = |s: &str| parse_datetime(s).map(format_datetime);
        // The issue's input, and a naive time meaning UTC.
        assert_eq!(utc("2015-12-05").as_deref(), Ok("2015-12-05T00:00:00+00:00"));
        assert_eq!(utc("2015-12-05T10:20:30.000001").as_deref(), Ok("2015-12-05T10:20:30.000001+00:00"));
        assert_eq!(utc("2024-02-29T12:00:00-12:00").as_deref(), Ok("2024-03-01T00:00:00+00:00"));
        assert_eq!(utc("2015W011").as_deref(), Ok("2014-12-29T00:00:00+00:00"));
        assert_eq!(utc("2015-001T00:00:00+14:00").as_deref(), Ok("2014-12-31T10:00:00+00:00"));
        for bad in ["2015-02-29", "2015-12-05T10:20:30+0530junk", "+2015-12-05", "2015-12-05T10:20:30.-5", "2015-1-05"]
        {
            assert!(parse_datetime(bad).is_err(), "{bad:?}");
        }
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
