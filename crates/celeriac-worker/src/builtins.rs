//! Celery's builtin tasks that a Celery 5.x client's canvas puts on a queue
//! (`celery/app/builtins.py`), so they run on a celeriac worker as on a Python one:
//!
//! - `celery.map(task, it)`: `[task(item) for item in it]`, each a direct call of the task
//!   registered here (no message, as Celery's `xmap`);
//! - `celery.starmap(task, it)`: `[task(*item) for item in it]`;
//! - `celery.chunks(task, it, n)`: sends a group of `celery.starmap` tasks, one per slice of `n`
//!   items, and returns that group's result tuple (Celery's `chunks(...)()`);
//! - `celery.accumulate(*args, index=None)`: `args[index]`, or the list of the arguments (the
//!   body `Task.replace` gives a group).
//!
//! `task` is a signature dict (its own arguments are not used, as in Celery) and `it` a list;
//! both may come as keyword or positional arguments. These run in the worker's process in both
//! pools (the prefork children know the application's tasks only): the inner calls of
//! `celery.map` and `celery.starmap` are the tasks' own code, blocking ones on the blocking
//! thread pool.
//!
//! These four are what remote control's `registered` lists with `builtins` (Celery lists its
//! nine; without `builtins` neither lists any). The other five are not registered, so a message
//! naming one is refused as an unknown task rather than listed and then not carried out:
//! `celery.group`, `celery.chain` and `celery.chord` are "no longer used" in Celery 5 (its canvas
//! never sends them; `celery.chain` only raises `NotImplementedError`); `celery.chord_unlock`
//! polls a chord's parts for result backends without a join of their own (Celery's database,
//! RPC and cache backends), while celeriac joins chords in its backends (`store_chord_part`);
//! `celery.backend_cleanup` is what Celery's beat sends daily to a backend that needs sweeping
//! (`app.backend.cleanup()`): celeriac's Redis results expire by themselves and its SQLite
//! backend deletes expired rows as it stores, so there is no sweep for it to run.

use std::sync::{Arc, OnceLock, Weak};

use celeriac_core::canvas::{apply, Call, Sender, Signature};
use celeriac_core::task::TaskFuture;
use celeriac_core::{Registry, Task, TaskContext, TaskError, TaskOptions};
use serde_json::{Map, Value};

use crate::Shared;

/// The names of the builtins (each run in the worker's process).
pub(crate) const NAMES: [&str; 4] = ["celery.map", "celery.starmap", "celery.chunks", "celery.accumulate"];

/// Whether `name` is one of these builtins.
pub(crate) fn runs_in_worker(name: &str) -> bool {
    NAMES.contains(&name)
}

/// The worker's state, set once the worker runs (the builtins call tasks and publish).
pub(crate) type Link = Arc<OnceLock<Weak<Shared>>>;

/// `registry` with the builtins added (a task the application registered under one of these
/// names is kept).
pub(crate) fn with_builtins(registry: &Registry, link: &Link) -> Registry {
    let mut r = registry.clone();
    for name in NAMES {
        if r.get(name).is_none() {
            r.register_arc(Arc::new(Builtin { name, link: link.clone() }));
        }
    }
    r
}

struct Builtin {
    name: &'static str,
    link: Link,
}

impl Task for Builtin {
    fn name(&self) -> &str {
        self.name
    }

    fn options(&self) -> TaskOptions {
        TaskOptions::default()
    }

    fn call(&self, ctx: TaskContext, args: Vec<Value>, kwargs: Map<String, Value>) -> TaskFuture {
        let name = self.name;
        let shared = self.link.get().and_then(Weak::upgrade);
        Box::pin(async move {
            let shared = shared.ok_or_else(|| TaskError::new("RuntimeError", "the worker is not running"))?;
            match name {
                "celery.accumulate" => accumulate(args, &kwargs),
                "celery.map" => map(&shared, &ctx, args, kwargs, false).await,
                "celery.starmap" => map(&shared, &ctx, args, kwargs, true).await,
                _ => chunks(&shared, &ctx, args, kwargs).await,
            }
        })
    }
}

fn type_error(message: String) -> TaskError {
    TaskError::new("TypeError", message)
}

/// The arguments named `names`, from the keyword arguments or else in order from `args`.
fn named(
    task: &str,
    names: &[&str],
    mut args: Vec<Value>,
    mut kwargs: Map<String, Value>,
) -> Result<Vec<Value>, TaskError> {
    let mut out = Vec::with_capacity(names.len());
    args.reverse();
    for name in names {
        match kwargs.shift_remove(*name).or_else(|| args.pop()) {
            Some(v) => out.push(v),
            None => return Err(type_error(format!("{task}() missing required argument: '{name}'"))),
        }
    }
    Ok(out)
}

fn accumulate(args: Vec<Value>, kwargs: &Map<String, Value>) -> Result<Value, TaskError> {
    match kwargs.get("index") {
        None | Some(Value::Null) => Ok(Value::Array(args)),
        Some(i) => {
            let len = args.len() as i64;
            let index = i.as_i64().ok_or_else(|| type_error(format!("tuple indices must be integers, not {i}")))?;
            let at = if index < 0 { index + len } else { index };
            args.into_iter()
                .nth(usize::try_from(at).map_err(|_| TaskError::new("IndexError", "tuple index out of range"))?)
                .ok_or_else(|| TaskError::new("IndexError", "tuple index out of range"))
        }
    }
}

/// The task a builtin is given (a signature dict) and its items.
fn inner(name: &str, task: &Value, it: Value) -> Result<(Signature, Vec<Value>), TaskError> {
    let sig = Signature::from_value(task).map_err(|e| type_error(format!("{name}: {e}")))?;
    match it {
        Value::Array(items) => Ok((sig, items)),
        other => Err(type_error(format!("{name}: 'it' must be a list, got {other}"))),
    }
}

async fn map(
    shared: &Shared,
    ctx: &TaskContext,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    star: bool,
) -> Result<Value, TaskError> {
    let name = if star { "celery.starmap" } else { "celery.map" };
    let mut parts = named(name, &["task", "it"], args, kwargs)?.into_iter();
    let (task, it) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (sig, items) = inner(name, &task, it)?;
    let target = shared.registry.get(&sig.task).ok_or_else(|| TaskError::not_registered(&sig.task))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let call_args = match (star, item) {
            (false, item) => vec![item],
            (true, Value::Array(a)) => a,
            (true, other) => {
                return Err(type_error(format!("{name}: each item must be a list of arguments, got {other}")))
            }
        };
        let mut inner_ctx = TaskContext::detached(ctx.id.clone(), sig.task.clone());
        inner_ctx.queue = ctx.queue.clone();
        inner_ctx.hostname = ctx.hostname.clone();
        out.push(target.call(inner_ctx, call_args, Map::new()).await?);
    }
    Ok(Value::Array(out))
}

async fn chunks(
    shared: &Shared,
    ctx: &TaskContext,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
) -> Result<Value, TaskError> {
    let mut parts = named("celery.chunks", &["task", "it", "n"], args, kwargs)?.into_iter();
    let (task, it, n) =
        (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (sig, items) = inner("celery.chunks", &task, it)?;
    let n = n
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| type_error(format!("celery.chunks: 'n' must be a positive integer, got {n}")))?;
    // Where the slices go: the inner signature's queue, its task's, or this one's.
    let queue = sig
        .option_str("queue")
        .map(str::to_string)
        .or_else(|| shared.registry.get(&sig.task).and_then(|t| t.options().queue))
        .unwrap_or_else(|| ctx.queue.clone());
    let slices: Vec<Signature> = items
        .chunks(n as usize)
        .map(|slice| {
            let mut s = Signature::new("celery.starmap");
            s.kwargs.insert("task".into(), sig.to_value());
            s.kwargs.insert("it".into(), Value::Array(slice.to_vec()));
            s.immutable = true;
            s.set_option("queue", Value::String(queue.clone()));
            s
        })
        .collect();
    let root = ctx.root_id.clone().unwrap_or_else(|| ctx.id.clone());
    let plans = {
        let task_options = |name: &str| shared.registry.get(name).map(|t| t.options());
        let sender = Sender {
            origin: &shared.config.hostname,
            default_queue: &shared.config.default_queue,
            now: chrono::Utc::now(),
            task_options: &task_options,
        };
        apply(&Signature::group(slices), Call::new().ids(&ctx.id, &root), &sender)
            .map_err(|e| TaskError::new("ValueError", format!("celery.chunks: {e}")))?
    };
    crate::canvas::publish_applied(shared, std::slice::from_ref(&plans))
        .await
        .map_err(|e| TaskError::new("OperationalError", e.to_string()))?;
    Ok(plans.result.as_tuple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accumulate_is_celerys() {
        let args = vec![json!(1), json!([2, 3])];
        assert_eq!(accumulate(args.clone(), &Map::new()).unwrap(), json!([1, [2, 3]]));
        let at = |i: i64| accumulate(args.clone(), json!({"index": i}).as_object().unwrap());
        assert_eq!(at(0).unwrap(), json!(1));
        assert_eq!(at(-1).unwrap(), json!([2, 3]));
        assert_eq!(at(5).unwrap_err().exc_type, "IndexError");
    }

    #[test]
    fn arguments_come_by_keyword_or_position() {
        let kw = json!({"it": [1]}).as_object().unwrap().clone();
        assert_eq!(
            named("celery.map", &["task", "it"], vec![json!({"task": "t"})], kw).unwrap(),
            vec![json!({"task": "t"}), json!([1])]
        );
        let err = named("celery.map", &["task", "it"], vec![], Map::new()).unwrap_err();
        assert_eq!(err.message, "celery.map() missing required argument: 'task'");
    }
}
