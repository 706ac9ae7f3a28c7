//! Python `repr()` of JSON values, for the `argsrepr` and `kwargsrepr` headers.
//!
//! Monitors (Flower, `celery inspect`) show these strings, so they are written as Python would
//! write them: `(2, 3)`, `{'z': 4}`, `'text'`, `True`, `None`. Long reprs are cut at Celery's
//! default of 1024 characters.

use serde_json::{Map, Value};

/// Celery's default `argsrepr_maxsize` / `kwargsrepr_maxsize`.
pub const MAX_REPR: usize = 1024;

/// `repr(args)`: a tuple (`(1,)`) when the caller used positional arguments in code, a list
/// (`[1]`) when it passed a list (as `send_task(args=[...])` does).
pub fn args_repr(args: &[Value], tuple: bool) -> String {
    let mut out = String::new();
    if tuple {
        out.push('(');
        push_items(&mut out, args);
        if args.len() == 1 {
            out.push(',');
        }
        out.push(')');
    } else {
        out.push('[');
        push_items(&mut out, args);
        out.push(']');
    }
    truncate(out)
}

/// `repr(kwargs)`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    let mut out = String::new();
    push_map(&mut out, kwargs);
    truncate(out)
}

/// `repr(value)`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    push(&mut out, value);
    out
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_REPR {
        s = s.chars().take(MAX_REPR).collect();
        s.push_str("...");
    }
    s
}

fn push_items(out: &mut String, items: &[Value]) {
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push(out, v);
    }
}

fn push_map(out: &mut String, map: &Map<String, Value>) {
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_str(out, k);
        out.push_str(": ");
        push(out, v);
    }
    out.push('}');
}

fn push(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(match n.as_str() {
            "NaN" => "nan",
            "Infinity" => "inf",
            "-Infinity" => "-inf",
            text => return out.push_str(&crate::pyjson::python_number_text(text)),
        }),
        Value::String(s) => push_str(out, s),
        Value::Array(items) => {
            out.push('[');
            push_items(out, items);
            out.push(']');
        }
        Value::Object(map) => push_map(out, map),
    }
}

fn push_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reprs_read_like_python() {
        assert_eq!(args_repr(&[json!(2), json!(3)], true), "(2, 3)");
        assert_eq!(args_repr(&[json!("a")], true), "('a',)");
        assert_eq!(args_repr(&[], true), "()");
        assert_eq!(args_repr(&[json!(2)], false), "[2]");
        assert_eq!(kwargs_repr(json!({"z": 4, "b": [true, null]}).as_object().unwrap()), "{'z': 4, 'b': [True, None]}");
        assert_eq!(repr(&json!("it's")), "\"it's\"");
        assert_eq!(repr(&json!("héllo\n")), "'héllo\\n'");
        let numbers = crate::pyjson::from_str("[18446744073709551617, 1e16, -0.0, NaN, Infinity, -Infinity]").unwrap();
        assert_eq!(repr(&numbers), "[18446744073709551617, 1e+16, -0.0, nan, inf, -inf]");
    }
}
