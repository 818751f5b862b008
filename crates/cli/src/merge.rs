//! `qlora merge BASE ADAPTER OUT`: merge a PEFT LoRA/DoRA adapter into a dense or 4-bit model.
//!
//! The merge itself is `qlora_lora::merge_adapter` (bit-compatible with PEFT's
//! `merge_and_unload`); this file reads the base through `qlora_checkpoint::ModelFolder` and
//! writes OUT with the base's layout: the same shard files, keys and other files, with each
//! adapted weight (or 4-bit group) replaced.

use crate::convert::DtypeArg;
use clap::Args;
use half::{bf16, f16};
use qlora_atomic_write::TempOutput;
use qlora_checkpoint::{
    convert_model, quantized_tensors, write_safetensors_atomic, Conversion, ConvertOptions, Entry,
    Layout, ModelFolder, OwnedTensor, QuantizeFileOptions, TensorData, INDEX_FILE_NAME,
};
use qlora_codec::{Dtype, QuantizeOptions, QuantizedTensor};
use qlora_lora::peft::PeftAdapter;
use qlora_lora::{merge_adapter, BaseWeight, DenseData, MergeOptions, MergeOutput, MergedModule};
use safetensors::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Arguments of `qlora merge`.
#[derive(Debug, Args)]
pub(crate) struct MergeArgs {
    /// Base model: a safetensors file or a model folder, dense (f32/bf16/f16) or bitsandbytes 4-bit.
    base: PathBuf,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    adapter: PathBuf,
    /// Output, in the base's layout: a file for a file base (replaced atomically), a new folder
    /// for a folder base (must not exist).
    output: PathBuf,
    /// Dtype of the whole output of a dense base: merged weights and every other floating-point
    /// tensor, and config.json's `dtype` (as loading with `torch_dtype` does; default: each
    /// tensor's own dtype).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Write a 4-bit checkpoint: a dense base is merged, then quantized (NF4, block 64, double
    /// quant: QLoRA's recipe); a 4-bit base is always merged by dequantize → add → re-quantize.
    #[arg(long)]
    requantize: bool,
    /// PEFT's safe_merge: round the delta to the weight dtype before adding.
    #[arg(long)]
    safe: bool,
}

type CliResult = Result<(), String>;

fn is_group_key(key: &str, group: &str) -> bool {
    key == group
        || key
            .strip_prefix(group)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn read_base(model: &ModelFolder, module: &str) -> qlora_lora::Result<Option<BaseWeight>> {
    let name = format!("{module}.weight");
    let bad = |reason: String| qlora_lora::Error::Module {
        module: module.to_string(),
        reason,
    };
    let entry = model.entries().iter().find(|e| e.name() == name);
    match entry {
        None => Ok(None),
        Some(Entry::Quantized { .. }) => {
            let q = model.quantized(&name).map_err(|e| bad(e.to_string()))?;
            BaseWeight::quantized(q).map(Some)
        }
        Some(Entry::Dense { .. }) => {
            let info = model.info(&name).map_err(|e| bad(e.to_string()))?;
            if info.shape.len() != 2 {
                return Err(bad(format!(
                    "{name} has shape {:?}, expected a 2-D weight",
                    info.shape
                )));
            }
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let data = match info.dtype {
                StDtype::BF16 => DenseData::Bf16(
                    model
                        .dense_as::<bf16>(&name)
                        .map_err(|e| bad(e.to_string()))?,
                ),
                StDtype::F16 => DenseData::F16(
                    model
                        .dense_as::<f16>(&name)
                        .map_err(|e| bad(e.to_string()))?,
                ),
                StDtype::F32 => DenseData::F32(
                    model
                        .dense_as::<f32>(&name)
                        .map_err(|e| bad(e.to_string()))?,
                ),
                other => {
                    return Err(bad(format!(
                        "{name} has dtype {other:?}, expected F32, BF16 or F16"
                    )))
                }
            };
            BaseWeight::dense(data, rows, cols).map(Some)
        }
    }
}

fn stored_tensors(module: &str, w: &BaseWeight) -> Vec<(String, OwnedTensor)> {
    let name = format!("{module}.weight");
    match w {
        BaseWeight::Quantized(q) => quantized_tensors(&name, q),
        BaseWeight::Dense {
            data,
            out_features,
            in_features,
            fan_in_fan_out,
        } => {
            let shape = if *fan_in_fan_out {
                vec![*in_features, *out_features]
            } else {
                vec![*out_features, *in_features]
            };
            let t = match data {
                DenseData::F32(v) => TensorData::from_elements(v, shape),
                DenseData::Bf16(v) => TensorData::from_elements(v, shape),
                DenseData::F16(v) => TensorData::from_elements(v, shape),
            };
            vec![(name, t)]
        }
    }
}

/// A dense floating-point tensor of `model` converted to `dtype` (`None` for other dtypes).
fn converted(model: &ModelFolder, key: &str, dtype: Dtype) -> Result<Option<OwnedTensor>, String> {
    let info = model.info(key).map_err(|e| e.to_string())?;
    if !matches!(
        info.dtype,
        StDtype::F32 | StDtype::F16 | StDtype::BF16 | StDtype::F64
    ) {
        return Ok(None);
    }
    let shape = info.shape.clone();
    let err = |e: qlora_checkpoint::Error| e.to_string();
    Ok(Some(match dtype {
        Dtype::F32 => TensorData::from_elements(&model.dense_as::<f32>(key).map_err(err)?, shape),
        Dtype::BF16 => TensorData::from_elements(&model.dense_as::<bf16>(key).map_err(err)?, shape),
        Dtype::F16 => TensorData::from_elements(&model.dense_as::<f16>(key).map_err(err)?, shape),
    }))
}

/// `config.json` with its dtype (`dtype`, and `torch_dtype` where present) set to `dtype`.
fn config_with_dtype(text: &str, path: &Path, dtype: Dtype) -> Result<String, String> {
    let mut cfg: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
    obj.insert("dtype".into(), dtype.torch_name().into());
    if obj.contains_key("torch_dtype") {
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
    }
    Ok(serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())? + "\n")
}

/// Write `model` to `out` with the merged modules replaced, keeping shards, keys and other files.
/// With `dtype`, every floating-point tensor is written in that dtype and `config.json` says so
/// (as transformers' `from_pretrained(torch_dtype=…)` then `save_pretrained` does).
fn write_like(
    model: &ModelFolder,
    merged: &[MergedModule],
    out: &Path,
    dtype: Option<Dtype>,
) -> CliResult {
    let groups: Vec<String> = merged
        .iter()
        .map(|m| format!("{}.weight", m.module))
        .collect();
    let mut per_shard: Vec<Vec<(String, OwnedTensor)>> =
        model.shards().iter().map(|_| Vec::new()).collect();
    for key in model.raw_names() {
        if groups.iter().any(|g| is_group_key(key, g)) {
            continue;
        }
        let info = model.info(key).map_err(|e| e.to_string())?;
        if let Some(t) = dtype
            .map(|d| converted(model, key, d))
            .transpose()?
            .flatten()
        {
            per_shard[info.shard].push((key.clone(), t));
            continue;
        }
        let bytes = model.tensor_bytes(key).map_err(|e| e.to_string())?;
        per_shard[info.shard].push((
            key.clone(),
            TensorData {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: Cow::Owned(bytes.to_vec()),
            },
        ));
    }
    for (m, g) in merged.iter().zip(&groups) {
        let shard = model.info(g).map_err(|e| e.to_string())?.shard;
        per_shard[shard].extend(stored_tensors(&m.module, &m.weight));
    }
    if model.layout() == Layout::File {
        let tensors = per_shard.pop().unwrap_or_default();
        let meta = model.shards()[0].metadata().cloned();
        return write_safetensors_atomic(out, tensors, meta).map_err(|e| e.to_string());
    }
    if out.exists() {
        return Err(format!(
            "output {} already exists; remove it or choose another path",
            out.display()
        ));
    }
    let guard = TempOutput::folder(out).map_err(|e| e.to_string())?;
    let tmp = guard.path();
    let result = (|| -> CliResult {
        let mut total: u64 = 0;
        let mut shard_names = HashSet::new();
        for (shard, tensors) in model.shards().iter().zip(per_shard) {
            total += tensors
                .iter()
                .map(|(_, t)| t.data.len() as u64)
                .sum::<u64>();
            shard_names.insert(shard.file_name().to_string());
            write_safetensors_atomic(
                &tmp.join(shard.file_name()),
                tensors,
                shard.metadata().cloned(),
            )
            .map_err(|e| match e {
                // Name the shard of the output, not of the hidden temporary folder.
                qlora_checkpoint::Error::Io { path, source } => {
                    format!("{}: {source}", guard.final_path(&path).display())
                }
                e => e.to_string(),
            })?;
        }
        let entries = std::fs::read_dir(model.root())
            .map_err(|e| format!("{}: {e}", model.root().display()))?;
        for e in entries.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if !path.is_file() || shard_names.contains(&fname) {
                continue;
            }
            if fname == INDEX_FILE_NAME {
                // Same keys in the same shards; only the total size changes.
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let mut index: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                if let Some(meta) = index.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                    meta.insert("total_size".into(), total.into());
                }
                let text = serde_json::to_string_pretty(&index).map_err(|e| e.to_string())?;
                std::fs::write(tmp.join(&fname), text + "\n")
                    .map_err(|e| format!("{fname}: {e}"))?;
            } else if let (Some(d), "config.json") = (dtype, fname.as_str()) {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                std::fs::write(tmp.join(&fname), config_with_dtype(&text, &path, d)?)
                    .map_err(|e| format!("{fname}: {e}"))?;
            } else if !fname.ends_with(".safetensors") && !fname.ends_with(".bin") {
                std::fs::copy(&path, tmp.join(&fname))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        Ok(())
    })();
    // On an error the guard removes the temporary folder.
    result?;
    guard.commit().map_err(|e| e.to_string())
}

/// Fraction of each dense merge that survives quantization with `opts`:
/// `⟨deq(Q(W')) − W₀, W' − W₀⟩ / ‖W' − W₀‖²`.
fn survival_after_quantizing(
    base: &BaseWeight,
    merged: &BaseWeight,
    opts: QuantizeOptions,
) -> Result<f64, String> {
    let w0 = base.to_f32().map_err(|e| e.to_string())?;
    let w1 = merged.to_f32().map_err(|e| e.to_string())?;
    let q = QuantizedTensor::quantize(&w1, &[merged.out_features(), merged.in_features()], opts)
        .map_err(|e| e.to_string())?;
    let deq: Vec<f32> = q.dequantize().map_err(|e| e.to_string())?;
    let (mut dot, mut dd) = (0.0f64, 0.0f64);
    for ((a, b), c) in w0.iter().zip(&w1).zip(&deq) {
        let d = (*b as f64) - (*a as f64);
        dot += ((*c as f64) - (*a as f64)) * d;
        dd += d * d;
    }
    Ok(if dd > 0.0 { dot / dd } else { 1.0 })
}

pub(crate) fn run(args: &MergeArgs) -> CliResult {
    let model = ModelFolder::open(&args.base).map_err(|e| e.to_string())?;
    if model.layout() != Layout::File && args.output.exists() {
        return Err(format!(
            "output {} already exists; remove it or choose another path",
            args.output.display()
        ));
    }
    let adapter = PeftAdapter::load(&args.adapter).map_err(|e| e.to_string())?;
    let four_bit = model
        .entries()
        .iter()
        .any(|e| matches!(e, Entry::Quantized { .. }));
    if four_bit && args.dtype.is_some() {
        return Err("--dtype applies to dense bases; a 4-bit base is merged by dequantize → add → re-quantize \
                    (run `qlora dequantize` first to merge into a dense copy)"
            .into());
    }
    let output = match args.dtype {
        Some(d) => MergeOutput::Dense(Dtype::from(d)),
        None => MergeOutput::Same,
    };
    let options = MergeOptions {
        safe: args.safe,
        output,
    };
    let mut bases = HashMap::new();
    let merged = merge_adapter(
        &adapter,
        |m| {
            let b = read_base(&model, m)?;
            if let Some(b) = &b {
                bases.insert(m.to_string(), b.clone());
            }
            Ok(b)
        },
        options,
    )
    .map_err(|e| e.to_string())?;
    let qlora = QuantizeOptions {
        double_quant: true,
        ..QuantizeOptions::qlora()
    };
    for m in &merged {
        let survived = match (&m.report.requantization, args.requantize && !four_bit) {
            (Some(r), _) => Some(r.survived),
            (None, true) => Some(survival_after_quantizing(
                &bases[&m.module],
                &m.weight,
                qlora,
            )?),
            (None, false) => None,
        };
        match survived {
            Some(s) => println!(
                "{}  ‖ΔW‖ = {:.6}  survived re-quantization: {:.1} %",
                m.module,
                m.report.delta_norm,
                100.0 * s
            ),
            None => println!("{}  ‖ΔW‖ = {:.6}", m.module, m.report.delta_norm),
        }
    }
    if args.requantize && !four_bit {
        // Merge into a dense copy in a scratch folder next to OUT (a temporary like any other
        // output: removed on error, on a signal, or by a later run), then quantize it in the
        // checkpoint crate's layout.
        let name = args
            .output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let scratch =
            TempOutput::folder(args.output.with_file_name(format!("{name}.merged-dense")))
                .map_err(|e| e.to_string())?;
        let dense = if model.layout() == Layout::File {
            scratch.path().join("model.safetensors")
        } else {
            scratch.path().join("model")
        };
        write_like(&model, &merged, &dense, args.dtype.map(Dtype::from))?;
        let conv = Conversion::Quantize {
            options: QuantizeFileOptions {
                quant: qlora,
                ..Default::default()
            },
            compute_dtype: None,
        };
        convert_model(&dense, &args.output, &conv, &ConvertOptions::default())
            .map_err(|e| e.to_string())?;
    } else {
        write_like(&model, &merged, &args.output, args.dtype.map(Dtype::from))?;
    }
    println!(
        "merged {} modules into {}",
        merged.len(),
        args.output.display()
    );
    Ok(())
}
