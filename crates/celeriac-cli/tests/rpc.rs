//! The RPC result backend (`rpc://`, Celery's): results travel to the reply queue of the client
//! that sent the task. Against real RabbitMQ (a vhost per test) and real Celery 5.7:
//! - a Python client with `backend='rpc://'` gets results, successes and failures, several at
//!   once and asked for out of order, from a celeriac worker in either pool;
//! - a celeriac client with `rpc://` gets results from a Python Celery worker;
//! - a celeriac client gets results from a celeriac worker (API and `celeriac send --wait`);
//! - what RPC cannot do is refused, and a result that cannot be delivered is logged.

mod common;

use std::time::Duration;

use celeriac::{Client, ResultError, SendOptions, TaskState};
use common::{py_client_on, run_cli, wait_until, PyCeleryWorker, TestVhost, WorkerProc};
use serde_json::{json, Map, Value};

const RPC: &str = "rpc://";
const WAIT: Option<Duration> = Some(Duration::from_secs(30));

/// A queue name no other test uses.
fn queue(what: &str) -> String {
    format!("rpc-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Ten calls of celeriac's built-ins: additions with distinct answers and failures.
fn mixed_calls() -> Vec<(String, Value)> {
    (0..10)
        .map(|i| match i % 3 {
            2 => ("celeriac.fail".to_string(), json!([format!("boom {i}")])),
            _ => ("celeriac.add".to_string(), json!([i, 100])),
        })
        .collect()
}

/// Run `client.py batch` (send every call, then wait in reverse order) with `backend='rpc://'`
/// against a celeriac worker, and check every outcome belongs to its own call.
fn python_client_gets_every_result(broker: &str, queue: &str) {
    let calls = mixed_calls();
    let calls_json = Value::Array(calls.iter().map(|(n, a)| json!([n, a])).collect()).to_string();
    let out = py_client_on(broker, RPC, &["batch", &calls_json, "--queue", queue, "--timeout", "30"]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), calls.len(), "{out}");
    for ((name, args), r) in calls.iter().zip(&lines) {
        if name == "celeriac.add" {
            let want = args[0].as_i64().unwrap() + 100;
            assert_eq!((r["state"].as_str(), &r["result"]), (Some("SUCCESS"), &json!(want)), "{r}");
        } else {
            assert_eq!(
                (r["state"].as_str(), r["exc_type"].as_str(), r["exc_message"].as_str()),
                (Some("FAILURE"), Some("RuntimeError"), args[0].as_str()),
                "{r}"
            );
        }
    }
}

#[test]
fn python_client_gets_rpc_results_from_a_celeriac_worker_in_the_async_pool() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let q = queue("py-async");
    let w = WorkerProc::start(&broker, &["--result-backend", RPC, "-Q", &q, "-c", "4"]);
    python_client_gets_every_result(&broker, &q);
    assert_eq!(w.count("rpc:// result"), 0, "every result was delivered:\n{}", w.dump());
}

#[test]
fn python_client_gets_rpc_results_from_a_celeriac_worker_in_the_prefork_pool() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let q = queue("py-prefork");
    let w = WorkerProc::start(&broker, &["--result-backend", RPC, "-Q", &q, "-P", "prefork", "-c", "2"]);
    python_client_gets_every_result(&broker, &q);
    assert_eq!(w.count("rpc:// result"), 0, "every result was delivered:\n{}", w.dump());
}

/// Send every call at once, then wait for them in reverse order, concurrently: each result must
/// be its own task's.
async fn celeriac_client_gets_every_result(client: &Client, calls: &[(&str, Value, Result<Value, &str>)], q: &str) {
    let opts = || SendOptions { queue: Some(q.to_string()), ..SendOptions::default() };
    let mut sent = Vec::new();
    for (name, args, _) in calls {
        let args = args.as_array().unwrap().clone();
        sent.push(client.send_task(name, args, Map::new(), opts()).await.expect("send"));
    }
    let waits = sent.iter().rev().map(|r| r.get(WAIT));
    let mut outcomes = futures::future::join_all(waits).await;
    outcomes.reverse();
    for ((name, args, want), got) in calls.iter().zip(outcomes) {
        match (want, got) {
            (Ok(v), Ok(g)) => assert_eq!(&g, v, "{name}{args}"),
            (Err(msg), Err(ResultError::Failed { message, .. })) => assert_eq!(&message, msg, "{name}{args}"),
            (want, got) => panic!("{name}{args}: expected {want:?}, got {got:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriac_client_gets_rpc_results_from_a_python_worker() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let q = queue("to-python");
    let _py = PyCeleryWorker::start_pool(&broker, RPC, &q, &["-P", "prefork", "-c", "2"]);
    let client = Client::connect(&broker, Some(RPC)).await.unwrap();
    let calls: Vec<(&str, Value, Result<Value, &str>)> = (0..8)
        .map(|i| match i % 4 {
            3 => ("py.fail", json!([format!("bad {i}")]), Err(["bad 3", "bad 7"][i / 4])),
            _ => ("py.add", json!([i, 1000]), Ok(json!(i + 1000))),
        })
        .collect();
    celeriac_client_gets_every_result(&client, &calls, &q).await;

    // The reply queue is declared as Celery's client declares it.
    let reply = client.backend().reply_to().await.unwrap().expect("a reply queue");
    let listed = vhost.list("list_queues", &["name", "durable", "auto_delete", "exclusive", "arguments"]);
    let line = listed.iter().find(|l| l.starts_with(&reply)).unwrap_or_else(|| panic!("{reply} in {listed:?}"));
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(&fields[1..4], ["true", "true", "false"], "durable, auto-delete, not exclusive: {line}");
    assert!(fields[4].contains("x-expires") && fields[4].contains("86400000"), "{line}");

    // A Python failure comes with its type and traceback.
    let r = client.send_task(
        "py.fail",
        vec![json!("why")],
        Map::new(),
        SendOptions { queue: Some(q.clone()), ..SendOptions::default() },
    );
    match r.await.unwrap().get(WAIT).await {
        Err(ResultError::Failed { exc_type, traceback, .. }) => {
            assert_eq!(exc_type, "ValueError");
            assert!(traceback.unwrap_or_default().contains("ValueError: why"));
        }
        other => panic!("expected ValueError, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriac_client_gets_rpc_results_from_a_celeriac_worker() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let q = queue("rust");
    let w = WorkerProc::start(&broker, &["--result-backend", RPC, "-Q", &q, "-c", "4"]);
    let client = Client::connect(&broker, Some(RPC)).await.unwrap();
    let calls: Vec<(&str, Value, Result<Value, &str>)> = (0..12)
        .map(|i| match i % 4 {
            1 => ("celeriac.fail", json!([format!("no {i}")]), Err(["no 1", "no 5", "no 9"][i / 4])),
            _ => ("celeriac.add", json!([i, -1]), Ok(json!(i as i64 - 1))),
        })
        .collect();
    celeriac_client_gets_every_result(&client, &calls, &q).await;

    // A result can be read again, and its state is known; forgetting is refused.
    let opts = SendOptions { queue: Some(q.clone()), ..SendOptions::default() };
    let r = client.send_task("celeriac.flaky", vec![json!(1)], Map::new(), opts.clone()).await.unwrap();
    assert_eq!(r.get(WAIT).await.unwrap(), json!(1), "the RETRY reply is not the result");
    assert_eq!(r.get(WAIT).await.unwrap(), json!(1));
    assert_eq!(r.state().await.unwrap(), TaskState::Success);
    let e = r.forget().await.unwrap_err().to_string();
    assert!(e.contains("cannot forget") && e.contains("rpc://"), "{e}");
    // A task nobody sent is PENDING for the client that waits on it.
    assert_eq!(client.result("never-sent").state().await.unwrap(), TaskState::Pending);

    // The command line: `send --wait` works, `result` from another process is refused.
    let (code, out, err) = run_cli(
        &["send", "-b", &broker, "--result-backend", RPC, "celeriac.add", "--args", "[20, 22]", "-Q", &q, "--wait"],
        &[],
    );
    assert_eq!((code, out.trim()), (0, "42"), "{err}");
    let (code, out, err) = run_cli(
        &["send", "-b", &broker, "--result-backend", RPC, "celeriac.fail", "--args", "[\"nope\"]", "-Q", &q, "--wait"],
        &[],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("RuntimeError: nope"), "{err}");
    let (code, _, err) = run_cli(&["result", "-b", &broker, "--result-backend", RPC, r.id()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("can only be read by its sender") && err.contains("redis://"), "{err}");
    // Another broker than AMQP: refused before anything is sent.
    let (code, _, err) =
        run_cli(&["send", "-b", "redis://127.0.0.1:6379/0", "--result-backend", RPC, "celeriac.add", "--wait"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not amqp://"), "{err}");
    assert_eq!(w.count("rpc:// result"), 0, "every result was delivered:\n{}", w.dump());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_logs_rpc_results_it_cannot_deliver_and_still_settles_the_task() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let q = queue("undeliverable");
    let opts = SendOptions { queue: Some(q.clone()), ..SendOptions::default() };
    // Sent by a client without the RPC backend: no reply_to.
    let plain = Client::connect(&broker, None).await.unwrap();
    let lost = plain.send_task("celeriac.add", vec![json!(1), json!(2)], Map::new(), opts.clone()).await.unwrap();
    // Sent by `celeriac send` with rpc:// and no --wait: its reply queue went when it exited.
    let (code, out, err) =
        run_cli(&["send", "-b", &broker, "--result-backend", RPC, "celeriac.add", "--args", "[3, 4]", "-Q", &q], &[]);
    assert_eq!(code, 0, "{err}");
    let gone = out.trim().to_string();

    let w = WorkerProc::start(&broker, &["--result-backend", RPC, "-Q", &q, "-c", "2"]);
    let lines = w.lines.clone();
    let logged = |id: &str, what: &str| lines.lock().unwrap().iter().any(|l| l.contains(id) && l.contains(what));
    wait_until("the worker to log both results it could not deliver", Duration::from_secs(30), || {
        logged(lost.id(), "has no reply_to") && logged(&gone, "reply queue is gone")
    });
    // Both tasks ran and were acknowledged: nothing is left in the queue.
    wait_until("the queue to be empty", Duration::from_secs(10), || {
        let listed = vhost.list("list_queues", &["name", "messages"]);
        listed.iter().any(|l| l.starts_with(&q) && l.ends_with("\t0"))
    });
    assert_eq!(w.count("task succeeded"), 2, "{}", w.dump());
}
