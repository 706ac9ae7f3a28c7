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
}

/// Child to supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromChild {
    /// Started and ready for work.
    Ready {
        /// The child's pid.
        pid: u32,
    },
    /// Finished a task.
    Done {
        /// Task id.
        id: String,
        /// How it ended.
        outcome: ChildOutcome,
        /// Resident set after the task, KiB.
        rss_kib: u64,
    },
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
        /// Asked for a retry (with this countdown in seconds, if any).
        retry: Option<Option<f64>>,
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
                retry: e.retry.as_ref().map(|r| r.countdown.map(|d| d.as_secs_f64())),
                exc_type: e.exc_type,
                message: e.message,
                module: e.module,
                traceback: e.traceback,
            },
        }
    }

    /// Back to a task's result (a panic becomes an error of type `Panic`).
    pub fn into_result(self) -> Result<Value, TaskError> {
        match self {
            ChildOutcome::Value { value } => Ok(value),
            ChildOutcome::Error { exc_type, message, module, traceback, retry } => Err(TaskError {
                exc_type,
                message,
                module,
                traceback,
                retry: retry.map(|c| RetryRequest { countdown: c.map(std::time::Duration::from_secs_f64) }),
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

/// Read one frame (async; used by the supervisor). `None` at end of stream: the child is gone.
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
    r.read_exact(&mut body).await?;
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
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &ToChild::Run(Box::new(req))).unwrap();
        let value = Value::Array(args.clone());
        write_frame(&mut buf, &FromChild::Done { id: "i".into(), outcome: ChildOutcome::Value { value }, rss_kib: 9 })
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
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &FromChild::Ready { pid: 7 }).unwrap();
        let out = ChildOutcome::from_result(Err(TaskError::retry(Some(std::time::Duration::from_millis(1500)))));
        write_frame(&mut buf, &FromChild::Done { id: "x".into(), outcome: out, rss_kib: 3 }).unwrap();
        let mut r = &buf[..];
        assert!(matches!(read_frame::<FromChild>(&mut r).unwrap(), Some(FromChild::Ready { pid: 7 })));
        match read_frame::<FromChild>(&mut r).unwrap() {
            Some(FromChild::Done { outcome, .. }) => {
                let e = outcome.into_result().unwrap_err();
                assert_eq!(e.retry.unwrap().countdown, Some(std::time::Duration::from_millis(1500)));
            }
            other => panic!("{other:?}"),
        }
        assert!(read_frame::<FromChild>(&mut r).unwrap().is_none());
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(read_frame::<FromChild>(&mut &huge[..]).is_err());
    }
}
