//! `celeriac worker --python-app MODULE:ATTR`: the prefork pool's children are Python processes
//! running an existing Celery app's tasks (`python/celeriac_child` in this repository).
//!
//! The child module is built into this binary and written once to a cache directory named by
//! its content (`$XDG_CACHE_HOME/celeriac/python-<hash>`, else `~/.cache/...`, else the temporary
//! directory), which is put first on the children's `PYTHONPATH`; so the binary and its children
//! always agree on the pipe protocol, and `pip install ./python` is needed only to use the module
//! elsewhere. Before the pool starts, the interpreter runs once as
//! `python -m celeriac_child --describe MODULE:ATTR` ([`describe`]): that checks it exists and
//! imports `celery` (a missing one is one clear line rather than a pool that cannot start) and
//! loads the app's configuration ([`AppConf`]), from which the worker takes what no flag or
//! environment variable gives ([`AppConf::unsupported`] lists what it does not act on).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{Broker, ResultBackend};

use serde::Deserialize;
use serde_json::Value;

use super::CliError;
use crate::connect::{self, ConnectError};

/// The child module's files, relative to the directory put on `PYTHONPATH`.
const FILES: &[(&str, &str)] = &[
    ("celeriac_child/__init__.py", include_str!("../../../../python/celeriac_child/__init__.py")),
    ("celeriac_child/__main__.py", include_str!("../../../../python/celeriac_child/__main__.py")),
    ("celeriac_child/describe.py", include_str!("../../../../python/celeriac_child/describe.py")),
];

/// How long loading the app to read its configuration may take.
const DESCRIBE_DEADLINE: Duration = Duration::from_secs(60);

/// Celery settings celeriac acts on when an app changes them (current names, as in
/// `celery/app/defaults.py`): the worker takes them where no flag gives them, the supervisor
/// enforces what the tasks announce from them, or Celery's own code in the Python children
/// carries them out (the app is loaded as it is).
const ACTED_ON: &[&str] = &[
    // The worker's own configuration (`cli::worker`).
    "broker_url",
    "result_backend",
    "task_queues",
    "task_default_queue",
    "task_time_limit",
    "task_soft_time_limit",
    "worker_concurrency",
    "worker_prefetch_multiplier",
    "worker_max_tasks_per_child",
    "worker_max_memory_per_child",
    "worker_send_task_events",
    // Announced per task by the children (Celery's `Task.bind` fills the task attributes in from
    // these), enforced by the supervisor.
    "task_default_rate_limit",
    "task_annotations",
    "task_ignore_result",
    // Settling as Celery's worker does (`foreign::AckPolicy`): acknowledged as the task starts
    // unless `acks_late`; requeued when its child dies only with `reject_on_worker_lost`.
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_retry_on_worker_lost",
    // (`task_acks_on_failure_or_timeout` stays named: its timeout half is not acted on.)
    "task_acks_on_failure",
    // STARTED stored by the children, as Celery's tracer stores it.
    "task_track_started",
    // Carried out by Celery's code in the children: task modules imported, times, what a task
    // sends (routed by Celery's router, published through the supervisor), eager calls.
    "imports",
    "include",
    "timezone",
    "enable_utc",
    "task_routes",
    "task_create_missing_queues",
    "task_default_priority",
    "task_always_eager",
    "task_eager_propagates",
    "task_store_eager_result",
    // The children's logging (`celeriac_child.setup_logging`): what tasks print is logged at
    // this level, or written as it is.
    "worker_redirect_stdouts",
    "worker_redirect_stdouts_level",
];

/// Whether celeriac acts on a setting the app changed to `value`: one of [`ACTED_ON`], except
/// `worker_prefetch_multiplier = 0`, Celery's "no limit", which celeriac's window does not take
/// (its own default is used, and the setting is named as not acted on).
fn acted_on(name: &str, value: &Value) -> bool {
    ACTED_ON.contains(&name) && !(name == "worker_prefetch_multiplier" && value.as_f64() == Some(0.0))
}

/// What the app's `app.conf` says about the worker (the JSON `--describe` prints; see
/// `python/celeriac_child/describe.py`).
#[derive(Debug, Deserialize)]
pub(crate) struct AppConf {
    /// Celery's version in that interpreter.
    pub celery: String,
    /// `broker_url` as Celery resolves it (with `CELERY_BROKER_URL` and the older names;
    /// failover URLs joined by `;`); `None` when the app names none.
    pub broker_url: Option<String>,
    /// `result_backend`, resolved the same way.
    pub result_backend: Option<String>,
    /// The queues Celery's worker consumes without `-Q`: `task_queues`, else the default queue.
    pub queues: Vec<String>,
    /// The setting they come from: `task_queues` or `task_default_queue`.
    pub queues_from: String,
    /// What the declaration of each of the app's queues asks for that celeriac does not
    /// reproduce (it declares and consumes a durable queue bound by its own name), by queue:
    /// `exchange_type=fanout`, `argument:x-message-ttl=60000`, `durable=False`, ...
    #[serde(default)]
    pub declarations: BTreeMap<String, Vec<String>>,
    /// `[as written, current name, value]` for each Celery setting the app changed from its
    /// default (a value JSON cannot carry is its Python `repr`). The worker's settings
    /// (`task_time_limit`, `worker_concurrency`, ...) are read from these: where one is unchanged,
    /// Celery's default is celeriac's.
    pub changed: Vec<(String, String, Value)>,
}

impl AppConf {
    /// The settings the app changed that celeriac does not act on, as the app wrote them.
    pub(crate) fn unsupported(&self) -> Vec<&str> {
        self.changed.iter().filter(|(_, name, value)| !acted_on(name, value)).map(|(w, ..)| w.as_str()).collect()
    }

    /// Log, in one warning, every setting the app changed that celeriac does not act on, and
    /// what the declarations of the `consumed` queues ask for that celeriac does not reproduce
    /// (`task_queues` is then named too), leaving out the `applied` settings (by current name)
    /// the worker took besides [`ACTED_ON`] and the queue arguments `broker_url` reproduces:
    /// nothing the app asks for is ignored silently.
    pub(crate) fn warn_unsupported(&self, consumed: &[String], applied: &[&str], broker_url: &str) {
        let mut settings = self.unsupported();
        settings.retain(|w| {
            !self.changed.iter().any(|(written, name, _)| written == w && applied.contains(&name.as_str()))
        });
        let queues: Vec<String> = consumed
            .iter()
            .filter_map(|q| {
                let words: Vec<&str> = self
                    .declarations
                    .get(q)?
                    .iter()
                    .map(String::as_str)
                    .filter(|w| !reproduced(w, broker_url))
                    .collect();
                (!words.is_empty()).then(|| format!("{q}:{}", words.join(";")))
            })
            .collect();
        if queues.is_empty() {
            if !settings.is_empty() {
                tracing::warn!(settings = %settings.join(","), "the app changes settings celeriac does not act on");
            }
            return;
        }
        let written = self.changed.iter().find(|(_, n, _)| n == "task_queues").map_or("task_queues", |(w, ..)| w);
        settings.push(written);
        settings.sort_unstable();
        tracing::warn!(
            settings = %settings.join(","),
            task_queues = %queues.join(","),
            "the app changes settings celeriac does not act on (queues are consumed by name only)"
        );
    }

    /// The value of a setting the app changed (by its current name); `None` when unchanged or
    /// unset (`null`).
    pub(crate) fn setting(&self, name: &str) -> Option<&Value> {
        self.changed.iter().find(|(_, n, _)| n == name).map(|(.., v)| v).filter(|v| !v.is_null())
    }

    /// A positive number of seconds (or count) from a setting; `None` for 0, which Celery reads
    /// as unset (no limit, or its default); an error naming the setting for anything else.
    pub(crate) fn positive(&self, name: &str) -> Result<Option<f64>, CliError> {
        match self.setting(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .map(|n| (n > 0.0).then_some(n))
                .ok_or_else(|| CliError::usage(format!("the app's {name} must be a positive number, got {v}"))),
        }
    }
}

/// The interpreter to run: `--python`, else `$VIRTUAL_ENV/bin/python`, else `python3` on PATH.
pub(crate) fn interpreter(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(venv).join("bin").join("python");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("python3")
}

/// Celery's broker when an app names none (`kombu`'s default transport, `amqp`, on this host).
const CELERY_DEFAULT_BROKER: &str = "amqp://guest:guest@localhost:5672//";

/// The worker's settings that no flag gave, from the app's configuration when there is one
/// (`--python-app`), else nothing.
pub(crate) struct FromApp<'a>(pub Option<&'a AppConf>);

impl FromApp<'_> {
    /// A text setting.
    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        self.0.and_then(|c| c.setting(name)).and_then(Value::as_str)
    }

    /// A true/false setting (false when unset).
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.0.and_then(|c| c.setting(name)).and_then(Value::as_bool).unwrap_or(false)
    }

    /// A positive number of seconds; an error naming the setting when it is something else.
    pub(crate) fn seconds(&self, name: &str) -> Result<Option<f64>, CliError> {
        self.0.map_or(Ok(None), |c| c.positive(name))
    }

    /// A positive whole number (a count, or KiB); an error naming the setting otherwise.
    pub(crate) fn count(&self, name: &str) -> Result<Option<u64>, CliError> {
        match self.seconds(name)? {
            Some(n) if n.fract() == 0.0 && n <= u64::MAX as f64 => Ok(Some(n as u64)),
            Some(n) => Err(CliError::usage(format!("the app's {name} must be a whole number, got {n}"))),
            None => Ok(None),
        }
    }

    /// The broker and result backend: the flag's or environment's (`broker`, `backend`), else
    /// the app's `broker_url` (Celery's default broker when the app names none) and
    /// `result_backend`, else celeriac's defaults; on RabbitMQ, with the app's queue type and
    /// maximum priority ([`AMQP_QUEUE_SETTINGS`]) unless the URL sets them. Before they are
    /// opened, the app's settings celeriac does not act on are logged
    /// ([`AppConf::warn_unsupported`], `consumed` being the queues consumed). An app's URL that
    /// cannot be used is an error naming the setting.
    pub(crate) fn connect(
        &self,
        broker: Option<&str>,
        backend: Option<&str>,
        consumed: &[String],
    ) -> Result<Transports, CliError> {
        let blame = |setting: &'static str, from_app: bool| {
            move |e: ConnectError| {
                let mut e = CliError::from(e);
                if from_app {
                    e.message =
                        format!("the app's {setting} (give another with --{}): {}", flag_of(setting), e.message);
                }
                e
            }
        };
        let (broker_url, broker_from_app) = self.broker_url(broker)?;
        let (broker_url, applied) = self.amqp_queue_settings(broker_url);
        if let Some(conf) = self.0 {
            conf.warn_unsupported(consumed, &applied, &broker_url);
        }
        let (backend_url, backend_from_app) = match (backend, self.0.and_then(|c| c.result_backend.as_deref())) {
            (Some(url), _) => (Some(url), false),
            (None, Some(url)) => {
                tracing::info!(result_backend = %connect::redact(url), "result backend from the app's result_backend");
                (Some(url), true)
            }
            (None, None) => (None, false),
        };
        let opened = connect::broker(&broker_url).map_err(blame("broker_url", broker_from_app))?;
        let backend = connect::backend(backend_url, &broker_url).map_err(blame("result_backend", backend_from_app))?;
        Ok((opened, backend))
    }
}

impl FromApp<'_> {
    /// The broker URL: `broker` (the flag's or environment's), else the app's `broker_url`
    /// (Celery's default broker when the app names none), else celeriac's default; and whether
    /// it is the app's. An app naming several brokers (failover) is an error.
    pub(crate) fn broker_url(&self, broker: Option<&str>) -> Result<(String, bool), CliError> {
        Ok(match (broker, self.0) {
            (Some(url), _) => (url.to_string(), false),
            (None, Some(conf)) => {
                let url = conf.broker_url.as_deref().unwrap_or(CELERY_DEFAULT_BROKER);
                if url.contains(';') {
                    return Err(CliError::usage(format!(
                        "the app's broker_url names several brokers (failover: {}); celeriac connects to one: name it with --broker",
                        connect::redact(url)
                    )));
                }
                let what = if conf.broker_url.is_some() {
                    "the app's broker_url"
                } else {
                    "Celery's default (the app names none)"
                };
                tracing::info!(broker = %connect::redact(url), "broker from {what}");
                (url.to_string(), true)
            }
            (None, None) => (connect::DEFAULT_BROKER_URL.to_string(), false),
        })
    }

    /// `url` with the app's [`AMQP_QUEUE_SETTINGS`] as its parameters, when it is RabbitMQ's and
    /// does not set them itself; the settings so taken.
    fn amqp_queue_settings(&self, mut url: String) -> (String, Vec<&'static str>) {
        let mut applied = Vec::new();
        if !is_amqp(&url) {
            return (url, applied);
        }
        for (setting, param) in AMQP_QUEUE_SETTINGS {
            let Some(value) = self.0.and_then(|c| c.setting(setting)) else { continue };
            let value = value.as_str().map_or_else(|| value.to_string(), str::to_string);
            let query = url.split_once('?').map_or("", |(_, q)| q);
            if query.split('&').any(|kv| kv.split('=').next() == Some(param)) {
                continue; // the URL's own wins
            }
            if !url.contains('?') {
                url.push('?');
            } else if !url.ends_with(['?', '&']) {
                url.push('&');
            }
            url.push_str(&format!("{param}={value}"));
            tracing::info!(setting, "{param}={value}: queues declared as the app's {setting} says");
            applied.push(*setting);
        }
        (url, applied)
    }
}

/// Whether a queue declaration's word (`describe.py`) is what celeriac declares anyway with
/// `broker_url`: a queue argument on a broker other than RabbitMQ (kombu's other transports
/// ignore them too), or one the URL's parameters carry ([`AMQP_QUEUE_SETTINGS`]).
fn reproduced(word: &str, broker_url: &str) -> bool {
    let Some((key, value)) = word.strip_prefix("argument:").and_then(|kv| kv.split_once('=')) else { return false };
    if !is_amqp(broker_url) {
        return true;
    }
    let param = |name: &str| {
        let query = broker_url.split_once('?').map_or("", |(_, q)| q);
        query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    match key {
        "x-max-priority" => param("max_priority") == Some(value),
        "x-queue-type" => param("queue_type") == Some(value),
        _ => false,
    }
}

/// Whether `url` is a RabbitMQ broker's.
fn is_amqp(url: &str) -> bool {
    matches!(url.split_once("://").map(|(s, _)| s), Some("amqp" | "amqps" | "pyamqp"))
}

/// Celery settings of how queues are declared, and the RabbitMQ broker URL parameters that
/// carry them (`celeriac_amqp::url`).
const AMQP_QUEUE_SETTINGS: &[(&str, &str)] =
    &[("task_default_queue_type", "queue_type"), ("task_queue_max_priority", "max_priority")];

/// A worker's broker and result backend.
pub(crate) type Transports = (Arc<dyn Broker>, Arc<dyn ResultBackend>);

/// The flag that replaces a setting.
fn flag_of(setting: &str) -> &'static str {
    if setting == "broker_url" {
        "broker"
    } else {
        "result-backend"
    }
}

/// Run `python -m celeriac_child --describe spec` once (with the child module from
/// `module_dir` on the path): that `python` runs and imports `celery`, and the app's
/// configuration. Errors: the interpreter cannot run, lacks celery, or the app cannot be loaded
/// (its traceback), or loading takes longer than a minute; each one message, exit 2.
pub(crate) async fn describe(python: &Path, spec: &str, module_dir: &Path) -> Result<AppConf, CliError> {
    let (program, _, env) = child_command(python.to_path_buf(), spec, module_dir);
    let run = tokio::process::Command::new(&program)
        .args(["-m", "celeriac_child", "--describe", spec])
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(DESCRIBE_DEADLINE, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(CliError::usage(format!("--python: cannot run {}: {e}", python.display()))),
        Err(_) => {
            return Err(CliError::usage(format!(
                "--python-app {spec}: loading the app took longer than {}s (does importing it wait on something?)",
                DESCRIBE_DEADLINE.as_secs()
            )))
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if err.contains("cannot load the Celery app") {
            return Err(CliError::usage(err.trim_end().to_string()));
        }
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(CliError::usage(format!(
            "--python-app: {} cannot import celery ({last}); install it there (pip install celery) or name another interpreter with --python",
            python.display()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        CliError::failed(format!(
            "--python-app {spec}: the app's configuration could not be read ({e}): {}{err}",
            String::from_utf8_lossy(&out.stdout)
        ))
    })
}

/// Check the `MODULE:ATTR` form.
pub(crate) fn check_app_spec(spec: &str) -> Result<(), CliError> {
    let (module, _attr) = spec.split_once(':').unwrap_or((spec, ""));
    let ok = !module.is_empty()
        && module.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
    if ok {
        Ok(())
    } else {
        Err(CliError::usage(format!("--python-app {spec:?}: expected MODULE:ATTR, e.g. proj.celery:app")))
    }
}

/// Write the child module where the children import it from; the directory to put on
/// `PYTHONPATH`.
pub(crate) fn install() -> Result<PathBuf, CliError> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    FILES.hash(&mut h);
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("celeriac");
    let dir = base.join(format!("python-{:016x}", h.finish()));
    if FILES.iter().all(|(rel, text)| std::fs::read_to_string(dir.join(rel)).is_ok_and(|t| t == *text)) {
        return Ok(dir);
    }
    let failed = |e: std::io::Error| {
        CliError::failed(format!("cannot write the Python child module under {}: {e}", base.display()))
    };
    // Written beside, then renamed into place: a concurrent worker sees all of it or none.
    let staging = base.join(format!(".python-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    for (rel, text) in FILES {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        std::fs::write(&path, text).map_err(failed)?;
    }
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another worker put the same files there first.
        Err(_) if dir.join(FILES[0].0).exists() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => Err(failed(e)),
    }
}

/// The pool's program, arguments and environment for Python children running `spec`.
pub(crate) fn child_command(
    python: PathBuf,
    spec: &str,
    module_dir: &Path,
) -> (PathBuf, Vec<OsString>, Vec<(OsString, OsString)>) {
    let mut path = OsString::from(module_dir);
    if let Some(existing) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(existing);
    }
    let args = vec![OsString::from("-m"), OsString::from("celeriac_child"), OsString::from(spec)];
    (python, args, vec![(OsString::from("PYTHONPATH"), path), (OsString::from("PYTHONUNBUFFERED"), "1".into())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_settings_are_those_changed_that_celeriac_does_not_act_on() {
        let conf: AppConf = serde_json::from_str(
            r#"{"celery": "5.7.0", "broker_url": null, "result_backend": null, "queues": ["celery"],
                "queues_from": "task_default_queue",
                "changed": [["BROKER_URL", "broker_url", "amqp://"], ["CELERYD_TASK_SOFT_TIME_LIMIT", "task_soft_time_limit", 2],
                            ["task_serializer", "task_serializer", "pickle"], ["worker_concurrency", "worker_concurrency", -1],
                            ["task_time_limit", "task_time_limit", 0], ["worker_prefetch_multiplier", "worker_prefetch_multiplier", 0],
                            ["CELERY_ACKS_ON_FAILURE_OR_TIMEOUT", "task_acks_on_failure_or_timeout", false]]}"#,
        )
        .unwrap();
        assert_eq!(
            conf.unsupported(),
            ["task_serializer", "worker_prefetch_multiplier", "CELERY_ACKS_ON_FAILURE_OR_TIMEOUT"]
        );
        assert_eq!(conf.positive("task_soft_time_limit").unwrap(), Some(2.0));
        let e = conf.positive("worker_concurrency").unwrap_err();
        assert!(e.message.contains("worker_concurrency must be a positive number, got -1"), "{}", e.message);
        // 0 is Celery's "unset".
        assert_eq!(conf.positive("task_time_limit").unwrap(), None);
    }

    #[test]
    fn the_app_s_queue_type_and_priority_go_into_a_rabbitmq_url_that_does_not_set_them() {
        let conf: AppConf = serde_json::from_str(
            r#"{"celery": "5.7.0", "broker_url": null, "result_backend": null, "queues": ["celery"],
                "queues_from": "task_default_queue",
                "changed": [["task_default_queue_type", "task_default_queue_type", "quorum"],
                            ["task_queue_max_priority", "task_queue_max_priority", 10]]}"#,
        )
        .unwrap();
        let app = FromApp(Some(&conf));
        let both = vec!["task_default_queue_type", "task_queue_max_priority"];
        assert_eq!(
            app.amqp_queue_settings("amqp://h//".into()),
            ("amqp://h//?queue_type=quorum&max_priority=10".into(), both)
        );
        let (url, applied) = app.amqp_queue_settings("amqp://h//?heartbeat=0&max_priority=3".into());
        assert_eq!(
            (url.as_str(), applied),
            ("amqp://h//?heartbeat=0&max_priority=3&queue_type=quorum", vec!["task_default_queue_type"])
        );
        assert_eq!(app.amqp_queue_settings("redis://h/0".into()), ("redis://h/0".into(), vec![]));
        assert_eq!(FromApp(None).amqp_queue_settings("amqp://h//".into()), ("amqp://h//".into(), vec![]));
    }

    #[test]
    fn app_specs_are_module_and_attribute() {
        assert!(check_app_spec("proj.celery:app").is_ok());
        assert!(check_app_spec("tasks").is_ok());
        assert!(check_app_spec("proj-x:app").is_err());
        assert!(check_app_spec(":app").is_err());
        assert!(check_app_spec("a..b:app").is_err());
    }
}
