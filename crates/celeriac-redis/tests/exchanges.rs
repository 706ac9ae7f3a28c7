//! kombu's virtual exchanges on the machine's real Redis (database 4, flushed once at start):
//! fanout over pub/sub on kombu's channel name, direct and topic routed through the
//! `_kombu.binding.<exchange>` sets onto lists, bindings removed when an auto-delete subscription
//! closes.

use std::time::Duration;

use celeriac_core::broadcast::{Binding, ExchangeKind, ExchangeSpec, Subscription};
use celeriac_core::{Broker, Message, Properties};
use celeriac_redis::RedisBroker;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

const URL: &str = "redis://127.0.0.1:6379/4";

static FLUSHED: Mutex<bool> = Mutex::const_new(false);

async fn broker() -> RedisBroker {
    let mut flushed = FLUSHED.lock().await;
    if !*flushed {
        let mut conn = redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap();
        redis::cmd("FLUSHDB").exec_async(&mut conn).await.unwrap();
        *flushed = true;
    }
    RedisBroker::connect(URL).await.unwrap()
}

async fn members(key: &str) -> Vec<String> {
    let mut conn = redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut m: Vec<String> = redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await.unwrap();
    m.sort();
    m
}

fn binding(queue: &str, routing_key: &str) -> Binding {
    Binding {
        queue: queue.into(),
        routing_key: routing_key.into(),
        durable: false,
        auto_delete: true,
        exclusive: false,
        message_ttl: Some(Duration::from_secs(300)),
        expires: Some(Duration::from_secs(10)),
    }
}

fn message(text: &str) -> Message {
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(3));
    Message {
        headers,
        properties: Properties { delivery_mode: 1, ..Properties::default() },
        body: serde_json::to_vec(&json!({"text": text})).unwrap(),
    }
}

async fn text_of(sub: &mut Box<dyn Subscription>) -> String {
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a message within 10 s").unwrap();
    assert_eq!(m.headers.get("clock"), Some(&json!(3)));
    let body: Value = serde_json::from_slice(&m.body).unwrap();
    body["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn fanout_goes_over_pubsub_on_kombus_channel() {
    let broker = broker().await;
    let ex = ExchangeSpec { name: "t1.pidbox".into(), kind: ExchangeKind::Fanout, durable: false, auto_delete: false };
    let x = broker.exchanges().expect("Redis has exchanges");
    x.publish_to(&ex, "", &message("lost")).await.unwrap();
    let mut a = x.subscribe(&ex, &binding("a.t1.pidbox", "")).await.unwrap();
    let mut b = x.subscribe(&ex, &binding("b.t1.pidbox", "")).await.unwrap();
    assert_eq!(
        members("_kombu.binding.t1.pidbox").await,
        vec!["\x06\x16\x06\x16a.t1.pidbox", "\x06\x16\x06\x16b.t1.pidbox"]
    );
    // What kombu publishes: the JSON envelope on `/<db>.<exchange>`.
    let mut conn = redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap();
    let envelope = celeriac_core::envelope::encode(&message("from kombu"), "t1.pidbox", "", "tag");
    let receivers: i64 = redis::cmd("PUBLISH").arg("/4.t1.pidbox").arg(envelope).query_async(&mut conn).await.unwrap();
    assert_eq!(receivers, 2);
    assert_eq!(text_of(&mut a).await, "from kombu");
    assert_eq!(text_of(&mut b).await, "from kombu");
    x.publish_to(&ex, "", &message("one")).await.unwrap();
    assert_eq!(text_of(&mut a).await, "one");
    assert_eq!(text_of(&mut b).await, "one");
    a.close().await;
    assert_eq!(members("_kombu.binding.t1.pidbox").await, vec!["\x06\x16\x06\x16b.t1.pidbox"]);
}

#[tokio::test]
async fn direct_routes_by_the_binding_set() {
    let broker = broker().await;
    let ex = ExchangeSpec { name: "t2.reply".into(), kind: ExchangeKind::Direct, durable: false, auto_delete: false };
    let x = broker.exchanges().unwrap();
    let mut one = x.subscribe(&ex, &binding("k1.t2.reply", "k1")).await.unwrap();
    let mut two = x.subscribe(&ex, &binding("k2.t2.reply", "k2")).await.unwrap();
    assert!(members("_kombu.binding.t2.reply").await.contains(&"k1\x06\x16\x06\x16k1.t2.reply".to_string()));
    x.publish_to(&ex, "k1", &message("first")).await.unwrap();
    x.publish_to(&ex, "k2", &message("second")).await.unwrap();
    x.publish_to(&ex, "k1", &message("third")).await.unwrap();
    x.publish_to(&ex, "nobody", &message("dropped")).await.unwrap();
    assert_eq!(text_of(&mut one).await, "first");
    assert_eq!(text_of(&mut one).await, "third");
    assert_eq!(text_of(&mut two).await, "second");
    one.close().await;
    two.close().await;
    assert!(members("_kombu.binding.t2.reply").await.is_empty());
}

#[tokio::test]
async fn topic_routes_by_kombus_patterns() {
    let broker = broker().await;
    let ex = ExchangeSpec { name: "t3.ev".into(), kind: ExchangeKind::Topic, durable: true, auto_delete: false };
    let x = broker.exchanges().unwrap();
    let mut all = x.subscribe(&ex, &binding("t3.all", "#")).await.unwrap();
    let mut tasks = x.subscribe(&ex, &binding("t3.tasks", "task.*")).await.unwrap();
    // The pattern field is kombu's regular expression, so Python publishers route here too.
    assert!(members("_kombu.binding.t3.ev").await.contains(&"#\x06\x16^.*?$\x06\x16t3.all".to_string()));
    x.publish_to(&ex, "worker.heartbeat", &message("heartbeat")).await.unwrap();
    x.publish_to(&ex, "task.succeeded", &message("succeeded")).await.unwrap();
    assert_eq!(text_of(&mut all).await, "heartbeat");
    assert_eq!(text_of(&mut all).await, "succeeded");
    assert_eq!(text_of(&mut tasks).await, "succeeded");
}
