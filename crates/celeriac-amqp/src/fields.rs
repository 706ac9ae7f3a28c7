//! JSON values to AMQP field tables and back.
//!
//! Celery's headers travel as an AMQP field table. Writing, we use the types py-amqp writes for
//! the same Python values (`amqp/serialization.py` `_write_item`: strings as long strings,
//! integers within ±2147483647 as `I`, other integers as signed 64-bit `L`, floats as doubles,
//! `None` as void, lists as arrays, dicts as tables), so a Python worker reads what a Python
//! client would have sent. An integer beyond 64 bits has no AMQP type (py-amqp fails to pack it
//! too): [`to_table`] refuses it, naming the header, rather than sending another number. A double
//! keeps every float exactly, `NaN` and the infinities included. Reading, every AMQP type maps to
//! the nearest JSON value.

use celeriac_core::pyjson;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// A header value AMQP cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {header:?}: {reason}")]
pub struct FieldError {
    /// The top-level header holding the value.
    pub header: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A JSON object as an AMQP field table.
pub fn to_table(map: &Map<String, Value>) -> Result<FieldTable, FieldError> {
    let mut t = FieldTable::default();
    for (k, v) in map {
        let value = to_amqp(v).map_err(|reason| FieldError { header: k.clone(), reason })?;
        t.insert(ShortString::from(k.as_str()), value);
    }
    Ok(t)
}

/// A JSON value as an AMQP value.
fn to_amqp(v: &Value) -> Result<AMQPValue, String> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) if pyjson::is_int(n) => match n.as_i64() {
            Some(i) if (-2147483647..=2147483647).contains(&i) => AMQPValue::LongInt(i as i32),
            Some(i) => AMQPValue::LongLongInt(i),
            None => return Err(format!("the integer {n} does not fit in AMQP's 64-bit integer")),
        },
        Value::Number(n) => AMQPValue::Double(pyjson::as_f64(n).unwrap_or(f64::NAN)),
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(to_amqp).collect::<Result<Vec<_>, _>>()?))
        }
        Value::Object(m) => {
            let mut t = FieldTable::default();
            for (k, v) in m {
                t.insert(ShortString::from(k.as_str()), to_amqp(v)?);
            }
            AMQPValue::FieldTable(t)
        }
    })
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
        AMQPValue::Float(f) => Value::Number(pyjson::float(f64::from(*f))),
        AMQPValue::Double(f) => Value::Number(pyjson::float(*f)),
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
        let back = from_table(&to_table(h.as_object().unwrap()).unwrap());
        assert_eq!(Value::Object(back), h);
    }

    #[test]
    fn numbers_in_headers_keep_their_value_or_are_refused() {
        let text = r#"{"a": [2147483647, -2147483647, 2147483648, -2147483648, 9223372036854775807, -9223372036854775808], "f": [0.1, 123456789.12345679, 5e-324, 1e+16, -0.0, NaN, Infinity, -Infinity]}"#;
        let h = pyjson::from_str(text).unwrap();
        let table = to_table(h.as_object().unwrap()).unwrap();
        let AMQPValue::FieldArray(ints) = &table.inner()[&ShortString::from("a")] else { panic!("not an array") };
        // py-amqp's choice of `I` or `L`.
        assert!(matches!(
            ints.as_slice()[..4],
            [AMQPValue::LongInt(_), AMQPValue::LongInt(_), AMQPValue::LongLongInt(_), AMQPValue::LongLongInt(_)]
        ));
        assert_eq!(pyjson::to_string(&from_table(&table)).unwrap(), text);
        let big = pyjson::from_str(r#"{"stamps": {"n": 18446744073709551617}}"#).unwrap();
        let e = to_table(big.as_object().unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"header "stamps": the integer 18446744073709551617 does not fit in AMQP's 64-bit integer"#
        );
    }
}
