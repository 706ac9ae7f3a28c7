//! Throughput of the embedded SQLite broker: enqueue, drain, and end to end.
//!
//! `cargo bench -p celeriac --bench sqlite [-- --tasks N --concurrency C]`
//!
//! - enqueue: one client publishing N `celeriac.noop` messages, 256 publishes in flight;
//! - drain: a worker (async pool) emptying a queue pre-filled with N messages, results stored;
//! - end to end: the client publishing N `celeriac.add` while the worker runs, until the last
//!   result is stored.
//!
//! Figures are recorded in docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac::{App, Client, SendOptions, Shutdown, Worker, WorkerConfig};
use futures::StreamExt;
use serde_json::{json, Map, Value};

struct Args {
    tasks: usize,
    concurrency: usize,
    in_flight: usize,
}

fn parse_args() -> Args {
    let mut a = Args { tasks: 20_000, concurrency: 8, in_flight: 256 };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = argv.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (argv[i].as_str(), next) {
            ("--tasks", Some(n)) => a.tasks = n,
            ("--concurrency", Some(n)) => a.concurrency = n,
            ("--in-flight", Some(n)) => a.in_flight = n,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

async fn publish_all(
    client: &Client,
    name: &'static str,
    n: usize,
    in_flight: usize,
    ignore_result: bool,
) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let opts = SendOptions { ignore_result: Some(ignore_result), ..SendOptions::default() };
                let args: Vec<Value> = if name == "celeriac.add" { vec![json!(i), json!(1)] } else { vec![] };
                client.send_task(name, args, Map::new(), opts).await.expect("publish").id().to_string()
            }
        })
        .buffered(in_flight)
        .collect()
        .await
}

fn report(label: &str, n: usize, elapsed: Duration) {
    println!(
        "{label:<44} {n:>7} tasks in {:>7.3}s  {:>9.0} tasks/s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let client = Client::connect(&url, None).await.expect("connect");
    let registry = Arc::new(App::with_builtins().registry().clone());
    println!(
        "celeriac SQLite benchmark: {} tasks, worker concurrency {}, {} publishes in flight",
        args.tasks, args.concurrency, args.in_flight
    );

    // Enqueue.
    let t = Instant::now();
    publish_all(&client, "celeriac.noop", args.tasks, args.in_flight, true).await;
    report("enqueue (noop, ignore_result)", args.tasks, t.elapsed());

    // Drain the pre-filled queue.
    let config = WorkerConfig { concurrency: args.concurrency, ..WorkerConfig::default() };
    let worker = Worker::new(config.clone(), registry.clone(), client.broker().clone(), client.backend().clone());
    let stats = worker.stats();
    let shutdown = Shutdown::new();
    let t = Instant::now();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    while (stats.snapshot().succeeded as usize) < args.tasks {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    report("drain (noop, ignore_result, pre-filled)", args.tasks, t.elapsed());
    shutdown.warm();
    handle.await.expect("join").expect("worker");

    // End to end: publish while a worker runs, until every result is stored.
    let worker = Worker::new(config, registry, client.broker().clone(), client.backend().clone());
    let stats = worker.stats();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let t = Instant::now();
    let ids = publish_all(&client, "celeriac.add", args.tasks, args.in_flight, false).await;
    while (stats.snapshot().succeeded as usize) < args.tasks {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = t.elapsed();
    report("end to end (add, results stored)", args.tasks, elapsed);
    shutdown.warm();
    handle.await.expect("join").expect("worker");
    // Check the results really are there.
    let last = client.result(ids.last().expect("ids").clone()).get(Some(Duration::from_secs(5))).await.expect("result");
    assert_eq!(last, json!(args.tasks));
}
