//! JSON values to AMQP field tables and back.
//!
//! Celery's headers travel as an AMQP field table. Writing, we use the types py-amqp writes for
//! the same Python values (strings as long strings, integers as signed 64-bit, floats as doubles,
//! `None` as void, lists as arrays, dicts as tables), so a Python worker reads what a Python
//! client would have sent. Reading, every AMQP type maps to the nearest JSON value.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// A JSON object as an AMQP field table.
pub fn to_table(map: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in map {
        t.insert(ShortString::from(k.as_str()), to_amqp(v));
    }
    t
}

/// A JSON value as an AMQP value.
pub fn to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            // py-amqp writes `I` (32-bit) when the value fits, else a 64-bit integer.
            (Some(i), _) => match i32::try_from(i) {
                Ok(small) => AMQPValue::LongInt(small),
                Err(_) => AMQPValue::LongLongInt(i),
            },
            (None, Some(f)) if n.is_u64() => AMQPValue::Double(f),
            (None, Some(f)) => AMQPValue::Double(f),
            _ => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(items.iter().map(to_amqp).collect::<Vec<_>>())),
        Value::Object(m) => AMQPValue::FieldTable(to_table(m)),
    }
}

/// An AMQP field table as a JSON object.
pub fn from_table(t: &FieldTable) -> Map<String, Value> {
    t.inner().iter().map(|(k, v)| (k.as_str().to_string(), from_amqp(v))).collect()
}

/// An AMQP value as JSON.
pub fn from_amqp(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map(Value::Number).unwrap_or(Value::Null),
        AMQPValue::Double(f) => Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
        AMQPValue::DecimalValue(d) => Number::from_f64(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(from_amqp).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(from_table(t)),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn celery_headers_round_trip() {
        let h = json!({"task": "t", "retries": 2, "timelimit": [10, null], "ignore_result": false,
                       "stamps": {}, "x": 1.5, "s": "héllo"});
        let back = from_table(&to_table(h.as_object().unwrap()));
        assert_eq!(Value::Object(back), h);
    }
}
