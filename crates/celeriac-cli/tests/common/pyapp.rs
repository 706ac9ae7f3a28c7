//! The `--python-app` tests' shared parts: the test app under `tests/pyapp`, its environment,
//! a celeriac worker running its tasks in Python children, its client (`client.py`), and a real
//! Celery worker of the same app to compare with.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::{bin, repo, venv_python, WorkerProc};

/// `tests/pyapp`: the Celery app (`pyapp.py`) and its Python clients.
pub fn pyapp_dir() -> PathBuf {
    repo().join("tests/pyapp")
}

/// The environment of the test app: broker, backend, the data Redis (the backend's URL), the
/// default queue and its module path.
pub fn app_env(broker: &str, backend: &str, queue: &str) -> Vec<(String, String)> {
    vec![
        ("PYAPP_BROKER".into(), broker.into()),
        ("PYAPP_BACKEND".into(), backend.into()),
        ("PYAPP_DATA_REDIS".into(), backend.into()),
        ("PYAPP_QUEUE".into(), queue.into()),
        ("PYTHONPATH".into(), pyapp_dir().display().to_string()),
    ]
}

/// `celeriac worker --python-app pyapp:app -Q queue <extra>` (`queue` may name several,
/// comma-separated), not waited for.
pub fn spawn_python_worker(broker: &str, backend: &str, queue: &str, extra: &[&str]) -> WorkerProc {
    WorkerProc::spawn_command(python_worker_command(broker, backend, queue, extra))
}

/// The command [`spawn_python_worker`] runs.
pub fn python_worker_command(broker: &str, backend: &str, queue: &str, extra: &[&str]) -> Command {
    let python = venv_python();
    let python = python.to_str().unwrap();
    let mut args = vec!["worker", "--broker", broker, "--result-backend", backend, "-Q", queue];
    args.extend_from_slice(&["--python-app", "pyapp:app", "--python", python]);
    args.extend_from_slice(extra);
    let env = app_env(broker, backend, queue);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    WorkerProc::cli_command(Path::new(bin()), &args, &env)
}

/// [`spawn_python_worker`], waited for until it is ready (every child has loaded the app).
pub fn python_worker(broker: &str, backend: &str, queue: &str, extra: &[&str]) -> WorkerProc {
    let w = spawn_python_worker(broker, backend, queue, extra);
    w.wait_for_line("worker ready", Duration::from_secs(60));
    w
}

/// Run `tests/pyapp/client.py QUEUE CASES...`; the stored metas by case.
pub fn run_client(broker: &str, backend: &str, queue: &str, cases: &[&str]) -> serde_json::Map<String, Value> {
    let args: Vec<&str> = std::iter::once(queue).chain(cases.iter().copied()).collect();
    run_script("client.py", &args, &app_env(broker, backend, queue))
}

/// Run the Python script `tests/pyapp/<script>` with `args` and `env`; the JSON object it
/// prints (it must exit 0).
pub fn run_script(script: &str, args: &[&str], env: &[(String, String)]) -> serde_json::Map<String, Value> {
    let out = Command::new(venv_python())
        .arg(pyapp_dir().join(script))
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .expect("python client");
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Object(m)) => m,
        other => panic!("{script} printed {other:?}"),
    }
}

/// A real `celery worker` (prefork) of the same app, on its own queue.
pub struct CeleryWorker(std::process::Child);

impl CeleryWorker {
    pub fn start(broker: &str, backend: &str, queue: &str) -> Self {
        Self::start_with(broker, backend, queue, &[])
    }

    /// With more options (`-E`: task events).
    pub fn start_with(broker: &str, backend: &str, queue: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(repo().join("target/pyenv/bin/celery"))
            .args(["-A", "pyapp", "worker", "-P", "prefork", "-c", "2", "-Q", queue, "--loglevel=INFO"])
            .args(["-n", &format!("pyapp-{queue}@%h")])
            .args(extra)
            .envs(app_env(broker, backend, queue))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("celery worker");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(" ready.") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60)).expect("the Celery worker to be ready");
        CeleryWorker(child)
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
