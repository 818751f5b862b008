//! Whole-file conversions: quantize a dense safetensors file into bitsandbytes' 4-bit layout, and
//! back.

use crate::io::{quantized_tensors, st_dtype, write_safetensors_atomic, MappedFile, TensorData};
use crate::select::Selection;
use crate::{Entry, Error, Result};
use half::{bf16, f16};
use qlora_codec::{Dtype, Element, QuantizeOptions, QuantizedTensor};
use safetensors::Dtype as StDtype;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Options of [`quantize_file`].
#[derive(Debug, Clone, Default)]
pub struct QuantizeFileOptions {
    /// Quant type, block size, double quant.
    pub quant: QuantizeOptions,
    /// Which tensors to quantize.
    pub selection: Selection,
    /// Quantize tensors holding NaN or ±Inf instead of refusing them (bitsandbytes silently
    /// produces a destroyed block for Inf and code 0 for NaN).
    pub allow_non_finite: bool,
    /// Explicit double-quantization offsets by tensor name (with `quant.double_quant`); other
    /// tensors use the mean of their absmax values. bitsandbytes' offset is torch's f32 mean,
    /// which on a GPU may differ from the correctly rounded mean by an ulp: giving a file's stored
    /// `nested_offset` here reproduces that file byte for byte.
    pub dq_offsets: BTreeMap<String, f32>,
}

/// What happened to one logical tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Written as a 4-bit group.
    Quantized,
    /// A 4-bit group written back as a dense tensor.
    Dequantized,
    /// Copied unchanged.
    Copied,
}

/// One line of a conversion report.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReport {
    /// Tensor (group) name.
    pub name: String,
    /// What was done.
    pub action: Action,
    /// Shape of the logical tensor.
    pub shape: Vec<usize>,
    /// Bytes read for it.
    pub bytes_in: usize,
    /// Bytes written for it.
    pub bytes_out: usize,
}

fn output_metadata(input: Option<&HashMap<String, String>>) -> HashMap<String, String> {
    let mut m = input.cloned().unwrap_or_default();
    // transformers refuses safetensors files without a known "format".
    m.entry("format".into()).or_insert_with(|| "pt".into());
    m
}

fn tensor_err(file: &str, tensor: &str, reason: impl Into<String>) -> Error {
    Error::Tensor {
        file: file.to_string(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

fn quantize_dense<T: Element>(
    ck: &crate::Checkpoint<'_>,
    name: &str,
    shape: &[usize],
    opts: &QuantizeFileOptions,
) -> Result<QuantizedTensor> {
    let data: Vec<T> = ck.dense_as(name)?;
    if !opts.allow_non_finite {
        if let Some(i) = data.iter().position(|x| !x.to_f32().is_finite()) {
            return Err(tensor_err(
                ck.file(),
                name,
                format!(
                    "element {i} is {:?}; refusing to quantize non-finite weights (pass --allow-non-finite to quantize anyway)",
                    data[i]
                ),
            ));
        }
    }
    let offset = opts.dq_offsets.get(name).copied();
    QuantizedTensor::quantize_with_dq_offset(&data, shape, opts.quant, offset)
        .map_err(|e| tensor_err(ck.file(), name, e.to_string()))
}

/// Quantize the selected tensors of a safetensors file into bitsandbytes' 4-bit layout; every
/// other tensor (and any 4-bit group already present) is copied unchanged. The output is written
/// atomically.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    opts: &QuantizeFileOptions,
) -> Result<Vec<TensorReport>> {
    qlora_codec::check_blocksize(opts.quant.blocksize).map_err(|e| Error::Option(e.to_string()))?;
    let mapped = MappedFile::open(input)?;
    let ck = mapped.checkpoint()?;
    let mut out: Vec<(String, TensorData<'_>)> = Vec::new();
    let mut report = Vec::new();
    for entry in ck.entries() {
        match entry {
            Entry::Dense { name, dtype, shape } if opts.selection.selects(name, *dtype, shape) => {
                let q = match dtype {
                    StDtype::F32 => quantize_dense::<f32>(&ck, name, shape, opts)?,
                    StDtype::F16 => quantize_dense::<f16>(&ck, name, shape, opts)?,
                    StDtype::BF16 => quantize_dense::<bf16>(&ck, name, shape, opts)?,
                    other => unreachable!("selection admits only float dtypes, got {other:?}"),
                };
                let bytes_in = ck.tensor(name)?.data().len();
                let group = quantized_tensors(name, &q);
                let bytes_out = group.iter().map(|(_, t)| t.data.len()).sum();
                out.extend(group);
                report.push(TensorReport {
                    name: name.clone(),
                    action: Action::Quantized,
                    shape: shape.clone(),
                    bytes_in,
                    bytes_out,
                });
            }
            other => {
                let bytes = copy_entry(&ck, other, &mut out)?;
                report.push(TensorReport {
                    name: other.name().to_string(),
                    action: Action::Copied,
                    shape: entry_shape(other),
                    bytes_in: bytes,
                    bytes_out: bytes,
                });
            }
        }
    }
    write_safetensors_atomic(output, out, Some(output_metadata(ck.metadata())))?;
    Ok(report)
}

fn entry_shape(e: &Entry) -> Vec<usize> {
    match e {
        Entry::Dense { shape, .. } => shape.clone(),
        Entry::Quantized { state, .. } => state.shape.clone(),
    }
}

/// Copy every raw key of an entry (one tensor, or all members of a 4-bit group) unchanged.
fn copy_entry<'a>(
    ck: &crate::Checkpoint<'a>,
    entry: &Entry,
    out: &mut Vec<(String, TensorData<'a>)>,
) -> Result<usize> {
    let mut bytes = 0;
    match entry {
        Entry::Dense { name, .. } => {
            let v = ck.tensor(name)?;
            bytes += v.data().len();
            out.push((name.clone(), TensorData::borrowed(&v)));
        }
        Entry::Quantized { name, .. } => {
            let prefix = format!("{name}.");
            for key in ck.raw().names() {
                if key == name
                    || (key.starts_with(&prefix) && is_group_member(&key[prefix.len()..]))
                {
                    let v = ck.tensor(key)?;
                    bytes += v.data().len();
                    out.push((key.to_string(), TensorData::borrowed(&v)));
                }
            }
        }
    }
    Ok(bytes)
}

fn is_group_member(suffix: &str) -> bool {
    matches!(
        suffix,
        "absmax"
            | "quant_map"
            | "nested_absmax"
            | "nested_quant_map"
            | "quant_state.bitsandbytes__nf4"
            | "quant_state.bitsandbytes__fp4"
    )
}

/// Dequantize every 4-bit group of a file back to one dense tensor, in its original dtype or
/// `dtype`; other tensors are copied. The output is written atomically.
pub fn dequantize_file(
    input: &Path,
    output: &Path,
    dtype: Option<Dtype>,
) -> Result<Vec<TensorReport>> {
    let mapped = MappedFile::open(input)?;
    let ck = mapped.checkpoint()?;
    let mut out: Vec<(String, TensorData<'_>)> = Vec::new();
    let mut report = Vec::new();
    for entry in ck.entries() {
        match entry {
            Entry::Quantized { name, state } => {
                let q = ck.quantized(name)?;
                let target = dtype.unwrap_or(state.dtype);
                let shape = state.shape.clone();
                let t = match target {
                    Dtype::F32 => dense::<f32>(&q, shape.clone()),
                    Dtype::F16 => dense::<f16>(&q, shape.clone()),
                    Dtype::BF16 => dense::<bf16>(&q, shape.clone()),
                }
                .map_err(|e| tensor_err(ck.file(), name, e.to_string()))?;
                debug_assert_eq!(t.dtype, st_dtype(target));
                report.push(TensorReport {
                    name: name.clone(),
                    action: Action::Dequantized,
                    shape,
                    bytes_in: q.nbytes(),
                    bytes_out: t.data.len(),
                });
                out.push((name.clone(), t));
            }
            dense @ Entry::Dense { .. } => {
                let bytes = copy_entry(&ck, dense, &mut out)?;
                report.push(TensorReport {
                    name: dense.name().to_string(),
                    action: Action::Copied,
                    shape: entry_shape(dense),
                    bytes_in: bytes,
                    bytes_out: bytes,
                });
            }
        }
    }
    write_safetensors_atomic(output, out, Some(output_metadata(ck.metadata())))?;
    Ok(report)
}

fn dense<T: Element>(
    q: &QuantizedTensor,
    shape: Vec<usize>,
) -> Result<TensorData<'static>, qlora_codec::Error> {
    let v: Vec<T> = q.dequantize()?;
    Ok(TensorData::from_elements(&v, shape))
}
