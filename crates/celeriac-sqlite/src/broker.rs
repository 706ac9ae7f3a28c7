//! The SQLite broker: queues as rows, delivery by renewable lease.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celeriac_core::broker::{Acker, Consumer, DeadLetter, Delivery, QueueInfo};
use celeriac_core::{envelope, Broker, BrokerError, Message};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::db::{now_ms, Db, Op, Row};
use crate::url::SqliteConfig;

/// A broker on one SQLite file.
#[derive(Clone)]
pub struct SqliteBroker {
    db: Arc<Db>,
    config: SqliteConfig,
}

impl SqliteBroker {
    /// Open the broker described by a `sqlite://` URL.
    pub fn open(url: &str) -> Result<Self, BrokerError> {
        let config =
            SqliteConfig::from_url(url).map_err(|reason| BrokerError::BadUrl { url: url.to_string(), reason })?;
        let db = Db::open(&config.path).map_err(|reason| BrokerError::Unreachable { url: url.to_string(), reason })?;
        Ok(SqliteBroker { db, config })
    }

    /// Open the broker of an existing file for a monitor: what only reads (queue depths, dead
    /// letters) runs on a read-only connection, and the file is opened for writing only when
    /// something is written (a purge, a publish). `Unreachable` if the file does not exist.
    pub fn open_read_only(url: &str) -> Result<Self, BrokerError> {
        let config =
            SqliteConfig::from_url(url).map_err(|reason| BrokerError::BadUrl { url: url.to_string(), reason })?;
        let db = Db::open_read_only(&config.path)
            .map_err(|reason| BrokerError::Unreachable { url: url.to_string(), reason })?;
        Ok(SqliteBroker { db, config })
    }

    fn io(&self, reason: String) -> BrokerError {
        BrokerError::Io { url: self.config.url.clone(), reason }
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    fn url(&self) -> &str {
        &self.config.url
    }

    async fn publish(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        let now = now_ms();
        let visible_at = message
            .task_headers()
            .ok()
            .and_then(|h| h.eta_time())
            .map(|eta| eta.timestamp_millis().max(now))
            .unwrap_or(now);
        let tag = uuid::Uuid::new_v4().to_string();
        let payload = envelope::encode(message, "", queue, &tag);
        let priority = i64::from(message.properties.priority.unwrap_or(0));
        let queue = queue.to_string();
        self.db
            .call(|reply| Op::Publish { queue, priority, visible_at, payload, reply })
            .await
            .map_err(|e| self.io(e))?;
        self.db.published.notify_waiters();
        Ok(())
    }

    /// A row of the `leases` table (name, holder, until), taken when free or lapsed.
    async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool, BrokerError> {
        let (name, holder, ttl_ms) = (name.to_string(), holder.to_string(), ttl.as_millis().max(1) as i64);
        self.db.call(|reply| Op::Lease { name, holder, ttl_ms, reply }).await.map_err(|e| self.io(e))
    }

    async fn last_runs(&self, schedule: &str) -> Result<std::collections::HashMap<String, i64>, BrokerError> {
        let schedule = schedule.to_string();
        self.db.call(|reply| Op::LastRuns { schedule, reply }).await.map_err(|e| self.io(e))
    }

    async fn record_runs(&self, schedule: &str, runs: &[(String, i64)]) -> Result<(), BrokerError> {
        let (schedule, runs) = (schedule.to_string(), runs.to_vec());
        self.db.call(|reply| Op::RecordRuns { schedule, runs, reply }).await.map_err(|e| self.io(e))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.db.call(|reply| Op::ReleaseLease { name, holder, reply }).await.map_err(|e| self.io(e))
    }

    async fn record_dead_letter(&self, queue: &str, message: &Message, reason: &str) -> Result<bool, BrokerError> {
        let tag = uuid::Uuid::new_v4().to_string();
        let payload = envelope::encode(message, "", queue, &tag);
        let (queue, reason) = (queue.to_string(), reason.to_string());
        let task_id = message.task_id().map(str::to_string);
        self.db
            .call(|reply| Op::RecordDeadLetter { queue, task_id, reason, payload, reply })
            .await
            .map_err(|e| self.io(e))?;
        Ok(true)
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        if queues.is_empty() {
            return Err(BrokerError::Rejected {
                url: self.config.url.clone(),
                reason: "no queue to consume from".into(),
            });
        }
        let prefetch = prefetch.max(1);
        let permits = Arc::new(Semaphore::new(prefetch));
        let owner = uuid::Uuid::new_v4().to_string();
        let lease_ms = self.config.visibility_timeout.as_millis().max(1) as i64;
        tokio::spawn(renew_leases(self.db.clone(), owner.clone(), lease_ms, permits.clone(), prefetch));
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let fetcher =
            Fetcher { broker: self.clone(), queues: queues.to_vec(), owner, lease_ms, permits: permits.clone(), tx };
        tokio::spawn(fetcher.run(stop_rx));
        Ok(Box::new(SqliteConsumer { rx, stop, permits }))
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let queue = queue.to_string();
        self.db.call(|reply| Op::Purge { queue, reply }).await.map_err(|e| self.io(e))
    }

    async fn queues(&self, queues: &[String]) -> Result<Vec<QueueInfo>, BrokerError> {
        let queues = queues.to_vec();
        self.db.call(|reply| Op::Depths { queues, reply }).await.map_err(|e| self.io(e))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let rows = self.db.call(|reply| Op::DeadLetters { limit, reply }).await.map_err(|e| self.io(e))?;
        Ok(rows
            .into_iter()
            .map(|r| DeadLetter {
                id: r.id,
                queue: r.queue,
                task_id: r.task_id,
                reason: r.reason,
                dead_at_ms: r.dead_at_ms,
            })
            .collect())
    }

    fn delivers_eta_natively(&self) -> bool {
        true
    }
}

/// Keep the leases of everything this consumer holds alive, every third of the visibility
/// timeout, until the consumer is closed and all its deliveries are settled.
async fn renew_leases(db: Arc<Db>, owner: String, lease_ms: i64, permits: Arc<Semaphore>, prefetch: usize) {
    let every = Duration::from_millis((lease_ms / 3).max(1) as u64);
    loop {
        tokio::time::sleep(every).await;
        if permits.is_closed() && permits.available_permits() >= prefetch {
            return;
        }
        db.send(Op::Renew { owner: owner.clone(), lease_ms });
    }
}

/// Fetches in a background task and hands deliveries over a channel, so that
/// [`Consumer::next`] is cancel-safe: a caller dropping a pending `next()` loses nothing.
struct SqliteConsumer {
    rx: mpsc::UnboundedReceiver<Result<Delivery, BrokerError>>,
    stop: watch::Sender<bool>,
    permits: Arc<Semaphore>,
}

struct Fetcher {
    broker: SqliteBroker,
    queues: Vec<String>,
    owner: String,
    lease_ms: i64,
    permits: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Result<Delivery, BrokerError>>,
}

impl Fetcher {
    fn deliver(&self, row: Row, permit: OwnedSemaphorePermit) -> Option<Delivery> {
        let db = &self.broker.db;
        match envelope::decode(&row.payload) {
            Ok(message) => {
                let acker = SqliteAcker {
                    db: db.clone(),
                    id: row.id,
                    owner: self.owner.clone(),
                    task_id: message.task_id().map(str::to_string),
                    permit: Some(permit),
                    settled: false,
                };
                Some(Delivery::new(message, row.queue, row.delivery_count, Box::new(acker)))
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(queue = %row.queue, row = row.id, %reason, "dead-lettering a message that cannot be read");
                db.send(Op::DeadLetter { id: row.id, reason, task_id: None, reply: None });
                None
            }
        }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let max_idle = self.broker.config.poll_interval;
        let min_idle = Duration::from_millis(1).min(max_idle);
        let mut idle = min_idle;
        let mut errors = 0u32;
        loop {
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.changed() => return,
            };
            let mut permits = vec![first];
            while let Ok(p) = self.permits.clone().try_acquire_owned() {
                permits.push(p);
            }
            let db = self.broker.db.clone();
            let notified = db.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (queues, owner, limit, lease_ms) =
                (self.queues.clone(), self.owner.clone(), permits.len(), self.lease_ms);
            // Not raced against `stop`: once the rows are leased they must reach a delivery.
            let rows = match db.call(|reply| Op::Fetch { queues, limit, owner, lease_ms, reply }).await {
                Ok(rows) => {
                    errors = 0;
                    rows
                }
                Err(e) => {
                    drop(permits);
                    errors += 1;
                    if self.tx.send(Err(self.broker.io(e))).is_err() {
                        return;
                    }
                    let pause = Duration::from_millis(50 * u64::from(errors.min(20)));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            if rows.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop.changed() => return,
                }
                idle = (idle * 2).min(max_idle);
                continue;
            }
            idle = min_idle;
            for (row, permit) in rows.into_iter().zip(permits) {
                if let Some(d) = self.deliver(row, permit) {
                    // A closed channel drops the delivery, which puts it back in the queue.
                    let _ = self.tx.send(Ok(d));
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for SqliteConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.rx.recv().await.unwrap_or(Err(BrokerError::Closed))
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        self.rx.close();
        // Dropping an unsettled delivery requeues it.
        while let Ok(d) = self.rx.try_recv() {
            drop(d);
        }
        self.permits.close();
    }
}

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.rx.close();
        while let Ok(d) = self.rx.try_recv() {
            drop(d);
        }
        // The lease renewer stops by itself once every handed-out delivery is settled.
        self.permits.close();
    }
}

struct SqliteAcker {
    db: Arc<Db>,
    id: i64,
    owner: String,
    task_id: Option<String>,
    permit: Option<OwnedSemaphorePermit>,
    settled: bool,
}

impl SqliteAcker {
    fn io(&self, reason: String) -> BrokerError {
        BrokerError::Io { url: format!("sqlite://{}", self.db.path().display()), reason }
    }
}

#[async_trait]
impl Acker for SqliteAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        self.settled = true;
        let id = self.id;
        let r = self.db.call(|reply| Op::Ack { id, reply: Some(reply) }).await;
        self.permit.take();
        r.map_err(|e| self.io(e))
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        self.settled = true;
        let (id, owner) = (self.id, self.owner.clone());
        let r = if requeue {
            self.db.call(|reply| Op::Requeue { id, owner, reply: Some(reply) }).await
        } else {
            self.db.call(|reply| Op::Ack { id, reply: Some(reply) }).await
        };
        self.permit.take();
        r.map_err(|e| self.io(e))
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BrokerError> {
        self.settled = true;
        let id = self.id;
        let (reason, task_id) = (reason.to_string(), self.task_id.clone());
        let r = self.db.call(|reply| Op::DeadLetter { id, reason, task_id, reply: Some(reply) }).await;
        self.permit.take();
        r.map_err(|e| self.io(e))
    }
}

impl Drop for SqliteAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.db.send(Op::Requeue { id: self.id, owner: self.owner.clone(), reply: None });
        }
    }
}
