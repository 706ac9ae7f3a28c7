//! Bad input never crashes a worker: each kind of broken message is failed or dead-lettered with a
//! reason, logged once, and the worker keeps consuming.

mod common;

use std::time::Duration;

use celeriac::{SendOptions, TaskState};
use celeriac_core::{Message, Properties, TaskHeaders};
use common::{run_cli, TempDb, WorkerProc};
use serde_json::{json, Map, Value};

fn message(id: &str, task: &str, body: &[u8], content_type: &str) -> Message {
    let headers = TaskHeaders::new(task, id).to_map();
    Message {
        headers,
        properties: Properties {
            correlation_id: Some(id.into()),
            content_type: content_type.into(),
            ..Properties::default()
        },
        body: body.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_messages_are_failed_or_dead_lettered_and_the_worker_keeps_going() {
    let db = TempDb::new("");
    let w = WorkerProc::start(&db.url, &["-c", "2"]);
    let client = db.client().await;
    let broker = client.broker().clone();
    let backend = client.backend().clone();

    // 1. Malformed body.
    broker.publish("celery", &message("bad-body", "celeriac.add", b"[1, 2", "application/json")).await.unwrap();
    // 2. Unknown content type.
    broker
        .publish("celery", &message("bad-type", "celeriac.add", b"\x80\x04K\x01.", "application/x-python-serialize"))
        .await
        .unwrap();
    // 3. Unknown task name.
    client
        .send_task(
            "no.such.task",
            vec![],
            Map::new(),
            SendOptions { task_id: Some("unknown-task".into()), ..Default::default() },
        )
        .await
        .unwrap();
    // 4. Wrong argument types.
    client
        .send_task(
            "celeriac.add",
            vec![json!("two"), json!(3)],
            Map::new(),
            SendOptions { task_id: Some("bad-args".into()), ..Default::default() },
        )
        .await
        .unwrap();
    // 5. No task id at all.
    let mut no_id = message("x", "celeriac.add", b"[[1, 2], {}, {}]", "application/json");
    no_id.headers.remove("id");
    no_id.properties.correlation_id = None;
    broker.publish("celery", &no_id).await.unwrap();
    // Then a good task: the worker is still consuming.
    let good =
        client.send_task("celeriac.add", vec![json!(2), json!(2)], Map::new(), SendOptions::default()).await.unwrap();
    assert_eq!(good.get(Some(Duration::from_secs(20))).await.unwrap(), json!(4));

    let failure = |id: &'static str| {
        let backend = backend.clone();
        async move {
            let meta = backend.wait(id, Some(Duration::from_secs(10))).await.unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(meta.status, TaskState::Failure, "{id}");
            let exc = meta.exception_info().unwrap();
            // A traceback as Celery stores one, ending with the exception.
            let tb = meta.traceback.unwrap_or_default();
            assert!(tb.ends_with(&format!("{}: {}\n", exc.exc_type, exc.message())), "{id}: {tb:?}");
            exc
        }
    };
    let e = failure("bad-body").await;
    assert_eq!(e.exc_type, "InvalidTaskError");
    assert!(e.message().contains("malformed body"), "{}", e.message());
    let e = failure("bad-type").await;
    assert!(e.message().contains("application/x-python-serialize"), "{}", e.message());
    let e = failure("unknown-task").await;
    assert_eq!((e.exc_type.as_str(), e.exc_module.as_str()), ("NotRegistered", "celery.exceptions"));
    // Celery's stored arguments: the name itself (Python's str() adds the quotes).
    assert_eq!(e.exc_message, serde_json::json!(["no.such.task"]));
    let e = failure("bad-args").await;
    assert_eq!(e.exc_type, "TypeError");
    assert!(e.message().contains("argument 'x'"), "{}", e.message());

    // Dead letters carry their reasons.
    let (code, out, err) = run_cli(&["dead-letters", "--json", "--broker", &db.url], &[]);
    assert_eq!(code, 0, "{err}");
    let dead: Vec<Value> = serde_json::from_str(&out).unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(dead.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no \"id\" header")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("malformed body")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("unsupported content type")), "{reasons:?}");

    // Each problem is logged once, and the worker is alive.
    assert_eq!(w.count("no \"id\" header"), 1, "{}", w.dump());
    assert_eq!(w.matching("bad-body").iter().filter(|l| l.contains("ERROR")).count(), 1, "{}", w.dump());
    // The dead-letter lines name the content type of what was set aside.
    let type_line =
        w.matching("bad-type").into_iter().find(|l| l.contains("dead-lettering")).expect("a dead-letter line");
    assert!(type_line.contains("content_type=application/x-python-serialize"), "{type_line}");
    let body_line =
        w.matching("bad-body").into_iter().find(|l| l.contains("dead-lettering")).expect("a dead-letter line");
    assert!(body_line.contains("content_type=application/json"), "{body_line}");
    assert_eq!(w.matching("unknown-task").iter().filter(|l| l.contains("ERROR")).count(), 1, "{}", w.dump());
    assert!(w.count("panicked") == 0, "{}", w.dump());
    let q = broker.queues(&["celery".into()]).await.unwrap();
    assert_eq!((q[0].ready, q[0].unacked, q[0].dead), (0, 0, 3), "{q:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_redelivered_past_the_limit_is_failed_as_worker_lost_and_dead_lettered() {
    // Three workers in turn take the same task and die holding it (visibility timeout 1 s); the
    // fourth delivery exceeds --max-deliveries 3.
    let db = TempDb::new("visibility_timeout=1");
    let client = db.client().await;
    let id = client
        .send_task("celeriac.sleep", vec![json!(60)], Map::new(), SendOptions::default())
        .await
        .unwrap()
        .id()
        .to_string();
    for _ in 0..3 {
        let mut w = WorkerProc::start(&db.url, &["-c", "1"]);
        w.wait_for_line(&id, Duration::from_secs(20));
        w.signal("KILL");
        w.wait_exit(Duration::from_secs(10));
    }
    let w = WorkerProc::start(&db.url, &["-c", "1", "--max-deliveries", "3"]);
    let meta = client.backend().wait(&id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(meta.status, TaskState::Failure);
    assert_eq!(meta.exception_info().unwrap().exc_type, "WorkerLostError");
    w.wait_for_line("poison message", Duration::from_secs(20));
    // The line is logged before the message is set aside: wait for the dead letter itself.
    common::wait_until_async("the dead letter", Duration::from_secs(10), || async {
        !client.broker().dead_letters(10).await.unwrap().is_empty()
    })
    .await;
    let dead = client.broker().dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].task_id.as_deref(), Some(id.as_str()));
}
