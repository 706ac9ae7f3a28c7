//! Celery's task semantics for Python tasks run by `celeriac worker --python-app`
//! (`tests/pyapp/pyapp.py`): `acks_late` and `reject_on_worker_lost` when a child dies, `Ignore`,
//! `Reject`, `update_state`, `ignore_result`, events and metrics, and workflows (chain, link,
//! link_error, group, chord, `self.request.chain = None`, `self.replace`); the settling and the
//! workflows compared with a real Celery worker of the same app. Real RabbitMQ (a vhost per test), real Redis (database 1: results and the
//! tasks' own data), real Python children.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pyapp::{python_worker, run_client, CeleryWorker};
use common::{bin, free_port, http_get, run_cli, wait_until, SharedRedisDb, TestVhost, WorkerProc};
use serde_json::{json, Value};

/// This binary's Redis database.
const DB: u32 = 1;

/// Send `task(*args)` to `queue` with the CLI; its id.
fn send(broker: &str, queue: &str, task: &str, args: Value) -> String {
    let args = args.to_string();
    let (code, out, err) = run_cli(&["send", "--broker", broker, "-Q", queue, task, "--args", &args], &[]);
    assert_eq!(code, 0, "send {task}: {err}");
    out.trim().to_string()
}

/// The stored meta of `id`, if any.
fn meta(db: &SharedRedisDb, id: &str) -> Option<Value> {
    let text = db.cli(&["GET", &format!("celery-task-meta-{id}")]);
    (!text.is_empty()).then(|| serde_json::from_str(&text).expect("a stored meta is JSON"))
}

/// Wait until `id`'s stored state is `state`; its meta.
fn wait_state(db: &SharedRedisDb, w: &WorkerProc, id: &str, state: &str) -> Value {
    wait_until(&format!("{id} to be {state}; worker log:\n{}", w.dump()), Duration::from_secs(60), || {
        meta(db, id).is_some_and(|m| m["status"] == state)
    });
    meta(db, id).unwrap()
}

/// A counter the tasks keep in the data Redis.
fn count(db: &SharedRedisDb, key: &str) -> i64 {
    db.cli(&["GET", key]).parse().unwrap_or(0)
}

/// (ready, unacknowledged) messages of `queue` in the vhost.
fn queue_depth(vhost: &TestVhost, queue: &str) -> (u64, u64) {
    vhost
        .list("list_queues", &["name", "messages_ready", "messages_unacknowledged"])
        .iter()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            [name, ready, unacked] if *name == queue => Some((ready.parse().ok()?, unacked.parse().ok()?)),
            _ => None,
        })
        .unwrap_or((0, 0))
}

/// A unique key for the tasks' data.
fn key(name: &str) -> String {
    format!("pysem-{name}-{}", uuid::Uuid::new_v4().simple())
}

/// `acks_late`/`reject_on_worker_lost` as Celery's worker acts on them when the child dies
/// (`celery/worker/request.py` `on_failure`): requeued (within the poison guard) only with both,
/// FAILURE `WorkerLostError` after one run otherwise; a task that is not acks_late is
/// acknowledged before it runs, an acks_late one only after.
#[test]
fn a_dying_python_task_is_settled_by_its_acks_late_and_reject_on_worker_lost() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let queue = "pysem.acks";
    let w = python_worker(&broker, &backend, queue, &["-c", "1", "-n", "pysem-acks@%h"]);
    // Dies on its first run, succeeds on the redelivery.
    let (k1, k2, k3, k4) = (key("requeue-once"), key("requeue-always"), key("late"), key("early"));
    let once = send(&broker, queue, "pyapp.die_requeue", json!([k1, 2]));
    let m = wait_state(&db, &w, &once, "SUCCESS");
    assert_eq!((m["result"].as_i64(), count(&db, &k1)), (Some(2), 2), "{m}");
    // Dies every time: the poison guard stops it after --max-deliveries (3) runs.
    let always = send(&broker, queue, "pyapp.die_requeue", json!([k2, 100]));
    let m = wait_state(&db, &w, &always, "FAILURE");
    assert_eq!(m["result"]["exc_type"], "WorkerLostError", "{m}");
    assert_eq!(count(&db, &k2), 3);
    // acks_late without reject_on_worker_lost, and not acks_late: FAILURE after the one run.
    for (task, k) in [("pyapp.die_late", &k3), ("pyapp.die_early", &k4)] {
        let id = send(&broker, queue, task, json!([k, 100]));
        let m = wait_state(&db, &w, &id, "FAILURE");
        assert_eq!(m["result"]["exc_type"], "WorkerLostError", "{task}: {m}");
        assert!(m["result"]["exc_message"].to_string().contains("Worker exited prematurely"), "{task}: {m}");
        assert_eq!(count(&db, k), 1, "{task} ran once");
    }
    assert!(w.count("is not acks_late with reject_on_worker_lost") >= 2, "{}", w.dump());

    // Not acks_late: acknowledged while it still runs (blocked until the test pushes).
    let k5 = key("block-early");
    let early = send(&broker, queue, "pyapp.block_early", json!([k5]));
    wait_until("the running task's message to be acknowledged", Duration::from_secs(30), || {
        queue_depth(&vhost, queue) == (0, 0)
    });
    db.cli(&["RPUSH", &k5, "go"]);
    assert_eq!(wait_state(&db, &w, &early, "SUCCESS")["result"], true);
    // acks_late: unacknowledged while it runs, acknowledged after.
    let k6 = key("block-late");
    let late = send(&broker, queue, "pyapp.block_late", json!([k6]));
    wait_until("the acks_late task to start", Duration::from_secs(30), || {
        w.matching(&late).iter().any(|l| l.contains("task received"))
    });
    assert_eq!(queue_depth(&vhost, queue), (0, 1), "held unacknowledged while it runs");
    db.cli(&["RPUSH", &k6, "go"]);
    assert_eq!(wait_state(&db, &w, &late, "SUCCESS")["result"], true);
    wait_until("the acks_late task's message to be acknowledged", Duration::from_secs(30), || {
        queue_depth(&vhost, queue) == (0, 0)
    });
    // Every counter as it was: nothing ran again after its outcome.
    assert_eq!([count(&db, &k1), count(&db, &k2), count(&db, &k3), count(&db, &k4)], [2, 3, 1, 1]);
}

/// `Ignore` stores nothing (a custom state stored before it stays), `Reject(requeue=True)`
/// runs again, `Reject(requeue=False)` is a FAILURE and is not run again, `update_state` and
/// `track_started`'s STARTED are seen while the task runs, `ignore_result=True` stores nothing,
/// not even a FAILURE unless `store_errors_even_if_ignored` (as Celery's worker, which stores
/// nothing for such a task); checked once the worker stopped.
#[test]
fn ignore_reject_update_state_and_ignore_result_are_celerys() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let queue = "pysem.control";
    let mut w = python_worker(&broker, &backend, queue, &["-c", "1", "-n", "pysem-control@%h"]);
    let (kp, kq, kr1, kr2) = (key("progress"), key("quiet"), key("reject-requeue"), key("reject-drop"));
    let progress = send(&broker, queue, "pyapp.progress", json!([kp]));
    let m = wait_state(&db, &w, &progress, "PROGRESS");
    assert_eq!(m["result"], json!({"step": 1}));
    db.cli(&["RPUSH", &kp, "go"]);
    assert_eq!(wait_state(&db, &w, &progress, "SUCCESS")["result"], true);
    // track_started: STARTED with the child's pid and the worker's name while it runs.
    let kt = key("tracked");
    let tracked = send(&broker, queue, "pyapp.tracked", json!([kt]));
    let m = wait_state(&db, &w, &tracked, "STARTED");
    assert!(m["result"]["pid"].as_u64().is_some_and(|p| p != u64::from(w.child.id())), "{m}");
    assert!(m["result"]["hostname"].as_str().is_some_and(|h| h.starts_with("pysem-control@")), "{m}");
    db.cli(&["RPUSH", &kt, "go"]);
    assert_eq!(wait_state(&db, &w, &tracked, "SUCCESS")["result"], true);

    let requeued = send(&broker, queue, "pyapp.rejected", json!([kr1, true]));
    assert_eq!(wait_state(&db, &w, &requeued, "SUCCESS")["result"], 2, "ran again after its Reject");
    let dropped = send(&broker, queue, "pyapp.rejected", json!([kr2, false]));
    let m = wait_state(&db, &w, &dropped, "FAILURE");
    assert_eq!((&m["result"]["exc_type"], &m["result"]["exc_module"]), (&json!("Reject"), &json!("celery.exceptions")));
    let ignored = send(&broker, queue, "pyapp.ignored", json!([]));
    let quiet = send(&broker, queue, "pyapp.quiet", json!([kq]));
    // The message's say overrides the task's (Celery 5.7's get_actual_ignore_result).
    let kept_by_message = key("quiet-kept-by-message");
    let args = json!([kept_by_message]).to_string();
    let send_kept =
        ["send", "--broker", &broker, "-Q", queue, "pyapp.quiet", "--args", &args, "--ignore-result", "false"];
    let (code, out, err) = run_cli(&send_kept, &[]);
    assert_eq!(code, 0, "{err}");
    let stored = wait_state(&db, &w, out.trim(), "SUCCESS");
    assert_eq!(stored["result"], json!("not stored"), "stored as the message asked: {stored}");
    // ignore_result tasks that fail: nothing stored (Celery's store_errors), unless
    // store_errors_even_if_ignored.
    let (kf, kk) = (key("quiet-fail"), key("quiet-fail-kept"));
    let quiet_fail = send(&broker, queue, "pyapp.quiet_fail", json!([kf]));
    let quiet_kept = send(&broker, queue, "pyapp.quiet_fail_kept", json!([kk]));
    let m = wait_state(&db, &w, &quiet_kept, "FAILURE");
    assert_eq!(m["result"]["exc_type"], "ValueError", "{m}");
    wait_until("the ignore_result tasks to run", Duration::from_secs(30), || {
        [&kq, &kf].iter().all(|k| db.cli(&["LLEN", k]) == "1")
    });
    // Everything settled: a warm shutdown waits for it.
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success(), "{}", w.dump());
    assert_eq!(meta(&db, &ignored).map(|m| m["status"].clone()), Some(json!("PROGRESS")), "only its own update_state");
    assert!(w.matching(&ignored).iter().any(|l| l.contains("task ignored")), "{}", w.dump());
    assert_eq!(meta(&db, &quiet), None, "ignore_result stores nothing");
    assert_eq!(meta(&db, &quiet_fail), None, "nor its FAILURE: {}", w.dump());
    assert!(w.matching(&quiet_fail).iter().any(|l| l.contains("task failed")), "{}", w.dump());
    assert_eq!((count(&db, &kr1), count(&db, &kr2)), (2, 1), "Reject(requeue=False) is not run again");
    assert_eq!(queue_depth(&vhost, queue), (0, 0));
}

/// Metric value of a line `name{labels} value`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// With `-E`, Python tasks' events name the task and its id as a Rust task's do (read with
/// `celeriac events --json`), and the Prometheus counters count them by name.
#[test]
fn python_tasks_are_in_events_and_metrics() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let queue = "pysem.events";
    let mut tail = Command::new(bin())
        .args(["events", "--json", "--broker", &broker])
        .env_remove("CELERIAC_BROKER_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("celeriac events");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let sink = lines.clone();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&l) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = python_worker(&broker, &backend, queue, &["-c", "1", "-E", "-n", "pysem-ev@%h", "--metrics-addr", &addr]);
    wait_until("the tail to see the worker", Duration::from_secs(30), || {
        lines.lock().unwrap().iter().any(|e| e["hostname"].as_str().is_some_and(|h| h.starts_with("pysem-ev@")))
    });
    let got = run_client(&broker, &backend, queue, &["add", "fail", "retry_twice"]);
    let id = |case: &str| got[case]["id"].as_str().unwrap().to_string();
    let kinds = |id: &str| -> Vec<String> {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["uuid"] == id)
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    };
    let (add, fail, retry) = (id("add"), id("fail"), id("retry_twice"));
    // Every event of a task, in any order: a retry's own events may come before the
    // task-retried of the run that sent it.
    let wait_kinds = |id: &str, want: &[&str]| {
        let sorted = |mut v: Vec<String>| {
            v.sort_unstable();
            v
        };
        let want = sorted(want.iter().map(|k| k.to_string()).collect());
        wait_until(
            &format!("the events of {id} {want:?}; got {:?}\n{}", kinds(id), w.dump()),
            Duration::from_secs(30),
            || sorted(kinds(id)) == want,
        );
    };
    wait_kinds(&add, &["task-received", "task-started", "task-succeeded"]);
    wait_kinds(&fail, &["task-received", "task-started", "task-failed"]);
    let retried = ["task-received", "task-started", "task-retried"];
    let all: Vec<&str> =
        retried.iter().chain(&retried).chain(&["task-received", "task-started", "task-succeeded"]).copied().collect();
    wait_kinds(&retry, &all);
    // A task that rejects its message (Reject(requeue=True)): task-rejected, then its rerun.
    let rejected = send(&broker, queue, "pyapp.rejected", json!([key("events-reject"), true]));
    let rerun = ["task-received", "task-started", "task-rejected", "task-received", "task-started", "task-succeeded"];
    wait_kinds(&rejected, &rerun);
    let ev =
        lines.lock().unwrap().iter().find(|e| e["uuid"] == rejected.as_str() && e["type"] == "task-rejected").cloned();
    assert_eq!(ev.map(|e| e["requeue"].clone()), Some(json!(true)));
    let received = lines
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["uuid"] == add.as_str() && e["type"] == "task-received")
        .cloned()
        .unwrap();
    assert_eq!((&received["name"], &received["args"]), (&json!("pyapp.add"), &json!("(2, 3)")), "{received}");
    let failed = lines
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["uuid"] == fail.as_str() && e["type"] == "task-failed")
        .cloned()
        .unwrap();
    assert!(failed["exception"].as_str().unwrap().contains("ValueError"), "{failed}");

    let (status, text) = http_get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(status, 200);
    let series = |task: &str, state: &str| format!("celeriac_tasks_total{{task=\"{task}\",state=\"{state}\"}}");
    assert_eq!(metric(&text, &series("pyapp.add", "SUCCESS")), 1.0, "{text}");
    assert_eq!(metric(&text, &series("pyapp.fail", "FAILURE")), 1.0, "{text}");
    assert_eq!(metric(&text, &series("pyapp.retry_twice", "RETRY")), 2.0, "{text}");
    assert_eq!(metric(&text, &series("pyapp.retry_twice", "SUCCESS")), 1.0, "{text}");
    let _ = tail.kill();
    let _ = tail.wait();
}

/// Workflows of Python tasks carried out by one celeriac `--python-app` worker give what a
/// Celery worker of the same app gives: a chain of three, a link and a link_error callback, a
/// group, a chord, a chain stopped by `self.request.chain = None`, and `self.replace`.
#[test]
fn python_workflows_give_what_a_celery_worker_gives() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let flows = [
        "chain",
        "link",
        "link_error",
        "group",
        "chord",
        "stop_chain",
        "replaced",
        "replaced_in_chain",
        "replaced_by_group",
    ];
    let ours = {
        let queue = "pysem.canvas.celeriac";
        // Continuations naming no queue go to the app's default queue (`task_default_queue`).
        let w =
            python_worker(&broker, &backend, queue, &["-c", "1", "-n", "pysem-canvas@%h", "--default-queue", queue]);
        let got = run_client(&broker, &backend, queue, &flows);
        for flow in flows {
            assert!(got[flow].get("error").is_none(), "{flow}: {}\n{}", got[flow], w.dump());
        }
        assert!(w.count("request.chain = None") >= 1, "{got:?}\n{}", w.dump());
        got
    };
    let expected = json!({
        "chain": {"value": [3, 6, 10]},
        "link": {"value": [4, 40]},
        "link_error": {"value": ["FAILURE", "errback for a 36-character id"]},
        "group": {"value": [0, 2, 4, 6]},
        "chord": {"value": 12},
        "stop_chain": {"value": [2, 0, "PENDING"]},
        "replaced": {"value": 101},
        "replaced_in_chain": {"value": 102},
        // Replaced by a group: Celery makes it a chord whose body is celery.accumulate.
        "replaced_by_group": {"value": [0, 2, 4]},
    });
    assert_eq!(Value::Object(ours), expected);
    let theirs = {
        let queue = "pysem.canvas.celery";
        let _w = CeleryWorker::start(&broker, &backend, queue);
        run_client(&broker, &backend, queue, &flows)
    };
    assert_eq!(Value::Object(theirs), expected, "a Celery worker gives the same");
}

/// What a dying task (`acks_late`, `reject_on_worker_lost`, Celery 5.7's `retry_on_worker_lost`),
/// `Reject`, and an `acks_late` task killed at its hard time limit (`acks_on_timeout` or not)
/// leave, side by side with a real Celery worker of the same app: state, result and how many
/// times the task ran.
#[test]
fn python_tasks_are_settled_as_a_celery_worker_settles_them() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let cases = [
        "die_early",
        "die_late",
        "die_requeue_once",
        "die_retry_once",
        "die_retry",
        "reject_requeue",
        "reject_drop",
        "timeout_late",
        "timeout_requeue",
    ];
    let expected = json!({
        "die_early": {"value": ["FAILURE", "WorkerLostError", 1]},
        "die_late": {"value": ["FAILURE", "WorkerLostError", 1]},
        "die_requeue_once": {"value": ["SUCCESS", 2, 2]},
        // retry_on_worker_lost, max_retries=1: retried once, then FAILURE.
        "die_retry_once": {"value": ["SUCCESS", 2, 2]},
        "die_retry": {"value": ["FAILURE", "WorkerLostError", 2]},
        "reject_requeue": {"value": ["SUCCESS", 2, 2]},
        "reject_drop": {"value": ["FAILURE", "Reject", 1]},
        // Killed at its hard limit (acks_late): acknowledged after its FAILURE, stored with no
        // traceback; not acks_on_timeout (acks_on_failure_or_timeout=False): requeued, run again.
        "timeout_late": {"value": ["FAILURE", "TimeLimitExceeded", 1, true]},
        "timeout_requeue": {"value": ["SUCCESS", 2, 2, true]},
    });
    {
        let queue = "pysem.settle.celeriac";
        let w = python_worker(&broker, &backend, queue, &["-c", "2", "-n", "pysem-settle@%h"]);
        let got = run_client(&broker, &backend, queue, &cases);
        assert_eq!(Value::Object(got), expected, "{}", w.dump());
    }
    let queue = "pysem.settle.celery";
    let _w = CeleryWorker::start(&broker, &backend, queue);
    assert_eq!(Value::Object(run_client(&broker, &backend, queue, &cases)), expected, "a Celery worker gives the same");
}

/// An `acks_late` task with `acks_on_failure=False`: its FAILURE is stored and its message
/// rejected without requeue, so RabbitMQ dead-letters it (the queue's dead-letter exchange, set
/// by a policy); a failure of a task acknowledged as usual is not.
#[test]
fn a_failure_not_acks_on_failure_is_rejected_to_the_dead_letter_exchange() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let queue = "pysem.dlx";
    let policy = r#"{"dead-letter-exchange":"pysem.dead"}"#;
    let ok = Command::new("rabbitmqctl")
        .args(["set_policy", "-p", &vhost.name, "pysem-dlx", r"^pysem\.dlx$", policy, "--apply-to", "queues"])
        .status()
        .expect("rabbitmqctl");
    assert!(ok.success());
    let declare = "import sys\nfrom kombu import Connection, Exchange, Queue\nwith Connection(sys.argv[1]) as c:\n    \
                   Queue('pysem.dead', Exchange('pysem.dead', type='fanout'))(c.default_channel).declare()\n";
    let ok = Command::new(common::venv_python()).args(["-c", declare, &broker]).status().expect("python");
    assert!(ok.success());
    let mut w = python_worker(&broker, &backend, queue, &["-c", "1", "-n", "pysem-dlx@%h"]);
    let rejected = send(&broker, queue, "pyapp.fail_rejected", json!(["no"]));
    let acked = send(&broker, queue, "pyapp.fail", json!(["no"]));
    for id in [&rejected, &acked] {
        assert_eq!(wait_state(&db, &w, id, "FAILURE")["result"]["exc_type"], "ValueError");
    }
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success(), "{}", w.dump());
    assert_eq!(queue_depth(&vhost, queue), (0, 0));
    assert_eq!(queue_depth(&vhost, "pysem.dead"), (1, 0), "only the rejected one is dead-lettered");
}

/// What Celery's remote control shows of a `--python-app` worker, side by side with a Celery
/// worker of the same app: `inspect active` gives the exchange and routing key the message was
/// sent with (here an exchange bound to the queue, not the default one), and `inspect registered` lists
/// no `celery.*` task unless asked for Celery's builtins, then those celeriac runs. And
/// `celeriac inspect` takes its broker from the app, as `celery -A pyapp inspect` does, when
/// given `--python-app` and no `--broker`.
#[test]
fn remote_control_shows_a_python_worker_as_celery_s_shows_its_own() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), db.url(""));
    let host = |q: &str| format!("{q}@{}", common::hostname());
    let ask = |queue: &str, node: &str, k: &str| {
        let env = common::pyapp::app_env(&broker, &backend, queue);
        common::pyapp::run_script("inspectclient.py", &[queue, node, k], &env)
    };
    let (q1, q2) = ("pysem.inspect.celeriac", "pysem.inspect.celery");
    let (k1, k2) = (key("inspect-celeriac"), key("inspect-celery"));
    let w = python_worker(&broker, &backend, q1, &["-c", "1", "-n", "pysem-inspect@%h"]);
    let ours = ask(q1, &host("pysem-inspect"), &k1);
    // `celeriac inspect --python-app`: the broker is the app's (PYAPP_BROKER), no --broker given.
    let python = common::venv_python();
    let env = common::pyapp::app_env(&broker, &backend, q1);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let node = host("pysem-inspect");
    let args = ["inspect", "active", "--json", "-d", &node, "--python-app", "pyapp:app", "--python"];
    let mut args = args.to_vec();
    args.push(python.to_str().unwrap());
    let (code, out, err) = run_cli(&args, &env);
    assert_eq!(code, 0, "{out}{err}");
    let id = ours["id"].as_str().unwrap();
    assert!(out.contains(id), "celeriac inspect --python-app finds the running task: {out}{err}");
    // Released at once: its BLPOP fails with a socket timeout after about 5 s in a child.
    db.cli(&["RPUSH", &k1, "go"]);
    assert_eq!(wait_state(&db, &w, id, "SUCCESS")["result"], true);
    let theirs = {
        let _celery = CeleryWorker::start(&broker, &backend, q2);
        let theirs = ask(q2, &host(&format!("pyapp-{q2}")), &k2);
        db.cli(&["RPUSH", &k2, "go"]);
        theirs
    };
    // The route of the message, as Celery's worker shows its own.
    assert_eq!(theirs["delivery_info"]["exchange"], format!("{q2}.x"), "{theirs:?}");
    assert_eq!(theirs["delivery_info"]["routing_key"], q2, "{theirs:?}");
    assert_eq!(ours["delivery_info"]["exchange"], format!("{q1}.x"), "{ours:?}");
    assert_eq!(ours["delivery_info"]["routing_key"], q1, "{ours:?}");
    // registered: the same list; with builtins, Celery's less the five celeriac does not run
    // (see celeriac-worker's builtins.rs).
    assert_eq!(ours["registered"], theirs["registered"]);
    assert!(ours["registered"].as_array().is_some_and(|r| r.iter().any(|t| t == "pyapp.add")), "{ours:?}");
    let not_run = ["celery.backend_cleanup", "celery.chain", "celery.chord", "celery.chord_unlock", "celery.group"];
    let expected: Vec<&Value> =
        theirs["builtins"].as_array().unwrap().iter().filter(|t| !not_run.iter().any(|n| *t == n)).collect();
    assert_eq!(ours["builtins"].as_array().unwrap().iter().collect::<Vec<_>>(), expected);
    assert!(expected.iter().any(|t| *t == "celery.chunks"), "{theirs:?}");
}

/// With Celery's RPC result backend (`rpc://`), what a running Python task stores through the
/// app's backend (`self.update_state`, `track_started`'s STARTED) reaches the client's reply
/// queue, as from a Celery worker of the same app: the client reads PROGRESS and STARTED while the
/// task runs, then its result.
#[test]
fn update_state_and_track_started_reach_an_rpc_client() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let expected = json!({
        "progress_for": {"seen": true, "keys": ["step"], "meta": {"step": 1}, "result": 2},
        "tracked_for": {"seen": true, "keys": ["hostname", "pid"], "meta": null, "result": 2},
    });
    let run = |queue: &str| {
        let env = common::pyapp::app_env(&broker, "rpc://", queue);
        let case = |case: &str| Value::Object(common::pyapp::run_script("rpcclient.py", &[queue, case], &env));
        json!({"progress_for": case("progress_for"), "tracked_for": case("tracked_for")})
    };
    {
        let queue = "pysem.rpc.celeriac";
        let w = python_worker(&broker, "rpc://", queue, &["-c", "1", "-n", "pysem-rpc@%h"]);
        assert_eq!(run(queue), expected, "{}", w.dump());
    }
    let queue = "pysem.rpc.celery";
    let _w = CeleryWorker::start(&broker, "rpc://", queue);
    assert_eq!(run(queue), expected, "a Celery worker gives the same");
}
