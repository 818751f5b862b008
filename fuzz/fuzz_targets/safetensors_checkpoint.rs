//! Fuzz the in-memory safetensors reader: header, 4-bit grouping, member checks, dequantize.
#![cfg_attr(fuzzing, no_main)]

qlora_fuzz::target!(
    "safetensors_checkpoint",
    [
        include_bytes!("../../testdata/checkpoints/tiny-llama-nf4-dq/model.safetensors").as_slice(),
        include_bytes!("../../testdata/malformed/qs-absmax-count.safetensors").as_slice(),
        include_bytes!("../../testdata/malformed/qs-packed-length.safetensors").as_slice(),
        include_bytes!("../../testdata/malformed/overlapping-tensors.safetensors").as_slice(),
    ],
    qlora_fuzz::check_safetensors_checkpoint
);
