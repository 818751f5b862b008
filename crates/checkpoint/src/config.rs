//! `config.json`: validation of the keys we read, and the `quantization_config` transformers'
//! `BitsAndBytesConfig.to_dict()` writes for a 4-bit model.

use crate::folder::{json_err, kind};
use crate::Result;
use qlora_codec::{Dtype, QuantizeOptions};
use serde_json::{Map, Value};
use std::path::Path;

/// Key of the quantization block in `config.json`.
pub const QUANTIZATION_CONFIG_KEY: &str = "quantization_config";

/// Check the keys of `config.json` this crate reads: `dtype` / `torch_dtype` (a string or null)
/// and `quantization_config` (an object; if it claims bitsandbytes 4-bit, its 4-bit keys must
/// have the right types and known values).
pub(crate) fn validate(path: &Path, config: &Map<String, Value>) -> Result<()> {
    for key in ["dtype", "torch_dtype"] {
        match config.get(key) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(v) => {
                return Err(json_err(
                    path,
                    key,
                    format!("is {}, expected a dtype name", kind(v)),
                ))
            }
        }
    }
    if let Some(q) = config.get(QUANTIZATION_CONFIG_KEY) {
        let Value::Object(q) = q else {
            return Err(json_err(
                path,
                QUANTIZATION_CONFIG_KEY,
                format!("is {}, not an object", kind(q)),
            ));
        };
        let key = |k: &str| format!("{QUANTIZATION_CONFIG_KEY}.{k}");
        if q.get("quant_method").and_then(Value::as_str) == Some("bitsandbytes") {
            for k in [
                "load_in_4bit",
                "load_in_8bit",
                "bnb_4bit_use_double_quant",
                "_load_in_4bit",
                "_load_in_8bit",
            ] {
                if let Some(v) = q.get(k) {
                    if !v.is_boolean() {
                        return Err(json_err(
                            path,
                            &key(k),
                            format!("is {}, expected true or false", kind(v)),
                        ));
                    }
                }
            }
            if let Some(v) = q.get("bnb_4bit_quant_type") {
                if !matches!(v.as_str(), Some("nf4" | "fp4")) {
                    return Err(json_err(
                        path,
                        &key("bnb_4bit_quant_type"),
                        format!("{v} is not \"nf4\" or \"fp4\""),
                    ));
                }
            }
            if let Some(v) = q.get("llm_int8_threshold") {
                if !v.as_f64().is_some_and(f64::is_finite) {
                    return Err(json_err(
                        path,
                        &key("llm_int8_threshold"),
                        format!("{v} is not a finite number"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether `config.json` declares a bitsandbytes 4-bit model.
pub fn is_bnb_4bit(config: &Map<String, Value>) -> bool {
    config
        .get(QUANTIZATION_CONFIG_KEY)
        .and_then(Value::as_object)
        .is_some_and(|q| {
            q.get("quant_method").and_then(Value::as_str) == Some("bitsandbytes")
                && q.get("load_in_4bit").and_then(Value::as_bool) == Some(true)
        })
}

/// The model's dtype as `config.json` records it (`dtype`, or the older `torch_dtype`), if it is
/// one of the codec's float types.
pub fn config_dtype(config: &Map<String, Value>) -> Option<Dtype> {
    ["dtype", "torch_dtype"]
        .iter()
        .filter_map(|k| config.get(*k).and_then(Value::as_str))
        .find_map(|s| Dtype::from_torch_name(s).ok())
}

/// `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=…, bnb_4bit_use_double_quant=…,
/// bnb_4bit_compute_dtype=…, llm_int8_skip_modules=…).to_dict()` as transformers 5 writes it
/// into `config.json` (the key order does not matter: `config.json` is written with sorted keys).
///
/// `skip_modules` is `None` for transformers' default (keep `lm_head` dense) and otherwise the
/// module names of linear weights left dense.
pub fn bnb_quantization_config(
    opts: &QuantizeOptions,
    compute_dtype: Dtype,
    skip_modules: Option<Vec<String>>,
) -> Value {
    let mut m = Map::new();
    m.insert("_load_in_4bit".into(), true.into());
    m.insert("_load_in_8bit".into(), false.into());
    m.insert(
        "bnb_4bit_compute_dtype".into(),
        compute_dtype.torch_name().into(),
    );
    m.insert("bnb_4bit_quant_storage".into(), "uint8".into());
    m.insert(
        "bnb_4bit_quant_type".into(),
        opts.quant_type.as_str().into(),
    );
    m.insert("bnb_4bit_use_double_quant".into(), opts.double_quant.into());
    m.insert("llm_int8_enable_fp32_cpu_offload".into(), false.into());
    m.insert("llm_int8_has_fp16_weight".into(), false.into());
    m.insert(
        "llm_int8_skip_modules".into(),
        skip_modules.map_or(Value::Null, |v| v.into()),
    );
    m.insert("llm_int8_threshold".into(), 6.0.into());
    m.insert("load_in_4bit".into(), true.into());
    m.insert("load_in_8bit".into(), false.into());
    m.insert("quant_method".into(), "bitsandbytes".into());
    Value::Object(m)
}
