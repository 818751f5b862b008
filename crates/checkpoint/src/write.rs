//! Streaming conversion of a model folder (or file): tensors are read through per-tensor memory
//! maps, converted in parallel (rayon) and written straight to their place in the output shard,
//! so peak memory is about (threads × the largest tensor's input + output), not the model.
//!
//! # Output layout
//!
//! * Shards follow transformers' `save_pretrained` rule (`huggingface_hub`'s
//!   `split_state_dict_into_shards`): tensors in input order are packed greedily into shards of at
//!   most `max_shard_size` bytes; a tensor larger than that gets a shard of its own. One shard is
//!   written as `model.safetensors` without an index; several as
//!   `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Two deviations, both
//!   invisible to loaders: the members of a 4-bit group are never split across shards, and the
//!   size of a quant-state blob is counted at its upper bound (≤ 25 bytes more) when planning.
//! * In each shard, data is ordered by element alignment (8-, 4-, 2-byte dtypes, then bytes) like
//!   the safetensors writer, and the quant-state blobs come last: their length (the digits of the
//!   double-quant offset) is known only after quantizing, so the header is reserved at its largest
//!   possible size and padded with spaces (which the format allows).
//! * Everything is written into a hidden temporary folder (or file) next to the output and renamed
//!   over it at the end; on error nothing is left behind.

use crate::config::{bnb_quantization_config, config_dtype, is_bnb_4bit, QUANTIZATION_CONFIG_KEY};
use crate::folder::{
    dense_bytes_as, json_err, Layout, ModelFolder, CONFIG_FILE_NAME, INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
};
use crate::io::quantized_tensors;
use crate::json::python_dumps_indent2_sorted;
use crate::select::default_rule;
use crate::transform::{Action, QuantizeFileOptions, TensorReport};
use crate::{Entry, Error, QuantState, Result};
use half::{bf16, f16};
use qlora_atomic_write::TempOutput;
use qlora_codec::{num_blocks, packed_len, Dtype, Element, QuantizedTensor};
use rayon::prelude::*;
use safetensors::Dtype as StDtype;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// transformers' default `max_shard_size` (`save_pretrained`, transformers 5: `"50GB"`).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// Upper bound of the length of Python's `repr` of an f32 widened to f64 (e.g.
/// `-1.1754943508222875e-38` is 23 characters).
const MAX_FLOAT_REPR: usize = 25;

/// Bytes copied per read when a tensor is copied unchanged.
const COPY_CHUNK: usize = 8 << 20;

/// What a conversion does to the tensors.
#[derive(Debug, Clone)]
pub enum Conversion {
    /// Quantize the selected dense tensors (4-bit groups already present are copied).
    Quantize {
        /// Codec, selection, non-finite policy.
        options: QuantizeFileOptions,
        /// `bnb_4bit_compute_dtype` of the written `quantization_config` (default: the model's
        /// `dtype` from `config.json`, else float32 like `BitsAndBytesConfig`).
        compute_dtype: Option<Dtype>,
    },
    /// Dequantize every 4-bit group, to its recorded dtype or this one.
    Dequantize {
        /// Output dtype (default: the dtype in each quant state).
        dtype: Option<Dtype>,
    },
}

/// Options of [`convert_model`].
#[derive(Clone, Copy)]
pub struct ConvertOptions<'a> {
    /// Largest shard in bytes (folder output only); see the module docs.
    pub max_shard_size: u64,
    /// Called with the number of input bytes finished, from worker threads.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("max_shard_size", &self.max_shard_size)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            progress: None,
        }
    }
}

/// What [`convert_model`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// One line per logical tensor, in input order.
    pub tensors: Vec<TensorReport>,
    /// Output safetensors files, in order.
    pub shards: Vec<String>,
    /// Other files copied from the input folder.
    pub copied_files: Vec<String>,
    /// Weight files of the input folder that were not copied (e.g. `pytorch_model.bin`).
    pub skipped_files: Vec<String>,
    /// Tensor bytes in the output (the index's `metadata.total_size`).
    pub total_size: u64,
}

/// Total input tensor bytes of a model: what the progress callback counts up to.
pub fn input_bytes(model: &ModelFolder) -> u64 {
    model
        .raw_names()
        .iter()
        .filter_map(|k| model.info(k).ok())
        .map(|t| t.len as u64)
        .sum()
}

/// One output tensor's place in a shard.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Exact length, or the upper bound for a blob.
    len: usize,
    blob: bool,
}

/// One unit of work: a logical tensor of the input.
#[derive(Debug)]
enum Job<'m> {
    Copy {
        name: &'m str,
        keys: Vec<&'m str>,
    },
    Quantize {
        name: &'m str,
        dtype: StDtype,
        shape: &'m [usize],
    },
    Dequantize {
        name: &'m str,
        state: &'m QuantState,
        target: Dtype,
    },
}

fn st_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::F32 => StDtype::F32,
        Dtype::F16 => StDtype::F16,
        Dtype::BF16 => StDtype::BF16,
    }
}

fn codec_dtype(d: StDtype) -> Option<Dtype> {
    match d {
        StDtype::F32 => Some(Dtype::F32),
        StDtype::F16 => Some(Dtype::F16),
        StDtype::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

fn group_keys<'m>(model: &'m ModelFolder, name: &str) -> Vec<&'m str> {
    let prefix = format!("{name}.");
    model
        .raw_names()
        .iter()
        .map(String::as_str)
        .filter(|k| {
            *k == name
                || k.strip_prefix(&prefix).is_some_and(|s| {
                    matches!(
                        s,
                        "absmax"
                            | "quant_map"
                            | "nested_absmax"
                            | "nested_quant_map"
                            | "quant_state.bitsandbytes__nf4"
                            | "quant_state.bitsandbytes__fp4"
                    )
                })
        })
        .collect()
}

impl Job<'_> {
    fn slots(&self, model: &ModelFolder, conv: &Conversion) -> Result<Vec<Slot>> {
        Ok(match self {
            Job::Copy { keys, .. } => keys
                .iter()
                .map(|k| {
                    let t = model.info(k)?;
                    Ok(Slot {
                        name: k.to_string(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        len: t.len,
                        blob: false,
                    })
                })
                .collect::<Result<_>>()?,
            Job::Quantize { name, dtype, shape } => {
                let Conversion::Quantize { options, .. } = conv else {
                    return Err(Error::Option("internal: quantize job in dequantize".into()));
                };
                let q = options.quant;
                let n: usize = shape.iter().product();
                let nb = num_blocks(n, q.blocksize);
                let mut s = vec![Slot {
                    name: name.to_string(),
                    dtype: StDtype::U8,
                    shape: vec![packed_len(n), 1],
                    len: packed_len(n),
                    blob: false,
                }];
                let f32s = |name: String, len: usize| Slot {
                    name,
                    dtype: StDtype::F32,
                    shape: vec![len],
                    len: 4 * len,
                    blob: false,
                };
                if q.double_quant {
                    s.push(Slot {
                        name: format!("{name}.absmax"),
                        dtype: StDtype::U8,
                        shape: vec![nb],
                        len: nb,
                        blob: false,
                    });
                    s.push(f32s(
                        format!("{name}.nested_absmax"),
                        nb.div_ceil(qlora_double_quant::NESTED_BLOCKSIZE),
                    ));
                    s.push(f32s(format!("{name}.nested_quant_map"), 256));
                } else {
                    s.push(f32s(format!("{name}.absmax"), nb));
                }
                s.push(f32s(format!("{name}.quant_map"), 16));
                let state = QuantState {
                    quant_type: q.quant_type,
                    blocksize: q.blocksize,
                    dtype: codec_dtype(*dtype).unwrap_or(Dtype::F32),
                    shape: shape.to_vec(),
                    nested_offset: q.double_quant.then_some(0.0),
                };
                let bound = state.to_json_bytes().len() - if q.double_quant { 3 } else { 0 }
                    + if q.double_quant { MAX_FLOAT_REPR } else { 0 };
                let suffix = match q.quant_type {
                    qlora_codec::QuantType::Nf4 => crate::NF4_STATE_SUFFIX,
                    qlora_codec::QuantType::Fp4 => crate::FP4_STATE_SUFFIX,
                };
                s.push(Slot {
                    name: format!("{name}{suffix}"),
                    dtype: StDtype::U8,
                    shape: vec![bound],
                    len: bound,
                    blob: true,
                });
                s
            }
            Job::Dequantize {
                name,
                state,
                target,
            } => {
                let n = state.numel();
                vec![Slot {
                    name: name.to_string(),
                    dtype: st_dtype(*target),
                    shape: state.shape.clone(),
                    len: n * target.size(),
                    blob: false,
                }]
            }
        })
    }

    fn input_keys(&self, model: &ModelFolder) -> Vec<String> {
        match self {
            Job::Copy { keys, .. } => keys.iter().map(|k| k.to_string()).collect(),
            Job::Quantize { name, .. } => vec![name.to_string()],
            Job::Dequantize { name, .. } => group_keys(model, name)
                .into_iter()
                .map(str::to_string)
                .collect(),
        }
    }
}

fn tensor_err(file: &str, tensor: &str, reason: impl Into<String>) -> Error {
    Error::Tensor {
        file: file.to_string(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

fn quantize_typed<T: Element>(
    model: &ModelFolder,
    name: &str,
    dtype: StDtype,
    shape: &[usize],
    opts: &QuantizeFileOptions,
) -> Result<QuantizedTensor> {
    let bytes = model.tensor_bytes(name)?;
    let file = model.shard_path(name)?.display().to_string();
    // Zero-copy when the mapped data is aligned for T (it is in files safetensors writes).
    let data: Cow<'_, [T]> =
        match bytemuck::try_cast_slice::<u8, T>(&bytes) {
            Ok(s) if codec_dtype(dtype) == Some(T::DTYPE) => Cow::Borrowed(s),
            _ => Cow::Owned(dense_bytes_as::<T>(dtype, &bytes).ok_or_else(|| {
                tensor_err(&file, name, format!("dtype {dtype:?} is not a float"))
            })?),
        };
    if !opts.allow_non_finite {
        if let Some(i) = data.iter().position(|x| !x.to_f32().is_finite()) {
            return Err(tensor_err(
                &file,
                name,
                format!(
                    "element {i} is {}; refusing to quantize non-finite weights (pass --allow-non-finite to quantize anyway)",
                    data[i].to_f32()
                ),
            ));
        }
    }
    QuantizedTensor::quantize(&data, shape, opts.quant)
        .map_err(|e| tensor_err(&file, name, e.to_string()))
}

fn dequantize_typed<T: Element>(
    q: &QuantizedTensor,
) -> std::result::Result<Vec<u8>, qlora_codec::Error> {
    let v: Vec<T> = q.dequantize()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// What a job hands back: its report line and its quant-state blobs (name, bytes).
type JobOutput = (TensorReport, Vec<(String, Vec<u8>)>);

/// A shard being written: the file, where each slot goes, and the reserved header size.
struct ShardPlan<'m> {
    file_name: String,
    jobs: Vec<Job<'m>>,
    slots: Vec<Slot>,
    /// Data offset of every fixed-size slot, by name.
    fixed_offsets: HashMap<String, usize>,
    /// Bytes of fixed-size data (blobs follow).
    fixed_len: usize,
    /// Reserved bytes for the header JSON (a multiple of 8 minus nothing: data starts at 8 + this).
    header_len: usize,
}

fn header_json(
    metadata: &HashMap<String, String>,
    entries: &[(String, StDtype, Vec<usize>, usize, usize)],
) -> String {
    let mut m = Map::new();
    let mut md: Vec<(&String, &String)> = metadata.iter().collect();
    md.sort();
    m.insert(
        "__metadata__".into(),
        Value::Object(
            md.into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    for (name, dtype, shape, start, end) in entries {
        let mut t = Map::new();
        t.insert(
            "dtype".into(),
            serde_json::to_value(dtype).unwrap_or(Value::Null),
        );
        t.insert("shape".into(), shape.clone().into());
        t.insert("data_offsets".into(), vec![*start, *end].into());
        m.insert(name.clone(), Value::Object(t));
    }
    Value::Object(m).to_string()
}

fn plan_shard<'m>(
    file_name: String,
    jobs: Vec<Job<'m>>,
    slots: Vec<Slot>,
    metadata: &HashMap<String, String>,
) -> ShardPlan<'m> {
    let mut fixed: Vec<&Slot> = slots.iter().filter(|s| !s.blob).collect();
    // Largest alignment first, like the safetensors writer (stable: input order otherwise).
    fixed.sort_by_key(|s| std::cmp::Reverse(s.dtype.bitsize()));
    let mut fixed_offsets = HashMap::new();
    let mut off = 0;
    let mut entries = Vec::new();
    for s in &fixed {
        fixed_offsets.insert(s.name.clone(), off);
        entries.push((s.name.clone(), s.dtype, s.shape.clone(), off, off + s.len));
        off += s.len;
    }
    let fixed_len = off;
    for s in slots.iter().filter(|s| s.blob) {
        entries.push((s.name.clone(), s.dtype, s.shape.clone(), off, off + s.len));
        off += s.len;
    }
    // With every blob at its upper bound, every number in the header is at its largest.
    let bound = header_json(metadata, &entries).len();
    ShardPlan {
        file_name,
        jobs,
        slots,
        fixed_offsets,
        fixed_len,
        header_len: (8 + bound).div_ceil(8) * 8 - 8,
    }
}

/// Write one shard: jobs in parallel, each writing its tensors at their offsets; then the blobs
/// and the header. Returns the per-tensor reports and the shard's tensor bytes.
fn write_shard(
    model: &ModelFolder,
    conv: &Conversion,
    plan: &ShardPlan<'_>,
    path: &Path,
    metadata: &HashMap<String, String>,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<(Vec<TensorReport>, u64)> {
    let out_path = path.to_path_buf();
    let io = |source| Error::Io {
        path: out_path.clone(),
        source,
    };
    let file = File::create(path).map_err(io)?;
    let data_start = 8 + plan.header_len as u64;
    let slot_by_name: HashMap<&str, &Slot> =
        plan.slots.iter().map(|s| (s.name.as_str(), s)).collect();
    let place = |name: &str, dtype: StDtype, shape: &[usize], bytes: &[u8]| -> Result<()> {
        let slot = slot_by_name.get(name).copied();
        match slot {
            Some(s) if !s.blob && s.dtype == dtype && s.shape == shape && s.len == bytes.len() => {
                let at = data_start + plan.fixed_offsets[name] as u64;
                file.write_all_at(bytes, at).map_err(io)
            }
            _ => Err(Error::Option(format!(
                "internal: output tensor {name:?} ({dtype:?} {shape:?}, {} bytes) does not match its planned slot {slot:?}",
                bytes.len()
            ))),
        }
    };
    let done: Vec<JobOutput> = plan
        .jobs
        .par_iter()
        .map(|job| -> Result<JobOutput> {
            let mut blobs = Vec::new();
            let bytes_in: usize = job
                .input_keys(model)
                .iter()
                .map(|k| model.info(k).map(|t| t.len))
                .sum::<Result<usize>>()?;
            let report = match job {
                Job::Copy { name, keys } => {
                    if let Ok(state) = model.quant_state(name) {
                        // A 4-bit group passed through is checked like one being read: member
                        // dtypes and sizes must fit its quant state.
                        crate::io::build_quantized(model, name, state)?;
                    }
                    let mut buf = Vec::new();
                    for k in keys {
                        let t = model.info(k)?;
                        let at = data_start + plan.fixed_offsets.get(*k).copied().ok_or_else(|| Error::Option(format!("internal: no slot for {k:?}")))? as u64;
                        let mut pos = 0;
                        while pos < t.len {
                            let n = COPY_CHUNK.min(t.len - pos);
                            buf.resize(n, 0);
                            model.read_tensor_range(k, pos, &mut buf)?;
                            file.write_all_at(&buf, at + pos as u64).map_err(io)?;
                            pos += n;
                        }
                    }
                    let shape = match model.entries().iter().find(|e| e.name() == *name) {
                        Some(Entry::Quantized { state, .. }) => state.shape.clone(),
                        _ => model.info(name)?.shape.clone(),
                    };
                    TensorReport {
                        name: name.to_string(),
                        action: Action::Copied,
                        shape,
                        bytes_in,
                        bytes_out: bytes_in,
                    }
                }
                Job::Quantize { name, dtype, shape } => {
                    let Conversion::Quantize { options, .. } = conv else {
                        return Err(Error::Option("internal: quantize job in dequantize".into()));
                    };
                    let q = match dtype {
                        StDtype::F32 => quantize_typed::<f32>(model, name, *dtype, shape, options)?,
                        StDtype::F16 => quantize_typed::<f16>(model, name, *dtype, shape, options)?,
                        _ => quantize_typed::<bf16>(model, name, *dtype, shape, options)?,
                    };
                    let mut bytes_out = 0;
                    for (key, t) in quantized_tensors(name, &q) {
                        bytes_out += t.data.len();
                        let is_blob = slot_by_name.get(key.as_str()).is_some_and(|s| s.blob);
                        if is_blob {
                            let s = slot_by_name[key.as_str()];
                            if t.data.len() > s.len {
                                return Err(Error::Option(format!(
                                    "internal: quant state of {name:?} is {} bytes, over its bound {}",
                                    t.data.len(),
                                    s.len
                                )));
                            }
                            blobs.push((key, t.data.into_owned()));
                        } else {
                            place(&key, t.dtype, &t.shape, &t.data)?;
                        }
                    }
                    TensorReport {
                        name: name.to_string(),
                        action: Action::Quantized,
                        shape: shape.to_vec(),
                        bytes_in,
                        bytes_out,
                    }
                }
                Job::Dequantize { name, state, target } => {
                    let q = model.quantized(name)?;
                    let file_name = model.shard_path(name)?.display().to_string();
                    let bytes = match target {
                        Dtype::F32 => dequantize_typed::<f32>(&q),
                        Dtype::F16 => dequantize_typed::<f16>(&q),
                        Dtype::BF16 => dequantize_typed::<bf16>(&q),
                    }
                    .map_err(|e| tensor_err(&file_name, name, e.to_string()))?;
                    drop(q);
                    place(name, st_dtype(*target), &state.shape, &bytes)?;
                    TensorReport {
                        name: name.to_string(),
                        action: Action::Dequantized,
                        shape: state.shape.clone(),
                        bytes_in,
                        bytes_out: bytes.len(),
                    }
                }
            };
            if let Some(p) = progress {
                p(bytes_in as u64);
            }
            Ok((report, blobs))
        })
        .collect::<Result<_>>()?;
    // Blobs after the fixed data, in plan order; then the real header, padded to its reservation.
    let mut blob_map: HashMap<String, Vec<u8>> = HashMap::new();
    let mut reports = Vec::with_capacity(done.len());
    for (r, b) in done {
        reports.push(r);
        blob_map.extend(b);
    }
    let mut entries = Vec::new();
    let mut fixed: Vec<&Slot> = plan.slots.iter().filter(|s| !s.blob).collect();
    fixed.sort_by_key(|s| std::cmp::Reverse(s.dtype.bitsize()));
    for s in fixed {
        let off = plan.fixed_offsets[&s.name];
        entries.push((s.name.clone(), s.dtype, s.shape.clone(), off, off + s.len));
    }
    let mut off = plan.fixed_len;
    for s in plan.slots.iter().filter(|s| s.blob) {
        let b = blob_map.remove(&s.name).ok_or_else(|| {
            Error::Option(format!("internal: blob {:?} was not produced", s.name))
        })?;
        file.write_all_at(&b, data_start + off as u64).map_err(io)?;
        entries.push((s.name.clone(), s.dtype, vec![b.len()], off, off + b.len()));
        off += b.len();
    }
    let header = header_json(metadata, &entries);
    if header.len() > plan.header_len {
        return Err(Error::Option(format!(
            "internal: header of {} bytes exceeds its reservation of {}",
            header.len(),
            plan.header_len
        )));
    }
    let mut head = Vec::with_capacity(8 + plan.header_len);
    head.extend_from_slice(&(plan.header_len as u64).to_le_bytes());
    head.extend_from_slice(header.as_bytes());
    head.resize(8 + plan.header_len, b' ');
    file.write_all_at(&head, 0).map_err(io)?;
    file.set_len(data_start + off as u64).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok((reports, off as u64))
}

fn jobs_for<'m>(model: &'m ModelFolder, conv: &Conversion) -> Vec<Job<'m>> {
    model
        .entries()
        .iter()
        .map(|e| match (e, conv) {
            (Entry::Dense { name, dtype, shape }, Conversion::Quantize { options, .. })
                if options.selection.selects(name, *dtype, shape) =>
            {
                Job::Quantize {
                    name,
                    dtype: *dtype,
                    shape,
                }
            }
            (Entry::Quantized { name, state }, Conversion::Dequantize { dtype }) => {
                Job::Dequantize {
                    name,
                    state,
                    target: dtype.unwrap_or(state.dtype),
                }
            }
            (Entry::Dense { name, .. }, _) => Job::Copy {
                name,
                keys: vec![name.as_str()],
            },
            (Entry::Quantized { name, .. }, _) => Job::Copy {
                name,
                keys: group_keys(model, name),
            },
        })
        .collect()
}

/// `llm_int8_skip_modules` for a quantized model: `None` when the selection is transformers'
/// default, else the modules of 2-D `.weight` tensors left dense.
fn skip_modules(model: &ModelFolder, conv: &Conversion) -> Option<Vec<String>> {
    let Conversion::Quantize { options, .. } = conv else {
        return None;
    };
    let mut differs = false;
    let mut dense = Vec::new();
    for e in model.entries() {
        if let Entry::Dense { name, dtype, shape } = e {
            let chosen = options.selection.selects(name, *dtype, shape);
            if chosen != default_rule(name, shape) && codec_dtype(*dtype).is_some() {
                differs = true;
            }
            if !chosen && shape.len() == 2 && name.ends_with(".weight") {
                dense.push(name.trim_end_matches(".weight").to_string());
            }
        }
    }
    differs.then_some(dense)
}

fn output_config(model: &ModelFolder, conv: &Conversion) -> Result<Option<Map<String, Value>>> {
    let Some(config) = model.config() else {
        return Ok(None);
    };
    let cpath = model.root().join(CONFIG_FILE_NAME);
    let mut config = config.clone();
    match conv {
        Conversion::Quantize {
            options,
            compute_dtype,
        } => {
            if let Some(q) = config.get(QUANTIZATION_CONFIG_KEY) {
                return Err(json_err(
                    &cpath,
                    QUANTIZATION_CONFIG_KEY,
                    format!(
                        "the input is already quantized ({}); dequantize it first",
                        q.get("quant_method")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown method")
                    ),
                ));
            }
            let compute = compute_dtype
                .or_else(|| config_dtype(&config))
                .unwrap_or(Dtype::F32);
            config.insert(
                QUANTIZATION_CONFIG_KEY.into(),
                bnb_quantization_config(&options.quant, compute, skip_modules(model, conv)),
            );
        }
        Conversion::Dequantize { .. } => {
            if config.contains_key(QUANTIZATION_CONFIG_KEY) && !is_bnb_4bit(&config) {
                return Err(json_err(
                    &cpath,
                    QUANTIZATION_CONFIG_KEY,
                    "is not a bitsandbytes 4-bit config; only those can be dequantized",
                ));
            }
            config.remove(QUANTIZATION_CONFIG_KEY);
        }
    }
    Ok(Some(config))
}

fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".index.json")
        || name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    if from.is_dir() {
        std::fs::create_dir(to).map_err(io(to))?;
        for e in std::fs::read_dir(from).map_err(io(from))? {
            let e = e.map_err(io(from))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ()).map_err(io(from))
    }
}

fn write_text_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Convert a model folder (or a single safetensors file) into a new one that transformers loads
/// as is. For a folder, `config.json` gets (quantize) or loses (dequantize) its
/// `quantization_config` (written like transformers: sorted keys, indent 2), and every other
/// non-weight file (tokenizer, generation config, …) is copied; weight files that were not read
/// (`*.bin`, stray `*.safetensors`) are listed in [`ConvertReport::skipped_files`].
///
/// * Shards follow transformers' `save_pretrained` rule (`huggingface_hub`'s
///   `split_state_dict_into_shards`): tensors in input order are packed greedily into shards of
///   at most [`ConvertOptions::max_shard_size`] bytes (default [`DEFAULT_MAX_SHARD_SIZE`], 50 GB
///   as in transformers 5); a tensor larger than that gets a shard of its own. The input's own
///   shard boundaries are not kept. One shard is written as `model.safetensors` without an index;
///   several as `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
///   (`metadata.total_size`, `metadata.total_parameters`, `weight_map` of every tensor including
///   the quant-state members). Two deviations, both invisible to loaders: the members of a 4-bit
///   group are never split across shards, and a quant-state blob is counted at its upper bound
///   (≤ 25 bytes more) when planning.
/// * In each shard, data is ordered by element alignment like the safetensors writer, and the
///   quant-state blobs come last; the header is reserved at its largest possible size and padded
///   with spaces, as the format allows.
/// * Memory: tensors are read through per-tensor memory maps and converted in parallel, each
///   written straight to its offset; peak memory is about threads × (largest tensor + its output).
/// * Everything is written into a hidden temporary folder (or file) next to `output` and renamed
///   at the end; on error nothing is left behind.
///
/// `output` must not exist when `input` is a folder; a file output is replaced atomically.
pub fn convert_model(
    input: &Path,
    output: &Path,
    conv: &Conversion,
    opts: &ConvertOptions<'_>,
) -> Result<ConvertReport> {
    if let Conversion::Quantize { options, .. } = conv {
        qlora_codec::check_blocksize(options.quant.blocksize)
            .map_err(|e| Error::Option(e.to_string()))?;
    }
    if opts.max_shard_size == 0 {
        return Err(Error::Option("max shard size must be positive".into()));
    }
    let model = ModelFolder::open(input)?;
    let is_folder = model.layout() != Layout::File;
    if is_folder && output.exists() {
        return Err(Error::Option(format!(
            "output {} already exists; remove it or choose another path",
            output.display()
        )));
    }
    let config = output_config(&model, conv)?;
    // Plan: jobs in input order, packed greedily into shards.
    let jobs = jobs_for(&model, conv);
    let mut shards: Vec<(Vec<Job<'_>>, Vec<Slot>, usize)> = Vec::new();
    let mut current: (Vec<Job<'_>>, Vec<Slot>, usize) = (Vec::new(), Vec::new(), 0);
    for job in jobs {
        let slots = job.slots(&model, conv)?;
        let size: usize = slots.iter().map(|s| s.len).sum();
        if is_folder && size as u64 > opts.max_shard_size {
            shards.push((vec![job], slots, size));
            continue;
        }
        if is_folder && !current.0.is_empty() && (current.2 + size) as u64 > opts.max_shard_size {
            shards.push(std::mem::take(&mut current));
        }
        current.0.push(job);
        current.1.extend(slots);
        current.2 += size;
    }
    if !current.0.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    let n = shards.len();
    let metadata: HashMap<String, String> = if is_folder {
        HashMap::from([("format".to_string(), "pt".to_string())])
    } else {
        let mut m = model.shards()[0].metadata().cloned().unwrap_or_default();
        m.entry("format".into()).or_insert_with(|| "pt".into());
        m
    };
    let plans: Vec<ShardPlan<'_>> = shards
        .into_iter()
        .enumerate()
        .map(|(i, (jobs, slots, _))| {
            let name = if n == 1 {
                SINGLE_FILE_NAME.to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            plan_shard(name, jobs, slots, &metadata)
        })
        .collect();

    let guard = if is_folder {
        TempOutput::folder(output)?
    } else {
        TempOutput::file(output)?.0
    };
    let tmp = guard.path().to_path_buf();
    let mut report = ConvertReport {
        tensors: Vec::new(),
        shards: Vec::new(),
        copied_files: Vec::new(),
        skipped_files: Vec::new(),
        total_size: 0,
    };
    let done = AtomicU64::new(0);
    let counting = |b: u64| {
        let total = done.fetch_add(b, Ordering::Relaxed) + b;
        if let Some(p) = opts.progress {
            p(total);
        }
    };
    // Errors name the output, not the hidden temporary that is removed with the guard.
    let mut fill = || -> Result<()> {
        let mut weight_map = Map::new();
        for plan in &plans {
            let path: PathBuf = if is_folder {
                tmp.join(&plan.file_name)
            } else {
                tmp.clone()
            };
            let (reports, bytes) =
                write_shard(&model, conv, plan, &path, &metadata, Some(&counting))?;
            report.total_size += bytes;
            report.tensors.extend(reports);
            report.shards.push(if is_folder {
                plan.file_name.clone()
            } else {
                output.display().to_string()
            });
            for s in &plan.slots {
                weight_map.insert(s.name.clone(), Value::String(plan.file_name.clone()));
            }
        }
        if is_folder {
            if n > 1 {
                let params: usize = model
                    .entries()
                    .iter()
                    .map(|e| match e {
                        Entry::Dense { shape, .. } => shape.iter().product::<usize>(),
                        Entry::Quantized { state, .. } => state.numel(),
                    })
                    .sum();
                let mut meta = Map::new();
                meta.insert("total_parameters".into(), params.into());
                meta.insert("total_size".into(), report.total_size.into());
                let mut index = Map::new();
                index.insert("metadata".into(), Value::Object(meta));
                index.insert("weight_map".into(), Value::Object(weight_map));
                write_text_file(
                    &tmp.join(INDEX_FILE_NAME),
                    &(python_dumps_indent2_sorted(&Value::Object(index)) + "\n"),
                )?;
            }
            if let Some(c) = &config {
                write_text_file(
                    &tmp.join(CONFIG_FILE_NAME),
                    &(python_dumps_indent2_sorted(&Value::Object(c.clone())) + "\n"),
                )?;
            }
            let mut others: Vec<_> = std::fs::read_dir(model.root())
                .map_err(|source| Error::Io {
                    path: model.root().to_path_buf(),
                    source,
                })?
                .collect::<std::result::Result<_, _>>()
                .map_err(|source| Error::Io {
                    path: model.root().to_path_buf(),
                    source,
                })?;
            others.sort_by_key(|e| e.file_name());
            let tmp_canonical = std::fs::canonicalize(&tmp).ok();
            for e in others {
                let name = e.file_name().to_string_lossy().into_owned();
                // An output inside the input folder must not copy itself into itself.
                if name == CONFIG_FILE_NAME || std::fs::canonicalize(e.path()).ok() == tmp_canonical
                {
                    continue;
                }
                if is_weight_file(&name) {
                    if !model.shards().iter().any(|s| s.file_name() == name)
                        && name != INDEX_FILE_NAME
                    {
                        report.skipped_files.push(name);
                    }
                    continue;
                }
                copy_tree(&e.path(), &tmp.join(&name))?;
                report.copied_files.push(name);
            }
        }
        Ok(())
    };
    fill().map_err(|e| match e {
        Error::Io { path, source } => Error::Io {
            path: guard.final_path(&path),
            source,
        },
        other => other,
    })?;
    guard.commit()?;
    report.tensors.sort_by_key(|r| {
        model
            .entries()
            .iter()
            .position(|e| e.name() == r.name)
            .unwrap_or(usize::MAX)
    });
    Ok(report)
}
