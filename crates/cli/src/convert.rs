//! `qlora quantize` and `qlora dequantize`.

use clap::{Args, ValueEnum};
use qlora_checkpoint::{
    dequantize_file, quantize_file, Action, QuantizeFileOptions, Selection, TensorReport,
};
use qlora_codec::{Dtype, QuantType, QuantizeOptions};
use std::path::PathBuf;

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
    /// Input safetensors file (dense weights).
    input: PathBuf,
    /// Output safetensors file (written atomically).
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
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

/// Arguments of `qlora dequantize`.
#[derive(Debug, Args)]
pub(crate) struct DequantizeArgs {
    /// Input safetensors file with bitsandbytes 4-bit weights.
    input: PathBuf,
    /// Output safetensors file (written atomically).
    output: PathBuf,
    /// Output dtype of the dequantized weights (default: the dtype recorded in each quant state).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

fn print_report(report: &[TensorReport]) {
    let (mut n_changed, mut bytes_in, mut bytes_out) = (0usize, 0usize, 0usize);
    for r in report {
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
        report.len() - n_changed
    );
}

pub(crate) fn quantize(args: &QuantizeArgs) -> CliResult {
    let selection = Selection::new(&args.only, &args.skip).map_err(|e| e.to_string())?;
    let quant_type = match args.quant_type {
        QuantTypeArg::Nf4 => QuantType::Nf4,
        QuantTypeArg::Fp4 => QuantType::Fp4,
    };
    qlora_codec::check_blocksize(args.blocksize).map_err(|e| e.to_string())?;
    let opts = QuantizeFileOptions {
        quant: QuantizeOptions {
            quant_type,
            blocksize: args.blocksize,
            double_quant: args.double_quant,
        },
        selection,
        allow_non_finite: args.allow_non_finite,
    };
    let report = quantize_file(&args.input, &args.output, &opts).map_err(|e| e.to_string())?;
    if !args.quiet {
        print_report(&report);
    }
    Ok(())
}

pub(crate) fn dequantize(args: &DequantizeArgs) -> CliResult {
    let report = dequantize_file(&args.input, &args.output, args.dtype.map(Into::into))
        .map_err(|e| e.to_string())?;
    if !args.quiet {
        print_report(&report);
    }
    Ok(())
}
