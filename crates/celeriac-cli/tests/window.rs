//! The prefetch window and the acknowledgements, on real RabbitMQ and Redis with real workers:
//! ETA (countdown) tasks held by a worker never delay another task's acknowledgement nor take
//! the window from ready tasks, and a ready task stuck behind long tasks on a busy worker goes
//! back to the broker, where a worker with a free slot takes it (issue 12, items 1 and 1b).
//!
//! The timing test runs one configuration at a time (a lock), so the bound it checks is the
//! feature's, not the machine's load.

mod common;

use std::time::{Duration, Instant};

use celeriac::{Client, SendOptions};
use common::{py_client_on, wait_until, wait_until_async, TestVhost, WorkerProc};
use serde_json::{json, Map, Value};

/// The Redis database the results (and the Redis-broker queues) of this file live in; every
/// queue and task id is unique, so nothing is flushed.
const RESULTS: &str = "redis://127.0.0.1:6379/12";

/// One test at a time: the timing test must not share the machine with the others.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The broker a test runs on: a vhost of its own on RabbitMQ, or queues of its own on Redis.
enum Broker {
    Rabbit(TestVhost),
    Redis,
}

impl Broker {
    fn url(&self) -> String {
        match self {
            Broker::Rabbit(v) => v.url(""),
            Broker::Redis => RESULTS.to_string(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Broker::Rabbit(_) => "RabbitMQ",
            Broker::Redis => "Redis",
        }
    }
}

fn brokers() -> Vec<Broker> {
    vec![Broker::Rabbit(TestVhost::new()), Broker::Redis]
}

const POOLS: [&[&str]; 2] = [&["-P", "async"], &["-P", "prefork"]];

fn worker(broker: &Broker, queue: &str, concurrency: &str, pool: &[&str]) -> WorkerProc {
    let mut args =
        vec!["--result-backend", RESULTS, "-Q", queue, "-c", concurrency, "-l", "info,celeriac_worker=debug"];
    args.extend_from_slice(pool);
    WorkerProc::start(&broker.url(), &args)
}

async fn send(client: &Client, name: &str, args: Value, queue: &str, countdown: Option<f64>) -> celeriac::AsyncResult {
    let args: Vec<Value> = serde_json::from_value(args).unwrap();
    let opts = SendOptions { queue: Some(queue.into()), countdown, ..SendOptions::default() };
    client.send_task(name, args, Map::new(), opts).await.expect("publish")
}

/// The issue's own reproduction, with a real Celery client: one task with a countdown of an hour,
/// then five quick ones on a `-c 1` worker. Each quick result must arrive (the fifth used to time
/// out: the held message's unsettled tag stopped every batched acknowledgement after it). Then
/// RabbitMQ must hold exactly one unacknowledged message, the countdown one, in a window widened
/// by one place for it.
#[test]
fn a_countdown_task_held_by_a_one_slot_worker_never_stalls_it() {
    let _serial = SERIAL.blocking_lock();
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let queue = unique("held");
    let w = WorkerProc::start(&broker, &["--result-backend", RESULTS, "-Q", &queue, "-c", "1"]);
    let send = |args: &str, extra: &[&str]| {
        let mut a = vec!["send", "celeriac.echo", "--args", args, "--queue", &queue];
        a.extend_from_slice(extra);
        py_client_on(&broker, RESULTS, &a).trim().to_string()
    };
    send(r#"["far"]"#, &["--countdown", "3600"]);
    for i in 0..5 {
        let id = send(&format!("[{i}]"), &[]);
        let got = py_client_on(&broker, RESULTS, &["get", &id, "--timeout", "10"]);
        let got: Value = serde_json::from_str(got.trim()).unwrap_or_else(|e| panic!("{e}: {got}\n{}", w.dump()));
        assert_eq!(got["result"], json!(i), "quick task {i}: {got}\n{}", w.dump());
    }
    let mut seen = None;
    wait_until("RabbitMQ to hold only the countdown task, in a window of 4 + 1", Duration::from_secs(20), || {
        seen = vhost.worker_channel();
        seen == Some((5, 1))
    });
}

/// More ETA tasks held than the whole window (20 against Celery's 16 for `-c 4`), then 60 quick
/// ones: every quick one runs, on both brokers and in both pools, and on RabbitMQ only the held
/// ones stay unacknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn any_number_of_held_eta_tasks_leave_the_whole_window_to_ready_tasks() {
    let _serial = SERIAL.lock().await;
    for broker in brokers() {
        for pool in POOLS {
            let queue = unique("eta-window");
            let w = worker(&broker, &queue, "4", pool);
            let client = Client::connect(&broker.url(), Some(RESULTS)).await.expect("client");
            for i in 0..20 {
                send(&client, "celeriac.echo", json!([format!("later {i}")]), &queue, Some(3600.0)).await;
            }
            let mut quick = Vec::new();
            for i in 0..60 {
                quick.push(send(&client, "celeriac.echo", json!([i]), &queue, None).await);
            }
            for (i, r) in quick.iter().enumerate() {
                let got = r.get(Some(Duration::from_secs(30))).await.unwrap_or_else(|e| {
                    panic!("{} {pool:?}: quick task {i} did not run: {e}\n{}", broker.name(), w.dump())
                });
                assert_eq!(got, json!(i));
            }
            if let Broker::Rabbit(vhost) = &broker {
                let mut seen = None;
                wait_until("RabbitMQ to hold only the 20 ETA tasks", Duration::from_secs(20), || {
                    seen = vhost.worker_channel();
                    seen.is_some_and(|(prefetch, unacked)| unacked == 20 && prefetch >= 16 + 20)
                });
                println!("{pool:?}: RabbitMQ channel (prefetch, unacked) = {seen:?}");
            }
        }
    }
}

/// The issue's 1b: two workers `-c 2` on one queue; after a burst of 3,000 quick tasks (which
/// widens the windows), 600 more paced over six seconds with a `celeriac.sleep(8)` before the
/// 150th, 300th and 450th, so that three of the fleet's four slots end up busy for 8 s and at
/// least one worker has both its slots taken. Every quick task must be done within 0.5 s of its
/// send: what a blocked worker held goes back and the free slot takes it.
#[tokio::test(flavor = "multi_thread")]
async fn quick_tasks_never_wait_behind_long_ones_while_another_worker_has_a_free_slot() {
    let _serial = SERIAL.lock().await;
    let mut failures = Vec::new();
    for broker in brokers() {
        for pool in POOLS {
            let queue = unique("fleet");
            let a = worker(&broker, &queue, "2", pool);
            let b = worker(&broker, &queue, "2", pool);
            let client = Client::connect(&broker.url(), Some(RESULTS)).await.expect("client");
            // The burst.
            let opts = SendOptions { queue: Some(queue.clone()), ignore_result: Some(true), ..SendOptions::default() };
            for i in 0..3000 {
                client.send_task("celeriac.add", vec![json!(i), json!(1)], Map::new(), opts.clone()).await.unwrap();
            }
            wait_until_async("the burst to drain", Duration::from_secs(120), || async {
                let q = client.broker().queues(std::slice::from_ref(&queue)).await.unwrap();
                q[0].ready == 0 && q[0].unacked == 0
            })
            .await;
            // The quick tasks, with three long ones among them.
            let started = Instant::now();
            let started_utc = chrono::Utc::now();
            let mut waits = Vec::new();
            for i in 1..=600u32 {
                if i % 150 == 0 && i < 600 {
                    send(&client, "celeriac.sleep", json!([8]), &queue, None).await;
                }
                let sent = Instant::now();
                let r = send(&client, "celeriac.add", json!([i, 1]), &queue, None).await;
                waits.push(tokio::spawn(async move {
                    let v = r.get(Some(Duration::from_secs(30))).await;
                    (i, v, sent.elapsed())
                }));
                let next = started + Duration::from_millis(10 * u64::from(i));
                tokio::time::sleep_until(next.into()).await;
            }
            let mut times = Vec::new();
            for w in waits {
                let (i, v, took) = w.await.unwrap();
                assert_eq!(v.unwrap_or_else(|e| panic!("quick task {i}: {e}")), json!(i + 1));
                times.push((took, i));
            }
            if std::env::var("WINDOW_TIMELINE").is_ok() {
                let mut by_i = times.clone();
                by_i.sort_by_key(|t| t.1);
                let line: Vec<String> =
                    by_i.chunks(25).map(|c| format!("{}", c.iter().map(|t| t.0.as_millis()).max().unwrap())).collect();
                println!("timeline (max ms per 25): {}", line.join(" "));
            }
            times.sort();
            let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize].0;
            let (slowest, which) = times[times.len() - 1];
            let released: usize = [&a, &b].iter().map(|w| w.count("giving back")).sum();
            println!(
                "{} {pool:?}: quick tasks send->result p50 {:?} p99 {:?} max {:?} (task {which}); {released} give-backs",
                broker.name(),
                p(0.5),
                p(0.99),
                slowest
            );
            if slowest > Duration::from_millis(500) {
                let slow: Vec<_> = times.iter().rev().take(8).collect();
                if std::env::var("WINDOW_TIMELINE").is_ok() {
                    println!("phase started {started_utc}\n--- a\n{}\n--- b\n{}", a.dump(), b.dump());
                }
                failures.push(format!(
                    "{} {pool:?}: quick task {which} took {slowest:?} (p50 {:?}, p99 {:?}); slowest {slow:?}\n--- worker a:\n{}\n--- worker b:\n{}",
                    broker.name(),
                    p(0.5),
                    p(0.99),
                    a.matching("giving back").join("\n"),
                    b.matching("giving back").join("\n"),
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
