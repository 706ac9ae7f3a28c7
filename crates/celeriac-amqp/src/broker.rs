//! The AMQP publisher and the `Broker` implementation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celeriac_core::broadcast::{Binding, ExchangeSpec, Exchanges, Subscription};
use celeriac_core::broker::{Consumer, QueueInfo};
use celeriac_core::{Broker, BrokerError, Message};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::url::AmqpConfig;
use crate::{consumer, fields, topology};

/// How long to wait for a publisher confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a publish goes.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// A task queue (declared as Celery declares it), through the default exchange.
    Queue(&'a str),
    /// An exchange (declared as the spec says), with a routing key.
    Exchange(&'a ExchangeSpec, &'a str),
    /// A reply queue someone else declared (the RPC result backend's), through the default
    /// exchange; nothing is declared.
    Reply(&'a str),
}

/// A RabbitMQ broker.
pub struct AmqpBroker {
    config: AmqpConfig,
    /// The publisher in use: read by every publish without waiting (a plain read lock, held
    /// for a clone of an `Arc`).
    publisher: std::sync::RwLock<Option<Arc<Publisher>>>,
    /// Held while (re)connecting, so one task connects and the others wait for it.
    connecting: Mutex<()>,
    /// Beat's leases held by this process (see [`crate::beat`]).
    pub(crate) leases: crate::beat::Leases,
}

/// One connection with a confirm-mode channel, and the queues declared on it.
struct Publisher {
    conn: Connection,
    channel: Channel,
    /// What was declared on this connection: queue names, and `exchange\0<name>` for exchanges.
    declared: std::sync::Mutex<HashSet<String>>,
    generation: u64,
}

impl Publisher {
    fn usable(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }

    fn is_declared(&self, key: &str) -> bool {
        self.declared.lock().unwrap_or_else(|e| e.into_inner()).contains(key)
    }

    fn mark_declared(&self, key: String) {
        self.declared.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
    }
}

impl AmqpBroker {
    /// A broker for an `amqp://` URL. Nothing is connected until first use.
    pub fn open(url: &str) -> Result<Self, BrokerError> {
        let config = AmqpConfig::from_url(url).map_err(|reason| BrokerError::BadUrl { url: redact(url), reason })?;
        Ok(AmqpBroker {
            config,
            publisher: std::sync::RwLock::new(None),
            connecting: Mutex::new(()),
            leases: Default::default(),
        })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// The publisher's channel, connecting first if needed.
    fn current(&self) -> Option<Arc<Publisher>> {
        self.publisher.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The publisher, connecting first if needed.
    async fn channel(&self) -> Result<Arc<Publisher>, BrokerError> {
        if let Some(p) = self.current().filter(|p| p.usable()) {
            return Ok(p);
        }
        let _connecting = self.connecting.lock().await;
        // Another task may have connected while this one waited.
        let previous = self.current();
        if let Some(p) = previous.as_ref().filter(|p| p.usable()) {
            return Ok(p.clone());
        }
        let generation = previous.as_ref().map(|p| p.generation + 1).unwrap_or(0);
        *self.publisher.write().unwrap_or_else(|e| e.into_inner()) = None;
        let conn = connect(&self.config, "celeriac publisher").await?;
        let channel = conn.create_channel().await.map_err(|e| unreachable(&self.config, e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| unreachable(&self.config, e))?;
        let p = Arc::new(Publisher { conn, channel, declared: Default::default(), generation });
        *self.publisher.write().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        Ok(p)
    }

    /// Forget the publisher connection if it is still the one that failed.
    async fn invalidate(&self, generation: u64) {
        let failed = {
            let mut slot = self.publisher.write().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|p| p.generation == generation) {
                slot.take()
            } else {
                None
            }
        };
        if let Some(p) = failed {
            let _ = tokio::time::timeout(Duration::from_secs(1), p.conn.close(320, "reconnecting".into())).await;
        }
    }

    /// Publish a result to the reply queue `queue` through the default exchange (as Celery's RPC
    /// backend does), declaring nothing, and wait for the confirm. Returns `false` when RabbitMQ
    /// returned the message because no queue has that name (the client that asked is gone).
    pub async fn publish_reply(&self, queue: &str, message: &Message) -> Result<bool, BrokerError> {
        self.publish_once(Route::Reply(queue), message).await
    }

    /// Publish once; `Ok(false)` when a reply was returned unroutable (a task that cannot be
    /// routed is an error).
    async fn publish_once(&self, route: Route<'_>, message: &Message) -> Result<bool, BrokerError> {
        let publisher = self.channel().await?;
        let (channel, generation) = (&publisher.channel, publisher.generation);
        let result = async {
            let (declared_key, exchange, routing_key) = match route {
                // As Celery: the default exchange, routed by the queue's name.
                Route::Queue(queue) => (std::borrow::Cow::Borrowed(queue), "", queue),
                Route::Exchange(ex, key) => (format!("exchange\0{}", ex.name).into(), ex.name.as_str(), key),
                Route::Reply(queue) => (std::borrow::Cow::Borrowed(""), "", queue),
            };
            let what = || match route {
                Route::Queue(queue) => format!("queue {queue:?}"),
                Route::Exchange(ex, _) => format!("exchange {:?}", ex.name),
                Route::Reply(queue) => format!("reply queue {queue:?}"),
            };
            let props = properties(message).map_err(|e| BrokerError::Rejected {
                url: self.config.redacted.clone(),
                reason: format!("the message for {} cannot be sent: {e}", what()),
            })?;
            if !matches!(route, Route::Reply(_)) && !publisher.is_declared(&declared_key) {
                match route {
                    Route::Queue(queue) => topology::declare(channel, &self.config, queue).await.map(|_| ()),
                    Route::Exchange(ex, _) => topology::declare_exchange(channel, ex).await,
                    Route::Reply(_) => Ok(()),
                }
                .map_err(|e| self.rejected_or_lost(e))?;
                publisher.mark_declared(declared_key.into_owned());
            }
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    // A task must reach a queue; a broadcast nobody listens to is dropped; a reply
                    // to a queue that is gone comes back, so the caller can say so.
                    BasicPublishOptions {
                        mandatory: matches!(route, Route::Queue(_) | Route::Reply(_)),
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    props,
                )
                .await
                .map_err(|e| unreachable(&self.config, e))?;
            let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                .await
                .map_err(|_| BrokerError::Timeout {
                    url: self.config.redacted.clone(),
                    operation: "publisher confirm".into(),
                    elapsed: CONFIRM_TIMEOUT,
                })?
                .map_err(|e| unreachable(&self.config, e))?;
            if confirmation.is_nack() {
                return Err(BrokerError::Rejected {
                    url: self.config.redacted.clone(),
                    reason: format!("RabbitMQ refused (nack) the message for {}", what()),
                });
            }
            if let Some(returned) = confirmation.take_message() {
                if matches!(route, Route::Reply(_)) {
                    return Ok(false);
                }
                return Err(BrokerError::Rejected {
                    url: self.config.redacted.clone(),
                    reason: format!(
                        "the message for {} was unroutable ({} {})",
                        what(),
                        returned.reply_code,
                        returned.reply_text
                    ),
                });
            }
            Ok(true)
        }
        .await;
        if let Err(e) = &result {
            if !matches!(e, BrokerError::Rejected { .. }) {
                self.invalidate(generation).await;
            }
        }
        result
    }

    fn rejected_or_lost(&self, e: lapin::Error) -> BrokerError {
        let text = e.to_string();
        if text.contains("PRECONDITION_FAILED") || text.contains("ACCESS_REFUSED") || text.contains("NOT_FOUND") {
            BrokerError::Rejected { url: self.config.redacted.clone(), reason: text }
        } else {
            unreachable(&self.config, e)
        }
    }

    /// A short-lived channel for administrative calls (depths, purge).
    pub(crate) async fn admin<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, lapin::Error>>,
    {
        let publisher = self.channel().await?;
        let generation = publisher.generation;
        let conn_channel = publisher.conn.create_channel().await;
        let channel = match conn_channel {
            Ok(c) => c,
            Err(e) => {
                self.invalidate(generation).await;
                return Err(unreachable(&self.config, e));
            }
        };
        let out = f(channel.clone()).await.map_err(|e| self.rejected_or_lost(e));
        let _ = channel.close(200, "done".into()).await;
        out
    }
}

/// Properties of an outgoing message, from the protocol's properties and headers.
fn properties(message: &Message) -> Result<BasicProperties, fields::FieldError> {
    let p = &message.properties;
    let mut props = BasicProperties::default()
        .with_content_type(ShortString::from(p.content_type.as_str()))
        .with_content_encoding(ShortString::from(p.content_encoding.as_str()))
        .with_delivery_mode(p.delivery_mode)
        .with_priority(p.priority.unwrap_or(0))
        .with_headers(fields::to_table(&message.headers)?);
    if let Some(id) = &p.correlation_id {
        props = props.with_correlation_id(ShortString::from(id.as_str()));
    }
    if let Some(r) = &p.reply_to {
        props = props.with_reply_to(ShortString::from(r.as_str()));
    }
    if let Some(e) = &p.expiration {
        props = props.with_expiration(ShortString::from(e.as_str()));
    }
    Ok(props)
}

/// Connect with the configured timeout covering TCP connect and the AMQP handshake.
pub(crate) async fn connect(config: &AmqpConfig, name: &str) -> Result<Connection, BrokerError> {
    let started = Instant::now();
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    match tokio::time::timeout(config.connect_timeout, Connection::connect(&config.lapin_uri, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable(config, e)),
        Err(_) => Err(BrokerError::Unreachable {
            url: config.redacted.clone(),
            reason: format!(
                "no AMQP handshake from {} within {:.1}s (connect_timeout)",
                config.host,
                started.elapsed().as_secs_f64()
            ),
        }),
    }
}

pub(crate) fn unreachable(config: &AmqpConfig, e: lapin::Error) -> BrokerError {
    BrokerError::Unreachable { url: config.redacted.clone(), reason: e.to_string() }
}

fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, rest)| rest.rsplit_once('@').map(|(u, h)| (s, u, h))) {
        Some((scheme, userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn url(&self) -> &str {
        &self.config.redacted
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        self.publish_once(Route::Queue(queue), message).await.map(|_| ())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        if queues.is_empty() {
            return Err(BrokerError::Rejected {
                url: self.config.redacted.clone(),
                reason: "no queue to consume from".into(),
            });
        }
        let c = consumer::AmqpConsumer::start(self.config.clone(), queues.to_vec(), prefetch).await?;
        Ok(Box::new(c))
    }

    fn exchanges(&self) -> Option<&dyn Exchanges> {
        Some(self)
    }

    /// RabbitMQ's default `consumer_timeout` is 30 minutes; hold for half of it.
    fn max_unacked_hold(&self) -> Option<Duration> {
        Some(Duration::from_secs(15 * 60))
    }

    async fn lease(&self, name: &str, holder: &str, _ttl: Duration) -> Result<bool, BrokerError> {
        self.amqp_lease(name, holder).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        self.amqp_release_lease(name, holder).await
    }

    async fn last_runs(&self, schedule: &str) -> Result<HashMap<String, i64>, BrokerError> {
        self.amqp_last_runs(schedule).await
    }

    async fn record_runs(&self, schedule: &str, runs: &[(String, i64)]) -> Result<(), BrokerError> {
        self.amqp_record_runs(schedule, runs).await
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let queue = queue.to_string();
        self.admin(|ch| async move {
            ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.map(u64::from)
        })
        .await
    }

    async fn queues(&self, queues: &[String]) -> Result<Vec<QueueInfo>, BrokerError> {
        if queues.is_empty() {
            return Err(BrokerError::Rejected {
                url: self.config.redacted.clone(),
                reason: "RabbitMQ does not list queues over AMQP: name the queues to show".into(),
            });
        }
        let mut out = Vec::new();
        for q in queues {
            let name = q.clone();
            // A passive declare reads the counts without creating anything.
            let (ready, consumers) = self
                .admin(|ch| async move {
                    let q = ch
                        .queue_declare(
                            name.as_str().into(),
                            QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
                            Default::default(),
                        )
                        .await?;
                    Ok((q.message_count(), q.consumer_count()))
                })
                .await?;
            out.push(QueueInfo {
                name: q.clone(),
                ready: u64::from(ready),
                scheduled: 0,
                unacked: 0,
                consumers: Some(u64::from(consumers)),
                dead: 0,
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl Exchanges for AmqpBroker {
    async fn publish_to(
        &self,
        exchange: &ExchangeSpec,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BrokerError> {
        self.publish_once(Route::Exchange(exchange, routing_key), message).await.map(|_| ())
    }

    async fn subscribe(
        &self,
        exchange: &ExchangeSpec,
        binding: &Binding,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        let s = crate::exchanges::subscribe(self.config.clone(), exchange, binding).await?;
        Ok(Box::new(s))
    }
}
