//! The Redis broker end to end: `celeriac worker` processes and clients against the test
//! binary's own real `redis-server` (`SharedRedisDb`, databases 6–9) and real Python
//! Celery 5.7 from `target/pyenv`, plus a private `redis-server` the restart test kills.
//!
//! - Python `send_task` → celeriac worker → Python `AsyncResult.get()`, and celeriac client →
//!   Python `celery worker` → celeriac reads the result; a Python and a celeriac worker sharing
//!   one queue (database 6);
//! - a SIGKILLed worker's tasks are completed by another after a 2 s visibility timeout
//!   (database 7);
//! - ETA tasks whose countdown is three visibility timeouts run exactly once (database 8);
//! - kombu's priority order, and the `queues`/`purge`/`dead-letters` commands (database 9);
//! - Redis killed and restarted under a consuming worker: nothing lost;
//! - the publish retry policy against a closed port and a silent listener.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use celeriac::{Client, PublishError, ResultError, SendOptions, TaskState};
use celeriac_core::PublishPolicy;
use common::{
    py_client_on, run_cli, wait_until_async, PrivateRedis, PyCeleryWorker, SharedRedisDb, SilentListener, WorkerProc,
};
use serde_json::{json, Map, Value};

/// Interop with Python (results in the same database).
const DB_INTEROP: u32 = 6;
/// The kill test (2 s visibility timeout).
const DB_KILL: u32 = 7;
/// The ETA test (2 s visibility timeout).
const DB_ETA: u32 = 8;
/// Priorities and the CLI commands.
const DB_MISC: u32 = 9;

async fn client(broker: &str, backend: &str) -> Client {
    Client::connect(broker, Some(backend)).await.expect("client")
}

async fn send(client: &Client, name: &str, args: Value, opts: SendOptions) -> Result<String, PublishError> {
    let args: Vec<Value> = serde_json::from_value(args).unwrap();
    client.send_task(name, args, Map::new(), opts).await.map(|r| r.id().to_string())
}

fn to(queue: &str) -> SendOptions {
    SendOptions { queue: Some(queue.into()), ..SendOptions::default() }
}

fn py_get(broker: &str, backend: &str, id: &str) -> Value {
    serde_json::from_str(&py_client_on(broker, backend, &["get", id, "--timeout", "30"])).expect("json from get")
}

/// How many times each of `ids` appears in lines containing `what`, over all `workers`.
fn runs(workers: &[&WorkerProc], ids: &[String], what: &str) -> BTreeMap<String, usize> {
    ids.iter()
        .map(|id| {
            let n: usize = workers.iter().map(|w| w.matching(id).iter().filter(|l| l.contains(what)).count()).sum();
            (id.clone(), n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn python_clients_use_celeriac_workers_on_redis() {
    let db = SharedRedisDb::get(DB_INTEROP);
    let (broker, results) = (db.url(""), db.url(""));
    let _w = WorkerProc::start(&broker, &["--result-backend", &results, "-Q", "rb-from-python", "-c", "4"]);

    let id =
        py_client_on(&broker, &results, &["send", "celeriac.add", "--args", "[2, 3]", "--queue", "rb-from-python"]);
    let r = py_get(&broker, &results, &id);
    assert_eq!((r["state"].as_str(), &r["result"]), (Some("SUCCESS"), &json!(5)), "{r}");

    let id = py_client_on(
        &broker,
        &results,
        &["send", "celeriac.echo", "--kwargs", r#"{"value": {"k": ["v", 1.5, null]}}"#, "--queue", "rb-from-python"],
    );
    assert_eq!(py_get(&broker, &results, &id)["result"], json!({"k": ["v", 1.5, null]}));

    let id = py_client_on(
        &broker,
        &results,
        &["send", "celeriac.fail", "--args", r#"["it broke"]"#, "--queue", "rb-from-python"],
    );
    let r = py_get(&broker, &results, &id);
    assert_eq!(
        (r["state"].as_str(), r["exc_type"].as_str(), r["exc_message"].as_str()),
        (Some("FAILURE"), Some("RuntimeError"), Some("it broke")),
        "{r}"
    );

    // Retries are republished to Redis and come back.
    let id = py_client_on(&broker, &results, &["send", "celeriac.flaky", "--args", "[2]", "--queue", "rb-from-python"]);
    assert_eq!(py_get(&broker, &results, &id)["result"], json!(2));

    // A countdown is honoured (the celeriac worker holds the message until its ETA).
    let sent = chrono::Utc::now();
    let id = py_client_on(
        &broker,
        &results,
        &["send", "celeriac.add", "--args", "[1, 1]", "--countdown", "1.5", "--queue", "rb-from-python"],
    );
    assert_eq!(py_get(&broker, &results, &id)["result"], json!(2));
    let c = client(&broker, &results).await;
    let meta = c.backend().get(&id).await.unwrap().unwrap();
    let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(done >= sent + chrono::Duration::milliseconds(1500), "ran at {done}, sent at {sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriac_clients_use_python_workers_on_redis() {
    let db = SharedRedisDb::get(DB_INTEROP);
    let (broker, results) = (db.url(""), db.url(""));
    let _py = PyCeleryWorker::start(&broker, &results, "rb-to-python");
    let c = client(&broker, &results).await;
    let t = Some(Duration::from_secs(30));

    let r = c.send_task("py.add", vec![json!(2), json!(3)], Map::new(), to("rb-to-python")).await.unwrap();
    assert_eq!(r.get(t).await.unwrap(), json!(5));

    let kwargs = json!({"value": {"nested": [1, "two"]}}).as_object().unwrap().clone();
    let r = c.send_task("py.echo", vec![], kwargs, to("rb-to-python")).await.unwrap();
    assert_eq!(r.get(t).await.unwrap(), json!({"nested": [1, "two"]}));

    let r = c.send_task("py.fail", vec![json!("bad value")], Map::new(), to("rb-to-python")).await.unwrap();
    match r.get(t).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!((exc_type.as_str(), message.as_str()), ("ValueError", "bad value"))
        }
        other => panic!("expected the Python ValueError, got {other:?}"),
    }

    // With a priority set (Python reads it as kombu does) and a countdown Python honours.
    let sent = chrono::Utc::now();
    let opts = SendOptions { countdown: Some(1.0), priority: Some(6), ..to("rb-to-python") };
    let r = c.send_task("py.add", vec![json!(1), json!(1)], Map::new(), opts).await.unwrap();
    assert_eq!(r.get(t).await.unwrap(), json!(2));
    let meta = r.meta().await.unwrap().unwrap();
    let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(done >= sent + chrono::Duration::milliseconds(1000), "Python honoured celeriac's countdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_worker_and_a_celeriac_worker_share_a_redis_queue_and_nothing_is_lost() {
    let db = SharedRedisDb::get(DB_INTEROP);
    let (broker, results) = (db.url(""), db.url(""));
    let py = PyCeleryWorker::start(&broker, &results, "rb-mixed");
    let rs = WorkerProc::start(&broker, &["--result-backend", &results, "-Q", "rb-mixed", "-c", "4"]);
    let c = client(&broker, &results).await;
    const N: i64 = 300;
    let mut handles = Vec::new();
    for i in 0..N {
        handles
            .push(c.send_task("celeriac.add", vec![json!(i), json!(1000)], Map::new(), to("rb-mixed")).await.unwrap());
    }
    for (i, r) in handles.iter().enumerate() {
        assert_eq!(r.get(Some(Duration::from_secs(60))).await.unwrap(), json!(i as i64 + 1000));
    }
    let (by_python, by_celeriac) = (py.count("succeeded in"), rs.count("task succeeded"));
    println!("redis mixed queue: {N} tasks, {by_python} run by Python, {by_celeriac} by celeriac");
    assert_eq!(by_python + by_celeriac, N as usize, "each task ran once");
    assert!(by_python > 0 && by_celeriac > 0, "both workers took part");
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_of_a_sigkilled_worker_are_completed_by_another_after_the_visibility_timeout() {
    let db = SharedRedisDb::get(DB_KILL);
    let broker = db.url("visibility_timeout=2");
    let results = db.url("");
    let c = client(&broker, &results).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(send(&c, "celeriac.sleep", json!([1.5]), to("rb-kill")).await.unwrap());
    }
    let mut first = WorkerProc::start(&broker, &["--result-backend", &results, "-Q", "rb-kill", "-c", "4"]);
    first.wait_for_line("task received", Duration::from_secs(20));
    let held = c.broker().queues(&["rb-kill".into()]).await.unwrap()[0].clone();
    assert!(held.unacked >= 1, "the worker holds unacked tasks: {held:?}");
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let killed_at = Instant::now();
    let second = WorkerProc::start(&broker, &["--result-backend", &results, "-Q", "rb-kill", "-c", "4"]);
    for id in &ids {
        let meta = c.backend().wait(id, Some(Duration::from_secs(60))).await.expect("result");
        assert_eq!(meta.status, TaskState::Success, "task {id}");
    }
    let received_by_first =
        ids.iter().filter(|id| first.matching(id).iter().any(|l| l.contains("task received"))).count();
    let taken_back = ids.iter().filter(|id| second.matching(id).iter().any(|l| l.contains("task received"))).count();
    assert!(received_by_first >= 1, "the killed worker had started something");
    assert!(taken_back >= 1, "the second worker completed the killed worker's tasks");
    assert!(killed_at.elapsed() >= Duration::from_secs(1), "its tasks came back only after the lease lapsed");
    let succeeded = runs(&[&first, &second], &ids, "task succeeded");
    let duplicates: Vec<(&String, &usize)> = succeeded.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "sigkill on redis: {} tasks, {} started by the killed worker, {} run by the second, duplicates {:?}",
        ids.len(),
        received_by_first,
        taken_back,
        duplicates
    );
    // Only a task that finished in the instant between storing its result and its
    // acknowledgement can run twice: at most one per slot of the killed worker.
    assert!(duplicates.len() <= 4, "{duplicates:?}");
    assert!(succeeded.values().all(|n| *n >= 1));
    wait_until_async("the queue to be empty and nothing unacked", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let q = c.broker().queues(&["rb-kill".into()]).await.unwrap();
            (q[0].ready, q[0].unacked) == (0, 0)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eta_tasks_held_longer_than_the_visibility_timeout_run_exactly_once() {
    let db = SharedRedisDb::get(DB_ETA);
    // The workers' visibility timeout is 2 s; the countdowns are three times that.
    let broker = db.url("visibility_timeout=2");
    let plain = db.url("");
    let extra = ["--result-backend", plain.as_str(), "-Q", "rb-eta", "-c", "2"];
    let a = WorkerProc::start(&broker, &extra);
    let b = WorkerProc::start(&broker, &extra);
    let c = client(&broker, &plain).await;
    let sent = chrono::Utc::now();
    let from_rust =
        send(&c, "celeriac.add", json!([20, 1]), SendOptions { countdown: Some(6.0), ..to("rb-eta") }).await.unwrap();
    let from_python = py_client_on(
        &plain,
        &plain,
        &["send", "celeriac.add", "--args", "[20, 2]", "--countdown", "6", "--queue", "rb-eta"],
    );
    let ids = vec![from_rust.clone(), from_python.clone()];
    // Held unacknowledged, by the workers, well past the visibility timeout.
    wait_until_async("both ETA tasks to be held", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let q = c.broker().queues(&["rb-eta".into()]).await.unwrap();
            (q[0].ready, q[0].unacked) == (0, 2)
        }
    })
    .await;
    wait_until_async("three visibility timeouts to pass", Duration::from_secs(10), || async move {
        chrono::Utc::now() >= sent + chrono::Duration::milliseconds(5000)
    })
    .await;
    let q = c.broker().queues(&["rb-eta".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked), (0, 2), "still held, never restored: {q:?}");
    for (id, sum) in [(&from_rust, 21), (&from_python, 22)] {
        let meta = c.backend().wait(id, Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!((meta.status, meta.result), (TaskState::Success, json!(sum)));
        let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
        assert!(done >= sent + chrono::Duration::milliseconds(5500), "ran at {done}, sent at {sent}");
    }
    let received = runs(&[&a, &b], &ids, "task received");
    let succeeded = runs(&[&a, &b], &ids, "task succeeded");
    println!("eta on redis: received {received:?}, succeeded {succeeded:?}");
    assert!(received.values().all(|n| *n == 1), "each ETA task was delivered once: {received:?}");
    assert!(succeeded.values().all(|n| *n == 1), "each ETA task ran once: {succeeded:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn higher_priority_tasks_are_delivered_first_as_kombu_defines_it() {
    let db = SharedRedisDb::get(DB_MISC);
    let broker = db.url("");
    let c = client(&broker, &broker).await;
    // Sent lowest priority first, from both languages, before any worker runs.
    let mut sent = Vec::new();
    for p in [9u8, 6] {
        let opts = SendOptions { priority: Some(p), ..to("rb-prio") };
        sent.push((p, send(&c, "celeriac.add", json!([p, 0]), opts).await.unwrap()));
    }
    for p in [3u8, 0] {
        let id = py_client_on(
            &broker,
            &broker,
            &[
                "send",
                "celeriac.add",
                "--args",
                &format!("[{p}, 0]"),
                "--priority",
                &p.to_string(),
                "--queue",
                "rb-prio",
            ],
        );
        sent.push((p, id));
    }
    // One at a time, so the order of delivery is the order of the log.
    let w = WorkerProc::start(
        &broker,
        &["--result-backend", &broker, "-Q", "rb-prio", "-c", "1", "--prefetch-multiplier", "1"],
    );
    for (_, id) in &sent {
        c.backend().wait(id, Some(Duration::from_secs(30))).await.unwrap();
    }
    let log = w.matching("task received");
    let position = |id: &str| log.iter().position(|l| l.contains(id)).expect("received");
    let mut order: Vec<(usize, u8)> = sent.iter().map(|(p, id)| (position(id), *p)).collect();
    order.sort();
    let priorities: Vec<u8> = order.into_iter().map(|(_, p)| p).collect();
    assert_eq!(priorities, [0, 3, 6, 9], "on Redis a lower number is a higher priority");
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_purge_and_dead_letters_commands_on_redis() {
    let db = SharedRedisDb::get(DB_MISC);
    let broker = db.url("");
    let env: [(&str, &str); 0] = [];
    for _ in 0..3 {
        let (code, _, err) = run_cli(&["send", "celeriac.noop", "-Q", "rb-cli", "--broker", &broker], &env);
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, err) = run_cli(&["queues", "rb-cli", "--json", "--broker", &broker], &env);
    assert_eq!(code, 0, "{err}");
    let q: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((q[0]["name"].as_str(), q[0]["ready"].as_u64()), (Some("rb-cli"), Some(3)), "{q}");
    let (code, out, _) = run_cli(&["queues", "--json", "--broker", &broker], &env);
    assert_eq!(code, 0);
    assert!(out.contains("\"rb-cli\""), "every declared queue is listed: {out}");
    let (code, out, err) = run_cli(&["purge", "-Q", "rb-cli", "-f", "--broker", &broker], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "purged 3 messages from rb-cli");
    assert_eq!(db.cli(&["LLEN", "rb-cli"]), "0");
    let (code, out, err) = run_cli(&["dead-letters", "--json", "--broker", &broker], &env);
    assert_eq!(code, 0, "{err}");
    let dead: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(dead.iter().all(|d| d["queue"] != "rb-cli"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_under_a_consuming_worker_loses_nothing() {
    let mut server = PrivateRedis::start();
    let url = server.url(0);
    let w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", "rb-restart", "-c", "4"]);
    let c = client(&url, &url).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(send(&c, "celeriac.sleep", json!([0.1 + f64::from(i % 3) * 0.05]), to("rb-restart")).await.unwrap());
    }
    w.wait_for_line("task succeeded", Duration::from_secs(20));
    server.kill();
    // The worker notices, keeps running, and retries with backoff.
    w.wait_for_line("lost the Redis connection", Duration::from_secs(20));
    server.restart();
    for id in &ids {
        let meta = c.backend().wait(id, Some(Duration::from_secs(90))).await.expect("result after the restart");
        assert_eq!(meta.status, TaskState::Success, "task {id}");
    }
    assert!(w.count("Redis answers again") >= 1, "{}", w.dump());
    let succeeded = runs(&[&w], &ids, "task succeeded");
    let twice: Vec<_> = succeeded.iter().filter(|(_, n)| **n > 1).collect();
    println!("redis restart: {} tasks all done; run more than once: {twice:?}", ids.len());
    wait_until_async("the queue to drain", Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            let q = c.broker().queues(&["rb-restart".into()]).await.unwrap();
            (q[0].ready, q[0].unacked) == (0, 0)
        }
    })
    .await;
}

fn unreachable_attempts(e: &PublishError) -> (u32, Duration) {
    match e {
        PublishError::Unreachable { attempts, elapsed, .. } => (*attempts, *elapsed),
        other => panic!("expected Unreachable, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_to_a_closed_redis_port_fails_after_the_policy_s_attempts() {
    let c = Client::connect("redis://127.0.0.1:1/0", None).await.unwrap();
    let started = Instant::now();
    let err = send(&c, "celeriac.noop", json!([]), to("celery")).await.unwrap_err();
    let (attempts, elapsed) = unreachable_attempts(&err);
    assert_eq!(attempts, 4, "1 + max_retries 3: {err}");
    // Waits 0 + 0.2 + 0.4 s; refused connections fail at once.
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1") && text.contains("4 attempts"), "{text}");
    // The CLI: exit code 3 for an unreachable broker, for `send` and for `worker`.
    let env: [(&str, &str); 0] = [];
    let (code, _, stderr) = run_cli(&["send", "celeriac.noop", "--broker", "redis://127.0.0.1:1/0"], &env);
    assert_eq!(code, 3, "{stderr}");
    let (code, _, stderr) = run_cli(&["worker", "--broker", "redis://127.0.0.1:1/0"], &env);
    assert_eq!(code, 3, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_to_a_silent_redis_listener_fails_within_the_policy_and_never_hangs() {
    let silent = SilentListener::start();
    let url = format!("redis://127.0.0.1:{}/0?connect_timeout=0.5", silent.port);
    let policy = PublishPolicy { max_retries: 2, ..PublishPolicy::default() };
    let c = Client::connect(&url, None).await.unwrap().with_publish_policy(policy);
    let started = Instant::now();
    let err = send(&c, "celeriac.noop", json!([]), to("celery")).await.unwrap_err();
    let (attempts, _) = unreachable_attempts(&err);
    assert_eq!(attempts, 3, "{err}");
    // Bound: 3 attempts x 0.5 s connect timeout + waits 0 + 0.2 s.
    let bound = Duration::from_millis(3 * 500 + 200);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "each attempt waited for its handshake: {took:?}");
    assert!(took < bound + Duration::from_secs(3), "took {took:?}, bound {bound:?}");

    // The policy's overall timeout caps the call even with a long connect timeout.
    let url = format!("redis://127.0.0.1:{}/0?connect_timeout=5", silent.port);
    let policy = PublishPolicy { timeout: Some(Duration::from_millis(800)), ..PublishPolicy::default() };
    let c = Client::connect(&url, None).await.unwrap().with_publish_policy(policy);
    let started = Instant::now();
    let err = send(&c, "celeriac.noop", json!([]), to("celery")).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(800) + Duration::from_secs(2), "{took:?}: {err}");
    assert_eq!(unreachable_attempts(&err).0, 1, "{err}");
}

/// A `celeriac.crash` task in the prefork pool on Redis (which only says "redelivered") runs
/// exactly `limit` times, and the failure reports that number and that limit.
async fn crashing_task_runs_exactly_the_limit(limit: Option<u32>) {
    let db = SharedRedisDb::get(DB_MISC);
    let url = db.url("");
    let queue = format!("poison-{}", uuid::Uuid::new_v4().simple());
    let mut args = vec!["--result-backend", url.as_str(), "-P", "prefork", "-c", "1", "-Q", queue.as_str()];
    let text = limit.map(|n| n.to_string());
    if let Some(n) = &text {
        args.extend(["--max-deliveries", n.as_str()]);
    }
    let w = WorkerProc::start(&url, &args);
    let c = client(&url, &url).await;
    let id = send(&c, "celeriac.crash", json!([]), to(&queue)).await.unwrap();
    let limit = limit.unwrap_or(3);
    let got = py_get(&url, &url, &id);
    assert_eq!((got["state"].as_str(), got["exc_type"].as_str()), (Some("FAILURE"), Some("WorkerLostError")), "{got}");
    let message = got["exc_message"].as_str().unwrap();
    assert!(message.contains(&format!("lost its worker {limit} times (limit {limit})")), "{message}");
    assert_eq!(runs(&[&w], std::slice::from_ref(&id), "task received")[&id], limit as usize, "{}", w.dump());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_task_runs_exactly_max_deliveries_times_on_redis_at_the_default() {
    crashing_task_runs_exactly_the_limit(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_task_runs_exactly_max_deliveries_times_on_redis_with_max_deliveries_5() {
    crashing_task_runs_exactly_the_limit(Some(5)).await;
}

/// Failures store a traceback as Celery does, which Python's `AsyncResult.traceback` shows: the
/// error (and for a panic, its message and location) in both pools.
#[tokio::test(flavor = "multi_thread")]
async fn failures_store_a_traceback_that_python_reads_in_both_pools() {
    let db = SharedRedisDb::get(DB_MISC);
    let url = db.url("");
    for pool in [&[][..], &["-P", "prefork", "-c", "1"][..]] {
        let queue = format!("tb-{}", uuid::Uuid::new_v4().simple());
        let mut args = vec!["--result-backend", url.as_str(), "-Q", queue.as_str()];
        args.extend_from_slice(pool);
        let _w = WorkerProc::start(&url, &args);
        let fail = py_client_on(&url, &url, &["send", "celeriac.fail", "--args", r#"["no luck"]"#, "--queue", &queue]);
        let got = py_get(&url, &url, &fail);
        let tb = got["traceback"].as_str().unwrap_or_else(|| panic!("a traceback string ({pool:?}): {got}"));
        assert!(tb.starts_with("Traceback (most recent call last):\n"), "{tb}");
        assert!(tb.contains(&format!("celeriac.fail[{fail}]")) && tb.ends_with("RuntimeError: no luck\n"), "{tb}");

        let boom = py_client_on(&url, &url, &["send", "celeriac.panic", "--args", r#"["boom"]"#, "--queue", &queue]);
        let got = py_get(&url, &url, &boom);
        assert_eq!(got["exc_type"], json!("Panic"), "{got}");
        let tb = got["traceback"].as_str().unwrap_or_else(|| panic!("a traceback string ({pool:?}): {got}"));
        assert!(
            tb.contains("panicked at crates/celeriac/src/builtins.rs:") && tb.ends_with("Panic: boom\n"),
            "{pool:?}: {tb}"
        );
    }
}

/// A lone soft time limit tells the task and logs a warning; a task that ignores it (here one
/// blocked in a futex) keeps running, in both pools: only a hard limit stops a task.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_ignoring_a_lone_soft_time_limit_keeps_running_in_both_pools() {
    let db = SharedRedisDb::get(DB_MISC);
    let url = db.url("");
    for pool in [&[][..], &["-P", "prefork", "-c", "1"][..]] {
        let queue = format!("soft-{}", uuid::Uuid::new_v4().simple());
        let name = format!("soft-{}@testhost", uuid::Uuid::new_v4().simple());
        let mut args = vec!["-Q", queue.as_str(), "-n", name.as_str(), "--soft-time-limit", "0.5"];
        args.extend_from_slice(pool);
        let w = WorkerProc::start(&url, &args);
        w.wait_for_line("remote control ready", Duration::from_secs(30));
        let c = client(&url, &url).await;
        let id = send(&c, "celeriac.hang", json!([]), to(&queue)).await.unwrap();
        wait_until_async("the soft limit to pass", Duration::from_secs(20), || {
            let passed = w.matching(&id).iter().any(|l| l.contains("soft time limit exceeded"));
            async move { passed }
        })
        .await;
        // After the warning, the worker still lists it as running.
        let (code, out, err) = run_cli(&["--broker", &url, "inspect", "active", "-d", &name, "--json"], &[]);
        assert_eq!(code, 0, "{out}{err}");
        let active: Value = serde_json::from_str(out.trim()).unwrap();
        assert!(active[&name].as_array().unwrap().iter().any(|t| t["id"] == json!(id)), "{pool:?}: {active}");
        assert!(
            w.matching(&id).iter().all(|l| !l.contains("time limit exceeded") || l.contains("soft")),
            "{}",
            w.dump()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriac_send_to_a_silent_redis_listener_gives_up_at_the_publish_deadline() {
    let silent = SilentListener::start();
    let url = format!("redis://127.0.0.1:{}/0", silent.port);
    // The default deadline is 5 s (it was 20.6 s: four attempts of the 5 s connect timeout).
    common::send_gives_up_at_the_publish_deadline(&url);
}
