//! The canvas part (issue 13): a chord of N `add` header tasks and a `tsum` body, timed from
//! sending it to the body's result, and a chain of M `add` steps, timed to the last step's
//! result; celeriac (its Rust client, `celeriac worker`) and Celery (`celery_bench.py canvas`,
//! `celery worker -P prefork`) on the same vhost and Redis result backend, each on a queue of its
//! own.
//!
//! The sizes of the messages each workflow publishes are read from RabbitMQ in an untimed pass of
//! their own (the first run only): with the vhost's firehose tracer on, every publish is copied to
//! `amq.rabbitmq.trace`, and a queue bound there collects the copies, whoever published them (the
//! client or a worker, through the default exchange or a named one).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use celeriac::canvas::{chain, chord};
use celeriac::{Client, Signature};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::measure::{Bench, START_LIMIT, STOP_LIMIT};
use crate::procs::Proc;

/// What was published for one workflow, read from RabbitMQ's firehose.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sizes {
    /// Messages published to the workflow's queue.
    pub messages: u64,
    /// The largest body, bytes.
    pub largest: u64,
    /// All bodies, bytes.
    pub total: u64,
}

/// One system's two workflows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Workflows {
    /// Send → the chord body's result, seconds.
    pub chord: Option<f64>,
    /// Send → the chain's last result, seconds.
    pub chain: Option<f64>,
    /// The chord's messages (first run only).
    pub chord_sizes: Option<Sizes>,
    /// The chain's messages (first run only).
    pub chain_sizes: Option<Sizes>,
}

/// The canvas part of one run.
#[derive(Debug, Default)]
pub struct CanvasResults {
    /// celeriac worker, async pool.
    pub celeriac: Workflows,
    /// celeriac worker, prefork pool.
    pub celeriac_prefork: Workflows,
    /// Celery prefork.
    pub celery: Workflows,
    /// Celery's version as reported by the script.
    pub celery_version: Option<String>,
    /// The broker's floor for the chain: a bare lapin relay of as many messages of the same
    /// sizes, seconds ([`crate::rabbit::bare_chain`]).
    pub bare_chain: Option<f64>,
}

/// Bytes a step adds to a chain message when the sizes were not read: celeriac's first message
/// of a chain of 1,000 `add` was 188.4 KiB.
const STEP_BYTES: usize = 193;

/// The deadline of one workflow: generous, as Celery takes about a minute for either here.
fn limit(tasks: u64) -> Duration {
    Duration::from_secs(120 + tasks / 20)
}

fn add(queue: &str, args: &[i64]) -> Signature {
    let mut sig = args.iter().fold(Signature::new("celeriac.add"), |s, a| s.arg(*a));
    sig.options.queue = Some(queue.to_string());
    sig
}

/// Send the chord of `n` and wait for its body; the seconds it took.
async fn celeriac_chord(client: &Client, queue: &str, n: u64) -> Result<f64> {
    let mut body = Signature::new("celeriac.tsum");
    body.options.queue = Some(queue.to_string());
    let workflow = chord((0..n as i64).map(|i| add(queue, &[i, i])), body);
    let started = Instant::now();
    let handle = workflow.apply_async(client).await?;
    eprintln!("    chord of {n}: sent in {:.3}s", started.elapsed().as_secs_f64());
    let value = handle.get(Some(limit(n))).await.context("the chord's body result")?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(value == json!(n * n.saturating_sub(1)), "the chord of {n} returned {value}");
    Ok(elapsed)
}

/// Send the chain of `m` and wait for its last step; the seconds it took.
async fn celeriac_chain(client: &Client, queue: &str, m: u64) -> Result<f64> {
    let steps = std::iter::once(add(queue, &[0, 0])).chain((1..m).map(|_| add(queue, &[1])));
    let workflow = chain(steps);
    let started = Instant::now();
    let handle = workflow.apply_async(client).await?;
    let value = handle.get(Some(limit(m))).await.context("the chain's last result")?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(value == json!(m - 1), "the chain of {m} returned {value}");
    Ok(elapsed)
}

/// The firehose copies of every publish in the vhost, while it lives.
struct Tap {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
}

impl Tap {
    /// Turn the vhost's tracer on and bind a queue to it.
    async fn start(bench: &Bench) -> Result<Tap> {
        bench.vhost.trace(true)?;
        let conn = lapin::Connection::connect(&bench.vhost.url(), lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let q = "bench.canvas.tap";
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        channel.queue_declare(q.into(), opts, FieldTable::default()).await?;
        channel
            .queue_bind(
                q.into(),
                "amq.rabbitmq.trace".into(),
                "publish.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                q.into(),
                "tap".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await?;
        Ok(Tap { _conn: conn, consumer })
    }

    /// Read copies until `expect` messages routed to `queue` were seen (others are skipped).
    async fn collect(&mut self, queue: &str, expect: u64, limit: Duration) -> Result<Sizes> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut sizes = Sizes::default();
        while sizes.messages < expect {
            let delivery = match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Ok(Some(d)) => d?,
                Ok(None) => bail!("the firehose tap was cancelled"),
                Err(_) => {
                    bail!("the firehose showed {} of {expect} messages to {queue} within {limit:?}", sizes.messages)
                }
            };
            let routed_here = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("routing_keys").cloned())
                .is_some_and(|keys| match keys {
                    AMQPValue::FieldArray(a) => a.as_slice().iter().any(|k| match k {
                        AMQPValue::LongString(s) => s.as_bytes() == queue.as_bytes(),
                        _ => false,
                    }),
                    _ => false,
                });
            if routed_here {
                let len = delivery.data.len() as u64;
                sizes.messages += 1;
                sizes.total += len;
                sizes.largest = sizes.largest.max(len);
            }
        }
        Ok(sizes)
    }
}

impl Bench {
    /// A celeriac worker on a fresh queue, consuming.
    async fn canvas_worker(&self, queue: &str, extra: &[String]) -> Result<Proc> {
        self.admin.declare(queue).await?;
        let worker = self.celeriac_worker(queue, extra)?;
        self.admin.wait_for_consumer(queue, START_LIMIT, || worker.check_alive()).await?;
        Ok(worker)
    }

    /// celeriac's chord and chain on a worker with `extra` arguments.
    async fn celeriac_workflows(&self, queue: &str, extra: &[String], sizes: bool) -> Result<Workflows> {
        let s = &self.settings;
        let worker = self.canvas_worker(queue, extra).await?;
        let client = Client::connect(&self.url(), Some(&self.redis.url)).await?;
        let mut out = Workflows::default();
        if s.chord > 0 {
            let secs = celeriac_chord(&client, queue, s.chord).await?;
            eprintln!("  {}: chord of {} → body result in {secs:.3}s", worker.label, s.chord);
            out.chord = Some(secs);
        }
        if s.chain > 0 {
            let secs = celeriac_chain(&client, queue, s.chain).await?;
            eprintln!("  {}: chain of {} → last result in {secs:.3}s", worker.label, s.chain);
            out.chain = Some(secs);
        }
        worker.check_alive()?;
        if sizes {
            let mut tap = Tap::start(self).await?;
            if s.chord > 0 {
                celeriac_chord(&client, queue, s.chord).await?;
                out.chord_sizes = Some(tap.collect(queue, s.chord + 1, limit(s.chord)).await?);
            }
            if s.chain > 0 {
                celeriac_chain(&client, queue, s.chain).await?;
                out.chain_sizes = Some(tap.collect(queue, s.chain, limit(s.chain)).await?);
            }
            drop(tap);
            self.vhost.trace(false)?;
        }
        worker.stop(STOP_LIMIT)?;
        self.admin.delete(queue).await?;
        Ok(out)
    }

    /// Celery's chord and chain (`celery_bench.py canvas`) on `celery worker -P prefork`.
    async fn celery_workflows(&self, sizes: bool) -> Result<(Workflows, Option<String>)> {
        let s = &self.settings;
        let queue = "bench.canvas.celery";
        self.admin.declare(queue).await?;
        let worker = self.celery_worker(queue, "prefork")?;
        self.admin.wait_for_consumer(queue, START_LIMIT, || worker.check_alive()).await?;
        let (chord, chain) = (s.chord.to_string(), s.chain.to_string());
        let script_limit = limit(s.chord) + limit(s.chain);
        let timeout = limit(s.chord.max(s.chain)).as_secs().to_string();
        let args = ["canvas", "--chord", &chord, "--chain", &chain, "--queue", queue, "--timeout", &timeout];
        let r = self.celery_script(&args, false, script_limit).await?;
        let version = r["celery"].as_str().map(str::to_string);
        let mut out = Workflows {
            chord: r["chord_seconds"].as_f64(),
            chain: r["chain_seconds"].as_f64(),
            ..Workflows::default()
        };
        if let Some(secs) = out.chord {
            eprintln!("  Celery prefork: chord of {} → body result in {secs:.3}s", s.chord);
        }
        if let Some(secs) = out.chain {
            eprintln!("  Celery prefork: chain of {} → last result in {secs:.3}s", s.chain);
        }
        worker.check_alive()?;
        if sizes {
            let mut tap = Tap::start(self).await?;
            if s.chord > 0 {
                let args = ["canvas", "--chord", &chord, "--queue", queue, "--timeout", &timeout];
                self.celery_script(&args, false, limit(s.chord)).await?;
                out.chord_sizes = Some(tap.collect(queue, s.chord + 1, limit(s.chord)).await?);
            }
            if s.chain > 0 {
                let args = ["canvas", "--chain", &chain, "--queue", queue, "--timeout", &timeout];
                self.celery_script(&args, false, limit(s.chain)).await?;
                out.chain_sizes = Some(tap.collect(queue, s.chain, limit(s.chain)).await?);
            }
            drop(tap);
            self.vhost.trace(false)?;
        }
        worker.stop(STOP_LIMIT)?;
        self.admin.delete(queue).await?;
        Ok((out, version))
    }

    /// The canvas part: celeriac async (and prefork), then Celery; message sizes when `sizes`.
    pub async fn canvas(&self, with_celery: bool, sizes: bool) -> Result<CanvasResults> {
        let mut out = CanvasResults {
            celeriac: self.celeriac_workflows("bench.canvas.celeriac", &[], sizes).await?,
            ..CanvasResults::default()
        };
        if self.settings.prefork {
            let extra = ["--pool=prefork".to_string()];
            out.celeriac_prefork = self.celeriac_workflows("bench.canvas.celeriac-prefork", &extra, false).await?;
        }
        if with_celery {
            (out.celery, out.celery_version) = self.celery_workflows(sizes).await?;
        }
        let chain = self.settings.chain;
        if chain > 0 {
            let step_bytes = out.celeriac.chain_sizes.map_or(STEP_BYTES, |s| (s.largest / chain) as usize);
            let secs = crate::rabbit::bare_chain(&self.url(), "bench.canvas.bare", chain, step_bytes).await?;
            eprintln!("  bare lapin: a chain of {chain} relayed ({step_bytes} bytes a step) in {secs:.3}s");
            self.admin.delete("bench.canvas.bare").await?;
            out.bare_chain = Some(secs);
        }
        Ok(out)
    }
}

impl Sizes {
    /// "N messages, largest X, Y in all".
    pub fn describe(&self) -> String {
        format!("{} messages, largest {}, {} in all", self.messages, bytes(self.largest), bytes(self.total))
    }
}

/// A byte count in B, KiB or MiB.
pub fn bytes(n: u64) -> String {
    match n {
        n if n < 10 * 1024 => format!("{n} B"),
        n if n < 10 * 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / 1024.0 / 1024.0),
    }
}
