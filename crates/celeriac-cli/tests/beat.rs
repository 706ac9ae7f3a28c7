//! `celeriac beat` as processes: bad schedule files exit 2 with one line naming the file, the
//! entry and the field; `--list`; the acceptance shape on SQLite, Redis and RabbitMQ
//! (three beats, an entry every second for 20 s, the leader SIGKILLed halfway: one message per
//! scheduled second, each its own id, the gap no longer than the failover bound);
//! and a real Python Celery worker running what beat sends (Redis database 4).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{run_cli, wait_until, PyCeleryWorker, SharedRedisDb, TempDb, WorkerProc};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn a_bad_schedule_exits_2_naming_file_entry_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let db = TempDb::new("");
    for (text, want) in [
        ("[[entry]]\nname = \"a\"\ntask = \"t\"\ncron = \"99 * * * *\"\n", "entry \"a\": cron: "),
        ("timezone = \"Nowhere/Land\"\n[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n", "timezone: unknown timezone"),
        ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"fast\"\n", "entry \"a\": every: "),
        ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n", "entry \"a\": name: "),
        ("[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\nwhen = 3\n", "entry \"a\": when: unknown key"),
        ("timezone = \"UTC\"\n", "no [[entry]]"),
        ("[[entry]]\nname = \"a\"\ntask = \"t\"\ncron = \"0 0 31 2 *\"\n", "entry \"a\": cron: \"0 0 31 2 *\" never fires"),
        ("[[entry]]\nname = \"a\"\ntask = \"t\"\ncron = \"0 0 1 1 * 2030\"\n", "entry \"a\": cron: \"0 0 1 1 * 2030\" has 6 fields"),
    ] {
        let file = write(dir.path(), "beat.toml", text);
        let (code, out, err) = run_cli(&["beat", "--broker", &db.url, "--schedule", &file], &[]);
        assert_eq!(code, 2, "{text:?}: {out}{err}");
        let line = err.trim();
        assert!(!line.contains('\n') && line.contains(&file) && line.contains(want), "{text:?}: {line:?}");
    }
    // A lease of no time at all is refused, not a crash.
    let file = write(dir.path(), "beat.toml", "[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1s\"\n");
    let (code, out, err) = run_cli(&["beat", "--broker", &db.url, "--schedule", &file, "--lease", "0"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--lease must be a positive number of seconds"), "{err}");
    // --list against a broker that does not answer: exit 3, not a list of "never".
    let port = common::free_port();
    let unreachable = format!("redis://127.0.0.1:{port}/0");
    let (code, out, err) = run_cli(&["beat", "--broker", &unreachable, "--schedule", &file, "--list"], &[]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(!out.contains("never"), "{out}");
}

#[test]
fn three_beats_one_sender_and_a_sigkilled_leader_is_replaced_on_sqlite() {
    let db = TempDb::new("");
    three_beats_one_sender(&db.url, "beat-q");
}

#[test]
fn three_beats_one_sender_and_a_sigkilled_leader_is_replaced_on_redis() {
    let url = SharedRedisDb::get(4).url("");
    three_beats_one_sender(&url, &format!("beat-q-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
}

#[test]
fn three_beats_one_sender_and_a_sigkilled_leader_is_replaced_on_rabbitmq() {
    let vhost = common::TestVhost::new();
    three_beats_one_sender(&vhost.url(""), "beat-q");
}

/// The lease of the beats of [`three_beats_one_sender`] (`celeriac beat`'s default).
const LEASE: Duration = Duration::from_secs(3);

/// The acceptance shape: three beats on the broker at `url`, an entry every 1 s on
/// `queue`, for 20 s of runs; the leader SIGKILLed halfway (between two runs, so that it dies
/// with every run it sent recorded). Another takes over within the failover bound (the lease
/// and a third of it, 4 s; a second of slack for a loaded machine); the queue holds one message
/// per scheduled second, each with its own id, and exactly the runs the beats logged; the only
/// gap is the failover's, at most the bound and the period of the run it may have cost.
fn three_beats_one_sender(url: &str, queue: &str) {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("s{}", uuid::Uuid::new_v4().simple());
    let text = format!("[[entry]]\nname = \"tick\"\ntask = \"celeriac.noop\"\nevery = \"1s\"\nqueue = \"{queue}\"\n");
    let file = write(dir.path(), "beat.toml", &text);
    let lease = LEASE.as_secs_f64().to_string();
    let args = ["beat", "--broker", url, "--schedule", &file, "--lease", &lease, "--name", &name];
    let mut beats: Vec<WorkerProc> = (0..3).map(|_| WorkerProc::spawn_cli(Path::new(common::bin()), &args)).collect();
    let sent = |beats: &[WorkerProc]| -> Vec<(chrono::DateTime<chrono::Utc>, String)> {
        let mut runs: Vec<_> =
            beats.iter().flat_map(|b| b.matching("sent entry=")).map(|l| (scheduled_of(&l), task_id_of(&l))).collect();
        runs.sort();
        runs
    };
    wait_until("a leader sending", Duration::from_secs(20), || !sent(&beats).is_empty());
    let first = sent(&beats)[0].0;
    // Halfway: after the run of the tenth second, between two runs.
    wait_until("ten seconds of runs", Duration::from_secs(30), || sent(&beats).len() >= 10);
    let latest = sent(&beats).last().unwrap().0;
    wait_until("the middle of a second", Duration::from_secs(5), || {
        chrono::Utc::now() >= latest + chrono::Duration::milliseconds(400)
    });
    let leader = beats.iter().position(|b| b.count("leader: sending") > 0).expect("a leader");
    beats[leader].signal("KILL");
    let killed_at = Instant::now();
    let led =
        |beats: &[WorkerProc]| beats.iter().enumerate().any(|(i, b)| i != leader && b.count("leader: sending") > 0);
    wait_until("another leader", Duration::from_secs(15), || led(&beats));
    let took_over = killed_at.elapsed();
    let bound = LEASE + LEASE / 3;
    assert!(took_over < bound + Duration::from_secs(1), "another beat led {took_over:?} after the kill");
    wait_until("twenty seconds of runs", Duration::from_secs(30), || {
        sent(&beats).last().is_some_and(|(t, _)| *t >= first + chrono::Duration::seconds(19))
    });
    for b in &mut beats {
        b.signal("TERM");
    }
    for b in &mut beats {
        b.wait_exit(Duration::from_secs(10));
    }
    // A follower asking for the lease the leader holds is not an error (on RabbitMQ the server
    // refuses the lease queue with RESOURCE_LOCKED once a second, which lapin logs as one).
    for b in &beats {
        assert!(b.matching("ERROR").is_empty(), "an error logged by a beat:\n{}", b.dump());
    }
    let runs = sent(&beats);
    let logged = || runs.iter().map(|(t, id)| format!("{t} {id}")).collect::<Vec<_>>().join("\n");
    let ids: HashSet<&String> = runs.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), runs.len(), "each run sent once, with its own id:\n{}", logged());
    // One run a second, but for the failover's gap.
    let gaps: Vec<i64> = runs.windows(2).map(|w| (w[1].0 - w[0].0).num_milliseconds()).filter(|g| *g != 1000).collect();
    let most = (bound + Duration::from_secs(1)).as_millis() as i64;
    assert!(gaps.len() <= 1 && gaps.iter().all(|g| *g > 0 && *g <= most), "gaps {gaps:?} ms in\n{}", logged());
    assert!(runs.len() > 20 - (most / 1000) as usize, "{} runs in 20 s:\n{}", runs.len(), logged());
    // The queue holds exactly those messages, once each.
    let in_queue = tokio::runtime::Runtime::new().unwrap().block_on(drain(url, queue, runs.len()));
    let mut unique: Vec<&String> = in_queue.iter().collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), in_queue.len(), "a task id twice in the queue: {in_queue:?}");
    assert_eq!(unique.into_iter().collect::<HashSet<_>>(), ids, "the queue holds what was sent");
    // --list shows the entry, its next run, and its last run.
    let (code, out, _) = run_cli(&["beat", "--broker", url, "--schedule", &file, "--list", "--name", &name], &[]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with("tick ")).unwrap_or_else(|| panic!("no row for tick: {out}"));
    assert!(out.starts_with("NAME "), "a header first: {out}");
    assert!(row.contains(" celeriac.noop ") && row.contains(" every 1s ") && !row.contains("never"), "{out}");
    assert!(row.ends_with(" UTC") && row.matches(" UTC").count() >= 2, "next run in UTC, then the last run: {out}");
}

/// Take every message of `queue` (at least `expect`; then until the queue stays empty for half a
/// second): their task ids.
async fn drain(url: &str, queue: &str, expect: usize) -> Vec<String> {
    let broker = celeriac::connect::broker(url).unwrap();
    let mut consumer = broker.consume(&[queue.to_string()], 100).await.unwrap();
    let mut ids = Vec::new();
    loop {
        let limit = if ids.len() < expect { Duration::from_secs(10) } else { Duration::from_millis(500) };
        match tokio::time::timeout(limit, consumer.next()).await {
            Ok(d) => {
                let d = d.unwrap();
                ids.push(d.message.task_id().unwrap().to_string());
                d.ack().await.unwrap();
            }
            Err(_) if ids.len() < expect => panic!("{} of {expect} messages in {queue}", ids.len()),
            Err(_) => break,
        }
    }
    consumer.close().await;
    consumer.flush().await;
    ids
}

/// The task id of a `sent` line.
fn task_id_of(line: &str) -> String {
    line.split("task_id=").nth(1).and_then(|r| r.split_whitespace().next()).expect("a task id").to_string()
}

#[test]
fn a_python_worker_runs_what_beat_sends() {
    let dir = tempfile::tempdir().unwrap();
    let url = SharedRedisDb::get(4).url("");
    let queue = "beat-py";
    let file = write(
        dir.path(),
        "beat.toml",
        &format!(
            "[[entry]]\nname = \"py-{}\"\ntask = \"py.add\"\nevery = \"500ms\"\nargs = [20, 22]\nqueue = \"{queue}\"\n",
            std::process::id()
        ),
    );
    let py = PyCeleryWorker::start(&url, &url, queue);
    let mut beat = WorkerProc::spawn_cli(Path::new(common::bin()), &["beat", "--broker", &url, "--schedule", &file]);
    wait_until("the Python worker to run beat's tasks", Duration::from_secs(30), || {
        py.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("py.add") && l.contains("succeeded") && l.contains(": 42"))
            .count()
            >= 2
    });
    beat.signal("TERM");
    beat.wait_exit(Duration::from_secs(10));
}

#[test]
fn a_worker_with_dash_b_sends_and_runs_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let db = TempDb::new("");
    let file = write(
        dir.path(),
        "beat.toml",
        "[[entry]]\nname = \"inside\"\ntask = \"celeriac.add\"\nevery = \"500ms\"\nargs = [1, 2]\n\
         [[entry]]\nname = \"yearly\"\ntask = \"celeriac.noop\"\ncron = \"0 0 1 1 *\"\n",
    );
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut w = WorkerProc::start(
        &db.url,
        &["-B", "--schedule", &file, "--beat-name", "inner", "-c", "2", "--metrics-addr", &addr],
    );
    wait_until("beat's tasks to run in the worker", Duration::from_secs(30), || {
        w.matching("task succeeded").iter().filter(|l| l.contains("celeriac.add")).count() >= 2
    });
    // The worker's metrics endpoint serves the beat's beside its own, in one exposition.
    let (status, body) = common::http_get(port, "/metrics").expect("the metrics endpoint");
    assert_eq!(status, 200);
    assert!(body.contains("celeriac_beat_runs_sent_total{entry=\"inside\"}"), "{body}");
    assert!(body.contains("celeriac_beat_leader 1") && body.contains("celeriac_tasks_total{"), "{body}");
    assert_eq!(body.matches("# EOF").count(), 1, "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert_eq!(w.count("leader: sending"), 1, "{}", w.dump());
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(20)).success(), "{}", w.dump());
    // The runs are recorded under the schedule's name, --beat-name.
    let (code, out, _) = run_cli(&["beat", "--broker", &db.url, "--schedule", &file, "--list", "--name", "inner"], &[]);
    let row = |out: &str, name: &str| out.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(
        code == 0 && row(&out, "inside ").contains(" celeriac.add ") && !row(&out, "inside ").contains("never"),
        "{out}"
    );
    assert!(row(&out, "yearly ").contains("never (followed since "), "followed, not run yet: {out}");
    let (code, out, _) = run_cli(&["beat", "--broker", &db.url, "--schedule", &file, "--list"], &[]);
    assert!(code == 0 && row(&out, "inside ").ends_with(" never"), "the schedule \"default\" never ran: {out}");
    // --list on an SQLite file that does not exist says so, and does not create it.
    let missing = dir.path().join("none.db");
    let url = format!("sqlite://{}", missing.display());
    let (code, out, _) = run_cli(&["beat", "--broker", &url, "--schedule", &file, "--list"], &[]);
    assert!(code == 0 && out.contains("does not exist yet") && !missing.exists(), "{out}");
}

#[test]
fn sighup_reloads_the_schedule_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let db = TempDb::new("");
    let entry = |name: &str| format!("[[entry]]\nname = \"{name}\"\ntask = \"celeriac.noop\"\nevery = \"300ms\"\n");
    let file = write(dir.path(), "beat.toml", &entry("a"));
    let mut beat = WorkerProc::spawn_cli(Path::new(common::bin()), &["beat", "--broker", &db.url, "--schedule", &file]);
    let sent = |b: &WorkerProc, name: &str| b.matching(&format!("sent entry={name} ")).len();
    wait_until("entry a to be sent", Duration::from_secs(20), || sent(&beat, "a") >= 1);
    write(dir.path(), "beat.toml", "[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"often\"\n");
    beat.signal("HUP");
    wait_until("the bad file to be refused", Duration::from_secs(10), || beat.count("keeping the old one") == 1);
    assert!(beat.matching("keeping the old one")[0].contains("entry \"a\": every: "), "{}", beat.dump());
    let before = sent(&beat, "a");
    wait_until("entry a to go on", Duration::from_secs(10), || sent(&beat, "a") > before);
    write(dir.path(), "beat.toml", &entry("b"));
    beat.signal("HUP");
    wait_until("entry b to be sent", Duration::from_secs(10), || sent(&beat, "b") >= 1);
    assert_eq!(beat.count("schedule reloaded"), 1);
    beat.signal("TERM");
    assert!(beat.wait_exit(Duration::from_secs(10)).success());
}

/// A beat stopped for more than ten intervals, restarted: the runs missed meanwhile are sent by
/// the entry's `catch_up`: once (the latest), all ten or more, or none.
#[test]
fn catch_up_after_downtime_sends_once_all_or_none() {
    for (policy, check) in
        [("once", (|n: usize| n == 1) as fn(usize) -> bool), ("all", |n| n >= 10), ("skip", |n| n == 0)]
    {
        let dir = tempfile::tempdir().unwrap();
        let db = TempDb::new("");
        let text =
            format!("[[entry]]\nname = \"c\"\ntask = \"celeriac.noop\"\nevery = \"200ms\"\ncatch_up = \"{policy}\"\n");
        let file = write(dir.path(), "beat.toml", &text);
        let args = ["beat", "--broker", db.url.as_str(), "--schedule", file.as_str()];
        let mut first = WorkerProc::spawn_cli(Path::new(common::bin()), &args);
        wait_until("a first run", Duration::from_secs(20), || first.count("sent entry=c ") >= 1);
        first.signal("TERM");
        assert!(first.wait_exit(Duration::from_secs(10)).success());
        // Down for more than ten intervals: the downtime is what is tested.
        let stopped = Instant::now();
        wait_until("eleven intervals of downtime", Duration::from_secs(5), || {
            stopped.elapsed() >= Duration::from_millis(2300)
        });
        let mut second = WorkerProc::spawn_cli(Path::new(common::bin()), &args);
        // The runs it sends are the missed ones up to when it took the lead, then those on time;
        // wait for one on time, to know the catch-up is over.
        let led = || second.matching("leader: sending").first().map(|l| logged_at(l));
        wait_until("the restarted beat to lead", Duration::from_secs(20), || led().is_some());
        let led = led().expect("led");
        let on_time = || second.matching("sent entry=c ").iter().any(|l| scheduled_of(l) > led);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !on_time() {
            assert!(Instant::now() < deadline, "no run after the restart ({policy}):\n{}", second.dump());
            std::thread::sleep(Duration::from_millis(20));
        }
        second.signal("TERM");
        second.wait_exit(Duration::from_secs(10));
        let missed = second.matching("sent entry=c ").iter().filter(|l| scheduled_of(l) <= led).count();
        assert!(check(missed), "catch_up {policy}: {missed} missed runs sent\n{}", second.dump());
    }
}

/// When a log line was written (its leading RFC 3339 timestamp).
fn logged_at(line: &str) -> chrono::DateTime<chrono::Utc> {
    let stamp = line.split_whitespace().next().expect("a timestamp");
    chrono::DateTime::parse_from_rfc3339(stamp).expect("an RFC 3339 time").with_timezone(&chrono::Utc)
}

/// The scheduled time of a `sent` line (`scheduled=2026-11-30 11:49:41.100 UTC`).
fn scheduled_of(line: &str) -> chrono::DateTime<chrono::Utc> {
    let text = line.split("scheduled=").nth(1).expect("a scheduled time").trim().trim_end_matches(" UTC");
    let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").expect("a time");
    naive.and_utc()
}

/// A beat run sent twice (a failover resends what the dead leader sent but had not recorded):
/// the same id and beat's header; the worker runs it once. The same message without the header
/// runs each time it comes (the header is what makes the difference).
#[tokio::test]
async fn a_beat_run_sent_twice_runs_once() {
    let db = TempDb::new("");
    let w = WorkerProc::start(&db.url, &["-c", "2"]);
    let client = db.client().await;
    let send = |id: &str, beat: bool| {
        let options = celeriac::SendOptions { task_id: Some(id.into()), ..Default::default() };
        let mut m =
            client.build_message("celeriac.add", vec![1.into(), 2.into()], Default::default(), &options, true).unwrap();
        if beat {
            m.headers.insert("celeriac_beat_run".into(), "default/tick".into());
        }
        m
    };
    for (id, beat) in [("run-once", true), ("run-twice", false)] {
        for copy in 0..2 {
            client.broker().publish("celery", &send(id, beat)).await.unwrap();
            let done =
                || w.matching(id).iter().filter(|l| l.contains("task succeeded") || l.contains("already ran")).count();
            wait_until("the copy to be handled", Duration::from_secs(20), || done() > copy);
        }
    }
    let succeeded = |id: &str| w.matching(id).iter().filter(|l| l.contains("task succeeded")).count();
    assert_eq!((succeeded("run-once"), w.matching("already ran").len()), (1, 1), "{}", w.dump());
    assert_eq!(succeeded("run-twice"), 2);
}

#[test]
fn beat_metrics_count_runs_per_entry_and_leadership() {
    let dir = tempfile::tempdir().unwrap();
    let db = TempDb::new("");
    let file = write(dir.path(), "beat.toml", "[[entry]]\nname = \"m\"\ntask = \"celeriac.noop\"\nevery = \"200ms\"\n");
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut beat = WorkerProc::spawn_cli(
        Path::new(common::bin()),
        &["beat", "--broker", &db.url, "--schedule", &file, "--metrics-addr", &addr],
    );
    wait_until("three runs sent", Duration::from_secs(20), || beat.matching("sent entry=m ").len() >= 3);
    let (status, body) = common::http_get(port, "/metrics").expect("the metrics endpoint");
    assert_eq!(status, 200);
    let sent: u64 = body
        .lines()
        .find(|l| l.starts_with("celeriac_beat_runs_sent_total{entry=\"m\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{body}"));
    assert!(sent >= 3, "{body}");
    assert!(
        body.contains("celeriac_beat_leader 1") && body.contains("celeriac_beat_leadership_changes_total 1"),
        "{body}"
    );
    beat.signal("TERM");
    beat.wait_exit(Duration::from_secs(10));
}
