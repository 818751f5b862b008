//! Fuzz the `model.safetensors.index.json` parser.
#![cfg_attr(fuzzing, no_main)]

qlora_fuzz::target!(
    "index_json",
    [
        include_bytes!("../../testdata/checkpoints/tiny-llama-bf16/model.safetensors.index.json")
            .as_slice()
    ],
    qlora_fuzz::check_index_json
);
