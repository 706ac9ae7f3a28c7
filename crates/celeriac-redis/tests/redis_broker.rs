//! The Redis broker against the machine's real Redis (database 5, flushed once at start; the
//! tests of this file take turns, since `unacked` is shared by a whole database): kombu's key
//! layout byte for byte, which end of a list acknowledgements, requeues and restores use, lease
//! renewal, priorities, dead letters, and restores in both directions with real kombu (from the
//! virtualenv `scripts/python-env.sh` makes under `target/pyenv`).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use celeriac_core::broker::{Consumer, Delivery};
use celeriac_core::{envelope, Broker, Message, TaskBody, TaskHeaders};
use celeriac_redis::broker::keys;
use celeriac_redis::RedisBroker;
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio::sync::{Mutex, MutexGuard};

const URL: &str = "redis://127.0.0.1:6379/5";
/// The same database with a one-second visibility timeout.
const URL_VT1: &str = "redis://127.0.0.1:6379/5?visibility_timeout=1";

static TURN: Mutex<bool> = Mutex::const_new(false);

/// Take this file's turn on database 5 (flushing it before the first test).
async fn turn() -> MutexGuard<'static, bool> {
    let mut flushed = TURN.lock().await;
    if !*flushed {
        redis::cmd("FLUSHDB").exec_async(&mut conn().await).await.unwrap();
        *flushed = true;
    }
    flushed
}

async fn conn() -> MultiplexedConnection {
    redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn list(key: &str) -> Vec<Vec<u8>> {
    redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut conn().await).await.unwrap()
}

async fn score(tag: &str) -> Option<f64> {
    redis::cmd("ZSCORE").arg(keys::UNACKED_INDEX).arg(tag).query_async(&mut conn().await).await.unwrap()
}

async fn unacked(tag: &str) -> Option<Vec<u8>> {
    redis::cmd("HGET").arg(keys::UNACKED).arg(tag).query_async(&mut conn().await).await.unwrap()
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn task(id: &str, priority: Option<u8>) -> Message {
    Message::new_task(&TaskHeaders::new("rb.test", id), &TaskBody::default(), priority, None).unwrap()
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn tag_of(raw: &[u8]) -> String {
    json_of(raw)["properties"]["delivery_tag"].as_str().unwrap().to_string()
}

async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery within 10 s").unwrap()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/python");
    assert!(py.exists(), "{} is missing: run scripts/python-env.sh (the test command does)", py.display());
    py
}

async fn run_python(script: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(python()).arg("-c").arg(script).args(args).output().await.unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_writes_kombus_layout() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL).await.unwrap();
    let m = task("layout-1", Some(7));
    broker.publish("rb-layout", &m).await.unwrap();
    // Priority 7 goes to the step-6 list; nothing in the plain list.
    assert!(list("rb-layout").await.is_empty());
    let items = list("rb-layout\x06\x166").await;
    assert_eq!(items.len(), 1);
    let env = json_of(&items[0]);
    let keys_in_order: Vec<&String> = env.as_object().unwrap().keys().collect();
    assert_eq!(keys_in_order, ["body", "content-encoding", "content-type", "headers", "properties"]);
    assert_eq!(env["properties"]["delivery_info"], json!({"exchange": "", "routing_key": "rb-layout"}));
    assert_eq!(
        (env["properties"]["priority"].clone(), env["properties"]["body_encoding"].clone()),
        (json!(7), json!("base64"))
    );
    assert_eq!(envelope::decode(&items[0]).unwrap(), m);
    // Declared as Celery declares it, in both binding sets.
    for key in ["_kombu.binding.rb-layout", "_kombu.binding_permanent.rb-layout"] {
        let members: Vec<String> = redis::cmd("SMEMBERS").arg(key).query_async(&mut conn().await).await.unwrap();
        assert_eq!(members, vec!["rb-layout\x06\x16\x06\x16rb-layout".to_string()], "{key}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_are_recorded_as_kombu_records_them_and_acks_clear_them() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL).await.unwrap();
    broker.publish("rb-rec", &task("rec-1", None)).await.unwrap();
    let raw = list("rb-rec").await.remove(0);
    let tag = tag_of(&raw);
    let mut consumer = broker.consume(&["rb-rec".into()], 4).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!((d.message.task_id(), d.delivery_count, d.queue.as_str()), (Some("rec-1"), 1, "rb-rec"));
    assert!(list("rb-rec").await.is_empty());
    // `[envelope, exchange, routing_key]`, the envelope verbatim, scored by the delivery time.
    let mut expected = b"[".to_vec();
    expected.extend_from_slice(&raw);
    expected.extend_from_slice(b", \"\", \"rb-rec\"]");
    assert_eq!(String::from_utf8(unacked(&tag).await.unwrap()).unwrap(), String::from_utf8(expected).unwrap());
    let at = score(&tag).await.unwrap();
    assert!((now_secs() - at).abs() < 5.0, "scored {at}");
    d.ack().await.unwrap();
    assert_eq!((unacked(&tag).await, score(&tag).await), (None, None));
    consumer.close().await;
    consumer.flush().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requeue_goes_to_the_back_and_a_dropped_delivery_to_the_front() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL).await.unwrap();
    for id in ["end-a", "end-b", "end-c"] {
        broker.publish("rb-ends", &task(id, None)).await.unwrap();
    }
    let ids = |items: Vec<Vec<u8>>| -> Vec<String> {
        items.iter().map(|i| json_of(i)["headers"]["id"].as_str().unwrap().to_string()).collect()
    };
    let mut first = broker.consume(&["rb-ends".into()], 1).await.unwrap();
    let a = next(&mut first).await;
    assert_eq!(a.message.task_id(), Some("end-a"));
    first.close().await;
    // kombu's reject(requeue=True): LPUSH, the back of the queue (the list's left end).
    a.reject(true).await.unwrap();
    first.flush().await;
    assert_eq!(ids(list("rb-ends").await), ["end-a", "end-c", "end-b"]);

    let mut second = broker.consume(&["rb-ends".into()], 1).await.unwrap();
    let b = next(&mut second).await;
    assert_eq!(b.message.task_id(), Some("end-b"));
    second.close().await;
    // Dropped unsettled, as kombu restores at shutdown: RPUSH, the front (the right end).
    drop(b);
    second.flush().await;
    let items = list("rb-ends").await;
    assert_eq!(ids(items.clone()), ["end-a", "end-c", "end-b"]);
    for (item, flagged) in items.iter().zip([true, false, true]) {
        let env = json_of(item);
        assert_eq!(env["headers"]["redelivered"].as_bool().unwrap_or(false), flagged, "{env}");
        assert_eq!(env["properties"]["delivery_info"]["redelivered"].as_bool().unwrap_or(false), flagged, "{env}");
    }

    let mut third = broker.consume(&["rb-ends".into()], 8).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut third).await;
        // The flag is kombu's bookkeeping, not a task header: it is not passed on.
        assert!(!d.message.headers.contains_key("redelivered"));
        got.push((d.message.task_id().unwrap().to_string(), d.delivery_count));
        d.ack().await.unwrap();
    }
    assert_eq!(got, [("end-b".to_string(), 2), ("end-c".to_string(), 1), ("end-a".to_string(), 2)]);
    third.close().await;
    third.flush().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn priorities_are_consumed_in_kombus_order() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL).await.unwrap();
    for (id, p) in [("p9", Some(9)), ("p0", Some(0)), ("p5", Some(5)), ("p3", Some(3)), ("p7", Some(7)), ("pn", None)] {
        broker.publish("rb-prio", &task(id, p)).await.unwrap();
    }
    let mut consumer = broker.consume(&["rb-prio".into()], 1).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        let d = next(&mut consumer).await;
        order.push(d.message.task_id().unwrap().to_string());
        d.ack().await.unwrap();
    }
    // Lower number first; within a step (0-2, 3-5, 6-8, 9) first in, first out.
    assert_eq!(order, ["p0", "pn", "p5", "p3", "p7", "p9"]);
    consumer.close().await;
    consumer.flush().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_message_is_never_restored_while_its_consumer_lives() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL_VT1).await.unwrap();
    broker.publish("rb-lease", &task("lease-1", None)).await.unwrap();
    let tag = tag_of(&list("rb-lease").await[0]);
    let mut consumer = broker.consume(&["rb-lease".into()], 1).await.unwrap();
    let d = next(&mut consumer).await;
    // Another worker with the same one-second visibility timeout sweeps for 3.5 s.
    let other = RedisBroker::connect(URL_VT1).await.unwrap();
    let until = Instant::now() + Duration::from_millis(3500);
    let mut sweeps = 0;
    while Instant::now() < until {
        assert_eq!(other.restore_expired().await.unwrap(), 0, "a held message was restored");
        sweeps += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sweeps > 10);
    assert!(list("rb-lease").await.is_empty());
    let age = now_secs() - score(&tag).await.expect("still recorded");
    assert!(age < 1.0, "the lease is renewed: {age:.2}s old");
    d.ack().await.unwrap();
    assert_eq!(unacked(&tag).await, None);
    consumer.close().await;
    consumer.flush().await;
}

/// Publishes with kombu, takes the message without acknowledging it, and dies.
const PY_TAKE_AND_DIE: &str = r#"
import os, sys
from kombu import Connection, Exchange, Queue
url, name = sys.argv[1:3]
conn = Connection(url, transport_options={'visibility_timeout': 1})
ch = conn.channel()
q = Queue(name, Exchange(name, type='direct'), routing_key=name)
conn.Producer(ch).publish({'hello': 'world'}, exchange='', routing_key=name, declare=[q],
                          serializer='json', priority=4)
m = q(ch).get(no_ack=False)
print(m.delivery_tag, flush=True)
os._exit(0)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_python_delivery_is_restored_once_by_concurrent_sweeps() {
    let _turn = turn().await;
    let tag = run_python(PY_TAKE_AND_DIE, &[URL, "rb-pyrestore"]).await;
    assert!(unacked(&tag).await.is_some(), "kombu recorded its delivery");
    wait_until("the Python delivery to pass its visibility timeout", Duration::from_secs(10), || {
        let tag = tag.clone();
        async move { score(&tag).await.is_some_and(|s| now_secs() - s > 1.2) }
    })
    .await;
    // No sweep of an earlier test may still hold the restore lock (it would make both skip).
    wait_until("the restore lock to be free", Duration::from_secs(20), || async {
        !redis::cmd("EXISTS").arg(keys::UNACKED_MUTEX).query_async::<bool>(&mut conn().await).await.unwrap()
    })
    .await;
    let (a, b) = (RedisBroker::connect(URL_VT1).await.unwrap(), RedisBroker::connect(URL_VT1).await.unwrap());
    let (ra, rb) = tokio::join!(a.restore_expired(), b.restore_expired());
    assert_eq!(ra.unwrap() + rb.unwrap(), 1, "restored exactly once");
    assert_eq!((unacked(&tag).await, score(&tag).await), (None, None));
    // Back in its priority list (4 → step 3), flagged as kombu flags it.
    let items = list("rb-pyrestore\x06\x163").await;
    assert_eq!(items.len(), 1);
    let env = json_of(&items[0]);
    assert_eq!(
        (env["headers"]["redelivered"].clone(), env["properties"]["delivery_info"]["redelivered"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(env["properties"]["delivery_tag"], json!(tag));
    let mut consumer = a.consume(&["rb-pyrestore".into()], 1).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.delivery_count, 2);
    assert_eq!(json_of(&d.message.body), json!({"hello": "world"}));
    d.ack().await.unwrap();
    consumer.close().await;
    consumer.flush().await;
}

/// kombu's own sweep, as a Python worker runs it.
const PY_RESTORE: &str = r#"
import sys
from kombu import Connection
conn = Connection(sys.argv[1], transport_options={'visibility_timeout': 1})
conn.channel().qos.restore_visible(num=100)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn kombu_restores_the_deliveries_of_a_celeriac_worker_that_died() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL).await.unwrap();
    broker.publish("rb-died", &task("died-1", Some(9))).await.unwrap();
    let tag = tag_of(&list("rb-died\x06\x169").await[0]);
    // A worker that takes the message and dies: its runtime (fetcher, renewals) goes away with
    // the delivery unsettled.
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let broker = RedisBroker::connect(URL_VT1).await.unwrap();
            let mut consumer = broker.consume(&["rb-died".into()], 1).await.unwrap();
            std::mem::forget(next(&mut consumer).await);
        });
    })
    .join()
    .unwrap();
    assert!(unacked(&tag).await.is_some());
    wait_until("the dead worker's lease to lapse", Duration::from_secs(10), || {
        let tag = tag.clone();
        async move { score(&tag).await.is_some_and(|s| now_secs() - s > 1.2) }
    })
    .await;
    // kombu skips its sweep while another worker holds `unacked_mutex` (the dead worker may have
    // died holding it: it expires by itself), so sweep until it is done.
    wait_until("kombu to restore the message", Duration::from_secs(20), || {
        let tag = tag.clone();
        async move {
            run_python(PY_RESTORE, &[URL]).await;
            unacked(&tag).await.is_none()
        }
    })
    .await;
    assert_eq!(score(&tag).await, None);
    let items = list("rb-died\x06\x169").await;
    assert_eq!(items.len(), 1, "back in its priority list");
    let mut consumer = broker.consume(&["rb-died".into()], 1).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!((d.message.task_id(), d.delivery_count), (Some("died-1"), 2));
    d.ack().await.unwrap();
    consumer.close().await;
    consumer.flush().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_depths_and_purge() {
    let _turn = turn().await;
    let broker = RedisBroker::connect(URL).await.unwrap();
    for (id, p) in [("dl-1", Some(0)), ("dl-2", Some(6)), ("dl-3", Some(9))] {
        broker.publish("rb-depth", &task(id, p)).await.unwrap();
    }
    let depth = broker.queues(&["rb-depth".into()]).await.unwrap();
    assert_eq!((depth[0].ready, depth[0].unacked, depth[0].dead), (3, 0, 0), "{depth:?}");

    let mut consumer = broker.consume(&["rb-depth".into()], 1).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.message.task_id(), Some("dl-1"));
    consumer.close().await;
    let depth = broker.queues(&["rb-depth".into()]).await.unwrap();
    assert_eq!((depth[0].ready, depth[0].unacked), (2, 1), "{depth:?}");
    d.dead_letter("bad input: testing").await.unwrap();
    consumer.flush().await;
    let dead = broker.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].queue.as_str(), dead[0].task_id.as_deref(), dead[0].reason.as_str()),
        ("rb-depth", Some("dl-1"), "bad input: testing")
    );
    let depth = broker.queues(&["rb-depth".into()]).await.unwrap();
    assert_eq!((depth[0].ready, depth[0].unacked, depth[0].dead), (2, 0, 1), "{depth:?}");

    // Something that is not a kombu envelope is set aside with the reason, not delivered.
    redis::cmd("LPUSH").arg("rb-garbage").arg("not json at all").exec_async(&mut conn().await).await.unwrap();
    let mut consumer = broker.consume(&["rb-garbage".into()], 1).await.unwrap();
    wait_until("the garbage to be dead-lettered", Duration::from_secs(10), || {
        let broker = broker.clone();
        async move { broker.dead_letters(10).await.unwrap().len() == 2 }
    })
    .await;
    consumer.close().await;
    consumer.flush().await;
    let newest = broker.dead_letters(1).await.unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!((newest[0].queue.as_str(), newest[0].task_id.as_deref()), ("rb-garbage", None));
    assert!(newest[0].reason.contains("not a kombu message envelope"), "{}", newest[0].reason);
    assert!(newest[0].id > dead[0].id);

    let all = broker.queues(&[]).await.unwrap();
    let names: Vec<&str> = all.iter().map(|q| q.name.as_str()).collect();
    assert!(names.contains(&"rb-depth") && names.contains(&"rb-garbage"), "{names:?}");
    assert_eq!(broker.purge("rb-depth").await.unwrap(), 2);
    assert_eq!(broker.queues(&["rb-depth".into()]).await.unwrap()[0].ready, 0);
}

#[tokio::test]
async fn one_holder_at_a_time_holds_a_lease() {
    let b = RedisBroker::open(URL).unwrap();
    celeriac_core::broker::check_lease_contract(&b, Duration::from_millis(300)).await.unwrap();
}
