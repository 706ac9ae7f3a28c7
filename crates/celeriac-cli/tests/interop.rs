//! Two-way interoperability with real Python Celery 5.7 (from the virtualenv the test command
//! creates under target/pyenv), on RabbitMQ with the Redis result backend.
//!
//! - Python `send_task` → celeriac worker → Python `AsyncResult.get()`;
//! - celeriac client → Python `celery worker` → celeriac `AsyncResult::get`;
//! - a Python worker and a celeriac worker on one queue.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac::{Client, ResultError, SendOptions, TaskState};
use common::{wait_until, TestVhost, WorkerProc};
use serde_json::{json, Map, Value};

/// Results of interop tests live in this Redis db, used by no other test.
const RESULTS: &str = "redis://127.0.0.1:6379/12";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let py = repo().join("target/pyenv/bin/python");
    assert!(py.exists(), "{} is missing: run scripts/python-env.sh (the test command does)", py.display());
    py
}

/// Run tests/interop/client.py; returns stdout.
fn py_client(broker: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo().join("tests/interop/client.py"))
        .args(args)
        .env("CELERY_BROKER_URL", broker)
        .env("CELERY_RESULT_BACKEND", RESULTS)
        .output()
        .expect("python client");
    assert!(
        out.status.success(),
        "client.py {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn py_get(broker: &str, id: &str) -> Value {
    serde_json::from_str(&py_client(broker, &["get", id, "--timeout", "30"])).expect("json from client.py get")
}

/// A real `celery worker` process.
struct PyWorker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl PyWorker {
    fn start(broker: &str, queue: &str) -> Self {
        let celery = repo().join("target/pyenv/bin/celery");
        let mut child = Command::new(celery)
            .args([
                "-A",
                "pytasks",
                "worker",
                "-P",
                "solo",
                "-Q",
                queue,
                "--loglevel=INFO",
                "-n",
                &format!("py-{queue}@%h"),
            ])
            .env("PYTHONPATH", repo().join("tests/interop"))
            .env("CELERY_BROKER_URL", broker)
            .env("CELERY_RESULT_BACKEND", RESULTS)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("celery worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let w = PyWorker { child, lines };
        let lines = w.lines.clone();
        wait_until("the Python worker to be ready", Duration::from_secs(60), || {
            lines.lock().unwrap().iter().any(|l| l.contains(" ready."))
        });
        w
    }

    fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for PyWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_clients_use_celeriac_workers_and_read_their_results() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let _w = WorkerProc::start(&broker, &["--result-backend", RESULTS, "-Q", "from_python", "-c", "4"]);

    let id = py_client(&broker, &["send", "celeriac.add", "--args", "[2, 3]", "--queue", "from_python"]);
    let r = py_get(&broker, &id);
    assert_eq!((r["state"].as_str(), &r["result"]), (Some("SUCCESS"), &json!(5)), "{r}");

    let id = py_client(
        &broker,
        &["send", "celeriac.echo", "--kwargs", r#"{"value": {"k": ["v", 1.5, null]}}"#, "--queue", "from_python"],
    );
    assert_eq!(py_get(&broker, &id)["result"], json!({"k": ["v", 1.5, null]}));

    // A celeriac task's error reaches Python as the exception Python rebuilds.
    let id = py_client(&broker, &["send", "celeriac.fail", "--args", r#"["it broke"]"#, "--queue", "from_python"]);
    let r = py_get(&broker, &id);
    assert_eq!(
        (r["state"].as_str(), r["exc_type"].as_str(), r["exc_message"].as_str()),
        (Some("FAILURE"), Some("RuntimeError"), Some("it broke")),
        "{r}"
    );

    // Retries survive: two failures, then success with retries=2.
    let id = py_client(&broker, &["send", "celeriac.flaky", "--args", "[2]", "--queue", "from_python"]);
    assert_eq!(py_get(&broker, &id)["result"], json!(2));

    // Countdown survives: not run before its time.
    let sent = chrono::Utc::now();
    let id = py_client(
        &broker,
        &["send", "celeriac.add", "--args", "[1, 1]", "--countdown", "1.5", "--queue", "from_python"],
    );
    assert_eq!(py_get(&broker, &id)["result"], json!(2));
    let client = Client::connect(&broker, Some(RESULTS)).await.unwrap();
    let meta = client.backend().get(&id).await.unwrap().unwrap();
    let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(done >= sent + chrono::Duration::milliseconds(1500), "ran at {done}, sent at {sent}");

    // Expires survives: a task that expired before a worker took it is revoked, not run.
    let id =
        py_client(&broker, &["send", "celeriac.add", "--args", "[1, 2]", "--expires", "0.5", "--queue", "expiring"]);
    let expired_at = chrono::Utc::now() + chrono::Duration::milliseconds(600);
    // The condition is the passing of time itself: wait until the expiry is behind us.
    common::wait_until_async("the task to expire", Duration::from_secs(5), || async move {
        chrono::Utc::now() >= expired_at
    })
    .await;
    let _late = WorkerProc::start(&broker, &["--result-backend", RESULTS, "-Q", "expiring", "-c", "1"]);
    // RabbitMQ drops it (the AMQP expiration property) or the worker revokes it: either way it
    // never runs.
    let q = client.broker().queues(&["expiring".into()]).await.unwrap();
    common::wait_until_async("the expired task to leave the queue", Duration::from_secs(10), || {
        let c = client.clone();
        async move { c.broker().queues(&["expiring".into()]).await.unwrap()[0].ready == 0 }
    })
    .await;
    let meta = client.backend().get(&id).await.unwrap();
    assert!(
        meta.as_ref().is_none_or(|m| m.status == TaskState::Revoked),
        "expired task ran: {meta:?} (queue was {q:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn celeriac_clients_use_python_workers_and_read_their_results() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let _py = PyWorker::start(&broker, "to_python");
    let client = Client::connect(&broker, Some(RESULTS)).await.unwrap();
    let opts = || SendOptions { queue: Some("to_python".into()), ..SendOptions::default() };
    let t = Some(Duration::from_secs(30));

    let r = client.send_task("py.add", vec![json!(2), json!(3)], Map::new(), opts()).await.unwrap();
    assert_eq!(r.get(t).await.unwrap(), json!(5));

    let kwargs = json!({"value": {"nested": [1, "two"]}}).as_object().unwrap().clone();
    let r = client.send_task("py.echo", vec![], kwargs, opts()).await.unwrap();
    assert_eq!(r.get(t).await.unwrap(), json!({"nested": [1, "two"]}));

    let r = client.send_task("py.fail", vec![json!("bad value")], Map::new(), opts()).await.unwrap();
    match r.get(t).await {
        Err(ResultError::Failed { exc_type, message, exc_module, traceback, .. }) => {
            assert_eq!(
                (exc_type.as_str(), message.as_str(), exc_module.as_str()),
                ("ValueError", "bad value", "builtins")
            );
            assert!(traceback.unwrap_or_default().contains("ValueError"), "Python's traceback comes along");
        }
        other => panic!("expected the Python ValueError, got {other:?}"),
    }
    assert_eq!(r.state().await.unwrap(), TaskState::Failure);

    let sent = chrono::Utc::now();
    let r = client
        .send_task("py.add", vec![json!(1), json!(1)], Map::new(), SendOptions { countdown: Some(1.0), ..opts() })
        .await
        .unwrap();
    assert_eq!(r.get(t).await.unwrap(), json!(2));
    let meta = r.meta().await.unwrap().unwrap();
    let done = celeriac::protocol::parse_datetime(meta.date_done.as_deref().unwrap()).unwrap();
    assert!(done >= sent + chrono::Duration::milliseconds(1000), "Python honoured celeriac's countdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_worker_and_a_celeriac_worker_share_a_queue_and_nothing_is_lost() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let py = PyWorker::start(&broker, "mixed");
    let rs = WorkerProc::start(
        &broker,
        &["--result-backend", RESULTS, "-Q", "mixed", "-c", "4", "--prefetch-multiplier", "1"],
    );
    let client = Client::connect(&broker, Some(RESULTS)).await.unwrap();
    const N: i64 = 400;
    let mut ids = Vec::new();
    for i in 0..N {
        let opts = SendOptions { queue: Some("mixed".into()), ..SendOptions::default() };
        ids.push(client.send_task("celeriac.add", vec![json!(i), json!(1000)], Map::new(), opts).await.unwrap());
    }
    for (i, r) in ids.iter().enumerate() {
        assert_eq!(r.get(Some(Duration::from_secs(60))).await.unwrap(), json!(i as i64 + 1000));
    }
    let (by_python, by_celeriac) = (py.count("succeeded in"), rs.count("task succeeded"));
    println!("mixed queue: {N} tasks, {by_python} run by Python, {by_celeriac} by celeriac");
    assert_eq!(by_python + by_celeriac, N as usize, "each task ran once");
    assert!(by_python > 0 && by_celeriac > 0, "both workers took part");
}
