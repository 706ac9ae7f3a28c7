//! The prefork pool against the failures Celery users fight: orphaned children, recycling
//! thrash, silent hangs, crashing tasks and restart loops on a backlog. Each test reproduces one.

mod common;

use std::time::{Duration, Instant};

use celeriac::{SendOptions, TaskState};
use common::{alive, children_of, run_cli, wait_until, TempDb, TestVhost, WorkerProc};
use futures::StreamExt;
use serde_json::{json, Map, Value};

async fn send(client: &celeriac::Client, name: &str, args: Value) -> String {
    let args: Vec<Value> = serde_json::from_value(args).unwrap();
    client.send_task(name, args, Map::new(), SendOptions::default()).await.unwrap().id().to_string()
}

fn start_pool(db: &TempDb, extra: &[&str]) -> (WorkerProc, Vec<u32>) {
    let mut args = vec!["-P", "prefork"];
    args.extend_from_slice(extra);
    let w = WorkerProc::start(&db.url, &args);
    let kids = children_of(w.child.id());
    (w, kids)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_supervisor_leaves_no_children_even_hung_ones() {
    let db = TempDb::new("");
    let client = db.client().await;
    let (mut w, kids) = start_pool(&db, &["-c", "4"]);
    assert_eq!(kids.len(), 4, "four children: {kids:?}");
    assert!(kids.iter().all(|p| alive(*p)));
    // Every child blocked in a futex: none of them reads its pipe, so only the parent-death
    // signal can stop them.
    for _ in 0..4 {
        send(&client, "celeriac.hang", json!([])).await;
    }
    let lines = w.lines.clone();
    wait_until("all four children to be hung", Duration::from_secs(20), || {
        lines.lock().unwrap().iter().filter(|l| l.contains("task received")).count() == 4
    });
    w.signal("KILL");
    w.wait_exit(Duration::from_secs(10));
    let killed = Instant::now();
    // The bound is the feature: the parent-death signal, not a poll, ends them.
    wait_until("every child to die with its supervisor", Duration::from_secs(2), || !kids.iter().any(|p| alive(*p)));
    println!("hung children gone {:?} after the supervisor's SIGKILL", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_long_task_lets_it_finish_and_leaves_no_process() {
    let db = TempDb::new("");
    let client = db.client().await;
    let (mut w, kids) = start_pool(&db, &["-c", "2"]);
    let id = send(&client, "celeriac.sleep", json!([2])).await;
    w.wait_for_line(&id, Duration::from_secs(20));
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", w.dump());
    assert_eq!(client.backend().get(&id).await.unwrap().unwrap().status, TaskState::Success);
    wait_until("no child to remain", Duration::from_secs(10), || !kids.iter().any(|p| alive(*p)));
}

/// A signal to the worker's whole process group (a Ctrl-C in a terminal, supervisord's
/// `stopasgroup`) is a warm shutdown: it reaches the supervisor alone, not the child running
/// the task.
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_to_the_worker_s_process_group_lets_the_running_task_finish() {
    use std::os::unix::process::CommandExt;
    for sig in ["INT", "TERM"] {
        let db = TempDb::new("");
        let client = db.client().await;
        let args = ["worker", "--broker", &db.url, "-P", "prefork", "-c", "1"];
        let mut cmd = WorkerProc::cli_command(std::path::Path::new(common::bin()), &args, &[]);
        cmd.process_group(0);
        let mut w = WorkerProc::spawn_command(cmd);
        w.wait_for_line("worker ready", Duration::from_secs(30));
        let kids = children_of(w.child.id());
        let id = send(&client, "celeriac.sleep", json!([2])).await;
        w.wait_for_line(&id, Duration::from_secs(20));
        w.signal_group(sig);
        let status = w.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "SIG{sig}: {status:?}\n{}", w.dump());
        let meta = client.backend().get(&id).await.unwrap();
        assert_eq!(meta.map(|m| m.status), Some(TaskState::Success), "SIG{sig}:\n{}", w.dump());
        wait_until("no child to remain", Duration::from_secs(10), || !kids.iter().any(|p| alive(*p)));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_shutdown_requeues_the_running_task_and_leaves_no_process() {
    let db = TempDb::new("");
    let client = db.client().await;
    let (mut w, kids) = start_pool(&db, &["-c", "2"]);
    let id = send(&client, "celeriac.sleep", json!([60])).await;
    w.wait_for_line(&id, Duration::from_secs(20));
    w.signal("TERM");
    w.wait_for_line("warm shutdown", Duration::from_secs(10));
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", w.dump());
    assert!(client.backend().get(&id).await.unwrap().is_none());
    let q = client.broker().queues(&["celery".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked), (1, 0), "{q:?}");
    wait_until("no child to remain", Duration::from_secs(10), || !kids.iter().any(|p| alive(*p)));
}

#[test]
fn a_memory_limit_below_a_fresh_child_is_refused_at_start() {
    let db = TempDb::new("");
    let (code, _, err) =
        run_cli(&["worker", "-P", "prefork", "-c", "1", "--max-memory-per-child", "2MB", "--broker", &db.url], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-memory-per-child 2.0 MB is below a fresh child's"), "{err}");
    let (code, _, err) =
        run_cli(&["worker", "-P", "prefork", "--max-memory-per-child", "lots", "--broker", &db.url], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-memory-per-child"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leaking_task_over_the_memory_limit_still_succeeds_and_the_thrash_is_reported() {
    let db = TempDb::new("");
    let client = db.client().await;
    let (w, _) = start_pool(&db, &["-c", "1", "--max-memory-per-child", "40MB"]);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(send(&client, "celeriac.alloc", json!([50, true])).await);
    }
    for id in &ids {
        let meta = client.backend().wait(id, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(meta.status, TaskState::Success, "{meta:?}");
    }
    w.wait_for_line("memory recycling thrash", Duration::from_secs(10));
    assert!(w.count("over --max-memory-per-child") >= 5, "{}", w.dump());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_hung_in_a_futex_is_killed_at_its_hard_limit_and_the_next_tasks_run() {
    let db = TempDb::new("");
    let client = db.client().await;
    let (w, _) = start_pool(&db, &["-c", "1", "--time-limit", "2"]);
    let sent = Instant::now();
    let hung = send(&client, "celeriac.hang", json!([])).await;
    let next = send(&client, "celeriac.add", json!([20, 22])).await;
    let meta = client.backend().wait(&hung, Some(Duration::from_secs(20))).await.unwrap();
    let freed = sent.elapsed();
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(meta.exception_info().unwrap().exc_type, "TimeLimitExceeded");
    // The feature is the bound: the slot is free within the hard limit plus one second (plus
    // slack for a loaded machine).
    assert!(freed < Duration::from_secs(2 + 1) + Duration::from_millis(1500), "took {freed:?}");
    assert_eq!(client.backend().wait(&next, Some(Duration::from_secs(20))).await.unwrap().result, json!(42));
    assert!(w.count("child killed and replaced") >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_task_is_retried_to_the_limit_then_fails_as_worker_lost_while_others_run() {
    let db = TempDb::new("");
    let client = db.client().await;
    let (w, _) = start_pool(&db, &["-c", "2"]);
    let crash = send(&client, "celeriac.crash", json!([])).await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push((i, send(&client, "celeriac.add", json!([i, 1])).await));
    }
    let meta = client.backend().wait(&crash, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    let exc = meta.exception_info().unwrap();
    assert_eq!(exc.exc_type, "WorkerLostError");
    assert!(exc.message().contains("SIGABRT"), "{}", exc.message());
    assert_eq!(w.matching(&crash).iter().filter(|l| l.contains("task received")).count(), 3, "three deliveries");
    for (i, id) in others {
        assert_eq!(client.backend().wait(&id, Some(Duration::from_secs(30))).await.unwrap().result, json!(i + 1));
    }
    assert_eq!(client.broker().dead_letters(10).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_on_a_backlog_of_100000_tasks_over_three_queues_drains_it_without_restarting() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let client = celeriac::Client::connect(&broker, None).await.unwrap();
    const N: usize = 100_000;
    let queues = ["backlog_a", "backlog_b", "backlog_c"];
    let sent: Vec<()> = futures::stream::iter(0..N)
        .map(|i| {
            let client = client.clone();
            async move {
                let opts = SendOptions {
                    queue: Some(queues[i % 3].to_string()),
                    ignore_result: Some(true),
                    ..SendOptions::default()
                };
                client.send_task("celeriac.noop", vec![], Map::new(), opts).await.expect("publish");
            }
        })
        .buffer_unordered(512)
        .collect()
        .await;
    assert_eq!(sent.len(), N);
    let started = Instant::now();
    let mut w =
        WorkerProc::spawn(&broker, &["-P", "prefork", "-c", "2", "-Q", "backlog_a,backlog_b,backlog_c", "-l", "warn"]);
    let pid = w.child.id();
    let depth = |client: celeriac::Client| async move {
        let q = client.broker().queues(&["backlog_a".into(), "backlog_b".into(), "backlog_c".into()]).await.unwrap();
        q.iter().map(|q| q.ready).sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while depth(client.clone()).await > 0 {
        assert!(Instant::now() < deadline, "backlog not drained in 10 minutes");
        assert!(w.child.try_wait().unwrap().is_none(), "the worker exited:\n{}", w.dump());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let unacked: Vec<String> = vhost.list("list_queues", &["name", "messages_unacknowledged"]);
    println!("backlog of {N} drained in {:?} by one prefork worker (pid {pid}); {unacked:?}", started.elapsed());
    assert_eq!(w.child.id(), pid);
    assert!(w.child.try_wait().unwrap().is_none(), "still the same worker, still running");
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success(), "{}", w.dump());
}

/// A child that cannot start (here: the binary was replaced on disk by one that exits at once, as
/// a bad deploy does) is retried with capped exponential backoff. The worker reports itself
/// degraded instead of spinning, keeps the waiting task, and recovers when a good binary is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_failing_at_start_up_is_retried_with_backoff_and_the_worker_reports_degraded() {
    use std::os::unix::fs::PermissionsExt;
    let db = TempDb::new("");
    let client = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("celeriac-copy");
    std::fs::copy(common::bin(), &program).unwrap();
    let w = WorkerProc::spawn_program(&program, &db.url, &["-P", "prefork", "-c", "1", "--max-tasks-per-child", "1"]);
    w.wait_for_line("worker ready", Duration::from_secs(30));

    // The deploy goes wrong: the binary is swapped (renamed over, as installers do) for one that
    // fails at start-up.
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "#!/bin/sh\necho 'cannot load config' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let good = dir.path().join("good");
    std::fs::hard_link(&program, &good).unwrap();
    std::fs::rename(&broken, &program).unwrap();

    // The only child is replaced after one task, and its replacement cannot start.
    let first = send(&client, "celeriac.add", json!([1, 2])).await;
    assert_eq!(client.backend().wait(&first, Some(Duration::from_secs(30))).await.unwrap().result, json!(3));
    w.wait_for_line("pool degraded", Duration::from_secs(20));
    let waiting = send(&client, "celeriac.add", json!([20, 22])).await;

    // Five more attempts: a spinning pool makes them within milliseconds; a backoff doubling
    // from 100 ms needs at least 0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s.
    let watch_started = Instant::now();
    let before = w.count("pool degraded");
    let lines = w.lines.clone();
    wait_until("five more start attempts", Duration::from_secs(30), || {
        lines.lock().unwrap().iter().filter(|l| l.contains("pool degraded")).count() >= before + 5
    });
    let took = watch_started.elapsed();
    println!("five start attempts took {took:?} while degraded");
    assert!(took >= Duration::from_secs(2), "five start attempts in {took:?}: no backoff\n{}", w.dump());
    w.signal("USR1");
    w.wait_for_line("degraded=true", Duration::from_secs(10));
    assert_eq!(client.backend().get(&waiting).await.unwrap().map(|m| m.status), None, "no child, so not run yet");

    // The good binary is back: the next attempt starts a child, the pool is healthy again and
    // the waiting task runs.
    std::fs::rename(&good, &program).unwrap();
    w.wait_for_line("pool healthy", Duration::from_secs(40));
    assert_eq!(client.backend().wait(&waiting, Some(Duration::from_secs(30))).await.unwrap().result, json!(42));
}
