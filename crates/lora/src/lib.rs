//! LoRA/DoRA over a 4-bit base.
#![forbid(unsafe_code)]

pub mod base;
pub mod error;
pub mod init;
pub mod layer;
mod matmul;
pub mod merge;
pub mod peft;

pub use base::{BaseWeight, DenseData};
pub use error::{Error, Result};
pub use layer::{AdapterWeights, ForwardCache, LoraGrads, LoraLinear, LoraParams, Mode};
pub use merge::{
    delta_weight, merge_weight, MergeOptions, MergeOutput, MergeReport, RequantReport,
};
pub use qlora_codec::{Dtype, QuantType, QuantizeOptions, QuantizedTensor};
