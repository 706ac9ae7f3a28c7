//! The SQLite broker's delivery rules, on real files: leases and their renewal, requeue,
//! priority, ETA, purge, depths and dead letters.

use std::time::Duration;

use celeriac_core::protocol::format_datetime;
use celeriac_core::{Broker, Message, ResultBackend, ResultMeta, TaskBody, TaskHeaders, TaskState};
use celeriac_sqlite::{SqliteBackend, SqliteBroker};
use serde_json::json;

fn url(dir: &tempfile::TempDir, params: &str) -> String {
    format!("sqlite://{}/b.db{}", dir.path().display(), params)
}

fn msg(id: &str, priority: Option<u8>) -> Message {
    Message::new_task(&TaskHeaders::new("t", id), &TaskBody::default(), priority, None).unwrap()
}

async fn next_id(c: &mut Box<dyn celeriac_core::Consumer>) -> celeriac_core::Delivery {
    tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("a delivery in time").expect("delivery")
}

#[test]
fn an_unsettled_lease_lapses_and_the_message_is_redelivered_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir, "?visibility_timeout=0.3");
    // The first consumer lives on its own runtime; dropping that runtime stops its fetcher and
    // its lease renewer, as the death of its process would.
    let dying = tokio::runtime::Runtime::new().unwrap();
    dying.block_on(async {
        let a = SqliteBroker::open(&u).unwrap();
        a.publish("q", &msg("m1", None)).await.unwrap();
        let mut first = a.consume(&["q".into()], 1).await.unwrap();
        let d = next_id(&mut first).await;
        assert_eq!(d.delivery_count, 1);
        // Neither settled nor dropped: a dead process settles nothing.
        std::mem::forget(d);
        std::mem::forget(first);
    });
    drop(dying);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let b = SqliteBroker::open(&u).unwrap();
        let mut second = b.consume(&["q".into()], 1).await.unwrap();
        let d = next_id(&mut second).await;
        assert_eq!((d.message.task_id(), d.delivery_count), (Some("m1"), 2));
        d.ack().await.unwrap();
        assert_eq!(b.queues(&["q".into()]).await.unwrap()[0].unacked, 0);
    });
}

#[tokio::test]
async fn a_held_lease_is_renewed_and_never_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir, "?visibility_timeout=0.3");
    let broker = SqliteBroker::open(&u).unwrap();
    broker.publish("q", &msg("held", None)).await.unwrap();
    let mut holder = broker.consume(&["q".into()], 1).await.unwrap();
    let d = next_id(&mut holder).await;
    let mut other = broker.consume(&["q".into()], 1).await.unwrap();
    // Four visibility timeouts pass; the holder's renewals keep the message away from `other`.
    assert!(tokio::time::timeout(Duration::from_millis(1200), other.next()).await.is_err(), "redelivered while held");
    d.ack().await.unwrap();
    assert_eq!(broker.queues(&["q".into()]).await.unwrap()[0].unacked, 0);
}

#[tokio::test]
async fn requeue_and_dropping_put_messages_back_without_counting_a_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let broker = SqliteBroker::open(&url(&dir, "")).unwrap();
    broker.publish("q", &msg("r", None)).await.unwrap();
    let mut c = broker.consume(&["q".into()], 1).await.unwrap();
    next_id(&mut c).await.reject(true).await.unwrap();
    let d = next_id(&mut c).await;
    assert_eq!(d.delivery_count, 1, "a requeue is not a failed delivery");
    drop(d);
    let d = next_id(&mut c).await;
    assert_eq!(d.message.task_id(), Some("r"));
    d.reject(false).await.unwrap();
    let q = broker.queues(&["q".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked), (0, 0));
}

#[tokio::test]
async fn higher_priority_first_then_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let broker = SqliteBroker::open(&url(&dir, "")).unwrap();
    for (id, p) in [("low1", 0), ("high", 9), ("low2", 0), ("mid", 5)] {
        broker.publish("q", &msg(id, Some(p))).await.unwrap();
    }
    let mut c = broker.consume(&["q".into()], 10).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let d = next_id(&mut c).await;
        order.push(d.message.task_id().unwrap().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(order, vec!["high", "mid", "low1", "low2"]);
}

#[tokio::test]
async fn an_eta_message_is_scheduled_not_ready_until_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let broker = SqliteBroker::open(&url(&dir, "")).unwrap();
    let mut h = TaskHeaders::new("t", "later");
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(700);
    h.eta = Some(format_datetime(eta));
    broker.publish("q", &Message::new_task(&h, &TaskBody::default(), None, None).unwrap()).await.unwrap();
    let q = broker.queues(&["q".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].scheduled), (0, 1));
    let mut c = broker.consume(&["q".into()], 1).await.unwrap();
    let d = next_id(&mut c).await;
    assert!(chrono::Utc::now() >= eta, "delivered before its ETA");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn purge_removes_ready_messages_and_depths_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = SqliteBroker::open(&url(&dir, "")).unwrap();
    for i in 0..5 {
        broker.publish("a", &msg(&format!("a{i}"), None)).await.unwrap();
    }
    broker.publish("b", &msg("b0", None)).await.unwrap();
    let mut c = broker.consume(&["a".into()], 1).await.unwrap();
    let held = next_id(&mut c).await;
    // A countdown task is scheduled, not ready: purge leaves it, as RabbitMQ's queue.purge leaves
    // what a worker holds until its ETA.
    let mut h = TaskHeaders::new("t", "later");
    h.eta = Some(format_datetime(chrono::Utc::now() + chrono::Duration::hours(1)));
    broker.publish("a", &Message::new_task(&h, &TaskBody::default(), None, None).unwrap()).await.unwrap();
    let all = broker.queues(&[]).await.unwrap();
    assert_eq!(
        all.iter().map(|q| (q.name.as_str(), q.ready, q.unacked)).collect::<Vec<_>>(),
        vec![("a", 4, 1), ("b", 1, 0)]
    );
    c.close().await;
    assert_eq!(broker.purge("a").await.unwrap(), 4, "the unacked and the scheduled ones are not purged");
    held.ack().await.unwrap();
    let a = &broker.queues(&["a".into()]).await.unwrap()[0];
    assert_eq!((a.ready, a.scheduled), (0, 1), "the countdown task is still there");
}

#[tokio::test]
async fn dead_letters_keep_the_reason_and_the_task_id() {
    let dir = tempfile::tempdir().unwrap();
    let broker = SqliteBroker::open(&url(&dir, "")).unwrap();
    broker.publish("q", &msg("poison", None)).await.unwrap();
    let mut c = broker.consume(&["q".into()], 1).await.unwrap();
    next_id(&mut c).await.dead_letter("it is poison").await.unwrap();
    let dead = broker.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].task_id.as_deref(), dead[0].reason.as_str(), dead[0].queue.as_str()),
        (Some("poison"), "it is poison", "q")
    );
    assert_eq!(broker.queues(&["q".into()]).await.unwrap()[0].dead, 1);
}

#[tokio::test]
async fn results_are_stored_read_waited_on_and_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&url(&dir, "")).unwrap();
    assert!(backend.get("x").await.unwrap().is_none());
    let waiter = {
        let b = backend.clone();
        tokio::spawn(async move { b.wait("x", Some(Duration::from_secs(10))).await })
    };
    backend.store(&ResultMeta::new("x", TaskState::Retry, json!(null))).await.unwrap();
    backend.store(&ResultMeta::success("x", json!([1, 2]))).await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!((got.status, got.result), (TaskState::Success, json!([1, 2])));
    backend.forget("x").await.unwrap();
    assert!(backend.get("x").await.unwrap().is_none());
    let e = backend.wait("never", Some(Duration::from_millis(50))).await.unwrap_err();
    assert!(matches!(e, celeriac_core::BackendError::Timeout { .. }), "{e}");
}

/// The task ids left in the file's results table, read with a connection of the test's own.
fn stored_ids(dir: &tempfile::TempDir) -> Vec<String> {
    let conn = rusqlite::Connection::open(dir.path().join("b.db")).unwrap();
    let mut s = conn.prepare("SELECT task_id FROM results ORDER BY task_id").unwrap();
    let ids = s.query_map([], |r| r.get::<_, String>(0)).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    ids
}

#[tokio::test]
async fn results_expire_after_result_expires_and_their_rows_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&url(&dir, "?result_expires=1")).unwrap();
    backend.store(&ResultMeta::success("old", json!(1))).await.unwrap();
    assert!(backend.get("old").await.unwrap().is_some(), "a fresh result is readable");
    // Wait for it to expire: it reads as missing, though its row is still there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while backend.get("old").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "the result never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored_ids(&dir), ["old"]);
    // The next store deletes the expired row (the last clean-up is older than result_expires).
    backend.store(&ResultMeta::success("new", json!(2))).await.unwrap();
    assert_eq!(stored_ids(&dir), ["new"]);
    assert_eq!(backend.get("new").await.unwrap().unwrap().result, json!(2));

    // result_expires=0 keeps results: the row is read back after the same wait.
    let dir = tempfile::tempdir().unwrap();
    let keep = SqliteBackend::open(&url(&dir, "?result_expires=0")).unwrap();
    keep.store(&ResultMeta::success("kept", json!(3))).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(1200);
    while std::time::Instant::now() < deadline {
        assert!(keep.get("kept").await.unwrap().is_some(), "a result expired with result_expires=0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keep.store(&ResultMeta::success("other", json!(4))).await.unwrap();
    assert_eq!(stored_ids(&dir), ["kept", "other"]);
}

#[tokio::test]
async fn a_stored_revoked_state_is_never_replaced_by_a_later_outcome() {
    use celeriac_core::backend::{ReplyTo, Stored};
    use celeriac_core::ExceptionInfo;
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&url(&dir, "")).unwrap();
    let exc = ExceptionInfo::new("TaskRevokedError", "revoked", "celery.exceptions");
    backend.store(&ResultMeta::exception("r", TaskState::Revoked, &exc, None)).await.unwrap();
    for later in [ResultMeta::success("r", json!(1)), ResultMeta::new("r", TaskState::Retry, json!(null))] {
        assert_eq!(backend.store_outcome(&later, ReplyTo::default()).await.unwrap(), Stored::KeptRevoked);
        assert_eq!(backend.get("r").await.unwrap().unwrap().status, TaskState::Revoked);
    }
    let terminated = ExceptionInfo::new("TaskRevokedError", "terminated", "celery.exceptions");
    let meta = ResultMeta::exception("r", TaskState::Revoked, &terminated, None);
    assert_eq!(backend.store_outcome(&meta, ReplyTo::default()).await.unwrap(), Stored::Written);
    assert_eq!(backend.get("r").await.unwrap().unwrap().exception_info().unwrap(), terminated);
    // Other states are replaced; a first outcome is written.
    backend.store(&ResultMeta::new("s", TaskState::Started, json!({}))).await.unwrap();
    assert_eq!(
        backend.store_outcome(&ResultMeta::success("s", json!(2)), ReplyTo::default()).await.unwrap(),
        Stored::Written
    );
    assert_eq!(backend.get("s").await.unwrap().unwrap().result, json!(2));
    assert_eq!(
        backend.store_outcome(&ResultMeta::success("new", json!(3)), ReplyTo::default()).await.unwrap(),
        Stored::Written
    );
    assert_eq!(backend.get("new").await.unwrap().unwrap().result, json!(3));
}

#[tokio::test]
async fn revokes_are_kept_in_the_file_with_their_time_and_expire_after_three_hours() {
    use celeriac_core::backend::{unix_now, REVOKE_EXPIRES};
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&url(&dir, "")).unwrap();
    assert!(backend.keeps_revokes());
    let now = unix_now();
    backend.record_revokes(&["old".into()], now - REVOKE_EXPIRES.as_secs_f64() - 5.0).await.unwrap();
    backend.record_revokes(&["a".into(), "b".into()], now).await.unwrap();
    drop(backend);
    // Another process opening the file (a restarted worker) reads them.
    let reopened = SqliteBackend::open(&url(&dir, "")).unwrap();
    let seen = reopened.revokes_since(0.0).await.unwrap();
    let ids: Vec<&str> = seen.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{seen:?}");
    assert!(ids.contains(&"a") && ids.contains(&"b"));
    assert!(seen.iter().all(|r| (r.at - now).abs() < 0.01), "{seen:?}");
    assert!(reopened.revokes_since(now + 1.0).await.unwrap().is_empty());
    let conn = rusqlite::Connection::open(dir.path().join("b.db")).unwrap();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM revoked", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 2, "the expired id was deleted by the later write");
}

#[tokio::test]
async fn the_chord_join_counts_each_part_once_and_gives_one_claim() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBackend::open(&url(&dir, "")).unwrap();
    celeriac_core::canvas::join::check_join_contract(&b).await.unwrap();
}

#[tokio::test]
async fn a_saved_group_is_restored_by_its_id() {
    use celeriac_core::canvas::ResultRef;
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBackend::open(&url(&dir, "")).unwrap();
    let g =
        ResultRef::Group { id: "g1".into(), parent: None, results: vec![ResultRef::task("a"), ResultRef::task("b")] };
    assert_eq!(b.restore_group("g1").await.unwrap(), None);
    b.save_group(&g).await.unwrap();
    assert_eq!(b.restore_group("g1").await.unwrap(), Some(g));
}

#[tokio::test]
async fn one_holder_at_a_time_holds_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBroker::open(&url(&dir, "")).unwrap();
    celeriac_core::broker::check_lease_contract(&b, Duration::from_millis(300)).await.unwrap();
}

#[tokio::test]
async fn a_read_only_handle_creates_no_file_reads_the_queues_and_writes_only_for_a_purge() {
    let dir = tempfile::tempdir().unwrap();
    let u = url(&dir, "");
    let missing = SqliteBroker::open_read_only(&u).err().expect("no file to read");
    assert!(matches!(missing, celeriac_core::BrokerError::Unreachable { .. }), "{missing}");
    assert!(!dir.path().join("b.db").exists(), "a read-only open created the file");
    {
        let b = SqliteBroker::open(&u).unwrap();
        b.publish("q", &msg("m1", None)).await.unwrap();
        b.publish("q", &msg("m2", None)).await.unwrap();
    }
    let ro = SqliteBroker::open_read_only(&u).unwrap();
    assert_eq!(ro.queues(&["q".into()]).await.unwrap()[0].ready, 2);
    assert_eq!(ro.purge("q").await.unwrap(), 2, "a write opens the writer");
    assert_eq!(ro.queues(&["q".into()]).await.unwrap()[0].ready, 0, "and the reader sees it");
    let backend = SqliteBackend::open_read_only(&u).unwrap();
    assert_eq!(backend.get("no-such-task").await.unwrap(), None);
}
