//! Built-in diagnostic tasks, so a deployment can be smoke-tested and benchmarked without code.
//!
//! | name | does |
//! |---|---|
//! | `celeriac.ping()` | returns `"pong"` |
//! | `celeriac.noop()` | nothing, returns `null` |
//! | `celeriac.echo(value)` | returns `value`, byte for byte |
//! | `celeriac.add(x, y)` | returns `x + y` as Python computes it: integers exact at any size, a float if either is one |
//! | `celeriac.sleep(seconds)` | sleeps, returns `seconds` |
//! | `celeriac.fail(message)` | fails with `RuntimeError(message)` |
//! | `celeriac.flaky(failures, value=None)` | fails `failures` times, retried with backoff, then returns `value` if given, else its retry count |
//! | `celeriac.alloc(mb, keep)` | allocates and touches `mb` MiB; with `keep`, never frees it (a leak) |
//! | `celeriac.hang()` | blocks forever in a futex wait (a deadlock, as inside a C library) |
//! | `celeriac.crash()` | aborts the process running it (SIGABRT) |
//!
//! `hang` and `crash` are for the prefork pool, where they cost one child: in the async pool a
//! hang holds a blocking thread until the process exits, and a crash takes the worker down.

use std::time::Duration;

use celeriac_core::{Registry, TaskContext, TaskError};
use serde_json::{Number, Value};

/// `"pong"`.
#[celeriac::task(name = "celeriac.ping")]
pub async fn ping() -> String {
    "pong".to_string()
}

/// Does nothing.
#[celeriac::task(name = "celeriac.noop")]
pub async fn noop() {}

/// Returns its argument.
#[celeriac::task(name = "celeriac.echo")]
pub async fn echo(value: Value) -> Value {
    value
}

/// `x + y`, as Python computes it: two integers add exactly, at any size
/// (`2**63 - 1 + 1 = 9223372036854775808`); with a float on either side both are floats (an
/// integer too large for a float is Python's `OverflowError`), and float addition may give
/// `inf` or `nan` as Python's does.
#[celeriac::task(name = "celeriac.add")]
pub async fn add(x: Number, y: Number) -> Result<Number, TaskError> {
    use celeriac_core::pyjson;
    if pyjson::is_int(&x) && pyjson::is_int(&y) {
        if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
            if let Some(sum) = a.checked_add(b) {
                return Ok(Number::from(sum));
            }
        }
        let big = |n: &Number| n.as_str().parse::<num_bigint::BigInt>();
        let sum = match (big(&x), big(&y)) {
            (Ok(a), Ok(b)) => a + b,
            _ => return Err(TaskError::new("ValueError", format!("cannot read {x} + {y} as integers"))),
        };
        return sum.to_string().parse::<Number>().map_err(|e| TaskError::new("ValueError", e.to_string()));
    }
    let float = |n: &Number| {
        pyjson::as_f64(n)
            .ok_or_else(|| TaskError::new("OverflowError", format!("int {n} too large to convert to float")))
    };
    Ok(pyjson::float(float(&x)? + float(&y)?))
}

/// The sum of a list of numbers, as Python's `sum(values)` gives it (added one by one as
/// [`add`] adds): the usual body of a chord, which gets the list of its header's results.
#[celeriac::task(name = "celeriac.tsum")]
pub async fn tsum(values: Vec<Number>) -> Result<Number, TaskError> {
    let mut total = Number::from(0);
    for v in values {
        total = add::run(total, v).await?;
    }
    Ok(total)
}

/// Sleeps `seconds`, returns them. Stops early (with `SoftTimeLimitExceeded`) at its soft time
/// limit.
#[celeriac::task(name = "celeriac.sleep")]
pub async fn sleep(ctx: &TaskContext, seconds: f64) -> Result<f64, TaskError> {
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(TaskError::new("ValueError", format!("seconds must be a non-negative number, got {seconds}")));
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(seconds)) => Ok(seconds),
        _ = ctx.soft_time_limit() => Err(TaskError::new("SoftTimeLimitExceeded", "soft time limit exceeded").with_module("billiard.exceptions")),
    }
}

/// Fails with `RuntimeError(message)`.
#[celeriac::task(name = "celeriac.fail")]
pub async fn fail(message: String) -> Result<(), TaskError> {
    Err(TaskError::new("RuntimeError", message))
}

/// Fails with `FlakyError` until it has been retried `failures` times, then returns `value` if
/// given (so a test sees what the retries carried), else its retry count. Retries back off
/// exponentially from 0.2 s with full jitter.
#[celeriac::task(name = "celeriac.flaky", autoretry_for = ["FlakyError"], retry_backoff = 0.2, retry_backoff_max = 2, max_retries = 10)]
pub async fn flaky(ctx: &TaskContext, failures: u32, value: Option<Value>) -> Result<Value, TaskError> {
    if ctx.retries < failures {
        return Err(TaskError::new(
            "FlakyError",
            format!("attempt {} of {} fails on purpose", ctx.retries + 1, failures + 1),
        )
        .with_module("celeriac"));
    }
    Ok(value.unwrap_or_else(|| Value::from(ctx.retries)))
}

/// Memory `celeriac.alloc` keeps on purpose.
static KEPT: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Allocates `mb` MiB and writes every page, so it is resident; with `keep`, holds on to it for
/// the life of the process. Returns the process's resident set afterwards, in MiB.
#[celeriac::task(name = "celeriac.alloc")]
pub fn alloc(mb: f64, keep: Option<bool>) -> Result<f64, TaskError> {
    if !(mb.is_finite() && (0.0..=65536.0).contains(&mb)) {
        return Err(TaskError::new("ValueError", format!("mb must be between 0 and 65536, got {mb}")));
    }
    let mut block = vec![0u8; (mb * 1024.0 * 1024.0) as usize];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&block);
    if keep.unwrap_or(false) {
        KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(block);
    }
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    Ok((rss_kib / 1024.0 * 10.0).round() / 10.0)
}

/// Blocks forever in a futex wait, as a task deadlocked inside a C library does.
#[celeriac::task(name = "celeriac.hang")]
pub fn hang() {
    let lock = std::sync::Mutex::new(());
    let never = std::sync::Condvar::new();
    let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        guard = never.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
}

/// Aborts the process running it.
#[celeriac::task(name = "celeriac.crash")]
pub fn crash() {
    std::process::abort();
}

/// Panics with `message` (a bug in a task): FAILURE `Panic`, the traceback saying where.
#[celeriac::task(name = "celeriac.panic")]
pub async fn panic(message: String) {
    panic!("{message}");
}

/// Register every built-in task.
pub fn register(registry: &mut Registry) {
    registry
        .register(ping)
        .register(noop)
        .register(echo)
        .register(add)
        .register(tsum)
        .register(sleep)
        .register(fail)
        .register(flaky);
    registry.register(alloc).register(hang).register(crash).register(panic);
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::Task;
    use serde_json::json;

    async fn call<T: Task>(t: T, args: Value) -> Result<Value, TaskError> {
        let args = serde_json::from_value(args).unwrap();
        t.call(TaskContext::detached("id", t.name()), args, Default::default()).await
    }

    #[tokio::test]
    async fn builtins_compute() {
        assert_eq!(call(add, json!([2, 3])).await.unwrap(), json!(5));
        assert_eq!(call(add, json!([2.5, 1])).await.unwrap(), json!(3.5));
        assert_eq!(call(echo, json!([{"a": [1]}])).await.unwrap(), json!({"a": [1]}));
        assert_eq!(call(ping, json!([])).await.unwrap(), json!("pong"));
        assert_eq!(call(noop, json!([])).await.unwrap(), Value::Null);
        let e = call(fail, json!(["boom"])).await.unwrap_err();
        assert_eq!((e.exc_type.as_str(), e.message.as_str()), ("RuntimeError", "boom"));
        assert_eq!(call(add, json!(["a", 1])).await.unwrap_err().exc_type, "TypeError");
        assert_eq!(call(sleep, json!([-1])).await.unwrap_err().exc_type, "ValueError");
        assert_eq!(call(flaky, json!([1])).await.unwrap_err().exc_type, "FlakyError");
        assert_eq!(call(flaky, json!([0])).await.unwrap(), json!(0));
    }

    async fn add_text(x: &str, y: &str) -> Result<String, TaskError> {
        let args = celeriac_core::pyjson::from_str(&format!("[{x}, {y}]")).unwrap();
        let Value::Array(args) = args else { unreachable!() };
        let v = add.call(TaskContext::detached("id", "celeriac.add"), args, Default::default()).await?;
        Ok(celeriac_core::pyjson::to_string(&v).unwrap())
    }

    #[tokio::test]
    async fn add_gives_pythons_answer_for_every_number() {
        // (x, y, what Python 3.11 json.dumps(x + y) writes, checked with target/pyenv)
        let cases = [
            ("9223372036854775807", "1", "9223372036854775808"),
            ("-9223372036854775808", "-1", "-9223372036854775809"),
            ("18446744073709551617", "18446744073709551617", "36893488147419103234"),
            ("1000000000000000000000000000000", "-1", "999999999999999999999999999999"),
            ("2", "3", "5"),
            ("0.1", "0.2", "0.30000000000000004"),
            ("1", "0.5", "1.5"),
            ("9223372036854775807", "0.0", "9.223372036854776e+18"),
            ("1e+16", "1", "1e+16"),
            ("1.7976931348623157e+308", "1.7976931348623157e+308", "Infinity"),
            ("NaN", "1", "NaN"),
            ("Infinity", "-Infinity", "NaN"),
            ("-0.0", "-0.0", "-0.0"),
            ("5e-324", "5e-324", "1e-323"),
        ];
        for (x, y, python) in cases {
            assert_eq!(add_text(x, y).await.unwrap(), python, "{x} + {y}");
        }
        let huge = format!("1{}", "0".repeat(400));
        let e = add_text(&huge, "0.5").await.unwrap_err();
        assert_eq!(
            (e.exc_type.as_str(), e.message.as_str()),
            ("OverflowError", format!("int {huge} too large to convert to float").as_str())
        );
        assert_eq!(add_text(&huge, &huge).await.unwrap(), format!("2{}", "0".repeat(400)));
        assert_eq!(add_text("\"a\"", "1").await.unwrap_err().exc_type, "TypeError");
    }

    #[tokio::test]
    async fn echo_returns_its_argument_byte_for_byte() {
        let text = r#"[18446744073709551617, -18446744073709551616, 123456789.12345679, 5e-324, 1e+16, -0.0, NaN, Infinity, -Infinity, {"k": [1e+22]}]"#;
        let args = celeriac_core::pyjson::from_str(&format!("[{text}]")).unwrap();
        let Value::Array(args) = args else { unreachable!() };
        let v = echo.call(TaskContext::detached("id", "celeriac.echo"), args, Default::default()).await.unwrap();
        assert_eq!(celeriac_core::pyjson::to_string(&v).unwrap(), text);
    }
}
