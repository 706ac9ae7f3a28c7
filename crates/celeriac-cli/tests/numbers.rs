//! Python's numbers through celeriac workers, unchanged: big integers, floats at the edges of
//! their range and precision, `NaN` and the infinities, in arguments, keyword arguments, results
//! and retries, on RabbitMQ and Redis, in the async and prefork pools, with results stored in
//! Redis and read back by real Python Celery (`tests/interop/client.py numbers`, which also
//! computes what a Python worker would return); and through celeriac's own client and CLI on the
//! SQLite broker and backend. A Rust-typed argument that cannot hold a value fails with a clear
//! error instead.

mod common;

use std::process::Command;

use common::{py_client_on, run_cli, venv_python, SharedRedisDb, TempDb, TestVhost, WorkerProc};
use serde_json::Value;

/// This binary's Redis db (results, and the Redis broker's queues under unique names).
const DB: u32 = 1;

/// Run the Python client's `numbers` cases against a worker on `broker` with `pool` flags and
/// check every outcome.
fn python_numbers_through(broker: &str, backend: &str, pool: &[&str]) {
    let queue = format!("numbers-{}", uuid::Uuid::new_v4().simple());
    let mut flags = vec!["--result-backend", backend, "-Q", &queue, "-c", "2"];
    flags.extend_from_slice(pool);
    let worker = WorkerProc::start(broker, &flags);
    let report = py_client_on(broker, backend, &["numbers", "--queue", &queue, "--timeout", "30"]);
    let rows: Vec<Value> = serde_json::from_str(&report).expect("client.py numbers prints JSON");
    assert!(rows.len() > 50, "{report}");
    let mut refused = 0;
    for row in &rows {
        let case = row["case"].as_str().unwrap();
        match row["want"].as_str() {
            // What Python computes, as Python's json.dumps writes it, both sides.
            Some(want) => assert_eq!(row["got"].as_str(), Some(want), "{case}: {row}\n{}", worker.dump()),
            None => {
                refused += 1;
                let (exc, message) =
                    (row["exc_type"].as_str().unwrap_or(""), row["exc_message"].as_str().unwrap_or(""));
                let expected = match case {
                    "flaky 2**70" => (
                        "OverflowError",
                        "celeriac.flaky() argument 'failures': int 1180591620717411303424 is out of range for u32",
                    ),
                    "flaky 1.5" => {
                        ("TypeError", "celeriac.flaky() argument 'failures': expected an integer (u32), got float 1.5")
                    }
                    "sleep 10**400" => ("OverflowError", "too large to convert to float (f64)"),
                    "add 10**400 0.5" => ("OverflowError", "too large to convert to float"),
                    other => panic!("unexpected refused case {other}"),
                };
                assert_eq!(exc, expected.0, "{case}: {row}");
                assert!(message.contains(expected.1), "{case}: {message}");
            }
        }
    }
    assert_eq!(refused, 4);
}

#[test]
fn python_numbers_come_back_unchanged_from_the_async_pool_on_rabbitmq() {
    let vhost = TestVhost::new();
    let db = SharedRedisDb::get(DB);
    python_numbers_through(&vhost.url(""), &db.url(""), &[]);
}

#[test]
fn python_numbers_come_back_unchanged_from_the_prefork_pool_on_rabbitmq() {
    let vhost = TestVhost::new();
    let db = SharedRedisDb::get(DB);
    python_numbers_through(&vhost.url(""), &db.url(""), &["-P", "prefork"]);
}

#[test]
fn python_numbers_come_back_unchanged_from_the_async_pool_on_redis() {
    let db = SharedRedisDb::get(DB);
    python_numbers_through(&db.url(""), &db.url(""), &[]);
}

#[test]
fn python_numbers_come_back_unchanged_from_the_prefork_pool_on_redis() {
    let db = SharedRedisDb::get(DB);
    python_numbers_through(&db.url(""), &db.url(""), &["-P", "prefork"]);
}

/// `json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)` by real Python: the
/// compact form `celeriac send --wait` prints.
fn python_compact(text: &str) -> String {
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import json,sys; print(json.dumps(json.loads(sys.argv[1]), separators=(',', ':'), ensure_ascii=False))",
            text,
        ])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_cli_and_the_sqlite_backend_keep_every_number() {
    let db = TempDb::new("");
    let _worker = WorkerProc::start(&db.url, &["-c", "2"]);
    let broker = db.url.as_str();
    let values = [
        "18446744073709551617",
        "-9223372036854775809",
        "1000000000000000000000000000000",
        "123456789.123456789",
        "5e-324",
        "1.7976931348623157e308",
        "1e16",
        "1E22",
        "-0.0",
        "NaN",
        "-Infinity",
        r#"{"k": [Infinity, 0.1, 18446744073709551616], "n": null}"#,
    ];
    for value in values {
        let args = format!("[{value}]");
        let (code, out, err) = run_cli(&["send", "celeriac.echo", "--args", &args, "--wait", "--broker", broker], &[]);
        assert_eq!(code, 0, "{value}: {err}");
        assert_eq!(out.trim(), python_compact(value), "echo {value}");
    }
    let adds = [("9223372036854775807", "1"), ("18446744073709551617", "-1"), ("0.1", "0.2"), ("1e308", "1e308")];
    for (x, y) in adds {
        let args = format!("[{x}, {y}]");
        let (code, out, err) = run_cli(&["send", "celeriac.add", "--args", &args, "--wait", "--broker", broker], &[]);
        assert_eq!(code, 0, "{args}: {err}");
        let want = Command::new(venv_python())
            .args(["-c", &format!("import json; print(json.dumps({x} + {y}))")])
            .output()
            .expect("python");
        let want = String::from_utf8_lossy(&want.stdout).trim().to_string();
        assert_eq!(out.trim(), want, "add {args}");
    }
    // The stored result, read back by `celeriac result --json`, keeps the number too.
    let (code, id, err) =
        run_cli(&["send", "celeriac.echo", "--args", "[18446744073709551617]", "--broker", broker], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_cli(&["result", id.trim(), "--wait", "--json", "--broker", broker], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""result":18446744073709551617,"#), "{out}");
    // A Rust-typed argument that cannot hold the value fails, naming it.
    let (code, _, err) =
        run_cli(&["send", "celeriac.flaky", "--args", "[1180591620717411303424]", "--wait", "--broker", broker], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("FAILURE: OverflowError: celeriac.flaky() argument 'failures': int 1180591620717411303424 is out of range for u32"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriacs_client_reads_back_every_number_from_the_sqlite_backend() {
    let db = TempDb::new("");
    let _worker = WorkerProc::start(&db.url, &["-c", "2"]);
    let client = db.client().await;
    let text = r#"[18446744073709551617, -18446744073709551616, 123456789.12345679, 5e-324, 1e+16, -0.0, NaN, Infinity, -Infinity]"#;
    let value = celeriac_core::pyjson::from_str(text).unwrap();
    let sig = celeriac::Signature::new("celeriac.echo").arg(value);
    let res = sig.apply_async(&client).await.expect("send");
    let got = res.get(Some(std::time::Duration::from_secs(30))).await.expect("result");
    assert_eq!(celeriac_core::pyjson::to_string(&got).unwrap(), text);
    // And a retried task hands back what it was sent, through two retries.
    let sig = celeriac::Signature::new("celeriac.flaky").arg(2).kwarg("value", got);
    let res = sig.apply_async(&client).await.expect("send");
    let again = res.get(Some(std::time::Duration::from_secs(30))).await.expect("result");
    assert_eq!(celeriac_core::pyjson::to_string(&again).unwrap(), text);
}
