//! The message forms real producers send besides plain protocol v2, end to end:
//! - compressed bodies (`compression=` in Celery and kombu; each codec kombu registers by
//!   default, under each of its names) run; a codec kombu does not ship is refused with
//!   FAILURE "unsupported compression" and dead-lettered; a compressed task that retries keeps
//!   body and header consistent; celeriac's client compresses (`--compression`) for celeriac and
//!   for Python workers;
//! - task protocol 1, from Celery with `task_protocol=1` and hand-written with kombu (no
//!   `kwargs`; `kwargs` not a mapping), with countdown, expires, time limit and a retry;
//! - `eta`/`expires` texts in the ISO 8601 forms Celery's parser accepts (date only, week and
//!   ordinal dates, offsets, fractions with `.` or `,`, naive = UTC), garbage refused.
//!
//! One celeriac worker per broker (RabbitMQ with the async pool and Redis with the prefork pool,
//! with a real Celery 5.7 client sending
//! everything in one process: `tests/interop/wire_forms.py`), and one on an SQLite file fed by
//! celeriac's client and raw messages. Results go to Redis db 13 (unique ids, never flushed).

mod common;

use std::process::Command;
use std::time::Duration;

use celeriac::{Codec, SendOptions, TaskState};
use celeriac_core::{Message, Properties};
use chrono::{DateTime, Utc};
use common::{repo, run_cli, venv_python, wait_until_async, PyCeleryWorker, TempDb, TestVhost, WorkerProc};
use serde_json::{json, Map, Value};

const RESULTS: &str = "redis://127.0.0.1:6379/13";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Run `wire_forms.py run QUEUE` against `broker`: every case's outcome as Python reads it.
fn python_cases(broker: &str, queue: &str) -> Map<String, Value> {
    let out = Command::new(venv_python())
        .arg(repo().join("tests/interop/wire_forms.py"))
        .args(["run", queue, "--timeout", "60"])
        .env("CELERY_BROKER_URL", broker)
        .env("CELERY_RESULT_BACKEND", RESULTS)
        .output()
        .expect("wire_forms.py");
    assert!(
        out.status.success(),
        "wire_forms.py failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Object(m)) => m,
        other => panic!("wire_forms.py printed {other:?}: {}", String::from_utf8_lossy(&out.stdout)),
    }
}

fn time(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

/// What each case of `wire_forms.py` must come to, as a Python worker would have it.
fn check_python_cases(report: &Map<String, Value>, worker: &WorkerProc) {
    let case = |name: &str| report.get(name).unwrap_or_else(|| panic!("no case {name:?} in {report:?}"));
    let success = |name: &str, want: Value| {
        let c = case(name);
        assert_eq!((c["state"].as_str(), &c["result"]), (Some("SUCCESS"), &want), "{name}: {c}\n{}", worker.dump());
    };
    let failure = |name: &str, exc_type: &str, text: &str| {
        let c = case(name);
        assert_eq!(c["state"], "FAILURE", "{name}: {c}");
        assert_eq!(c["exc_type"], exc_type, "{name}: {c}");
        let message = c["exc_message"].as_str().unwrap_or_default();
        assert!(message.contains(text), "{name}: {message:?} does not say {text:?}");
    };
    let big = json!("x".repeat(20_000));

    // Item 3.
    let codecs = ["zlib", "gzip", "application/x-gzip", "bzip2", "bzip", "application/x-bz2", "lzma", "xz"];
    for codec in codecs.iter().chain(&["application/x-lzma", "zstd", "zstandard", "application/zstd"]) {
        success(&format!("compressed:{codec}"), big.clone());
    }
    failure("compressed:snappy", "InvalidTaskError", "unsupported compression: application/x-snappy");
    let snappy = case("compressed:snappy")["id"].as_str().unwrap().to_string();
    let dead = worker.matching("dead-lettering message");
    assert!(
        dead.iter().any(|l| l.contains(&snappy) && l.contains("unsupported compression: application/x-snappy")),
        "the snappy message is dead-lettered with its reason: {dead:?}"
    );
    success("compressed:retried", json!(1));

    // Item 4.
    success("v1:add", json!(5));
    success("v1:kwargs", json!(5));
    success("v1:countdown", json!(5));
    let c = case("v1:countdown");
    assert!(time(&c["done"]) >= time(&c["sent"]) + chrono::Duration::seconds(1), "v1 countdown held: {c}");
    assert_eq!(case("v1:expired")["state"], "REVOKED", "{}", case("v1:expired"));
    success("v1:compressed", big.clone());
    success("v1:retried", json!(1));
    failure("v1:timelimit", "TimeLimitExceeded", "");
    success("raw_v1:no_kwargs", json!(5));
    failure("raw_v1:bad_kwargs", "InvalidTaskError", "Task keyword arguments must be a mapping");
    success("raw_v1:eta_naive", json!(5));

    // Item 5.
    for text in ["2015-12-05", "2015-W49-6", "20151205T1020Z", "2015-12-05 10:20:30,5-03:00", "2015-339T12:00+0530"] {
        success(&format!("eta:{text}"), json!(5));
    }
    success("eta:naive_future", json!(5));
    let c = case("eta:naive_future");
    assert!(time(&c["done"]) >= time(&c["sent"]) + chrono::Duration::seconds(2), "a naive eta is UTC: {c}");
    success("expires:2999-01-01", json!(5));
    assert_eq!(case("expires:past_naive")["state"], "REVOKED", "{}", case("expires:past_naive"));
    failure("eta:garbage", "InvalidTaskError", "\"tomorrow\" is not an ISO 8601 time");
}

#[test]
fn celery_clients_compressed_v1_and_iso_forms_run_on_rabbitmq() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let queue = unique("wire");
    let worker = WorkerProc::start(&broker, &["-Q", &queue, "-c", "4", "--result-backend", RESULTS]);
    let report = python_cases(&broker, &queue);
    check_python_cases(&report, &worker);

    // celeriac's client compresses, for a celeriac worker and for a Python one.
    let py_queue = unique("wire-py");
    let _py = PyCeleryWorker::start(&broker, RESULTS, &py_queue);
    let arg = format!("[\"{}\"]", "y".repeat(5_000));
    for (task, q) in [("celeriac.echo", queue.as_str()), ("py.echo", py_queue.as_str())] {
        for codec in ["zlib", "bzip2", "lzma", "zstd"] {
            let (code, out, err) = run_cli(
                &["send", task, "--args", &arg, "--compression", codec, "-Q", q, "--wait", "--json"]
                    .iter()
                    .chain(&["--broker", &broker, "--result-backend", RESULTS])
                    .copied()
                    .collect::<Vec<_>>(),
                &[],
            );
            assert_eq!(code, 0, "{task} with {codec}: {out}{err}");
            let meta: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert_eq!(
                (&meta["status"], &meta["result"]),
                (&json!("SUCCESS"), &json!("y".repeat(5_000))),
                "{task} {codec}"
            );
        }
    }
}

#[test]
fn celery_clients_compressed_v1_and_iso_forms_run_on_redis_in_the_prefork_pool() {
    let broker = RESULTS.to_string();
    let queue = unique("wire");
    // The prefork pool here (the async pool on RabbitMQ): the v1 time limit is a SIGKILL.
    let worker = WorkerProc::start(&broker, &["-Q", &queue, "-P", "prefork", "-c", "3", "--result-backend", RESULTS]);
    let report = python_cases(&broker, &queue);
    check_python_cases(&report, &worker);

    // The CLI's own forms: --compression and --eta in Celery's forms.
    for (codec, eta) in [
        ("zlib", "2015-12-05"),
        ("bzip2", "2015-W49-6T10:00"),
        ("lzma", "20151205T102030,5+01"),
        ("zstd", "2015-339T00:00:00.000001Z"),
    ] {
        let (code, out, err) = run_cli(
            &[
                "send",
                "celeriac.add",
                "--args",
                "[2, 3]",
                "--compression",
                codec,
                "--eta",
                eta,
                "-Q",
                &queue,
                "--wait",
                "--broker",
                &broker,
                "--result-backend",
                RESULTS,
            ],
            &[],
        );
        assert_eq!((code, out.trim()), (0, "5"), "{codec} {eta}: {err}");
    }
}

fn raw(id: &str, headers: Map<String, Value>, body: Value) -> Message {
    Message {
        headers,
        properties: Properties { correlation_id: Some(id.into()), ..Properties::default() },
        body: serde_json::to_vec(&body).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_and_v1_messages_run_on_sqlite_and_bad_ones_are_dead_lettered() {
    let db = TempDb::new("");
    let worker = WorkerProc::start(&db.url, &["-c", "4"]);
    let client = db.client().await;
    let broker = client.broker().clone();
    let backend = client.backend().clone();
    let big = json!("z".repeat(20_000));

    let mut expect: Vec<(String, TaskState, Value)> = Vec::new();
    for codec in Codec::ALL {
        for (task, args, want) in
            [("celeriac.echo", vec![big.clone()], big.clone()), ("celeriac.flaky", vec![json!(1)], json!(1))]
        {
            let options = SendOptions { compression: Some(codec), ..SendOptions::default() };
            let r = client.send_task(task, args, Map::new(), options).await.unwrap();
            expect.push((r.id().to_string(), TaskState::Success, want));
        }
    }
    // Protocol 1, hand-written: no kwargs; compressed; retried (republished as v2).
    let v1 = |task: &str, args: Value| {
        let id = unique("v1");
        (id.clone(), raw(&id, Map::new(), json!({"task": task, "id": id, "args": args})))
    };
    let (id, m) = v1("celeriac.add", json!([2, 3]));
    broker.publish("celery", &m).await.unwrap();
    expect.push((id, TaskState::Success, json!(5)));
    let (id, mut m) = v1("celeriac.echo", json!([big.clone()]));
    m.compress(Codec::Lzma).unwrap();
    broker.publish("celery", &m).await.unwrap();
    expect.push((id, TaskState::Success, big.clone()));
    let (id, m) = v1("celeriac.flaky", json!([2]));
    broker.publish("celery", &m).await.unwrap();
    expect.push((id, TaskState::Success, json!(2)));

    // Refused: an unknown codec, a v1 kwargs that is not a mapping, a corrupt compressed body.
    let snappy = unique("snappy");
    let mut headers = celeriac_core::TaskHeaders::new("celeriac.add", &snappy).to_map();
    headers.insert("compression".into(), json!("application/x-snappy"));
    broker.publish("celery", &raw(&snappy, headers, json!([[2, 3], {}, {}]))).await.unwrap();
    let bad_kwargs = unique("v1");
    let m = raw(&bad_kwargs, Map::new(), json!({"task": "celeriac.add", "id": bad_kwargs, "args": [], "kwargs": [1]}));
    broker.publish("celery", &m).await.unwrap();
    let corrupt = unique("corrupt");
    let mut m = raw(&corrupt, celeriac_core::TaskHeaders::new("celeriac.add", &corrupt).to_map(), json!([[2, 3], {}]));
    m.compress(Codec::Zlib).unwrap();
    m.body.truncate(m.body.len() - 4);
    broker.publish("celery", &m).await.unwrap();

    for (id, state, value) in &expect {
        let meta = backend.wait(id, Some(Duration::from_secs(30))).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!((&meta.status, &meta.result), (state, value), "{id}\n{}", worker.dump());
    }
    let refused = [
        (&snappy, "unsupported compression: application/x-snappy"),
        (&bad_kwargs, "Task keyword arguments must be a mapping"),
        (&corrupt, "application/x-gzip body cannot be decompressed"),
    ];
    for (id, reason) in refused {
        let meta = backend.wait(id, Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(meta.status, TaskState::Failure, "{id}");
        let text = meta.result.to_string();
        assert!(text.contains("InvalidTaskError") && text.contains(reason), "{id}: {text}");
    }
    wait_until_async("three dead letters", Duration::from_secs(10), || {
        let broker = broker.clone();
        async move { broker.dead_letters(10).await.map(|d| d.len() >= 3).unwrap_or(false) }
    })
    .await;
    let dead = broker.dead_letters(10).await.unwrap();
    for (id, reason) in refused {
        assert!(
            dead.iter().any(|d| d.reason.contains(id.as_str()) && d.reason.contains(reason)),
            "{id} dead-lettered for {reason:?}: {dead:?}"
        );
    }
}

#[test]
fn send_help_says_a_naive_time_is_utc_and_bad_times_and_codecs_are_named() {
    let (code, out, _) = run_cli(&["send", "--help"], &[]);
    assert_eq!(code, 0);
    let eta = out.split("--eta").nth(1).unwrap_or_default();
    assert!(eta.contains("2015-12-05") && eta.contains("without an offset is UTC"), "{out}");
    assert!(out.contains("--compression <CODEC>"), "{out}");
    let db = TempDb::new("");
    for (flag, value, says) in [
        ("--eta", "2015-13-01", "--eta: \"2015-13-01\" is not an ISO 8601 time"),
        ("--eta", "60", "--eta: \"60\" is not an ISO 8601 time"),
        ("--expires", "tomorrow", "--expires: \"tomorrow\" is not an ISO 8601 time"),
        ("--compression", "snappy", "unsupported compression: snappy"),
    ] {
        let (code, _, err) = run_cli(&["send", "celeriac.add", flag, value, "--broker", &db.url], &[]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}
