//! The per-tensor quant-state JSON blob (`<name>.quant_state.bitsandbytes__nf4` / `__fp4`):
//! written byte-identically to bitsandbytes' `QuantState.as_dict(packed=True)` (Python's
//! `json.dumps` with default separators), parsed strictly.

use qlora_codec::{check_blocksize, Dtype, QuantType};
use serde_json::Value;

/// The blocksize bitsandbytes always uses for the nested quantization of the absmax.
pub(crate) const NESTED_BLOCKSIZE: usize = qlora_double_quant::NESTED_BLOCKSIZE;

/// Largest number of elements a quantized tensor may declare (bitsandbytes' kernels index with
/// 32-bit ints; we allow 2^40 so that no header can make us allocate absurd buffers).
pub const MAX_NUMEL: usize = 1 << 40;

/// The non-tensor part of a bitsandbytes 4-bit `QuantState`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per absmax block.
    pub blocksize: usize,
    /// Dtype of the original (dequantized) tensor.
    pub dtype: Dtype,
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// The mean offset of double quantization, if the absmax is double-quantized.
    pub nested_offset: Option<f32>,
}

/// Why a quant-state blob was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantStateError {
    /// Not UTF-8 / not JSON / not an object.
    #[error("not a JSON object: {0}")]
    Json(String),
    /// A key bitsandbytes' `QuantState.from_dict` would reject.
    #[error("unexpected key {0:?}")]
    UnknownKey(String),
    /// A required key is absent.
    #[error("missing key {0:?}")]
    MissingKey(&'static str),
    /// A key with a value of the wrong type or out of range.
    #[error("bad value for {key:?}: {reason}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn bad(key: &'static str, reason: impl Into<String>) -> QuantStateError {
    QuantStateError::BadValue {
        key,
        reason: reason.into(),
    }
}

impl QuantState {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the absmax is double-quantized.
    pub fn is_double_quant(&self) -> bool {
        self.nested_offset.is_some()
    }

    /// The exact bytes bitsandbytes writes: `json.dumps` of `{"quant_type", "blocksize", "dtype",
    /// "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}` in that order, with `", "`
    /// and `": "` separators and Python's float `repr` for the offset.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.as_str(),
            self.blocksize,
            self.dtype.torch_name(),
            shape.join(", ")
        );
        if let Some(offset) = self.nested_offset {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(offset as f64)
            ));
        }
        s.push('}');
        s.into_bytes()
    }

    /// Parse a blob strictly: no duplicate keys, only the keys `QuantState.from_dict` accepts, values of the right
    /// type and range, a shape whose element count is at most [`MAX_NUMEL`], a finite offset.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, QuantStateError> {
        let value: Value = crate::json::parse_strict(bytes).map_err(QuantStateError::Json)?;
        let Value::Object(map) = value else {
            return Err(QuantStateError::Json("top level is not an object".into()));
        };
        const ALLOWED: [&str; 12] = [
            "absmax",
            "quant_map",
            "nested_absmax",
            "nested_quant_map",
            "quant_state",
            "quant_type",
            "blocksize",
            "dtype",
            "shape",
            "nested_blocksize",
            "nested_dtype",
            "nested_offset",
        ];
        if let Some(k) = map.keys().find(|k| !ALLOWED.contains(&k.as_str())) {
            return Err(QuantStateError::UnknownKey(k.clone()));
        }
        let get = |k: &'static str| map.get(k).ok_or(QuantStateError::MissingKey(k));
        let quant_type = get("quant_type")?
            .as_str()
            .ok_or_else(|| bad("quant_type", "not a string"))?;
        let quant_type =
            QuantType::parse(quant_type).map_err(|e| bad("quant_type", e.to_string()))?;
        let blocksize = get("blocksize")?
            .as_u64()
            .ok_or_else(|| bad("blocksize", "not a non-negative integer"))?;
        let blocksize = usize::try_from(blocksize).map_err(|_| bad("blocksize", "too large"))?;
        check_blocksize(blocksize).map_err(|e| bad("blocksize", e.to_string()))?;
        let dtype = get("dtype")?
            .as_str()
            .ok_or_else(|| bad("dtype", "not a string"))?;
        let dtype = Dtype::from_torch_name(dtype).map_err(|e| bad("dtype", e.to_string()))?;
        let shape = get("shape")?
            .as_array()
            .ok_or_else(|| bad("shape", "not a list"))?;
        if shape.len() > 8 {
            return Err(bad("shape", format!("{} dimensions", shape.len())));
        }
        let shape: Vec<usize> = shape
            .iter()
            .map(|d| {
                d.as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| {
                        bad(
                            "shape",
                            format!("dimension {d} is not a non-negative integer"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_NUMEL)
            .ok_or_else(|| bad("shape", format!("{shape:?} has too many elements")))?;
        let _ = numel;
        let nested_keys = ["nested_blocksize", "nested_dtype", "nested_offset"];
        let present = nested_keys.iter().filter(|k| map.contains_key(**k)).count();
        let nested_offset = match present {
            0 => None,
            3 => {
                let nb = map["nested_blocksize"].as_u64();
                if nb != Some(NESTED_BLOCKSIZE as u64) {
                    return Err(bad(
                        "nested_blocksize",
                        format!(
                            "{} is not supported (bitsandbytes uses {NESTED_BLOCKSIZE})",
                            map["nested_blocksize"]
                        ),
                    ));
                }
                if map["nested_dtype"].as_str() != Some("float32") {
                    return Err(bad(
                        "nested_dtype",
                        format!("{} is not \"float32\"", map["nested_dtype"]),
                    ));
                }
                let off = map["nested_offset"]
                    .as_f64()
                    .ok_or_else(|| bad("nested_offset", "not a number"))?;
                let off32 = off as f32;
                if !off32.is_finite() {
                    return Err(bad("nested_offset", format!("{off} is not a finite f32")));
                }
                Some(off32)
            }
            _ => {
                return Err(QuantStateError::MissingKey(
                    nested_keys
                        .iter()
                        .find(|k| !map.contains_key(**k))
                        .copied()
                        .unwrap_or("nested_offset"),
                ))
            }
        };
        Ok(QuantState {
            quant_type,
            blocksize,
            dtype,
            shape,
            nested_offset,
        })
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for decimal exponents
/// −4 ≤ e < 16 (with at least one fractional digit), scientific otherwise (`1.5e-05`, `1e+16`).
/// Non-finite values are written as `json.dumps` writes them (`NaN`, `Infinity`, `-Infinity`).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's shortest representation gives the number of significant digits; Python then picks
    // the correctly rounded digits of that length (ties to even), which Rust's exact formatting
    // with that precision also produces (the shortest form may round a tie the other way).
    let shortest = format!("{x:e}");
    let significant = shortest
        .split_once('e')
        .expect("LowerExp has an exponent")
        .0
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    let sci = format!("{x:.prec$e}", prec = significant - 1);
    let (mant, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let e = exp as usize;
            let (int, frac) = if digits.len() > e + 1 {
                (digits[..e + 1].to_string(), digits[e + 1..].to_string())
            } else {
                (format!("{digits:0<width$}", width = e + 1), "0".to_string())
            };
            format!("{int}.{frac}")
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_cases() {
        let cases: [(f64, &str); 15] = [
            (10.950759887695312, "10.950759887695312"),
            (0.05686212331056595, "0.05686212331056595"),
            (1.6162109375, "1.6162109375"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (-2.5e-7, "-2.5e-07"),
            (0.0, "0.0"),
            (3.4028234663852886e38, "3.4028234663852886e+38"),
            (0.00012345, "0.00012345"),
        ];
        for (x, s) in cases {
            assert_eq!(python_float_repr(x), s, "{x:e}");
        }
    }

    #[test]
    fn blobs_match_bitsandbytes_examples() {
        let with_dq = QuantState {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            dtype: Dtype::F32,
            shape: vec![200, 300],
            nested_offset: Some(0.056_862_123),
        };
        assert_eq!(
            std::str::from_utf8(&with_dq.to_json_bytes()).unwrap(),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [200, 300], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.05686212331056595}"
        );
        assert_eq!(with_dq.to_json_bytes().len(), 169 - 1 + 1);
        let plain = QuantState {
            quant_type: QuantType::Fp4,
            blocksize: 64,
            dtype: Dtype::F32,
            shape: vec![200, 300],
            nested_offset: None,
        };
        assert_eq!(
            std::str::from_utf8(&plain.to_json_bytes()).unwrap(),
            "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [200, 300]}"
        );
        for s in [with_dq, plain] {
            assert_eq!(QuantState::from_json_bytes(&s.to_json_bytes()).unwrap(), s);
        }
    }

    #[test]
    fn rejects_bad_blobs() {
        let cases: [(&str, &str); 10] = [
            ("[1]", "not a JSON object"),
            ("{\"quant_type\": \"nf4\"", "not a JSON object"),
            ("{\"quant_type\": \"nf5\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2]}", "quant_type"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"float32\", \"shape\": [2]}", "blocksize"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [2]}", "dtype"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [-2]}", "shape"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [4294967296, 4294967296]}", "shape"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2], \"extra\": 1}", "unexpected key"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 1e300}", "nested_offset"),
            ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2], \"nested_blocksize\": 256}", "missing key"),
        ];
        for (blob, want) in cases {
            let err = QuantState::from_json_bytes(blob.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{blob}: {err}");
        }
    }
}
