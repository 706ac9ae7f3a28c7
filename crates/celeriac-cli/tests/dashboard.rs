//! The web dashboard over HTTP, against real processes: a RabbitMQ vhost per test, a celeriac
//! prefork worker sending events (`-E`), a real Python Celery worker beside it, results in Redis
//! database 3, and `celeriac dashboard` (or `worker --dashboard`) on a free loopback port.
//!
//! Covered: the JSON endpoints (workers of both kinds, tasks with their results, filters, a task
//! by id, an unknown id as "unknown"), the server-rendered task page escaping a task whose
//! arguments hold `<script>`, actions refused with 403 without a token (read-only), with a wrong
//! token and from another origin, and revoke with the token terminating a `celeriac.hang` task
//! in a prefork child, which the dashboard first shows as blocked with its wait channel and then
//! as REVOKED; a malformed event is skipped with one log line; a broker that goes away shows
//! "disconnected" (one WARN line, none of lapin's) and the dashboard recovers when it returns,
//! events included: a task run at once after "connected" shows. Bad input is answered with the
//! reason (an unknown worker, state or queue; a capped limit), every answer carries the
//! security headers, and the dashboard refuses an SQLite file that does not exist. On RabbitMQ a
//! queue's unacked and scheduled are what its worker holds, its rates known where the worker's
//! events name the queue and null for a Python Celery worker's queue. A chain and a
//! chord run by a celeriac worker show as the membership and edges of their graph; a task a
//! Celery worker retried is not its own parent and its success shows no retry traceback as its
//! own; a task past its soft limit is hung; a Celery prefork worker's pool pids and peak RSS.
//! On an SQLite file (no events, no remote control): a plain revoke is recorded and a worker
//! started later discards the task as REVOKED, terminate and a bad rate limit are 400, and purge
//! keeps a countdown task; a finished, a failed and a running (held) task are read from the file,
//! with the consumer holding the running one; the dashboard never writes the file (an older
//! file's missing table included) until an action asks it to. In Chromium on that file: Enter on an id prefix
//! one task has opens it, an unknown state shows the 400's message, and a refused action's
//! answer is replaced by the next action's, the rate-limit action shows its answer; an id no
//! task or group has says so; the queue-depth chart spans the other charts' hour; the header
//! says why it is disconnected (the file removed).
//!
//! The acceptance runs the page in a real headless Chromium (Debian's `chromium`, driven through
//! `chromedriver`'s WebDriver HTTP API, spoken here directly): both workers appear, a task sent
//! shows its result, a `celeriac.hang` task shows blocked with its wait channel, Terminate
//! without the token is refused and with it the page shows REVOKED; filters apply as typed, more
//! than 200 tasks are paged with the count; a
//! chord's graph and the charts are drawn; it writes screenshots of the pages to
//! `target/dashboard-screenshots/` (current copies are in `docs/`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{free_port, run_cli, wait_until, PyCeleryWorker, SharedRedisDb, TcpProxy, TestVhost, WorkerProc};
use serde_json::{json, Value};

const DB: u32 = 3;
const TOKEN: &str = "s3cret-token";

fn results() -> String {
    SharedRedisDb::get(DB).url("")
}

/// A node name unique to this test run.
fn node(tag: &str) -> String {
    format!("dash-{tag}-{}@testhost", std::process::id())
}

/// One HTTP/1.1 request; (status, body). `headers` are extra header lines.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let (status, _, body) = http_full(port, method, path, headers, body);
    (status, body)
}

/// One HTTP/1.1 request; (status, the head's header lines in lower case, body).
fn http_full(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the dashboard");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    // Read until the answer is complete (Content-Length, the last chunk, or the end): a server
    // may keep the connection open despite `Connection: close` (chromedriver does).
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some(done) = complete(&raw) {
            raw.truncate(done);
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{method} {path}: no answer: {e}"),
        }
    }
    let answer = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = head.to_ascii_lowercase();
    let chunked = head.contains("transfer-encoding: chunked");
    (status, head, if chunked { dechunk(body) } else { body.to_string() })
}

/// The length of a complete HTTP answer at the start of `raw`, if it is complete.
fn complete(raw: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(raw);
    let end = text.find("\r\n\r\n")? + 4;
    let head = text[..end].to_ascii_lowercase();
    if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        let len: usize = len.trim().parse().ok()?;
        return (raw.len() >= end + len).then_some(end + len);
    }
    if head.contains("transfer-encoding: chunked") {
        return text[end..]
            .contains("\r\n0\r\n\r\n")
            .then_some(raw.len())
            .or_else(|| text[end..].starts_with("0\r\n\r\n").then_some(raw.len()));
    }
    None
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn get_json(port: u16, path: &str) -> (u16, Value) {
    let (status, body) = http(port, "GET", path, &[], "");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}")))
}

/// Send task `name` with `args` (a JSON list) to `queue`; its id.
fn send(broker: &str, name: &str, args: &str, queue: &str) -> String {
    let results = results();
    let (code, out, err) =
        run_cli(&["send", name, "--args", args, "-Q", queue, "--broker", broker, "--result-backend", &results], &[]);
    assert_eq!(code, 0, "send {name}: {out}{err}");
    out.trim().lines().last().expect("a task id").to_string()
}

/// `celeriac dashboard` on a free port; with `token`, actions are allowed.
fn dashboard(broker: &str, queue: &str, token: Option<&str>) -> (WorkerProc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let results = results();
    let mut args =
        vec!["dashboard", "--broker", broker, "--result-backend", &results, "--listen", &listen, "-Q", queue];
    if let Some(t) = token {
        args.extend_from_slice(&["--auth-token", t]);
    }
    let d = WorkerProc::spawn_cli(std::path::Path::new(common::bin()), &args);
    d.wait_for_line("dashboard ready", Duration::from_secs(30));
    (d, port)
}

/// Wait until task `id`'s JSON satisfies `cond`; that JSON.
fn wait_task(port: u16, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = get_json(port, &format!("/api/tasks/{id}")).1;
        if cond(&last) {
            return last;
        }
        assert!(Instant::now() < deadline, "timed out after 30 s waiting for task {id} {what}; last seen: {last}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The item of the list at `path` whose `key` is `value`, once `cond` holds for it.
fn wait_listed(port: u16, path: &str, key: &str, value: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = get_json(port, path);
        let found = list.as_array().into_iter().flatten().find(|x| x[key] == json!(value)).cloned().unwrap_or_default();
        if cond(&found) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after 30 s waiting for {value} in {path} {what}; last seen: {found}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The worker named `name` in `/api/workers`, once `cond` holds for it.
fn wait_worker(port: u16, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    wait_listed(port, "/api/workers", "hostname", name, what, cond)
}

#[test]
fn the_json_endpoints_show_both_workers_and_tasks_escape_script_and_refuse_actions_read_only() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = results();
    let name = node("json");
    let queue = "dash.json";
    let _w = prefork_worker(&broker, &name, queue);
    let py = PyCeleryWorker::start_pool(&broker, &results, "dash.py", &["-P", "prefork", "-c", "2"]);
    let py_name = format!("py-dash.py-{}@{}", std::process::id(), hostname());
    let (dash, port) = dashboard(&broker, queue, None);

    // Both workers, each as what it is.
    let w = wait_worker(port, &name, "online with its pool", |w| {
        w["online"] == json!(true) && w["children"][0]["pid"].is_u64()
    });
    assert_eq!((w["software"].as_str(), w["pool"].as_str()), (Some("celeriac"), Some("celeriac:prefork")), "{w}");
    assert!(w["heartbeat_age"].as_f64().is_some_and(|a| a < 10.0), "{w}");
    let p = wait_worker(port, &py_name, "listed", |w| w["online"] == json!(true) && !w["pool"].is_null());
    assert_eq!(p["software"], json!("py-celery"), "{p}");
    // What a Celery worker's stats give: its pool's pids and its own peak RSS; the rest is not
    // reported (null), not blank.
    let children = p["children"].as_array().unwrap();
    assert_eq!(children.len(), 2, "{p}");
    assert!(children.iter().all(|c| c["pid"].is_u64() && c["rss_kib"].is_null()), "{p}");
    assert!(p["peak_rss_kib"].as_u64().is_some_and(|k| k > 10_000), "{p}");

    // A task appears with its result; filters select it.
    let id = send(&broker, "celeriac.add", "[2, 3]", queue);
    // Its state and result may come from the stored result first; the worker's events bring its
    // name, worker and run time.
    let t = wait_task(port, &id, "succeeded, and its events seen", |t| {
        t["state"] == json!("SUCCESS") && t["result"].is_string() && t["runtime"].is_number() && t["name"].is_string()
    });
    assert_eq!(
        (t["name"].as_str(), t["result"].as_str(), t["worker"].as_str()),
        (Some("celeriac.add"), Some("5"), Some(name.as_str())),
        "{t}"
    );
    assert_eq!(t["args"], json!("[2, 3]"), "{t}");
    assert_eq!(t["stored"]["result"], json!(5), "the stored result is read too: {t}");
    let ids = |path: &str| -> Vec<Value> {
        get_json(port, path).1["tasks"].as_array().unwrap().iter().map(|t| t["id"].clone()).collect()
    };
    assert!(ids("/api/tasks?state=SUCCESS&name=add").contains(&json!(id)));
    assert!(!ids("/api/tasks?state=FAILURE").contains(&json!(id)));
    assert!(ids(&format!("/api/tasks?worker={}", name.replace('@', "%40"))).contains(&json!(id)));
    // The worker by a part of its name, the id by its start.
    assert!(ids("/api/tasks?worker=dash-json").contains(&json!(id)));
    assert!(!ids("/api/tasks?worker=py-dash").contains(&json!(id)));
    assert_eq!(ids(&format!("/api/tasks?id={}", &id[..8])), vec![json!(id)]);
    let (_, paged) = get_json(port, "/api/tasks?offset=1&limit=5");
    assert_eq!((paged["matched"].as_u64(), paged["tasks"].as_array().map(Vec::len)), (Some(1), Some(0)), "{paged}");
    let (status, bad) = get_json(port, "/api/tasks?colour=red");
    assert_eq!(status, 400, "{bad}");

    // An unknown id is "unknown".
    let (status, unknown) = get_json(port, "/api/tasks/no-such-task");
    assert_eq!((status, unknown["state"].as_str()), (404, Some("unknown")), "{unknown}");

    // Script in the arguments is text: escaped on the server-rendered page, a plain string in JSON.
    let script = "<script>alert(1)</script>";
    let id = send(&broker, "celeriac.echo", &json!([script]).to_string(), queue);
    let t = wait_task(port, &id, "succeeded, its arguments seen", |t| {
        t["state"] == json!("SUCCESS") && t["result"].is_string() && t["args"].is_string()
    });
    assert!(t["args"].as_str().is_some_and(|a| a.contains(script)), "{t}");
    let (status, page) = http(port, "GET", &format!("/task/{id}"), &[], "");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{page}");
    assert!(!page.contains(script), "unescaped script in the page:\n{page}");
    let (_, index) = http(port, "GET", "/", &[], "");
    assert!(index.contains("/app.js") && !index.contains(script), "{index}");
    let (_, js) = http(port, "GET", "/app.js", &[], "");
    assert!(!js.contains("innerHTML"), "the page builds its DOM with textContent only");

    // Read-only: every action is refused, and logged with who asked.
    for path in
        [format!("/api/tasks/{id}/revoke"), format!("/api/tasks/{id}/retry"), format!("/api/queues/{queue}/purge")]
    {
        let (status, body) = http(port, "POST", &path, &[("X-Celeriac-Token", "anything")], "{}");
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("read-only"), "{body}");
    }
    dash.wait_for_line("action refused: the dashboard is read-only", Duration::from_secs(20));
    assert!(dash.matching("action refused").iter().all(|l| l.contains("peer=127.0.0.1:")), "{}", dash.dump());
    let mut overview = Value::Null;
    wait_until("the dashboard to read the broker", Duration::from_secs(10), || {
        overview = get_json(port, "/api/overview").1;
        overview["connected"] == json!(true)
    });
    assert_eq!(overview["read_only"], json!(true), "{overview}");
    let (_, queues) = get_json(port, "/api/queues");
    assert!(
        queues.as_array().unwrap().iter().any(|q| q["name"] == json!(queue) && q["consumers"] == json!(1)),
        "{queues}"
    );
    let minutes = overview["throughput"].as_array().unwrap();
    assert_eq!(minutes.len(), 60, "every minute of the hour, an empty one as zeros: {overview}");
    let succeeded: u64 = minutes.iter().filter_map(|m| m["succeeded"].as_u64()).sum();
    assert!(succeeded >= 2, "{overview}");
    drop(py);
}

/// A celeriac prefork worker of one child sending task events, on `queue`, with a hard time
/// limit of 300 s (a `celeriac.hang` task is terminated by the test long before).
fn prefork_worker(broker: &str, name: &str, queue: &str) -> WorkerProc {
    prefork_worker_with(broker, name, queue, &[])
}

/// [`prefork_worker`] with more options.
fn prefork_worker_with(broker: &str, name: &str, queue: &str, extra: &[&str]) -> WorkerProc {
    let results = results();
    let args = ["--result-backend", &results, "-P", "prefork", "-c", "1", "-E", "-n", name, "-Q", queue];
    WorkerProc::start(broker, &[&args[..], &["--time-limit", "300"], extra].concat())
}

fn hostname() -> String {
    let out = std::process::Command::new("hostname").output().expect("hostname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn revoke_with_the_token_terminates_a_hung_prefork_task_which_then_shows_revoked() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let name = node("revoke");
    let queue = "dash.revoke";
    // A soft limit of 1 s, which a task blocked in a futex wait cannot notice.
    let worker = prefork_worker_with(&broker, &name, queue, &["--soft-time-limit", "1"]);
    let (dash, port) = dashboard(&broker, queue, Some(TOKEN));
    let id = send(&broker, "celeriac.hang", "[]", queue);

    // The child running it is shown blocked, with its wait channel.
    let w = wait_worker(port, &name, "blocked in a futex wait", |w| {
        w["children"][0]["task"]["id"] == json!(id)
            && w["children"][0]["blocked_on"].as_str().is_some_and(|b| b.contains("futex"))
    });
    assert!(w["children"][0]["wchan"].as_str().is_some_and(|c| c.contains("futex")), "{w}");
    // The task itself says so too, in the list (a hung task is highlighted) and on its page.
    let t = wait_task(port, &id, "started and blocked", |t| {
        t["state"] == json!("STARTED") && t["blocked_on"].as_str().is_some_and(|b| b.ends_with("syscall futex"))
    });
    assert!(t["hard_time_left"].as_f64().is_some_and(|s| s > 0.0 && s <= 300.0), "{t}");
    let (_, started) = get_json(port, "/api/tasks?state=STARTED");
    assert!(started["tasks"][0]["blocked_on"].is_string(), "{started}");
    // Past its soft limit it is hung, in the list too.
    let t = wait_task(port, &id, "hung past its soft limit", |t| {
        t["hung"].as_str().is_some_and(|h| h.starts_with("past its soft time limit by"))
    });
    assert!(t["soft_time_left"].as_f64().is_some_and(|s| s < 0.0), "{t}");
    let (_, started) = get_json(port, "/api/tasks?state=STARTED");
    assert!(started["tasks"][0]["hung"].is_string(), "{started}");

    // Refused: no token, a wrong one, another origin, a malformed body.
    let path = format!("/api/tasks/{id}/revoke");
    let body = r#"{"terminate": true}"#;
    for headers in [
        vec![],
        vec![("X-Celeriac-Token", "wrong")],
        vec![("X-Celeriac-Token", TOKEN), ("Origin", "http://evil.example")],
    ] {
        let (status, answer) = http(port, "POST", &path, &headers, body);
        assert_eq!(status, 403, "{headers:?}: {answer}");
    }
    for bad in ["[1]", r#"{"terminate": "yes"}"#] {
        let (status, answer) = http(port, "POST", &path, &[("X-Celeriac-Token", TOKEN)], bad);
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    assert_eq!(get_json(port, &format!("/api/tasks/{id}")).1["state"], json!("STARTED"));

    // A plain revoke (no terminate) does not stop a running task, and stores nothing for it:
    // the task is still running, and shown so.
    let origin = format!("http://127.0.0.1:{port}");
    let with_token = [("X-Celeriac-Token", TOKEN), ("Origin", origin.as_str())];
    let (status, answer) = http(port, "POST", &path, &with_token, r#"{"terminate": false}"#);
    assert_eq!(status, 200, "{answer}");
    worker.wait_for_line("tasks flagged as revoked", Duration::from_secs(10));
    let t = get_json(port, &format!("/api/tasks/{id}")).1;
    assert_eq!((&t["state"], &t["stored"]), (&json!("STARTED"), &Value::Null), "{t}");

    // With the token and terminate: the child is killed, then REVOKED.
    let (status, answer) = http(
        port,
        "POST",
        &path,
        &[("X-Celeriac-Token", TOKEN), ("Origin", &origin), ("Content-Type", "application/json")],
        body,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(&name), "the worker replied: {answer}");
    // Valid for a minute for a worker that reads it late; the worker running it was awaited and
    // replied, so nothing is pending.
    let a: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!((&a["valid_for"], a.get("pending")), (&json!(60), None), "{a}");
    // The event and the stored result may come in either order.
    wait_task(port, &id, "revoked, and stored so", |t| {
        t["state"] == json!("REVOKED") && t["stored"]["status"] == json!("REVOKED")
    });
    dash.wait_for_line("dashboard action", Duration::from_secs(20));
    let logged = dash.matching("revoke asked from the dashboard");
    assert!(logged.iter().any(|l| l.contains(&id) && l.contains("peer=127.0.0.1:")), "{}", dash.dump());
}

#[test]
fn a_worker_serves_the_dashboard_and_a_malformed_event_is_skipped_with_one_line() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = results();
    let name = node("inworker");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let w = WorkerProc::start(
        &broker,
        &["--result-backend", &results, "-E", "-n", &name, "-Q", "dash.inworker", "--dashboard", &listen],
    );
    w.wait_for_line("dashboard ready", Duration::from_secs(10));
    wait_worker(port, &name, "online", |w| w["online"] == json!(true));

    // A bad event on celeryev: not JSON. Published with the Python client's kombu, as any
    // process on the broker could.
    let script = "import kombu,sys\n\
        with kombu.Connection(sys.argv[1]) as c:\n\
        \x20   p = c.Producer(exchange=kombu.Exchange('celeryev', type='topic'), serializer=None)\n\
        \x20   p.publish(b'{not json', routing_key='task.succeeded', content_type='application/json', content_encoding='utf-8', declare=[kombu.Exchange('celeryev', type='topic')])\n";
    let out = std::process::Command::new(common::venv_python()).args(["-c", script, &broker]).output().expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.wait_for_line("malformed event skipped", Duration::from_secs(10));
    assert_eq!(w.count("malformed event skipped"), 1, "{}", w.dump());
    let id = send(&broker, "celeriac.add", "[1, 1]", "dash.inworker");
    wait_task(port, &id, "succeeded after the bad event", |t| t["state"] == json!("SUCCESS"));
}

#[test]
fn a_broker_that_goes_away_shows_disconnected_and_the_dashboard_recovers_when_it_returns() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = results();
    let name = node("outage");
    let queue = "dash.outage";
    let _w = WorkerProc::start(&broker, &["--result-backend", &results, "-E", "-n", &name, "-Q", queue]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut proxy = rt.block_on(TcpProxy::start("127.0.0.1:5672"));
    let proxy_port = proxy.port;
    let through = format!("amqp://guest:guest@127.0.0.1:{proxy_port}/{}", vhost.name);
    let (dash, port) = dashboard(&through, queue, None);
    let connected = |want: bool| {
        wait_until(&format!("connected = {want}"), Duration::from_secs(30), || {
            get_json(port, "/api/overview").1["connected"] == json!(want)
        })
    };
    connected(true);
    wait_worker(port, &name, "online", |w| w["online"] == json!(true));

    rt.block_on(proxy.stop());
    connected(false);
    let (_, overview) = get_json(port, "/api/overview");
    assert!(overview["error"].is_string(), "the reason is shown: {overview}");
    // The page is still served, from memory.
    assert_eq!(http(port, "GET", "/api/workers", &[], "").0, 200);

    let _back = rt.block_on(TcpProxy::start_on(proxy_port, "127.0.0.1:5672"));
    connected(true);
    // Connected means subscribed: the dashboard's event queue is back, with its consumer.
    let queues = vhost.list("list_queues", &["name", "consumers"]);
    assert!(
        queues.iter().any(|l| l.starts_with("celeryev.") && l.split_whitespace().nth(1) == Some("1")),
        "connected, but no event subscription: {queues:?}"
    );
    // "connected" means the events are back too: a task run at once shows with its result
    // (its events are not lost to a subscription still waiting to be made).
    let id = send(&broker, "celeriac.add", "[20, 22]", queue);
    wait_task(port, &id, "succeeded after the outage", |t| t["result"] == json!("42"));

    // One line when the broker went away, one when it is back (and one at start); none of
    // lapin's own lines for each failed try.
    assert_eq!(dash.count("the broker went away"), 1, "{}", dash.dump());
    assert_eq!(dash.count("the dashboard reads the broker"), 2, "{}", dash.dump());
    assert!(dash.matching("ERROR").is_empty() && dash.matching("lapin").is_empty(), "{}", dash.dump());
}

#[test]
fn bad_input_is_answered_with_the_reason_and_every_answer_carries_the_security_headers() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = results();
    let name = node("badinput");
    let queue = "dash.badinput";
    let _w = WorkerProc::start(&broker, &["--result-backend", &results, "-E", "-n", &name, "-Q", queue]);
    let (_dash, port) = dashboard(&broker, queue, Some(TOKEN));
    wait_worker(port, &name, "online", |w| w["online"] == json!(true));
    let origin = format!("http://127.0.0.1:{port}");
    let with_token = [("X-Celeriac-Token", TOKEN), ("Origin", origin.as_str())];

    // A pool change for a worker nobody has seen: 404 naming it (was a 200 with no replies).
    let (status, body) = http(port, "POST", "/api/workers/nosuch@nowhere/pool", &with_token, r#"{"grow": 1}"#);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no worker nosuch@nowhere") && body.contains(&name), "{body}");
    let rate = r#"{"task_name": "celeriac.add", "rate_limit": "1/s", "worker": "nosuch@nowhere"}"#;
    let (status, body) = http(port, "POST", "/api/rate_limit", &with_token, rate);
    assert_eq!(status, 404, "{body}");
    // A state that does not exist: 400 naming the states there are (was an empty list).
    let (status, body) = get_json(port, "/api/tasks?state=BOGUS");
    assert_eq!(status, 400, "{body}");
    let why = body["error"].as_str().unwrap_or_default();
    assert!(why.contains("BOGUS") && why.contains("SUCCESS") && why.contains("REVOKED"), "{body}");
    // Purging a queue the broker does not have: 404 naming it (was a raw 502).
    let (status, body) = http(port, "POST", "/api/queues/no.such.queue/purge", &with_token, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no queue no.such.queue"), "{body}");
    // A huge limit is capped, and the answer says at what.
    let (status, body) = get_json(port, "/api/tasks?limit=100000000");
    assert_eq!((status, &body["limit"]), (200, &json!(1000)), "{body}");

    // Every answer, page, script, JSON, error or refusal, carries the security headers.
    for (method, path, headers) in [
        ("GET", "/", &[][..]),
        ("GET", "/app.js", &[][..]),
        ("GET", "/api/overview", &[][..]),
        ("GET", "/task/no-such-task", &[][..]),
        ("GET", "/api/tasks?state=BOGUS", &[][..]),
        ("POST", "/api/queues/x/purge", &[("X-Celeriac-Token", "wrong")][..]),
    ] {
        let (status, head, _) = http_full(port, method, path, headers, "");
        assert!(status > 0, "{path}");
        for line in [
            "content-security-policy: default-src 'self'; script-src 'self'",
            "frame-ancestors 'none'",
            "x-frame-options: deny",
            "x-content-type-options: nosniff",
            "referrer-policy: no-referrer",
        ] {
            assert!(head.contains(line), "{method} {path}: no {line:?} in\n{head}");
        }
    }
}

#[test]
fn the_dashboard_on_an_sqlite_file_that_does_not_exist_is_refused_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    // Named with -b.
    let db = dir.path().join("nothere.db");
    let url = format!("sqlite://{}", db.display());
    let (code, _, err) = run_cli(&["dashboard", "-b", &url, "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no SQLite broker database at") && err.contains("nothere.db"), "{err}");
    assert!(!db.exists(), "the dashboard created {}", db.display());
    // The default broker (celeriac.db in the current directory) when no -b is given.
    let out = std::process::Command::new(common::bin())
        .args(["dashboard", "--listen", "127.0.0.1:0"])
        .env_remove("CELERIAC_BROKER_URL")
        .env_remove("CELERIAC_RESULT_BACKEND")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("celeriac.db"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a file was created in the current directory");
}

#[test]
fn a_results_file_no_worker_has_created_yet_does_not_stop_the_dashboard() {
    // A Redis broker with an SQLite results file that does not exist yet (no worker has run):
    // the dashboard starts (reading results once they are there), as before it read files
    // read-only.
    let dir = tempfile::tempdir().unwrap();
    let results_url = format!("sqlite://{}", dir.path().join("results.db").display());
    let listen = format!("127.0.0.1:{}", free_port());
    let broker = results();
    let d = WorkerProc::spawn_cli(
        std::path::Path::new(common::bin()),
        &["dashboard", "--broker", &broker, "--result-backend", &results_url, "--listen", &listen],
    );
    d.wait_for_line("dashboard ready", Duration::from_secs(30));
}

/// The row of `queue` in `/api/queues`, once `cond` holds for it.
fn wait_queue(port: u16, queue: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    wait_listed(port, "/api/queues", "name", queue, what, cond)
}

#[test]
fn rabbitmq_queue_rows_count_what_workers_hold_and_rates_where_events_name_the_queue() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = results();
    let name = node("rates");
    let (queue, py_queue) = ("dash.rates", "dash.rates.py");
    let worker = WorkerProc::start(&broker, &["--result-backend", &results, "-E", "-c", "1", "-n", &name, "-Q", queue]);
    let _py = PyCeleryWorker::start(&broker, &results, py_queue);
    let (_dash, port) = dashboard(&broker, &format!("{queue},{py_queue}"), None);
    wait_worker(port, &name, "online", |w| w["online"] == json!(true));

    // Tasks taken from the queue: its rate out and in are known (celeriac's task-received
    // events name the queue), and above zero.
    let ids: Vec<String> = (0..5).map(|i| send(&broker, "celeriac.add", &format!("[{i}, 1]"), queue)).collect();
    for id in &ids {
        wait_task(port, id, "succeeded", |t| t["state"] == json!("SUCCESS"));
    }
    let row = wait_queue(port, queue, "with rates", |q| q["rate_out"].as_f64().is_some_and(|r| r > 0.0));
    assert!(row["rate_in"].as_f64().is_some_and(|r| r > 0.0), "{row}");
    // A queue a Python Celery worker consumes: its events name no queue, so its rates are
    // unknown (null), not 0.
    let py_row = wait_queue(port, py_queue, "with a consumer", |q| q["consumers"] == json!(1));
    assert_eq!((py_row.get("rate_out"), py_row.get("rate_in")), (Some(&Value::Null), Some(&Value::Null)), "{py_row}");

    // What the worker holds: a running task (acknowledged after it ends) and a countdown task
    // waiting for its ETA are unacked, the latter scheduled too (RabbitMQ's passive declare
    // counts neither: they were shown as 0).
    let running = send(&broker, "celeriac.sleep", "[20]", queue);
    wait_task(port, &running, "started", |t| t["state"] == json!("STARTED"));
    let held = common::py_client_on(
        &broker,
        &results,
        &["send", "celeriac.echo", "--args", r#"["x"]"#, "--queue", queue, "--countdown", "60"],
    );
    worker.wait_for_line("holding until ETA", Duration::from_secs(20));
    let row = wait_queue(port, queue, "with 2 unacked, 1 scheduled", |q| {
        q["unacked"] == json!(2) && q["scheduled"] == json!(1)
    });
    assert_eq!(row["ready"], json!(0), "{row} (held: {held})");
}

/// A RabbitMQ vhost of its own, its URL, a node name and the queue `dash.<tag>`.
fn on_a_vhost(tag: &str) -> (TestVhost, String, String, String) {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    (vhost, broker, node(tag), format!("dash.{tag}"))
}

/// ids that say what they are, unique to this run.
fn ids(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}-{}-{}", std::process::id(), common::free_port())).collect()
}

/// chain(add(1, 1), add(2), add(3)) and chord([add(1, 1), add(2, 2)], tsum) sent by celeriac's
/// client with known ids; (chain ids, chord header ids, chord body id).
fn send_chain_and_chord(broker: &str, queue: &str) -> (Vec<String>, Vec<String>, String) {
    use celeriac::canvas::{chain, chord};
    use celeriac::Signature;
    let (steps, header, body) = (ids("step", 3), ids("head", 2), ids("body", 1).remove(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = celeriac::Client::connect(broker, Some(&results())).await.unwrap();
        let add = |args: &[i64], id: &str| {
            args.iter().fold(Signature::new("celeriac.add"), |s, a| s.arg(*a)).queue(queue).task_id(id)
        };
        chain([add(&[1, 1], &steps[0]), add(&[2], &steps[1]), add(&[3], &steps[2])])
            .apply_async(&client)
            .await
            .unwrap();
        let heads = [add(&[1, 1], &header[0]), add(&[2, 2], &header[1])];
        chord(heads, Signature::new("celeriac.tsum").queue(queue).task_id(&body)).apply_async(&client).await.unwrap();
    });
    (steps, header, body)
}

/// The edges of a task's graph as (from, to, kind).
fn edges(t: &Value) -> Vec<(String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    t["graph"]["edges"].as_array().into_iter().flatten().map(|e| (s(&e["from"]), s(&e["to"]), s(&e["kind"]))).collect()
}

#[test]
fn a_chain_and_a_chord_run_on_a_celeriac_worker_show_their_membership_and_links() {
    let (_vhost, broker, name, queue) = on_a_vhost("flow");
    let queue = queue.as_str();
    let _w = WorkerProc::start(&broker, &["--result-backend", &results(), "-E", "-n", &name, "-Q", queue]);
    let (_dash, port) = dashboard(&broker, queue, None);
    wait_worker(port, &name, "online", |w| w["online"] == json!(true));
    let (steps, header, body) = send_chain_and_chord(&broker, queue);

    // The chain: each step names the steps after it; the graph links them in order.
    let first = wait_task(port, &steps[0], "succeeded", |t| t["state"] == json!("SUCCESS"));
    let chain: Vec<&str> = first["chain"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(chain, [steps[1].as_str(), steps[2].as_str()], "the next steps, next first: {first}");
    assert_eq!(first["chain"][0]["name"], json!("celeriac.add"), "{first}");
    let last = wait_task(port, &steps[2], "succeeded", |t| t["result"] == json!("7"));
    assert_eq!(last["parent_id"].as_str(), Some(steps[1].as_str()), "{last}");
    let middle =
        wait_task(port, &steps[1], "with its graph", |t| t["graph"]["nodes"].as_array().is_some_and(|n| n.len() == 3));
    let e = edges(&middle);
    for (from, to) in [(&steps[0], &steps[1]), (&steps[1], &steps[2])] {
        assert!(e.contains(&(from.clone(), to.clone(), "chain".into())), "{from} -> {to} in {e:?}");
    }
    assert_eq!(middle["child_ids"], json!([steps[2]]), "{middle}");

    // The chord: each header task is in the group and names the body; the body ran.
    let done = wait_task(port, &body, "succeeded", |t| t["result"] == json!("6"));
    assert_eq!(done["name"], json!("celeriac.tsum"), "{done}");
    let head = wait_task(port, &header[0], "with both header tasks in its group", |t| {
        t["graph"]["groups"][0]["members"].as_array().is_some_and(|m| m.len() == 2)
    });
    assert_eq!(head["chord"], json!({"id": body, "name": "celeriac.tsum"}), "{head}");
    assert!(head["group"].is_string() && head["group_index"] == json!(0), "{head}");
    assert_eq!(head["graph"]["groups"][0]["chord"]["id"], json!(body), "{head}");
    let e = edges(&head);
    for h in &header {
        assert!(e.contains(&(h.clone(), body.clone(), "chord".into())), "{h} -> body in {e:?}");
    }
    let body_node = head["graph"]["nodes"].as_array().unwrap().iter().find(|n| n["id"] == json!(body)).cloned();
    assert_eq!(body_node.map(|n| n["state"].clone()), Some(json!("SUCCESS")), "{head}");
}

#[test]
fn a_task_a_celery_worker_retried_is_not_its_own_parent_and_its_success_shows_no_retry_traceback_as_its_own() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let queue = "dash.retry";
    let _celery = common::pyapp::CeleryWorker::start_with(&broker, &results(), queue, &["-E"]);
    let (_dash, port) = dashboard(&broker, queue, None);
    let env = common::pyapp::app_env(&broker, &results(), queue);
    let out = std::process::Command::new(common::venv_python())
        .arg(common::pyapp::pyapp_dir().join("send.py"))
        .args([queue, "retry_twice", "[4]"])
        .envs(env)
        .output()
        .expect("send.py");
    let sent: Vec<String> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("send.py: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let id = &sent[0];
    // Celery's retry sends the task again with the same id and, as it had no parent, itself as
    // the parent (`celery/app/task.py` `retry` → `signature_from_request` → `send_task`).
    // The second task-retried comes from the worker's main process and may come after the
    // success: wait for both.
    let t = wait_task(port, id, "succeeded after two retries", |t| {
        t["result"] == json!("40") && t["retry_number"] == json!(2)
    });
    assert_eq!(t["retries"], json!(2), "{t}");
    assert!(t["parent_id"].is_null(), "not its own parent: {t}");
    assert_eq!(t["child_ids"], json!([]), "not its own child: {t}");
    assert_eq!(t["graph"]["edges"], json!([]), "{t}");
    // The success has no traceback; the one that asked for the last retry is labelled as such.
    assert!(t["traceback"].is_null() && t["exception"].is_null(), "{t}");
    assert!(t["retry_exception"].as_str().is_some_and(|e| e.contains("not yet 1")), "{t}");
    assert_eq!(t["retry_number"], json!(2), "{t}");
    assert_eq!(t["graph"]["nodes"][0]["state"], json!("SUCCESS"), "a late task-retried does not undo the end: {t}");
}

/// Standard base64 (a WebDriver screenshot) to bytes.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A headless Chromium session through `chromedriver` (W3C WebDriver over HTTP).
struct Browser {
    driver: std::process::Child,
    port: u16,
    session: String,
}

impl Browser {
    fn start() -> Self {
        let port = free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/test.sh installs it)");
        let mut b = Browser { driver, port, session: String::new() };
        wait_until("chromedriver to answer", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                && b.call("GET", "/status", Value::Null)["ready"] == json!(true)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
        }}}});
        let created = b.call("POST", "/session", caps);
        b.session = created["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        b
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let (_, answer) = http(self.port, method, path, &[("Content-Type", "application/json")], &body);
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("chromedriver {path}: {e}: {answer}"));
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn go(&self, url: &str) {
        self.session_call("POST", "/url", json!({"url": url}));
    }

    /// Run `script` in the page; what it returns.
    fn js(&self, script: &str) -> Value {
        self.session_call("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    /// The page's visible text.
    fn text(&self) -> String {
        self.js("return document.body.innerText;").as_str().unwrap_or("").to_string()
    }

    /// Wait until `script` returns true; the page's text is shown on timeout.
    fn wait(&self, what: &str, script: &str) {
        let mut ok = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if self.js(script) == json!(true) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(ok, "the page did not show {what} within 30 s; it shows:\n{}", self.text());
    }

    /// The WebDriver id of the element `css`.
    fn element(&self, css: &str) -> String {
        let found = self.session_call("POST", "/element", json!({"using": "css selector", "value": css}));
        let id = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str);
        id.unwrap_or_else(|| panic!("no {css}: {found}")).to_string()
    }

    fn click(&self, css: &str) {
        self.on_element(css, "click", json!({}));
    }

    /// Type `text` into the element `css` as a user would (key by key, the focus staying there).
    fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "value", json!({"text": text}));
    }

    /// Do `what` (`click`, `value`) to the element `css`. The page rebuilds its view when what
    /// it shows changes (a hung task's time, each 5 s): an element found just before is then
    /// stale and nothing reached the page, so the new one is found and the input given again,
    /// as a user whose click fell between two renders clicks again. Any other error fails.
    fn on_element(&self, css: &str, what: &str, body: Value) {
        for _ in 0..10 {
            let answer = self.session_call("POST", &format!("/element/{}/{what}", self.element(css)), body.clone());
            match answer.get("error").and_then(Value::as_str) {
                None => return,
                Some("stale element reference") => continue,
                Some(_) => panic!("{what} on {css}: {answer}"),
            }
        }
        panic!("{what} on {css}: the element was replaced under every try");
    }

    /// A picture of the page once its header says it reads the broker.
    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        self.wait("connected", "return document.getElementById('status')?.textContent === 'connected';");
        let png = base64_decode(self.session_call("GET", "/screenshot", Value::Null).as_str().expect("screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = common::repo().join("target/dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), Value::Null);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn in_a_real_browser_both_workers_a_result_a_blocked_task_and_its_revoke_show() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let results = results();
    let name = node("browser");
    let queue = "dash.browser";
    let _w = prefork_worker(&broker, &name, queue);
    let _py = PyCeleryWorker::start(&broker, &results, "dash.browserpy");
    let py_name = format!("py-dash.browserpy-{}@{}", std::process::id(), hostname());
    let (_dash, port) = dashboard(&broker, queue, Some(TOKEN));
    let base = format!("http://127.0.0.1:{port}/");
    let b = Browser::start();
    // Confirmations are answered yes, as a user clicking OK.
    let page = |route: &str| {
        b.go(&format!("{base}#/{route}"));
        b.js("window.confirm = () => true; return true;");
    };

    page("workers");
    b.wait(
        "both workers online",
        &format!(
            "const t = document.body.innerText; return t.includes({n}) && t.includes({p}) && \
         document.querySelectorAll('tr.worker td.online').length >= 2;",
            n = json!(name),
            p = json!(py_name)
        ),
    );

    let id = send(&broker, "celeriac.add", "[2, 3]", queue);
    page(&format!("task/{id}"));
    b.wait(
        "the task's result",
        "return document.getElementById('task-state')?.textContent === 'SUCCESS' \
        && document.getElementById('task-result')?.textContent === '5';",
    );
    page("tasks");
    b.wait("the task in the list", &format!("return !!document.querySelector('tr.task[data-id={}]');", json!(id)));
    b.wait(
        "its run time in ms or µs",
        &format!(
            "return /\\d (ms|µs)$/.test(document.querySelector('tr.task[data-id={}] td.runtime').textContent);",
            json!(id)
        ),
    );
    b.screenshot("tasks.png");
    // A filter applies as it is typed, the field keeping the focus (no change event, no blur).
    b.type_into("#filter-worker", "no-such-worker");
    b.wait(
        "the list filtered while typing",
        "return document.getElementById('task-count')?.textContent.startsWith('showing 0 of 0') \
         && document.activeElement.id === 'filter-worker' && !document.querySelector('tr.task');",
    );
    b.js("document.getElementById('filter-worker').value = ''; return true;");
    b.type_into("#filter-worker", "browser");
    b.wait("the list back", &format!("return !!document.querySelector('tr.task[data-id={}]');", json!(id)));

    // More than a page: 200 shown with the count, the next ones a click away.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = celeriac::Client::connect(&broker, Some(&results)).await.unwrap();
        for _ in 0..210 {
            let options = celeriac::client::SendOptions { queue: Some(queue.to_string()), ..Default::default() };
            client.send_task("celeriac.noop", vec![], Default::default(), options).await.unwrap();
        }
    });
    b.wait(
        "the first page of 200",
        "return /^showing 1–200 of (\\d+) matching/.test(document.getElementById('task-count')?.textContent) \
         && Number(document.getElementById('task-count').textContent.match(/of (\\d+)/)[1]) >= 211 \
         && document.querySelectorAll('tr.task').length === 200 && !!document.getElementById('page-older');",
    );
    b.click("#page-older");
    b.wait(
        "the second page",
        "return /^showing 201–/.test(document.getElementById('task-count')?.textContent) \
         && !!document.getElementById('page-newer') && document.querySelectorAll('tr.task').length >= 11;",
    );

    // A chord header's page draws the workflow: the group box, an edge to the body per header task.
    let (_steps, header, body) = send_chain_and_chord(&broker, queue);
    page(&format!("task/{}", header[0]));
    b.wait(
        "the chord's graph",
        &format!(
            "return document.querySelectorAll('#workflow-graph g.group-box').length === 1 \
             && document.querySelectorAll('#workflow-graph path.edge-chord').length === 2 \
             && document.querySelector('#workflow-graph g.node-box[data-id={b}]')?.dataset.state === 'SUCCESS' \
             && document.getElementById('task-chord')?.textContent.includes({b});",
            b = json!(body)
        ),
    );
    b.screenshot("workflow.png");

    // The charts: every minute of the hour as a bar pair, labelled axes, percentiles, queue depth.
    page("charts");
    b.wait(
        "the charts",
        &format!(
            "const t = document.getElementById('chart-throughput'); return !!t \
             && t.querySelectorAll('rect.bar').length === 120 \
             && t.textContent.includes('tasks / min') && t.textContent.includes('time (UTC), last hour') \
             && document.querySelectorAll('#chart-runtime path.series').length >= 1 \
             && !!document.getElementById({d}) \
             && [...document.querySelectorAll('tr.runtime-row')].some(r => r.textContent.includes('celeriac.add'));",
            d = json!(format!("chart-depth-{queue}"))
        ),
    );
    b.screenshot("charts.png");

    let hung = send(&broker, "celeriac.hang", "[]", queue);
    page("workers");
    b.wait(
        "the child blocked in a futex wait",
        &format!(
            "return [...document.querySelectorAll('tr.child.blocked')].some(r => r.innerText.includes({h}) && \
         /blocked on: S \\(sleeping\\) in \\S*futex\\S*, syscall futex/.test(r.innerText));",
            h = json!(hung)
        ),
    );
    // A Celery worker's figures are its peak RSS; what its stats do not give says so.
    b.wait(
        "the Python worker's peak RSS and its child's RSS not reported",
        "const t = document.body.innerText; return /peak \\d+ MiB/.test(t) && t.includes('RSS not reported');",
    );
    b.screenshot("workers.png");
    // The hung task is highlighted in the list once it has slept in its futex for 5 s.
    page("tasks");
    b.wait(
        "the hung task highlighted",
        &format!("return !!document.querySelector('tr.task.hung[data-id={}]');", json!(hung)),
    );

    // Without the token, Terminate is refused and the task keeps running.
    page(&format!("task/{hung}"));
    b.wait("the hung task started", "return document.getElementById('task-state')?.textContent === 'STARTED';");
    b.js("document.getElementById('token').value = ''; return true;");
    b.click("#terminate");
    b.wait(
        "the refusal",
        "return (document.getElementById('action-result')?.textContent || '').startsWith('refused (403)');",
    );
    assert!(b.text().contains("STARTED"), "{}", b.text());

    // With it, the child is terminated and the page shows REVOKED.
    b.js(&format!("document.getElementById('token').value = {}; return true;", json!(TOKEN)));
    b.click("#terminate");
    b.wait("REVOKED", "return document.getElementById('task-state')?.textContent === 'REVOKED';");
    b.wait(
        "the workers' answer",
        "return (document.getElementById('action-result')?.textContent || '').startsWith('done');",
    );
    b.screenshot("task.png");

    page("queues");
    b.wait(
        "the queue with its consumer",
        &format!(
            "return [...document.querySelectorAll('tr.queue')].some(r => r.innerText.includes({q})) && \
         document.body.innerText.includes('Dead letters');",
            q = json!(queue)
        ),
    );
    b.screenshot("queues.png");

    // The three pages are real pictures, not blank ones.
    for shot in ["workers.png", "tasks.png", "task.png", "charts.png", "workflow.png"] {
        let size = std::fs::metadata(common::repo().join("target/dashboard-screenshots").join(shot)).unwrap().len();
        assert!(size > 10_000, "{shot}: {size} bytes");
    }
}

#[test]
fn with_the_token_retry_resends_a_failed_task_and_pool_rate_limit_and_purge_act() {
    let vhost = TestVhost::new();
    let broker = vhost.url("");
    let name = node("actions");
    let queue = "dash.actions";
    let _w = prefork_worker(&broker, &name, queue);
    let (_dash, port) = dashboard(&broker, queue, Some(TOKEN));
    let post = |path: &str, body: &str| http(port, "POST", path, &[("X-Celeriac-Token", TOKEN)], body);

    // A failure shows its exception and traceback; retry sends it again with the same arguments.
    let id = send(&broker, "celeriac.fail", r#"["boom <b>"]"#, queue);
    // (Retry needs its name and arguments, which only its events give.)
    let t = wait_task(port, &id, "failed, its name and arguments seen", |t| {
        t["state"] == json!("FAILURE") && t["exception"].is_string() && t["name"].is_string() && t["args"].is_string()
    });
    assert!(t["exception"].as_str().is_some_and(|e| e.contains("boom <b>")), "{t}");
    assert!(t["traceback"].as_str().is_some_and(|tb| tb.contains("RuntimeError")), "{t}");
    // Its queue is the one its worker consumes (task events do not name it).
    wait_worker(port, &name, "consuming its queue", |w| w["queues"] == json!([queue]));
    let (status, answer) = post(&format!("/api/tasks/{id}/retry"), "");
    assert_eq!(status, 200, "{answer}");
    let again: Value = serde_json::from_str(&answer).unwrap();
    let new_id = again["task_id"].as_str().expect("the new task's id").to_string();
    assert_ne!(new_id, id);
    // Listed at once with what was sent, before any event of the worker's about it.
    let (status, t) = get_json(port, &format!("/api/tasks/{new_id}"));
    assert_eq!(status, 200, "{t}");
    assert_eq!((t["name"].as_str(), t["args"].as_str()), (Some("celeriac.fail"), Some("['boom <b>']")), "{t}");
    // Its failure is known from its events or, if they were lost, from its stored result.
    let t = wait_task(port, &new_id, "run again", |t| t["state"] == json!("FAILURE") && t["exception"].is_string());
    assert_eq!((t["name"].as_str(), t["args"].as_str()), (Some("celeriac.fail"), Some("['boom <b>']")), "{t}");
    let (status, answer) = post("/api/tasks/no-such-task/retry", "");
    assert_eq!(status, 404, "{answer}");

    // Pool grow and shrink, seen in the worker's stats.
    let node_path = format!("/api/workers/{}/pool", name.replace('@', "%40"));
    let (status, answer) = post(&node_path, r#"{"grow": 1}"#);
    assert_eq!(status, 200, "{answer}");
    wait_worker(port, &name, "with 2 slots", |w| {
        w["concurrency"] == json!(2) && w["children"].as_array().is_some_and(|c| c.len() == 2)
    });
    let (status, answer) = post(&node_path, r#"{"shrink": 1}"#);
    assert_eq!(status, 200, "{answer}");
    wait_worker(port, &name, "back to 1 slot", |w| w["concurrency"] == json!(1));
    let (status, answer) = post(&node_path, r#"{"grow": "lots"}"#);
    assert_eq!(status, 400, "{answer}");

    let (status, answer) = post("/api/rate_limit", r#"{"task_name": " ", "rate_limit": "10/m"}"#);
    assert_eq!(status, 400, "a rate limit for no task: {answer}");
    let (status, answer) = post("/api/rate_limit", r#"{"task_name": "celeriac.add", "rate_limit": "abc"}"#);
    assert_eq!(status, 400, "a rate limit that is not one is refused before the broadcast: {answer}");

    // A rate limit, answered by the worker.
    let (status, answer) = post("/api/rate_limit", r#"{"task_name": "celeriac.add", "rate_limit": "10/m"}"#);
    assert_eq!(status, 200, "{answer}");
    let replies: Value = serde_json::from_str(&answer).unwrap();
    assert!(replies["replies"][&name]["ok"].is_string(), "{answer}");

    // Purge a queue nobody consumes.
    for _ in 0..3 {
        send(&broker, "celeriac.noop", "[]", "dash.idle");
    }
    let (status, answer) = post("/api/queues/dash.idle/purge", "");
    assert_eq!((status, answer.as_str()), (200, r#"{"purged":3}"#));
}

#[test]
fn on_redis_workers_tasks_and_the_task_queues_show() {
    let broker = results();
    let name = node("redis");
    let queue = format!("dash.redis.{}", std::process::id());
    let _w = WorkerProc::start(&broker, &["--result-backend", &broker, "-E", "-n", &name, "-Q", &queue]);
    let (_dash, port) = dashboard(&broker, &queue, Some(TOKEN));
    wait_worker(port, &name, "online", |w| w["online"] == json!(true) && w["pool"] == json!("celeriac:async"));
    let id = send(&broker, "celeriac.add", "[1, 2]", &queue);
    wait_task(port, &id, "succeeded", |t| t["result"] == json!("3"));
    // Redis lists its queues: the task queue, not those of remote control and events.
    let mut names = Vec::new();
    wait_until("the queue listed", Duration::from_secs(10), || {
        let (_, queues) = get_json(port, "/api/queues");
        names = queues.as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap_or("").to_string()).collect();
        names.contains(&queue)
    });
    assert!(names.iter().all(|n| !n.starts_with("celeryev.") && !n.ends_with(".celery.pidbox")), "{names:?}");
    // Purging a queue Redis does not have is a 404 naming it, not "0 purged".
    let origin = format!("http://127.0.0.1:{port}");
    let with_token = [("X-Celeriac-Token", TOKEN), ("Origin", origin.as_str())];
    let (status, body) = http(port, "POST", "/api/queues/no.such.queue/purge", &with_token, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no queue no.such.queue") && body.contains(&queue), "{body}");

    // A message without a task id is dead-lettered; the dashboard lists it with the reason.
    let envelope = json!({
        "body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"task": "celeriac.add"},
        "properties": {"body_encoding": "base64", "delivery_tag": "dash-dead-1", "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    });
    SharedRedisDb::get(DB).cli(&["LPUSH", &queue, &envelope.to_string()]);
    let mut dead = Value::Null;
    wait_until("the dead letter listed", Duration::from_secs(15), || {
        dead = get_json(port, "/api/dead_letters").1;
        dead["dead_letters"].as_array().is_some_and(|d| d.iter().any(|l| l["queue"] == json!(queue)))
    });
    let letter = dead["dead_letters"].as_array().unwrap().iter().find(|l| l["queue"] == json!(queue)).unwrap();
    assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()), "{dead}");
}

/// Send `name` with `args` (a JSON list) and `extra` options to the SQLite broker at `url`; its id.
fn send_sqlite(url: &str, name: &str, args: &str, extra: &[&str]) -> String {
    let mut argv = vec!["send", name, "--args", args, "--broker", url];
    argv.extend_from_slice(extra);
    let (code, out, err) = run_cli(&argv, &[]);
    assert_eq!(code, 0, "send: {out}{err}");
    out.trim().lines().last().expect("a task id").to_string()
}

/// `celeriac dashboard` on the SQLite broker at `url` (results in the same file), with `token`.
fn sqlite_dashboard(url: &str, token: Option<&str>) -> (WorkerProc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["dashboard", "--broker", url, "--listen", &listen];
    if let Some(t) = token {
        args.extend_from_slice(&["--auth-token", t]);
    }
    let d = WorkerProc::spawn_cli(std::path::Path::new(common::bin()), &args);
    d.wait_for_line("dashboard ready", Duration::from_secs(30));
    (d, port)
}

#[test]
fn on_sqlite_a_revoke_is_recorded_terminate_refused_a_bad_rate_limit_is_400_and_purge_keeps_countdown_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("dash.db").display());
    let doomed = send_sqlite(&url, "celeriac.noop", "[]", &[]);
    let later = send_sqlite(&url, "celeriac.noop", "[]", &["--countdown", "3600"]);
    let (dash, port) = sqlite_dashboard(&url, Some(TOKEN));
    let post = |path: &str, body: &str| http(port, "POST", path, &[("X-Celeriac-Token", TOKEN)], body);

    // Terminate cannot reach a worker without remote control: refused before anything is recorded.
    let (status, answer) = post(&format!("/api/tasks/{doomed}/revoke"), r#"{"terminate": true}"#);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("terminate needs remote control"), "{answer}");
    // A plain revoke is recorded in the result backend, and said so (was a 502 after recording it).
    let (status, answer) = post(&format!("/api/tasks/{doomed}/revoke"), "");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("recorded in the result backend"), "{answer}");
    dash.wait_for_line("revoke recorded in the result backend", Duration::from_secs(20));

    // A bad rate limit is a 400 naming it, before any broadcast (was 502: no remote control).
    let (status, answer) = post("/api/rate_limit", r#"{"task_name": "celeriac.noop", "rate_limit": "abc"}"#);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid rate limit") && answer.contains("abc"), "{answer}");
    // The log line names the target and the outcome.
    dash.wait_for_line("rate limit refused", Duration::from_secs(20));
    let line = dash.matching("rate limit refused").join("\n");
    assert!(line.contains("celeriac.noop") && line.contains("abc") && line.contains("status=400"), "{line}");

    // A worker started now learns the revoke from the file and discards the task as REVOKED.
    {
        let _w = WorkerProc::start(&url, &["-c", "1"]);
        wait_until(&format!("{doomed} stored REVOKED"), Duration::from_secs(30), || {
            run_cli(&["result", &doomed, "--json", "--broker", &url], &[]).1.contains("REVOKED")
        });
    }

    // Purge removes ready messages only: the countdown task stays, as RabbitMQ's queue.purge leaves
    // what a worker holds until its ETA.
    let ready = send_sqlite(&url, "celeriac.noop", "[]", &[]);
    let (status, answer) = post("/api/queues/celery/purge", "");
    assert_eq!((status, answer.as_str()), (200, r#"{"purged":1}"#), "{ready} {later}");
    // Each action's line names its target and outcome.
    dash.wait_for_line("path=/api/queues/celery/purge status=200", Duration::from_secs(20));
    let (status, _) = post("/api/queues/no.such.queue/purge", "");
    assert_eq!(status, 404);
    dash.wait_for_line("refused path=/api/queues/no.such.queue/purge status=404", Duration::from_secs(20));
    let (code, out, err) = run_cli(&["queues", "--json", "--broker", &url], &[]);
    assert_eq!(code, 0, "{err}");
    let q: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((q[0]["ready"].as_u64(), q[0]["scheduled"].as_u64()), (Some(0), Some(1)), "{out}");
}

/// The SQLite file at `path` as it is: (what, bytes, modified) of the database and of its
/// write-ahead log's frames. A reader of a WAL database creates the log, empty, when there is
/// none (and writes the `-shm` index, left out): an absent log and an empty one are the same.
type FileState = Vec<(String, Vec<u8>, Option<std::time::SystemTime>)>;

fn file_state(path: &std::path::Path) -> FileState {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let wal = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
    vec![
        ("the database".into(), std::fs::read(path).expect("the database file"), modified),
        ("the write-ahead log".into(), wal, None),
    ]
}

#[test]
fn on_sqlite_the_dashboard_never_writes_the_file_until_an_action_asks_it_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.db");
    let url = format!("sqlite://{}", path.display());
    // A finished task (its worker gone), a ready one and a countdown one.
    let done = send_sqlite(&url, "celeriac.add", "[2, 3]", &[]);
    {
        let mut w = WorkerProc::start(&url, &["-c", "1"]);
        wait_until(&format!("{done} to succeed"), Duration::from_secs(30), || {
            run_cli(&["result", &done, "--json", "--broker", &url], &[]).1.contains("SUCCESS")
        });
        w.signal("TERM");
        assert!(w.wait_exit(Duration::from_secs(30)).success(), "{}", w.dump());
    }
    send_sqlite(&url, "celeriac.noop", "[]", &[]);
    send_sqlite(&url, "celeriac.noop", "[]", &["--countdown", "3600"]);
    // As a file an older celeriac made: a table today's schema has is missing (opening the file
    // for writing would add it).
    let dropped = std::process::Command::new("python3")
        .args(["-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE beat_runs'); c.commit(); c.close()"])
        .arg(&path)
        .status()
        .expect("python3");
    assert!(dropped.success());
    let before = file_state(&path);

    let (dash, port) = sqlite_dashboard(&url, Some(TOKEN));
    // Every read it makes: the file's rows, queue depths (three polls), a stored result, the dead
    // letters.
    let t = wait_task(port, &done, "read from the file", |t| t["state"] == json!("SUCCESS") && t["result"].is_string());
    assert_eq!(t["stored"]["status"], json!("SUCCESS"), "{t}");
    wait_until("three polls of the queue's depth", Duration::from_secs(60), || {
        get_json(port, "/api/charts").1["depths"]["celery"].as_array().is_some_and(|d| d.len() >= 3)
    });
    let (status, dead) = get_json(port, "/api/dead_letters");
    assert_eq!(status, 200, "{dead}");
    let after = file_state(&path);
    for (was, now) in before.iter().zip(&after) {
        assert!(
            was == now,
            "the dashboard wrote {} while only reading it: {} bytes modified {:?}, now {} bytes modified {:?}\n{}",
            was.0,
            was.1.len(),
            was.2,
            now.1.len(),
            now.2,
            dash.dump()
        );
    }

    // An action asked for writes it.
    let (status, answer) = http(port, "POST", "/api/queues/celery/purge", &[("X-Celeriac-Token", TOKEN)], "");
    assert_eq!((status, answer.as_str()), (200, r#"{"purged":1}"#));
    assert!(file_state(&path) != before, "a purge changes the file");
}

#[test]
fn on_sqlite_the_file_shows_a_finished_and_a_running_task_and_the_consumer_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
    let _w = WorkerProc::start(&url, &["-c", "2"]);
    let done = send_sqlite(&url, "celeriac.add", "[2, 3]", &[]);
    let failed = send_sqlite(&url, "celeriac.fail", r#"["no"]"#, &[]);
    let running = send_sqlite(&url, "celeriac.hang", "[]", &[]);
    let (dash, port) = sqlite_dashboard(&url, None);

    // Read from the file: the results table and the messages table (held by the worker).
    // (A task not read yet is answered from the result backend: its state, result, exception
    // and traceback; the file's rows give the rest.)
    let t = wait_task(port, &done, "read from the file", |t| t["state"] == json!("SUCCESS") && t["result"].is_string());
    assert_eq!(t["result"], json!("5"), "{t}");
    let t = wait_task(port, &failed, "failed", |t| t["state"] == json!("FAILURE") && t["exception"].is_string());
    assert!(t["exception"].as_str().is_some_and(|e| e.contains("no")), "{t}");
    assert!(t["traceback"].is_string(), "{t}");
    let t = wait_task(port, &running, "held by the worker", |t| t["state"] == json!("RECEIVED"));
    assert_eq!(t["name"], json!("celeriac.hang"), "{t}");
    let held_by = t["worker"].as_str().expect("the consumer holding it").to_string();
    assert!(held_by.starts_with("consumer "), "{t}");
    let (_, list) = get_json(port, "/api/tasks");
    assert!(list["matched"].as_u64().is_some_and(|n| n >= 3), "{list}");

    // What the file tells of workers, and what it cannot.
    let (status, file) = get_json(port, "/api/file");
    assert_eq!(status, 200);
    assert!(file["note"].as_str().is_some_and(|n| n.contains("idle workers are not listed")), "{file}");
    assert_eq!(file["consumers"][0]["consumer"], json!(held_by), "{file}");
    assert!(file["consumers"][0]["holding"].as_u64().is_some_and(|n| n >= 1), "{file}");
    // Read, never written: the dashboard's own rows are not created.
    assert_eq!(dash.count("skipped"), 0, "{}", dash.dump());
}

#[test]
fn in_a_real_browser_enter_opens_the_one_match_a_refused_filter_shows_why_and_each_action_replaces_the_last_answer() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("page.db").display());
    let _w = WorkerProc::start(&url, &["-c", "2"]);
    let failed = send_sqlite(&url, "celeriac.fail", r#"["no"]"#, &[]);
    for i in 0..2 {
        send_sqlite(&url, "celeriac.add", &format!("[{i}, 1]"), &[]);
    }
    let (_dash, port) = sqlite_dashboard(&url, Some(TOKEN));
    wait_task(port, &failed, "failed", |t| t["state"] == json!("FAILURE"));

    let b = Browser::start();
    b.go(&format!("http://127.0.0.1:{port}/#/tasks"));
    b.js("window.confirm = () => true; return true;");
    b.wait("the three tasks", "return document.querySelectorAll('tr.task').length === 3;");
    b.wait(
        "what SQLite cannot show",
        "return (document.getElementById('file-note')?.textContent || '').includes('SQLite');",
    );
    // Tasks finished before the dashboard's first look are known by their (not extended) results
    // only, without a name: "—", not an empty cell.
    b.wait(
        "a task whose name is not known",
        "return [...document.querySelectorAll('tr.task td:nth-child(2)')].some((td) => td.textContent === '—');",
    );

    // An unknown state: the server's 400 is shown, not the previous results.
    b.type_into("#filter-state", "BOGUS");
    b.wait(
        "the refusal of the state",
        "return (document.getElementById('filter-error')?.textContent || '').startsWith('refused (400)') \
         && document.querySelectorAll('tr.task').length === 0;",
    );
    b.js("const i = document.getElementById('filter-state'); i.value = ''; i.dispatchEvent(new Event('input')); return true;");
    b.wait(
        "the list again",
        "return !document.getElementById('filter-error') && document.querySelectorAll('tr.task').length === 3;",
    );

    // Enter on a prefix only one task has opens that task (was '#/task/<prefix>', "unknown").
    b.type_into("#filter-id", &format!("{}\u{E007}", &failed[..8]));
    b.wait(
        "the task the prefix names",
        &format!("return location.hash === '#/task/{failed}' && document.getElementById('task-state')?.textContent === 'FAILURE';"),
    );

    // A refused action's answer is replaced by the next one's success.
    b.type_into("#token", TOKEN);
    b.click("#terminate");
    b.wait(
        "terminate refused",
        "return (document.getElementById('action-result')?.textContent || '').startsWith('refused (400)');",
    );
    b.click("#revoke");
    b.wait(
        "the revoke recorded, the refusal gone",
        "return (document.getElementById('action-result')?.textContent || '').startsWith('done: recorded in the result backend');",
    );

    // The rate-limit action shows its answer.
    b.go(&format!("http://127.0.0.1:{port}/#/queues"));
    b.wait("the queues page", "return !!document.getElementById('rate-task');");
    b.type_into("#rate-task", "celeriac.add");
    b.type_into("#rate-value", "abc");
    b.click("#set-rate");
    b.wait(
        "the rate limit refused",
        "return (document.getElementById('action-result')?.textContent || '').startsWith('refused (400): invalid rate limit');",
    );

    // An id no kept task has, nor any group: said so, beside "unknown".
    b.go(&format!("http://127.0.0.1:{port}/#/task/no-such-group"));
    b.wait(
        "what the id may be",
        "return (document.getElementById('group-members')?.textContent || '').includes('nor any task of a group');",
    );

    // The queue-depth chart's time axis is the other charts' hour: the same labels at the same places.
    b.go(&format!("http://127.0.0.1:{port}/#/charts"));
    b.wait("the depth chart", "return !!document.getElementById('chart-depth-celery');");
    let axis = "const axis = (id) => [...document.querySelectorAll('#' + id + ' text.tick')]\
        .filter((t) => t.textContent.includes(':')).map((t) => t.textContent + '@' + t.getAttribute('x')).join(' ');";
    let (depth, throughput) = (
        b.js(&format!("{axis} return axis('chart-depth-celery');")),
        b.js(&format!("{axis} return axis('chart-throughput');")),
    );
    assert!(depth.as_str().is_some_and(|d| d.contains(':')), "{depth}");
    assert_eq!(depth, throughput, "the depth chart spans another hour");

    // The header says why it is disconnected, as text: the file is gone.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dir.path().join("page.db").display()));
    }
    b.wait(
        "the reason of the disconnection",
        "return (document.getElementById('status')?.textContent || '').startsWith('disconnected: cannot read');",
    );
}
