//! The RabbitMQ broker against the machine's real RabbitMQ: declarations as Celery makes them, the
//! publish retry policy against closed ports, silent listeners and a broker that goes away, and
//! workers consuming over AMQP. Each test has its own vhost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac::{Client, PublishError, SendOptions, TaskState};
use celeriac_core::PublishPolicy;
use common::{run_cli, SilentListener, TcpProxy, TempDb, TestVhost, WorkerProc};
use futures::StreamExt;
use serde_json::{json, Map, Value};

async fn amqp_client(broker: &str, results: &TempDb) -> Client {
    Client::connect(broker, Some(&results.url)).await.expect("client")
}

async fn send(client: &Client, name: &str, args: Value, queue: &str) -> Result<String, PublishError> {
    let args: Vec<Value> = serde_json::from_value(args).unwrap();
    let opts = SendOptions { queue: Some(queue.into()), ..SendOptions::default() };
    client.send_task(name, args, Map::new(), opts).await.map(|r| r.id().to_string())
}

fn unreachable_attempts(e: &PublishError) -> (u32, Duration) {
    match e {
        PublishError::Unreachable { attempts, elapsed, .. } => (*attempts, *elapsed),
        other => panic!("expected Unreachable, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_to_a_closed_port_fails_after_the_policy_s_attempts() {
    let results = TempDb::new("");
    let client = amqp_client("amqp://guest:guest@127.0.0.1:1//", &results).await;
    let started = Instant::now();
    let err = send(&client, "celeriac.noop", json!([]), "celery").await.unwrap_err();
    let (attempts, elapsed) = unreachable_attempts(&err);
    assert_eq!(attempts, 4, "1 + max_retries 3: {err}");
    // Waits 0 + 0.2 + 0.4 s; refused connections fail at once.
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1") && text.contains("4 attempts"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_to_a_silent_listener_fails_within_the_policy_and_never_hangs() {
    let silent = SilentListener::start();
    let results = TempDb::new("");
    let url = format!("amqp://guest:guest@127.0.0.1:{}//?connect_timeout=0.5", silent.port);
    let policy = PublishPolicy { max_retries: 2, ..PublishPolicy::default() };
    let client = amqp_client(&url, &results).await.with_publish_policy(policy);
    let started = Instant::now();
    let err = send(&client, "celeriac.noop", json!([]), "celery").await.unwrap_err();
    let (attempts, _) = unreachable_attempts(&err);
    assert_eq!(attempts, 3, "{err}");
    // Bound: 3 attempts x 0.5 s handshake timeout + waits 0 + 0.2 s.
    let bound = Duration::from_millis(3 * 500 + 200);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "each attempt waited for its handshake: {took:?}");
    assert!(took < bound + Duration::from_secs(3), "took {took:?}, bound {bound:?}");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_policy_timeout_caps_the_whole_call() {
    let silent = SilentListener::start();
    let results = TempDb::new("");
    let url = format!("amqp://guest:guest@127.0.0.1:{}//?connect_timeout=5", silent.port);
    let policy = PublishPolicy { timeout: Some(Duration::from_millis(800)), ..PublishPolicy::default() };
    let client = amqp_client(&url, &results).await.with_publish_policy(policy);
    let started = Instant::now();
    let err = send(&client, "celeriac.noop", json!([]), "celery").await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(800) + Duration::from_secs(2), "{took:?}: {err}");
    assert_eq!(unreachable_attempts(&err).0, 1, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_fails_within_the_policy_when_the_broker_goes_away_mid_run() {
    let vhost = TestVhost::new();
    let mut proxy = TcpProxy::start("127.0.0.1:5672").await;
    let results = TempDb::new("");
    let url = format!("amqp://guest:guest@127.0.0.1:{}/{}?connect_timeout=1", proxy.port, vhost.name);
    let client = amqp_client(&url, &results).await;
    for _ in 0..5 {
        send(&client, "celeriac.noop", json!([]), "midrun").await.expect("publish through the proxy");
    }
    proxy.stop().await;
    let started = Instant::now();
    let err = send(&client, "celeriac.noop", json!([]), "midrun").await.unwrap_err();
    let (attempts, _) = unreachable_attempts(&err);
    assert_eq!(attempts, 4, "{err}");
    // Bound: 4 attempts x (1 s connect timeout) + 0.6 s of waits; refused connects are faster.
    assert!(started.elapsed() < Duration::from_millis(4600) + Duration::from_secs(3), "{:?}", started.elapsed());
    // The five published before the stop are all there.
    let q = client.broker().queues(&["midrun".into()]).await;
    assert!(q.is_err(), "the broker is gone: {q:?}");
    let direct = Client::connect(&vhost.url(""), Some(&results.url)).await.unwrap();
    let depth = direct.broker().queues(&["midrun".into()]).await.unwrap();
    assert_eq!(depth[0].ready, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_are_declared_as_celery_declares_them() {
    let vhost = TestVhost::new();
    let results = TempDb::new("");
    let client = amqp_client(&vhost.url(""), &results).await;
    send(&client, "celeriac.noop", json!([]), "celery").await.unwrap();
    send(&client, "celeriac.noop", json!([]), "images").await.unwrap();
    let queues = vhost.list("list_queues", &["name", "durable", "auto_delete", "exclusive", "arguments"]);
    let mut queues: Vec<String> = queues.iter().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    queues.sort();
    assert_eq!(queues, vec!["celery true false false []", "images true false false []"]);
    // `celeriac queues` reads depths and consumer counts; without names, the default queue.
    let url = vhost.url("");
    let (code, out, err) = run_cli(&["queues", "--broker", &url, "celery", "images", "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<Value> = serde_json::from_str(&out).unwrap();
    let depths: Vec<(String, u64, u64)> = shown
        .iter()
        .map(|q| {
            (q["name"].as_str().unwrap().to_string(), q["ready"].as_u64().unwrap(), q["consumers"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(depths, vec![("celery".into(), 1, 0), ("images".into(), 1, 0)]);
    let (code, out, err) = run_cli(&["queues", "--broker", &url], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("cannot list queues over AMQP"), "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[1].split_whitespace().collect::<Vec<_>>(), vec!["celery", "1", "0", "0", "0", "0"], "{out}");
    let (code, _, err) = run_cli(&["queues", "--broker", &url, "no_such_queue"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no_such_queue"), "{err}");
    let exchanges = vhost.list("list_exchanges", &["name", "type", "durable", "auto_delete"]);
    for q in ["celery", "images"] {
        assert!(
            exchanges.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == vec![q, "direct", "true", "false"]),
            "{exchanges:?}"
        );
    }
    let bindings = vhost.list("list_bindings", &["source_name", "destination_name", "routing_key"]);
    assert!(
        bindings.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == vec!["images", "images", "images"]),
        "{bindings:?}"
    );
    // With a priority limit and as quorum queues, the arguments are Celery's.
    let client = amqp_client(&vhost.url("max_priority=10"), &results).await;
    send(&client, "celeriac.noop", json!([]), "prio").await.unwrap();
    let client = amqp_client(&vhost.url("queue_type=quorum"), &results).await;
    send(&client, "celeriac.noop", json!([]), "quorum_q").await.unwrap();
    let queues = vhost.list("list_queues", &["name", "arguments"]);
    assert!(
        queues.iter().any(|l| l.starts_with("prio") && l.contains("x-max-priority") && l.contains("10")),
        "{queues:?}"
    );
    assert!(
        queues.iter().any(|l| l.starts_with("quorum_q") && l.contains("x-queue-type") && l.contains("quorum")),
        "{queues:?}"
    );
    // Declared differently from an existing queue: a clear refusal, not a retry loop.
    let err = send(&amqp_client(&vhost.url("max_priority=5"), &results).await, "celeriac.noop", json!([]), "prio")
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Broker { .. }), "{err}");
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_consume_over_amqp_with_results_retries_and_countdowns() {
    let vhost = TestVhost::new();
    let results = TempDb::new("");
    let broker = vhost.url("");
    let _w = WorkerProc::start(&broker, &["--result-backend", &results.url, "-Q", "work", "-c", "4"]);
    let client = amqp_client(&broker, &results).await;
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push((i, send(&client, "celeriac.add", json!([i, 1]), "work").await.unwrap()));
    }
    let flaky = send(&client, "celeriac.flaky", json!([2]), "work").await.unwrap();
    let sent = chrono::Utc::now();
    let later = client
        .send_task(
            "celeriac.add",
            vec![json!(1), json!(1)],
            Map::new(),
            SendOptions { queue: Some("work".into()), countdown: Some(1.0), ..SendOptions::default() },
        )
        .await
        .unwrap();
    for (i, id) in &ids {
        let meta = client.backend().wait(id, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!((meta.status, meta.result), (TaskState::Success, json!(i + 1)));
    }
    let meta = client.backend().wait(&flaky, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(meta.result, json!(2));
    let meta = client.backend().wait(later.id(), Some(Duration::from_secs(30))).await.unwrap();
    let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(done >= sent + chrono::Duration::milliseconds(1000), "countdown honoured: {done} vs {sent}");
    // Everything acknowledged (batched acks were flushed).
    let client2 = client.clone();
    common::wait_until_async("the queue to be empty and acknowledged", Duration::from_secs(20), || {
        let c = client2.clone();
        async move {
            let q = c.broker().queues(&["work".into()]).await.unwrap();
            q[0].ready == 0
        }
    })
    .await;
    let q = vhost.list("list_queues", &["name", "messages_unacknowledged"]);
    assert!(q.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == vec!["work", "0"]), "{q:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_survives_its_connection_being_closed_and_nothing_is_lost() {
    let vhost = TestVhost::new();
    let results = TempDb::new("");
    let mut proxy = TcpProxy::start("127.0.0.1:5672").await;
    let via_proxy = format!("amqp://guest:guest@127.0.0.1:{}/{}?connect_timeout=1", proxy.port, vhost.name);
    let w = WorkerProc::start(&via_proxy, &["--result-backend", &results.url, "-Q", "faulty", "-c", "8"]);
    let client = Arc::new(amqp_client(&vhost.url(""), &results).await);
    const N: usize = 10_000;
    let ids: Vec<String> = futures::stream::iter(0..N)
        .map(|i| {
            let client = client.clone();
            async move { send(&client, "celeriac.add", json!([i, 0]), "faulty").await.unwrap() }
        })
        .buffered(128)
        .collect()
        .await;
    // Cut the worker off once it has done some of the work, then let it reconnect.
    let backend = client.backend().clone();
    let first = ids[500].clone();
    common::wait_until_async("some tasks to finish", Duration::from_secs(30), || {
        let (b, id) = (backend.clone(), first.clone());
        async move { b.get(&id).await.unwrap().is_some() }
    })
    .await;
    proxy.stop().await;
    w.wait_for_line("lost the broker connection", Duration::from_secs(20));
    let port = proxy.port;
    drop(proxy);
    // A new proxy on the same port: the broker is back.
    let _back = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break restart_proxy(l),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    for (i, id) in ids.iter().enumerate() {
        let meta = backend.wait(id, Some(Duration::from_secs(120))).await.unwrap_or_else(|e| panic!("task {i}: {e}"));
        assert_eq!((meta.status, meta.result), (TaskState::Success, json!(i)));
    }
    w.wait_for_line("reconnected to the broker", Duration::from_secs(20));
    let executions = w.count("task succeeded");
    println!("at-least-once under a connection cut: {N} tasks, {executions} executions, {} duplicates", executions - N);
    assert!(executions >= N);
}

/// Serve a proxy to RabbitMQ on an already bound listener.
fn restart_proxy(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Celery's window (concurrency x multiplier) for long tasks, so no worker hoards work others
/// could do; a wider one while tasks are short, so the worker is not left waiting on the broker;
/// and back to Celery's once idle.
#[tokio::test(flavor = "multi_thread")]
async fn the_prefetch_window_stays_at_celerys_for_long_tasks_and_widens_for_short_ones() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = TempDb::new("");
    let client = amqp_client(&broker, &results).await;
    for _ in 0..120 {
        send(&client, "celeriac.sleep", json!([0.2]), "window").await.unwrap();
    }
    let w = WorkerProc::start(
        &broker,
        &["--result-backend", &results.url, "-Q", "window", "-c", "2", "-l", "info,celeriac_worker=debug"],
    );
    // Long tasks: 120 x 0.2 s on two slots is 12 s of work; RabbitMQ never has more than 8 out.
    let mut samples = Vec::new();
    while samples.len() < 3 {
        if let Some(s) = vhost.worker_channel() {
            samples.push(s);
        }
    }
    let ready = client.broker().queues(&["window".into()]).await.unwrap()[0].ready;
    assert!(ready > 0, "the long tasks ran out before the samples were taken: {samples:?}");
    assert!(
        samples.iter().all(|(prefetch, unacked)| *prefetch == 8 && *unacked <= 8),
        "{samples:?}\n{}",
        w.matching("prefetch").join("\n")
    );

    // Short tasks: the window widens while they drain.
    let opts = SendOptions { queue: Some("window".into()), ignore_result: Some(true), ..SendOptions::default() };
    let sent: Vec<()> = futures::stream::iter(0..30_000)
        .map(|_| {
            let (client, opts) = (&client, opts.clone());
            async move {
                client.send_task("celeriac.noop", vec![], Map::new(), opts).await.expect("publish");
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    assert_eq!(sent.len(), 30_000);
    let mut widest = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((prefetch, _)) = vhost.worker_channel() {
            widest = widest.max(prefetch);
        }
        let ready = client.broker().queues(&["window".into()]).await.unwrap()[0].ready;
        if ready == 0 || widest > 8 {
            break;
        }
        assert!(Instant::now() < deadline, "the queue did not drain");
    }
    assert!(widest > 8, "the window never widened while short tasks drained");
    // Idle again: back to Celery's window.
    let mut now = (0, 0);
    common::wait_until("the window to come back to 8", Duration::from_secs(60), || {
        now = vhost.worker_channel().unwrap_or_default();
        now.0 == 8
    });
    println!("window widened to {widest} for short tasks; back to {} when idle", now.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriac_send_to_a_silent_amqp_listener_gives_up_at_the_publish_deadline() {
    let silent = SilentListener::start();
    let url = format!("amqp://guest:guest@127.0.0.1:{}//", silent.port);
    // The default deadline is 5 s (it was 16.6 s: four attempts of the 4 s connect timeout).
    common::send_gives_up_at_the_publish_deadline(&url);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_task_runs_exactly_max_deliveries_times_on_rabbitmq() {
    // Classic queues only say "redelivered": the count is the losses the worker saw.
    let vhost = TestVhost::new();
    let url = vhost.url("");
    let results = TempDb::new("");
    let w = WorkerProc::start(&url, &["--result-backend", &results.url, "-P", "prefork", "-c", "1", "-Q", "poison"]);
    let client = amqp_client(&url, &results).await;
    let id = send(&client, "celeriac.crash", json!([]), "poison").await.unwrap();
    let meta = client.backend().wait(&id, Some(Duration::from_secs(60))).await.unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    let exc = meta.exception_info().unwrap();
    assert_eq!(exc.exc_type, "WorkerLostError");
    assert!(exc.message().contains("lost its worker 3 times (limit 3)"), "{}", exc.message());
    let received = w.matching(&id).iter().filter(|l| l.contains("task received")).count();
    assert_eq!(received, 3, "{}", w.dump());
    let poison_line = w.matching("poison message").join("\n");
    assert!(poison_line.contains("content_type=application/json; utf-8"), "{poison_line}");
}
