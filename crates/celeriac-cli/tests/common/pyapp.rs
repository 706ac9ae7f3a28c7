//! The `--python-app` tests' shared parts: the test app under `tests/pyapp`, its environment,
//! and a celeriac worker running its tasks in Python children.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
