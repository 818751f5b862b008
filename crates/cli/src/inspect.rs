//! `qlora inspect`: what a checkpoint holds and what it would take in bf16 and in NF4.

use clap::Args;
use qlora_checkpoint::{default_rule, Entry, ModelFolder, QuantState};
use qlora_codec::{num_blocks, packed_len, Dtype, QuantType};
use serde_json::{json, Value};
use std::path::PathBuf;

use crate::convert::CliResult;

/// Arguments of `qlora inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// A safetensors file or a model folder.
    path: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Bytes of one weight of `n` elements stored by bitsandbytes with blocksize 64 (what
/// transformers uses), with or without double quant: packed codes, absmax, maps and the JSON blob.
fn nf4_bytes(shape: &[usize], double_quant: bool) -> usize {
    let n: usize = shape.iter().product();
    let nb = num_blocks(n, 64);
    let state = QuantState {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        // A typical offset: 17 significant digits, as most are.
        nested_offset: double_quant.then_some(0.051_692_616),
    };
    let blob = state.to_json_bytes().len();
    let absmax = if double_quant {
        nb + 4 * nb.div_ceil(256) + 4 * 256
    } else {
        4 * nb
    };
    packed_len(n) + absmax + 4 * 16 + blob
}

pub(crate) fn run(args: &InspectArgs) -> CliResult {
    let model = ModelFolder::open(&args.path).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let (mut params, mut bytes, mut bf16, mut nf4, mut nf4_dq) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for e in model.entries() {
        let (row, numel, stored, quantizable, float) = match e {
            Entry::Dense { name, dtype, shape } => {
                let numel: usize = shape.iter().product();
                let stored = model.info(name).map_err(|e| e.to_string())?.len;
                let float = matches!(
                    dtype,
                    safetensors::Dtype::F32
                        | safetensors::Dtype::F16
                        | safetensors::Dtype::BF16
                        | safetensors::Dtype::F64
                );
                (
                    json!({
                        "name": name, "dtype": format!("{dtype:?}").to_lowercase(), "shape": shape,
                        "quant_type": null, "blocksize": null, "double_quant": null, "bytes": stored,
                    }),
                    numel,
                    stored,
                    float && default_rule(name, shape),
                    float,
                )
            }
            Entry::Quantized { name, state } => {
                let mut stored = 0;
                for k in model.raw_names() {
                    if k == name
                        || k.strip_prefix(name.as_str())
                            .is_some_and(|s| s.starts_with('.'))
                    {
                        stored += model.info(k).map_err(|e| e.to_string())?.len;
                    }
                }
                (
                    json!({
                        "name": name, "dtype": state.dtype.torch_name(), "shape": state.shape,
                        "quant_type": state.quant_type.as_str(), "blocksize": state.blocksize,
                        "double_quant": state.is_double_quant(), "bytes": stored,
                    }),
                    state.numel(),
                    stored,
                    true,
                    true,
                )
            }
        };
        params += numel;
        bytes += stored;
        let shape: Vec<usize> = row["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .unwrap_or_default();
        let dense_bf16 = if float { 2 * numel } else { stored };
        bf16 += dense_bf16;
        if quantizable {
            nf4 += nf4_bytes(&shape, false);
            nf4_dq += nf4_bytes(&shape, true);
        } else {
            nf4 += dense_bf16;
            nf4_dq += dense_bf16;
        }
        rows.push(row);
    }
    let per_param = |b: usize| {
        if params == 0 {
            0.0
        } else {
            b as f64 / params as f64
        }
    };
    if args.json {
        let out = json!({
            "path": args.path.display().to_string(),
            "shards": model.shards().iter().map(|s| s.file_name()).collect::<Vec<_>>(),
            "tensors": rows,
            "totals": {
                "tensors": model.entries().len(),
                "parameters": params,
                "bytes": bytes,
                "bytes_per_parameter": per_param(bytes),
                "bf16_bytes": bf16,
                "nf4_bytes": nf4,
                "nf4_double_quant_bytes": nf4_dq,
            },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:<60} {:>9} {:>16} {:>5} {:>5} {:>3} {:>12}",
        "name", "dtype", "shape", "quant", "block", "dq", "bytes"
    );
    let opt = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for r in &rows {
        println!(
            "{:<60} {:>9} {:>16} {:>5} {:>5} {:>3} {:>12}",
            opt(&r["name"]),
            opt(&r["dtype"]),
            r["shape"].to_string(),
            opt(&r["quant_type"]),
            opt(&r["blocksize"]),
            opt(&r["double_quant"]),
            opt(&r["bytes"]),
        );
    }
    println!(
        "{} tensors in {} file(s), {params} parameters, {bytes} bytes ({:.3} bytes/parameter)",
        rows.len(),
        model.shards().len(),
        per_param(bytes)
    );
    println!(
        "as bf16: {bf16} bytes ({:.3} B/param); NF4 (blocksize 64): {nf4} bytes ({:.3} B/param); NF4 + double quant: {nf4_dq} bytes ({:.3} B/param)",
        per_param(bf16),
        per_param(nf4),
        per_param(nf4_dq)
    );
    Ok(())
}
