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
//!
//! # Model folders
//!
//! [`ModelFolder`] opens what `save_pretrained` writes (`config.json`, `model.safetensors` or
//! shards + `model.safetensors.index.json`) lazily: it validates every header, the index against
//! the shards and `config.json`, and reads tensor bytes only when asked, through a memory map of
//! just that tensor. A 4-bit group may span shards. [`convert_model`] quantizes or dequantizes a
//! whole folder into a new one that transformers loads as is:
//!
//! ```
//! use qlora_checkpoint::{convert_model, Conversion, ConvertOptions, ModelFolder, QuantizeFileOptions};
//! use qlora_codec::QuantizeOptions;
//! # let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/checkpoints");
//! # let tmp = tempfile::tempdir()?;
//! let out = tmp.path().join("tiny-llama-nf4");
//! let quantize = Conversion::Quantize {
//!     options: QuantizeFileOptions {
//!         quant: QuantizeOptions { double_quant: true, ..QuantizeOptions::qlora() },
//!         ..Default::default()
//!     },
//!     compute_dtype: None, // from config.json's dtype
//! };
//! let report = convert_model(&data.join("tiny-llama-bf16"), &out, &quantize, &ConvertOptions::default())?;
//! assert_eq!(report.shards, ["model.safetensors"]);
//! let model = ModelFolder::open(&out)?;
//! let q = model.quantized("model.layers.0.mlp.down_proj.weight")?;
//! assert_eq!((q.shape(), q.is_double_quant()), (&[64, 176][..], true));
//! assert!(qlora_checkpoint::is_bnb_4bit(model.config().unwrap()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Memory: conversion streams. Tensors are read through per-tensor maps, converted in parallel
//! (rayon) and written straight to their offset in the output shard, so the peak resident set
//! is about `threads × (largest tensor + its converted output)` plus a few tens of MB, whatever
//! the model size (measured: a 2.5 GB bf16 model with 52 MB tensors, 2 threads → 173 MB peak
//! RSS; `crates/cli/tests/cli.rs`). Output shards follow transformers' `max_shard_size` rule
//! (default 50 GB as in transformers 5, so most models give one `model.safetensors`); see
//! [`convert_model`]. Output is written to a hidden temporary name next to the destination
//! (`.NAME.tmp-PID`, through [`atomic::TempOutput`]) and renamed at the end: a failed run leaves
//! nothing and an existing output untouched; a program that calls
//! [`atomic::install_signal_cleanup`] also leaves nothing when stopped by SIGINT/SIGTERM/SIGHUP;
//! the temporary of a run killed outright is removed by the next write of the same output.
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod folder;
mod io;
mod json;
mod quant_state;
mod select;
mod transform;
mod write;

pub use config::{bnb_quantization_config, config_dtype, is_bnb_4bit, QUANTIZATION_CONFIG_KEY};
pub use folder::{
    parse_config_json, parse_index_json, Layout, ModelFolder, Shard, TensorBytes, TensorInfo,
    CONFIG_FILE_NAME, INDEX_FILE_NAME, SINGLE_FILE_NAME,
};
pub use io::{
    quantized_tensors, read_checkpoint_bytes, write_safetensors, write_safetensors_atomic,
    Checkpoint, Entry, MappedFile, OwnedTensor, TensorData,
};
/// Atomic outputs (re-exported `qlora-atomic-write`): the temporary-file and folder guard every
/// writer of this crate uses, the signal clean-up a program installs with one call, and the
/// removal of leftovers of killed runs.
pub use qlora_atomic_write as atomic;
pub use quant_state::{python_float_repr, QuantState, QuantStateError, MAX_NUMEL};
pub use select::{default_rule, Selection};
pub use transform::{dequantize_file, quantize_file, Action, QuantizeFileOptions, TensorReport};
pub use write::{
    convert_model, input_bytes, Conversion, ConvertOptions, ConvertReport, DEFAULT_MAX_SHARD_SIZE,
};

/// Parse a size the way transformers' `max_shard_size` does (`huggingface_hub`'s
/// `parse_size_to_int`): an integer with an optional unit `KB`/`MB`/`GB`/`TB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), e.g. `"5GB"`, `"100KB"`, `"1048576"`.
///
/// ```
/// assert_eq!(qlora_checkpoint::parse_size("5GB").unwrap(), 5_000_000_000);
/// assert_eq!(qlora_checkpoint::parse_size("2MiB").unwrap(), 2 << 20);
/// assert!(qlora_checkpoint::parse_size("5 parsecs").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let units: [(&str, u64); 8] = [
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim(), *m)))
        .unwrap_or((t, 1));
    let bad = || {
        Error::Option(format!(
            "size {s:?} is not an integer with an optional unit KB/MB/GB/TB/KiB/MiB/GiB/TiB"
        ))
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n <= 0.0 {
        return Err(bad());
    }
    let v = n * mult as f64;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

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
    /// A JSON file of a model folder (`config.json`, the shard index) is malformed or
    /// inconsistent with the shards.
    #[error("{file}: {}{reason}", if key.is_empty() { String::new() } else { format!("key {key:?}: ") })]
    Json {
        /// The file.
        file: String,
        /// The key (dotted path), empty for the whole file.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A bad option (e.g. an invalid regular expression or block size).
    #[error("invalid option: {0}")]
    Option(String),
}

impl From<qlora_atomic_write::Error> for Error {
    fn from(e: qlora_atomic_write::Error) -> Self {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
