//! The frames a supervisor and its children exchange over pipes.
//!
//! Each frame is a 4-byte big-endian length followed by that many bytes of JSON. The supervisor
//! writes to the child's stdin; the child answers on its original stdout, which it keeps for
//! the protocol alone (it points its own fd 1 at stderr, so a task that prints cannot corrupt
//! the stream).
//!
//! A task's arguments and value cross as Python's JSON text inside a string field
//! ([`python_json`]), written and read by [`celeriac_core::pyjson`], so every number (integers of
//! any size, `NaN`, `Infinity`) reaches the other side as it left. Enums are externally tagged
//! (`{"ready": {...}}`): serde's internally tagged enums buffer their fields, which loses
//! numbers kept as text.

use std::io::{Read, Write};

use celeriac_core::task::RetryRequest;
use celeriac_core::TaskError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest frame accepted (64 MiB): a bigger length is a broken stream, not a message.
pub const MAX_FRAME: usize = 64 << 20;

/// Supervisor to child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToChild {
    /// Run one task.
    Run(Box<RunRequest>),
    /// Finish and exit.
    Exit,
    /// The answer to a [`FromChild::Publish`]: `None` when published (confirmed), else why not.
    Published {
        /// Why the message could not be published.
        error: Option<String>,
    },
}

/// One task for a child to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// Positional arguments.
    #[serde(with = "python_json")]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(with = "python_json")]
    pub kwargs: Map<String, Value>,
    /// Retries so far.
    pub retries: u32,
    /// The queue it came from.
    pub queue: String,
    /// Root of its workflow.
    pub root_id: Option<String>,
    /// Parent task.
    pub parent_id: Option<String>,
    /// Its group.
    pub group: Option<String>,
    /// Deliveries so far.
    pub delivery_count: u32,
    /// The worker's node name.
    pub hostname: String,
    /// Soft time limit, seconds: the child tells the task when it passes.
    pub soft_time_limit: Option<f64>,
    /// Celery's request for the task (`task.request` in Python: the message's headers,
    /// `delivery_info`, `reply_to`, `correlation_id` and the embed's `callbacks`, `errbacks`,
    /// `chain`, `chord`), for children that run Celery tasks; a Rust child does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
}

/// A task a child can run, as it announces it when ready, with the options the supervisor acts
/// on (Celery's task attributes: `ignore_result`, `acks_late`, `reject_on_worker_lost`,
/// `time_limit`, `soft_time_limit`, `rate_limit`, `track_started`, `queue`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildTask {
    /// The task's name.
    pub name: String,
    /// Its options; unknown ones are kept and ignored.
    #[serde(default)]
    pub options: Map<String, Value>,
}

/// A message a task asks the supervisor to publish (a Python task's `apply_async`, `delay`,
/// `send_task` or `self.retry()`), as Celery's `send_task_message` would have: the body is its
/// JSON text, headers and properties are Celery's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The exchange (`""`: the default exchange).
    #[serde(default)]
    pub exchange: String,
    /// The routing key (the queue, on the default exchange).
    pub routing_key: String,
    /// The message headers (protocol v2 task headers).
    #[serde(with = "python_json")]
    pub headers: Map<String, Value>,
    /// The AMQP properties (`correlation_id`, `reply_to`, `priority`, `content_type`, ...).
    #[serde(with = "python_json")]
    pub properties: Map<String, Value>,
    /// The body, serialized (`content_type`/`content_encoding` in the properties).
    pub body: String,
}

/// Child to supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromChild {
    /// Started and ready for work.
    Ready {
        /// The child's pid.
        pid: u32,
        /// The tasks it runs beyond the supervisor's own registry (a Python child's app).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tasks: Vec<ChildTask>,
        /// The kernel id of the thread its tasks run on (`gettid`; Python's
        /// `threading.get_native_id()`), whose `/proc/<pid>/task/<tid>/` says what a task is
        /// blocked on; absent: the main thread (`tid` = `pid`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<u32>,
    },
    /// The task running now moved to another thread (a Rust child's blocking task runs on the
    /// runtime's blocking pool): `tid` is that thread's kernel id, until the task is done.
    Thread {
        /// The task's id.
        id: String,
        /// The thread's kernel id.
        tid: u32,
    },
    /// Publish a message for the task running now, then answer [`ToChild::Published`].
    Publish(Box<PublishRequest>),
    /// The child could not start (an application that does not import): why, shown to the
    /// operator; the child exits after it.
    Failed {
        /// The reason, with a traceback where there is one.
        reason: String,
    },
    /// Finished a task.
    Done {
        /// Task id.
        id: String,
        /// How it ended.
        outcome: ChildOutcome,
        /// Resident set after the task, KiB.
        rss_kib: u64,
        /// The task emptied its request's chain (Celery's `self.request.chain = None`): the
        /// rest of its chain is not sent.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chain_stopped: bool,
    },
}

/// A retry asked for by a task in a child.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryWire {
    /// Seconds before the retry (`None`: the task's backoff schedule).
    #[serde(default)]
    pub countdown: Option<f64>,
    /// The child already published the retry's message ([`FromChild::Publish`]).
    #[serde(default)]
    pub sent: bool,
}

/// How a task ended inside a child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildOutcome {
    /// Returned a value.
    Value {
        /// The value.
        #[serde(with = "python_json")]
        value: Value,
    },
    /// Returned an error.
    Error {
        /// Type name.
        exc_type: String,
        /// Message.
        message: String,
        /// Module.
        module: String,
        /// Traceback or error chain.
        traceback: Option<String>,
        /// Asked for a retry.
        #[serde(default)]
        retry: Option<RetryWire>,
        /// Python's `exc.args` as their Python JSON text, when the child has them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        args: Option<String>,
    },
    /// Panicked.
    Panic {
        /// The panic message.
        message: String,
        /// Where: `panicked at file:line:col`, when the child's panic hook saw it.
        #[serde(default)]
        location: Option<String>,
    },
}

impl ChildOutcome {
    /// From a task's result.
    pub fn from_result(r: Result<Value, TaskError>) -> Self {
        match r {
            Ok(value) => ChildOutcome::Value { value },
            Err(e) => ChildOutcome::Error {
                retry: e
                    .retry
                    .as_ref()
                    .map(|r| RetryWire { countdown: r.countdown.map(|d| d.as_secs_f64()), sent: r.sent }),
                exc_type: e.exc_type,
                message: e.message,
                module: e.module,
                traceback: e.traceback,
                args: e.args.and_then(|a| celeriac_core::pyjson::to_string(&*a).ok()),
            },
        }
    }

    /// Back to a task's result (a panic becomes an error of type `Panic`).
    pub fn into_result(self) -> Result<Value, TaskError> {
        match self {
            ChildOutcome::Value { value } => Ok(value),
            ChildOutcome::Error { exc_type, message, module, traceback, retry, args } => Err(TaskError {
                exc_type,
                message,
                module,
                traceback,
                retry: retry.map(|r| RetryRequest {
                    countdown: r
                        .countdown
                        .filter(|c| c.is_finite() && *c >= 0.0)
                        .map(std::time::Duration::from_secs_f64),
                    sent: r.sent,
                }),
                args: args.and_then(|a| celeriac_core::pyjson::from_str(&a).ok()).map(Box::new),
            }),
            ChildOutcome::Panic { message, location } => {
                let mut e = TaskError::new("Panic", message).with_module("celeriac");
                e.traceback = location;
                Err(e)
            }
        }
    }
}

/// A JSON value carried as its Python JSON text in a string, so no number changes on the way.
pub mod python_json {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    /// The kinds of value carried: a value, a list or an object.
    pub trait FromValue: Sized {
        /// From a parsed value, or why not.
        fn from_value(v: Value) -> Result<Self, String>;
    }

    impl FromValue for Value {
        fn from_value(v: Value) -> Result<Self, String> {
            Ok(v)
        }
    }

    impl FromValue for Vec<Value> {
        fn from_value(v: Value) -> Result<Self, String> {
            match v {
                Value::Array(items) => Ok(items),
                other => Err(format!("expected a list, got {other}")),
            }
        }
    }

    impl FromValue for Map<String, Value> {
        fn from_value(v: Value) -> Result<Self, String> {
            match v {
                Value::Object(map) => Ok(map),
                other => Err(format!("expected an object, got {other}")),
            }
        }
    }

    /// Write the value as its Python JSON text.
    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = celeriac_core::pyjson::to_string(value).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    /// Read the value back from its text.
    pub fn deserialize<'de, T: FromValue, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        let value = celeriac_core::pyjson::from_str(&text).map_err(D::Error::custom)?;
        T::from_value(value).map_err(D::Error::custom)
    }
}

/// Write one frame (blocking; used by the child).
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Read one frame (blocking; used by the child). `None` at end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Write one frame (async; used by the supervisor).
pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// How long the rest of a frame may take once its length has arrived. A child writes a frame in
/// one go, so a body that does not follow is a broken stream (a task that wrote a few bytes on
/// the frame pipe), not a slow child: without this bound its slot would wait forever.
pub const FRAME_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Read one frame (async; used by the supervisor). `None` at end of stream: the child is gone.
/// A length over [`MAX_FRAME`], a body not complete within [`FRAME_BODY_DEADLINE`] of its
/// length, or a body that is not the JSON of a `T` is an `InvalidData` error.
pub async fn read_frame_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    match tokio::time::timeout(FRAME_BODY_DEADLINE, r.read_exact(&mut body)).await {
        Ok(read) => read?,
        Err(_) => {
            let why = format!("a frame of {len} bytes whose body did not follow within {FRAME_BODY_DEADLINE:?}");
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        }
    };
    serde_json::from_slice(&body).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cross_the_pipe_unchanged() {
        let text = "[18446744073709551617, -9223372036854775809, 123456789.12345679, 5e-324, 1e+16, -0.0, NaN, Infinity, -Infinity]";
        let args = match celeriac_core::pyjson::from_str(text).unwrap() {
            Value::Array(a) => a,
            _ => unreachable!(),
        };
        let kwargs = match celeriac_core::pyjson::from_str(r#"{"k": [NaN, 100000000000000000000000000000]}"#).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let req = RunRequest {
            id: "i".into(),
            name: "n".into(),
            args: args.clone(),
            kwargs: kwargs.clone(),
            retries: 1,
            queue: "q".into(),
            root_id: None,
            parent_id: None,
            group: None,
            delivery_count: 2,
            hostname: "h".into(),
            soft_time_limit: Some(1.5),
            request: None,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &ToChild::Run(Box::new(req))).unwrap();
        let value = Value::Array(args.clone());
        write_frame(
            &mut buf,
            &FromChild::Done {
                id: "i".into(),
                outcome: ChildOutcome::Value { value },
                rss_kib: 9,
                chain_stopped: false,
            },
        )
        .unwrap();
        let mut r = &buf[..];
        let Some(ToChild::Run(back)) = read_frame::<ToChild>(&mut r).unwrap() else { panic!("not a run frame") };
        assert_eq!(celeriac_core::pyjson::to_string(&back.args).unwrap(), text);
        assert_eq!(
            celeriac_core::pyjson::to_string(&back.kwargs).unwrap(),
            r#"{"k": [NaN, 100000000000000000000000000000]}"#
        );
        assert_eq!((back.retries, back.delivery_count, back.soft_time_limit), (1, 2, Some(1.5)));
        let Some(FromChild::Done { outcome, rss_kib: 9, .. }) = read_frame::<FromChild>(&mut r).unwrap() else {
            panic!("not a done frame")
        };
        assert_eq!(celeriac_core::pyjson::to_string(&outcome.into_result().unwrap()).unwrap(), text);
    }

    #[test]
    fn a_child_names_the_thread_its_task_runs_on() {
        // As the Python child writes it, and without `tid` (an older child): the main thread.
        let ready: FromChild = serde_json::from_str(r#"{"ready": {"pid": 9, "tasks": [], "tid": 9}}"#).unwrap();
        assert!(matches!(ready, FromChild::Ready { pid: 9, tid: Some(9), .. }), "{ready:?}");
        let old: FromChild = serde_json::from_str(r#"{"ready": {"pid": 9}}"#).unwrap();
        assert!(matches!(old, FromChild::Ready { tid: None, .. }), "{old:?}");
        let mut buf = Vec::new();
        write_frame(&mut buf, &FromChild::Thread { id: "t".into(), tid: 12 }).unwrap();
        assert_eq!(&buf[4..], br#"{"thread":{"id":"t","tid":12}}"#);
        let back = read_frame::<FromChild>(&mut &buf[..]).unwrap();
        assert!(matches!(back, Some(FromChild::Thread { ref id, tid: 12 }) if id == "t"), "{back:?}");
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &FromChild::Ready { pid: 7, tasks: Vec::new(), tid: None }).unwrap();
        let out = ChildOutcome::from_result(Err(TaskError::retry(Some(std::time::Duration::from_millis(1500)))));
        write_frame(&mut buf, &FromChild::Done { id: "x".into(), outcome: out, rss_kib: 3, chain_stopped: false })
            .unwrap();
        // A retry with no countdown stays a retry (the task's backoff decides).
        let out = ChildOutcome::from_result(Err(TaskError::retry(None)));
        write_frame(&mut buf, &FromChild::Done { id: "y".into(), outcome: out, rss_kib: 3, chain_stopped: false })
            .unwrap();
        let mut r = &buf[..];
        assert!(matches!(read_frame::<FromChild>(&mut r).unwrap(), Some(FromChild::Ready { pid: 7, .. })));
        match read_frame::<FromChild>(&mut r).unwrap() {
            Some(FromChild::Done { outcome, .. }) => {
                let e = outcome.into_result().unwrap_err();
                assert_eq!(e.retry.unwrap().countdown, Some(std::time::Duration::from_millis(1500)));
            }
            other => panic!("{other:?}"),
        }
        match read_frame::<FromChild>(&mut r).unwrap() {
            Some(FromChild::Done { outcome, .. }) => {
                let retry = outcome.into_result().unwrap_err().retry.expect("still a retry");
                assert_eq!((retry.countdown, retry.sent), (None, false));
            }
            other => panic!("{other:?}"),
        }
        assert!(read_frame::<FromChild>(&mut r).unwrap().is_none());
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(read_frame::<FromChild>(&mut &huge[..]).is_err());
    }
}
