//! Remote control against real services: a celeriac worker seen and steered by Celery's own CLI
//! (`celery inspect`) and by `celeriac inspect`/`control`, a Python Celery worker seen by
//! `celeriac inspect`, `revoke --terminate` in the prefork pool, error replies to bad control
//! messages, the same over the Redis broker, and revoked countdown tasks that stay revoked across a
//! worker restart (revoked from Python and from celeriac, on RabbitMQ and Redis, in both pools).
//! Each RabbitMQ test has its own vhost; results and the Redis broker use database 3.

mod common;

use std::time::Duration;

use celeriac_core::broadcast::ExchangeSpec;
use celeriac_worker::control::{json_message, mailbox_binding, pidbox_exchange, reply_exchange};
use common::{celery_cli, py_client_on, run_cli, wait_until, PyCeleryWorker, SharedRedisDb, TestVhost, WorkerProc};
use serde_json::{json, Map, Value};

const DB: u32 = 3;

fn results() -> String {
    SharedRedisDb::get(DB).url("")
}

/// A node name unique to this test run.
fn node(tag: &str) -> String {
    format!("ctl-{tag}-{}@testhost", std::process::id())
}

/// A remote command naming its nodes (`-d`) waits up to 10 s for their replies unless it says
/// otherwise: it stops at the last named node's reply, and on a loaded machine the default 1 s
/// can pass before a worker answers. `args` with that timeout added.
fn named_nodes_wait_longer<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    let timed = args.iter().any(|a| matches!(*a, "-t" | "--timeout"));
    if args.contains(&"-d") && !timed {
        all.extend(["--timeout", "10"]);
    }
    all
}

/// `celeriac --broker <broker> <args>`; returns (exit code, stdout, stderr).
fn celeriac(broker: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--broker", broker];
    all.extend(named_nodes_wait_longer(args));
    run_cli(&all, &[])
}

/// Celery's own CLI (`celery -A ctlapp -b <broker> <args>`); returns (success, stdout).
fn celery(broker: &str, args: &[&str]) -> (bool, String) {
    celery_cli(broker, &named_nodes_wait_longer(args))
}

/// Send a task with the celeriac CLI; returns its id.
fn send(broker: &str, name: &str, args: &str, queue: &str) -> String {
    let results = results();
    let (code, out, err) = celeriac(broker, &["--result-backend", &results, "send", name, "--args", args, "-Q", queue]);
    assert_eq!(code, 0, "send failed: {err}");
    out.trim().lines().last().expect("a task id").to_string()
}

/// The replies of `celeriac inspect <what> --json`, by node.
fn inspect_json(broker: &str, what: &str) -> Map<String, Value> {
    let (_, out, _) = celeriac(broker, &["inspect", what, "--json"]);
    serde_json::from_str::<Value>(out.trim()).ok().and_then(|v| v.as_object().cloned()).unwrap_or_default()
}

/// Wait until `celeriac inspect active` shows task `id` on some node; returns that node's entry.
fn wait_active(broker: &str, id: &str) -> Value {
    let mut found = Value::Null;
    wait_until(&format!("task {id} to be listed as active"), Duration::from_secs(30), || {
        let nodes = inspect_json(broker, "active");
        found = nodes
            .values()
            .filter_map(Value::as_array)
            .flatten()
            .find(|t| t["id"] == json!(id))
            .cloned()
            .unwrap_or(Value::Null);
        !found.is_null()
    });
    found
}

/// A result's state as `celeriac result --json` reports it.
fn state_of(broker: &str, id: &str) -> String {
    let results = results();
    let (_, out, _) = celeriac(broker, &["--result-backend", &results, "result", id, "--json"]);
    serde_json::from_str::<Value>(out.trim())
        .ok()
        .and_then(|v| v.get("status").or_else(|| v.get("state")).and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn python_celery_inspect_lists_a_celeriac_worker_and_its_running_task() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("py-cli");
    let results = results();
    let worker =
        WorkerProc::start(&url, &["--result-backend", &results, "-P", "prefork", "-c", "2", "-n", &name, "-Q", "pyq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));

    // Named, so Celery's CLI stops waiting at the node's reply.
    let (ok, out) = celery(&url, &["inspect", "ping", "-d", &name]);
    assert!(ok && out.contains(&name) && out.contains("pong"), "celery inspect ping:\n{out}");

    // The tasks sleep far longer than the test runs (it terminates one; the worker's exit ends the
    // rest), so on a loaded machine none ends before it is looked at.
    let id = send(&url, "celeriac.sleep", "[300]", "pyq");
    wait_active(&url, &id);
    let (ok, out) = celery(&url, &["inspect", "active", "--json", "-d", &name]);
    assert!(ok, "celery inspect active --json:\n{out}");
    let replies: Value = serde_json::from_str(out.trim()).expect("JSON from celery inspect --json");
    let tasks = replies[&name].as_array().unwrap_or_else(|| panic!("no reply from {name}: {out}"));
    let task = tasks.iter().find(|t| t["id"] == json!(id)).unwrap_or_else(|| panic!("{id} not listed: {out}"));
    assert_eq!(task["name"], json!("celeriac.sleep"));
    assert_eq!(task["args"], json!([300]));
    assert_eq!(task["hostname"], json!(name));
    assert!(task["time_start"].as_f64().is_some(), "{task}");
    let pid = task["worker_pid"].as_u64().expect("worker_pid") as u32;
    assert_ne!(pid, worker.child.id(), "the prefork child's pid, not the supervisor's");

    // The readable form Celery prints lists it too.
    let (ok, out) = celery(&url, &["inspect", "active", "-d", &name]);
    assert!(ok && out.contains(&id) && out.contains("celeriac.sleep"), "{out}");

    // `query_task` names the state and the request of each held task. With both slots busy, the
    // third task waits in the worker: reserved.
    let busy = send(&url, "celeriac.sleep", "[300]", "pyq");
    let waiting = send(&url, "celeriac.sleep", "[300]", "pyq");
    wait_active(&url, &busy);
    let query = |ids: &[&str]| {
        let mut args = vec!["inspect", "query_task", "-d", &name];
        args.extend_from_slice(ids);
        args.push("--json");
        let (code, out, err) = celeriac(&url, &args);
        assert_eq!(code, 0, "celeriac inspect query_task: {err}");
        serde_json::from_str::<Value>(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))[&name].clone()
    };
    wait_until("the third task to be reserved", Duration::from_secs(20), || {
        query(&[&waiting])[&waiting][0] == "reserved"
    });
    let (ok, out) = celery(&url, &["inspect", "query_task", &id, &waiting, "no-such-task", "--json", "-d", &name]);
    assert!(ok, "celery inspect query_task:\n{out}");
    let replies: Value = serde_json::from_str(out.trim()).expect("JSON from celery inspect query_task --json");
    let found = replies[&name].as_object().unwrap_or_else(|| panic!("no reply from {name}: {out}"));
    assert_eq!(found.len(), 2, "the two held tasks, not the unknown id: {out}");
    assert_eq!((&found[&id][0], &found[&id][1]["name"]), (&json!("active"), &json!("celeriac.sleep")));
    assert_eq!((&found[&waiting][0], &found[&waiting][1]["id"]), (&json!("reserved"), &json!(waiting)));
    assert_eq!(query(&["no-such-task"]), json!({}));
    let (code, out, _) = celeriac(&url, &["inspect", "query_task", &waiting, "-d", &name]);
    assert!(code == 0 && out.contains(&waiting) && out.contains("reserved"), "readable query_task:\n{out}");

    // Celery's `control terminate` (a list of ids, a signal name) reaches the prefork child.
    let (ok, out) = celery(&url, &["control", "terminate", "KILL", &id, "-d", &name]);
    assert!(ok && out.contains(&format!("terminate: {id}")), "celery control terminate:\n{out}");
    wait_until("the task's state to become REVOKED", Duration::from_secs(20), || state_of(&url, &id) == "REVOKED");
    wait_until("the child to be gone", Duration::from_secs(10), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err()
    });
}

#[test]
fn celeriac_inspect_lists_a_python_workers_task() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let results = results();
    let _py = PyCeleryWorker::start_pool(&url, &results, "pyworkq", &["-P", "prefork", "-c", "2"]);
    let (code, out, err) = celeriac(&url, &["inspect", "ping"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("pong") && out.contains("py-pyworkq"), "{out}");

    let id = send(&url, "py.sleep", "[20]", "pyworkq");
    let task = wait_active(&url, &id);
    assert_eq!(task["name"], json!("py.sleep"));
    assert!(task["worker_pid"].as_u64().is_some(), "{task}");
    let (code, out, _) = celeriac(&url, &["inspect", "active"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("py.sleep"), "readable table:\n{out}");
    let (code, out, _) = celeriac(&url, &["inspect", "stats"]);
    assert!(code == 0 && out.contains("celery.concurrency"), "{out}");
    // The reply's rusage is the worker's own process, and says so.
    assert!(out.contains("worker process max rss "), "{out}");
}

#[test]
fn revoke_terminate_kills_a_running_prefork_task_and_the_worker_keeps_working() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("revoke");
    let results = results();
    let worker =
        WorkerProc::start(&url, &["--result-backend", &results, "-P", "prefork", "-c", "1", "-n", &name, "-Q", "rvq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));
    let id = send(&url, "celeriac.sleep", "[60]", "rvq");
    let task = wait_active(&url, &id);
    let child = task["worker_pid"].as_u64().expect("worker_pid") as i32;
    // The only slot is busy: the next task waits in reserve, and remote control still answers.
    let waiting = send(&url, "celeriac.add", "[2, 3]", "rvq");
    wait_until("the waiting task to be listed as reserved", Duration::from_secs(20), || {
        inspect_json(&url, "reserved")
            .get(&name)
            .and_then(Value::as_array)
            .is_some_and(|r| r.iter().any(|t| t["id"] == json!(waiting) && t["worker_pid"].is_null()))
    });

    let (code, out, err) = celeriac(&url, &["control", "revoke", "--terminate", &id, "-d", &name]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("terminate: {id}")), "{out}");
    wait_until("the task's state to become REVOKED", Duration::from_secs(20), || state_of(&url, &id) == "REVOKED");
    wait_until("the child to be gone", Duration::from_secs(10), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), None).is_err()
    });
    worker.wait_for_line("task revoked", Duration::from_secs(10));

    // The worker keeps working: a fresh child runs the waiting task and the next one.
    wait_until("the waiting task to succeed", Duration::from_secs(30), || state_of(&url, &waiting) == "SUCCESS");
    let next = send(&url, "celeriac.add", "[2, 3]", "rvq");
    wait_until("the next task to succeed", Duration::from_secs(30), || state_of(&url, &next) == "SUCCESS");
    assert_eq!(worker.count("requeueing"), 0, "the terminated task is not requeued:\n{}", worker.dump());
    let stats = inspect_json(&url, "stats");
    assert_eq!(stats[&name]["pool"]["worker_lost"], json!(0), "a terminated child is not a lost worker: {stats:?}");
    assert_eq!(stats[&name]["counters"]["revoked"], json!(1), "{stats:?}");
}

/// What `celeriac result --json` reports for `id` (`{}` when it cannot be read).
fn stored(broker: &str, id: &str) -> Value {
    let results = results();
    let (_, out, _) = celeriac(broker, &["--result-backend", &results, "result", id, "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|_| json!({}))
}

#[test]
fn a_plain_revoke_lets_a_running_task_finish_keeps_a_finished_result_and_discards_held_tasks() {
    // Celery's `revoke` without terminate only remembers the ids: a task running on finishes and
    // stores its result, a finished one keeps it, and a task not run yet (held for its ETA, or
    // still in the queue behind the busy slot) is discarded with REVOKED stored when the worker
    // would run it.
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let results = results();
    let name = node("plainrevoke");
    let queue = "plainrv";
    let worker = WorkerProc::start(&url, &["--result-backend", &results, "-c", "1", "-n", &name, "-Q", queue]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));

    let finished = send(&url, "celeriac.add", "[2, 3]", queue);
    wait_until("the first task to succeed", Duration::from_secs(20), || state_of(&url, &finished) == "SUCCESS");
    // The countdown task is taken and held (it holds no slot); the next one waits behind the
    // busy slot. All are revoked while the sleep runs and before the ETA.
    let eta = py_client_on(
        &url,
        &results,
        &["send", "celeriac.echo", "--args", r#"["x"]"#, "--queue", queue, "--countdown", "10"],
    );
    wait_until("the countdown task to be held", Duration::from_secs(20), || {
        worker.matching(&eta).iter().any(|l| l.contains("holding until ETA"))
    });
    let running = send(&url, "celeriac.sleep", "[6]", queue);
    wait_active(&url, &running);
    let waiting = send(&url, "celeriac.add", "[1, 1]", queue);

    let revoke = ["--result-backend", &results, "control", "revoke", &finished, &running, &waiting, &eta];
    let (code, out, err) = celeriac(&url, &revoke);
    assert!(code == 0 && out.contains("flagged as revoked"), "{out}{err}");
    wait_until("the worker to hear the revoke", Duration::from_secs(10), || {
        worker.count("tasks flagged as revoked") == 1
    });
    assert_eq!(state_of(&url, &running), "PENDING", "nothing is stored for the running task:\n{}", worker.dump());

    // The running task was not terminated: it ends with its own result.
    wait_until("the running task to end", Duration::from_secs(20), || {
        ["SUCCESS", "FAILURE", "REVOKED"].contains(&state_of(&url, &running).as_str())
    });
    let got = stored(&url, &running);
    assert_eq!((&got["status"], &got["result"]), (&json!("SUCCESS"), &json!(6.0)), "{got}\n{}", worker.dump());
    // The finished one is untouched.
    let got = stored(&url, &finished);
    assert_eq!((&got["status"], &got["result"]), (&json!("SUCCESS"), &json!(5)), "{got}");
    // The ones not run yet never run.
    for id in [&waiting, &eta] {
        wait_until("the held task to be discarded as revoked", Duration::from_secs(20), || {
            state_of(&url, id) == "REVOKED"
        });
        assert!(worker.matching(id).iter().all(|l| !l.contains("task succeeded")), "{}", worker.dump());
    }
    assert_eq!(worker.count("stays REVOKED"), 0, "no outcome was refused:\n{}", worker.dump());
}

/// Publish a raw control message and collect the replies sent to our own reply queue: the first
/// waited for up to 20 s (a loaded machine), the others until none comes for 2 s.
async fn raw_call(url: &str, body: Value) -> Vec<Value> {
    let broker = celeriac::connect::broker(url).unwrap();
    let x = broker.exchanges().unwrap();
    let oid = uuid::Uuid::new_v4().to_string();
    let reply_ex = reply_exchange();
    let mut replies = x.subscribe(&reply_ex, &mailbox_binding(format!("{oid}.raw"), oid.clone())).await.unwrap();
    let mut body = body;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("reply_to".into(), json!({"exchange": reply_ex.name, "routing_key": oid}));
        obj.insert("ticket".into(), json!("raw-ticket"));
    }
    let message = json_message(&body, Map::new());
    let spec: ExchangeSpec = pidbox_exchange();
    x.publish_to(&spec, "", &message).await.unwrap();
    let mut out = Vec::new();
    let mut window = Duration::from_secs(20);
    while let Ok(Ok(m)) = tokio::time::timeout(window, replies.next()).await {
        window = Duration::from_secs(2);
        assert_eq!(m.headers.get("ticket"), Some(&json!("raw-ticket")), "the ticket comes back");
        assert!(m.headers.get("clock").and_then(Value::as_u64).is_some(), "a clock header");
        out.push(serde_json::from_slice(&m.body).unwrap());
    }
    replies.close().await;
    out
}

#[tokio::test]
async fn malformed_control_messages_and_unknown_commands_get_error_replies() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("bad");
    let results = results();
    let worker = WorkerProc::start(&url, &["--result-backend", &results, "-n", &name, "-Q", "badq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));

    let unknown = raw_call(&url, json!({"method": "no_such_command", "arguments": {}})).await;
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(unknown[0][&name]["error"].as_str().unwrap().contains("no_such_command"), "{unknown:?}");

    let bad_args = raw_call(&url, json!({"method": "ping", "arguments": [1, 2]})).await;
    assert!(bad_args[0][&name]["error"].as_str().unwrap().contains("arguments"), "{bad_args:?}");

    let no_method = raw_call(&url, json!({"arguments": {}})).await;
    assert!(no_method[0][&name]["error"].as_str().unwrap().contains("method"), "{no_method:?}");

    let bad_revoke = raw_call(&url, json!({"method": "revoke", "arguments": {"task_id": 42}})).await;
    assert!(bad_revoke[0][&name].get("error").is_some(), "{bad_revoke:?}");

    // Not JSON at all: nowhere to reply; logged, and the worker carries on.
    let broker = celeriac::connect::broker(&url).unwrap();
    let garbage = celeriac_core::Message { body: b"\xff{not json".to_vec(), ..json_message(&json!({}), Map::new()) };
    broker.exchanges().unwrap().publish_to(&pidbox_exchange(), "", &garbage).await.unwrap();

    // Still alive: answers ping and runs tasks.
    let (code, out, err) = tokio::task::spawn_blocking({
        let url = url.clone();
        let name = name.clone();
        move || celeriac(&url, &["inspect", "ping", "-d", &name])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", worker.dump());
    assert!(out.contains("pong"));
    assert!(worker.count("bad control message") >= 3, "{}", worker.dump());
    let (code, out, _) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || celeriac(&url, &["inspect", "nosuch"])
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "the CLI refuses an unknown command itself: {out}");
}

#[test]
fn ping_and_active_over_redis_from_celeriac_and_celery() {
    let db = SharedRedisDb::get(DB);
    let url = db.url("");
    let name = node("redis");
    let worker = WorkerProc::start(&url, &["-n", &name, "-Q", "ctl-redis-q", "-c", "2"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));

    let (code, out, err) = celeriac(&url, &["inspect", "ping", "-d", &name]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{name}: pong")), "{out}");
    let (ok, out) = celery(&url, &["inspect", "ping", "-d", &name]);
    assert!(ok && out.contains(&name) && out.contains("pong"), "celery inspect ping over Redis:\n{out}");

    let id = send(&url, "celeriac.sleep", "[20]", "ctl-redis-q");
    let task = wait_active(&url, &id);
    assert_eq!(task["worker_pid"].as_u64(), Some(u64::from(worker.child.id())), "the async pool runs in the worker");
    let (ok, out) = celery(&url, &["inspect", "active", "-d", &name, "--json"]);
    assert!(ok, "{out}");
    let replies: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert!(replies[&name].as_array().unwrap().iter().any(|t| t["id"] == json!(id)), "{out}");
    // A countdown task is listed as scheduled, with its ETA.
    let results = results();
    let (code, out, err) = celeriac(
        &url,
        &[
            "--result-backend",
            &results,
            "send",
            "celeriac.add",
            "--args",
            "[1, 1]",
            "-Q",
            "ctl-redis-q",
            "--countdown",
            "60",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let later = out.trim().lines().last().unwrap().to_string();
    wait_until("the countdown task to be listed as scheduled", Duration::from_secs(20), || {
        inspect_json(&url, "scheduled").get(&name).and_then(Value::as_array).is_some_and(|s| {
            s.iter().any(|e| e["request"]["id"] == json!(later) && e["eta"].as_str().is_some_and(|t| t.contains('T')))
        })
    });
    // The reply queues went away with their clients.
    assert_eq!(db.cli(&["EXISTS", "_kombu.binding.reply.celery.pidbox"]), "0");
}

/// The channel-wide prefetch of every channel of the vhost that has one (the worker's task
/// consumer; the mailbox consumes without acknowledgements and sets none).
fn task_prefetch(vhost: &TestVhost) -> Vec<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_channels", "-q", "--no-table-headers", "vhost", "global_prefetch_count"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            [v, n] if *v == vhost.name => n.parse().ok().filter(|n| *n > 0),
            _ => None,
        })
        .collect()
}

#[test]
fn control_commands_resize_the_pool_change_queues_and_rate_limits_then_shut_down() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("ctl");
    let results = results();
    let mut worker =
        WorkerProc::start(&url, &["--result-backend", &results, "-P", "prefork", "-c", "1", "-n", &name, "-Q", "cq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));
    let processes = || -> usize {
        inspect_json(&url, "stats")
            .get(&name)
            .and_then(|s| s["pool"]["processes"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    assert_eq!(processes(), 1);
    assert_eq!(task_prefetch(&vhost), vec![4], "Celery's window: 1 slot x 4");
    let (code, out, _) = celeriac(&url, &["control", "pool-grow", "2", "-d", &name]);
    assert!(code == 0 && out.contains("pool will grow"), "{out}");
    assert_eq!(processes(), 3);
    // The prefetch window follows the pool, as Celery's does.
    wait_until("the window to follow the grown pool (3 x 4)", Duration::from_secs(10), || {
        task_prefetch(&vhost) == vec![12]
    });
    let (code, out, _) = celeriac(&url, &["control", "pool-shrink", "2", "-d", &name]);
    assert!(code == 0 && out.contains("pool will shrink"), "{out}");
    wait_until("the pool to shrink to one child", Duration::from_secs(10), || processes() == 1);
    wait_until("the window to follow the shrunk pool", Duration::from_secs(10), || task_prefetch(&vhost) == vec![4]);
    let (code, out, _) = celeriac(&url, &["control", "pool-shrink", "1", "-d", &name]);
    assert!(code == 1 && out.contains("at least one"), "the last slot stays: {out}");

    let (code, out, _) = celeriac(&url, &["control", "add-consumer", "extra", "-d", &name]);
    assert!(code == 0 && out.contains("add consumer extra"), "{out}");
    let queues = |url: &str| inspect_json(url, "active_queues")[&name].clone();
    assert_eq!(queues(&url).as_array().map(|q| q.len()), Some(2), "{}", queues(&url));
    let on_extra = send(&url, "celeriac.add", "[1, 2]", "extra");
    wait_until("the task on the added queue to succeed", Duration::from_secs(20), || {
        state_of(&url, &on_extra) == "SUCCESS"
    });
    let (code, out, _) = celeriac(&url, &["control", "cancel-consumer", "extra", "-d", &name]);
    assert!(code == 0 && out.contains("no longer consuming from extra"), "{out}");
    assert_eq!(queues(&url)[0]["name"], json!("cq"));

    let (code, out, _) = celeriac(&url, &["control", "rate-limit", "celeriac.noop", "2/s", "-d", &name]);
    assert!(code == 0 && out.contains("new rate limit set"), "{out}");
    let (code, out, _) = celeriac(&url, &["control", "rate-limit", "no.such.task", "2/s", "-d", &name]);
    assert!(code == 1 && out.contains("unknown task"), "{out}");
    let (_, out, _) = celeriac(&url, &["inspect", "registered", "-d", &name]);
    assert!(out.contains("celeriac.noop [rate_limit=2/s]"), "{out}");
    let started = std::time::Instant::now();
    let ids: Vec<String> = (0..3).map(|_| send(&url, "celeriac.noop", "[]", "cq")).collect();
    wait_until("the rate-limited tasks to succeed", Duration::from_secs(20), || {
        ids.iter().all(|id| state_of(&url, id) == "SUCCESS")
    });
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "3 starts at 2/s take at least 1 s: {:?}",
        started.elapsed()
    );

    let (code, out, _) = celeriac(&url, &["control", "shutdown", "-d", &name]);
    assert!(code == 0 && out.contains("shutting down"), "{out}");
    assert!(worker.wait_exit(Duration::from_secs(30)).success(), "{}", worker.dump());
}

/// A rate-limited task waits for its turn without holding a pool slot: with one slot and
/// `celeriac.add` limited to one every 10 s, other tasks still run at once.
#[test]
fn a_rate_limited_task_waits_for_its_turn_without_holding_a_slot() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("rate");
    let results = results();
    let worker = WorkerProc::start(&url, &["--result-backend", &results, "-c", "1", "-n", &name, "-Q", "rateq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));
    let (code, out, _) = celeriac(&url, &["control", "rate-limit", "celeriac.add", "6/m", "-d", &name]);
    assert!(code == 0 && out.contains("new rate limit"), "{out}");
    let first = send(&url, "celeriac.add", "[1, 1]", "rateq");
    let second = send(&url, "celeriac.add", "[2, 2]", "rateq");
    wait_until("the first addition to succeed", Duration::from_secs(20), || state_of(&url, &first) == "SUCCESS");
    // The second addition's turn is 10 s after the first; meanwhile the only slot stays free.
    let echo = send(&url, "celeriac.echo", "[\"free\"]", "rateq");
    wait_until("the echo to succeed while the addition waits its turn", Duration::from_secs(8), || {
        state_of(&url, &echo) == "SUCCESS"
    });
    assert_ne!(state_of(&url, &second), "SUCCESS", "the rate limit was not applied");
    wait_until("the second addition to succeed in its turn", Duration::from_secs(30), || {
        state_of(&url, &second) == "SUCCESS"
    });
}

/// `celeriac result <id> --json`, whole.
fn result_json(broker: &str, id: &str) -> String {
    let results = results();
    celeriac(broker, &["--result-backend", &results, "result", id, "--json"]).1
}

#[test]
fn time_limits_set_by_remote_control_apply_to_the_next_tasks() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("tl");
    let results = results();
    let worker = WorkerProc::start(&url, &["--result-backend", &results, "-c", "2", "-n", &name, "-Q", "tlq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));

    // Celery's own CLI: a soft limit of 1 s (no hard one); celeriac.sleep stops at its soft limit.
    let (ok, out) = celery(&url, &["control", "time_limit", "celeriac.sleep", "1", "-d", &name]);
    assert!(ok && out.contains("time limits set successfully"), "celery control time_limit:\n{out}");
    let (_, out) = celery(&url, &["control", "time_limit", "no.such.task", "1", "2", "-d", &name]);
    assert!(out.contains("unknown task"), "{out}");
    // Each sleep would succeed after 30 s: a FAILURE within 20 s comes from the new limit.
    let soft = send(&url, "celeriac.sleep", "[30]", "tlq");
    wait_until("the sleep to stop at its soft limit", Duration::from_secs(20), || state_of(&url, &soft) == "FAILURE");
    assert!(result_json(&url, &soft).contains("SoftTimeLimitExceeded"), "{}", result_json(&url, &soft));

    // celeriac's CLI: no soft limit, a hard one of 1 s.
    let (code, out, _) = celeriac(&url, &["control", "time-limit", "celeriac.sleep", "0", "1", "-d", &name]);
    assert!(code == 0 && out.contains("time limits set successfully"), "{out}");
    let hard = send(&url, "celeriac.sleep", "[30]", "tlq");
    wait_until("the sleep to be stopped at its hard limit", Duration::from_secs(20), || {
        state_of(&url, &hard) == "FAILURE"
    });
    assert!(result_json(&url, &hard).contains("TimeLimitExceeded"), "{}", result_json(&url, &hard));

    // Lifted: a sleep longer than the old limits succeeds.
    let (code, out, _) = celeriac(&url, &["control", "time-limit", "celeriac.sleep", "0", "-d", &name]);
    assert!(code == 0 && out.contains("time limits set successfully"), "{out}");
    let free = send(&url, "celeriac.sleep", "[1.5]", "tlq");
    wait_until("the unlimited sleep to succeed", Duration::from_secs(20), || state_of(&url, &free) == "SUCCESS");
}

#[test]
fn pool_restart_replaces_every_child_without_interrupting_a_task() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("restart");
    let results = results();
    let worker =
        WorkerProc::start(&url, &["--result-backend", &results, "-P", "prefork", "-c", "2", "-n", &name, "-Q", "rq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));
    // Asked of this node alone, so the reply is waited for up to 10 s and no longer than it takes.
    let pids = || -> Vec<u64> {
        let (_, out, _) = celeriac(&url, &["inspect", "stats", "--json", "-d", &name]);
        let stats = serde_json::from_str::<Value>(out.trim()).unwrap_or_default();
        stats
            .get(&name)
            .and_then(|s| s["pool"]["processes"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(Value::as_u64)
            .collect()
    };
    let mut before = Vec::new();
    wait_until("the stats to list two children", Duration::from_secs(20), || {
        before = pids();
        before.len() == 2
    });

    // The task must still run when the restart arrives and when the idle child's replacement is
    // seen: on a loaded machine Celery's CLI alone can take seconds to start, so it sleeps 15 s.
    let long = send(&url, "celeriac.sleep", "[15]", "rq");
    let busy = wait_active(&url, &long)["worker_pid"].as_u64().expect("the busy child's pid");
    let (ok, out) = celery(&url, &["control", "pool_restart", "-d", &name]);
    assert!(ok && out.contains("reload started"), "celery control pool_restart:\n{out}");
    // The idle child is replaced at once, the busy one only after its task: the task succeeds.
    wait_until("the idle child to be replaced while the busy one runs its task", Duration::from_secs(20), || {
        assert_ne!(state_of(&url, &long), "SUCCESS", "the task ended before the idle child was seen replaced");
        let now = pids();
        now.len() == 2 && now.contains(&busy) && now.iter().any(|p| !before.contains(p))
    });
    wait_until("the task to succeed in the old child", Duration::from_secs(40), || state_of(&url, &long) == "SUCCESS");
    wait_until("every child to be new", Duration::from_secs(20), || {
        let now = pids();
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    });
    for pid in before {
        wait_until(&format!("old child {pid} to be gone"), Duration::from_secs(10), || {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err()
        });
    }
    let after = send(&url, "celeriac.add", "[2, 3]", "rq");
    wait_until("a task to succeed in a new child", Duration::from_secs(20), || state_of(&url, &after) == "SUCCESS");

    // celeriac's CLI too; the async pool has no children to restart and says so.
    let (code, out, _) = celeriac(&url, &["control", "pool-restart", "-d", &name]);
    assert!(code == 0 && out.contains("reload started"), "{out}");
    let async_name = node("restart-async");
    let async_worker = WorkerProc::start(&url, &["--result-backend", &results, "-n", &async_name, "-Q", "rq2"]);
    async_worker.wait_for_line("remote control ready", Duration::from_secs(30));
    let (code, out, _) = celeriac(&url, &["control", "pool-restart", "-d", &async_name]);
    assert!(code == 1 && out.contains("needs the prefork pool"), "{out}");
}

/// How a test revokes a task.
#[derive(Clone, Copy, Debug)]
enum RevokeWith {
    /// Python's `app.control.revoke(id)`, while the worker holds the task.
    Python,
    /// `celeriac control revoke <id>`, while the worker holds the task.
    Celeriac,
    /// `celeriac control revoke <id>` while no worker runs: only the result backend hears it.
    CeleriacNoWorker,
}

/// Send `celeriac.echo` with a countdown from Python, revoke it, restart the worker (a new
/// process) before the ETA, and check the new worker skips it and the result stays REVOKED.
fn revoked_countdown_task_survives_a_restart(broker: &str, how: RevokeWith, pool: &[&str]) {
    let results = results();
    let queue = format!("rv-{}", uuid::Uuid::new_v4().simple());
    let name = node(&format!("rv-{how:?}"));
    let mut args = vec!["--result-backend", results.as_str(), "-Q", queue.as_str(), "-n", name.as_str()];
    args.extend_from_slice(pool);
    let countdown = 12.0;
    let sent = std::time::Instant::now();
    let id = py_client_on(
        broker,
        &results,
        &["send", "celeriac.echo", "--args", r#"["x"]"#, "--queue", &queue, "--countdown", "12"],
    );
    let revoke_with_celeriac = |id: &str| {
        let (code, out, err) = celeriac(broker, &["--result-backend", &results, "control", "revoke", id]);
        (code, format!("{out}{err}"))
    };
    if let RevokeWith::CeleriacNoWorker = how {
        let (_, out) = revoke_with_celeriac(&id);
        assert!(out.contains("revoke recorded in"), "{out}");
    } else {
        let mut first = WorkerProc::start(broker, &args);
        first.wait_for_line("remote control ready", Duration::from_secs(30));
        wait_until("the countdown task to be held", Duration::from_secs(20), || {
            first.matching(&id).iter().any(|l| l.contains("holding until ETA"))
        });
        match how {
            RevokeWith::Python => {
                py_client_on(broker, &results, &["revoke", &id]);
            }
            _ => {
                let (code, out) = revoke_with_celeriac(&id);
                assert!(code == 0 && out.contains("flagged as revoked"), "{out}");
            }
        }
        wait_until("the worker to hear the revoke", Duration::from_secs(10), || {
            first.matching(&id).iter().any(|l| l.contains("tasks flagged as revoked"))
        });
        first.signal("TERM");
        assert!(first.wait_exit(Duration::from_secs(20)).success(), "{}", first.dump());
    }
    let second = WorkerProc::start(broker, &args);
    wait_until("the new worker to skip the revoked task", Duration::from_secs(20), || {
        second.matching(&id).iter().any(|l| l.contains("task was revoked; not running it"))
    });
    assert!(sent.elapsed().as_secs_f64() < countdown, "the restart came after the ETA; the test proves nothing");
    let got: Value = serde_json::from_str(&py_client_on(broker, &results, &["get", &id, "--timeout", "5"])).unwrap();
    assert_eq!(got["state"], json!("REVOKED"), "{got}");
    assert!(second.matching(&id).iter().all(|l| !l.contains("task succeeded")), "{}", second.dump());
}

#[test]
fn a_countdown_task_revoked_from_python_never_runs_after_a_restart_on_rabbitmq() {
    let vhost = TestVhost::new();
    revoked_countdown_task_survives_a_restart(&vhost.url(""), RevokeWith::Python, &[]);
}

#[test]
fn a_countdown_task_revoked_from_python_never_runs_after_a_restart_on_redis_in_the_prefork_pool() {
    revoked_countdown_task_survives_a_restart(&results(), RevokeWith::Python, &["-P", "prefork", "-c", "1"]);
}

#[test]
fn a_countdown_task_revoked_with_celeriac_control_never_runs_after_a_restart_on_redis() {
    revoked_countdown_task_survives_a_restart(&results(), RevokeWith::Celeriac, &[]);
}

#[test]
fn a_revoke_recorded_by_celeriac_control_with_no_worker_online_is_honoured_at_start_on_rabbitmq() {
    let vhost = TestVhost::new();
    revoked_countdown_task_survives_a_restart(
        &vhost.url(""),
        RevokeWith::CeleriacNoWorker,
        &["-P", "prefork", "-c", "1"],
    );
}

#[test]
fn a_task_whose_stored_state_is_revoked_stays_revoked_when_a_worker_runs_it() {
    // The result says REVOKED (another worker stored it) but this worker never heard the revoke:
    // it runs the task, and the outcome does not replace the REVOKED state.
    let db = SharedRedisDb::get(DB);
    let results = results();
    let queue = format!("rv-kept-{}", uuid::Uuid::new_v4().simple());
    let id = uuid::Uuid::new_v4().to_string();
    let revoked = format!(
        r#"{{"status": "REVOKED", "result": {{"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"}}, "traceback": null, "children": [], "date_done": "2026-01-01T00:00:00.000000+00:00", "task_id": "{id}"}}"#
    );
    assert_eq!(db.cli(&["SET", &format!("celery-task-meta-{id}"), &revoked, "EX", "600"]), "OK");
    let worker = WorkerProc::start(&results, &["--result-backend", &results, "-Q", &queue]);
    py_client_on(
        &results,
        &results,
        &["send", "celeriac.echo", "--args", r#"["ran"]"#, "--queue", &queue, "--task-id", &id],
    );
    wait_until("the worker to keep the REVOKED state", Duration::from_secs(20), || {
        worker.matching(&id).iter().any(|l| l.contains("stays REVOKED"))
    });
    assert_eq!(db.cli(&["GET", &format!("celery-task-meta-{id}")]), revoked, "the stored result is unchanged");
}

/// `inspect` on an SQLite broker (the default `-b`) is refused with the reason, exit 2, and
/// leaves no database file behind.
#[test]
fn inspect_on_sqlite_is_refused_without_creating_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nothere.db");
    let url = format!("sqlite://{}", db.display());
    let (code, _out, err) = run_cli(&["inspect", "active", "-b", &url], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("remote control needs an amqp:// or redis:// broker"), "{err}");
    assert!(!db.exists(), "inspect created {}", db.display());
}

/// A request can stay valid longer than its caller waits (a revoke a busy worker reads late is
/// still carried out), and a caller awaiting one node stops at its reply, not at the timeout.
#[tokio::test]
async fn a_broadcast_valid_longer_than_its_wait_says_so_and_stops_at_the_awaited_reply() {
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let name = node("awaited");
    let worker = WorkerProc::start(&url, &["--result-backend", &results(), "-n", &name, "-Q", "awaitedq"]);
    worker.wait_for_line("remote control ready", Duration::from_secs(30));
    let broker = celeriac::connect::broker(&url).unwrap();
    // A listener of our own on the fanout exchange sees the request as every worker does.
    let x = broker.exchanges().unwrap();
    let mut seen =
        x.subscribe(&pidbox_exchange(), &mailbox_binding(format!("{name}.listener"), String::new())).await.unwrap();

    let awaited = [name.clone()];
    let wait = celeriac::control::Wait {
        timeout: Duration::from_secs(60),
        valid_for: Duration::from_secs(600),
        awaited: &awaited,
    };
    let asked = std::time::Instant::now();
    let replies = celeriac::control::broadcast_with(broker.as_ref(), "ping", Map::new(), &[], wait).await.unwrap();
    let took = asked.elapsed();
    assert!(replies.iter().any(|(n, r)| n == &name && r["ok"] == json!("pong")), "{replies:?}");
    // The bound is the feature: without it the call would last the whole 60 s.
    assert!(took < Duration::from_secs(30), "stopped at the awaited node's reply, not the timeout: {took:?}");

    let request = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["method"], json!("ping"), "{body}");
    let expires = request.headers.get("expires").and_then(Value::as_f64).unwrap();
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    assert!((now + 500.0..now + 601.0).contains(&expires), "valid for 600 s, not for the wait: {expires} at {now}");
    seen.close().await;
}
