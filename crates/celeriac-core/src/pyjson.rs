//! Python's JSON, exactly: what `json.loads` reads and what `json.dumps` writes.
//!
//! Celery's JSON serializer (kombu's `kombu/utils/json.py`, over the standard library's `json`)
//! differs from strict JSON in three ways that change values if ignored:
//! - integers have no size limit (`2**64 + 1`, `10**30`);
//! - a float is written as Python's `repr(float)`: the shortest digits that read back as the same
//!   float, in fixed notation between `1e-4` and `1e16`, else `d.ddde+XX` (`1e+16`, `5e-324`,
//!   `1.7976931348623157e+308`, `-0.0`);
//! - `NaN`, `Infinity` and `-Infinity` are literals.
//!
//! celeriac keeps every number as the text it arrived as (`serde_json`'s `arbitrary_precision`),
//! so a `Value` holds any integer and any float exactly and costs nothing to carry through.
//! [`from_slice`] reads the three literals too (a strict parse first; the literals only on the
//! rare input that needs them), and [`to_vec`] writes numbers as Python would: integers as they
//! are, floats re-spelled as `repr` (so a float made in Rust, or written `1E5` by hand, comes out
//! as Python writes it). The literals are held as numbers whose text is the literal
//! ([`nan`], [`infinity`]), so `f64` deserialization reads them as the IEEE values.
//!
//! A `Value` holding one of the literals must not pass through `serde_json::to_value` or
//! `from_value::<Value>`: serde_json re-parses number text there and refuses them. [`to_value`]
//! and [`from_value`] go around that for the types that can hold them.

use std::any::TypeId;
use std::borrow::Cow;
use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Number, Value};

/// Python's `NaN` as a JSON number.
pub fn nan() -> Number {
    literal("NaN")
}

/// Python's `Infinity` (`negative`: `-Infinity`) as a JSON number.
pub fn infinity(negative: bool) -> Number {
    literal(if negative { "-Infinity" } else { "Infinity" })
}

/// A number holding one of Python's non-finite literals. serde_json has no public way to make a
/// number from text it would not parse itself; `from_string_unchecked` is its constructor for
/// exactly that (hidden from its docs). The unit tests pin its behaviour, so a serde_json that
/// changes it fails them rather than changing values.
fn literal(text: &'static str) -> Number {
    Number::from_string_unchecked(text.to_string())
}

/// A float as a JSON number, spelled as Python writes it (`repr`, or `NaN`/`Infinity`/
/// `-Infinity`).
pub fn float(f: f64) -> Number {
    if f.is_nan() {
        nan()
    } else if f.is_infinite() {
        infinity(f < 0.0)
    } else {
        Number::from_string_unchecked(float_text(f))
    }
}

/// Whether a number is an integer (Python `int`) rather than a float.
pub fn is_int(n: &Number) -> bool {
    let digits = n.as_str().strip_prefix('-').unwrap_or(n.as_str());
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A number as Python's `float(x)`: a float's value (`NaN` and the infinities included), an
/// integer rounded to the nearest float; `None` for an integer too large for a float (Python's
/// `OverflowError: int too large to convert to float`).
pub fn as_f64(n: &Number) -> Option<f64> {
    let f = n.as_str().parse::<f64>().ok()?;
    if f.is_infinite() && is_int(n) {
        return None;
    }
    Some(f)
}

/// The JSON text of a float as Python's `json.dumps` writes it: `repr(f)` for a finite float
/// (`0.1`, `1e+16`, `5e-324`, `-0.0`, `123456789.12345679`), `NaN`, `Infinity`, `-Infinity`.
///
/// CPython's `float_repr` (`Python/pystrtod.c`, mode `'r'`): the shortest digits that round-trip,
/// with an exponent when the decimal point would sit more than 16 places right of the first digit
/// or 4 or more places left of it; exponent signed and at least two digits.
pub fn float_text(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f < 0.0 { "-Infinity" } else { "Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr: `1.2345e-7`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let mut digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut exp = exp;
    if digits.len() >= 16 {
        if let Some((even, even_exp)) = round_half_even(f.abs(), &digits) {
            (digits, exp) = (even, even_exp);
        }
    }
    let decpt = exp + 1; // the value is 0.<digits> * 10**decpt
    let mut out = String::with_capacity(digits.len() + 8);
    if negative {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs());
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', decpt.unsigned_abs() as usize));
        out.push_str(&digits);
    } else {
        let point = decpt as usize;
        if point >= digits.len() {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', point - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
    out
}

/// Python's choice where Rust's differs: when a float lies exactly halfway between the two
/// shortest candidates (`2113325745016023.25`: `…023.2` and `…023.3` both read back as it), Python's
/// dtoa takes the even last digit and Rust's formatter the upper one. A tie needs the exact value
/// to have one digit more than the shortest form, so it is looked for only in long forms (16
/// digits or more) and decided on the exact decimal expansion (at most 767 significant digits).
/// Returns the even candidate's digits and exponent when it differs from `digits`.
fn round_half_even(f: f64, digits: &str) -> Option<(String, i32)> {
    // Cheap test first: the digit after the shortest form, correctly rounded, must be a 5.
    let n = digits.len();
    let next = format!("{f:.n$e}");
    if next.split_once('e').and_then(|(m, _)| m.as_bytes().last().copied()) != Some(b'5') {
        return None;
    }
    let exact = format!("{f:.767e}");
    let (mantissa, exp) = exact.split_once('e')?;
    let exp: i32 = exp.parse().ok()?;
    let all: String = mantissa.chars().filter(|c| *c != '.').collect();
    let significant = all.trim_end_matches('0');
    if significant.len() != n + 1 || !significant.ends_with('5') {
        return None;
    }
    // The candidates are the exact value cut to n digits, and that plus one in the last place.
    let lower = &significant[..n];
    if lower.as_bytes()[n - 1].is_multiple_of(2) {
        return (lower != digits).then(|| (lower.to_string(), exp));
    }
    // The upper candidate is even; it is what Rust already wrote unless the carry changed the
    // length (`…9995` rounding up to `1000…`), which Rust's shortest form handles the same way.
    None
}

/// The text Python writes for a number held as `text`: an integer as is (`-0` as `0`), a float
/// re-spelled by [`float_text`], a literal as is.
pub(crate) fn python_number_text(text: &str) -> Cow<'_, str> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if digits.bytes().all(|b| b == b'0') {
            return Cow::Borrowed("0");
        }
        return Cow::Borrowed(text);
    }
    match text {
        "NaN" | "Infinity" | "-Infinity" => Cow::Borrowed(text),
        _ => match text.parse::<f64>() {
            Ok(f) => Cow::Owned(float_text(f)),
            Err(_) => Cow::Borrowed(text),
        },
    }
}

/// Parse JSON as Python's `json.loads` does: any integer, floats kept as written, and the
/// literals `NaN`, `Infinity`, `-Infinity` outside strings.
///
/// Strict JSON is parsed at serde_json's speed; only input it refuses is scanned for the
/// literals, which are swapped for placeholder numbers (a text found nowhere in the input, so
/// no real number can be taken for one), parsed, and swapped back.
pub fn from_slice(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let strict = match serde_json::from_slice(bytes) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let Some((text, marker)) = replace_literals(bytes) else { return Err(strict) };
    let mut value: Value = serde_json::from_slice(&text)?;
    restore_literals(&mut value, &marker);
    Ok(value)
}

/// [`from_slice`] for text.
pub fn from_str(text: &str) -> Result<Value, serde_json::Error> {
    from_slice(text.as_bytes())
}

/// The non-finite literals Python writes, with the placeholder suffix each becomes.
const LITERALS: [(&[u8], u8); 3] = [(b"-Infinity", b'3'), (b"Infinity", b'2'), (b"NaN", b'1')];

/// The input with every literal outside a string replaced by `<marker><digit>`, and the marker;
/// `None` when there is no literal (the input is simply not JSON).
fn replace_literals(bytes: &[u8]) -> Option<(Vec<u8>, String)> {
    // `-0e-000…0` is a valid number no writer produces; lengthen it until the input lacks it (in
    // either case: serde_json keeps a number's text but writes its `E` as `e`).
    let mut marker = String::from("-0e-");
    marker.extend(std::iter::repeat_n('0', 24));
    while bytes.windows(marker.len()).any(|w| w.eq_ignore_ascii_case(marker.as_bytes())) {
        marker.extend(std::iter::repeat_n('0', 8));
    }
    let mut out = Vec::with_capacity(bytes.len() + 64);
    let (mut in_string, mut escaped, mut found) = (false, false, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some((lit, digit)) = LITERALS.iter().find(|(lit, _)| bytes[i..].starts_with(lit)) {
            out.extend_from_slice(marker.as_bytes());
            out.push(*digit);
            i += lit.len();
            found = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    found.then_some((out, marker))
}

fn restore_literals(value: &mut Value, marker: &str) {
    match value {
        Value::Number(n) => {
            if let Some(rest) = n.as_str().strip_prefix(marker) {
                *n = match rest {
                    "1" => nan(),
                    "2" => infinity(false),
                    "3" => infinity(true),
                    _ => return,
                };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| restore_literals(v, marker)),
        Value::Object(map) => map.values_mut().for_each(|v| restore_literals(v, marker)),
        _ => {}
    }
}

/// Serialize as Python's `json.dumps(value)` does: `", "` and `": "` separators, non-ASCII as
/// `\uXXXX` escapes, numbers as Python writes them.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter { compact: false });
    value.serialize(&mut ser)?;
    Ok(out)
}

/// [`to_vec`], appending to `out`: for a buffer written again and again (a worker's events),
/// which keeps its capacity from one use to the next.
pub fn write_to<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), serde_json::Error> {
    let mut ser = serde_json::Serializer::with_formatter(out, PythonFormatter { compact: false });
    value.serialize(&mut ser)
}

/// [`to_vec`] as text.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    // The formatter writes ASCII only.
    to_vec(value).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// Compact JSON (`[1,2]`, as `Value`'s `Display` writes it, non-ASCII as is) with numbers
/// spelled as Python writes them: for output meant for people and scripts.
pub fn to_compact_string<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter { compact: true });
    // Writing to a Vec does not fail; a map with non-string keys would, and gives "".
    let _ = value.serialize(&mut ser);
    String::from_utf8_lossy(&out).into_owned()
}

/// `serde_json::to_value`, keeping non-finite floats: a `Value`, `Number`, `f64` or `f32` is
/// converted directly (serde_json would turn `NaN` into `null`, or refuse a `Value` holding it).
pub fn to_value<T: Serialize + 'static>(value: T) -> Result<Value, serde_json::Error> {
    let any: &dyn std::any::Any = &value;
    if let Some(v) = any.downcast_ref::<Value>() {
        return Ok(v.clone());
    }
    if let Some(n) = any.downcast_ref::<Number>() {
        return Ok(Value::Number(n.clone()));
    }
    if let Some(f) = any.downcast_ref::<f64>() {
        return Ok(Value::Number(float(*f)));
    }
    if let Some(f) = any.downcast_ref::<f32>() {
        return Ok(Value::Number(float(f64::from(*f))));
    }
    serde_json::to_value(value)
}

/// `serde_json::from_value`, keeping non-finite floats: a `Value` or `Number` is handed over as
/// it is.
pub fn from_value<T: DeserializeOwned + 'static>(value: Value) -> Result<T, serde_json::Error> {
    if TypeId::of::<T>() == TypeId::of::<Value>() {
        let boxed: Box<dyn std::any::Any> = Box::new(value);
        return boxed.downcast::<T>().map(|t| *t).map_err(|_| serde::de::Error::custom("not a Value"));
    }
    if TypeId::of::<T>() == TypeId::of::<Number>() {
        if let Value::Number(n) = value {
            let boxed: Box<dyn std::any::Any> = Box::new(n);
            return boxed.downcast::<T>().map(|t| *t).map_err(|_| serde::de::Error::custom("not a Number"));
        }
    }
    serde_json::from_value(value)
}

/// A `serde_json` formatter that writes what CPython's `json.dumps` writes with default options
/// (`", "` and `": "`, non-ASCII escaped), or with `compact` serde_json's compact layout; numbers
/// as Python writes them either way.
struct PythonFormatter {
    compact: bool,
}

impl PythonFormatter {
    fn separator<W: ?Sized + std::io::Write>(&self, writer: &mut W, first: bool) -> std::io::Result<()> {
        match (first, self.compact) {
            (true, _) => Ok(()),
            (false, true) => writer.write_all(b","),
            (false, false) => writer.write_all(b", "),
        }
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        self.separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(if self.compact { b":" } else { b": " })
    }

    fn write_f64<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, value: f64) -> std::io::Result<()> {
        writer.write_all(float_text(value).as_bytes())
    }

    fn write_f32<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, value: f32) -> std::io::Result<()> {
        writer.write_all(float_text(f64::from(value)).as_bytes())
    }

    fn write_number_str<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, value: &str) -> std::io::Result<()> {
        writer.write_all(python_number_text(value).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if self.compact || fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut buf = [0u16; 2];
        for ch in fragment.chars() {
            if ch.is_ascii() {
                writer.write_all(&[ch as u8])?;
            } else {
                for unit in ch.encode_utf16(&mut buf) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// JSON text carried undecoded: the rest of a chain, which every step of a chain receives and
/// passes on minus one step, travels from message to message as the bytes it arrived as instead
/// of being decoded into values and encoded again at every step.
///
/// The text is always valid Python JSON (it came out of a body [`from_slice`] accepted, or out of
/// [`to_vec`]); it may hold `NaN` and `Infinity`, so strict readers are tried first and
/// [`from_str`] is the fallback.
#[derive(Debug, Clone)]
pub struct RawJson(Box<str>);

impl RawJson {
    /// The text of `value` as [`to_vec`] writes it.
    pub fn from_value(value: &Value) -> Self {
        // A `Value` always serializes (its map keys are strings).
        RawJson(to_string(value).unwrap_or_else(|_| "null".into()).into_boxed_str())
    }

    /// Text already checked to be JSON by a strict parse (`serde_json`'s `RawValue`).
    pub fn from_raw(raw: Box<serde_json::value::RawValue>) -> Self {
        RawJson(raw.into())
    }

    /// A JSON list written from its items' texts, in order (`[a, b, c]`, Python's separators).
    pub fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> Self {
        let mut text = String::from("[");
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            text.push_str(item);
        }
        text.push(']');
        RawJson(text.into_boxed_str())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value the text holds. Fails only on text that is not JSON, which a `RawJson` never
    /// holds.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        from_str(&self.0)
    }

    /// The items' texts, when the text is a list that strict JSON reads (no `NaN`); `None`
    /// otherwise (read it with [`to_value`](Self::to_value) then).
    pub fn items(&self) -> Option<Vec<&serde_json::value::RawValue>> {
        serde_json::from_str(&self.0).ok()
    }
}

impl PartialEq for RawJson {
    /// Equal when the values are (the texts may differ in spacing or number spelling).
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 || matches!((self.to_value(), other.to_value()), (Ok(a), Ok(b)) if a == b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(v: &Value) -> String {
        to_string(v).unwrap()
    }

    fn round_trip(text: &str) -> String {
        dumps(&from_str(text).unwrap())
    }

    /// Lines `<python json.dumps output>` written by `tests/fixtures/python_json/numbers.py`: the
    /// issue's values, their neighbours and random floats, each as Python writes it.
    const FIXTURE: &str = include_str!("../../../tests/fixtures/python_json/numbers.txt");

    #[test]
    fn python_written_numbers_come_back_byte_for_byte() {
        let mut count = 0;
        for line in FIXTURE.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            assert_eq!(round_trip(line), line, "value written by Python");
            count += 1;
        }
        assert!(count > 1000, "fixture has {count} values");
    }

    #[test]
    fn floats_made_in_rust_are_spelled_as_python_repr() {
        // `(rust value, what Python's json.dumps writes for the same float)`, from the fixture's
        // pairs section.
        let mut checked = 0;
        for line in FIXTURE.lines().filter_map(|l| l.strip_prefix("# bits ")) {
            let (bits, text) = line.split_once(' ').unwrap();
            let f = f64::from_bits(u64::from_str_radix(bits, 16).unwrap());
            assert_eq!(float_text(f), text, "float with bits {bits}");
            assert_eq!(dumps(&Value::Number(float(f))), text);
            checked += 1;
        }
        assert!(checked > 1000, "fixture has {checked} float pairs");
    }

    #[test]
    fn big_integers_and_literals_keep_their_value() {
        let v = from_str(r#"[18446744073709551617, -18446744073709551616, NaN, Infinity, -Infinity, "NaN"]"#).unwrap();
        assert_eq!(dumps(&v), r#"[18446744073709551617, -18446744073709551616, NaN, Infinity, -Infinity, "NaN"]"#);
        assert!(as_f64(v[2].as_number().unwrap()).unwrap().is_nan());
        assert_eq!(as_f64(v[3].as_number().unwrap()), Some(f64::INFINITY));
        assert_eq!(as_f64(v[4].as_number().unwrap()), Some(f64::NEG_INFINITY));
        assert_eq!(v[5], Value::String("NaN".into()));
        assert!(is_int(v[0].as_number().unwrap()) && !is_int(v[2].as_number().unwrap()));
        // Deserializing to f64 reads the literals as the IEEE values.
        let f: Vec<f64> = serde_json::from_value(Value::Array(vec![v[2].clone(), v[3].clone()])).unwrap();
        assert!(f[0].is_nan() && f[1] == f64::INFINITY);
    }

    #[test]
    fn literals_inside_strings_and_escapes_are_left_alone() {
        let text = r#"{"a\"NaN": "Infinity \\", "b": [NaN, {"c": -Infinity}], "-0E-000000000000000000000000": 1}"#;
        assert_eq!(round_trip(text), text);
        // A number that looks like the placeholder is kept as the number it is.
        let tricky = r#"[NaN, -0E-0000000000000000000000001]"#;
        assert_eq!(round_trip(tricky), "[NaN, -0.0]");
    }

    #[test]
    fn not_json_is_still_refused() {
        for bad in ["[nan]", "[-NaN]", "[NaNa]", "[Infinit]", "{", "[1,]", "[+1]", "['x']"] {
            assert!(from_str(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn non_python_spellings_are_written_as_python_would() {
        assert_eq!(round_trip("[1E5, 1e400, -0, 0.10, 2.50e-3]"), "[100000.0, Infinity, 0, 0.1, 0.0025]");
        assert_eq!(dumps(&serde_json::json!(1e16)), "1e+16");
        assert_eq!(dumps(&Value::Number(float(f64::NAN))), "NaN");
        // 2113325745016023.25, exactly halfway between two 17-digit forms: Python takes the even one.
        assert_eq!(float_text(f64::from_bits(0x431e083bf94e335d)), "2113325745016023.2");
        let v = from_str(r#"{"a": [1E5, NaN, 18446744073709551617, "é"]}"#).unwrap();
        assert_eq!(to_compact_string(&v), r#"{"a":[100000.0,NaN,18446744073709551617,"é"]}"#);
    }

    #[test]
    fn to_and_from_value_keep_non_finite_floats() {
        assert_eq!(dumps(&to_value(f64::NEG_INFINITY).unwrap()), "-Infinity");
        let v = from_str("[NaN]").unwrap();
        assert_eq!(dumps(&to_value(v.clone()).unwrap()), "[NaN]");
        let back: Value = from_value(v.clone()).unwrap();
        assert_eq!(back, v);
        let n: Number = from_value(v[0].clone()).unwrap();
        assert_eq!(n.as_str(), "NaN");
        assert!(from_value::<Number>(Value::Bool(true)).is_err());
        assert_eq!(from_value::<u8>(serde_json::json!(7)).unwrap(), 7);
    }
}
