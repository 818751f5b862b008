//! Fuzz 4-bit dequantization of arbitrary bytes (codes, absmax, double-quant absmax).
#![cfg_attr(fuzzing, no_main)]

qlora_fuzz::target!(
    "dequantize_bytes",
    [
        [0u8, 1, 4, 64, 0x12, 0x34, 0x56, 0x78, 0, 0, 128, 63, 0, 0, 0, 64].as_slice(),
        [3u8, 0, 16, 66, 0xff, 0x00, 0x81, 0x7e, 1, 2, 3, 4, 0, 0, 128, 63].as_slice(),
    ],
    qlora_fuzz::check_dequantize_bytes
);
