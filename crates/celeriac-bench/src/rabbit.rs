//! Bare lapin clients, the broker's own limits: a publisher keeping many confirms in flight and a
//! consumer acknowledging in batches, both doing no work. Also the queue-depth poller that times
//! every drain the same way, whoever consumes.
//!
//! The bare clients declare the queue as Celery does (durable, no arguments), publish persistent
//! messages to the default exchange, and consume with `basic.qos` prefetch.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// How often the drain timer reads the queue depth.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props))
        .await
        .context("connecting to RabbitMQ timed out")?
        .with_context(|| format!("connecting to {url}"))
}

/// A connection for looking at queues: declare, depth, delete.
pub struct Admin {
    _conn: Connection,
    channel: Channel,
}

impl Admin {
    /// Connect.
    pub async fn connect(url: &str) -> Result<Self> {
        let conn = connect(url, "celeriac-bench admin").await?;
        let channel = conn.create_channel().await?;
        Ok(Admin { _conn: conn, channel })
    }

    /// Declare a durable queue with no arguments (what Celery and celeriac declare).
    pub async fn declare(&self, queue: &str) -> Result<()> {
        declare(&self.channel, queue).await
    }

    /// Ready messages and consumers of a queue (a passive declare: creates nothing).
    pub async fn depth(&self, queue: &str) -> Result<(u32, u32)> {
        let q = tokio::time::timeout(
            Duration::from_secs(10),
            self.channel.queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            ),
        )
        .await
        .context("passive declare timed out")?
        .with_context(|| format!("reading the depth of queue {queue}"))?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Delete a queue and what it holds.
    pub async fn delete(&self, queue: &str) -> Result<()> {
        self.channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
        Ok(())
    }

    /// Wait until `queue` has a consumer, up to `limit`; `alive` is checked on the way.
    pub async fn wait_for_consumer(
        &self,
        queue: &str,
        limit: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.depth(queue).await?.1 > 0 {
                return Ok(());
            }
            alive()?;
            if Instant::now() >= deadline {
                bail!("no consumer on queue {queue} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Time the drain of `queue`, holding `n` ready messages when called, by polling its depth
    /// every [`POLL_INTERVAL`] until it reads 0 (up to `limit`). `cpu` gives the CPU seconds
    /// used so far by the consumer and by the broker, read with each depth.
    pub async fn time_drain(
        &self,
        queue: &str,
        n: u64,
        limit: Duration,
        alive: impl FnMut() -> Result<()>,
        cpu: impl FnMut() -> (f64, f64),
    ) -> Result<Drain> {
        Drain::from_samples(n, &self.drain_samples(queue, n, limit, alive, cpu).await?)
    }

    /// The readings [`Admin::time_drain`] times a drain from, one per call of `cpu`.
    pub async fn drain_samples(
        &self,
        queue: &str,
        n: u64,
        limit: Duration,
        mut alive: impl FnMut() -> Result<()>,
        mut cpu: impl FnMut() -> (f64, f64),
    ) -> Result<Vec<Sample>> {
        let started = Instant::now();
        let mut samples: Vec<Sample> = Vec::with_capacity(4096);
        loop {
            let (ready, _) = self.depth(queue).await?;
            let now = Instant::now();
            let (consumer_cpu, broker_cpu) = cpu();
            samples.push(Sample { at: now, ready: u64::from(ready), consumer_cpu, broker_cpu });
            if ready == 0 {
                break;
            }
            alive()?;
            if now - started >= limit {
                bail!("queue {queue} still holds {ready} of {n} messages after {limit:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(samples)
    }
}

async fn declare(channel: &Channel, queue: &str) -> Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring queue {queue}"))?;
    Ok(())
}

/// One reading of a queue's depth.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When.
    pub at: Instant,
    /// Ready messages.
    pub ready: u64,
    /// CPU seconds used so far by the consumer (process tree).
    pub consumer_cpu: f64,
    /// CPU seconds used so far by the broker.
    pub broker_cpu: f64,
}

/// A drain timed from the queue depth.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Messages per second while the depth fell from 90% to 10% of the fill.
    pub rate: f64,
    /// From the first depth below the fill to the first reading of 0.
    pub first_to_empty: Duration,
    /// Depth readings taken.
    pub samples: usize,
    /// CPU time of the consumer per message in the same window, microseconds.
    pub consumer_us: f64,
    /// CPU time of the broker per message in the same window, microseconds.
    pub broker_us: f64,
}

impl Drain {
    /// The steady-state rate from depth samples: the slope between the first reading at or below
    /// 90% of `n` and the first at or below 10% (start-up, the prefetch grab and the tail are
    /// outside the window, and are the same kind of thing for every consumer).
    pub fn from_samples(n: u64, samples: &[Sample]) -> Result<Self> {
        let first = samples.iter().find(|s| s.ready < n).context("the depth never fell")?;
        let last = samples.last().context("no samples")?;
        let hi = samples.iter().find(|s| s.ready * 10 <= n * 9).context("no reading at 90%")?;
        let lo = samples.iter().find(|s| s.ready * 10 <= n).context("no reading at 10%")?;
        let span = lo.at.duration_since(hi.at).as_secs_f64();
        if span <= 0.0 {
            bail!("the queue drained between two readings {POLL_INTERVAL:?} apart: use more messages");
        }
        let moved = (hi.ready - lo.ready) as f64;
        Ok(Drain {
            rate: moved / span,
            first_to_empty: last.at.duration_since(first.at),
            samples: samples.len(),
            consumer_us: (lo.consumer_cpu - hi.consumer_cpu) / moved * 1e6,
            broker_us: (lo.broker_cpu - hi.broker_cpu) / moved * 1e6,
        })
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "{:.0}/s ({:.2}s first delivery to empty, {} depth readings; CPU per message: consumer {:.0} µs, broker {:.0} µs)",
            self.rate,
            self.first_to_empty.as_secs_f64(),
            self.samples,
            self.consumer_us,
            self.broker_us
        )
    }
}

/// The AMQP headers and correlation id of a celeriac message, to publish the same bytes.
#[derive(Debug, Clone)]
pub struct Headers {
    table: FieldTable,
    correlation_id: Option<String>,
}

impl Headers {
    /// What celeriac's broker puts in the properties of `message`.
    pub fn of(message: &celeriac::protocol::Message) -> Self {
        Headers {
            // The bench's messages carry only small integers and strings in their headers.
            table: celeriac_amqp::fields::to_table(&message.headers).unwrap_or_default(),
            correlation_id: message.properties.correlation_id.clone(),
        }
    }
}

/// Publish `warmup` then `n` persistent messages with `body` (and `headers`, if given) to
/// `queue` on one confirm-mode channel, keeping `in_flight` confirms outstanding; returns the
/// time of the `n`, and how much the CPU counters `cpu` reads (client, broker) grew meanwhile.
#[allow(clippy::too_many_arguments)]
pub async fn bare_publish(
    url: &str,
    queue: &str,
    body: &[u8],
    headers: Option<&Headers>,
    warmup: u64,
    n: u64,
    in_flight: usize,
    cpu: &dyn Fn() -> (f64, f64),
) -> Result<(Duration, (f64, f64))> {
    let conn = connect(url, "celeriac-bench bare publisher").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&channel, queue).await?;
    let publish_all = |count: u64| {
        let channel = channel.clone();
        async move {
            let mut confirms = futures::stream::iter(0..count)
                .map(|_| {
                    let channel = channel.clone();
                    async move {
                        let mut props = BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into())
                            .with_content_encoding("utf-8".into());
                        if let Some(h) = headers {
                            props = props.with_priority(0).with_headers(h.table.clone());
                            if let Some(id) = &h.correlation_id {
                                props = props.with_correlation_id(id.as_str().into());
                            }
                        }
                        let confirm = channel
                            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props)
                            .await?;
                        let confirmation = confirm.await?;
                        if confirmation.is_nack() {
                            bail!("RabbitMQ nacked a message");
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(in_flight);
            while let Some(r) = confirms.next().await {
                r?;
            }
            Ok::<(), anyhow::Error>(())
        }
    };
    publish_all(warmup).await?;
    let (started, before) = (Instant::now(), cpu());
    publish_all(n).await?;
    let (elapsed, after) = (started.elapsed(), cpu());
    let _ = conn.close(200, "done".into()).await;
    Ok((elapsed, (after.0 - before.0, after.1 - before.1)))
}

/// Publish `warmup` then `n` persistent messages one at a time, each waiting for its confirm;
/// returns the `n` latencies in seconds (the floor of any round trip that waits for a confirm).
pub async fn bare_confirm_latency(
    url: &str,
    queue: &str,
    body: &[u8],
    headers: &Headers,
    warmup: u64,
    n: u64,
) -> Result<Vec<f64>> {
    let conn = connect(url, "celeriac-bench bare confirm latency").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&channel, queue).await?;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..warmup + n {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_priority(0)
            .with_headers(headers.table.clone());
        if let Some(id) = &headers.correlation_id {
            props = props.with_correlation_id(id.as_str().into());
        }
        let started = Instant::now();
        publish_confirmed(&channel, queue, body, props).await?;
        if i >= warmup {
            out.push(started.elapsed().as_secs_f64());
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Consume `n` messages from `queue` with prefetch `prefetch`, acknowledging with `multiple`
/// every `ack_every` deliveries (and the remainder at the end); returns once all are acked.
pub async fn bare_consume(url: String, queue: String, n: u64, prefetch: u16, ack_every: u64) -> Result<()> {
    let conn = connect(&url, "celeriac-bench bare consumer").await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "bare".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut seen = 0u64;
    let mut last_acked = 0u64;
    let mut last_tag = 0u64;
    while seen < n {
        let delivery = match consumer.next().await {
            Some(d) => d?,
            None => bail!("the bare consumer was cancelled after {seen} of {n}"),
        };
        seen += 1;
        last_tag = delivery.delivery_tag;
        if seen - last_acked >= ack_every {
            channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await?;
            last_acked = seen;
        }
    }
    if last_acked < seen {
        channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await?;
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The broker's floor for a chain of `steps`: one connection relays a message through `queue`
/// `steps` times, each a persistent publish waiting for its confirm, then its delivery and ack,
/// as a worker passes a chain on (no JSON, no task, no result backend). Message `k` is
/// `(steps - k) × step_bytes` long, as a chain step's message carries the steps after it.
/// Returns the seconds from the first publish to the last delivery.
pub async fn bare_chain(url: &str, queue: &str, steps: u64, step_bytes: usize) -> Result<f64> {
    let conn = connect(url, "celeriac-bench bare chain").await?;
    // A publishing channel with confirms and a consuming one whose prefetch lets the next
    // message be delivered as soon as it is published (before the current one is acked), as a
    // worker consumes.
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&channel, queue).await?;
    let consuming = conn.create_channel().await?;
    consuming.basic_qos(4, BasicQosOptions::default()).await?;
    let mut consumer = consuming
        .basic_consume(queue.into(), "bare-chain".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let body = vec![b'x'; steps as usize * step_bytes];
    let publish = |len: usize| {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into());
        publish_confirmed(&channel, queue, &body[..len.max(1)], props)
    };
    let started = Instant::now();
    publish(steps as usize * step_bytes).await?;
    for k in 1..=steps {
        let delivery = match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) => bail!("the bare chain's consumer was cancelled at step {k}"),
            Err(_) => bail!("the bare chain's step {k} was not delivered within 10s"),
        };
        if k < steps {
            publish((steps - k) as usize * step_bytes).await?;
        }
        consuming.basic_ack(delivery.delivery_tag, BasicAckOptions::default()).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = consuming.close(200, "done".into()).await;
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(elapsed)
}

/// Publish one message to `queue` through the default exchange and wait for its confirm (10 s).
async fn publish_confirmed(channel: &Channel, queue: &str, body: &[u8], props: BasicProperties) -> Result<()> {
    let confirm = channel.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await?;
    let confirmation = tokio::time::timeout(Duration::from_secs(10), confirm).await.context("no confirm in 10s")??;
    if confirmation.is_nack() {
        bail!("RabbitMQ nacked a message");
    }
    Ok(())
}
