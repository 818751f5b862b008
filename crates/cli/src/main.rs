//! `qlora`: quantize, dequantize and inspect bitsandbytes 4-bit checkpoints without Python.
#![forbid(unsafe_code)]

mod bench;
mod convert;
mod demo;
mod estimate;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// QLoRA building blocks on the command line: 4-bit checkpoints bit-exact with bitsandbytes.
#[derive(Debug, Parser)]
#[command(name = "qlora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a complete QLoRA fine-tune on a small built-in model (pretrain, NF4, LoRA, 8-bit
    /// paged AdamW, save, reload).
    Demo(demo::DemoArgs),
    /// Quantize the linear-layer weights of a safetensors file to NF4/FP4 (bitsandbytes layout).
    Quantize(convert::QuantizeArgs),
    /// Write every 4-bit weight of a safetensors file back as a dense tensor.
    Dequantize(convert::DequantizeArgs),
    /// Exact byte accounting of QLoRA training memory for a preset or a config.json.
    Estimate(estimate::EstimateArgs),
    /// Measure CPU quantize/dequantize throughput against a memcpy of the same bytes.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Demo(args) => demo::demo(args),
        Command::Quantize(args) => convert::quantize(args),
        Command::Dequantize(args) => convert::dequantize(args),
        Command::Estimate(args) => estimate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
