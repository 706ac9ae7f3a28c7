//! `celeriac beat` as processes: bad schedule files exit 2 with one line naming the file, the
//! entry and the field; `--list`; three beats on one SQLite broker with the leader SIGKILLed
//! (one message per scheduled time, each its own id, the gap no longer than the failover bound);
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
    ] {
        let file = write(dir.path(), "beat.toml", text);
        let (code, out, err) = run_cli(&["beat", "--broker", &db.url, "--schedule", &file], &[]);
        assert_eq!(code, 2, "{text:?}: {out}{err}");
        let line = err.trim();
        assert!(!line.contains('\n') && line.contains(&file) && line.contains(want), "{text:?}: {line:?}");
    }
}

#[test]
fn three_beats_one_sender_and_a_sigkilled_leader_is_replaced_on_sqlite() {
    let db = TempDb::new("");
    three_beats_one_sender(&db.url, "beat-q");
}

#[test]
fn three_beats_one_sender_and_a_sigkilled_leader_is_replaced_on_redis() {
    let url = SharedRedisDb::get(4).url("");
    three_beats_one_sender(&url, &format!("beat-q-{}", std::process::id()));
}

#[test]
fn three_beats_one_sender_and_a_sigkilled_leader_is_replaced_on_rabbitmq() {
    let vhost = common::TestVhost::new();
    three_beats_one_sender(&vhost.url(""), "beat-q");
}

/// Three beats on the broker at `url`, an entry every 500 ms on `queue`; the leader SIGKILLed
/// after a few sends; another takes over within the bound; every run sent once, and the queue
/// holds exactly what was sent.
fn three_beats_one_sender(url: &str, queue: &str) {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("s{}", uuid::Uuid::new_v4().simple());
    let text =
        format!("[[entry]]\nname = \"tick\"\ntask = \"celeriac.noop\"\nevery = \"500ms\"\nqueue = \"{queue}\"\n");
    let file = write(dir.path(), "beat.toml", &text);
    let args = ["beat", "--broker", url, "--schedule", &file, "--lease", "1.5", "--name", &name];
    let mut beats: Vec<WorkerProc> = (0..3).map(|_| WorkerProc::spawn_cli(Path::new(common::bin()), &args)).collect();
    let sends = |b: &WorkerProc| b.matching("sent entry=").len();
    wait_until("a leader sending", Duration::from_secs(20), || beats.iter().any(|b| sends(b) >= 2));
    wait_until("four seconds of sending", Duration::from_secs(20), || beats.iter().map(sends).sum::<usize>() >= 8);
    let first = beats.iter().position(|b| b.count("leader: sending") > 0).expect("a leader");
    beats[first].signal("KILL");
    let killed_at = Instant::now();
    wait_until("another leader", Duration::from_secs(10), || {
        beats.iter().enumerate().any(|(i, b)| i != first && b.count("leader: sending") > 0)
    });
    let took_over = killed_at.elapsed();
    wait_until("four more seconds", Duration::from_secs(20), || {
        beats.iter().enumerate().filter(|(i, _)| *i != first).map(|(_, b)| sends(b)).sum::<usize>() >= 8
    });
    for b in &mut beats {
        b.signal("TERM");
    }
    for b in &mut beats {
        b.wait_exit(Duration::from_secs(10));
    }
    assert!(took_over < Duration::from_millis(1500 + 500 + 1000), "another beat led {took_over:?} after the kill");
    let sent: Vec<String> = beats.iter().flat_map(|b| b.matching("sent entry=")).collect();
    let ids: HashSet<String> = sent
        .iter()
        .filter_map(|l| l.split("task_id=").nth(1).map(|r| r.split_whitespace().next().unwrap_or("").to_string()))
        .collect();
    assert_eq!(ids.len(), sent.len(), "each run sent once:\n{}", sent.join("\n"));
    // The queue holds exactly what was sent.
    let (code, out, _) = run_cli(&["queues", "--broker", url, "--json", queue], &[]);
    assert_eq!(code, 0);
    let queues: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ready = queues.as_array().unwrap().iter().find(|q| q["name"] == queue).map(|q| q["ready"].as_u64().unwrap());
    assert_eq!(ready, Some(ids.len() as u64), "{out}");
    // --list shows the entry, its next run, and its last run.
    let (code, out, _) = run_cli(&["beat", "--broker", url, "--schedule", &file, "--list", "--name", &name], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("tick  celeriac.noop  every 500ms  next ") && out.contains(" UTC)  last 20"), "{out}");
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
        "[[entry]]\nname = \"inside\"\ntask = \"celeriac.add\"\nevery = \"500ms\"\nargs = [1, 2]\n",
    );
    let mut w = WorkerProc::start(&db.url, &["-B", "--schedule", &file, "-c", "2"]);
    wait_until("beat's tasks to run in the worker", Duration::from_secs(30), || {
        w.matching("task succeeded").iter().filter(|l| l.contains("celeriac.add")).count() >= 2
    });
    assert_eq!(w.count("leader: sending"), 1, "{}", w.dump());
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(20)).success(), "{}", w.dump());
    let (code, out, _) = run_cli(&["beat", "--broker", &db.url, "--schedule", &file, "--list"], &[]);
    assert!(code == 0 && out.contains("inside  celeriac.add") && !out.contains("last never"), "{out}");
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
