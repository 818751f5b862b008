//! Strict JSON for outside files (duplicate keys rejected at every depth, NaN/Infinity rejected
//! by serde_json) and a writer byte-compatible with Python's `json.dumps(indent=2,
//! sort_keys=True)`, which transformers uses for `config.json`.

use crate::quant_state::python_float_repr;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Largest JSON file we read from a model folder (config.json, index): far above any real one,
/// low enough that a hostile file cannot make us allocate without bound.
pub(crate) const MAX_JSON_BYTES: u64 = 64 << 20;

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("non-finite number {v}")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(StrictValue(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// Parse JSON strictly: UTF-8, one value, no duplicate keys at any depth, no NaN/Infinity.
pub(crate) fn parse_strict(bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let StrictValue(v) = StrictValue::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

/// Python's `json.dumps(value, indent=2, sort_keys=True)` (ASCII-escaped strings, `repr` floats).
pub(crate) fn python_dumps_indent2_sorted(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, 0, &mut out);
    out
}

fn write_value(v: &Value, depth: usize, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&python_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(depth + 1, out);
                write_value(x, depth + 1, out);
            }
            newline(depth, out);
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = m.keys().collect();
            // Python sorts str keys by code point; Rust's str order is byte order of UTF-8,
            // which is the same order.
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(depth + 1, out);
                write_string(k, out);
                out.push_str(": ");
                write_value(&m[k.as_str()], depth + 1, out);
            }
            newline(depth, out);
            out.push('}');
        }
    }
}

fn newline(depth: usize, out: &mut String) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parse_rejects_duplicates_and_nan() {
        assert!(parse_strict(br#"{"a": 1, "b": {"c": 1, "c": 2}}"#)
            .unwrap_err()
            .contains("duplicate key \"c\""));
        assert!(parse_strict(br#"{"a": NaN}"#).is_err());
        assert!(parse_strict(br#"{"a": 1} x"#).is_err());
        assert!(parse_strict(b"\xff").unwrap_err().contains("UTF-8"));
        assert_eq!(parse_strict(br#"{"a": [1, 2.5]}"#).unwrap()["a"][1], 2.5);
    }

    #[test]
    fn python_dumps_matches_python() {
        // json.dumps({"z": 1e-06, "a": [], "b": {}, "c": [6.0, null, true], "é": "x\u00e9\n"},
        //            indent=2, sort_keys=True)
        let v = parse_strict(
            "{\"z\": 1e-06, \"a\": [], \"b\": {}, \"c\": [6.0, null, true], \"\u{e9}\": \"x\u{e9}\\n\"}"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            python_dumps_indent2_sorted(&v),
            "{\n  \"a\": [],\n  \"b\": {},\n  \"c\": [\n    6.0,\n    null,\n    true\n  ],\n  \"z\": 1e-06,\n  \"\\u00e9\": \"x\\u00e9\\n\"\n}"
        );
    }
}
