//! Fuzz the lazy model reader (own header validation, per-tensor maps) on a file.
#![cfg_attr(fuzzing, no_main)]

qlora_fuzz::target!(
    "model_file",
    [
        include_bytes!("../../testdata/checkpoints/tiny-llama-nf4-dq/model.safetensors").as_slice(),
        include_bytes!("../../testdata/malformed/qs-absmax-count.safetensors").as_slice(),
        include_bytes!("../../testdata/malformed/qs-packed-length.safetensors").as_slice(),
        include_bytes!("../../testdata/malformed/overlapping-tensors.safetensors").as_slice(),
    ],
    qlora_fuzz::check_model_file
);
