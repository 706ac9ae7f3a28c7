//! Decoding task arguments into Rust types without changing a number on the way.
//!
//! `serde_json::from_value` reads a number into whatever the Rust type asks for; with numbers kept
//! as text (see [`crate::pyjson`]) an integer that does not fit is refused, but only as "invalid
//! number", and an integer beyond the float range becomes `inf`. [`Strict`] is a deserializer
//! over a `Value` that answers each numeric request itself, recursively through lists, maps and
//! options, and records what went wrong as Python would name it:
//! - an integer that does not fit the integer type: `OverflowError` (`int 2**70 … i64`);
//! - an integer too large for a float: `OverflowError` (Python's `int too large to convert to
//!   float`), a finite float beyond `f32`: `OverflowError`;
//! - a float (or `NaN`/`Infinity`) where an integer type is wanted: `TypeError`.
//!
//! Everything else is handed to `Value`'s own deserializer.

use std::cell::Cell;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::pyjson;

/// What kind of Python exception a refused number is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProblemKind {
    /// The value does not fit (`OverflowError`).
    Overflow,
    /// The value is of the wrong kind (`TypeError`).
    Type,
}

/// Why a number was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) kind: ProblemKind,
    pub(crate) message: String,
}

/// A deserializer over `value` that checks every number it hands out.
pub(crate) struct Strict<'p> {
    value: Value,
    problem: &'p Cell<Option<Problem>>,
}

impl<'p> Strict<'p> {
    /// Deserialize `value`; a refused number is also left in `problem`.
    pub(crate) fn new(value: Value, problem: &'p Cell<Option<Problem>>) -> Self {
        Strict { value, problem }
    }

    fn refuse(&self, kind: ProblemKind, message: String) -> serde_json::Error {
        self.problem.set(Some(Problem { kind, message: message.clone() }));
        de::Error::custom(message)
    }

    /// The number's text when it is an integer; a problem naming `rust_type` when it is a float.
    fn integer_text(&self, n: &Number, rust_type: &str) -> Result<String, serde_json::Error> {
        if pyjson::is_int(n) {
            Ok(n.as_str().to_string())
        } else {
            Err(self.refuse(
                ProblemKind::Type,
                format!(
                    "expected an integer ({rust_type}), got float {}",
                    pyjson::float_text(pyjson::as_f64(n).unwrap_or(f64::NAN))
                ),
            ))
        }
    }

    fn float(&self, n: &Number, rust_type: &str) -> Result<f64, serde_json::Error> {
        match pyjson::as_f64(n) {
            Some(f) => Ok(f),
            None => Err(self.refuse(
                ProblemKind::Overflow,
                format!("int {} is too large to convert to float ({rust_type})", n.as_str()),
            )),
        }
    }
}

macro_rules! strict_int {
    ($($method:ident => $visit:ident : $ty:ty),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
            match &self.value {
                Value::Number(n) => {
                    let text = self.integer_text(n, stringify!($ty))?;
                    match text.parse::<$ty>() {
                        Ok(i) => visitor.$visit(i),
                        Err(_) => Err(self.refuse(
                            ProblemKind::Overflow,
                            format!("int {text} is out of range for {}", stringify!($ty)),
                        )),
                    }
                }
                _ => self.value.$method(visitor),
            }
        }
    )*};
}

macro_rules! delegate {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
            self.value.$method(visitor)
        }
    )*};
}

impl<'de> Deserializer<'de> for Strict<'_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Array(items) => visitor.visit_seq(Seq { items: items.into_iter(), problem: self.problem }),
            Value::Object(map) => visitor.visit_map(Entries::new(map, self.problem)),
            other => other.deserialize_any(visitor),
        }
    }

    strict_int! {
        deserialize_i8 => visit_i8: i8, deserialize_i16 => visit_i16: i16, deserialize_i32 => visit_i32: i32,
        deserialize_i64 => visit_i64: i64, deserialize_i128 => visit_i128: i128,
        deserialize_u8 => visit_u8: u8, deserialize_u16 => visit_u16: u16, deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64, deserialize_u128 => visit_u128: u128,
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
        match &self.value {
            Value::Number(n) => visitor.visit_f64(self.float(n, "f64")?),
            _ => self.value.deserialize_f64(visitor),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
        match &self.value {
            Value::Number(n) => {
                let f = self.float(n, "f32")?;
                let narrow = f as f32;
                if f.is_finite() && narrow.is_infinite() {
                    return Err(self.refuse(
                        ProblemKind::Overflow,
                        format!("float {} is out of range for f32", pyjson::float_text(f)),
                    ));
                }
                visitor.visit_f32(narrow)
            }
            _ => self.value.deserialize_f32(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Array(_) => self.deserialize_any(visitor),
            other => other.deserialize_seq(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Array(_) => self.deserialize_any(visitor),
            other => other.deserialize_tuple(len, visitor),
        }
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Array(_) => self.deserialize_any(visitor),
            other => other.deserialize_tuple_struct(name, len, visitor),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Object(_) => self.deserialize_any(visitor),
            other => other.deserialize_map(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        match self.value {
            Value::Object(_) => self.deserialize_any(visitor),
            other => other.deserialize_struct(name, fields, visitor),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        self.value.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        self.value.deserialize_unit_struct(name, visitor)
    }

    delegate!(
        deserialize_bool,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_identifier,
        deserialize_ignored_any
    );
}

struct Seq<'p> {
    items: std::vec::IntoIter<Value>,
    problem: &'p Cell<Option<Problem>>,
}

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, serde_json::Error> {
        self.items.next().map(|v| seed.deserialize(Strict::new(v, self.problem))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Entries<'p> {
    entries: serde_json::map::IntoIter,
    pending: Option<Value>,
    problem: &'p Cell<Option<Problem>>,
}

impl<'p> Entries<'p> {
    fn new(map: Map<String, Value>, problem: &'p Cell<Option<Problem>>) -> Self {
        Entries { entries: map.into_iter(), pending: None, problem }
    }
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, serde_json::Error> {
        match self.entries.next() {
            Some((key, value)) => {
                self.pending = Some(value);
                seed.deserialize(key.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, serde_json::Error> {
        let value = self.pending.take().ok_or_else(|| de::Error::custom("value without a key"))?;
        seed.deserialize(Strict::new(value, self.problem))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}
