//! `celeriac worker --python-app` reading the Celery app's configuration (`tests/pyapp/confapp.py`):
//! broker, backend and queues from `app.conf` when no flag or environment variable names them,
//! its queues declared with its maximum priority, the app's rate limit and time limit enforced by
//! the supervisor, and one start-up line naming
//! exactly the settings celeriac does not act on. Real RabbitMQ (a vhost per test), Redis
//! (database 14) and a real Celery client.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{bin, repo, run_cli, venv_python, SharedRedisDb, TestVhost, WorkerProc};
use serde_json::Value;

/// This binary's Redis database (results).
const DB: u32 = 14;

/// What `confapp` changes that celeriac does not act on, as the start-up line names them.
const UNSUPPORTED: &str = "result_expires,task_acks_on_failure_or_timeout,worker_hijack_root_logger";

fn pyapp_dir() -> PathBuf {
    repo().join("tests/pyapp")
}

/// The environment of `confapp`: its broker, backend and queue prefix, its module path, and
/// Celery's own variables emptied (`app.conf.broker_url` would read them first).
fn app_env(broker: &str, backend: &str, queue: &str) -> Vec<(String, String)> {
    vec![
        ("CONFAPP_BROKER".into(), broker.into()),
        ("CONFAPP_BACKEND".into(), backend.into()),
        ("CONFAPP_QUEUE".into(), queue.into()),
        ("CELERY_BROKER_URL".into(), String::new()),
        ("CELERY_RESULT_BACKEND".into(), String::new()),
        ("PYTHONPATH".into(), pyapp_dir().display().to_string()),
    ]
}

/// A worker running `confapp` with only `args` besides `--python-app` (and `extra_env`).
fn conf_worker(env: &[(String, String)], args: &[&str], extra_env: &[(&str, &str)]) -> WorkerProc {
    let python = venv_python();
    let mut all = vec!["worker", "--python-app", "confapp:app", "--python", python.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend_from_slice(extra_env);
    let w = WorkerProc::spawn_cli_env(std::path::Path::new(bin()), &all, &env);
    w.wait_for_line("worker ready", Duration::from_secs(60));
    w
}

/// The value of `field=` on a log line (up to the next space).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split(' ').next()
}

/// Run `tests/pyapp/confclient.py CASES...` with the app's own configuration.
fn run_client(env: &[(String, String)], cases: &[&str]) -> serde_json::Map<String, Value> {
    common::pyapp::run_script("confclient.py", cases, env)
}

#[test]
fn a_worker_with_no_flags_takes_broker_backend_queues_and_limits_from_the_app() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let queue = "pyconf.app";
    let env = app_env(&vhost.url(""), &db.url(""), queue);
    // No --broker, --result-backend, -Q, -c, --time-limit and no CELERIAC_* variables.
    let w = conf_worker(&env, &["-n", "pyconf-app@%h"], &[]);
    // One line names exactly what the app changes and celeriac does not act on.
    let warned = w.matching("settings celeriac does not act on");
    assert_eq!(warned.len(), 1, "{}", w.dump());
    assert_eq!(field(&warned[0], "settings"), Some(UNSUPPORTED), "{}", warned[0]);
    // The queues are the app's task_queues, and they are said to come from there.
    let taken = w.matching("queues taken from the app");
    assert_eq!(taken.len(), 1, "{}", w.dump());
    assert_eq!(field(&taken[0], "queues"), Some("pyconf.app.a,pyconf.app.b"), "{}", taken[0]);
    assert_eq!(field(&taken[0], "from"), Some("task_queues"), "{}", taken[0]);
    // worker_concurrency and worker_prefetch_multiplier were taken too.
    let ready = w.matching("worker ready").remove(0);
    assert_eq!((field(&ready, "concurrency"), field(&ready, "prefetch")), (Some("2"), Some("2")), "{ready}");
    // The app's task_queue_max_priority: celeriac declares its queues as the app's clients do.
    assert_eq!(w.count("queues declared as the app's task_queue_max_priority says"), 1, "{}", w.dump());
    for q in ["pyconf.app.a", "pyconf.app.b"] {
        let listed = vhost.list("list_queues", &["name", "arguments"]);
        let line = listed.iter().find(|l| l.split_whitespace().next() == Some(q));
        assert!(line.is_some_and(|l| l.contains("x-max-priority") && l.contains("10")), "{q}: {listed:?}");
    }
    let vhost_id = vhost.name.rsplit('-').next().unwrap();
    assert!(field(&ready, "broker").is_some_and(|b| b.contains(vhost_id)), "the app's broker: {ready}");

    let got = run_client(&env, &["add_a", "mul_b", "ticks", "sleepy"]);
    // Results from both of the app's queues (mul is routed to the second by task_routes),
    // read back from the app's backend.
    assert_eq!((&got["add_a"]["status"], &got["add_a"]["result"]), (&Value::from("SUCCESS"), &Value::from(5)));
    assert_eq!((&got["mul_b"]["status"], &got["mul_b"]["result"]), (&Value::from("SUCCESS"), &Value::from(20)));
    // The annotation's rate limit (2/s) spaces the starts: six starts span about 2.5 s (a
    // no-op burst on two children would span milliseconds).
    let mut starts: Vec<f64> = got["ticks"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    starts.sort_by(f64::total_cmp);
    let span = starts[5] - starts[0];
    assert!(span >= 2.0, "six ticks at 2/s started within {span:.3}s: {starts:?}");
    // The app's task_time_limit (2 s) kills a task that sleeps for 60, whose message carries no
    // limit of its own.
    assert_eq!(got["sleepy"]["status"], "FAILURE", "{got:?}");
    assert_eq!(got["sleepy"]["result"]["exc_type"], "TimeLimitExceeded", "{got:?}");
    assert!(w.matching("hard time limit exceeded").iter().any(|l| l.contains("time_limit=2.0")), "{}", w.dump());
    // Remote control shows the rate limit, as for one set by `control rate-limit`.
    let (code, out, err) = run_cli(&["inspect", "registered", "--broker", &vhost.url("")], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("confapp.tick [rate_limit=2/s]"), "{out}{err}");
}

#[test]
fn a_flag_or_the_environment_beats_the_app_s_configuration() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    // The app names a broker and a backend where nothing listens: the worker must not use them.
    let env = app_env("amqp://guest:guest@127.0.0.1:1//", "redis://127.0.0.1:1/0", "pyconf.flag");
    let (broker, backend) = (vhost.url(""), db.url(""));
    // The worker declares its queue with the app's maximum priority, so a celeriac client says
    // the same (RabbitMQ refuses a second declaration that differs).
    let client_broker = vhost.url("max_priority=10");
    let w = conf_worker(
        &env,
        &["--broker", &broker, "-Q", "pyconf.flagq", "-n", "pyconf-flag@%h"],
        &[("CELERIAC_RESULT_BACKEND", &backend)],
    );
    assert_eq!(w.count("queues taken from the app"), 0, "-Q was given: {}", w.dump());
    assert_eq!(w.count("from the app's broker_url"), 0, "{}", w.dump());
    assert_eq!(w.count("from the app's result_backend"), 0, "{}", w.dump());
    let ready = w.matching("worker ready").remove(0);
    assert_eq!(field(&ready, "queues"), Some("pyconf.flagq"), "{ready}");
    let (code, out, err) = run_cli(
        &[
            "send",
            "confapp.add",
            "--args",
            "[20, 22]",
            "-Q",
            "pyconf.flagq",
            "--broker",
            &client_broker,
            "--wait",
            "--json",
        ],
        &[("CELERIAC_RESULT_BACKEND", &backend)],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", w.dump());
    let meta: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((&meta["status"], &meta["result"]), (&Value::from("SUCCESS"), &Value::from(42)), "{meta}");
}

#[test]
fn an_unusable_app_broker_is_refused_and_a_queue_declaration_celeriac_does_not_reproduce_is_named() {
    let python = venv_python();
    let python = python.to_str().unwrap();
    let env = app_env("kafka://127.0.0.1:9092", "redis://127.0.0.1:6379/14", "pyconf.bad");
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // With a fanout queue among task_queues, which celeriac consumes by name only.
    env.push(("CONFAPP_FANOUT", "1"));
    let (code, _out, err) = run_cli(&["worker", "--python-app", "confapp:app", "--python", python], &env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the app's broker_url (give another with --broker)"), "{err}");
    assert!(err.contains("kafka://127.0.0.1:9092"), "{err}");
    // Before that, the one warning line named task_queues too, and what the queue asks for; on
    // a broker other than RabbitMQ queue arguments do not count (kombu's other transports ignore
    // them too), and task_queue_max_priority is not taken.
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("settings celeriac does not act on")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    let settings =
        "result_expires,task_acks_on_failure_or_timeout,task_queue_max_priority,task_queues,worker_hijack_root_logger";
    assert_eq!(field(warned[0], "settings"), Some(settings), "{}", warned[0]);
    assert_eq!(field(warned[0], "task_queues"), Some("pyconf.bad.fan:exchange_type=fanout"), "{}", warned[0]);
    let failover = "redis://127.0.0.1:6379/14;redis://127.0.0.1:6380/14";
    let env = app_env(failover, "redis://127.0.0.1:6379/14", "pyconf.bad");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, _out, err) = run_cli(&["worker", "--python-app", "confapp:app", "--python", python], &env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("names several brokers"), "{err}");
}

/// A `worker_max_memory_per_child` below a fresh child, from the app with no flag: refused with
/// both figures, naming the setting where it was set (not a flag nobody passed).
#[test]
fn a_memory_limit_from_the_app_below_a_fresh_child_is_refused_naming_the_setting() {
    let db = SharedRedisDb::get(DB);
    let vhost = TestVhost::new();
    let python = venv_python();
    let env = app_env(&vhost.url(""), &db.url(""), "pyconf.mem");
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.push(("CONFAPP_MAX_MEMORY_KIB", "5000"));
    let (code, _out, err) =
        run_cli(&["worker", "--python-app", "confapp:app", "--python", python.to_str().unwrap(), "-c", "1"], &env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the app's worker_max_memory_per_child 5.1 MB is below a fresh child's"), "{err}");
    assert!(!err.contains("--max-memory-per-child"), "{err}");
}
