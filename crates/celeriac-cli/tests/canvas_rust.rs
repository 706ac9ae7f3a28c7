//! Celery's canvas sent from Rust (`celeriac::canvas`), every result read back in Rust:
//!
//! - to real Python Celery 5.7 workers (the `py.*` tasks of `tests/interop/pytasks.py`, solo
//!   pool), on the Redis broker and on RabbitMQ, both with the Redis result backend: a chain
//!   (its value and its `parent()` steps), `link` and `link_error` (the errback gets the failed
//!   id, the callback does not run after a failure), a group of 100, a chord of 100, a chord
//!   whose header fails (`ChordError`, the body's errback), chain → group → chord nesting, and a
//!   chain that ends in a group;
//! - to celeriac workers with broker and results in one SQLite file: the same shapes (chords of
//!   50) on the async pool, and chords on the prefork pool;
//! - a chord refused at send time when the client's result backend cannot join chords, with
//!   nothing published;
//! - Canvas JSON both ways: a workflow built in Rust applied by Python, one built in Python sent
//!   from Rust (`tests/interop/canvas_json.py`), both run by a celeriac worker.
//!
//! Redis is database 4 of the binary's own `redis-server`; every test has its own `cvt-`
//! queues.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use celeriac::canvas::{chain, chord, group, Canvas, ResultHandle};
use celeriac::{Client, PublishError, ResultError, Signature, TaskState};
use common::{repo, venv_python, wait_until_async, PyCeleryWorker, SharedRedisDb, TempDb, TestVhost, WorkerProc};
use serde_json::{json, Value};

const DB: u32 = 4;

/// How long any one result may take.
const WAIT: Option<Duration> = Some(Duration::from_secs(60));

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The workers under test, and a client that sends them workflows.
struct Fleet {
    client: Client,
    /// Every signature names this queue.
    queue: String,
    /// Task names are `<prefix>.add`, `.tsum`, `.echo`, `.fail`.
    prefix: &'static str,
    /// The exception `<prefix>.fail` raises.
    fail_type: &'static str,
    quiet: Quiet,
}

/// How to know every task sent so far has run.
enum Quiet {
    /// One worker runs one task at a time in queue order (a solo pool): a task sent now runs
    /// after every task sent before it.
    InOrder,
    /// The broker counts delivered, unacknowledged messages: once the queue holds none, every
    /// task sent before has stored its result (it is stored before the ack).
    Drained,
}

impl Fleet {
    async fn python(broker: &str, backend: &str, queue: &str) -> Self {
        let client = Client::connect(broker, Some(backend)).await.expect("client");
        Fleet { client, queue: queue.into(), prefix: "py", fail_type: "ValueError", quiet: Quiet::InOrder }
    }

    async fn celeriac(db: &TempDb, queue: &str) -> Self {
        let client = db.client().await;
        Fleet { client, queue: queue.into(), prefix: "celeriac", fail_type: "RuntimeError", quiet: Quiet::Drained }
    }

    fn sig(&self, task: &str) -> Signature {
        Signature::new(format!("{}.{task}", self.prefix)).queue(self.queue.clone())
    }

    fn add(&self, x: i64, y: i64) -> Signature {
        self.sig("add").arg(x).arg(y)
    }

    /// `add` given its first argument by the task before it.
    fn add_to(&self, y: i64) -> Signature {
        self.sig("add").arg(y)
    }

    async fn send(&self, canvas: Canvas) -> ResultHandle {
        let what = canvas.0.task.clone();
        canvas.apply_async(&self.client).await.unwrap_or_else(|e| panic!("sending {what}: {e}"))
    }

    /// The value of the task `id`.
    async fn value(&self, id: &str, what: &str) -> Value {
        self.client.result(id).get(WAIT).await.unwrap_or_else(|e| panic!("{what} ({id}): {e}"))
    }

    async fn state(&self, id: &str) -> TaskState {
        self.client.result(id).state().await.expect("state")
    }

    /// Wait until every task sent so far has run.
    async fn quiet(&self) {
        match self.quiet {
            Quiet::InOrder => {
                let barrier = self.sig("echo").arg("barrier").apply_async(&self.client).await.expect("send barrier");
                assert_eq!(barrier.get(WAIT).await.expect("barrier"), json!("barrier"));
            }
            Quiet::Drained => {
                let (broker, queue) = (self.client.broker().clone(), vec![self.queue.clone()]);
                wait_until_async(&format!("queue {} to drain", self.queue), Duration::from_secs(30), || {
                    let (broker, queue) = (broker.clone(), queue.clone());
                    async move {
                        let q = &broker.queues(&queue).await.expect("queue depth")[0];
                        q.ready + q.scheduled + q.unacked == 0
                    }
                })
                .await;
            }
        }
    }

    /// `((1 + 2) + 10) + 100`, each step's value read through `parent()`.
    async fn chain_of_three(&self) {
        let r = self.send(chain([self.add(1, 2), self.add_to(10), self.add_to(100)])).await;
        assert_eq!(r.get(WAIT).await.expect("the chain's value"), json!(113));
        let mut parents = Vec::new();
        let mut step = r.parent();
        while let Some(s) = step {
            parents.push(s.get(WAIT).await.expect("a chain step's value"));
            step = s.parent();
        }
        assert_eq!(parents, [json!(13), json!(3)], "the chain's earlier steps, last first");
        let second = r.parent().expect("second step");
        let first = second.parent().and_then(ResultHandle::as_task).expect("first step");
        let children = first.children().await.expect("children");
        assert_eq!(ids(&children), [second.id()], "the first step's children name the step it sent");
    }

    /// A callback runs with the result; the errback does not run after a success.
    async fn callbacks(&self) {
        let (cb, eb) = (new_id(), new_id());
        let sig = self.add(2, 3).link(self.add_to(10).task_id(&cb)).link_error(self.sig("echo").task_id(&eb));
        let r = sig.apply_async(&self.client).await.expect("send");
        assert_eq!(r.get(WAIT).await.expect("linked task"), json!(5));
        assert_eq!(self.value(&cb, "the callback").await, json!(15));
        assert_eq!(ids(&r.children().await.expect("children")), [cb.as_str()], "the task's children");
        self.quiet().await;
        assert_eq!(self.state(&eb).await, TaskState::Pending, "the errback ran after a success");
    }

    /// The errback gets the failed task's id; the callback does not run after a failure.
    async fn errbacks(&self) {
        let (cb, eb) = (new_id(), new_id());
        let sig =
            self.sig("fail").arg("boom").link(self.sig("echo").task_id(&cb)).link_error(self.sig("echo").task_id(&eb));
        let r = sig.apply_async(&self.client).await.expect("send");
        assert_failed(r.get(WAIT).await, self.fail_type, "boom");
        assert_eq!(self.value(&eb, "the errback").await, json!(r.id()), "the errback's argument");
        self.quiet().await;
        assert_eq!(self.state(&cb).await, TaskState::Pending, "the callback ran after a failure");
    }

    async fn group(&self, n: i64) {
        let r = self.send(group((0..n).map(|i| self.add(i, i)))).await;
        let g = r.as_group().expect("a group's handle");
        assert_eq!(g.results.len(), n as usize);
        let want: Vec<Value> = (0..n).map(|i| json!(2 * i)).collect();
        assert_eq!(g.get(WAIT).await.expect("the group's values"), want);
    }

    async fn chord(&self, n: i64) {
        let r = self.send(chord((0..n).map(|i| self.add(i, i)), self.sig("tsum"))).await;
        assert_eq!(r.get(WAIT).await.expect("the chord's body"), json!(n * (n - 1)));
        let header = r.parent().and_then(ResultHandle::as_group).expect("the body's parent: the header group");
        let want: Vec<Value> = (0..n).map(|i| json!(2 * i)).collect();
        assert_eq!(header.get(WAIT).await.expect("the header's values"), want);
    }

    /// A failed header task fails the body with Celery's `ChordError`; the body's errback gets
    /// the body's id.
    async fn chord_with_a_failing_header(&self) {
        let eb = new_id();
        let body = self.sig("tsum").link_error(self.sig("echo").task_id(&eb));
        let r = self.send(chord([self.add(1, 1), self.sig("fail").arg("x"), self.add(2, 2)], body)).await;
        let header = r.parent().and_then(ResultHandle::as_group).expect("the header group");
        let failed = header.results[1].id();
        let want = format!("Dependency {failed} raised {}('x')", self.fail_type);
        assert_failed(r.get(WAIT).await, "ChordError", &want);
        assert_eq!(self.value(&eb, "the body's errback").await, json!(r.id()), "the body's errback's argument");
    }

    /// chain(add(1, 1), group(add(10), add(20)), tsum, group(add(1), add(2)), tsum):
    /// 2 → [12, 22] → 34 → [35, 36] → 71.
    async fn nested(&self) {
        let steps: [Canvas; 5] = [
            self.add(1, 1).into(),
            group([self.add_to(10), self.add_to(20)]),
            self.sig("tsum").into(),
            group([self.add_to(1), self.add_to(2)]),
            self.sig("tsum").into(),
        ];
        let r = self.send(chain(steps)).await;
        assert_eq!(r.get(WAIT).await.expect("the nested workflow's value"), json!(71));
    }

    /// chord([add(1, 1), add(2, 2)], chain(tsum, add(100))): the handle is the body's last
    /// step, 106.
    async fn chord_with_a_chain_body(&self) {
        let body = chain([self.sig("tsum"), self.add_to(100)]);
        let r = self.send(chord([self.add(1, 1), self.add(2, 2)], body)).await;
        assert_eq!(r.get(WAIT).await.unwrap_or_else(|e| panic!("the body chain's last step {r:?}: {e}")), json!(106));
    }

    /// chain(add(1, 1), group(add(10), add(20))): the handle is the last step's group, [12, 22].
    async fn chain_ending_in_a_group(&self) {
        let r = self.send(chain([self.add(1, 1).into(), group([self.add_to(10), self.add_to(20)])])).await;
        let g = r.as_group().unwrap_or_else(|| panic!("a chain ending in a group gave a task's handle {r:?}"));
        assert_eq!(g.get(WAIT).await.expect("the group's values"), [json!(12), json!(22)]);
        let first = g.parent.as_deref().expect("the group's parent: the first step");
        assert_eq!(first.get(WAIT).await.expect("the first step"), json!(2));
    }

    async fn every_shape(&self, n: i64) {
        self.chain_of_three().await;
        self.callbacks().await;
        self.errbacks().await;
        self.group(n).await;
        self.chord(n).await;
        self.chord_with_a_failing_header().await;
        self.nested().await;
        self.chord_with_a_chain_body().await;
        self.chain_ending_in_a_group().await;
    }
}

fn ids(handles: &[ResultHandle]) -> Vec<&str> {
    handles.iter().map(ResultHandle::id).collect()
}

fn assert_failed(got: Result<Value, ResultError>, exc: &str, message: &str) {
    match got {
        Err(ResultError::Failed { exc_type, message: m, .. }) => {
            assert_eq!((exc_type.as_str(), m.as_str()), (exc, message), "the failure")
        }
        other => panic!("expected a FAILURE {exc}: {message}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workflows_from_rust_run_on_python_workers_over_redis() {
    let url = SharedRedisDb::get(DB).url("");
    let queue = "cvt-py-redis";
    let _py = PyCeleryWorker::start(&url, &url, queue);
    Fleet::python(&url, &url, queue).await.every_shape(100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn workflows_from_rust_run_on_python_workers_over_rabbitmq() {
    let vhost = TestVhost::new();
    let (broker, backend) = (vhost.url(""), SharedRedisDb::get(DB).url(""));
    let queue = "cvt-py-amqp";
    let _py = PyCeleryWorker::start(&broker, &backend, queue);
    Fleet::python(&broker, &backend, queue).await.every_shape(100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn workflows_from_rust_run_on_celeriac_workers_on_sqlite() {
    let db = TempDb::new("");
    let queue = "cvt-sqlite";
    let w = WorkerProc::start(&db.url, &["-Q", queue, "-c", "4"]);
    Fleet::celeriac(&db, queue).await.every_shape(50).await;
    assert_eq!(w.count("malformed continuation"), 0, "{}", w.dump());
}

#[tokio::test(flavor = "multi_thread")]
async fn chords_from_rust_run_on_the_prefork_pool_on_sqlite() {
    let db = TempDb::new("");
    let queue = "cvt-prefork";
    let _w = WorkerProc::start(&db.url, &["-Q", queue, "-c", "2", "-P", "prefork"]);
    let fleet = Fleet::celeriac(&db, queue).await;
    fleet.chord(50).await;
    fleet.chord_with_a_failing_header().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chord_is_refused_at_send_time_when_the_backend_cannot_join_chords() {
    let sqlite = TempDb::new("");
    let redis = SharedRedisDb::get(DB).url("");
    let queue = "cvt-refused";
    for (broker, backend) in [(&sqlite.url, Some("disabled://")), (&redis, Some("disabled://")), (&redis, None)] {
        let client = Client::connect(broker, backend).await.expect("client");
        let depth = || async { client.broker().queues(&[queue.to_string()]).await.expect("depth")[0].ready };
        let add = |x: i64| Signature::new("celeriac.add").arg(x).arg(x).queue(queue);
        let tsum = || Signature::new("celeriac.tsum").queue(queue);
        client.apply(Signature::new("celeriac.noop").queue(queue)).await.expect("send one task");
        let before = depth().await;
        assert_eq!(before, 1, "{broker}: the task sent first");
        // A chord, and a chain holding one (a group followed by a step is a chord).
        let with_chords =
            [chord([add(1), add(2)], tsum()), chain([add(1).into(), group([add(2), add(3)]), tsum().into()])];
        for canvas in with_chords {
            match canvas.apply_async(&client).await {
                Err(e @ PublishError::Chord { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains("disabled://") && text.contains("cannot join chords"), "{text}")
                }
                other => panic!("{broker} {backend:?}: expected PublishError::Chord, got {other:?}"),
            }
            assert_eq!(depth().await, before, "{broker} {backend:?}: a refused workflow published something");
        }
        // A group needs no join: it is sent.
        group([add(1), add(2)]).apply_async(&client).await.expect("a group on a backend without chords");
        assert_eq!(depth().await, before + 2, "{broker}: the group's two tasks");
        client.broker().purge(queue).await.expect("purge");
    }
}

/// Run `tests/interop/canvas_json.py` against the broker and backend `url`, with `stdin`;
/// returns its stdout.
fn canvas_json(url: &str, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(venv_python())
        .arg(repo().join("tests/interop/canvas_json.py"))
        .args(args)
        .env("CELERY_BROKER_URL", url)
        .env("CELERY_RESULT_BACKEND", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("canvas_json.py");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "canvas_json.py {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn canvas_json_goes_from_rust_to_python_and_back() {
    let url = SharedRedisDb::get(DB).url("");
    let queue = "cvt-json";
    let w = WorkerProc::start(&url, &["--result-backend", &url, "-Q", queue, "-c", "4"]);
    let client = Client::connect(&url, Some(&url)).await.expect("client");
    let sig = |name: &str| Signature::new(name).queue(queue);
    let add_to = |y: i64| sig("celeriac.add").arg(y);

    // Built in Rust, applied by Python: (1 + 2) → chord(+10, +20) → tsum = 36, then the callback.
    let cb = new_id();
    let header = [add_to(10), add_to(20)];
    let built = chain([sig("celeriac.add").arg(1).arg(2).into(), chord(header, sig("celeriac.tsum"))])
        .link(sig("celeriac.echo").task_id(&cb));
    let out: Value = serde_json::from_str(&canvas_json(&url, &["apply"], &built.to_json())).expect("JSON line");
    assert_eq!(out["type"], json!("_chain"), "what Python made of Rust's JSON: {out}");
    assert_eq!(out["result"], json!(36), "{out}");
    let echoed = client.result(&cb).get(WAIT).await.expect("the callback linked in Rust");
    assert_eq!(echoed, json!(36));

    // Built in Python, sent from Rust: (1 + 2) + 10 → group(+1, +2) → tsum = 29.
    let text = canvas_json(&url, &["build", "--queue", queue], "");
    let canvas = Canvas::from_json(&text).unwrap_or_else(|e| panic!("Python's chain: {e}\n{text}"));
    let python: Value = serde_json::from_str(&text).expect("Python's JSON");
    let rust: Value = serde_json::from_str(&canvas.to_json()).expect("Rust's JSON");
    assert_eq!(rust, python, "Canvas::to_json gives back what Python wrote");
    let r = canvas.apply_async(&client).await.expect("send Python's chain");
    assert_eq!(r.get(WAIT).await.expect("Python's chain, run"), json!(29));
    assert_eq!(w.count("malformed continuation"), 0, "{}", w.dump());
}
