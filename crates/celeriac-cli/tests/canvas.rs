//! Celery's canvas carried out by celeriac workers, driven by a real Python Celery 5.7 client
//! (`tests/interop/canvas_client.py`): chain, link and link_error, a chain that fails halfway,
//! group, chord (and a chord whose header fails), nesting, and mixed fleets where the steps of
//! one chain and the header tasks of one chord run on Python and celeriac workers together.
//! Every result is read back by Python.
//!
//! On the Redis broker (async pool) and on RabbitMQ (prefork pool), both with the Redis result
//! backend (database 4 of the binary's own `redis-server`; each test has its own queues).

mod common;

use common::{repo, venv_python, PyCeleryWorker, SharedRedisDb, TestVhost, WorkerProc};
use serde_json::Value;
use std::process::Command;

const DB: u32 = 4;

/// Run one case of `canvas_client.py`; returns its checks after asserting each one.
fn case(broker: &str, backend: &str, case: &str, queue: &str, py_queue: Option<&str>) -> Value {
    case_with(broker, backend, case, queue, py_queue, &[])
}

fn case_with(broker: &str, backend: &str, case: &str, queue: &str, py_queue: Option<&str>, extra: &[&str]) -> Value {
    let mut cmd = Command::new(venv_python());
    cmd.arg(repo().join("tests/interop/canvas_client.py")).args([case, "--queue", queue, "--timeout", "60"]);
    if let Some(q) = py_queue {
        cmd.args(["--py-queue", q]);
    }
    cmd.args(extra);
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
    line
}

/// Every case that needs only celeriac workers.
const CELERIAC_CASES: &[&str] = &[
    "chain3",
    "link",
    "link_error",
    "errback_chain",
    "unregistered",
    "group100",
    "chord100",
    "chord_fail",
    "nested",
    "group_of_chains",
    "builtins",
];

#[test]
fn python_canvas_runs_on_celeriac_workers_redis_broker_async_pool() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let queue = "canvas-redis";
    let w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", queue, "-c", "4"]);
    for c in CELERIAC_CASES {
        let ran = std::panic::catch_unwind(|| case(&url, &url, c, queue, None));
        if let Err(e) = ran {
            let log = w.dump();
            let tail: Vec<&str> = log.lines().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("{:?}; the worker's log ends:\n{}", e.downcast_ref::<String>(), tail.join("\n"));
        }
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

/// A continuation that reads well but cannot be applied (an option of the wrong type, alone and
/// inside a group): a FAILURE is stored on every id it names, its own and its members', with one
/// log line each; the task itself still runs and stores its result.
#[tokio::test]
async fn a_continuation_that_cannot_be_applied_is_failed_on_every_id_it_names() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let queue = "canvas-unappliable";
    let w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", queue, "-c", "1"]);
    let client = celeriac::Client::connect(&url, Some(&url)).await.unwrap();
    let lone = r#"{"task": "celeriac.echo", "options": {"task_id": "cv-unapp-1", "countdown": "soon"}}"#;
    let member = r#"{"task": "celeriac.echo", "options": {"task_id": "cv-unapp-3", "countdown": "later"}}"#;
    let group = format!(
        r#"{{"task": "celery.group", "subtask_type": "group", "kwargs": {{"tasks": [{member}]}}, "options": {{"task_id": "cv-unapp-2"}}}}"#
    );
    let embed = format!(r#"{{"callbacks": [{group}, {lone}]}}"#);
    let message = with_embed(&client, queue, "cv-unapp", "cv-unapp", &embed);
    client.broker().publish(queue, &message).await.unwrap();
    let value = client.result("cv-unapp").get(Some(std::time::Duration::from_secs(30))).await.unwrap();
    assert_eq!(value, Value::from("cv-unapp"), "the task itself ran");
    for id in ["cv-unapp-1", "cv-unapp-2", "cv-unapp-3"] {
        let meta = client.result(id).get(Some(std::time::Duration::from_secs(30))).await;
        let err = meta.expect_err("a FAILURE, not a value").to_string();
        assert!(err.contains("cannot be applied") && err.contains("countdown"), "{id}: {err}");
    }
    let lines = w.matching("continuation cannot be applied");
    assert_eq!(lines.len(), 2, "one line per refused continuation: {lines:?}");
    assert!(lines.iter().all(|l| l.contains("cv-unapp")), "each names the task: {lines:?}");
}

/// A chord whose header tasks run on a worker without a result backend: the body cannot run, and
/// it is failed once (its errback sent once, one error line), not once per header task.
#[tokio::test]
async fn a_chord_without_a_result_backend_fails_its_body_once() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let queue = "canvas-nobackend";
    let w = WorkerProc::start(&url, &["--result-backend", "disabled://", "-Q", queue, "-c", "1"]);
    let client = celeriac::Client::connect(&url, None).await.unwrap();
    let errback = format!(
        r#"{{"task": "celeriac.echo", "args": ["errback"], "immutable": true, "options": {{"task_id": "cv-nb-errback", "queue": "{queue}"}}}}"#
    );
    let body = format!(
        r#"{{"task": "celeriac.tsum", "options": {{"task_id": "cv-nb-body", "queue": "{queue}", "link_error": [{errback}]}}}}"#
    );
    for i in 0..4 {
        let id = format!("cv-nb-header-{i}");
        let mut message = with_embed(&client, queue, &id, &id, &format!(r#"{{"chord": {body}}}"#));
        message.headers.insert("group".into(), Value::from("cv-nb-group"));
        message.headers.insert("group_index".into(), Value::from(i));
        client.broker().publish(queue, &message).await.unwrap();
    }
    // Every header task settled (acknowledged, so whatever it sent is out), then nothing left
    // in the queue or in flight: every errback sent has run.
    let settled = || async {
        let q = &client.broker().queues(&[queue.to_string()]).await.unwrap()[0];
        q.ready == 0 && q.unacked == 0
    };
    common::wait_until_async(
        "the header tasks and what they sent to run",
        std::time::Duration::from_secs(30),
        || async {
            let ran = succeeded_ids(&w);
            (0..4).all(|i| ran.contains_key(&format!("cv-nb-header-{i}")))
                && ran.contains_key("cv-nb-errback")
                && settled().await
        },
    )
    .await;
    let ran = succeeded_ids(&w);
    for i in 0..4 {
        assert_eq!(ran.get(&format!("cv-nb-header-{i}")), Some(&1), "header {i}: {}", w.dump());
    }
    assert_eq!(ran.get("cv-nb-errback"), Some(&1), "the body's errback ran once: {}", w.dump());
    assert_eq!(w.count("chord header task on a backend without chords"), 1, "{}", w.dump());
}

/// A callback that names no queue goes to the default queue; a worker that does not consume it
/// says so once, with the flag that fixes it.
#[tokio::test]
async fn a_continuation_to_an_unconsumed_default_queue_is_reported_once() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let queue = "canvas-dq";
    let w = WorkerProc::start(
        &url,
        &["--result-backend", &url, "-Q", queue, "-c", "1", "--default-queue", "canvas-dq-default"],
    );
    let client = celeriac::Client::connect(&url, Some(&url)).await.unwrap();
    for id in ["cv-dq-1", "cv-dq-2"] {
        let embed = format!(r#"{{"callbacks": [{{"task": "celeriac.echo", "options": {{"task_id": "{id}-cb"}}}}]}}"#);
        client.broker().publish(queue, &with_embed(&client, queue, id, id, &embed)).await.unwrap();
        client.result(id).get(Some(std::time::Duration::from_secs(30))).await.unwrap();
    }
    let depth = client.broker().queues(&["canvas-dq-default".to_string()]).await.unwrap()[0].ready;
    assert_eq!(depth, 2, "both callbacks on the default queue");
    assert_eq!(w.count("--default-queue"), 1, "{}", w.dump());
    client.broker().purge("canvas-dq-default").await.unwrap();
}

/// The ids of the tasks `w` logged as succeeded (from the `task{id=...}` span of each line).
fn succeeded_ids(w: &WorkerProc) -> std::collections::HashMap<String, usize> {
    let mut ids = std::collections::HashMap::new();
    for line in w.matching("task succeeded") {
        if let Some(id) = line.split("task{id=").nth(1).and_then(|rest| rest.split([' ', '}']).next()) {
            *ids.entry(id.to_string()).or_default() += 1;
        }
    }
    ids
}

/// Item 3 of the issue: a chord's body runs once, and not early, when header tasks run twice.
/// A worker is SIGKILLed while the header runs; on RabbitMQ its acknowledgements are batched, so
/// header tasks whose results (and chord parts) were stored but not yet acknowledged are
/// delivered again to a second worker and run a second time. The body must run exactly once,
/// with every part. The scenario is repeated (a new chord) until a kill caught at least one
/// header task stored and unacknowledged, so the test never passes without exercising it.
#[tokio::test]
async fn a_chord_body_runs_once_when_its_header_tasks_run_twice_after_a_sigkill() {
    use celeriac::canvas::chord;
    use celeriac::Signature;
    use std::time::Duration;
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let backend = SharedRedisDb::get(DB).url("");
    let queue = "canvas-kill";
    let client = celeriac::Client::connect(&broker, Some(&backend)).await.unwrap();
    let args = ["--result-backend", backend.as_str(), "-Q", queue, "-c", "8"];
    let parts = 1000i64;
    for attempt in 1..=5 {
        let mut first = WorkerProc::start(&broker, &args);
        let header = (0..parts).map(|i| Signature::new("celeriac.add").arg(i).arg(i).queue(queue));
        let sent = chord(header, Signature::new("celeriac.tsum").queue(queue)).apply_async(&client).await.unwrap();
        let celeriac::canvas::ResultHandle::Task(body) = &sent else { panic!("a chord's result is its body's") };
        let header_ids: Vec<String> = match body.parent() {
            Some(celeriac::canvas::ResultHandle::Group(g)) => g.results.iter().map(|r| r.id().to_string()).collect(),
            other => panic!("the body's parent is the header group: {other:?}"),
        };
        // Kill once a third of the header has run.
        common::wait_until("a third of the header to have run", Duration::from_secs(60), || {
            first.count("task succeeded") >= parts as usize / 3
        });
        first.signal("KILL");
        first.wait_exit(Duration::from_secs(10));
        let second = WorkerProc::start(&broker, &args);
        let total = body.get(Some(Duration::from_secs(120))).await.expect("the body's result");
        assert_eq!(total, Value::from(parts * (parts - 1)), "the body ran with every part");
        // Wait until nothing is left to run, then count.
        common::wait_until("the queue to be drained and acknowledged", Duration::from_secs(60), || {
            vhost.list("list_queues", &["name", "messages"]).iter().any(|l| l.split_whitespace().eq([queue, "0"]))
        });
        let (a, b) = (succeeded_ids(&first), succeeded_ids(&second));
        let runs = |id: &str| a.get(id).copied().unwrap_or(0) + b.get(id).copied().unwrap_or(0);
        assert_eq!(runs(body.id()), 1, "the body ran once (attempt {attempt})");
        assert!(header_ids.iter().all(|id| runs(id) > 0), "every header task ran");
        let twice = header_ids.iter().filter(|id| runs(id) > 1).count();
        if twice > 0 {
            eprintln!("attempt {attempt}: {twice} header tasks ran twice; the body ran once");
            return;
        }
        eprintln!("attempt {attempt}: the kill caught no stored, unacknowledged header task; again");
    }
    panic!("in 5 attempts no header task ran twice: the scenario was never exercised");
}

/// Group results saved by one side are restored by the other (`celery-taskset-meta-<id>`):
/// celeriac's `GroupResult::save` read by Python's `GroupResult.restore(...).get()`, and a
/// group Python saved read by `Client::restore_group`.
#[tokio::test]
async fn saved_groups_restore_on_both_sides() {
    use celeriac::canvas::group;
    use celeriac::Signature;
    let url = SharedRedisDb::get(DB).url("");
    let queue = "canvas-saved";
    let _w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", queue, "-c", "2"]);
    let client = celeriac::Client::connect(&url, Some(&url)).await.unwrap();
    let sent = group((0..5).map(|i| Signature::new("celeriac.add").arg(i).arg(i).queue(queue)))
        .apply_async(&client)
        .await
        .unwrap();
    let g = sent.as_group().expect("a group");
    g.get(Some(std::time::Duration::from_secs(30))).await.unwrap();
    g.save(&client).await.unwrap();
    case_with(&url, &url, "restore_group", queue, None, &["--group-id", &g.id]);

    let line = case(&url, &url, "save_group", queue, None);
    let gid = line["checks"]["id"]["got"].as_str().expect("the saved group's id").to_string();
    let restored = client.restore_group(&gid).await.unwrap().expect("the group Python saved");
    assert_eq!(restored.id, gid);
    let values = restored.get(Some(std::time::Duration::from_secs(30))).await.unwrap();
    assert_eq!(values, (0..5).map(|i| Value::from(2 * i)).collect::<Vec<_>>());
    assert!(client.restore_group("no-such-group").await.unwrap().is_none());
    // `celeriac result` on a saved group's id shows the group and its members' states.
    let (code, out, err) = common::run_cli(&["result", &gid, "--broker", &url, "--result-backend", &url], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("GROUP (saved) of 5 results"), "{out}");
    assert_eq!(out.matches(": SUCCESS").count(), 5, "{out}");
    let (_, out, _) = common::run_cli(&["result", "no-such-group", "--broker", &url, "--result-backend", &url], &[]);
    assert_eq!(out.trim(), "PENDING");
}
