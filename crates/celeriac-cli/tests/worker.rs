//! Worker behaviour across real processes on one SQLite file: sharing, crashes, shutdown, retries, revokes.

mod common;

use std::time::{Duration, Instant};

use celeriac::{SendOptions, TaskState};
use common::{TempDb, WorkerProc};
use serde_json::{json, Map, Value};

async fn send(client: &celeriac::Client, name: &str, args: Value) -> String {
    let args: Vec<Value> = serde_json::from_value(args).unwrap();
    client.send_task(name, args, Map::new(), SendOptions::default()).await.expect("send").id().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_and_a_client_share_one_file_and_run_each_task_once() {
    let db = TempDb::new("");
    let a = WorkerProc::start(&db.url, &["-c", "8", "-n", "a@test"]);
    let b = WorkerProc::start(&db.url, &["-c", "8", "-n", "b@test"]);
    let client = db.client().await;
    const N: i64 = 5000;
    let mut ids = Vec::with_capacity(N as usize);
    for i in 0..N {
        ids.push(send(&client, "celeriac.add", json!([i, 1])).await);
    }
    let backend = client.backend().clone();
    for (i, id) in ids.iter().enumerate() {
        let meta = backend.wait(id, Some(Duration::from_secs(120))).await.expect("result");
        assert_eq!(meta.status, TaskState::Success, "task {id}");
        assert_eq!(meta.result, json!(i as i64 + 1), "task {id}");
    }
    // Every task ran exactly once: the two workers' success lines add up to N.
    let (ran_a, ran_b) = (a.count("task succeeded"), b.count("task succeeded"));
    assert_eq!(ran_a + ran_b, N as usize, "a ran {ran_a}, b ran {ran_b}");
    assert!(ran_a > 0 && ran_b > 0, "both workers took part: a ran {ran_a}, b ran {ran_b}");
    let queues = client.broker().queues(&["celery".into()]).await.unwrap();
    assert_eq!((queues[0].ready, queues[0].unacked), (0, 0), "{queues:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_of_a_sigkilled_worker_are_completed_by_another_after_the_visibility_timeout() {
    let db = TempDb::new("visibility_timeout=2");
    let client = db.client().await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(send(&client, "celeriac.sleep", json!([1.5])).await);
    }
    let mut first = WorkerProc::start(&db.url, &["-c", "4"]);
    first.wait_for_line("task received", Duration::from_secs(20));
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let killed_at = Instant::now();
    // Whatever the dead worker held is invisible until its lease lapses, then redelivered.
    let second = WorkerProc::start(&db.url, &["-c", "4"]);
    for id in &ids {
        let meta = client.backend().wait(id, Some(Duration::from_secs(60))).await.expect("result");
        assert_eq!(meta.status, TaskState::Success, "task {id}");
    }
    assert!(second.count("task succeeded") >= 1);
    let redelivered =
        ids.iter().filter(|id| first.matching(id.as_str()).iter().any(|l| l.contains("task received"))).count();
    assert!(redelivered >= 1, "the killed worker had started something");
    assert!(killed_at.elapsed() >= Duration::from_secs(1), "its tasks came back only after the lease lapsed");
    let q = client.broker().queues(&["celery".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked), (0, 0), "{q:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_running_task_finish_and_leaves_queued_tasks_in_the_queue() {
    let db = TempDb::new("");
    let client = db.client().await;
    let running = send(&client, "celeriac.sleep", json!([2])).await;
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(send(&client, "celeriac.sleep", json!([2])).await);
    }
    let mut w = WorkerProc::start(&db.url, &["-c", "1", "--prefetch-multiplier", "4"]);
    w.wait_for_line(&running, Duration::from_secs(20));
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "warm shutdown exits 0: {status:?}\n{}", w.dump());
    let meta = client.backend().get(&running).await.unwrap().expect("the running task finished");
    assert_eq!(meta.status, TaskState::Success);
    for id in &queued {
        assert!(client.backend().get(id).await.unwrap().is_none(), "queued task {id} must not have run");
    }
    let q = client.broker().queues(&["celery".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked), (3, 0), "prefetched tasks went back: {q:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_is_a_cold_shutdown_that_requeues_the_running_task() {
    let db = TempDb::new("");
    let client = db.client().await;
    let long = send(&client, "celeriac.sleep", json!([60])).await;
    let mut w = WorkerProc::start(&db.url, &["-c", "1"]);
    w.wait_for_line(&long, Duration::from_secs(20));
    w.signal("TERM");
    w.wait_for_line("warm shutdown", Duration::from_secs(10));
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", w.dump());
    assert!(client.backend().get(&long).await.unwrap().is_none(), "the interrupted task has no result");
    let q = client.broker().queues(&["celery".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked), (1, 0), "the interrupted task is back in the queue: {q:?}");
}

/// Parse `retry_in=123.4ms` / `retry_in=1.2s` from a worker log line.
fn retry_delay(line: &str) -> Duration {
    let raw = line.split("retry_in=").nth(1).expect("retry_in field").split_whitespace().next().unwrap();
    let (num, unit) = raw.split_at(raw.find(|c: char| c.is_alphabetic() || c == 'µ').unwrap());
    let n: f64 = num.parse().unwrap();
    Duration::from_secs_f64(match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" => n / 1e6,
        "ns" => n / 1e9,
        other => panic!("unit {other}"),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_failing_twice_is_retried_with_backoff_and_succeeds_with_retries_2() {
    let db = TempDb::new("");
    let w = WorkerProc::start(&db.url, &["-c", "2"]);
    let client = db.client().await;
    let sent = Instant::now();
    let id = send(&client, "celeriac.flaky", json!([2])).await;
    let meta = client.backend().wait(&id, Some(Duration::from_secs(30))).await.unwrap();
    let elapsed = sent.elapsed();
    assert_eq!(meta.status, TaskState::Success, "{meta:?}");
    assert_eq!(meta.result, json!(2), "the task saw retries=2 on its last run");
    let retries = w.matching("retry scheduled");
    assert_eq!(retries.len(), 2, "{retries:?}");
    // celeriac.flaky: retry_backoff=0.2 with full jitter: retry n waits within [0, 0.2 * 2^n].
    let mut total = Duration::ZERO;
    for (n, line) in retries.iter().enumerate() {
        assert!(line.contains(&id), "retry lines carry the task id: {line}");
        let d = retry_delay(line);
        let ceiling = Duration::from_secs_f64(0.2 * 2f64.powi(n as i32));
        assert!(d <= ceiling, "retry {n} waited {d:?}, above {ceiling:?}");
        total += d;
    }
    assert!(elapsed >= total, "the ETAs were honoured: {elapsed:?} < {total:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_countdown_task_is_not_run_before_its_time() {
    let db = TempDb::new("");
    let client = db.client().await;
    let sent = chrono::Utc::now();
    let res = client
        .send_task(
            "celeriac.add",
            vec![json!(1), json!(2)],
            Map::new(),
            SendOptions { countdown: Some(1.5), ..SendOptions::default() },
        )
        .await
        .unwrap();
    let q = client.broker().queues(&["celery".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].scheduled), (0, 1), "{q:?}");
    let _w = WorkerProc::start(&db.url, &["-c", "2"]);
    let meta = client.backend().wait(res.id(), Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(meta.result, json!(3));
    let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(done >= sent + chrono::Duration::milliseconds(1500), "ran at {done}, sent at {sent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hard_time_limit_fails_the_task_and_the_worker_goes_on() {
    let db = TempDb::new("");
    let _w = WorkerProc::start(&db.url, &["-c", "1", "--time-limit", "1"]);
    let client = db.client().await;
    let slow = send(&client, "celeriac.sleep", json!([30])).await;
    let next = send(&client, "celeriac.add", json!([1, 1])).await;
    let meta = client.backend().wait(&slow, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(meta.exception_info().unwrap().exc_type, "TimeLimitExceeded");
    // No traceback, as Celery's worker stores a task killed at its hard limit.
    assert_eq!(meta.traceback, None, "{meta:?}");
    let meta = client.backend().wait(&next, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(meta.result, json!(2));
}

/// A task sent with `ignore_result` that fails stores nothing, as Celery's worker (its
/// `store_errors` is off unless the task has `store_errors_even_if_ignored`); the same failure
/// sent without it is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_of_a_task_that_ignores_its_result_is_not_stored() {
    let db = TempDb::new("");
    let client = db.client().await;
    let opts = SendOptions { ignore_result: Some(true), ..SendOptions::default() };
    let quiet = client.send_task("celeriac.fail", vec![json!("quiet")], Map::new(), opts).await.expect("send");
    let quiet = quiet.id().to_string();
    let kept = send(&client, "celeriac.fail", json!(["kept"])).await;
    let mut w = WorkerProc::start(&db.url, &["-c", "1"]);
    let meta = client.backend().wait(&kept, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    common::wait_until("the ignore_result task to fail", Duration::from_secs(20), || {
        w.matching(&quiet).iter().any(|l| l.contains("task failed"))
    });
    // A warm shutdown waits for every outcome to be settled.
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success(), "{}", w.dump());
    assert!(client.backend().get(&quiet).await.unwrap().is_none(), "{}", w.dump());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_recorded_on_an_sqlite_broker_reaches_a_running_worker_before_the_eta() {
    // SQLite has no broadcast: `celeriac control revoke` records the revoke in the file, and the
    // running worker reads it within its 10 s refresh, before the countdown ends (SQLite holds
    // the message until its ETA, so the worker refuses it when it is delivered).
    let db = TempDb::new("");
    let w = WorkerProc::start(&db.url, &["-c", "1"]);
    let client = db.client().await;
    let opts = SendOptions { countdown: Some(18.0), ..SendOptions::default() };
    let id = client.send_task("celeriac.echo", vec![json!("x")], Map::new(), opts).await.unwrap().id().to_string();
    let (code, _, stderr) = common::run_cli(&["--broker", &db.url, "control", "revoke", &id], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("revoke recorded in"), "{stderr}");
    w.wait_for_line("revoked task ids learnt from the result backend", Duration::from_secs(15));
    let meta = client.backend().wait(&id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(meta.status, TaskState::Revoked);
    w.wait_for_line("task was revoked; not running it", Duration::from_secs(20));
    assert!(w.matching(&id).iter().all(|l| !l.contains("task succeeded")), "{}", w.dump());
}
