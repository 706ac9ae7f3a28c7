//! Shared helpers for the integration tests: a fresh SQLite file per test, worker processes whose
//! log lines can be waited on, and waiting on conditions with deadlines (never bare sleeps).
#![allow(dead_code)]

pub mod pyapp;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celeriac::Client;

/// The `celeriac` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_celeriac")
}

/// A fresh SQLite database in its own temporary directory.
pub struct TempDb {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub url: String,
}

impl TempDb {
    /// A fresh database; `params` is appended to the URL (e.g. `visibility_timeout=2`).
    pub fn new(params: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("celeriac.db");
        let mut url = format!("sqlite://{}", path.display());
        if !params.is_empty() {
            url = format!("{url}?{params}");
        }
        TempDb { _dir: dir, path, url }
    }

    /// A client on this database.
    pub async fn client(&self) -> Client {
        Client::connect(&self.url, None).await.expect("client")
    }
}

/// Poll `cond` until it is true or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Async variant of [`wait_until`].
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A running `celeriac worker` process whose stderr lines are collected.
pub struct WorkerProc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl WorkerProc {
    /// Start `celeriac worker --broker URL <extra>` and wait until it reports ready.
    pub fn start(url: &str, extra: &[&str]) -> Self {
        let w = Self::spawn(url, extra);
        w.wait_for_line("worker ready", Duration::from_secs(30));
        w
    }

    /// Start `celeriac worker --broker URL <extra>` without waiting for it.
    pub fn spawn(url: &str, extra: &[&str]) -> Self {
        Self::spawn_program(Path::new(bin()), url, extra)
    }

    /// Start `<program> worker --broker URL <extra>` (a copy of the binary) without waiting for it.
    pub fn spawn_program(program: &Path, url: &str, extra: &[&str]) -> Self {
        let mut args = vec!["worker", "--broker", url];
        args.extend_from_slice(extra);
        Self::spawn_cli(program, &args)
    }

    /// Start `<program> <args>` (any long-running subcommand: `beat`, ...), collecting its stderr.
    pub fn spawn_cli(program: &Path, args: &[&str]) -> Self {
        Self::spawn_cli_env(program, args, &[])
    }

    /// [`spawn_cli`](Self::spawn_cli) with environment variables added.
    pub fn spawn_cli_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(Self::cli_command(program, args, env))
    }

    /// The command [`spawn_cli_env`](Self::spawn_cli_env) runs, to adjust before
    /// [`spawn_command`](Self::spawn_command) (e.g. a process group of its own).
    pub fn cli_command(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(program);
        // The ambient configuration is removed; what the test gives is kept.
        cmd.args(args)
            .env_remove("CELERIAC_BROKER_URL")
            .env_remove("CELERIAC_RESULT_BACKEND")
            .envs(env.iter().copied())
            .env("NO_COLOR", "1");
        cmd
    }

    /// Start `cmd`, its stdout discarded and its stderr lines collected.
    pub fn spawn_command(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        WorkerProc { child, lines }
    }

    /// Lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// All lines containing `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// Wait until a line containing `needle` appeared.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) {
        let lines = self.lines.clone();
        let pid = self.child.id();
        wait_until(&format!("worker {pid} to log {needle:?}; log so far:\n{}", self.dump()), timeout, || {
            lines.lock().unwrap().iter().any(|l| l.contains(needle))
        });
    }

    /// The whole log.
    pub fn dump(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Send a signal.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Send a signal to the process group it leads (started with a process group of its own),
    /// as supervisord's `stopasgroup` or a terminal's Ctrl-C does.
    pub fn signal_group(&self, sig: &str) {
        let group = format!("-{}", self.child.id());
        let ok = Command::new("kill").args([&format!("-{sig}"), "--", &group]).status().expect("kill").success();
        assert!(ok, "kill -{sig} -- {group} failed");
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "worker did not exit within {timeout:?}; log:\n{}", self.dump());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the CLI to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("CELERIAC_BROKER_URL").env_remove("CELERIAC_RESULT_BACKEND").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run celeriac");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A RabbitMQ vhost of its own for one test, deleted afterwards, so tests never see each
/// other's messages.
pub struct TestVhost {
    pub name: String,
}

impl TestVhost {
    pub fn new() -> Self {
        let name = format!("celeriac-test-{}", uuid::Uuid::new_v4().simple());
        let ok = |args: &[&str]| {
            let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
            assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ok(&["add_vhost", &name]);
        ok(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        TestVhost { name }
    }

    /// `amqp://guest:guest@127.0.0.1:5672/<vhost>` plus `extra` query parameters.
    pub fn url(&self, extra: &str) -> String {
        let q = if extra.is_empty() { String::new() } else { format!("?{extra}") };
        format!("amqp://guest:guest@127.0.0.1:5672/{}{q}", self.name)
    }

    /// The consuming channel of this vhost as RabbitMQ sees it: (channel-wide prefetch,
    /// unacknowledged deliveries); `None` while no channel consumes.
    pub fn worker_channel(&self) -> Option<(u64, u64)> {
        let out = Command::new("rabbitmqctl")
            .args(["list_channels", "-q", "--no-table-headers", "vhost", "consumer_count"])
            .args(["global_prefetch_count", "messages_unacknowledged"])
            .output()
            .expect("rabbitmqctl");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [v, consumers, prefetch, unacked] if *v == self.name && *consumers != "0" => {
                    Some((prefetch.parse().ok()?, unacked.parse().ok()?))
                }
                _ => None,
            }
        })
    }

    /// `rabbitmqctl list_queues -p <vhost> <columns>` as lines.
    pub fn list(&self, what: &str, columns: &[&str]) -> Vec<String> {
        let out = Command::new("rabbitmqctl")
            .args([what, "-p", &self.name, "--no-table-headers", "-q"])
            .args(columns)
            .output()
            .expect("rabbitmqctl");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.name]).output();
    }
}

/// A TCP proxy the test owns, in front of a real service: stopping it is a broker going away.
pub struct TcpProxy {
    pub port: u16,
    accept: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TcpProxy {
    /// Forward 127.0.0.1:<new port> to `target`.
    pub async fn start(target: &'static str) -> Self {
        Self::start_on(0, target).await
    }

    /// Forward 127.0.0.1:`port` to `target` (0: a new port); the same port again after
    /// [`stop`](Self::stop) is the broker coming back.
    pub async fn start_on(port: u16, target: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let held = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let forward = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap().push(forward);
            }
        });
        TcpProxy { port, accept, conns }
    }

    /// Close the listening socket and every forwarded connection; once this returns, not one
    /// more byte crosses the proxy.
    pub async fn stop(&mut self) {
        self.accept.abort();
        let _ = (&mut self.accept).await;
        let conns: Vec<_> = std::mem::take(&mut *self.conns.lock().unwrap());
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().iter() {
            c.abort();
        }
    }
}

/// A TCP server that accepts connections and never says a word.
pub struct SilentListener {
    pub port: u16,
    _held: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl SilentListener {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().map_while(Result::ok) {
                keep.lock().unwrap().push(s);
            }
        });
        SilentListener { port, _held: held }
    }
}

/// `celeriac send` to `url` (a broker that never answers) gives up with exit code 3 at the publish
/// deadline: 5 s by default, 1.5 s with `--publish-timeout 1.5` (with slack for a loaded machine).
pub fn send_gives_up_at_the_publish_deadline(url: &str) {
    for (flag, deadline) in [(None, 5.0), (Some("1.5"), 1.5)] {
        let mut args = vec!["send", "celeriac.noop", "--broker", url];
        if let Some(secs) = flag {
            args.extend(["--publish-timeout", secs]);
        }
        let started = Instant::now();
        let (code, _, stderr) = run_cli(&args, &[]);
        let took = started.elapsed().as_secs_f64();
        assert_eq!(code, 3, "{stderr}");
        assert!(took >= deadline - 0.2 && took < deadline + 2.5, "{flag:?}: gave up after {took:.2}s: {stderr}");
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// This machine's host name, as a node name's `%h` expands it.
pub fn hostname() -> String {
    let out = Command::new("hostname").output().expect("hostname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The virtualenv's Python, with Celery (made by `scripts/python-env.sh`; the test command runs it).
pub fn venv_python() -> PathBuf {
    let py = repo().join("target/pyenv/bin/python");
    assert!(py.exists(), "{} is missing: run scripts/python-env.sh (the test command does)", py.display());
    py
}

/// A free TCP port on 127.0.0.1 (free when this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().unwrap().port()
}

/// Run `redis-cli -p <port> -n <db> <args>` and return its output, trimmed.
pub fn redis_cli(port: u16, db: u32, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-n", &db.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The pid of the binary's shared `redis-server` (0: none started).
static SHARED_REDIS_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// At the binary's exit: kill the shared server and reap it (the parent-death signal alone
/// leaves a zombie where the machine's init does not reap).
extern "C" fn stop_shared_redis() {
    let pid = SHARED_REDIS_PID.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// One database of the test binary's own Redis server, shared by the binary's tests (each with
/// queue names of its own). The server is a `redis-server` this binary started on a free port at
/// the first `get`, in memory only, and killed when the binary ends (a parent-death signal from
/// a thread that lives as long as the process): so no run of another checkout on the machine,
/// and no other test binary, ever sees, consumes or flushes its keys (on the machine's Redis a
/// concurrent run's worker on the same queue name could take a task a test waits for).
pub struct SharedRedisDb {
    pub db: u32,
    port: u16,
}

impl SharedRedisDb {
    pub fn get(db: u32) -> Self {
        static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
        let port = *PORT.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            // A parent-death signal fires when the thread that spawned the child ends, not the
            // process: the server is spawned by a thread that never ends.
            std::thread::Builder::new()
                .name("shared-redis".into())
                .spawn(move || {
                    let server = PrivateRedis::start_with(false, true);
                    let pid = server.child.as_ref().map_or(0, |c| c.id() as i32);
                    SHARED_REDIS_PID.store(pid, std::sync::atomic::Ordering::SeqCst);
                    // SAFETY: registers a plain function with no captured state.
                    unsafe { nix::libc::atexit(stop_shared_redis) };
                    tx.send(server.port).expect("send the port");
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawn the shared Redis thread");
            rx.recv().expect("the shared Redis server started")
        });
        SharedRedisDb { db, port }
    }

    /// `redis://127.0.0.1:<port>/<db>` plus `params` as the query, if any.
    pub fn url(&self, params: &str) -> String {
        let q = if params.is_empty() { String::new() } else { format!("?{params}") };
        format!("redis://127.0.0.1:{}/{}{q}", self.port, self.db)
    }

    /// A command on this database.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, self.db, args)
    }
}

/// A `redis-server` of the test's own, on a free port: with [`PrivateRedis::start`] keeping its
/// data on disk (append-only file, fsync on every write) in a temporary directory, so it can be
/// killed and restarted with nothing lost; with [`PrivateRedis::start_volatile`] in memory only.
/// No other test, in this binary or in another run on the machine, sees its keys or flushes them.
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    durable: bool,
    /// Whether the server gets SIGKILL when the thread that started it ends.
    die_with_parent: bool,
    child: Option<Child>,
}

impl PrivateRedis {
    /// A server that keeps every write on disk (see [`PrivateRedis::restart`]).
    pub fn start() -> Self {
        Self::start_with(true, false)
    }

    /// A server that keeps nothing on disk: for isolation alone.
    pub fn start_volatile() -> Self {
        Self::start_with(false, false)
    }

    fn start_with(durable: bool, die_with_parent: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = PrivateRedis { port: free_port(), dir, durable, die_with_parent, child: None };
        // The port was free when chosen; another process may take it before our server binds
        // it: then try another.
        for _ in 0..5 {
            if server.launch() {
                return server;
            }
            server.port = free_port();
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    /// Start the server on `self.port`; whether it is ours that answers there (false: it
    /// could not bind the port, which another process took).
    fn launch(&mut self) -> bool {
        let appendonly: &[&str] =
            if self.durable { &["--appendonly", "yes", "--appendfsync", "always"] } else { &["--appendonly", "no"] };
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(appendonly)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null());
        if self.die_with_parent {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only makes one system call (prctl).
            unsafe {
                command.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
                });
            }
        }
        let child = command.spawn().expect("redis-server (is Redis installed?)");
        let pid = child.id();
        self.child = Some(child);
        let port = self.port;
        let mut exited = false;
        wait_until(&format!("redis-server to answer on {port}"), Duration::from_secs(20), || {
            exited = self.child.as_mut().is_some_and(|c| !matches!(c.try_wait(), Ok(None)));
            exited
                || Command::new("redis-cli")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
        });
        // Whoever answers must be the server just started, not another process's on that port.
        let ours =
            !exited && redis_cli(port, 0, &["INFO", "server"]).lines().any(|l| l.trim() == format!("process_id:{pid}"));
        if !ours {
            self.kill();
        }
        ours
    }

    /// SIGKILL the server and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port and directory (it reloads its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.launch(), "redis-server could not start again on port {}: another process took it", self.port);
    }

    /// `redis://127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// A command on database `db` of this server.
    pub fn cli(&self, db: u32, args: &[&str]) -> String {
        redis_cli(self.port, db, args)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real `celery -A ctlapp -b <broker> <args>` (Celery's own CLI, `tests/interop/ctlapp.py`);
/// returns (success, stdout).
pub fn celery_cli(broker: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(repo().join("target/pyenv/bin/celery"))
        .args(["-A", "ctlapp", "-b", broker])
        .args(args)
        .env("PYTHONPATH", repo().join("tests/interop"))
        .output()
        .expect("celery (run scripts/python-env.sh)");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `tests/interop/client.py` against the given broker and result backend; returns stdout.
pub fn py_client_on(broker: &str, backend: &str, args: &[&str]) -> String {
    let out = Command::new(venv_python())
        .arg(repo().join("tests/interop/client.py"))
        .args(args)
        .env("CELERY_BROKER_URL", broker)
        .env("CELERY_RESULT_BACKEND", backend)
        .output()
        .expect("python client");
    assert!(
        out.status.success(),
        "client.py {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A real `celery worker` (solo pool) of `tests/interop/pytasks.py`, whose stderr lines are
/// collected.
pub struct PyCeleryWorker {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl PyCeleryWorker {
    /// Start it on `queue` and wait until it is ready.
    pub fn start(broker: &str, backend: &str, queue: &str) -> Self {
        Self::start_pool(broker, backend, queue, &["-P", "solo"])
    }

    /// Start it with pool options (`-P prefork -c 2`: a solo worker answers no remote control
    /// while a task runs).
    pub fn start_pool(broker: &str, backend: &str, queue: &str, pool: &[&str]) -> Self {
        let mut child = Command::new(repo().join("target/pyenv/bin/celery"))
            .args(["-A", "pytasks", "worker", "-Q", queue, "--loglevel=INFO"])
            .args(pool)
            .args(["-n", &format!("py-{queue}-{}@%h", std::process::id())])
            .env("PYTHONPATH", repo().join("tests/interop"))
            .env("CELERY_BROKER_URL", broker)
            .env("CELERY_RESULT_BACKEND", backend)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("celery worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let w = PyCeleryWorker { child, lines };
        let lines = w.lines.clone();
        wait_until("the Python worker to be ready", Duration::from_secs(60), || {
            lines.lock().unwrap().iter().any(|l| l.contains(" ready."))
        });
        w
    }

    /// Lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for PyCeleryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on 127.0.0.1:port: (status, body), or None if nothing answers.
#[allow(dead_code)]
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Pids of the direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// Whether `pid` is still a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}
