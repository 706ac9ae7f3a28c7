//! Replays what a real Celery 5.7 worker did in `tests/fixtures/celery/canvas/` (see its README)
//! through celeriac's canvas: for every task a worker ran there, the continuations celeriac
//! would publish (callbacks, the next chain step, a chord's body, errbacks) must be the messages
//! Celery's worker published: same task, id, arguments, argsrepr, parent and root ids, group and
//! index, and the same embed, byte for byte where no id was made by the worker (ids the worker
//! made are random; each must map to one of ours consistently).

use std::collections::HashMap;
use std::path::PathBuf;

use celeriac_core::canvas::continuation::{errbacks_call, finish_chord, ChordFinish, Continuations};
use celeriac_core::canvas::join::ChordPart;
use celeriac_core::canvas::{apply, Call, Outgoing, Sender, Signature};
use celeriac_core::{ExceptionInfo, TaskState};
use celeriac_core::{TaskBody, TaskHeaders, TaskOptions};
use chrono::Utc;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/celery/canvas")
}

/// Ids Celery's worker made in the fixtures (its pinned generator starts them so).
fn worker_made(id: &str) -> bool {
    id.starts_with("bee0")
}

/// Compare `want` (Celery's) with `got` (ours), mapping each worker-made id of `want` to one id
/// of ours, the same every time.
fn same(want: &Value, got: &Value, ids: &mut HashMap<String, String>, path: &str, errors: &mut Vec<String>) {
    match (want, got) {
        (Value::String(w), Value::String(g)) if worker_made(w) => {
            let mapped = ids.entry(w.clone()).or_insert_with(|| g.clone());
            if mapped != g {
                errors.push(format!("{path}: Celery's {w} is ours {mapped} elsewhere, here {g}"));
            }
        }
        (Value::Object(w), Value::Object(g)) => {
            let (wk, gk): (Vec<_>, Vec<_>) = (w.keys().collect(), g.keys().collect());
            if wk != gk {
                errors.push(format!("{path}: keys {wk:?} != ours {gk:?}"));
                return;
            }
            for (k, v) in w {
                same(v, &g[k], ids, &format!("{path}.{k}"), errors);
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                same(a, b, ids, &format!("{path}[{i}]"), errors);
            }
        }
        _ if want == got => {}
        _ => errors.push(format!("{path}: Celery {want} != ours {got}")),
    }
}

/// The parts of a message compared: headers but `origin`, the body, `reply_to`.
/// The reply queue Celery's worker names in the messages it sends (its app's `thread_oid`):
/// a celeriac worker has none and names none (a signature's own `reply_to` is kept by both).
const WORKER_OID: &str = "0e1d0000-0000-3000-8000-000000000002";

fn view(headers: &Value, body: &Value, reply_to: &Value) -> Value {
    let reply_to = if reply_to == WORKER_OID { &Value::Null } else { reply_to };
    let mut h = headers.clone();
    h.as_object_mut().unwrap().shift_remove("origin");
    serde_json::json!({"headers": h, "body": body, "reply_to": reply_to})
}

fn ours(out: &Outgoing) -> Value {
    let headers = Value::Object(out.message.headers.clone());
    let body: Value = celeriac_core::pyjson::from_slice(&out.message.body).unwrap();
    let reply_to = out.message.properties.reply_to.clone().map_or(Value::Null, Value::String);
    view(&headers, &body, &reply_to)
}

/// A header task's part, from what the worker reported of its run (`retval` is Python's repr:
/// `4`, or `ValueError('boom')` for a failure).
fn part_of(group: &str, headers: &TaskHeaders, post: &Value) -> ChordPart {
    let repr = post["retval"].as_str().unwrap();
    let state: TaskState = post["state"].as_str().unwrap().parse().unwrap();
    let result = if state == TaskState::Success {
        serde_json::from_str(repr).unwrap()
    } else {
        let (exc_type, rest) = repr.split_once('(').unwrap();
        let message = rest.trim_end_matches(')').trim_matches('\'');
        ExceptionInfo::new(exc_type, message, "builtins").to_value()
    };
    ChordPart { group_id: group.into(), task_id: headers.id.clone(), group_index: headers.group_index, state, result }
}

/// What completing the chord publishes, when this header task's part is the last one in.
fn chord_completion(
    parts: &HashMap<String, Vec<ChordPart>>,
    cont: &Continuations,
    headers: &TaskHeaders,
    root: &str,
    sizes: &HashMap<String, std::collections::HashSet<String>>,
    in_process_errbacks: bool,
) -> Vec<(Signature, Call)> {
    let (Some(group), Some(body)) = (&headers.group, &cont.chord) else { return Vec::new() };
    let mut got = parts.get(group).cloned().unwrap_or_default();
    if got.len() != sizes[group].len() {
        return Vec::new();
    }
    got.sort_by_key(|p| p.group_index);
    match finish_chord(body, &got, &headers.id, root) {
        ChordFinish::Body(sig, call) => vec![(sig, call)],
        // New-style errbacks Celery calls in its own process (see above).
        ChordFinish::Failed { errbacks, .. } if !in_process_errbacks => errbacks.into_iter().collect(),
        ChordFinish::Failed { .. } => Vec::new(),
    }
}

fn apply_all(calls: Vec<(Signature, Call)>) -> Vec<Outgoing> {
    let known = |_: &str| Some(TaskOptions::default());
    let sender =
        Sender { origin: "test@host", default_queue: "celeriac-canvas", now: Utc::now(), task_options: &known };
    calls.into_iter().flat_map(|(sig, call)| apply(&sig, call, &sender).expect("apply").publish).collect()
}

#[test]
fn celeriac_publishes_the_continuations_celerys_worker_published() {
    let mut checked = 0;
    let mut errors = Vec::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(fixtures()).expect("canvas fixtures").map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if matches!(name.as_str(), "summary" | "lua_scripts" | "versions")
            || path.extension().is_none_or(|e| e != "json")
        {
            continue;
        }
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let messages = case["messages"].as_array().unwrap();
        // The header tasks of each chord (distinct ids of messages carrying a body), and the
        // parts of each as its header tasks finish.
        let mut header_sizes: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        for m in messages {
            if let (Some(group), false) = (m["headers"]["group"].as_str(), m["body"][2]["chord"].is_null()) {
                header_sizes
                    .entry(group.to_string())
                    .or_default()
                    .insert(m["headers"]["id"].as_str().unwrap().to_string());
            }
        }
        let mut parts: HashMap<String, Vec<ChordPart>> = HashMap::new();
        for step in case["steps"].as_array().unwrap() {
            let Some(consumed) = step["consumed_message"].as_u64() else { continue };
            let m = &messages[consumed as usize];
            let headers = TaskHeaders::from_map(m["headers"].as_object().unwrap()).unwrap();
            let body =
                TaskBody::decode(m["body_utf8"].as_str().unwrap().as_bytes(), "application/json", "utf-8").unwrap();
            let cont = Continuations::read(&body.embed);
            assert!(cont.problems.is_empty(), "{name}: {:?}", cont.problems);
            let root = headers.root_id.clone().unwrap_or_else(|| headers.id.clone());
            let post = step["worker_events"].as_array().unwrap().iter().find(|e| e["event"] == "task_postrun");
            let Some(post) = post else { continue };
            if let (Some(group), Some(_)) = (&headers.group, &cont.chord) {
                parts.entry(group.clone()).or_default().push(part_of(group, &headers, post));
            }
            let published: Vec<&Value> = step["published_messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| &messages[i.as_u64().unwrap() as usize])
                .collect();
            let calls = match post["state"].as_str().unwrap() {
                "SUCCESS" => {
                    // `retval` is Python's repr: the values here are numbers, lists, strings, None.
                    let repr = post["retval"].as_str().unwrap();
                    let json = repr.replace("None", "null").replace('\'', "\"");
                    let value: Value =
                        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: retval {repr}: {e}"));
                    let mut calls = cont.after_success(&value, &headers.id, &root);
                    calls.extend(chord_completion(
                        &parts,
                        &cont,
                        &headers,
                        &root,
                        &header_sizes,
                        name.contains("errback_new"),
                    ));
                    calls
                }
                // Old-style errbacks (sent as messages); new-style ones Celery's worker calls in its
                // own process, which a celeriac worker cannot do for a Python task.
                "FAILURE" if !name.contains("errback_new") => {
                    let mut calls: Vec<_> = errbacks_call(&cont.errbacks, &headers.id, &root).into_iter().collect();
                    calls.extend(chord_completion(
                        &parts,
                        &cont,
                        &headers,
                        &root,
                        &header_sizes,
                        name.contains("errback_new"),
                    ));
                    calls
                }
                _ => continue,
            };
            let ours: Vec<Outgoing> = apply_all(calls);
            if ours.len() != published.len() {
                errors.push(format!(
                    "{name} step {}: Celery published {} messages, ours {}: {:?}",
                    step["step"],
                    published.len(),
                    ours.len(),
                    ours.iter().map(|o| &o.task).collect::<Vec<_>>()
                ));
                continue;
            }
            let mut ids = HashMap::new();
            for (want, got) in published.iter().zip(&ours) {
                let want = view(&want["headers"], &want["body"], &want["properties"]["reply_to"]);
                same(&want, &self::ours(got), &mut ids, &format!("{name} step {}", step["step"]), &mut errors);
                checked += 1;
            }
        }
    }
    assert!(errors.is_empty(), "{} differences:\n{}", errors.len(), errors.join("\n"));
    assert!(checked >= 10, "only {checked} messages compared");
}
