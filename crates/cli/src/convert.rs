//! `qlora quantize` and `qlora dequantize`, for a safetensors file or a model folder.

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use qlora_checkpoint::{
    convert_model, input_bytes, parse_size, Action, Conversion, ConvertOptions, ConvertReport,
    ModelFolder, QuantizeFileOptions, Selection,
};
use qlora_codec::{Dtype, QuantType, QuantizeOptions};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// A user-facing error message.
pub(crate) type CliResult = Result<(), String>;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum QuantTypeArg {
    Nf4,
    Fp4,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum DtypeArg {
    Bf16,
    F16,
    F32,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::Bf16 => Dtype::BF16,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::F32 => Dtype::F32,
        }
    }
}

/// Arguments of `qlora quantize`.
#[derive(Debug, Args)]
pub(crate) struct QuantizeArgs {
    /// Input: a safetensors file, or a model folder (config.json + model.safetensors or shards
    /// with model.safetensors.index.json).
    input: PathBuf,
    /// Output: a file for a file input (replaced atomically), a new folder for a folder input
    /// (must not exist; written to a temporary folder and renamed at the end).
    output: PathBuf,
    /// 4-bit code.
    #[arg(long, value_enum, default_value = "nf4")]
    quant_type: QuantTypeArg,
    /// Elements per absmax block: 32, 64, 128, …, 4096.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Quantize the absmax values again to 8 bits (QLoRA's double quantization).
    #[arg(long)]
    double_quant: bool,
    /// With --double-quant: the offset of tensor NAME instead of the mean of its absmax values
    /// (repeatable). Giving a checkpoint's stored `nested_offset` (torch's GPU mean, which can
    /// differ from the correctly rounded mean by an ulp) reproduces it byte for byte.
    #[arg(
        long = "dq-offset",
        value_name = "NAME=VALUE",
        requires = "double_quant"
    )]
    dq_offset: Vec<String>,
    /// Never quantize tensors whose name matches this regular expression (repeatable).
    #[arg(long = "skip", value_name = "REGEX")]
    skip: Vec<String>,
    /// Quantize only floating-point tensors whose name matches (repeatable; replaces the default
    /// rule: 2-D `.weight` tensors except embeddings, norms and lm_head).
    #[arg(long = "only", value_name = "REGEX")]
    only: Vec<String>,
    /// Quantize tensors that contain NaN or ±Inf instead of refusing them.
    #[arg(long)]
    allow_non_finite: bool,
    /// `bnb_4bit_compute_dtype` written to config.json (default: the model's `dtype` from
    /// config.json, else f32 like transformers' BitsAndBytesConfig).
    #[arg(long, value_enum)]
    compute_dtype: Option<DtypeArg>,
    /// Largest output shard (transformers' `max_shard_size` rule; default as transformers 5).
    #[arg(long, default_value = "50GB", value_name = "SIZE")]
    max_shard_size: String,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

/// Arguments of `qlora dequantize`.
#[derive(Debug, Args)]
pub(crate) struct DequantizeArgs {
    /// Input: a safetensors file or a model folder with bitsandbytes 4-bit weights.
    input: PathBuf,
    /// Output: a file for a file input, a new folder for a folder input (see `quantize`).
    output: PathBuf,
    /// Output dtype of the dequantized weights (default: the dtype recorded in each quant state).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Largest output shard (transformers' `max_shard_size` rule; default as transformers 5).
    #[arg(long, default_value = "50GB", value_name = "SIZE")]
    max_shard_size: String,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

fn print_report(report: &ConvertReport, output: &Path) {
    let (mut n_changed, mut bytes_in, mut bytes_out) = (0usize, 0usize, 0usize);
    for r in &report.tensors {
        bytes_in += r.bytes_in;
        bytes_out += r.bytes_out;
        if r.action != Action::Copied {
            n_changed += 1;
            let verb = match r.action {
                Action::Quantized => "quantized",
                _ => "dequantized",
            };
            println!(
                "{verb:>11}  {:<60} {:?}  {} -> {} bytes",
                r.name, r.shape, r.bytes_in, r.bytes_out
            );
        }
    }
    println!(
        "{n_changed} tensors converted, {} copied; {bytes_in} -> {bytes_out} bytes",
        report.tensors.len() - n_changed
    );
    if report.shards.len() > 1 || !report.copied_files.is_empty() {
        println!(
            "wrote {} ({} shard{}; also copied: {})",
            output.display(),
            report.shards.len(),
            if report.shards.len() == 1 { "" } else { "s" },
            if report.copied_files.is_empty() {
                "nothing".to_string()
            } else {
                report.copied_files.join(", ")
            }
        );
    }
    for f in &report.skipped_files {
        eprintln!("note: weight file {f} of the input was not read and not copied");
    }
}

fn run(input: &Path, output: &Path, conv: &Conversion, max_shard: &str, quiet: bool) -> CliResult {
    let max_shard_size = parse_size(max_shard).map_err(|e| format!("--max-shard-size: {e}"))?;
    let bar = if std::io::stderr().is_terminal() && !quiet {
        // Opening the headers is cheap; it gives the total for the bar.
        let total = ModelFolder::open(input)
            .map(|m| input_bytes(&m))
            .map_err(|e| e.to_string())?;
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .map_err(|e| e.to_string())?,
        );
        Some(bar)
    } else {
        None
    };
    let progress = |done: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let opts = ConvertOptions {
        max_shard_size,
        progress: Some(&progress),
    };
    let result = convert_model(input, output, conv, &opts);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = result.map_err(|e| e.to_string())?;
    if !quiet {
        print_report(&report, output);
    }
    Ok(())
}

pub(crate) fn quantize(args: &QuantizeArgs) -> CliResult {
    let selection = Selection::new(&args.only, &args.skip).map_err(|e| e.to_string())?;
    let quant_type = match args.quant_type {
        QuantTypeArg::Nf4 => QuantType::Nf4,
        QuantTypeArg::Fp4 => QuantType::Fp4,
    };
    qlora_codec::check_blocksize(args.blocksize).map_err(|e| format!("--blocksize: {e}"))?;
    let dq_offsets = parse_dq_offsets(&args.dq_offset)?;
    let conv = Conversion::Quantize {
        options: QuantizeFileOptions {
            quant: QuantizeOptions {
                quant_type,
                blocksize: args.blocksize,
                double_quant: args.double_quant,
            },
            selection,
            allow_non_finite: args.allow_non_finite,
            dq_offsets,
        },
        compute_dtype: args.compute_dtype.map(Into::into),
    };
    run(
        &args.input,
        &args.output,
        &conv,
        &args.max_shard_size,
        args.quiet,
    )
}

/// `NAME=VALUE` pairs of `--dq-offset`: a finite decimal, rounded to f32 (a JSON
/// `nested_offset`, the f64 repr of an f32, comes back exactly).
fn parse_dq_offsets(pairs: &[String]) -> Result<std::collections::BTreeMap<String, f32>, String> {
    let mut map = std::collections::BTreeMap::new();
    for pair in pairs {
        let (name, value) = pair
            .rsplit_once('=')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| format!("--dq-offset {pair:?}: expected NAME=VALUE"))?;
        let v: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("--dq-offset {pair:?}: {value:?} is not a number"))?;
        let v = v as f32;
        if !v.is_finite() {
            return Err(format!(
                "--dq-offset {pair:?}: the offset must be finite in f32"
            ));
        }
        if map.insert(name.to_string(), v).is_some() {
            return Err(format!("--dq-offset: {name} given twice"));
        }
    }
    Ok(map)
}

pub(crate) fn dequantize(args: &DequantizeArgs) -> CliResult {
    let conv = Conversion::Dequantize {
        dtype: args.dtype.map(Into::into),
    };
    run(
        &args.input,
        &args.output,
        &conv,
        &args.max_shard_size,
        args.quiet,
    )
}
