//! `celeriac-bench compare`: celeriac, real Celery 5.7 and a bare lapin client, side by side on
//! the same local RabbitMQ and Redis, in one run.
//!
//! ```text
//! scripts/python-env.sh
//! cargo run --release -p celeriac-bench -- compare [--publish N] [--drain N] [--roundtrips N] ...
//! ```
//!
//! Measures (see docs/benchmarks.md for the method and the figures):
//! 1. publish throughput with publisher confirms, one client process;
//! 2. drain throughput of `celeriac.noop` (ignore_result) from a pre-filled queue;
//! 3. round-trip latency of `add` with the Redis result backend;
//! 4. worker memory, idle and after the drain;
//! 5. canvas: a chord of 10,000 `add` and a `tsum` body, a chain of 1,000 `add` (`--parts canvas`);
//! 6. beat: one `celeriac beat` with 10,000 entries every second on RabbitMQ, Redis and SQLite,
//!    its missed runs, CPU and memory (`--parts beat`, not in the default parts);
//! 7. Python tasks: one Celery app's no-op and Redis GET+SET tasks drained by `celeriac worker
//!    --python-app` and by `celery worker -P prefork`, with the peak RSS of each main process
//!    and pool child (`--parts python`, not in the default parts);
//! 8. the dashboard: a worker with `-E` draining no-op tasks at full speed, alone, with
//!    `celeriac dashboard` watching, and with a client refetching as the page does; the
//!    worker's rate in each case, the dashboard's CPU and memory (`--parts dashboard`, not in
//!    the default parts); with `--dashboard-rate R` the worker is instead held at R tasks a
//!    second by a paced producer, and its CPU per task is compared.
//!
//! The run owns a fresh RabbitMQ vhost (deleted at the end, on error and on Ctrl-C too) and Redis
//! database 10 (emptied at the start and the end). Modules:
//! - [`env`]: paths, the vhost and Redis database, external commands with deadlines;
//! - [`procs`]: worker processes and their memory;
//! - [`rabbit`]: the bare lapin publisher and consumer, and the queue-depth drain timer;
//! - [`measure`]: the measurements themselves;
//! - [`canvas`]: the canvas part (chord and chain, and the sizes of their messages);
//! - [`beat`]: the beat part (runs sent against runs due, the beat's CPU and memory);
//! - [`python`]: the Python part (a Celery app's tasks under celeriac's supervisor and Celery's);
//! - [`dashboard`]: the dashboard part (what watching a busy worker costs, and costs the worker);
//! - [`paced`]: a producer publishing at a set rate (the dashboard part's paced mode);
//! - [`report`]: the table and the targets.

mod beat;
mod canvas;
mod dashboard;
mod env;
mod measure;
mod paced;
mod procs;
mod python;
mod rabbit;
mod report;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use measure::{Bench, Settings};
use report::{Row, Target, Unit};

#[derive(Debug, Parser)]
#[command(name = "celeriac-bench", about = "Benchmarks celeriac against Celery and a bare lapin client")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure celeriac, Celery and bare lapin side by side and print the comparison table.
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// RabbitMQ host:port (user guest/guest; a vhost is created for the run with rabbitmqctl).
    #[arg(long, default_value = "127.0.0.1:5672")]
    amqp: String,
    /// Redis database owned by the run (emptied at the start and at the end).
    #[arg(long, default_value = "redis://127.0.0.1:6379/10")]
    redis: String,
    /// Messages each Rust publisher sends, timed.
    #[arg(long, default_value_t = 20_000)]
    publish: u64,
    /// Messages Celery's publish loop sends, timed.
    #[arg(long, default_value_t = 3_000)]
    celery_publish: u64,
    /// Messages the celeriac worker and the bare consumer drain.
    #[arg(long, default_value_t = 50_000)]
    drain: u64,
    /// Messages each Celery worker drains.
    #[arg(long, default_value_t = 10_000)]
    celery_drain: u64,
    /// Timed round trips (each side).
    #[arg(long, default_value_t = 500)]
    roundtrips: u64,
    /// Untimed publishes and round trips before each timed series.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// Publishes in flight for the celeriac client and the bare publisher.
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
    /// Worker concurrency, celeriac and Celery alike.
    #[arg(short = 'c', long, default_value_t = 2)]
    concurrency: usize,
    /// Prefetch of the bare consumer.
    #[arg(long, default_value_t = 1000)]
    bare_prefetch: u16,
    /// The bare consumer acknowledges (`multiple`) every this many deliveries.
    #[arg(long, default_value_t = 100)]
    bare_ack_every: u64,
    /// Skip the drains of the celeriac worker at the bare consumer's prefetch and of the bare
    /// consumer at the worker's default prefetch.
    #[arg(long)]
    skip_window_rows: bool,
    /// Skip celeriac's prefork pool (its drain and its memory).
    #[arg(long)]
    skip_prefork: bool,
    /// Repeat every measurement this many times; the table then shows medians, and a second
    /// table the spread.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Measure only celeriac and the bare client.
    #[arg(long)]
    skip_celery: bool,
    /// Parts to run, comma-separated: publish, drain, redis, roundtrip, canvas (the default),
    /// beat, python and dashboard; `prefork` is the prefork pools' half of `drain` alone.
    #[arg(long, value_delimiter = ',', default_value = "publish,drain,redis,roundtrip,canvas")]
    parts: Vec<String>,
    /// Extra argument for every `celeriac worker` (repeat the flag), e.g.
    /// `--worker-arg=--prefetch-multiplier=100`.
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,
    /// Header tasks of the canvas part's chord (0: none).
    #[arg(long, default_value_t = 10_000)]
    chord: u64,
    /// Steps of the canvas part's chain (0: none).
    #[arg(long, default_value_t = 1_000)]
    chain: u64,
    /// Do not read the canvas workflows' message sizes from RabbitMQ's firehose (an untimed
    /// second pass of each workflow, first run only).
    #[arg(long)]
    skip_canvas_sizes: bool,
    /// Entries of the beat part's schedule.
    #[arg(long, default_value_t = 10_000)]
    beat_entries: u64,
    /// The period of every entry of the beat part, seconds (`--beat-entries 100000
    /// --beat-period 60 --beat-seconds 200`: the issue's other form).
    #[arg(long, default_value_t = 1)]
    beat_period: u64,
    /// Seconds of the beat part's timed window, per broker.
    #[arg(long, default_value_t = 30)]
    beat_seconds: u64,
    /// Brokers of the beat part, comma-separated: rabbitmq, redis, sqlite.
    #[arg(long, value_delimiter = ',', default_value = "rabbitmq,redis,sqlite")]
    beat_brokers: Vec<String>,
    /// Tasks each case of the dashboard part drains (at least 100,000: the dashboard keeps the
    /// last 10,000).
    #[arg(long, default_value_t = 200_000)]
    dashboard_tasks: u64,
    /// Brokers of the dashboard part, comma-separated: rabbitmq, redis.
    #[arg(long, value_delimiter = ',', default_value = "rabbitmq,redis")]
    dashboard_brokers: Vec<String>,
    /// Cases of the dashboard part, comma-separated (default: all): plain, events, dashboard,
    /// dashboard+client.
    #[arg(long, value_delimiter = ',')]
    dashboard_cases: Vec<String>,
    /// The dashboard part's paced mode: instead of draining a pre-filled queue, a producer
    /// publishes this many tasks a second while the worker consumes them (0: the drain).
    #[arg(long, default_value_t = 0)]
    dashboard_rate: u64,
    /// Seconds of the paced mode's measured window (after a 2 s warm-up).
    #[arg(long, default_value_t = 15)]
    dashboard_seconds: u64,
    /// Skip Celery's solo pool drain.
    #[arg(long)]
    skip_solo: bool,
    /// Do not build the `celeriac` binary and the Python virtualenv first.
    #[arg(long)]
    no_setup: bool,
    /// The `celeriac` binary (default: target/release/celeriac, built first).
    #[arg(long)]
    celeriac_bin: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let Cmd::Compare(args) = cli.command;
    let result = runtime.block_on(async {
        tokio::select! {
            r = compare(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // The vhost, the Redis database and the worker processes were cleaned up as `compare` was
    // dropped.
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Build the `celeriac` binary and the Python virtualenv (both no-ops when up to date).
fn setup(repo: &std::path::Path) -> Result<()> {
    eprintln!("building target/release/celeriac ...");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    env::run(
        Command::new(cargo).args(["build", "--release", "-p", "celeriac-cli", "--bin", "celeriac"]).current_dir(repo),
        Duration::from_secs(1800),
    )
    .context("building the celeriac binary")?;
    eprintln!("preparing the Python virtualenv (scripts/python-env.sh) ...");
    env::run(Command::new(repo.join("scripts/python-env.sh")).current_dir(repo), Duration::from_secs(900))
        .context("scripts/python-env.sh")?;
    Ok(())
}

async fn compare(args: CompareArgs) -> Result<()> {
    // The load before anything of this run (the setup's builds and rabbitmqctl calls included).
    let load_before = env::load();
    let repo = env::repo();
    if !args.no_setup {
        setup(&repo)?;
    }
    let celeriac_bin = args.celeriac_bin.clone().unwrap_or_else(|| repo.join("target/release/celeriac"));
    let python = repo.join("target/pyenv/bin/python");
    let celery_bin = repo.join("target/pyenv/bin/celery");
    if !celeriac_bin.exists() {
        bail!("{} is missing: cargo build --release", celeriac_bin.display());
    }
    if !args.skip_celery && !celery_bin.exists() {
        bail!("{} is missing: run scripts/python-env.sh", celery_bin.display());
    }
    if args.concurrency == 0 || args.bare_prefetch == 0 {
        bail!("--concurrency and --bare-prefetch must be at least 1");
    }
    if args.drain < 100 || args.celery_drain < 100 {
        bail!("drain counts below 100 cannot be timed from the queue depth");
    }

    let started = chrono::Utc::now();
    let redis = env::RedisDb::take(&args.redis)?;
    let vhost = env::Vhost::create(&args.amqp)?;
    let admin = rabbit::Admin::connect(&vhost.url()).await?;
    eprintln!("vhost {}, results in {}", vhost.name, redis.url);
    let settings = Settings {
        publish: args.publish,
        celery_publish: args.celery_publish,
        drain: args.drain,
        celery_drain: args.celery_drain,
        roundtrips: args.roundtrips,
        warmup: args.warmup,
        in_flight: args.in_flight,
        concurrency: args.concurrency,
        worker_args: args.worker_args.clone(),
        bare_prefetch: args.bare_prefetch,
        bare_ack_every: args.bare_ack_every.max(1),
        window_rows: !args.skip_window_rows,
        prefork: !args.skip_prefork,
        chord: args.chord,
        chain: args.chain,
    };
    let broker_pid = env::rabbitmq_pid();
    let bench = Bench { settings: settings.clone(), vhost, redis, admin, celeriac_bin, python, celery_bin, broker_pid };
    let with_celery = !args.skip_celery;

    for part in &args.parts {
        if !["publish", "drain", "prefork", "redis", "roundtrip", "canvas", "beat", "python", "dashboard"]
            .contains(&part.as_str())
        {
            bail!(
                "unknown part {part:?} (known: publish, drain, prefork, redis, roundtrip, canvas, beat, python, dashboard)"
            );
        }
    }
    let part = |p: &str| args.parts.iter().any(|x| x == p);
    let mut runs = Vec::new();
    for k in 1..=args.repeat.max(1) {
        if args.repeat > 1 {
            eprintln!("\n=== run {k} of {}", args.repeat);
        }
        let mut run = Run::default();
        if part("publish") {
            eprintln!("\n1. publish with publisher confirms");
            run.publish = bench.publish(with_celery).await?;
        }
        if part("drain") {
            eprintln!("\n2. drain of a pre-filled queue (celeriac.noop, ignore_result)");
            run.drain = bench.drain(with_celery, !args.skip_solo).await?;
        } else if part("prefork") {
            eprintln!("\n2. drain of a pre-filled queue, prefork pools only (celeriac.noop, ignore_result)");
            bench.prefork_drain(with_celery, !args.skip_solo, &mut run.drain).await?;
        }
        if part("redis") {
            eprintln!("\n2b. drain on the Redis broker (celeriac.noop, ignore_result)");
            run.redis = bench.redis_drain(with_celery).await?;
        }
        if part("roundtrip") {
            eprintln!("\n3. round trip of add with the Redis result backend (and idle worker memory)");
            run.rt = bench.round_trip(with_celery).await?;
        }
        if part("canvas") {
            eprintln!("\n4. canvas: a chord of {} add and a tsum body, a chain of {} add", args.chord, args.chain);
            run.canvas = bench.canvas(with_celery, k == 1 && !args.skip_canvas_sizes).await?;
        }
        if part("beat") {
            let (n, period, secs) = (args.beat_entries, args.beat_period, args.beat_seconds);
            eprintln!("\n5. beat: {n} entries every {period} s, {secs} s per broker");
            run.beat = bench.beat(n, period, Duration::from_secs(secs), &args.beat_brokers).await?;
        }
        if part("python") {
            eprintln!("\n6. Python tasks (benchtasks.py, pybench.*): celeriac --python-app against celery -A, prefork");
            run.python = bench.python(with_celery).await?;
        }
        if part("dashboard") {
            let mode = if args.dashboard_rate > 0 {
                let (rate, secs) = (args.dashboard_rate, args.dashboard_seconds);
                eprintln!(
                    "\n7. dashboard: a worker held at {rate} no-op tasks/s by a paced producer for {secs} s, with and \
                     without -E and a dashboard watching"
                );
                dashboard::Mode::Paced { rate, window: Duration::from_secs(secs) }
            } else {
                let n = args.dashboard_tasks;
                eprintln!(
                    "\n7. dashboard: {n} no-op tasks drained by a worker, with and without -E and a dashboard watching"
                );
                dashboard::Mode::Drain(n)
            };
            run.dashboard = bench.dashboard(mode, &args.dashboard_brokers, &args.dashboard_cases).await?;
        }
        runs.push(run);
    }
    let load_after = env::load();

    let first = &runs[0];
    println!();
    println!("celeriac-bench compare, {}", started.format("%Y-%m-%d %H:%M UTC"));
    println!("machine: {}", env::machine());
    println!("load average before: {load_before}; after: {load_after}");
    println!(
        "RabbitMQ {}, Redis {}, Celery {}",
        env::rabbitmq_version(),
        bench.redis.version().unwrap_or_else(|_| "?".into()),
        first
            .publish
            .celery_version
            .as_deref()
            .or(first.canvas.celery_version.as_deref())
            .or(first.python.celery_version.as_deref())
            .unwrap_or("not run")
    );
    println!(
        "counts: publish {} (Celery {}), drain {} (Celery {}), round trips {} after {} warm-up, {} publishes in flight, \
         worker concurrency {}, {} run{}",
        settings.publish,
        settings.celery_publish,
        settings.drain,
        settings.celery_drain,
        settings.roundtrips,
        settings.warmup,
        settings.in_flight,
        settings.concurrency,
        runs.len(),
        if runs.len() == 1 { "" } else { "s (figures are medians)" }
    );
    if part("canvas") {
        println!("canvas: a chord of {} add and a tsum body, a chain of {} add steps", settings.chord, settings.chain);
    }
    if part("publish") {
        println!(
            "message body: celeriac {} bytes (the bare publisher's body), Celery {}",
            first.publish.body_bytes,
            first.publish.celery_body_bytes.map(|b| format!("{b} bytes")).unwrap_or_else(|| "not run".into())
        );
    }
    if part("roundtrip") {
        println!(
            "round trip, bare column: a bare lapin publish of the same message waiting for its confirm (no worker)"
        );
    }
    for (k, run) in runs.iter().enumerate() {
        let prefix = if runs.len() > 1 { format!("run {}: ", k + 1) } else { String::new() };
        for line in details(run) {
            println!("{prefix}{line}");
        }
    }
    if part("dashboard") {
        let all: Vec<Vec<dashboard::CaseRun>> = runs.iter().map(|r| r.dashboard.clone()).collect();
        for line in dashboard::report(&all) {
            println!("{line}");
        }
    }
    // Rows of the parts that did not run have no figure in any run: left out.
    let mut per_run: Vec<Vec<Row>> = runs.iter().map(|r| rows(r, &settings)).collect();
    let measured: Vec<bool> = (0..per_run[0].len())
        .map(|i| {
            per_run.iter().any(|rows| [rows[i].celeriac, rows[i].celery, rows[i].bare].iter().any(Option::is_some))
        })
        .collect();
    for rows in &mut per_run {
        let mut keep = measured.iter();
        rows.retain(|_| keep.next().copied().unwrap_or(true));
    }
    if per_run[0].is_empty() {
        return Ok(());
    }
    println!();
    print!("{}", report::table(&report::median_rows(&per_run)));
    if per_run.len() > 1 {
        println!();
        println!("Spread over the {} runs (lowest – highest):", per_run.len());
        println!();
        print!("{}", report::spread_table(&per_run));
    }
    Ok(())
}

/// The beat part's target: the beat process under this much of one core (issue 14).
const BEAT_CPU_TARGET: f64 = 50.0;

/// What one repetition of the measurements gave.
#[derive(Default)]
struct Run {
    publish: measure::Publish,
    drain: measure::DrainResults,
    redis: measure::RedisDrainResults,
    rt: measure::RoundTrip,
    canvas: canvas::CanvasResults,
    beat: Vec<beat::BeatRun>,
    python: python::PythonResults,
    dashboard: Vec<dashboard::CaseRun>,
}

/// The table rows of one run.
fn rows(run: &Run, settings: &Settings) -> Vec<Row> {
    let (publish, drain, rt) = (&run.publish, &run.drain, &run.rt);
    let mut rows: Vec<Row> = Vec::new();
    let mut r = Row::new(
        "publish with confirms, one client",
        Unit::PerSec,
        Target::Throughput { vs_celery: 10.0, vs_bare: 0.85 },
    );
    (r.celeriac, r.celery, r.bare) = (publish.celeriac, publish.celery, publish.bare);
    rows.push(r);
    if publish.bare_headers.is_some() {
        let mut r = Row::new("publish, bare with a celeriac message's headers", Unit::PerSec, Target::None);
        (r.celeriac, r.bare) = (publish.celeriac, publish.bare_headers);
        rows.push(r);
    }
    let c = settings.concurrency;
    let mut r = Row::new(
        &format!("drain, noop, prefork -c {c} (celeriac async -c {c})"),
        Unit::PerSec,
        Target::Throughput { vs_celery: 10.0, vs_bare: 0.85 },
    );
    let rate = |d: &Option<rabbit::Drain>| d.as_ref().map(|d| d.rate);
    (r.celeriac, r.celery, r.bare) = (rate(&drain.celeriac), rate(&drain.celery), rate(&drain.bare));
    rows.push(r);
    if drain.celery_solo.is_some() {
        let mut r = Row::new("drain, noop, Celery solo pool", Unit::PerSec, Target::None);
        (r.celeriac, r.celery, r.bare) = (rate(&drain.celeriac), rate(&drain.celery_solo), rate(&drain.bare));
        rows.push(r);
    }
    if drain.celeriac_prefork.is_some() {
        let mut r = Row::new(&format!("drain, noop, prefork -c {c}, both"), Unit::PerSec, Target::VsCelery(10.0));
        (r.celeriac, r.celery, r.bare) = (rate(&drain.celeriac_prefork), rate(&drain.celery), rate(&drain.bare));
        rows.push(r);
    }
    if drain.celeriac_prefork_recycling.is_some() {
        let mut r = Row::new(
            &format!("drain, noop, prefork -c {c}, celeriac --max-tasks-per-child 100"),
            Unit::PerSec,
            Target::None,
        );
        (r.celeriac, r.celery) = (rate(&drain.celeriac_prefork_recycling), rate(&drain.celery));
        rows.push(r);
    }
    let redis = &run.redis;
    if redis.celeriac.is_some() {
        let mut r = Row::new(
            &format!("Redis broker: drain, noop, prefork -c {c} (celeriac async -c {c})"),
            Unit::PerSec,
            Target::VsCelery(15.0),
        );
        (r.celeriac, r.celery) = (rate(&redis.celeriac), rate(&redis.celery));
        rows.push(r);
    }
    if redis.celeriac_prefork.is_some() {
        let mut r =
            Row::new(&format!("Redis broker: drain, noop, prefork -c {c}, both"), Unit::PerSec, Target::VsCelery(15.0));
        (r.celeriac, r.celery) = (rate(&redis.celeriac_prefork), rate(&redis.celery));
        rows.push(r);
    }
    if let Some(narrow) = &drain.bare_narrow {
        let window = c * 4;
        let mut r = Row::new(
            &format!(
                "drain: celeriac default (adaptive window) vs bare at Celery's window, prefetch {window}, ack every {}",
                (window / 4).max(1)
            ),
            Unit::PerSec,
            Target::None,
        );
        (r.celeriac, r.bare) = (rate(&drain.celeriac), Some(narrow.rate));
        rows.push(r);
    }
    if drain.celeriac_wide.is_some() {
        let mut r = Row::new(
            &format!("drain, same window: celeriac at prefetch {} vs bare", settings.bare_prefetch),
            Unit::PerSec,
            Target::None,
        );
        (r.celeriac, r.bare) = (rate(&drain.celeriac_wide), rate(&drain.bare));
        rows.push(r);
    }
    let mut r = Row::new("round trip add + Redis result, p50", Unit::Ms, Target::AtMost(0.5));
    (r.celeriac, r.celery, r.bare) =
        (rt.celeriac.map(|l| l.p50), rt.celery.map(|l| l.p50), rt.bare_confirm.map(|l| l.p50));
    rows.push(r);
    let mut r = Row::new("round trip add + Redis result, p99", Unit::Ms, Target::AtMost(2.0));
    (r.celeriac, r.celery, r.bare) =
        (rt.celeriac.map(|l| l.p99), rt.celery.map(|l| l.p99), rt.bare_confirm.map(|l| l.p99));
    rows.push(r);
    let mut r = Row::new("worker RSS, idle", Unit::Mib, Target::AtMost(10.0));
    r.celeriac = rt.celeriac_idle.as_ref().map(procs::Rss::total_mib);
    r.celery = rt.celery_idle.as_ref().map(procs::Rss::total_mib);
    r.celery_detail = rt.celery_idle.as_ref().map(rss_detail);
    rows.push(r);
    let mut r = Row::new("worker RSS, after the drain", Unit::Mib, Target::None);
    r.celeriac = drain.celeriac_rss.as_ref().map(procs::Rss::total_mib);
    r.celery = drain.celery_rss.as_ref().map(procs::Rss::total_mib);
    r.celery_detail = drain.celery_rss.as_ref().map(rss_detail);
    rows.push(r);
    let cv = &run.canvas;
    let canvas_rows = [
        (
            "chord of {n} add + tsum body, send → body result",
            settings.chord,
            cv.celeriac.chord,
            cv.celery.chord,
            None,
            "",
        ),
        ("chain of {n} add, send → last result", settings.chain, cv.celeriac.chain, cv.celery.chain, cv.bare_chain, ""),
        ("chord of {n}, both prefork", settings.chord, cv.celeriac_prefork.chord, cv.celery.chord, None, "prefork"),
        (
            "chain of {n}, both prefork",
            settings.chain,
            cv.celeriac_prefork.chain,
            cv.celery.chain,
            cv.bare_chain,
            "prefork",
        ),
    ];
    for (measure, n, celeriac, celery, bare, pool) in canvas_rows {
        if celeriac.is_none() {
            continue;
        }
        let measure = measure.replace("{n}", &report::thousands(n as f64));
        let measure =
            if pool.is_empty() { format!("{measure}, prefork -c {c} (celeriac async -c {c})") } else { measure };
        let target = if pool.is_empty() { Target::FasterThanCelery(10.0) } else { Target::None };
        let mut r = Row::new(&measure, Unit::Secs, target);
        (r.celeriac, r.celery, r.bare) = (celeriac, celery, bare);
        rows.push(r);
    }
    rows.extend(python_rows(&run.python, c));
    if let Some(idle) = &rt.celeriac_prefork_idle {
        // The brief's target is per child; the row shows the largest child.
        let mut r = Row::new(&format!("prefork -c {c}, largest child RSS, idle"), Unit::Mib, Target::AtMost(5.0));
        r.celeriac = idle.children.iter().max().map(|k| *k as f64 / 1024.0);
        r.celery = rt.celery_idle.as_ref().and_then(|i| i.children.iter().max()).map(|k| *k as f64 / 1024.0);
        rows.push(r);
        let mut r = Row::new(&format!("prefork -c {c}, whole pool RSS, idle"), Unit::Mib, Target::None);
        r.celeriac = Some(idle.total_mib());
        r.celery = rt.celery_idle.as_ref().map(procs::Rss::total_mib);
        r.celery_detail = rt.celery_idle.as_ref().map(rss_detail);
        rows.push(r);
    }
    rows
}

/// The rows of the Python part (issue 15's targets: 3x Celery on the no-op task, a supervisor
/// of at most 10 MB, no Python child larger than Celery's).
fn python_rows(py: &python::PythonResults, c: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    let rate = |d: &Option<python::PyDrain>| d.as_ref().map(|d| d.drain.rate);
    for (pair, what, target) in [
        (&py.noop, "pybench.noop (no result stored)", Target::VsCelery(3.0)),
        (&py.getset, "pybench.getset, one Redis GET+SET (result stored)", Target::None),
    ] {
        if pair.celeriac.is_none() {
            continue;
        }
        let mut r = Row::new(
            &format!("Python app: drain, {what}, celeriac --python-app vs celery -A, prefork -c {c}"),
            Unit::PerSec,
            target,
        );
        (r.celeriac, r.celery) = (rate(&pair.celeriac), rate(&pair.celery));
        rows.push(r);
    }
    if py.noop.celeriac.is_none() {
        return rows;
    }
    let mut r =
        Row::new("Python app: supervisor (main process) RSS, peak over both drains", Unit::Mib, Target::AtMost(10.0));
    (r.celeriac, r.celery) = (py.peak_mib(true, |p| p.main), py.peak_mib(false, |p| p.main));
    rows.push(r);
    let mut r = Row::new("Python app: largest pool child RSS, peak over both drains", Unit::Mib, Target::AtMostCelery);
    (r.celeriac, r.celery) =
        (py.peak_mib(true, procs::PeakRss::largest_child), py.peak_mib(false, procs::PeakRss::largest_child));
    rows.push(r);
    rows
}

/// The figures of one run that are not in the table.
fn details(run: &Run) -> Vec<String> {
    let (drain, rt) = (&run.drain, &run.rt);
    let mut out = Vec::new();
    if let (Some(c), Some(p)) = (rt.celeriac, rt.celery) {
        out.push(format!(
            "round trip means: celeriac {:.3} ms (max {:.3}), Celery {:.3} ms (max {:.3})",
            c.mean, c.max, p.mean, p.max
        ));
    }
    if let Some(send) = rt.celeriac_send {
        out.push(format!(
            "celeriac round trip, send_task part (publish until confirmed): p50 {:.3} ms, p99 {:.3} ms",
            send.p50, send.p99
        ));
    }
    if let Some(c) = rt.bare_confirm_consumed {
        out.push(format!(
            "bare lapin publish waiting for its confirm, on a queue a celeriac worker consumes: p50 {:.3} ms, p99 {:.3} ms",
            c.p50, c.p99
        ));
    }
    let cpu: Vec<String> = [
        ("bare", &drain.bare),
        ("celeriac", &drain.celeriac),
        ("Celery prefork", &drain.celery),
        ("Celery solo", &drain.celery_solo),
        ("celeriac prefork", &drain.celeriac_prefork),
        ("celeriac wide window", &drain.celeriac_wide),
        ("bare narrow window", &drain.bare_narrow),
    ]
    .iter()
    .filter_map(|(name, d)| d.as_ref().map(|d| format!("{name} {:.0} / {:.0}", d.consumer_us, d.broker_us)))
    .collect();
    if !cpu.is_empty() {
        out.push(format!("drain CPU per message, consumer / RabbitMQ, µs: {}", cpu.join("; ")));
    }
    if let (Some(plain), Some(recycling)) = (&drain.celeriac_prefork, &drain.celeriac_prefork_recycling) {
        out.push(format!(
            "celeriac prefork, replacing each child after 100 tasks: {:.0}/s against {:.0}/s without, a cost of {:.0}% \
             (target: under 20%)",
            recycling.rate,
            plain.rate,
            (1.0 - recycling.rate / plain.rate) * 100.0
        ));
    }
    let cv = &run.canvas;
    for (what, c, p) in [
        ("chord", cv.celeriac.chord_sizes, cv.celery.chord_sizes),
        ("chain", cv.celeriac.chain_sizes, cv.celery.chain_sizes),
    ] {
        let describe = |s: Option<canvas::Sizes>| s.map(|s| s.describe()).unwrap_or_else(|| "not measured".into());
        if c.is_some() || p.is_some() {
            out.push(format!(
                "{what} messages published (RabbitMQ firehose): celeriac {}; Celery {}",
                describe(c),
                describe(p)
            ));
        }
    }
    for b in &run.beat {
        let verdict = if b.met(BEAT_CPU_TARGET) { "met" } else { "missed" };
        out.push(format!(
            "{} (target: every due run sent, under {BEAT_CPU_TARGET:.0}% of one core: {verdict})",
            b.describe()
        ));
    }
    for (task, pair) in [("noop", &run.python.noop), ("getset", &run.python.getset)] {
        for (side, d) in [("celeriac --python-app", &pair.celeriac), ("Celery prefork", &pair.celery)] {
            if let Some(d) = d {
                out.push(format!(
                    "Python app, {task}, {side}: CPU per task: worker {:.0} µs (main process {:.0}, pool children {:.0}), \
                     RabbitMQ {:.0} µs; RSS peaks {}",
                    d.drain.consumer_us,
                    d.main_us,
                    d.drain.consumer_us - d.main_us,
                    d.drain.broker_us,
                    d.rss.describe()
                ));
            }
        }
    }
    out.extend(run.dashboard.iter().map(dashboard::CaseRun::describe));
    if let (Some(idle), Some(after)) = (&rt.celeriac_prefork_idle, &drain.celeriac_prefork_rss) {
        out.push(format!(
            "celeriac prefork worker RSS: idle {}; after its drain {}",
            idle.describe(),
            after.describe()
        ));
    }
    out
}

fn rss_detail(r: &procs::Rss) -> String {
    let kids: Vec<String> = r.children.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
    format!("main {:.1} + children {}", r.main as f64 / 1024.0, kids.join(" + "))
}
