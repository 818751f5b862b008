//! Fuzz the `config.json` parser and the checks of its `quantization_config`.
#![cfg_attr(fuzzing, no_main)]

qlora_fuzz::target!(
    "config_json",
    [
        include_bytes!("../../testdata/checkpoints/tiny-llama-nf4-dq/config.json").as_slice(),
        include_bytes!("../../testdata/checkpoints/tiny-llama-bf16/config.json").as_slice(),
    ],
    qlora_fuzz::check_config_json
);
