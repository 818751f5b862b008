//! Will own reading and writing bitsandbytes/transformers 4-bit safetensors checkpoints.
#![forbid(unsafe_code)]
