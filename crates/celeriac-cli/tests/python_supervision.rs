//! Every supervisor guarantee, for Python children (`celeriac worker --python-app`, issue 15):
//! recycling after `--max-tasks-per-child` and over `--max-memory-per-child`, warm shutdown (also
//! by a signal to the worker's whole process group) and cold shutdown, `revoke --terminate`
//! (also with a signal the child ignores), a backlog over three queues at start, and tasks that
//! print or misbehave on the child's frame pipe. Real
//! processes throughout: the test app `tests/pyapp/pyapp.py` published to by real Celery
//! (`tests/pyapp/send.py`), a real Redis as broker and backend: a server of each test's own
//! (`PrivateRedis`), as the tasks' data keys and the flush of a shared database would otherwise
//! be seen by every test of the binary, and by a run of the same binary elsewhere on the machine.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pyapp::{app_env, pyapp_dir, python_worker, python_worker_command, spawn_python_worker};
use common::{alive, children_of, run_cli, venv_python, wait_until, PrivateRedis, WorkerProc};
use serde_json::{json, Value};

/// The test's own Redis server; its database 0 holds the broker's queues, the results and the
/// data the tasks write. Stopped when dropped.
struct Db(PrivateRedis);

impl Db {
    /// A command on the database.
    fn cli(&self, args: &[&str]) -> String {
        self.0.cli(0, args)
    }
}

/// A Redis server of the test's own, and its URL as broker and backend.
fn urls() -> (Db, String) {
    let server = PrivateRedis::start_volatile();
    let url = server.url(0);
    (Db(server), url)
}

/// Publish `count` messages of `pyapp.<task>(*args)` with real Celery, round robin over the
/// comma-separated `queues`; their ids.
fn send(url: &str, queues: &str, task: &str, args: Value, count: usize) -> Vec<String> {
    let out = Command::new(venv_python())
        .arg(pyapp_dir().join("send.py"))
        .args([queues, task, &args.to_string(), &count.to_string()])
        .envs(app_env(url, url, queues))
        .output()
        .expect("python send.py");
    assert!(out.status.success(), "send.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("send.py prints a list of ids")
}

fn send_one(url: &str, queue: &str, task: &str, args: Value) -> String {
    send(url, queue, task, args, 1).remove(0)
}

/// The stored metas of `ids` (Celery's `celery-task-meta-<id>` keys), `None` where none is.
fn metas(db: &Db, ids: &[String]) -> Vec<Option<Value>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(200) {
        let reply = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &db.0.port.to_string(), "-n", "0", "MGET"])
            .args(chunk.iter().map(|id| format!("celery-task-meta-{id}")))
            .output()
            .expect("redis-cli");
        // One line per key, empty for a missing one (no value holds a newline: JSON escapes it).
        let text = String::from_utf8_lossy(&reply.stdout);
        let lines: Vec<&str> = text.strip_suffix('\n').unwrap_or(&text).split('\n').collect();
        assert_eq!(lines.len(), chunk.len(), "MGET answered {text:?}");
        out.extend(lines.iter().map(|l| (!l.is_empty()).then(|| serde_json::from_str(l).expect("a stored meta"))));
    }
    out
}

fn meta(db: &Db, id: &str) -> Option<Value> {
    metas(db, &[id.to_string()]).remove(0)
}

/// Wait until every one of `ids` has a final state stored; their metas.
fn wait_final(db: &Db, ids: &[String], timeout: Duration, w: &WorkerProc) -> Vec<Value> {
    let is_final =
        |m: &Option<Value>| m.as_ref().is_some_and(|m| !matches!(m["status"].as_str(), Some("RETRY" | "STARTED")));
    let deadline = Instant::now() + timeout;
    loop {
        let all = metas(db, ids);
        if all.iter().all(is_final) {
            return all.into_iter().flatten().collect();
        }
        let missing = all.iter().filter(|m| !is_final(m)).count();
        assert!(
            Instant::now() < deadline,
            "{missing} of {} results not stored in {timeout:?}; log:\n{}",
            ids.len(),
            w.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The worker's Python children.
fn python_children(w: &WorkerProc) -> BTreeSet<u32> {
    children_of(w.child.id()).into_iter().collect()
}

/// The `Redis HGETALL` of `key` as a map.
fn hash(db: &Db, key: &str) -> BTreeMap<String, u64> {
    let text = db.cli(&["HGETALL", key]);
    let lines: Vec<&str> = text.lines().collect();
    lines.chunks(2).filter(|p| p.len() == 2).map(|p| (p[0].to_string(), p[1].parse().unwrap())).collect()
}

#[test]
fn python_children_are_recycled_after_max_tasks_per_child_and_no_task_is_lost() {
    let (db, url) = urls();
    let queue = "pysup.max_tasks";
    let w = python_worker(&url, &url, queue, &["-c", "2", "--max-tasks-per-child", "3"]);
    let first = python_children(&w);
    assert_eq!(first.len(), 2, "{first:?}");
    let key = "pysup.max_tasks.runs";
    let ids = send(&url, queue, "tally", json!([key]), 30);
    let got = wait_final(&db, &ids, Duration::from_secs(120), &w);
    let mut per_pid: BTreeMap<u64, usize> = BTreeMap::new();
    for m in &got {
        assert_eq!(m["status"], "SUCCESS", "{m}");
        *per_pid.entry(m["result"].as_u64().unwrap()).or_default() += 1;
    }
    // 30 tasks, at most 3 per child: at least 10 children ran them, none more than 3.
    assert!(per_pid.len() >= 10, "children and their tasks: {per_pid:?}");
    assert!(per_pid.values().all(|n| *n <= 3), "a child ran more than 3 tasks: {per_pid:?}");
    // Each task ran once.
    let runs = hash(&db, key);
    assert_eq!(runs.len(), 30, "{runs:?}");
    assert!(runs.values().all(|n| *n == 1), "a task ran twice: {runs:?}");
    // The pool is whole again, with none of the first children in it.
    wait_until("two fresh children", Duration::from_secs(30), || {
        let now = python_children(&w);
        now.len() == 2 && now.is_disjoint(&first)
    });
    assert!(first.iter().all(|p| !alive(*p)), "a recycled child is still alive: {first:?}");
    assert_eq!(w.count("pool degraded"), 0, "{}", w.dump());
}

#[test]
fn a_python_child_over_the_memory_limit_is_replaced_after_its_task_which_still_succeeds() {
    let (db, url) = urls();
    let queue = "pysup.memory";
    // A fresh Python child with the app is some tens of MB; each task leaves it 100 MB more.
    let w = python_worker(&url, &url, queue, &["-c", "1", "--max-memory-per-child", "120MB"]);
    let ids = send(&url, queue, "hog", json!([100]), 4);
    let got = wait_final(&db, &ids, Duration::from_secs(120), &w);
    assert!(got.iter().all(|m| m["status"] == "SUCCESS"), "{got:?}");
    let pids: BTreeSet<u64> = got.iter().map(|m| m["result"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 4, "each task in a fresh child: {got:?}");
    assert!(w.count("over --max-memory-per-child") >= 4, "{}", w.dump());
    // A child replaced after every task is a thrash, reported with the figures.
    w.wait_for_line("memory recycling thrash", Duration::from_secs(10));
}

/// Whether the data key `key` is set: a `slow_once` task sets it when its first run starts.
fn key_set(db: &Db, key: &str) -> bool {
    db.cli(&["EXISTS", key]) == "1"
}

/// Wait for the worker to exit; its status must be success, and no child of it may remain.
fn exits_cleanly(w: &mut WorkerProc, kids: &BTreeSet<u32>) {
    let status = w.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", w.dump());
    wait_until("no Python child to remain", Duration::from_secs(10), || kids.iter().all(|p| !alive(*p)));
}

#[test]
fn a_warm_shutdown_lets_the_running_python_task_finish_and_leaves_no_child() {
    let (db, url) = urls();
    let queue = "pysup.warm";
    let mut w = python_worker(&url, &url, queue, &["-c", "2"]);
    let kids = python_children(&w);
    let key = "pysup.warm.started";
    let id = send_one(&url, queue, "slow_once", json!([key, 3]));
    wait_until("the task to run in a child", Duration::from_secs(30), || key_set(&db, key));
    w.signal("TERM");
    exits_cleanly(&mut w, &kids);
    let m = meta(&db, &id).expect("the task's result is stored");
    assert_eq!((&m["status"], &m["result"]), (&json!("SUCCESS"), &json!("first run")), "{m}");
    assert_eq!(w.count("requeueing"), 0, "{}", w.dump());
    // Each child was asked to exit and did, by itself (its `worker_process_shutdown` ran).
    assert_eq!(w.count("a retired child did not exit"), 0, "{}", w.dump());
}

#[test]
fn a_signal_to_the_worker_s_process_group_is_still_a_warm_shutdown_for_python_tasks() {
    use std::os::unix::process::CommandExt;
    let (db, url) = urls();
    let queue = "pysup.group";
    // SIGTERM to the group is supervisord's `stopasgroup`; SIGINT to it, a Ctrl-C in a terminal.
    for sig in ["TERM", "INT"] {
        let mut cmd = python_worker_command(&url, &url, queue, &["-c", "1"]);
        cmd.process_group(0);
        let mut w = WorkerProc::spawn_command(cmd);
        w.wait_for_line("worker ready", Duration::from_secs(60));
        let kids = python_children(&w);
        let key = format!("pysup.group.{sig}");
        let id = send_one(&url, queue, "slow_once", json!([key, 3]));
        wait_until("the task to run in a child", Duration::from_secs(30), || key_set(&db, &key));
        w.signal_group(sig);
        exits_cleanly(&mut w, &kids);
        let m = meta(&db, &id).expect("the task's result is stored");
        assert_eq!((&m["status"], &m["result"]), (&json!("SUCCESS"), &json!("first run")), "SIG{sig}: {m}");
    }
}

#[test]
fn a_cold_shutdown_stops_the_running_python_task_and_the_next_worker_runs_it() {
    let (db, url) = urls();
    let queue = "pysup.cold";
    // Cold by a second SIGTERM during the warm shutdown.
    let (first_key, second_key) = ("pysup.cold.first", "pysup.cold.second");
    let first = send_one(&url, queue, "slow_once", json!([first_key, 300]));
    let mut w = python_worker(&url, &url, queue, &["-c", "1"]);
    let kids = python_children(&w);
    wait_until("the task to run in a child", Duration::from_secs(30), || key_set(&db, first_key));
    w.signal("TERM");
    w.wait_for_line("warm shutdown", Duration::from_secs(10));
    w.signal("TERM");
    exits_cleanly(&mut w, &kids);
    assert_eq!(meta(&db, &first), None, "an interrupted task stores nothing");
    assert_eq!(w.count("task interrupted by shutdown; requeueing"), 1, "{}", w.dump());

    // The message was given back: the next worker runs it (its second run returns at once).
    // Cold at once by SIGQUIT, while it runs another.
    let mut w = python_worker(&url, &url, queue, &["-c", "1"]);
    let kids = python_children(&w);
    let got = wait_final(&db, std::slice::from_ref(&first), Duration::from_secs(60), &w);
    assert_eq!((&got[0]["status"], &got[0]["result"]), (&json!("SUCCESS"), &json!("run again")), "{}", got[0]);
    let second = send_one(&url, queue, "slow_once", json!([second_key, 300]));
    wait_until("the second task to run in a child", Duration::from_secs(30), || key_set(&db, second_key));
    w.signal("QUIT");
    exits_cleanly(&mut w, &kids);
    assert_eq!(meta(&db, &second), None, "an interrupted task stores nothing");

    let w = python_worker(&url, &url, queue, &["-c", "1"]);
    let got = wait_final(&db, std::slice::from_ref(&second), Duration::from_secs(60), &w);
    assert_eq!((&got[0]["status"], &got[0]["result"]), (&json!("SUCCESS"), &json!("run again")), "{}", got[0]);
}

/// A worker named after `tag`, with one child, that answers remote control and runs a
/// `slow_once` task of `seconds` on `pysup.<tag>`: (the worker, its name, its child, the task id).
fn one_child_running_a_slow_task(
    db: &Db,
    url: &str,
    tag: &str,
    seconds: u64,
) -> (WorkerProc, String, BTreeSet<u32>, String) {
    let queue = format!("pysup.{tag}");
    let name = format!("pysup-{tag}-{}@testhost", std::process::id());
    let w = python_worker(url, url, &queue, &["-c", "1", "-n", &name]);
    w.wait_for_line("remote control ready", Duration::from_secs(30));
    let kids = python_children(&w);
    assert_eq!(kids.len(), 1, "{kids:?}");
    let key = format!("pysup.{tag}.started");
    let id = send_one(url, &queue, "slow_once", json!([key, seconds]));
    wait_until("the task to run in a child", Duration::from_secs(30), || key_set(db, &key));
    (w, name, kids, id)
}

#[test]
fn revoke_terminate_kills_the_python_child_stores_revoked_and_a_fresh_child_runs_the_next_task() {
    let (db, url) = urls();
    let queue = "pysup.revoke";
    let (w, name, kids, id) = one_child_running_a_slow_task(&db, &url, "revoke", 300);

    let (code, out, err) = run_cli(&["control", "revoke", "--terminate", &id, "-d", &name, "--broker", &url], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("terminate: {id}")), "{out}");
    let got = wait_final(&db, std::slice::from_ref(&id), Duration::from_secs(30), &w);
    assert_eq!(got[0]["status"], "REVOKED", "{}", got[0]);
    assert_eq!(got[0]["result"]["exc_type"], "TaskRevokedError", "{}", got[0]);
    wait_until("the child to be gone", Duration::from_secs(10), || kids.iter().all(|p| !alive(*p)));

    // A fresh child takes the slot and runs the next task; the terminated one is not requeued.
    let next = send_one(&url, queue, "add", json!([2, 3]));
    let got = wait_final(&db, std::slice::from_ref(&next), Duration::from_secs(60), &w);
    assert_eq!((&got[0]["status"], &got[0]["result"]), (&json!("SUCCESS"), &json!(5)), "{}", got[0]);
    let now = python_children(&w);
    assert!(now.len() == 1 && now.is_disjoint(&kids), "a fresh child: {now:?} (was {kids:?})");
    assert_eq!(w.count("requeueing"), 0, "{}", w.dump());
}

#[test]
fn a_terminate_signal_the_python_child_ignores_leaves_no_mark_on_its_next_task() {
    let (db, url) = urls();
    let queue = "pysup.ignored";
    let (w, name, kids, id) = one_child_running_a_slow_task(&db, &url, "ignored", 2);
    // A Python child ignores SIGINT (as Celery's children do): the task runs on, in that child.
    let args = ["control", "revoke", "--terminate", "-s", "INT", &id, "-d", &name, "--broker", &url];
    let (code, out, err) = run_cli(&args, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let lines = w.lines.clone();
    wait_until("the task to end in its child", Duration::from_secs(30), || {
        lines.lock().unwrap().iter().any(|l| l.contains(&id) && l.contains("task succeeded"))
    });
    assert_eq!(python_children(&w), kids, "the same child");
    assert_eq!(meta(&db, &id).unwrap()["status"], "REVOKED", "a revoked task stays REVOKED");
    // The child's next loss is a lost worker, not the termination asked for before.
    let next = send_one(&url, queue, "frame_close", json!([]));
    let got = wait_final(&db, std::slice::from_ref(&next), Duration::from_secs(120), &w);
    assert_eq!(got[0]["status"], "FAILURE", "{}", got[0]);
    assert_eq!(got[0]["result"]["exc_type"], "WorkerLostError", "{}", got[0]);
}

#[test]
fn a_backlog_over_three_queues_at_start_drains_with_no_restart_and_no_task_lost_or_doubled() {
    let (db, url) = urls();
    let queues = "pysup.backlog_a,pysup.backlog_b,pysup.backlog_c";
    let key = "pysup.backlog.runs";
    const N: usize = 300;
    let ids = send(&url, queues, "tally", json!([key]), N);
    let depth: u64 = queues.split(',').map(|q| db.cli(&["LLEN", q]).parse::<u64>().unwrap()).sum();
    assert_eq!(depth, N as u64, "the backlog is in the three queues before the worker starts");

    let w = spawn_python_worker(&url, &url, queues, &["-c", "2", "--max-memory-per-child", "300MB"]);
    w.wait_for_line("worker ready", Duration::from_secs(60));
    let kids = python_children(&w);
    assert_eq!(kids.len(), 2, "{kids:?}");
    let got = wait_final(&db, &ids, Duration::from_secs(300), &w);
    let pids: BTreeSet<u64> = got.iter().map(|m| m["result"].as_u64().unwrap_or(0)).collect();
    assert!(got.iter().all(|m| m["status"] == "SUCCESS"), "{:?}", got.iter().find(|m| m["status"] != "SUCCESS"));
    let runs = hash(&db, key);
    assert_eq!(runs.len(), N, "every task ran");
    assert!(runs.values().all(|n| *n == 1), "a task ran twice: {runs:?}");
    // The two children that started ran everything: no restart, no recycling.
    assert_eq!(pids, kids.iter().map(|p| u64::from(*p)).collect(), "{}", w.dump());
    assert_eq!(python_children(&w), kids);
    for trouble in ["pool degraded", "over --max-memory-per-child", "died", "requeueing"] {
        assert_eq!(w.count(trouble), 0, "{trouble}:\n{}", w.dump());
    }
    let left: u64 = queues.split(',').map(|q| db.cli(&["LLEN", q]).parse::<u64>().unwrap()).sum();
    assert_eq!(left, 0);
}

#[test]
fn a_python_task_that_breaks_its_frame_pipe_loses_its_child_and_the_worker_keeps_going() {
    let (db, url) = urls();
    let queue = "pysup.pipe";
    let w = python_worker(&url, &url, queue, &["-c", "1"]);
    // Printing, however it is done, does not reach the frames.
    let loud = send_one(&url, queue, "loud", json!([]));
    let got = wait_final(&db, std::slice::from_ref(&loud), Duration::from_secs(60), &w);
    assert_eq!((&got[0]["status"], &got[0]["result"]), (&json!("SUCCESS"), &json!("still framed")), "{}", got[0]);
    assert_eq!(w.count("straight to fd 1") + w.count("through sys.__stdout__"), 2, "{}", w.dump());

    for task in ["frame_garbage", "frame_close"] {
        let before = python_children(&w);
        let id = send_one(&url, queue, task, json!([]));
        let got = wait_final(&db, std::slice::from_ref(&id), Duration::from_secs(120), &w);
        let m = &got[0];
        assert_eq!(m["status"], "FAILURE", "{task}: {m}");
        assert_eq!(m["result"]["exc_type"], "WorkerLostError", "{task}: {m}");
        // Why, in the stored reason and the log: a stream that broke is killed at once (not
        // waited for), a pipe closed is one line from the child.
        let reason = m["result"]["exc_message"].to_string();
        if task == "frame_garbage" {
            assert!(
                reason.contains("unreadable answer from the child") && reason.contains("the supervisor killed it"),
                "{reason}"
            );
        } else {
            assert!(reason.contains("exit code 1"), "{reason}");
            assert!(w.count("celeriac child: cannot write frames to the supervisor") >= 1, "{}", w.dump());
        }
        // The worker keeps going: a fresh child runs the next task.
        let next = send_one(&url, queue, "add", json!([2, 3]));
        let got = wait_final(&db, std::slice::from_ref(&next), Duration::from_secs(60), &w);
        assert_eq!((&got[0]["status"], &got[0]["result"]), (&json!("SUCCESS"), &json!(5)), "{task}: {}", got[0]);
        let now = python_children(&w);
        assert!(now.len() == 1 && now.is_disjoint(&before), "{task}: a fresh child: {now:?} (was {before:?})");
    }

    // A frame's length and too little of its body: the stream is broken once the body has not
    // followed within the deadline (10 s), not waited on forever; the task runs again.
    let key = "pysup.pipe.short";
    let id = send_one(&url, queue, "frame_short", json!([key]));
    let got = wait_final(&db, std::slice::from_ref(&id), Duration::from_secs(90), &w);
    assert_eq!((&got[0]["status"], &got[0]["result"]), (&json!("SUCCESS"), &json!("run again")), "{}", got[0]);
    assert_eq!(w.count("whose body did not follow within"), 1, "{}", w.dump());
}
