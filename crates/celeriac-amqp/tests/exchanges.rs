//! Exchanges on the machine's real RabbitMQ, each test in a vhost of its own: fanout reaches every
//! bound queue, direct only the queue bound with the routing key, topic the queues whose pattern
//! matches (`#`, `*`), and what the subscriptions declare is what Celery declares for its pidbox.

use std::process::Command;
use std::time::Duration;

use celeriac_amqp::AmqpBroker;
use celeriac_core::broadcast::{Binding, ExchangeKind, ExchangeSpec, Subscription};
use celeriac_core::{Broker, Message, Properties};
use serde_json::{json, Map, Value};

struct Vhost(String);

impl Vhost {
    fn new() -> Self {
        let name = format!("celeriac-test-{}", uuid::Uuid::new_v4().simple());
        for args in [vec!["add_vhost", &name], vec!["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]] {
            let out = Command::new("rabbitmqctl").args(&args).output().expect("rabbitmqctl");
            assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Vhost(name)
    }

    fn broker(&self) -> AmqpBroker {
        AmqpBroker::open(&format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)).unwrap()
    }

    fn list_queues(&self) -> String {
        let out = Command::new("rabbitmqctl")
            .args(["list_queues", "-p", &self.0, "--no-table-headers", "-q"])
            .args(["name", "durable", "auto_delete", "exclusive", "arguments"])
            .output()
            .expect("rabbitmqctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

fn exchange(name: &str, kind: ExchangeKind) -> ExchangeSpec {
    ExchangeSpec { name: name.into(), kind, durable: false, auto_delete: false }
}

fn binding(queue: &str, routing_key: &str) -> Binding {
    Binding {
        queue: queue.into(),
        routing_key: routing_key.into(),
        durable: false,
        auto_delete: true,
        exclusive: true,
        message_ttl: Some(Duration::from_secs(300)),
        expires: Some(Duration::from_secs(10)),
    }
}

fn message(text: &str) -> Message {
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(7));
    Message {
        headers,
        properties: Properties { delivery_mode: 1, ..Properties::default() },
        body: serde_json::to_vec(&json!({"text": text})).unwrap(),
    }
}

async fn text_of(sub: &mut Box<dyn Subscription>) -> String {
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a message within 10 s").unwrap();
    let body: Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(m.headers.get("clock"), Some(&json!(7)));
    body["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn fanout_reaches_every_bound_queue_with_celerys_queue_arguments() {
    let vhost = Vhost::new();
    let broker = vhost.broker();
    let ex = exchange("celery.pidbox", ExchangeKind::Fanout);
    let x = broker.exchanges().expect("RabbitMQ has exchanges");
    // Nobody bound yet: dropped, not an error.
    x.publish_to(&ex, "", &message("lost")).await.unwrap();
    let mut a = x.subscribe(&ex, &binding("a.celery.pidbox", "")).await.unwrap();
    let mut b = x.subscribe(&ex, &binding("b.celery.pidbox", "")).await.unwrap();
    x.publish_to(&ex, "", &message("one")).await.unwrap();
    assert_eq!(text_of(&mut a).await, "one");
    assert_eq!(text_of(&mut b).await, "one");
    let queues = vhost.list_queues();
    let line = queues.lines().find(|l| l.starts_with("a.celery.pidbox")).expect(&queues);
    assert!(line.contains("false\ttrue\ttrue"), "not transient, auto-delete, exclusive: {line}");
    assert!(line.contains("x-message-ttl") && line.contains("300000") && line.contains("10000"), "{line}");
    a.close().await;
    b.close().await;
    let queues = vhost.list_queues();
    assert!(!queues.contains("a.celery.pidbox"), "closing removed the queue: {queues}");
}

#[tokio::test]
async fn direct_routes_by_exact_key() {
    let vhost = Vhost::new();
    let broker = vhost.broker();
    let ex = exchange("reply.celery.pidbox", ExchangeKind::Direct);
    let x = broker.exchanges().unwrap();
    let mut one = x.subscribe(&ex, &binding("k1.reply", "k1")).await.unwrap();
    let mut two = x.subscribe(&ex, &binding("k2.reply", "k2")).await.unwrap();
    x.publish_to(&ex, "k1", &message("first")).await.unwrap();
    x.publish_to(&ex, "k2", &message("second")).await.unwrap();
    x.publish_to(&ex, "k1", &message("third")).await.unwrap();
    assert_eq!(text_of(&mut one).await, "first");
    assert_eq!(text_of(&mut one).await, "third");
    assert_eq!(text_of(&mut two).await, "second");
}

#[tokio::test]
async fn topic_routes_by_pattern() {
    let vhost = Vhost::new();
    let broker = vhost.broker();
    let ex = ExchangeSpec { name: "celeryev".into(), kind: ExchangeKind::Topic, durable: true, auto_delete: false };
    let x = broker.exchanges().unwrap();
    let mut all = x.subscribe(&ex, &binding("celeryev.all", "#")).await.unwrap();
    let mut tasks = x.subscribe(&ex, &binding("celeryev.tasks", "task.*")).await.unwrap();
    x.publish_to(&ex, "worker.heartbeat", &message("heartbeat")).await.unwrap();
    x.publish_to(&ex, "task.succeeded", &message("succeeded")).await.unwrap();
    assert_eq!(text_of(&mut all).await, "heartbeat");
    assert_eq!(text_of(&mut all).await, "succeeded");
    assert_eq!(text_of(&mut tasks).await, "succeeded");
}
