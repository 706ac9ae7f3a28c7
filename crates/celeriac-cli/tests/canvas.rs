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
