//! Celery's RPC result backend (`rpc://`): each result is a message sent to the queue of the client
//! that sent the task, not a record kept by task id.
//!
//! The wire contract follows Celery 5.7's `celery/backends/rpc.py` (with `base.py` for the body,
//! `asynchronous.py` for how a client buffers replies, `app/base.py` for the queue's name):
//! - **The reply queue.** A client names one queue per process (Celery: `app.thread_oid`, a uuid
//!   text; celeriac: a fresh uuid per backend, so per `Client`) and sets it as the `reply_to`
//!   property of every task it sends. It declares the queue before the first send (Celery's
//!   `on_task_call`): durable, **auto-delete**, not exclusive, with `x-expires` = `result_expires`
//!   in milliseconds (one day by default), no binding (the default exchange routes by name), and
//!   consumes it without acknowledgement (Celery's `ResultConsumer`, `no_ack=True`).
//! - **A result** is published by the worker to the default exchange `""` with routing key =
//!   the task's `reply_to`, `correlation_id` = the task's `correlation_id` (or its id), content
//!   type `application/json`, encoding `utf-8`, delivery mode 1 (transient: Celery's
//!   `result_persistent` is off by default; `?persistent=true` gives 2), no headers. The body is the
//!   stored-result layout of [`ResultMeta`] (`status, result, traceback, children, date_done, ...,
//!   task_id`), which is what `_to_result` builds. Every state the worker stores is sent: RETRY
//!   and the final SUCCESS / FAILURE / REVOKED (celeriac stores no STARTED). Nothing is declared
//!   on the worker's side; a result whose queue is gone (its client exited) comes back unroutable
//!   and is logged.
//! - **Reading.** Replies are matched by `correlation_id` (the body's `task_id` when absent, as
//!   Celery's `_get_message_task_id`); a compressed one (kombu's `compression` header) is
//!   decompressed, one that is not a JSON result is logged and dropped. A reply for an id nobody waits on yet is kept (Celery's
//!   `_pending_messages` / `_out_of_band`), so results can be asked for in any order, up to
//!   [`MAX_BUFFERED`] task ids (Celery's `MESSAGE_BUFFER_MAX`, 8192); beyond that the oldest is
//!   dropped, with a log line when nobody had read it.
//!
//! What RPC cannot do, by design: read a result from any process but the sender (`celeriac result
//! <id>` elsewhere), forget one (nothing is stored), or keep a result when the client is gone (the
//! auto-delete queue goes with it). These are refused with [`BackendError::Unsupported`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celeriac_core::protocol::CONTENT_TYPE_JSON;
use celeriac_core::{
    BackendError, Binding, BrokerError, ExchangeKind, ExchangeSpec, Message, Properties, PublishPolicy, ReplyTo,
    ResultBackend, ResultMeta, Subscription,
};
use tokio::sync::Notify;

use crate::url::AmqpConfig;
use crate::AmqpBroker;

/// How many task ids' replies a client keeps (Celery's `MESSAGE_BUFFER_MAX`).
pub const MAX_BUFFERED: usize = 8192;

/// The reply queue's `x-expires` when the URL names none: Celery's `result_expires`, one day.
pub const DEFAULT_EXPIRES: Duration = Duration::from_secs(86_400);

/// What an `rpc://` URL says.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcOptions {
    /// Results are persistent messages (delivery mode 2), Celery's `result_persistent`.
    pub persistent: bool,
    /// The reply queue is deleted after being unused this long (`x-expires`); `None`: never.
    pub expires: Option<Duration>,
}

impl RpcOptions {
    /// Parse `rpc://[?persistent=true|false][&result_expires=SECONDS]` (0: no expiry).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("rpc://").ok_or("expected rpc://")?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !authority.trim_end_matches('/').is_empty() {
            return Err(format!(
                "rpc:// takes no host ({authority:?}): results travel over the broker's own connection"
            ));
        }
        let mut options = RpcOptions { persistent: false, expires: Some(DEFAULT_EXPIRES) };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "persistent" => {
                    options.persistent = match value.to_ascii_lowercase().as_str() {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" => false,
                        _ => return Err(format!("persistent={value:?} is not a boolean")),
                    }
                }
                "result_expires" => {
                    let secs: f64 = value
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| format!("result_expires={value:?} is not a number of seconds"))?;
                    options.expires = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
                }
                other => {
                    return Err(format!("unknown parameter {other:?} (known: persistent, result_expires)"));
                }
            }
        }
        Ok(options)
    }
}

/// The RPC result backend on a RabbitMQ broker (see the module documentation).
pub struct RpcBackend {
    url: String,
    options: RpcOptions,
    /// Publishes results (the worker's side); connects on first use.
    publisher: AmqpBroker,
    /// This client's reply queue.
    queue: String,
    replies: Arc<Replies>,
    /// Set once the reply queue is declared and consumed.
    consuming: AtomicBool,
    /// The reply consumer, started by the first [`ResultBackend::reply_to`].
    consumer: tokio::sync::Mutex<Option<ReplyConsumer>>,
}

impl RpcBackend {
    /// The RPC backend at `url` (`rpc://...`) over the AMQP broker at `broker_url`. Nothing is
    /// connected until a result is sent or a task asks for one.
    pub fn open(url: &str, broker_url: &str) -> Result<Self, BackendError> {
        let options = RpcOptions::from_url(url).map_err(|reason| BackendError::BadUrl { url: url.into(), reason })?;
        let publisher = AmqpBroker::open(broker_url).map_err(|e| BackendError::BadUrl {
            url: url.into(),
            reason: format!("rpc:// sends results over the broker, whose URL is not usable: {e}"),
        })?;
        Ok(RpcBackend {
            url: url.to_string(),
            options,
            publisher,
            queue: uuid::Uuid::new_v4().to_string(),
            replies: Arc::new(Replies::default()),
            consuming: AtomicBool::new(false),
            consumer: tokio::sync::Mutex::new(None),
        })
    }

    /// The options the URL gave.
    pub fn options(&self) -> &RpcOptions {
        &self.options
    }

    fn unsupported(&self, operation: &str, reason: String) -> BackendError {
        BackendError::Unsupported { url: self.url.clone(), operation: operation.into(), reason }
    }

    /// Reading is only possible in the process that sent the task (and declared the queue).
    fn check_reader(&self, task_id: &str) -> Result<(), BackendError> {
        if self.consuming.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(self.unsupported(
            "read results here",
            format!(
                "rpc:// delivers each result once, to the reply queue of the client that sent the task, and \
                 this client sent none, so the result of task {task_id} can only be read by its sender; use a \
                 redis:// or sqlite:// result backend to read results from another process"
            ),
        ))
    }

    /// The message carrying `meta` to the client, as Celery's `RPCBackend.store_result` sends it.
    fn reply_message(&self, meta: &ResultMeta, correlation_id: &str) -> Message {
        Message {
            headers: Default::default(),
            properties: Properties {
                correlation_id: Some(correlation_id.to_string()),
                content_type: CONTENT_TYPE_JSON.into(),
                content_encoding: "utf-8".into(),
                delivery_mode: if self.options.persistent { 2 } else { 1 },
                priority: None,
                reply_to: None,
                expiration: None,
            },
            body: meta.to_json(),
        }
    }

    /// Publish under Celery's publish retry policy; `Ok(false)` when the queue is gone.
    async fn publish(&self, queue: &str, message: &Message) -> Result<bool, BrokerError> {
        let policy = PublishPolicy::default();
        let mut retry = 0;
        loop {
            match self.publisher.publish_reply(queue, message).await {
                Err(e @ (BrokerError::Unreachable { .. } | BrokerError::Timeout { .. }))
                    if retry < policy.max_retries =>
                {
                    tracing::warn!(queue, error = %e, "cannot send a result to its reply queue; retrying");
                    tokio::time::sleep(policy.interval(retry)).await;
                    retry += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    fn url(&self) -> &str {
        &self.url
    }

    /// With no task message at hand (a terminate by remote control) there is no queue to send to.
    async fn store(&self, meta: &ResultMeta) -> Result<(), BackendError> {
        tracing::info!(
            task_id = %meta.task_id,
            state = %meta.status,
            "rpc:// result not sent: no task message names the client's reply queue here (the worker that \
             holds or receives the task sends it)"
        );
        Ok(())
    }

    async fn store_for(&self, meta: &ResultMeta, reply: ReplyTo<'_>) -> Result<(), BackendError> {
        let Some(queue) = reply.queue else {
            tracing::warn!(
                task_id = %meta.task_id,
                state = %meta.status,
                "rpc:// result not sent: the task message has no reply_to (its client does not use the RPC backend)"
            );
            return Ok(());
        };
        let message = self.reply_message(meta, reply.correlation_id.unwrap_or(&meta.task_id));
        match self.publish(queue, &message).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(
                    task_id = %meta.task_id,
                    state = %meta.status,
                    reply_to = queue,
                    "rpc:// result dropped: the client's reply queue is gone (the client exited)"
                );
                Ok(())
            }
            Err(BrokerError::Unreachable { url, reason }) => Err(BackendError::Unreachable { url, reason }),
            Err(e) => Err(BackendError::Io { url: self.url.clone(), reason: e.to_string() }),
        }
    }

    async fn reply_to(&self) -> Result<Option<String>, BackendError> {
        if self.consuming.load(Ordering::Acquire) {
            return Ok(Some(self.queue.clone()));
        }
        let mut slot = self.consumer.lock().await;
        if slot.is_none() {
            let binding = reply_binding(&self.queue, self.options.expires);
            let consumer = ReplyConsumer::start(self.publisher.config().clone(), binding, self.replies.clone())
                .await
                .map_err(|e| match e {
                BrokerError::Unreachable { url, reason } => BackendError::Unreachable { url, reason },
                other => BackendError::Io { url: self.url.clone(), reason: other.to_string() },
            })?;
            *slot = Some(consumer);
            self.consuming.store(true, Ordering::Release);
        }
        Ok(Some(self.queue.clone()))
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        self.check_reader(task_id)?;
        Ok(self.replies.take(task_id, false))
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        Err(self.unsupported(
            "forget results",
            format!(
                "rpc:// keeps no result to forget: the result of task {task_id} is a message delivered once to \
                 the client that sent the task"
            ),
        ))
    }

    async fn wait(&self, task_id: &str, timeout: Option<Duration>) -> Result<ResultMeta, BackendError> {
        self.check_reader(task_id)?;
        let start = Instant::now();
        loop {
            let arrived = self.replies.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(meta) = self.replies.take(task_id, true) {
                return Ok(meta);
            }
            match timeout {
                Some(limit) => {
                    let waited = start.elapsed();
                    if waited >= limit {
                        return Err(BackendError::Timeout { task_id: task_id.to_string(), waited });
                    }
                    let _ = tokio::time::timeout(limit - waited, arrived).await;
                }
                None => arrived.await,
            }
        }
    }
}

/// The replies a client received, by task id, oldest first, at most [`MAX_BUFFERED`] ids.
#[derive(Default)]
struct Replies {
    buffer: Mutex<Buffer>,
    /// Woken on every reply.
    arrived: Notify,
}

#[derive(Default)]
struct Buffer {
    by_id: HashMap<String, Slot>,
    /// Ids in the order their latest reply came, with that reply's sequence number (an entry
    /// whose number is no longer its id's is stale and skipped).
    order: VecDeque<(String, u64)>,
    next_seq: u64,
    /// Replies dropped unread for lack of room.
    dropped_unread: u64,
}

struct Slot {
    meta: ResultMeta,
    seq: u64,
    read: bool,
}

impl Replies {
    /// Keep a reply, replacing an earlier state of the same task (a final state is never
    /// replaced by a later non-final one).
    fn put(&self, id: String, meta: ResultMeta) {
        {
            let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            b.insert(id, meta);
        }
        self.arrived.notify_waiters();
    }

    /// The latest reply for `id`; with `ready_only`, only a final state.
    fn take(&self, id: &str, ready_only: bool) -> Option<ResultMeta> {
        let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let slot = b.by_id.get_mut(id)?;
        if ready_only && !slot.meta.status.is_ready() {
            return None;
        }
        slot.read = true;
        Some(slot.meta.clone())
    }
}

impl Buffer {
    fn insert(&mut self, id: String, meta: ResultMeta) {
        if let Some(old) = self.by_id.get(&id) {
            if old.meta.status.is_ready() && !meta.status.is_ready() {
                tracing::debug!(task_id = %id, state = %meta.status, "rpc:// late non-final reply ignored");
                return;
            }
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        self.order.push_back((id.clone(), seq));
        self.by_id.insert(id, Slot { meta, seq, read: false });
        while self.by_id.len() > MAX_BUFFERED {
            let Some((old, old_seq)) = self.order.pop_front() else { break };
            if self.by_id.get(&old).is_some_and(|s| s.seq == old_seq) {
                let slot = self.by_id.remove(&old).expect("present");
                if !slot.read {
                    self.dropped_unread += 1;
                    if self.dropped_unread == 1 || self.dropped_unread.is_multiple_of(1024) {
                        tracing::warn!(
                            task_id = %old,
                            state = %slot.meta.status,
                            dropped = self.dropped_unread,
                            bound = MAX_BUFFERED,
                            "rpc:// reply buffer full: dropping the oldest result nobody asked for"
                        );
                    }
                }
            }
        }
        if self.order.len() > 2 * MAX_BUFFERED {
            let by_id = &self.by_id;
            self.order.retain(|(id, seq)| by_id.get(id).is_some_and(|s| s.seq == *seq));
        }
    }
}

/// Decode one reply: its task id (correlation id, else the body's) and its result.
fn decode_reply(message: &Message) -> Result<(String, ResultMeta), String> {
    let p = &message.properties;
    if p.content_type != CONTENT_TYPE_JSON {
        return Err(format!("unsupported content type {:?} (results are read as application/json)", p.content_type));
    }
    if !matches!(p.content_encoding.as_str(), "utf-8" | "utf8" | "binary" | "") {
        return Err(format!("unsupported content encoding {:?}", p.content_encoding));
    }
    let body = message.plain_body().map_err(|e| e.to_string())?;
    let meta = ResultMeta::from_json(&body).map_err(|e| format!("not a result: {e}"))?;
    let id = p.correlation_id.clone().filter(|c| !c.is_empty()).unwrap_or_else(|| meta.task_id.clone());
    Ok((id, meta))
}

/// The reply queue, as Celery 5.7's `RPCBackend.binding` declares it: durable, auto-delete, not
/// exclusive, `x-expires` (`tests/fixtures/celery/amqp/rpc.json`); routed by its name through the
/// default exchange, so nothing is bound.
fn reply_binding(queue: &str, expires: Option<Duration>) -> Binding {
    Binding {
        queue: queue.to_string(),
        routing_key: queue.to_string(),
        durable: true,
        auto_delete: true,
        exclusive: false,
        message_ttl: None,
        expires,
    }
}

/// The default exchange (`""`): declared by nobody, it routes to every queue by name.
fn default_exchange() -> ExchangeSpec {
    ExchangeSpec { name: String::new(), kind: ExchangeKind::Direct, durable: true, auto_delete: false }
}

/// The task reading the reply queue into the buffer; stopped (and its connection closed) when
/// dropped.
struct ReplyConsumer(tokio::task::JoinHandle<()>);

impl ReplyConsumer {
    /// Declare and consume the reply queue (the subscription reconnects and declares it again
    /// after a lost connection; the auto-delete queue may have gone with the old one, and results
    /// sent meanwhile are lost, as with Celery; the worker logs them as unroutable).
    async fn start(config: AmqpConfig, binding: Binding, replies: Arc<Replies>) -> Result<Self, BrokerError> {
        let mut sub = crate::exchanges::subscribe(config, &default_exchange(), &binding).await?;
        Ok(ReplyConsumer(tokio::spawn(async move {
            while let Ok(message) = sub.next().await {
                match decode_reply(&message) {
                    Ok((id, meta)) => {
                        tracing::debug!(task_id = %id, state = %meta.status, "rpc:// reply received");
                        replies.put(id, meta);
                    }
                    Err(reason) => tracing::warn!(
                        queue = %binding.queue,
                        correlation_id = message.properties.correlation_id.as_deref().unwrap_or(""),
                        %reason,
                        "rpc:// reply dropped: cannot read it"
                    ),
                }
            }
        })))
    }
}

impl Drop for ReplyConsumer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::TaskState;
    use serde_json::json;

    #[test]
    fn urls_take_persistence_and_expiry_and_nothing_else() {
        assert_eq!(
            RpcOptions::from_url("rpc://").unwrap(),
            RpcOptions { persistent: false, expires: Some(DEFAULT_EXPIRES) }
        );
        let o = RpcOptions::from_url("rpc://?persistent=true&result_expires=60").unwrap();
        assert_eq!(o, RpcOptions { persistent: true, expires: Some(Duration::from_secs(60)) });
        assert_eq!(RpcOptions::from_url("rpc:///?result_expires=0").unwrap().expires, None);
        assert!(RpcOptions::from_url("rpc://host:5672/").unwrap_err().contains("no host"));
        assert!(RpcOptions::from_url("rpc://?bogus=1").unwrap_err().contains("bogus"));
        assert!(RpcOptions::from_url("rpc://?persistent=maybe").unwrap_err().contains("maybe"));
        assert!(RpcOptions::from_url("rpc://?result_expires=-1").unwrap_err().contains("-1"));
    }

    #[test]
    fn replies_are_kept_by_id_and_a_final_state_is_never_replaced_by_a_late_one() {
        let r = Replies::default();
        r.put("a".into(), ResultMeta::new("a", TaskState::Retry, json!({})));
        assert_eq!(r.take("a", true), None, "RETRY is not a final state");
        assert_eq!(r.take("a", false).unwrap().status, TaskState::Retry);
        r.put("a".into(), ResultMeta::success("a", json!(5)));
        r.put("a".into(), ResultMeta::new("a", TaskState::Retry, json!({})));
        assert_eq!(r.take("a", true).unwrap().result, json!(5));
        assert_eq!(r.take("a", true).unwrap().result, json!(5), "a result can be read twice");
        assert_eq!(r.take("b", false), None);
    }

    #[test]
    fn the_buffer_keeps_the_newest_ids_up_to_its_bound() {
        let r = Replies::default();
        for i in 0..MAX_BUFFERED + 10 {
            let id = format!("t{i}");
            r.put(id.clone(), ResultMeta::success(id, json!(i)));
        }
        // An id updated late moves to the back and survives.
        r.put("t10".into(), ResultMeta::success("t10", json!("again")));
        r.put("new".into(), ResultMeta::success("new", json!(0)));
        let b = r.buffer.lock().unwrap();
        assert_eq!(b.by_id.len(), MAX_BUFFERED);
        assert!(!b.by_id.contains_key("t0") && !b.by_id.contains_key("t11"));
        assert!(b.by_id.contains_key("t10") && b.by_id.contains_key("t12") && b.by_id.contains_key("new"));
        assert_eq!(b.dropped_unread, 11, "t0..t9 and t11");
        assert!(b.order.len() <= 2 * MAX_BUFFERED + 1);
    }

    /// What Celery 5.7's RPC backend declared and sent (`capture_rpc.py`).
    fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!("../../../tests/fixtures/celery/amqp/rpc.json")).unwrap()
    }

    #[test]
    fn the_reply_queue_is_declared_as_celery_declares_it() {
        let f = fixture();
        let d = &f["reply_queue"]["queue_declare"];
        let b = reply_binding("q", Some(DEFAULT_EXPIRES));
        assert_eq!(
            (b.durable, b.exclusive, b.auto_delete),
            (d["durable"].as_bool().unwrap(), d["exclusive"].as_bool().unwrap(), d["auto_delete"].as_bool().unwrap())
        );
        // kombu writes `expires` as `x-expires` in milliseconds, as the subscription does.
        let millis = b.expires.unwrap().as_millis() as u64;
        assert_eq!(d["arguments"], json!({ "x-expires": millis }));
        assert_eq!(b.message_ttl, None);
        assert_eq!(f["task_properties"]["reply_to"], json!("<oid>"));
        assert!(default_exchange().name.is_empty(), "routed by name, nothing bound");
    }

    #[test]
    fn results_are_sent_as_celerys_rpc_backend_sends_them() {
        let f = fixture();
        let backend = RpcBackend::open("rpc://", "amqp://127.0.0.1//").unwrap();
        let exc = celeriac_core::ExceptionInfo::new("ValueError", "bad value", "builtins");
        for (case, status) in
            [("success", TaskState::Success), ("failure", TaskState::Failure), ("retry", TaskState::Retry)]
        {
            let want = &f["replies"][case];
            let id = want["properties"]["correlation_id"].as_str().unwrap();
            let mut meta = match status {
                TaskState::Success => ResultMeta::success(id, json!(5)),
                _ => ResultMeta::exception(id, status, &exc, Some("Traceback: pinned\n".into())),
            };
            meta.date_done = want["body"]["date_done"].as_str().map(str::to_string);
            let m = backend.reply_message(&meta, id);
            assert_eq!(String::from_utf8(m.body).unwrap(), want["body_utf8"].as_str().unwrap(), "{case}");
            let p = &want["properties"];
            assert_eq!(m.properties.content_type, p["content_type"].as_str().unwrap(), "{case}");
            assert_eq!(m.properties.content_encoding, p["content_encoding"].as_str().unwrap(), "{case}");
            assert_eq!(u64::from(m.properties.delivery_mode), p["delivery_mode"].as_u64().unwrap(), "{case}");
            assert_eq!(m.properties.correlation_id.as_deref(), Some(id), "{case}");
            assert_eq!(u64::from(m.properties.priority.unwrap_or(0)), p["priority"].as_u64().unwrap(), "{case}");
            assert_eq!(m.properties.reply_to, None, "{case}");
            assert!(m.headers.is_empty() && want["headers"].as_object().unwrap().is_empty(), "{case}");
            let publish = &want["publish"];
            assert_eq!(publish["exchange"], json!(""), "{case}: the default exchange");
            assert_eq!(publish["routing_key"], json!("<oid>"), "{case}: routed by the reply queue's name");
        }
        let persistent = RpcBackend::open("rpc://?persistent=1", "amqp://127.0.0.1//").unwrap();
        assert_eq!(persistent.reply_message(&ResultMeta::success("x", json!(1)), "x").properties.delivery_mode, 2);
    }

    #[test]
    fn replies_are_matched_by_correlation_id_then_by_the_body() {
        let meta = ResultMeta::success("body-id", json!(1));
        let mut m = Message {
            headers: Default::default(),
            properties: Properties { correlation_id: Some("corr".into()), ..Properties::default() },
            body: meta.to_json(),
        };
        assert_eq!(decode_reply(&m).unwrap().0, "corr");
        m.properties.correlation_id = None;
        assert_eq!(decode_reply(&m).unwrap(), ("body-id".to_string(), meta));
        m.properties.content_type = "application/x-python-serialize".into();
        assert!(decode_reply(&m).unwrap_err().contains("content type"));
        m.properties.content_type = CONTENT_TYPE_JSON.into();
        m.compress(celeriac_core::compression::Codec::from_name("zlib").unwrap()).unwrap();
        assert_eq!(decode_reply(&m).unwrap().1.task_id, "body-id", "a compressed reply is read");
        m.headers.insert("compression".into(), json!("application/x-snappy"));
        assert!(decode_reply(&m).unwrap_err().contains("snappy"));
        m.headers.clear();
        m.body = b"[1]".to_vec();
        assert!(decode_reply(&m).unwrap_err().contains("not a result"));
    }
}
