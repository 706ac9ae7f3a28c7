//! Result handles of applied signatures, in Celery's tuple form (`celery/result.py`
//! `AsyncResult.as_tuple`, `GroupResult.as_tuple`, read back by `result_from_tuple`): what a
//! task's stored `children` lists, so Python's `AsyncResult.children` finds them.

use serde_json::Value;

/// The result of an applied signature: one task's, or a group's.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultRef {
    /// One task: its id and, for a chord body or a chain step, the result it follows.
    Task {
        /// The task id.
        id: String,
        /// The parent result (a chord's header group, a chain's previous step).
        parent: Option<Box<ResultRef>>,
    },
    /// A group: its id and its members' results, in order.
    Group {
        /// The group id.
        id: String,
        /// The parent result, if any.
        parent: Option<Box<ResultRef>>,
        /// The members.
        results: Vec<ResultRef>,
    },
}

impl ResultRef {
    /// A task's result with no parent.
    pub fn task(id: impl Into<String>) -> Self {
        ResultRef::Task { id: id.into(), parent: None }
    }

    /// This result with `before` put before its earliest ancestor, as Celery links a chain's
    /// step to the one before it and a chord's body (a chain's first step, if the body is a
    /// chain) to its header.
    pub fn after(self, before: Option<ResultRef>) -> Self {
        let Some(before) = before else { return self };
        let attach = |parent: Option<Box<ResultRef>>| {
            Some(Box::new(match parent {
                Some(p) => p.after(Some(before)),
                None => before,
            }))
        };
        match self {
            ResultRef::Task { id, parent } => ResultRef::Task { id, parent: attach(parent) },
            ResultRef::Group { id, parent, results } => ResultRef::Group { id, parent: attach(parent), results },
        }
    }

    /// The task or group id.
    pub fn id(&self) -> &str {
        match self {
            ResultRef::Task { id, .. } | ResultRef::Group { id, .. } => id,
        }
    }

    /// Celery's tuple: `[[id, parent_tuple], null]` for a task, `[[id, parent_tuple],
    /// [member tuples]]` for a group.
    pub fn as_tuple(&self) -> Value {
        let head = |id: &str, parent: &Option<Box<ResultRef>>| {
            Value::Array(vec![Value::String(id.to_string()), parent.as_ref().map_or(Value::Null, |p| p.as_tuple())])
        };
        match self {
            ResultRef::Task { id, parent } => Value::Array(vec![head(id, parent), Value::Null]),
            ResultRef::Group { id, parent, results } => {
                Value::Array(vec![head(id, parent), Value::Array(results.iter().map(ResultRef::as_tuple).collect())])
            }
        }
    }

    /// Read a tuple back (Celery's `result_from_tuple`); `None` when it is not one.
    pub fn from_tuple(value: &Value) -> Option<Self> {
        let Value::Array(pair) = value else { return None };
        let (head, members) = match pair.as_slice() {
            [head, members] => (head, members),
            _ => return None,
        };
        let Value::Array(head) = head else { return None };
        let (id, parent) = match head.as_slice() {
            [Value::String(id), parent] => (id.clone(), parent),
            _ => return None,
        };
        let parent = if parent.is_null() { None } else { Some(Box::new(Self::from_tuple(parent)?)) };
        match members {
            Value::Null => Some(ResultRef::Task { id, parent }),
            Value::Array(items) => {
                let results = items.iter().map(Self::from_tuple).collect::<Option<Vec<_>>>()?;
                Some(ResultRef::Group { id, parent, results })
            }
            _ => None,
        }
    }
}

/// The stored form of a saved group (Celery's `_save_group`): `{"result": <tuple>}`.
pub fn saved_group(group: &ResultRef) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert("result".into(), group.as_tuple());
    crate::pyjson::to_vec(&Value::Object(m)).unwrap_or_default()
}

/// Read a saved group back; `None` when the bytes are not one.
pub fn read_saved_group(bytes: &[u8]) -> Option<ResultRef> {
    let v = crate::pyjson::from_slice(bytes).ok()?;
    ResultRef::from_tuple(v.get("result")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tuples_are_celerys_and_read_back() {
        let group = ResultRef::Group {
            id: "g".into(),
            parent: None,
            results: vec![ResultRef::task("a"), ResultRef::task("b")],
        };
        let body = ResultRef::Task { id: "c".into(), parent: Some(Box::new(group.clone())) };
        assert_eq!(group.as_tuple(), json!([["g", null], [[["a", null], null], [["b", null], null]]]));
        assert_eq!(body.as_tuple(), json!([["c", [["g", null], [[["a", null], null], [["b", null], null]]]], null]));
        assert_eq!(ResultRef::from_tuple(&body.as_tuple()), Some(body));
        assert_eq!(ResultRef::from_tuple(&json!(["x"])), None);
        assert_eq!(read_saved_group(&saved_group(&group)), Some(group.clone()));
        assert_eq!(
            saved_group(&group),
            br#"{"result": [["g", null], [[["a", null], null], [["b", null], null]]]}"#.to_vec()
        );
    }
}
