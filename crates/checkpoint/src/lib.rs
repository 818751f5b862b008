//! Read and write bitsandbytes/transformers 4-bit safetensors checkpoints, bit-exactly.
//!
//! # Should I use this crate?
//!
//! Use it to load a checkpoint that transformers saved with `load_in_4bit=True` into a Rust
//! engine, or to write one that transformers loads. For the codec alone use `qlora-codec`.
//!
//! # The layout
//!
//! For each quantized weight `NAME` (`n` elements, `nb = ceil(n / blocksize)` blocks) a
//! checkpoint holds:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `NAME` | u8 | `[ceil(n/2), 1]` packed codes |
//! | `NAME.absmax` | f32, or u8 with double quant | `[nb]` |
//! | `NAME.quant_map` | f32 | `[16]` |
//! | `NAME.nested_absmax` (double quant) | f32 | `[ceil(nb/256)]` |
//! | `NAME.nested_quant_map` (double quant) | f32 | `[256]` |
//! | `NAME.quant_state.bitsandbytes__nf4` (or `__fp4`) | u8 | the JSON blob ([`QuantState`]) |
//!
//! Every other tensor is dense and copied unchanged.
//!
//! # Example
//!
//! ```
//! use qlora_checkpoint::{quantized_tensors, read_checkpoint_bytes, write_safetensors, Entry, TensorData};
//! use qlora_codec::{QuantizeOptions, QuantizedTensor};
//!
//! let w: Vec<f32> = (0..96 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = QuantizedTensor::quantize(&w, &[96, 64], QuantizeOptions::qlora())?;
//! let mut tensors = quantized_tensors("layer.weight", &q);
//! tensors.push(("layer.bias".into(), TensorData::from_f32(&[0.5; 96], vec![96])));
//! let bytes = write_safetensors(tensors)?;
//!
//! let checkpoint = read_checkpoint_bytes(&bytes, "in-memory")?;
//! let loaded = checkpoint.quantized("layer.weight")?;
//! assert_eq!(loaded, q);
//! assert!(matches!(checkpoint.entries()[0], Entry::Dense { .. } | Entry::Quantized { .. }));
//! # Ok::<(), qlora_checkpoint::Error>(())
//! ```
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod io;
mod quant_state;
mod select;
mod transform;

pub use io::{
    quantized_tensors, read_checkpoint_bytes, write_safetensors, write_safetensors_atomic,
    Checkpoint, Entry, MappedFile, OwnedTensor, TensorData,
};
pub use quant_state::{python_float_repr, QuantState, QuantStateError, MAX_NUMEL};
pub use select::{default_rule, Selection};
pub use transform::{dequantize_file, quantize_file, Action, QuantizeFileOptions, TensorReport};

use std::path::PathBuf;

/// Suffix of the quant-state key for NF4 tensors.
pub const NF4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// Suffix of the quant-state key for FP4 tensors.
pub const FP4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__fp4";

/// Errors of this crate. Each names the file and, where it applies, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (bad header, offsets, sizes, truncation).
    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        file: String,
        /// What the parser reported.
        reason: String,
    },
    /// A quantized tensor group is inconsistent.
    #[error("{file}: tensor {tensor:?}: {reason}")]
    Tensor {
        /// The file.
        file: String,
        /// The tensor (group) name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor was asked for that the file does not have.
    #[error("{file}: no tensor {tensor:?}")]
    NoSuchTensor {
        /// The file.
        file: String,
        /// The name asked for.
        tensor: String,
    },
    /// The codec rejected the data.
    #[error(transparent)]
    Codec(#[from] qlora_codec::Error),
    /// A bad option (e.g. an invalid regular expression or block size).
    #[error("invalid option: {0}")]
    Option(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
