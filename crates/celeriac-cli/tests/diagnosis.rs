//! Diagnosis without strace: a hung task in a prefork child is shown as blocked, by the thread
//! that runs it, through `celeriac inspect active` (as JSON and as the table's columns), the
//! real `celery inspect active` (which must still parse the reply) and the SIGUSR1 dump; for a
//! Rust child running `celeriac.hang` and for a Python child (`--python-app`) stuck on a lock,
//! which is then killed at its hard time limit; an async-pool task has its runtime and nothing
//! read from /proc. Real RabbitMQ (a vhost per test), results in Redis database 9.

mod common;

use std::time::{Duration, Instant};

use common::{celery_cli as celery, run_cli, wait_until, SharedRedisDb, TestVhost, WorkerProc};
use serde_json::{json, Value};

const DB: u32 = 9;

fn results() -> String {
    SharedRedisDb::get(DB).url("")
}

/// A node name unique to this test run.
fn node(tag: &str) -> String {
    format!("diag-{tag}-{}@testhost", std::process::id())
}

/// `celeriac <args> --broker <broker>`; (exit code, stdout, stderr).
fn celeriac(broker: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--broker", broker]);
    run_cli(&all, &[])
}

/// Send task `name` with positional `args` (a JSON list) to `queue`; its id.
fn send(broker: &str, name: &str, args: &str, queue: &str) -> String {
    let results = results();
    let (code, out, err) = celeriac(broker, &["send", name, "--args", args, "-Q", queue, "--result-backend", &results]);
    assert_eq!(code, 0, "send {name}: {out}{err}");
    out.trim().lines().last().expect("a task id").to_string()
}

/// Task `id`'s entry in node `name`'s reply to an `active` printed as JSON by either CLI.
fn entry(json_out: &str, name: &str, id: &str) -> Option<Value> {
    let replies: Value = serde_json::from_str(json_out.trim()).ok()?;
    replies[name].as_array()?.iter().find(|t| t["id"] == json!(id)).cloned()
}

/// Wait until `celeriac inspect active` shows task `id` on node `name` sleeping in a futex wait;
/// its entry then.
fn wait_blocked_in_futex(broker: &str, name: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, err) = celeriac(broker, &["inspect", "active", "--json", "-d", name]);
        let found = entry(&out, name, id).unwrap_or(Value::Null);
        // The syscall is set on entry, the state and wait channel once the thread sleeps.
        let asleep = found["proc_state"].as_str().is_some_and(|s| s.starts_with('S')) && found["wchan"].is_string();
        if asleep && found["syscall"] == json!("futex") {
            return found;
        }
        assert!(Instant::now() < deadline, "task {id} not shown blocked in a futex wait within 30 s; last: {out}{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a blocked task's entry says: a sleeping thread of the child, in a futex wait, with its
/// runtime and the time left to its hard limit.
fn assert_blocked_entry(task: &Value, supervisor: u32, hard: f64) {
    let pid = task["worker_pid"].as_u64().expect("worker_pid") as u32;
    assert_ne!(pid, supervisor, "the child's pid, not the supervisor's: {task}");
    assert!(task["worker_tid"].as_u64().is_some(), "{task}");
    assert!(task["proc_state"].as_str().is_some_and(|s| s.starts_with('S')), "sleeping: {task}");
    assert!(task["wchan"].as_str().is_some_and(|w| w.contains("futex")), "a futex wait channel: {task}");
    let runtime = task["runtime"].as_f64().expect("runtime");
    let left = task["hard_time_left"].as_f64().expect("hard_time_left");
    assert!(runtime >= 0.0 && left > 0.0 && left <= hard, "runtime {runtime}, hard limit in {left}: {task}");
    assert!((runtime + left - hard).abs() < 1.0, "runtime + time left = the hard limit: {task}");
    let blocked = task["blocked_on"].as_str().expect("blocked_on");
    assert!(blocked.starts_with("S (sleeping) in ") && blocked.ends_with(", syscall futex"), "{blocked}");
}

/// Celery's own `inspect active` parses the reply and prints the task; its JSON keeps our keys.
fn assert_celery_lists(broker: &str, name: &str, id: &str) {
    let (ok, out) = celery(broker, &["inspect", "active", "-d", name, "--json"]);
    assert!(ok, "celery inspect active --json:\n{out}");
    let task = entry(&out, name, id).unwrap_or_else(|| panic!("{id} not in celery's reply:\n{out}"));
    assert_eq!(task["syscall"], json!("futex"), "{task}");
    let (ok, out) = celery(broker, &["inspect", "active", "-d", name]);
    assert!(ok && out.contains(id) && out.contains("futex"), "celery inspect active:\n{out}");
}

/// `celeriac inspect active`'s table has the diagnosis columns, and the task's row says what it
/// is blocked on.
fn assert_table_shows(broker: &str, name: &str, id: &str) {
    let (code, out, err) = celeriac(broker, &["inspect", "active", "-d", name]);
    assert_eq!(code, 0, "{out}{err}");
    let header = out.lines().find(|l| l.contains("ID")).unwrap_or_else(|| panic!("no header:\n{out}"));
    for column in ["PID", "TID", "RUNTIME", "HARD IN", "BLOCKED ON"] {
        assert!(header.contains(column), "column {column}:\n{out}");
    }
    let row = out.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("no row for {id}:\n{out}"));
    assert!(row.contains("S (sleeping) in ") && row.contains("syscall futex"), "{row}");
}

/// A task's stored state and result, as `celeriac result --json` prints them.
fn stored(broker: &str, id: &str) -> Value {
    let results = results();
    let (_, out, _) = celeriac(broker, &["result", id, "--json", "--result-backend", &results]);
    serde_json::from_str(out.trim()).unwrap_or(Value::Null)
}

#[test]
fn a_hung_rust_task_shows_its_futex_wait_in_inspect_active_and_the_sigusr1_dump() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let name = node("rust");
    let results = results();
    let w = WorkerProc::start(
        &broker,
        &[
            "--result-backend",
            &results,
            "-P",
            "prefork",
            "-c",
            "1",
            "-n",
            &name,
            "-Q",
            "diag.rust",
            "--time-limit",
            "120",
        ],
    );
    w.wait_for_line("remote control ready", Duration::from_secs(30));
    let id = send(&broker, "celeriac.hang", "[]", "diag.rust");

    // The task runs on the child's blocking thread, not its main thread (idle in epoll_wait).
    let task = wait_blocked_in_futex(&broker, &name, &id);
    assert_blocked_entry(&task, w.child.id(), 120.0);
    assert_ne!(task["worker_tid"], task["worker_pid"], "a blocking task's own thread: {task}");
    // Acks late (a Rust task): its message is not acknowledged before its outcome.
    assert_eq!(task["acknowledged"], false, "{task}");
    assert_table_shows(&broker, &name, &id);
    assert_celery_lists(&broker, &name, &id);

    w.signal("USR1");
    w.wait_for_line("child busy", Duration::from_secs(10));
    let line = w.matching("child busy").pop().unwrap();
    assert!(line.contains(&id) && line.contains("syscall futex") && line.contains("hard_time_left"), "{line}");
    assert!(line.contains(&format!("tid={}", task["worker_tid"])), "{line}");
}

#[test]
fn a_python_task_stuck_on_a_lock_shows_blocked_then_is_killed_at_its_hard_limit() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let name = node("py");
    let results = results();
    // Long enough for both CLIs to look at it first on a loaded machine.
    let (queue, hard) = ("diag.py", 20.0);
    let w = common::pyapp::python_worker(&broker, &results, queue, &["-n", &name, "-c", "1", "--time-limit", "20"]);
    w.wait_for_line("remote control ready", Duration::from_secs(30));
    let id = send(&broker, "pyapp.stuck", "[]", queue);

    // `threading.Lock().acquire()` twice: the interpreter's main thread waits on a futex.
    let task = wait_blocked_in_futex(&broker, &name, &id);
    assert_blocked_entry(&task, w.child.id(), hard);
    // Not acks_late: its message was acknowledged as it started, as Celery's worker says.
    assert_eq!(task["acknowledged"], true, "{task}");
    assert_table_shows(&broker, &name, &id);
    assert_celery_lists(&broker, &name, &id);

    // Then its hard limit kills it: FAILURE TimeLimitExceeded, about `hard` seconds after it
    // started.
    let started = task["time_start"].as_f64().expect("time_start");
    let mut meta = Value::Null;
    wait_until("the stuck task to be killed at its hard limit", Duration::from_secs(60), || {
        meta = stored(&broker, &id);
        meta["status"] == "FAILURE"
    });
    assert_eq!(meta["result"]["exc_type"], "TimeLimitExceeded", "{meta}");
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    let took = now - started;
    assert!(took >= hard - 0.5 && took < hard + 15.0, "FAILURE seen {took:.1}s after it started, its limit {hard}s");
    assert!(w.count("hard time limit") >= 1, "{}", w.dump());
}

#[test]
fn an_async_pool_task_has_its_runtime_and_no_proc_diagnosis() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let name = node("async");
    let results = results();
    let w = WorkerProc::start(&broker, &["--result-backend", &results, "-c", "2", "-n", &name, "-Q", "diag.async"]);
    w.wait_for_line("remote control ready", Duration::from_secs(30));
    let id = send(&broker, "celeriac.sleep", "[60]", "diag.async");
    let mut task = Value::Null;
    wait_until("the sleeping task to be active", Duration::from_secs(30), || {
        let (_, out, _) = celeriac(&broker, &["inspect", "active", "--json", "-d", &name]);
        task = entry(&out, &name, &id).unwrap_or(Value::Null);
        task.is_object()
    });
    // The worker's own pid runs it; no child thread to read, so no diagnosis keys.
    assert_eq!(task["worker_pid"], json!(w.child.id()), "{task}");
    assert!(task["runtime"].as_f64().is_some_and(|r| r >= 0.0), "{task}");
    for key in ["worker_tid", "blocked_on", "syscall", "hard_time_left"] {
        assert!(task.get(key).is_none(), "{key} in an async-pool entry: {task}");
    }
    let (code, out, err) = celeriac(&broker, &["inspect", "active", "-d", &name]);
    assert_eq!(code, 0, "{out}{err}");
    let row = out.lines().find(|l| l.contains(&id)).unwrap_or_else(|| panic!("no row for {id}:\n{out}"));
    assert!(row.contains("celeriac.sleep") && row.contains(&w.child.id().to_string()), "{row}");
}
