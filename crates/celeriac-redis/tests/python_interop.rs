//! Python Celery reads results celeriac stored, and celeriac reads results Python stored, through
//! the real local Redis (database 11). Needs the virtualenv `scripts/python-env.sh` makes under
//! `target/pyenv` (or `CELERIAC_PYTHON` naming a Python with Celery); skipped with a note
//! without one.

use std::path::PathBuf;
use std::time::Duration;

use celeriac_core::{ExceptionInfo, ResultBackend, ResultMeta, TaskState};
use celeriac_redis::RedisBackend;
use serde_json::json;

const URL: &str = "redis://127.0.0.1:6379/11";

fn python() -> Option<PathBuf> {
    let path = std::env::var_os("CELERIAC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/python"));
    path.exists().then_some(path)
}

const SCRIPT: &str = r#"
import sys, time, celery
ok, bad, late, from_py = sys.argv[1:5]
app = celery.Celery(broker='memory://', backend=sys.argv[5])
print(repr(app.AsyncResult(ok).get(timeout=10)))
try:
    app.AsyncResult(bad).get(timeout=10)
except Exception as exc:
    print(repr(exc))
start = time.monotonic()
print(repr(app.AsyncResult(late).get(timeout=10)))
print('waited', time.monotonic() - start)
app.backend.store_result(from_py, {'x': [1, 'h\u00e9']}, 'SUCCESS')
"#;

#[tokio::test]
async fn python_and_celeriac_read_each_others_results() {
    let Some(python) = python() else {
        eprintln!("no Python with Celery (run scripts/python-env.sh); skipping");
        return;
    };
    let backend = RedisBackend::connect(URL).await.unwrap();
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let [ok, bad, late, from_py] = [&ids[0], &ids[1], &ids[2], &ids[3]];

    backend.store(&ResultMeta::success(ok, json!({"a": [1, "h\u{e9}"]}))).await.unwrap();
    let exc = ExceptionInfo::new("ValueError", "bad value", "builtins");
    backend.store(&ResultMeta::exception(bad, TaskState::Failure, &exc, Some("Traceback".into()))).await.unwrap();

    let child = tokio::process::Command::new(&python).arg("-c").arg(SCRIPT).args(&ids).arg(URL).output();
    // `late` is stored while Python waits for it: its AsyncResult.get() is woken by the publish.
    let store_late = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        backend.store(&ResultMeta::success(late, json!("late"))).await.unwrap();
    };
    let from_python = backend.wait(from_py, Some(Duration::from_secs(30)));
    let (output, (), from_python) = tokio::join!(child, store_late, from_python);

    let output = output.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..3], ["{'a': [1, 'hé']}", "ValueError('bad value')", "'late'"], "{stdout}");

    let meta = from_python.unwrap();
    assert_eq!(meta.status, TaskState::Success);
    assert_eq!(meta.result, json!({"x": [1, "h\u{e9}"]}));
    for id in &ids {
        backend.forget(id).await.unwrap();
    }
}
