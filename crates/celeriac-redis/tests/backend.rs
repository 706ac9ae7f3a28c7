//! The Redis result backend against the real local Redis (127.0.0.1:6379, database 11 only).
//!
//! Every test uses fresh task ids (uuid), so tests run in parallel with each other and with
//! anything else using the server; only the keys a test created are deleted.

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use celeriac_core::{BackendError, ExceptionInfo, ResultBackend, ResultMeta, TaskState};
use celeriac_redis::backend::result_key;
use celeriac_redis::RedisBackend;
use futures::StreamExt;
use serde_json::{json, Value};

const URL: &str = "redis://127.0.0.1:6379/11";

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A plain connection to database 11, to look at what the backend wrote.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.expect("Redis on 127.0.0.1:6379")
}

async fn raw_get(key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(&mut raw().await).await.unwrap()
}

async fn raw_ttl(key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query_async(&mut raw().await).await.unwrap()
}

async fn raw_set(key: &str, value: &[u8]) {
    redis::cmd("SET").arg(key).arg(value).arg("EX").arg(600).query_async::<()>(&mut raw().await).await.unwrap();
}

async fn raw_del(key: &str) {
    redis::cmd("DEL").arg(key).query_async::<()>(&mut raw().await).await.unwrap();
}

async fn backend(url: &str) -> RedisBackend {
    RedisBackend::connect(url).await.expect("Redis on 127.0.0.1:6379")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/celery/results")
}

#[tokio::test]
async fn store_get_forget_round_trip() {
    let b = backend(URL).await;
    let id = new_id();
    let key = result_key(&id);
    assert_eq!(key, format!("celery-task-meta-{id}"));
    assert_eq!(b.get(&id).await.unwrap(), None);

    let mut meta = ResultMeta::success(&id, json!({"sum": 3, "text": "h\u{e9}llo"}));
    meta.extra.insert("name".into(), json!("tasks.add"));
    b.store(&meta).await.unwrap();
    assert_eq!(raw_get(&key).await.unwrap(), meta.to_json(), "stored bytes are Celery's layout");
    let ttl = raw_ttl(&key).await;
    assert!((86_390..=86_400).contains(&ttl), "default expiry is one day, TTL {ttl}");
    assert_eq!(b.get(&id).await.unwrap(), Some(meta.clone()));

    // Replacing keeps one key; a failure round-trips its exception.
    let exc = ExceptionInfo::new("ValueError", "bad value", "builtins");
    let failed = ResultMeta::exception(&id, TaskState::Failure, &exc, Some("Traceback ...".into()));
    b.store(&failed).await.unwrap();
    let got = b.get(&id).await.unwrap().unwrap();
    assert_eq!(got.exception_info(), Some(exc));
    assert_eq!(got.traceback.as_deref(), Some("Traceback ..."));

    b.forget(&id).await.unwrap();
    assert_eq!(b.get(&id).await.unwrap(), None);
    assert_eq!(raw_get(&key).await, None);
    b.forget(&id).await.unwrap(); // forgetting twice is fine
}

#[tokio::test]
async fn result_expires_sets_or_removes_the_ttl() {
    let never = backend(&format!("{URL}?result_expires=0")).await;
    let id = new_id();
    never.store(&ResultMeta::success(&id, json!(1))).await.unwrap();
    assert_eq!(raw_ttl(&result_key(&id)).await, -1, "result_expires=0 stores without expiry");
    never.forget(&id).await.unwrap();

    let short = backend(&format!("{URL}?result_expires=120")).await;
    let id = new_id();
    short.store(&ResultMeta::success(&id, json!(1))).await.unwrap();
    let ttl = raw_ttl(&result_key(&id)).await;
    assert!((110..=120).contains(&ttl), "TTL {ttl}");
    short.forget(&id).await.unwrap();
}

#[tokio::test]
async fn store_publishes_the_result_on_the_key_channel() {
    let b = backend(URL).await;
    let id = new_id();
    let key = result_key(&id);
    let mut pubsub = redis::Client::open(URL).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&key).await.unwrap();
    let meta = ResultMeta::success(&id, json!([1, 2]));
    b.store(&meta).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next()).await.unwrap().unwrap();
    assert_eq!(message.get_channel_name(), key);
    assert_eq!(message.get_payload_bytes(), meta.to_json().as_slice());
    b.forget(&id).await.unwrap();
}

#[tokio::test]
async fn golden_celery_results_are_read() {
    let b = backend(URL).await;
    for case in ["success", "success_json", "success_extended", "failure", "failure_custom", "revoked", "started"] {
        let raw_bytes = std::fs::read(fixtures().join(format!("{case}.raw.json"))).unwrap();
        let decoded: Value =
            serde_json::from_slice(&std::fs::read(fixtures().join(format!("{case}.decoded.json"))).unwrap()).unwrap();
        let expected = &decoded["meta"];
        // Store Celery's bytes verbatim, under a fresh id so parallel runs do not collide.
        let fixture_id = expected["task_id"].as_str().unwrap();
        let id = new_id();
        assert_eq!(id.len(), fixture_id.len());
        let text = String::from_utf8(raw_bytes).unwrap().replace(fixture_id, &id);
        raw_set(&result_key(&id), text.as_bytes()).await;

        let meta = b.get(&id).await.unwrap().unwrap_or_else(|| panic!("{case}: no result"));
        assert_eq!(meta.task_id, id, "{case}");
        assert_eq!(meta.status.as_str(), expected["status"], "{case}");
        assert_eq!(meta.traceback.as_deref(), expected["traceback"].as_str(), "{case}");
        assert_eq!(meta.date_done.as_deref(), expected["date_done"].as_str(), "{case}");
        if meta.status == TaskState::Success {
            assert_eq!(meta.result, expected["result"], "{case}");
        }
        if case.starts_with("failure") {
            let exc = meta.exception_info().unwrap_or_else(|| panic!("{case}: no exception"));
            assert_eq!(exc.exc_type, expected["result"]["exc_type"], "{case}");
            assert_eq!(exc.exc_module, expected["result"]["exc_module"], "{case}");
            assert_eq!(exc.exc_message, expected["result"]["exc_message"], "{case}");
        }
        // What celeriac would write for the same result is Celery's bytes.
        assert_eq!(String::from_utf8(meta.to_json()).unwrap(), text, "{case}: re-encoding differs");
        // A ready result is returned by wait at once; a STARTED one is not ready.
        if meta.status.is_ready() {
            let start = Instant::now();
            assert_eq!(b.wait(&id, Some(Duration::from_secs(5))).await.unwrap(), meta);
            assert!(start.elapsed() < Duration::from_secs(1), "{case}");
        } else {
            let err = b.wait(&id, Some(Duration::from_millis(100))).await.unwrap_err();
            assert!(matches!(err, BackendError::Timeout { .. }), "{case}: {err}");
        }
        raw_del(&result_key(&id)).await;
    }
    let failure = {
        let id = new_id();
        let text = std::fs::read_to_string(fixtures().join("failure.raw.json"))
            .unwrap()
            .replace("c0ffee00-0000-4000-8000-000000001002", &id);
        raw_set(&result_key(&id), text.as_bytes()).await;
        let meta = b.get(&id).await.unwrap().unwrap();
        raw_del(&result_key(&id)).await;
        meta
    };
    assert_eq!(failure.status, TaskState::Failure);
    assert_eq!(failure.exception_info().unwrap().message(), "bad value");
    assert!(failure.traceback.unwrap().ends_with("ValueError: bad value\n"));
}

#[tokio::test]
async fn corrupt_results_are_reported() {
    let b = backend(URL).await;
    let id = new_id();
    raw_set(&result_key(&id), b"{not json").await;
    let err = b.get(&id).await.unwrap_err();
    assert!(matches!(&err, BackendError::Corrupt { task_id, .. } if *task_id == id), "{err}");
    raw_del(&result_key(&id)).await;
}

#[tokio::test]
async fn wait_is_woken_by_the_publish() {
    let waiter = backend(URL).await;
    let storer = backend(URL).await; // another connection, as another process would have
    let id = new_id();
    let wait = tokio::spawn({
        let (waiter, id) = (waiter.clone(), id.clone());
        async move {
            let result = waiter.wait(&id, Some(Duration::from_secs(10))).await;
            (result, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    storer.store(&ResultMeta::new(&id, TaskState::Started, json!({"pid": 1}))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!wait.is_finished(), "STARTED is not ready");
    let meta = ResultMeta::success(&id, json!(42));
    let stored_at = Instant::now();
    storer.store(&meta).await.unwrap();
    let (result, returned_at) = wait.await.unwrap();
    assert_eq!(result.unwrap(), meta);
    let latency = returned_at - stored_at;
    // The safety re-read is every second; a wake-up this fast can only come from the message.
    assert!(latency < Duration::from_millis(500), "wait returned {latency:?} after the store");
    storer.forget(&id).await.unwrap();
}

#[tokio::test]
async fn wait_times_out_when_nothing_is_stored() {
    let b = backend(URL).await;
    let id = new_id();
    let start = Instant::now();
    let err = b.wait(&id, Some(Duration::from_millis(300))).await.unwrap_err();
    let elapsed = start.elapsed();
    match err {
        BackendError::Timeout { task_id, waited } => {
            assert_eq!(task_id, id);
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
        }
        other => panic!("expected Timeout, got {other}"),
    }
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let err = b.wait(&id, Some(Duration::ZERO)).await.unwrap_err();
    assert!(matches!(err, BackendError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn many_waiters_share_one_subscription_and_unsubscribe() {
    let waiter = backend(URL).await;
    let storer = backend(URL).await;
    let ids: Vec<String> = (0..20).map(|_| new_id()).collect();
    let mut waits = Vec::new();
    // Every id is waited on twice, so channels have two waiters each.
    for id in ids.iter().chain(ids.iter()) {
        let (waiter, id) = (waiter.clone(), id.clone());
        waits.push(tokio::spawn(async move { waiter.wait(&id, Some(Duration::from_secs(10))).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    for (n, id) in ids.iter().enumerate() {
        storer.store(&ResultMeta::success(id, json!(n))).await.unwrap();
    }
    for (n, wait) in waits.into_iter().enumerate() {
        assert_eq!(wait.await.unwrap().unwrap().result, json!(n % ids.len()));
    }
    // Well before the waiters' first re-read (a second after they started): woken by messages.
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());

    // Once nobody waits, the channels are unsubscribed.
    let channels: Vec<String> = ids.iter().map(|id| result_key(id)).collect();
    let mut conn = raw().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts: Vec<(String, i64)> =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(&channels).query_async(&mut conn).await.unwrap();
        if counts.iter().all(|(_, n)| *n == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "still subscribed: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        storer.forget(id).await.unwrap();
    }
}

#[tokio::test]
async fn unreachable_port_fails_fast() {
    let url = "redis://127.0.0.1:1/0";
    let start = Instant::now();
    let err = RedisBackend::connect(url).await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5 + 2), "{:?}", start.elapsed());

    // Opened lazily, the first operations report it the same way.
    let b = RedisBackend::open(url).unwrap();
    let start = Instant::now();
    let err = b.get("x").await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    let err = b.wait("x", None).await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    let err = b.store(&ResultMeta::success("x", json!(1))).await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3 * (5 + 2)), "{:?}", start.elapsed());
}

/// A TCP server that accepts connections and never answers.
fn silent_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut reader = stream.try_clone().unwrap();
            // Read and discard what the client sends, answer nothing.
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            });
            held.push(stream);
        }
    });
    port
}

#[tokio::test]
async fn silent_server_gives_an_error_not_a_hang() {
    let port = silent_listener();
    let url = format!("redis://127.0.0.1:{port}/0?connect_timeout=1&command_timeout=1");
    let slack = Duration::from_secs(3);

    let start = Instant::now();
    let err = RedisBackend::connect(&url).await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. } | BackendError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(1) + slack, "{:?}", start.elapsed());

    let b = RedisBackend::open(&url).unwrap();
    for op in ["get", "store", "wait"] {
        let start = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(30), async {
            match op {
                "get" => b.get("x").await.map(|_| ()),
                "store" => b.store(&ResultMeta::success("x", json!(1))).await,
                _ => b.wait("x", None).await.map(|_| ()),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{op} hung"));
        let err = result.unwrap_err();
        assert!(matches!(err, BackendError::Unreachable { .. } | BackendError::Timeout { .. }), "{op}: {err}");
        // At most a connection attempt and one command's answer.
        assert!(start.elapsed() < Duration::from_secs(2) + slack, "{op}: {:?}", start.elapsed());
    }

    // With the default connect timeout (5 s), connecting still gives up in time.
    let start = Instant::now();
    let err = RedisBackend::connect(&format!("redis://127.0.0.1:{port}/0")).await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5) + slack, "{:?}", start.elapsed());
}

#[tokio::test]
async fn wrong_password_is_reported_as_unreachable() {
    // The local server has no password, so AUTH is refused during the handshake.
    let err = RedisBackend::connect("redis://:wrong@127.0.0.1:6379/11").await.unwrap_err();
    match &err {
        BackendError::Unreachable { url, reason } => {
            assert_eq!(url, "redis://:***@127.0.0.1:6379/11");
            assert!(!reason.contains("wrong"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other}"),
    }
}

#[test]
fn bad_urls_are_rejected_with_the_reason() {
    let reason = |url: &str| match RedisBackend::open(url) {
        Err(BackendError::BadUrl { url, reason }) => (url, reason),
        Err(other) => panic!("{url}: expected BadUrl, got {other}"),
        Ok(_) => panic!("{url}: accepted"),
    };
    assert!(reason("redis://host:notaport").1.contains("\"notaport\""));
    assert!(reason("redis://127.0.0.1:6379/11?colour=red").1.contains("\"colour\""));
    assert!(reason("redis://127.0.0.1/11?result_expires=soon").1.contains("result_expires"));
    assert!(reason("redis://127.0.0.1/eleven").1.contains("database"));
    assert!(reason("rediss://127.0.0.1:6380/0").1.contains("TLS"));
    let (url, _) = reason("redis://:hunter2@host:notaport/0");
    assert_eq!(url, "redis://:***@host:notaport/0");

    let b = RedisBackend::open("redis://:s%40cret@127.0.0.1:6379/11?result_expires=60").unwrap();
    assert_eq!(b.url(), "redis://:***@127.0.0.1:6379/11?result_expires=60");
    assert_eq!(b.config().result_expires, Some(Duration::from_secs(60)));
    assert_eq!(b.config().server.password.as_deref(), Some("s@cret"));
    assert_eq!(RedisBackend::open(URL).unwrap().url(), URL);
}

#[tokio::test]
async fn a_stored_revoked_state_is_never_replaced_by_a_later_outcome() {
    use celeriac_core::backend::{ReplyTo, Stored};
    let b = backend(URL).await;
    let id = new_id();
    let exc = ExceptionInfo::new("TaskRevokedError", "revoked", "celery.exceptions");
    b.store(&ResultMeta::exception(&id, TaskState::Revoked, &exc, None)).await.unwrap();
    for later in [
        ResultMeta::success(&id, json!("ran anyway")),
        ResultMeta::exception(&id, TaskState::Failure, &ExceptionInfo::new("ValueError", "x", "builtins"), None),
        ResultMeta::new(&id, TaskState::Retry, json!(null)),
    ] {
        assert_eq!(b.store_outcome(&later, ReplyTo::default()).await.unwrap(), Stored::KeptRevoked, "{later:?}");
        assert_eq!(b.get(&id).await.unwrap().unwrap().status, TaskState::Revoked);
    }
    // A REVOKED outcome is written over REVOKED (a terminate after a revoke, say).
    let terminated = ExceptionInfo::new("TaskRevokedError", "terminated", "celery.exceptions");
    let meta = ResultMeta::exception(&id, TaskState::Revoked, &terminated, None);
    assert_eq!(b.store_outcome(&meta, ReplyTo::default()).await.unwrap(), Stored::Written);
    assert_eq!(b.get(&id).await.unwrap().unwrap().exception_info().unwrap(), terminated);
    assert!(raw_ttl(&result_key(&id)).await > 0, "written with the result expiry");

    // What Python Celery writes (status first), and a value laid out otherwise: both REVOKED.
    let celery = new_id();
    let text = format!(
        r#"{{"status": "REVOKED", "result": {{"exc_type": "TaskRevokedError", "exc_message": [], "exc_module": "celery.exceptions"}}, "traceback": null, "children": [], "date_done": "2026-01-01T00:00:00.000000+00:00", "task_id": "{celery}"}}"#
    );
    raw_set(&result_key(&celery), text.as_bytes()).await;
    assert_eq!(
        b.store_outcome(&ResultMeta::success(&celery, json!(1)), ReplyTo::default()).await.unwrap(),
        Stored::KeptRevoked
    );
    assert_eq!(raw_get(&result_key(&celery)).await.unwrap(), text.as_bytes());
    let reordered = new_id();
    let text = format!(r#"{{"task_id": "{reordered}", "result": null, "status":"REVOKED"}}"#);
    raw_set(&result_key(&reordered), text.as_bytes()).await;
    assert_eq!(
        b.store_outcome(&ResultMeta::success(&reordered, json!(1)), ReplyTo::default()).await.unwrap(),
        Stored::KeptRevoked
    );

    // Any other state is replaced, even when its value mentions REVOKED, and the outcome is
    // published as `store` publishes it.
    let other = new_id();
    b.store(&ResultMeta::success(&other, json!({"status": "REVOKED"}))).await.unwrap();
    let waiter = {
        let b = b.clone();
        let other = other.clone();
        tokio::spawn(async move { b.wait(&other, Some(Duration::from_secs(10))).await })
    };
    b.store(&ResultMeta::new(&other, TaskState::Started, json!({}))).await.unwrap();
    assert_eq!(
        b.store_outcome(&ResultMeta::success(&other, json!(7)), ReplyTo::default()).await.unwrap(),
        Stored::Written
    );
    assert_eq!(waiter.await.unwrap().unwrap().result, json!(7));
    for key in [&id, &celery, &reordered, &other] {
        raw_del(&result_key(key)).await;
    }
    // The script is sent by this hash: the one Redis gives it.
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(celeriac_redis::backend::STORE_OUTCOME)
        .query_async(&mut raw().await)
        .await
        .unwrap();
    assert_eq!(sha, celeriac_redis::backend::STORE_OUTCOME_SHA1);
}

#[tokio::test]
async fn revokes_are_kept_with_their_time_and_expire_after_three_hours() {
    use celeriac_core::backend::{unix_now, REVOKE_EXPIRES};
    use celeriac_redis::backend::REVOKED_KEY;
    let b = backend(URL).await;
    assert!(b.keeps_revokes());
    let (old, a, c) = (new_id(), new_id(), new_id());
    let now = unix_now();
    b.record_revokes(std::slice::from_ref(&old), now - REVOKE_EXPIRES.as_secs_f64() - 5.0).await.unwrap();
    b.record_revokes(&[a.clone(), c.clone()], now).await.unwrap();
    let seen = b.revokes_since(now - 1.0).await.unwrap();
    let ours: Vec<&str> = seen
        .iter()
        .map(|r| r.task_id.as_str())
        .filter(|id| [old.as_str(), a.as_str(), c.as_str()].contains(id))
        .collect();
    assert_eq!(ours.len(), 2, "the two recent ids, not the expired one: {seen:?}");
    assert!(ours.contains(&a.as_str()) && ours.contains(&c.as_str()));
    assert!(seen.iter().find(|r| r.task_id == a).is_some_and(|r| (r.at - now).abs() < 0.01), "{seen:?}");
    // The expired one was trimmed by the second write, and nothing later is read from `since`.
    let score: Option<f64> =
        redis::cmd("ZSCORE").arg(REVOKED_KEY).arg(&old).query_async(&mut raw().await).await.unwrap();
    assert_eq!(score, None);
    assert!(b.revokes_since(now + 1.0).await.unwrap().iter().all(|r| r.task_id != a));
    let ttl = raw_ttl(REVOKED_KEY).await;
    assert!(ttl > 0 && ttl <= REVOKE_EXPIRES.as_secs() as i64, "the set expires: {ttl}");
    redis::cmd("ZREM").arg(REVOKED_KEY).arg(&a).arg(&c).query_async::<()>(&mut raw().await).await.unwrap();
}

#[tokio::test]
async fn the_chord_join_counts_each_part_once_and_gives_one_claim() {
    let b = backend(URL).await;
    celeriac_core::canvas::join::check_join_contract(&b).await.unwrap();
}
