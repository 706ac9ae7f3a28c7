//! The command line: results and exit codes, configuration precedence, bad input.

mod common;

use common::{run_cli, TempDb, WorkerProc};

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
