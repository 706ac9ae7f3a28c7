//! `#[celeriac::task]` end to end: typed calls, options, blocking functions, self-requested retries,
//! keyword and optional arguments, errors with their types, and `forget`.

use std::sync::Arc;
use std::time::Duration;

use celeriac::{App, Client, ResultError, Shutdown, Task, TaskContext, TaskError, TaskState, Worker, WorkerConfig};
use serde_json::{json, Map};

#[celeriac::task(name = "t.concat", queue = "texts")]
async fn concat(a: String, b: Option<String>) -> String {
    format!("{a}{}", b.unwrap_or_default())
}

#[celeriac::task(name = "t.blocking_sum")]
fn blocking_sum(values: Vec<i64>) -> i64 {
    std::thread::sleep(Duration::from_millis(5));
    values.iter().sum()
}

#[celeriac::task(name = "t.retry_self", max_retries = 5)]
async fn retry_self(ctx: &TaskContext, until: u32) -> Result<u32, TaskError> {
    if ctx.retries < until {
        return Err(ctx.retry_in(Duration::from_millis(10)));
    }
    Ok(ctx.retries)
}

#[celeriac::task(name = "t.give_up", max_retries = 1, rate_limit = "1000/s")]
async fn give_up(ctx: &TaskContext) -> Result<(), TaskError> {
    Err(ctx.retry_in(Duration::from_millis(10)))
}

#[celeriac::task(name = "t.parse")]
async fn parse(text: String) -> Result<i32, std::num::ParseIntError> {
    text.parse::<i32>()
}

#[celeriac::task]
async fn default_named() {}

#[celeriac::task(name = "t.blocking_panic")]
fn blocking_panic(message: String) -> i64 {
    panic!("{message}")
}

struct Harness {
    _dir: tempfile::TempDir,
    client: Client,
    shutdown: Shutdown,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let client = Client::connect(&url, None).await.unwrap();
    let app =
        App::new().task(concat).task(blocking_sum).task(retry_self).task(give_up).task(parse).task(blocking_panic);
    let config =
        WorkerConfig { queues: vec!["celery".into(), "texts".into()], concurrency: 4, ..WorkerConfig::default() };
    let worker =
        Worker::new(config, Arc::new(app.registry().clone()), client.broker().clone(), client.backend().clone());
    let shutdown = Shutdown::new();
    tokio::spawn(worker.run(shutdown.clone()));
    Harness { _dir: dir, client, shutdown }
}

const T: Option<Duration> = Some(Duration::from_secs(20));

#[tokio::test(flavor = "multi_thread")]
async fn typed_tasks_run_with_their_options() {
    let h = harness().await;
    let r = concat::delay(&h.client, "ab".into(), Some("cd".into())).await.unwrap();
    assert_eq!(r.get_as::<String>(T).await.unwrap(), "abcd");
    // The task's queue was used.
    let q = h.client.broker().queues(&[]).await.unwrap();
    assert_eq!(q.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), vec!["texts"]);
    // Keyword arguments, and an optional one left out.
    let r = h
        .client
        .send_task("t.concat", vec![], json!({"a": "x"}).as_object().unwrap().clone(), Default::default())
        .await
        .unwrap();
    assert_eq!(r.get(T).await.unwrap(), json!("x"));
    let r = blocking_sum::delay(&h.client, vec![1, 2, 3]).await.unwrap();
    assert_eq!(r.get_as::<i64>(T).await.unwrap(), 6);
    h.shutdown.warm();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_can_retry_itself_until_max_retries() {
    let h = harness().await;
    let r = retry_self::delay(&h.client, 2).await.unwrap();
    assert_eq!(r.get_as::<u32>(T).await.unwrap(), 2);
    let r = give_up::delay(&h.client).await.unwrap();
    match r.get(T).await {
        Err(ResultError::Failed { exc_type, .. }) => assert_eq!(exc_type, "MaxRetriesExceededError"),
        other => panic!("expected MaxRetriesExceededError, got {other:?}"),
    }
    h.shutdown.warm();
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_reach_the_caller_with_type_and_message_and_results_can_be_forgotten() {
    let h = harness().await;
    let r = parse::delay(&h.client, "12x".into()).await.unwrap();
    match r.get(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "ParseIntError");
            assert_eq!(message, "invalid digit found in string");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(r.state().await.unwrap(), TaskState::Failure);
    r.forget().await.unwrap();
    assert_eq!(r.state().await.unwrap(), TaskState::Pending);
    // Wrong argument types are a TypeError naming the argument.
    let r = h.client.send_task("t.parse", vec![json!(5)], Map::new(), Default::default()).await.unwrap();
    match r.get(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "TypeError");
            assert!(message.contains("'text'"), "{message}");
        }
        other => panic!("expected a TypeError, got {other:?}"),
    }
    // A blocking task's panic: its own message, and where it happened, in the traceback.
    let r = blocking_panic::delay(&h.client, "stuck".into()).await.unwrap();
    match r.get(T).await {
        Err(ResultError::Failed { exc_type, message, traceback, .. }) => {
            assert_eq!((exc_type.as_str(), message.as_str()), ("Panic", "stuck"));
            let tb = traceback.unwrap_or_default();
            assert!(
                tb.contains("panicked at crates/celeriac/tests/tasks.rs:") && tb.ends_with("Panic: stuck\n"),
                "{tb}"
            );
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    h.shutdown.warm();
}

#[test]
fn default_names_follow_the_module_path_and_options_are_generated() {
    assert_eq!(default_named.name(), "tasks.default_named");
    assert_eq!(concat.options().queue.as_deref(), Some("texts"));
    assert!(blocking_sum.options().blocking);
    assert_eq!(give_up.options().max_retries, Some(1));
    assert_eq!((give_up.options().rate_limit.as_deref(), concat.options().rate_limit), (Some("1000/s"), None));
    assert_eq!(concat::s("a".into(), None).args, vec![json!("a"), json!(null)]);
}
