//! What operators watch a worker with: Flower (real, from the virtualenv), `celeriac events`,
//! the Prometheus endpoint, JSON logs and node names. RabbitMQ tests each use a vhost of their
//! own; the Redis test uses database 2, which no other test touches.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bin, free_port, http_get, repo, run_cli, wait_until, TempDb, TestVhost, WorkerProc};
use serde_json::{json, Value};

/// A process whose stdout or stderr lines are collected.
struct Lines {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    fn spawn(mut cmd: Command, stdout: bool) -> Self {
        cmd.env_remove("CELERIAC_BROKER_URL").env_remove("CELERIAC_RESULT_BACKEND").env("NO_COLOR", "1");
        if stdout {
            cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = cmd.stdin(Stdio::null()).spawn().expect("spawn");
        let stream: Box<dyn Read + Send> = if stdout {
            Box::new(child.stdout.take().expect("stdout"))
        } else {
            Box::new(child.stderr.take().expect("stderr"))
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Lines { child, lines }
    }

    fn find(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.lines.lock().unwrap().iter().find(|l| pred(l)).cloned()
    }

    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let lines = self.lines.clone();
        wait_until(what, timeout, || lines.lock().unwrap().iter().any(|l| pred(l)));
        self.find(pred).unwrap()
    }

    fn dump(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `celeriac events` on a broker, its stdout collected.
fn tail_events(broker: &str, extra: &[&str]) -> Lines {
    let mut cmd = Command::new(bin());
    cmd.args(["events", "--broker", broker]).args(extra);
    Lines::spawn(cmd, true)
}

fn http_json(port: u16, path: &str) -> Option<Value> {
    match http_get(port, path) {
        Some((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Send a task with the CLI; returns its id.
fn send(broker: &str, name: &str, args: &str) -> String {
    let (code, out, err) = run_cli(&["send", "--broker", broker, name, "--args", args], &[]);
    assert_eq!(code, 0, "send failed: {err}");
    out.trim().to_string()
}

/// Real Flower on a vhost, lists the celeriac worker as online from its heartbeats, records the
/// task's succeeded event with its result, and sees the worker go offline.
#[test]
fn flower_lists_the_celeriac_worker_online_and_records_its_task() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let port = free_port();
    let mut flower = Command::new(repo().join("target/pyenv/bin/celery"));
    flower
        .args(["-b", &url, "flower", &format!("--port={port}"), "--address=127.0.0.1"])
        .env("FLOWER_UNAUTHENTICATED_API", "true");
    let flower = Lines::spawn(flower, false);
    let status = || http_json(port, "/api/workers?status=true");
    wait_until(&format!("Flower to answer; its log:\n{}", flower.dump()), Duration::from_secs(60), || {
        status().is_some()
    });

    let name = format!("flower-{}@%h", std::process::id());
    let mut worker = WorkerProc::start(&url, &["-E", "-n", &name, "-c", "2"]);
    let prefix = name.trim_end_matches("%h");
    let alive = |want: bool| {
        status().is_some_and(|v| {
            v.as_object().is_some_and(|m| m.iter().any(|(k, v)| k.starts_with(prefix) && v.as_bool() == Some(want)))
        })
    };
    wait_until("Flower to list the celeriac worker as online", Duration::from_secs(30), || alive(true));

    let id = send(&url, "celeriac.add", "[20, 22]");
    let task = |id: &str| http_json(port, "/api/tasks").and_then(|v| v.get(id).cloned());
    wait_until("Flower to record the task as succeeded", Duration::from_secs(30), || {
        task(&id).is_some_and(|t| t["state"] == "SUCCESS")
    });
    let t = task(&id).unwrap();
    assert_eq!(t["name"], "celeriac.add", "{t}");
    assert_eq!(t["result"], "42", "{t}");
    assert!(t["worker"].as_str().is_some_and(|w| w.starts_with(prefix)), "{t}");
    assert!(t["runtime"].as_f64().is_some(), "{t}");
    // The routing key celeriac's task-received adds (Celery's lacks it) is shown by Flower.
    assert_eq!(t["routing_key"], "celery", "{t}");

    // A burst: task events then leave in lists on `task.multi`, as Celery's worker sends them;
    // Flower records every task.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let burst: Vec<String> = rt.block_on(async {
        let client = celeriac::Client::connect(&url, Some("disabled://")).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..50 {
            let r = client.send_task("celeriac.add", vec![i.into(), 1.into()], Default::default(), Default::default());
            ids.push(r.await.unwrap().id().to_string());
        }
        ids
    });
    wait_until("Flower to record the whole burst as succeeded", Duration::from_secs(30), || {
        http_json(port, "/api/tasks").is_some_and(|v| burst.iter().all(|id| v[id.as_str()]["state"] == "SUCCESS"))
    });

    // A chain: its first step's task-received carries the workflow keys of celeriac's (`chain`,
    // a list of objects); Flower still records both steps, the second with its parent.
    let steps = [format!("flower-a-{port}"), format!("flower-b-{port}")];
    rt.block_on(async {
        let client = celeriac::Client::connect(&url, Some("disabled://")).await.unwrap();
        let add = |x: i64, id: &str| celeriac::Signature::new("celeriac.add").arg(x).arg(1).task_id(id);
        let second = celeriac::Signature::new("celeriac.add").arg(2).task_id(&steps[1]);
        celeriac::canvas::chain([add(1, &steps[0]), second]).apply_async(&client).await.unwrap();
    });
    wait_until("Flower to record both steps of the chain", Duration::from_secs(30), || {
        http_json(port, "/api/tasks").is_some_and(|v| steps.iter().all(|id| v[id.as_str()]["state"] == "SUCCESS"))
    });
    let second = task(&steps[1]).unwrap();
    assert_eq!((&second["parent_id"], &second["result"]), (&json!(steps[0]), &json!("4")), "{second}");
    assert!(flower.find(|l| l.contains("Traceback")).is_none(), "{}", flower.dump());

    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
    wait_until("Flower to see the worker go offline", Duration::from_secs(20), || alive(false));
}

/// `celeriac events` prints each event of a task on one line, in order, and `--json` gives the
/// bodies in Celery's format.
#[test]
fn celeriac_events_shows_a_tasks_events() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let text = tail_events(&url, &[]);
    let json = tail_events(&url, &["--json"]);
    let _worker = WorkerProc::start(&url, &["-E", "-n", "tail@%h"]);
    // Both tails are subscribed once they see the worker's first event.
    text.wait_for("a worker event in the text tail", Duration::from_secs(20), |l| l.contains("tail@"));
    json.wait_for("a worker event in the JSON tail", Duration::from_secs(20), |l| l.contains("tail@"));

    let (code, out, err) =
        run_cli(&["send", "--broker", &url, "celeriac.add", "--args", "[1, 2]", "--sent-event"], &[]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let done = text.wait_for("task-succeeded in the text tail", Duration::from_secs(20), |l| {
        l.contains("task-succeeded") && l.contains(&id)
    });
    assert!(done.contains("result=3"), "{done}");
    let lines: Vec<String> = text.lines.lock().unwrap().iter().filter(|l| l.contains(&id)).cloned().collect();
    // The client's task-sent travels apart from the worker's events: only the worker's are ordered.
    let kinds: Vec<&str> =
        lines.iter().filter_map(|l| l.split_whitespace().nth(2)).filter(|k| *k != "task-sent").collect();
    assert_eq!(kinds, ["task-received", "task-started", "task-succeeded"], "{lines:?}");
    let sent = text.wait_for("task-sent", Duration::from_secs(10), |l| l.contains("task-sent") && l.contains(&id));
    assert!(sent.contains("name=celeriac.add") && sent.contains("queue=celery"), "{sent}");

    let body = json.wait_for("task-succeeded in the JSON tail", Duration::from_secs(20), |l| {
        l.contains("\"task-succeeded\"") && l.contains(&id)
    });
    let ev: Value = serde_json::from_str(&body).unwrap();
    let keys: Vec<&str> = ev.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["hostname", "utcoffset", "pid", "clock", "uuid", "result", "runtime", "timestamp", "type"],
        "{body}"
    );
    assert_eq!(ev["result"], "3");
    let heartbeat = json.wait_for("a heartbeat", Duration::from_secs(10), |l| l.contains("\"worker-heartbeat\""));
    let hb: Value = serde_json::from_str(&heartbeat).unwrap();
    for field in ["freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys"] {
        assert!(hb.get(field).is_some(), "{field} missing from {heartbeat}");
    }
    // The exchange is declared as Celery declares it, so Celery's own tools meet no
    // PRECONDITION_FAILED.
    let exchanges = vhost.list("list_exchanges", &["name", "type", "durable", "auto_delete"]);
    assert!(
        exchanges.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["celeryev", "topic", "true", "false"]),
        "{exchanges:?}"
    );
}

/// `celeriac events` reads a Python Celery worker's events too, including the lists of task
/// events Celery buffers (`task.multi`).
#[test]
fn celeriac_events_reads_a_python_workers_events() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let tail = tail_events(&url, &[]);
    let mut worker = Command::new(repo().join("target/pyenv/bin/celery"));
    worker
        .args(["-A", "pytasks", "worker", "-P", "solo", "-E", "-Q", "py_events", "-n", "pyev@%h", "--loglevel=INFO"])
        .env("PYTHONPATH", repo().join("tests/interop"))
        .env("CELERY_BROKER_URL", &url)
        .env("CELERY_RESULT_BACKEND", "disabled://");
    let py = Lines::spawn(worker, false);
    tail.wait_for(&format!("the Python worker's events; its log:\n{}", py.dump()), Duration::from_secs(60), |l| {
        l.contains("pyev@") && l.contains("worker-")
    });
    let (code, out, err) = run_cli(&["send", "--broker", &url, "py.add", "--args", "[3, 4]", "-Q", "py_events"], &[]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let line = tail.wait_for("the Python worker's task-succeeded", Duration::from_secs(30), |l| {
        l.contains("task-succeeded") && l.contains(&id)
    });
    assert!(line.contains("pyev@") && line.contains("result=7"), "{line}");
}

/// On Redis, events go over kombu's fanout (pub/sub): `celeriac events` and Celery's own
/// `celery events --dump` both see them.
#[test]
fn events_travel_over_redis_too() {
    let db = common::SharedRedisDb::get(2);
    let url = db.url("");
    let tail = tail_events(&url, &[]);
    let mut dump = Command::new(repo().join("target/pyenv/bin/celery"));
    dump.args(["-b", &url, "events", "--dump"]);
    let py = Lines::spawn(dump, true);
    let _worker = WorkerProc::start(&url, &["-E", "-n", "redis-events@%h", "-Q", "observe_events"]);
    tail.wait_for("a worker event", Duration::from_secs(20), |l| l.contains("redis-events@"));
    py.wait_for("Celery to see a worker event", Duration::from_secs(60), |l| l.starts_with("redis-events@"));
    let (code, out, err) =
        run_cli(&["send", "--broker", &url, "celeriac.add", "--args", "[2, 2]", "-Q", "observe_events"], &[]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let line =
        tail.wait_for("task-succeeded", Duration::from_secs(20), |l| l.contains("task-succeeded") && l.contains(&id));
    assert!(line.contains("result=4"), "{line}");
    let line = py.wait_for("Celery to see the task succeed", Duration::from_secs(20), |l| {
        l.contains(&format!("task succeeded: celeriac.add({id})"))
    });
    assert!(line.contains("result=4"), "{line}");
}

/// Metric value of a line `name{labels} value` (or `name value`).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The metrics endpoint answers, and its counters move by exactly the number of tasks run.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_exactly_the_tasks_run() {
    let db = TempDb::new("");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _worker = WorkerProc::start(&db.url, &["--metrics-addr", &addr, "-c", "2"]);
    let scrape = || http_get(port, "/metrics").expect("the metrics endpoint answers");
    let (status, before) = scrape();
    assert_eq!(status, 200);
    assert!(before.contains("# TYPE celeriac_tasks_in_flight gauge"), "{before}");
    let ok = "celeriac_tasks_total{task=\"celeriac.add\",state=\"SUCCESS\"}";
    let failed = "celeriac_tasks_total{task=\"celeriac.fail\",state=\"FAILURE\"}";
    let runtime = "celeriac_task_runtime_seconds_count{task=\"celeriac.add\"}";
    let wait = "celeriac_task_queue_wait_seconds_count{task=\"celeriac.add\"}";
    assert_eq!(metric(&before, ok), 0.0);

    let client = db.client().await;
    for round in 1..=2u32 {
        let mut ids = Vec::new();
        for i in 0..7 {
            ids.push(
                client
                    .send_task("celeriac.add", vec![i.into(), 1.into()], Default::default(), Default::default())
                    .await
                    .unwrap(),
            );
        }
        for _ in 0..2 {
            ids.push(
                client
                    .send_task("celeriac.fail", vec!["boom".into()], Default::default(), Default::default())
                    .await
                    .unwrap(),
            );
        }
        for r in &ids {
            let _ = client.backend().wait(r.id(), Some(Duration::from_secs(30))).await.expect("result");
        }
        // Counted before the result is stored, so they are there now.
        let (_, text) = scrape();
        let n = f64::from(7 * round);
        assert_eq!(metric(&text, ok), n, "{text}");
        assert_eq!(metric(&text, runtime), n, "{text}");
        assert_eq!(metric(&text, wait), n, "{text}");
        assert_eq!(metric(&text, failed), f64::from(2 * round), "{text}");
        assert_eq!(metric(&text, "celeriac_tasks_prefetched"), 0.0, "{text}");
    }
    wait_until("in-flight back to 0", Duration::from_secs(20), || {
        metric(&scrape().1, "celeriac_tasks_in_flight") == 0.0
    });
}

/// In the prefork pool, recycles by reason and hard-limit kills are counted exactly.
#[tokio::test(flavor = "multi_thread")]
async fn prefork_metrics_count_recycles_and_kills() {
    let db = TempDb::new("");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _worker = WorkerProc::start(
        &db.url,
        &["-P", "prefork", "-c", "1", "--max-tasks-per-child", "2", "--time-limit", "1", "--metrics-addr", &addr],
    );
    let client = db.client().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            client
                .send_task("celeriac.add", vec![i.into(), 1.into()], Default::default(), Default::default())
                .await
                .unwrap(),
        );
    }
    // The hung task only once the additions are done, so the recycle count does not depend on
    // the order the pool took them in.
    for r in &ids {
        let _ = client.backend().wait(r.id(), Some(Duration::from_secs(30))).await.expect("result");
    }
    let hang = client.send_task("celeriac.hang", vec![], Default::default(), Default::default()).await.unwrap();
    let _ = client.backend().wait(hang.id(), Some(Duration::from_secs(30))).await.expect("result");
    let (_, text) = http_get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(metric(&text, "celeriac_tasks_total{task=\"celeriac.add\",state=\"SUCCESS\"}"), 6.0, "{text}");
    assert_eq!(metric(&text, "celeriac_tasks_total{task=\"celeriac.hang\",state=\"FAILURE\"}"), 1.0, "{text}");
    // Six tasks on one child, replaced every second task; the hung one's child was killed.
    assert_eq!(metric(&text, "celeriac_pool_child_recycles_total{reason=\"max_tasks\"}"), 3.0, "{text}");
    assert_eq!(metric(&text, "celeriac_pool_child_recycles_total{reason=\"max_memory\"}"), 0.0, "{text}");
    assert_eq!(metric(&text, "celeriac_pool_hard_limit_kills_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "celeriac_pool_worker_lost_total"), 0.0, "{text}");
}

/// A bad `--metrics-addr`, a busy port, a bad `--log-format` or `-n` template are clear errors
/// (exit 2), not panics.
#[test]
fn bad_observability_flags_are_usage_errors() {
    let db = TempDb::new("");
    let (code, _, err) = run_cli(&["worker", "--broker", &db.url, "--metrics-addr", "nowhere"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--metrics-addr \"nowhere\""), "{err}");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, _, err) = run_cli(&["worker", "--broker", &db.url, "--metrics-addr", &addr], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&addr), "{err}");
    let (code, _, err) = run_cli(&["worker", "--broker", &db.url, "--log-format", "yaml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("possible values: text, json"), "{err}");
    let (code, _, err) = run_cli(&["worker", "--broker", &db.url, "-n", "w%q@%h"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown format key %q"), "{err}");
    let (code, _, err) = run_cli(&["worker", "--broker", &db.url, "--loglevel", "loud=["], &[]);
    assert_eq!(code, 2, "{err}");
}

/// With `--log-format json` every line is a JSON object; task lines carry the task's id, name,
/// queue, the worker's node name and the pid that wrote them, and the supervisor's lines the
/// prefork child's pid (a child's own lines carry its pid).
#[test]
fn json_logs_carry_task_and_process_fields() {
    let db = TempDb::new("");
    let host = common_host();
    let worker = WorkerProc::start(
        &db.url,
        &["--log-format", "json", "-P", "prefork", "-c", "1", "-n", "jsonlog@%n", "--soft-time-limit", "0.3"],
    );
    let id = send(&db.url, "celeriac.add", "[1, 1]");
    worker.wait_for_line(&format!("\"task_id\":\"{id}\""), Duration::from_secs(20));
    let slow = send(&db.url, "celeriac.sleep", "[5]");
    worker.wait_for_line("SoftTimeLimitExceeded", Duration::from_secs(20));
    let lines: Vec<Value> = worker
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let short = host.split('.').next().unwrap().to_string();
    let supervisor = worker.child.id();
    let done = lines
        .iter()
        .find(|l| l["msg"] == "task succeeded" && l["task_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no succeeded line: {}", worker.dump()));
    assert_eq!(done["task_name"], "celeriac.add", "{done}");
    assert_eq!(done["queue"], "celery", "{done}");
    assert_eq!(done["hostname"], format!("jsonlog@{short}"), "{done}");
    assert_eq!(done["pid"], supervisor, "{done}");
    assert!(done["child_pid"].as_u64().is_some_and(|p| p != u64::from(supervisor)), "{done}");
    assert_eq!(done["level"], "INFO");
    assert!(done["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{done}");
    // The child's own line about the slow task.
    let child_line = lines
        .iter()
        .find(|l| l["msg"] == "soft time limit exceeded" && l["task_id"] == slow.as_str())
        .unwrap_or_else(|| panic!("no child line: {}", worker.dump()));
    assert_ne!(child_line["pid"], supervisor, "{child_line}");
    assert_eq!(child_line["task_name"], "celeriac.sleep", "{child_line}");
    assert_eq!(child_line["hostname"], format!("jsonlog@{short}"), "{child_line}");
}

fn common_host() -> String {
    let out = Command::new("hostname").output().expect("hostname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A second worker with a node name already online is warned, as Celery warns.
#[test]
fn a_second_worker_with_the_same_name_is_warned() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let _first = WorkerProc::start(&url, &["-n", "twin@%h"]);
    let second = WorkerProc::start(&url, &["-n", "twin@%h"]);
    second.wait_for_line("is already online", Duration::from_secs(15));
}

/// `revoke --terminate --signal KILL` on a task running in the prefork pool: its task-revoked
/// event says it was terminated, and with which signal (Celery's `signum`).
#[test]
fn a_terminated_task_is_reported_revoked_with_its_signal() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let json = tail_events(&url, &["--json"]);
    let _worker = WorkerProc::start(&url, &["-E", "-P", "prefork", "-c", "1", "-n", "term@%h"]);
    json.wait_for("a worker event", Duration::from_secs(20), |l| l.contains("term@"));
    let id = send(&url, "celeriac.sleep", "[60]");
    json.wait_for("task-started", Duration::from_secs(20), |l| l.contains("\"task-started\"") && l.contains(&id));
    let (code, out, err) =
        run_cli(&["control", "revoke", "--terminate", "--signal", "KILL", &id, "--broker", &url], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let line =
        json.wait_for("task-revoked", Duration::from_secs(20), |l| l.contains("\"task-revoked\"") && l.contains(&id));
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((&ev["terminated"], &ev["signum"], &ev["expired"]), (&json!(true), &json!(9), &json!(false)), "{line}");
}

/// Flower (and `celery control enable_events`) turn task events on in a worker started without
/// `-E`, as in Celery; `disable_events` turns them off again.
#[test]
fn celery_control_enable_events_turns_task_events_on() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let json = tail_events(&url, &["--json"]);
    let worker = WorkerProc::start(&url, &["-c", "1", "-n", "enable@%h"]);
    json.wait_for("a worker event", Duration::from_secs(20), |l| l.contains("enable@"));
    let before = send(&url, "celeriac.add", "[1, 1]");
    let lines = worker.lines.clone();
    wait_until("the first task to run, before events are enabled", Duration::from_secs(20), || {
        lines.lock().unwrap().iter().any(|l| l.contains(&before) && l.contains("task succeeded"))
    });
    let celery = |args: &[&str]| -> String {
        let out = Command::new(repo().join("target/pyenv/bin/celery"))
            .args(["-b", &url, "control"])
            .args(args)
            .output()
            .expect("celery control");
        assert!(out.status.success(), "celery control {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = celery(&["enable_events"]);
    assert!(out.contains("task events enabled"), "{out}");
    assert!(celery(&["enable_events"]).contains("task events already enabled"));
    let after = send(&url, "celeriac.add", "[2, 2]");
    json.wait_for("task-succeeded of the task sent after enable_events", Duration::from_secs(20), |l| {
        l.contains("\"task-succeeded\"") && l.contains(&after)
    });
    // The earlier task ran before events were on, and sent none.
    assert!(json.find(|l| l.contains(&before)).is_none(), "{}", json.dump());
    assert!(celery(&["disable_events"]).contains("task events disabled"));
    // celeriac's own CLI sends the same commands.
    let (code, out, err) = run_cli(&["control", "enable-events", "--broker", &url], &[]);
    assert!(code == 0 && out.contains("task events enabled"), "{out}{err}");
    let (code, out, err) = run_cli(&["control", "disable-events", "--broker", &url], &[]);
    assert!(code == 0 && out.contains("task events disabled"), "{out}{err}");
}
