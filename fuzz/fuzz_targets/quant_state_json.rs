//! Fuzz the quant-state JSON blob parser (and its writer, on whatever it accepts).
#![cfg_attr(fuzzing, no_main)]

qlora_fuzz::target!(
    "quant_state_json",
    [
        br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 176], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05169261619448662}"#.as_slice(),
        br#"{"quant_type": "fp4", "blocksize": 4096, "dtype": "float32", "shape": [200, 300]}"#.as_slice(),
    ],
    qlora_fuzz::check_quant_state_json
);
