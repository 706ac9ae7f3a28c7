//! A paced producer: `celeriac.noop` (ignore_result) published at a set rate, so that a worker
//! can be held at that rate with CPU to spare instead of draining a full queue flat out.
//!
//! The producer runs on a thread of its own with a runtime of its own (its CPU is read apart
//! from the rest of the benchmark's process, `/proc/self/task/<tid>/schedstat`) and publishes
//! with a celeriac [`Client`] (protocol v2, publisher confirms on RabbitMQ), as a service
//! enqueueing work would. The pace is a clock: tick `k` (every [`TICK`]) makes the tasks due by
//! `k × TICK × rate` available, and up to `in_flight` sends are outstanding at a time; when it
//! falls behind (the sends in flight full, the thread not scheduled), the ticks that passed are
//! made available at once, so it catches up rather than drifting. What it achieved is read from
//! its counter of confirmed sends, not assumed from the rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac::{Client, SendOptions};
use futures::{StreamExt, TryStreamExt};
use serde_json::Map;

use crate::procs::thread_cpu_secs;

/// The producer's clock tick: tasks are made available in batches of `rate × TICK`.
pub const TICK: Duration = Duration::from_millis(5);

/// A producer publishing `celeriac.noop` to one queue at a set rate until stopped.
pub struct Producer {
    thread: std::thread::JoinHandle<Result<()>>,
    tid: i32,
    confirmed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    started: Instant,
}

impl Producer {
    /// Connect to `url` and start publishing `rate` tasks a second to `queue`, at most
    /// `in_flight` sends outstanding; returns once the client is connected and the clock runs.
    pub async fn start(url: &str, queue: &str, rate: u64, in_flight: usize) -> Result<Self> {
        if rate == 0 {
            bail!("a paced producer needs a rate above 0");
        }
        let confirmed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (up, is_up) = tokio::sync::oneshot::channel::<Result<(i32, Instant)>>();
        let thread = {
            let (url, queue, confirmed, stop) = (url.to_string(), queue.to_string(), confirmed.clone(), stop.clone());
            std::thread::Builder::new().name("paced-producer".into()).spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(Self::run(url, queue, rate, in_flight, confirmed, stop, up))
            })?
        };
        let (tid, started) = match is_up.await {
            Ok(r) => r?,
            Err(_) => bail!("the paced producer stopped before it connected: {:?}", thread.join().map(|r| r.err())),
        };
        Ok(Producer { thread, tid, confirmed, stop, started })
    }

    async fn run(
        url: String,
        queue: String,
        rate: u64,
        in_flight: usize,
        confirmed: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
        up: tokio::sync::oneshot::Sender<Result<(i32, Instant)>>,
    ) -> Result<()> {
        let client = match Client::connect(&url, None).await {
            Ok(c) => c,
            Err(e) => {
                let e = anyhow::Error::from(e).context(format!("the paced producer connecting to {url}"));
                let _ = up.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let started = Instant::now();
        let _ = up.send(Ok((nix::unistd::gettid().as_raw(), started)));
        let opts = SendOptions { queue: Some(queue), ignore_result: Some(true), ..SendOptions::default() };
        // Tick k releases the tasks due by then: [due(k - 1), due(k)).
        let due = move |k: u64| (u128::from(k) * TICK.as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        let ticks = futures::stream::unfold(0u64, move |k| {
            let stop = stop.clone();
            async move {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                // A tick already past returns at once: the late ticks are released together.
                tokio::time::sleep_until((started + TICK * (k as u32)).into()).await;
                Some((futures::stream::iter(due(k.saturating_sub(1))..due(k)), k + 1))
            }
        });
        let sent = ticks
            .flatten()
            .map(|_| client.send_task("celeriac.noop", Vec::new(), Map::new(), opts.clone()))
            .buffer_unordered(in_flight)
            .map_err(anyhow::Error::from)
            .try_for_each(|_| {
                confirmed.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
            .await;
        sent.context("the paced producer's publish failed")
    }

    /// Sends confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// When its clock started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// CPU seconds its thread has used so far (`NaN` if it cannot be read).
    pub fn cpu_secs(&self) -> f64 {
        thread_cpu_secs(self.tid).unwrap_or(f64::NAN)
    }

    /// Fail if it stopped (its publish failed).
    pub fn check_alive(&self) -> Result<()> {
        if self.thread.is_finished() {
            bail!("the paced producer stopped while it should be publishing");
        }
        Ok(())
    }

    /// Stop publishing (the sends in flight are confirmed first); the sends confirmed in all.
    pub async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let joined = tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || thread.join()))
            .await
            .context("the paced producer did not stop within 30 s")?
            .context("waiting for the paced producer")?;
        match joined {
            Ok(r) => r?,
            Err(_) => bail!("the paced producer panicked"),
        }
        Ok(self.confirmed.load(Ordering::Relaxed))
    }
}
