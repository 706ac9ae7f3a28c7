//! The command line: results and exit codes, configuration precedence, bad input, callbacks
//! (`send --link/--link-error`) and the workflow lines of `result`.

mod common;

use std::time::Duration;

use common::{run_cli, wait_until, TempDb, WorkerProc};

#[test]
fn send_wait_prints_the_value_or_the_error_and_exit_code() {
    let db = TempDb::new("");
    let _w = WorkerProc::start(&db.url, &["-c", "2"]);
    let (code, out, err) = run_cli(&["send", "celeriac.add", "--args", "[2, 3]", "--wait", "--broker", &db.url], &[]);
    assert_eq!((code, out.trim()), (0, "5"), "{err}");
    let (code, out, err) =
        run_cli(&["send", "celeriac.echo", "--kwargs", r#"{"value": {"a": [1]}}"#, "--wait", "--broker", &db.url], &[]);
    assert_eq!((code, out.trim()), (0, r#"{"a":[1]}"#), "{err}");
    let (code, out, err) =
        run_cli(&["send", "celeriac.fail", "--args", r#"["it broke"]"#, "--wait", "--broker", &db.url], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("FAILURE: RuntimeError: it broke"), "{err}");
    // Without --wait: the id, then `result` shows the state.
    let (code, id, _) = run_cli(&["send", "celeriac.ping", "--broker", &db.url], &[]);
    assert_eq!(code, 0);
    let (code, out, err) = run_cli(&["result", id.trim(), "--wait", "--timeout", "20", "--broker", &db.url], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["SUCCESS", "\"pong\""]);
    let (code, out, _) = run_cli(&["result", "no-such-id", "--broker", &db.url], &[]);
    assert_eq!((code, out.trim()), (0, "PENDING"));
}

/// The task id of a worker log line (its span: `task{id=<id> name=...}`).
fn span_id(line: &str) -> Option<&str> {
    line.split_once("task{id=")?.1.split(' ').next()
}

#[test]
fn send_link_and_link_error_and_result_shows_what_a_task_sent() {
    let db = TempDb::new("");
    let w = WorkerProc::start(&db.url, &["-c", "2"]);
    let result = |id: &str| run_cli(&["result", id, "--wait", "--timeout", "30", "--broker", &db.url], &[]);
    let lines = |out: &str| out.lines().map(str::to_string).collect::<Vec<_>>();

    // --link: the callback gets the value; `result` names it among the task's children.
    let id = uuid::Uuid::new_v4().to_string();
    let send = ["send", "celeriac.add", "--args", "[2, 3]", "--link", "celeriac.echo", "--task-id", &id, "--wait"];
    let (code, out, err) = run_cli(&[&send[..], &["--broker", &db.url]].concat(), &[]);
    assert_eq!((code, out.trim()), (0, "5"), "{err}");
    let (code, out, err) = result(&id);
    assert_eq!(code, 0, "{err}");
    let callback = out.lines().find_map(|l| l.strip_prefix("children: ")).expect("a children: line").to_string();
    assert_eq!(lines(&out), ["SUCCESS", "5", &format!("children: {callback}")]);
    let (code, out, err) = result(&callback);
    assert_eq!((code, lines(&out)), (0, lines(&format!("SUCCESS\n5\nparent: {id}"))), "{err}");

    // --link-error: the errback (sent as a group of one, as Celery sends it) gets the failed id.
    let failed = uuid::Uuid::new_v4().to_string();
    let send =
        ["send", "celeriac.fail", "--args", r#"["boom"]"#, "--link-error", "celeriac.echo", "--task-id", &failed];
    let (code, _, err) = run_cli(&[&send[..], &["--wait", "--broker", &db.url]].concat(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("FAILURE: RuntimeError: boom"), "{err}");
    let (code, out, _) = result(&failed);
    assert_eq!((code, out.trim()), (1, "FAILURE"), "a failed task lists no children");
    // The errback's id is made by the worker: the one celeriac.echo it ran besides the callback.
    let errback = || {
        let ran = w.matching("name=celeriac.echo");
        ran.iter().filter_map(|l| span_id(l)).find(|i| *i != callback).map(str::to_string)
    };
    wait_until("the worker to run the errback", Duration::from_secs(30), || errback().is_some());
    let errback = errback().expect("the errback's id");
    let (code, out, err) = result(&errback);
    let out = lines(&out);
    assert_eq!((code, &out[..2]), (0, &["SUCCESS".to_string(), format!("\"{failed}\"")][..]), "{err}");
    assert!(out.len() == 4 && out[2].starts_with("group: ") && out[3] == format!("parent: {failed}"), "{out:?}");
}

#[test]
fn the_environment_configures_the_broker_and_flags_win_over_it() {
    let env_db = TempDb::new("");
    let flag_db = TempDb::new("");
    let (code, _, err) = run_cli(&["send", "celeriac.noop", "-Q", "envq"], &[("CELERIAC_BROKER_URL", &env_db.url)]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(
        &["send", "celeriac.noop", "-Q", "flagq", "--broker", &flag_db.url],
        &[("CELERIAC_BROKER_URL", &env_db.url)],
    );
    assert_eq!(code, 0, "{err}");
    let (_, env_q, _) = run_cli(&["queues", "--json", "--broker", &env_db.url], &[]);
    let (_, flag_q, _) = run_cli(&["queues", "--json", "--broker", &flag_db.url], &[]);
    assert!(env_q.contains("envq") && !env_q.contains("flagq"), "{env_q}");
    assert!(flag_q.contains("flagq") && !flag_q.contains("envq"), "{flag_q}");
}

#[test]
fn bad_urls_and_arguments_exit_2_with_one_clear_line() {
    let db = TempDb::new("");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["queues", "--broker", "kafka://localhost"], "unknown URL scheme"),
        (vec!["queues", "--broker", "no-scheme-at-all"], "unknown URL scheme"),
        (vec!["queues", "--broker", "sqlite://"], "no database path"),
        (vec!["queues", "--broker", "sqlite:///tmp/x.db?visibility_timeout=soon"], "visibility_timeout"),
        (vec!["send", "celeriac.add", "--args", "[1,", "--broker", &db.url], "--args: not valid JSON"),
        (vec!["send", "celeriac.add", "--args", "{}", "--broker", &db.url], "--args: expected a JSON list"),
        (vec!["send", "celeriac.add", "--kwargs", "[]", "--broker", &db.url], "--kwargs: expected a JSON object"),
        (vec!["send", "celeriac.add", "--countdown=-3", "--broker", &db.url], "--countdown must be"),
        (vec!["worker", "-c", "0", "--broker", &db.url], "--concurrency"),
        (vec!["worker", "--pool", "gevent", "--broker", &db.url], "--pool"),
        (vec!["worker", "--concurrency", "many"], "invalid value"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, needle) in cases {
        let (code, out, err) = run_cli(&args, &[]);
        assert_eq!(code, 2, "{args:?}: stdout {out} stderr {err}");
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // An unreachable broker file (directory missing) is exit 3, not a panic.
    let (code, _, err) = run_cli(&["queues", "--broker", "sqlite:///nonexistent-dir/x.db"], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn every_command_has_help() {
    for cmd in ["worker", "send", "result", "queues", "purge", "dead-letters", "demo"] {
        let (code, out, err) = run_cli(&[cmd, "--help"], &[]);
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(out.contains("Usage: celeriac"), "{cmd}: {out}");
    }
    let (code, out, _) = run_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("worker") && out.contains("demo"));
}

#[test]
fn purge_needs_force_and_empties_the_queue() {
    let db = TempDb::new("");
    for _ in 0..3 {
        assert_eq!(run_cli(&["send", "celeriac.noop", "--broker", &db.url], &[]).0, 0);
    }
    let (code, _, err) = run_cli(&["purge", "--broker", &db.url], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = run_cli(&["purge", "-f", "--broker", &db.url], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "purged 3 messages from celery");
    let (_, out, _) = run_cli(&["queues", "--json", "--broker", &db.url], &[]);
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(q[0]["ready"], 0, "{out}");
}

#[test]
fn demo_runs_on_the_embedded_default_and_reports_every_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let (code, out, err) = run_cli(&["demo", "--tasks", "300", "--db", db.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("SUCCESS") && out.contains("FAILURE"), "{out}");
    assert!(out.contains("every outcome is as expected"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("SUCCESS") && l.trim_end().ends_with("302")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("retries") && l.trim_end().ends_with('2')), "{out}");
    assert!(!db.exists(), "the demo removes its file unless --keep");
}

/// A command whose reader goes away (`celeriac queues | head -0`) ends quietly, as Unix tools do:
/// no panic, no backtrace.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::process::{Command, Stdio};
    let db = common::TempDb::new("");
    // Enough queues that the output outgrows the pipe's buffer.
    for i in 0..300 {
        let (code, _, err) = common::run_cli(
            &["send", "--broker", &db.url, "celeriac.noop", "-Q", &format!("pipe-queue-with-a-long-name-{i:04}")],
            &[],
        );
        assert_eq!(code, 0, "{err}");
    }
    for _ in 0..3 {
        let mut child = Command::new(common::bin())
            .args(["queues", "--broker", &db.url])
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    }
}
