//! Celery's canvas carried out by celeriac workers, driven by a real Python Celery 5.7 client
//! (`tests/interop/canvas_client.py`): chain, link and link_error, a chain that fails halfway,
//! group, chord (and a chord whose header fails), nesting, and mixed fleets where the steps of
//! one chain and the header tasks of one chord run on Python and celeriac workers together.
//! Every result is read back by Python.
//!
//! On the Redis broker (async pool) and on RabbitMQ (prefork pool), both with the Redis result
//! backend (database 4, flushed once before the first test here; each test has its own queues).

mod common;

use common::{repo, venv_python, PyCeleryWorker, SharedRedisDb, TestVhost, WorkerProc};
use serde_json::Value;
use std::process::Command;

const DB: u32 = 4;

/// Run one case of `canvas_client.py`; returns its checks after asserting each one.
fn case(broker: &str, backend: &str, case: &str, queue: &str, py_queue: Option<&str>) {
    let mut cmd = Command::new(venv_python());
    cmd.arg(repo().join("tests/interop/canvas_client.py")).args([case, "--queue", queue, "--timeout", "60"]);
    if let Some(q) = py_queue {
        cmd.args(["--py-queue", q]);
    }
    let out = cmd.env("CELERY_BROKER_URL", broker).env("CELERY_RESULT_BACKEND", backend).output().expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("case {case}: no JSON line ({e}): {stdout}\n{stderr}"));
    assert!(out.status.success(), "case {case} did not finish: {line}\n{stderr}");
    let checks = line["checks"].as_object().expect("checks");
    assert!(!checks.is_empty(), "case {case} checked nothing");
    let failed: Vec<String> = checks
        .iter()
        .filter(|(_, c)| c["want"] != c["got"])
        .map(|(name, c)| format!("{name}: want {}, got {}", c["want"], c["got"]))
        .collect();
    assert!(failed.is_empty(), "case {case} on {broker}:\n{}", failed.join("\n"));
}

/// Every case that needs only celeriac workers.
const CELERIAC_CASES: &[&str] = &[
    "chain3",
    "link",
    "link_error",
    "errback_chain",
    "group100",
    "chord100",
    "chord_fail",
    "nested",
    "group_of_chains",
];

#[test]
fn python_canvas_runs_on_celeriac_workers_redis_broker_async_pool() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let queue = "canvas-redis";
    let w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", queue, "-c", "4"]);
    for c in CELERIAC_CASES {
        case(&url, &url, c, queue, None);
    }
    assert_eq!(w.count("malformed continuation"), 0, "{}", w.dump());
}

#[test]
fn python_canvas_runs_on_celeriac_workers_rabbitmq_prefork_pool() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let backend = SharedRedisDb::get(DB).url("");
    let queue = "canvas-amqp";
    let _w = WorkerProc::start(&broker, &["--result-backend", &backend, "-Q", queue, "-c", "2", "-P", "prefork"]);
    for c in CELERIAC_CASES {
        case(&broker, &backend, c, queue, None);
    }
}

#[test]
fn one_chain_and_one_chord_run_across_python_and_celeriac_workers() {
    let backend = SharedRedisDb::get(DB).url("");
    // On the Redis broker.
    let (queue, py_queue) = ("canvas-mixed-c", "canvas-mixed-py");
    let _w = WorkerProc::start(&backend, &["--result-backend", &backend, "-Q", queue, "-c", "2"]);
    let _py = PyCeleryWorker::start(&backend, &backend, py_queue);
    case(&backend, &backend, "mixed_chain", queue, Some(py_queue));
    case(&backend, &backend, "mixed_chord", queue, Some(py_queue));
    // On RabbitMQ.
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let _w2 = WorkerProc::start(&broker, &["--result-backend", &backend, "-Q", queue, "-c", "2"]);
    let _py2 = PyCeleryWorker::start(&broker, &backend, py_queue);
    case(&broker, &backend, "mixed_chain", queue, Some(py_queue));
    case(&broker, &backend, "mixed_chord", queue, Some(py_queue));
}

/// A task message for `celeriac.echo(value)` on `queue` whose embed is `embed` (raw JSON, as a
/// hand-written or broken producer would send it).
fn with_embed(client: &celeriac::Client, queue: &str, id: &str, value: &str, embed: &str) -> celeriac_core::Message {
    let options = celeriac::SendOptions { task_id: Some(id.into()), queue: Some(queue.into()), ..Default::default() };
    let mut message =
        client.build_message("celeriac.echo", vec![Value::from(value)], Default::default(), &options, true).unwrap();
    message.body = format!("[[\"{value}\"], {{}}, {embed}]").into_bytes();
    message
}

/// Each kind of malformed embed: the task still runs and stores its result; the bad part is
/// logged once with the task id and the reason, stored as a FAILURE on its own id when it has
/// one, and the message is among the dead letters; a good continuation beside it still runs.
async fn malformed_embeds_cost_nothing_but_the_bad_part(
    broker: &str,
    backend: Option<&str>,
    w: &WorkerProc,
    queue: &str,
) {
    let client = celeriac::Client::connect(broker, backend).await.unwrap();
    let good = format!(r#"{{"task": "celeriac.echo", "options": {{"task_id": "cv-good-1", "queue": "{queue}"}}}}"#);
    let cases = [
        ("cv-bad-chain", r#"{"chain": {"task": "celeriac.echo"}}"#.to_string(), None, "expected a list of signatures"),
        (
            "cv-bad-notask",
            format!(r#"{{"callbacks": [{{"args": [1], "options": {{"task_id": "cv-notask-cb"}}}}, {good}]}}"#),
            Some("cv-notask-cb"),
            "a signature with no \"task\"",
        ),
        (
            "cv-bad-type",
            r#"{"chain": [{"task": "celeriac.echo", "subtask_type": "weird", "options": {"task_id": "cv-weird"}}]}"#
                .into(),
            Some("cv-weird"),
            "unknown subtask_type \"weird\"",
        ),
        (
            "cv-bad-nogroup",
            r#"{"chord": {"task": "celeriac.tsum", "options": {"task_id": "cv-orphan-body"}}}"#.into(),
            Some("cv-orphan-body"),
            "a chord body on a message with no group",
        ),
    ];
    for (id, embed, _, _) in &cases {
        let message = with_embed(&client, queue, id, id, embed);
        client.broker().publish(queue, &message).await.unwrap();
    }
    for (id, _, continuation, reason) in &cases {
        let value = client.result(*id).get(Some(std::time::Duration::from_secs(30))).await;
        assert_eq!(value.unwrap(), Value::from(*id), "the task {id} itself ran and stored its result");
        let lines =
            || -> Vec<String> { w.matching("malformed continuation").into_iter().filter(|l| l.contains(id)).collect() };
        common::wait_until("the worker's log line", std::time::Duration::from_secs(10), || !lines().is_empty());
        let lines = lines();
        assert_eq!(lines.len(), 1, "one log line for {id}, with its id and the reason: {lines:?}\n{}", w.dump());
        assert!(lines[0].contains(reason), "the line names the reason {reason:?}: {}", lines[0]);
        if let Some(cid) = continuation {
            let meta = client.result(*cid).meta().await.unwrap().unwrap_or_else(|| panic!("{cid} has a result"));
            assert_eq!(meta.status, celeriac::TaskState::Failure, "{cid}");
            assert!(meta.exception_info().unwrap().message().contains(reason), "{meta:?}");
        }
    }
    assert_eq!(
        client.result("cv-good-1").get(Some(std::time::Duration::from_secs(30))).await.unwrap(),
        "cv-bad-notask"
    );
    let dead = client.broker().dead_letters(100).await.unwrap();
    for (id, _, _, reason) in &cases {
        let d = dead.iter().find(|d| d.task_id.as_deref() == Some(id)).unwrap_or_else(|| panic!("{id} dead-lettered"));
        assert!(d.reason.contains(reason), "{:?}", d.reason);
    }
}

#[tokio::test]
async fn malformed_embeds_on_redis_and_sqlite() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", "canvas-bad", "-c", "2"]);
    malformed_embeds_cost_nothing_but_the_bad_part(&url, Some(&url), &w, "canvas-bad").await;
    let sqlite = common::TempDb::new("");
    let w = WorkerProc::start(&sqlite.url, &["-Q", "canvas-bad", "-c", "2", "-P", "prefork"]);
    malformed_embeds_cost_nothing_but_the_bad_part(&sqlite.url, None, &w, "canvas-bad").await;
}
