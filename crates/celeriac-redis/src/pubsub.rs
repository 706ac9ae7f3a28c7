//! One shared pub/sub connection that wakes waiters when a channel receives a message.
//!
//! Celery publishes every stored result on a channel named like its key, so a waiter subscribes
//! to that channel instead of polling. All waiters of one backend share one pub/sub connection
//! (as Celery's `ResultConsumer` does): [`Hub::subscribe`] counts the waiters of each channel,
//! sends `SUBSCRIBE` for the first and `UNSUBSCRIBE` after the last (when its [`Subscription`] is
//! dropped). Subscribing and unsubscribing happen under one lock, so the commands reach the server
//! in the order the counts changed.
//!
//! A background task reads the connection and hands each message's payload to the channel's
//! waiters through a `watch` channel (the latest payload wins; none is lost between two looks).
//! When the connection drops, the task ends and marks it dead; the next subscription opens a new
//! one and subscribes again to every channel still waited on, and so does [`Hub::revive`], which
//! waiters call each time they re-read their result (at least every second). Messages published
//! while no connection is open are lost, which is why waiters re-read their result periodically.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{oneshot, watch};

use crate::conn::{Failure, Redis};

/// The latest message published on a channel, if any yet.
pub type Payload = Option<Arc<[u8]>>;

/// The waiters of one channel.
struct Channel {
    waiters: usize,
    latest: watch::Sender<Payload>,
}

type Channels = Arc<Mutex<HashMap<String, Channel>>>;

/// The live pub/sub connection, if any.
#[derive(Default)]
struct Link {
    sink: Option<PubSubSink>,
    /// Cleared by the reader task when the connection ends.
    alive: Arc<AtomicBool>,
    /// Dropping it stops the reader task (and so closes the connection).
    _stop: Option<oneshot::Sender<()>>,
}

impl Link {
    fn is_alive(&self) -> bool {
        self.sink.is_some() && self.alive.load(Ordering::Acquire)
    }
}

/// Channel subscriptions shared by the waiters of one backend.
pub struct Hub {
    redis: Arc<Redis>,
    /// Held while the subscriptions change, so SUBSCRIBE/UNSUBSCRIBE go out in order.
    link: tokio::sync::Mutex<Link>,
    /// Channel name → waiters; read by the reader task.
    channels: Channels,
}

/// A registered interest in one channel; unsubscribes (after the last waiter) when dropped.
pub struct Subscription {
    hub: Arc<Hub>,
    channel: String,
    /// The channel's latest message.
    pub latest: watch::Receiver<Payload>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let (hub, channel) = (self.hub.clone(), std::mem::take(&mut self.channel));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { hub.release(&channel).await });
        }
    }
}

fn lock(channels: &Channels) -> MutexGuard<'_, HashMap<String, Channel>> {
    channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// A hub for the given server; connects on the first subscription.
    pub fn new(redis: Arc<Redis>) -> Self {
        Hub { redis, link: tokio::sync::Mutex::new(Link::default()), channels: Arc::default() }
    }

    /// Subscribe to a channel. When this returns, the server has confirmed the subscription, so
    /// every message published from now on reaches [`Subscription::latest`].
    pub async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<Subscription, Failure> {
        let mut link = self.link.lock().await;
        let (latest, first) = {
            let mut channels = lock(&self.channels);
            match channels.get_mut(channel) {
                Some(entry) => {
                    entry.waiters += 1;
                    (entry.latest.subscribe(), false)
                }
                None => {
                    let (latest, rx) = watch::channel(None);
                    channels.insert(channel.to_string(), Channel { waiters: 1, latest });
                    (rx, true)
                }
            }
        };
        // From here on, dropping `sub` (on error too) gives the waiter count back.
        let sub = Subscription { hub: self.clone(), channel: channel.to_string(), latest };
        if link.is_alive() {
            if !first {
                return Ok(sub);
            }
            let sink = link.sink.as_mut().expect("alive link has a sink");
            match self.redis.pubsub_command(sink.subscribe(channel)).await {
                Ok(()) => return Ok(sub),
                Err(e) => tracing::debug!(channel, error = ?e, "SUBSCRIBE failed; reconnecting pub/sub"),
            }
        }
        self.reconnect(&mut link).await?;
        Ok(sub)
    }

    /// Reconnect if the pub/sub connection was lost while channels are waited on (best effort:
    /// a failure is logged, and waiters keep re-reading their results meanwhile).
    pub async fn revive(&self) {
        let mut link = self.link.lock().await;
        if link.is_alive() || lock(&self.channels).is_empty() {
            return;
        }
        if let Err(e) = self.reconnect(&mut link).await {
            tracing::debug!(error = ?e, "could not reopen the Redis pub/sub connection");
        }
    }

    /// Open a new pub/sub connection and subscribe to every channel waited on.
    async fn reconnect(&self, link: &mut Link) -> Result<(), Failure> {
        *link = Link::default();
        let (mut sink, stream) = self.redis.pubsub().await?.split();
        let names: Vec<String> = lock(&self.channels).keys().cloned().collect();
        if !names.is_empty() {
            self.redis.pubsub_command(sink.subscribe(&names)).await?;
        }
        let alive = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(read_messages(stream, self.channels.clone(), alive.clone(), stopped));
        tracing::debug!(channels = names.len(), "pub/sub connection opened");
        *link = Link { sink: Some(sink), alive, _stop: Some(stop) };
        Ok(())
    }

    /// One waiter of `channel` is gone; unsubscribe after the last.
    async fn release(&self, channel: &str) {
        let mut link = self.link.lock().await;
        let last = {
            let mut channels = lock(&self.channels);
            match channels.get_mut(channel) {
                Some(entry) if entry.waiters > 1 => {
                    entry.waiters -= 1;
                    false
                }
                Some(_) => channels.remove(channel).is_some(),
                None => false,
            }
        };
        if !last || !link.is_alive() {
            return;
        }
        let sink = link.sink.as_mut().expect("alive link has a sink");
        if let Err(e) = self.redis.pubsub_command(sink.unsubscribe(channel)).await {
            // A connection that cannot unsubscribe is not trusted further.
            tracing::debug!(channel, error = ?e, "UNSUBSCRIBE failed; dropping the pub/sub connection");
            *link = Link::default();
        }
    }
}

/// Hand each message to its channel's waiters until the connection ends or the hub stops it.
async fn read_messages(
    mut stream: PubSubStream,
    channels: Channels,
    alive: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            message = stream.next() => match message {
                Some(message) => {
                    let channels = lock(&channels);
                    if let Some(entry) = channels.get(message.get_channel_name()) {
                        entry.latest.send_replace(Some(Arc::from(message.get_payload_bytes())));
                    }
                }
                None => {
                    tracing::warn!("Redis pub/sub connection lost; waiters fall back to re-reading results");
                    break;
                }
            }
        }
    }
    alive.store(false, Ordering::Release);
}
