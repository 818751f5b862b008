//! `qlora`: quantize, dequantize and inspect bitsandbytes 4-bit checkpoints without Python.
#![forbid(unsafe_code)]

mod bench;
mod convert;
mod demo;
mod estimate;
mod finetune;
mod inspect;
mod merge;

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
    /// Quantize the linear-layer weights of a safetensors file or model folder to NF4/FP4
    /// (bitsandbytes layout; a folder output loads in transformers as is).
    Quantize(convert::QuantizeArgs),
    /// Write every 4-bit weight of a safetensors file or model folder back as a dense tensor.
    Dequantize(convert::DequantizeArgs),
    /// List the tensors of a safetensors file or model folder with their sizes, and what the
    /// model would take in bf16 and in NF4.
    Inspect(inspect::InspectArgs),
    /// Exact byte accounting of QLoRA training memory for a preset or a config.json.
    Estimate(estimate::EstimateArgs),
    /// Measure CPU quantize/dequantize throughput against a memcpy of the same bytes.
    Bench(bench::BenchArgs),
    /// Merge a PEFT LoRA/DoRA adapter into a dense or 4-bit model (PEFT's merge_and_unload).
    Merge(merge::MergeArgs),
    /// QLoRA fine-tuning of a Llama/Mistral/Qwen2 model folder on a .txt or .jsonl file: 4-bit
    /// base, LoRA adapters, 8-bit (paged) AdamW, checkpoints and --resume; writes the PEFT
    /// adapter, the 4-bit base and the merged model.
    Finetune(finetune::FinetuneArgs),
}

impl Command {
    /// Whether the command writes outputs. Those run with [`guard_outputs`]: a new writing
    /// command is added here.
    fn writes(&self) -> bool {
        matches!(
            self,
            Command::Demo(_)
                | Command::Quantize(_)
                | Command::Dequantize(_)
                | Command::Merge(_)
                | Command::Finetune(_)
        )
    }
}

/// Interrupted writes leave nothing behind: on SIGINT, SIGTERM or SIGHUP the temporaries in
/// flight are removed, one line says so and the exit status is 130, 143 or 129; SIGXFSZ is
/// ignored so that a file-size limit fails the write with a clear error; leftovers of killed
/// runs that a write removes are reported in one line.
fn guard_outputs() -> std::io::Result<()> {
    qlora_atomic_write::report_leftovers_with(report_leftovers);
    qlora_atomic_write::install_signal_cleanup()
}

fn report_leftovers(removed: &[qlora_atomic_write::Leftover]) {
    let bytes: u64 = removed.iter().map(|l| l.bytes).sum();
    let paths: Vec<String> = removed
        .iter()
        .map(|l| l.path.display().to_string())
        .collect();
    let what = match removed.len() {
        1 => "the temporary output".to_string(),
        n => format!("{n} temporary outputs"),
    };
    eprintln!(
        "qlora: removed {what} of an interrupted earlier run ({:.1} MB): {}",
        bytes as f64 / 1e6,
        paths.join(", ")
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Demo(_) | Command::Finetune(_)) {
        qlora_candle::tuning::for_cpu_training();
    }
    if cli.command.writes() {
        if let Err(e) = guard_outputs() {
            eprintln!("error: cannot install the signal handlers that clean up outputs: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match &cli.command {
        Command::Demo(args) => demo::demo(args),
        Command::Quantize(args) => convert::quantize(args),
        Command::Dequantize(args) => convert::dequantize(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Estimate(args) => estimate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Finetune(args) => finetune::run(args),
    };
    if std::env::var_os("QLORA_PRINT_PEAK_RSS").is_some() {
        print_peak_rss();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `QLORA_PRINT_PEAK_RSS=1`: print the process's peak resident set (Linux `VmHWM`) on stderr, for
/// the memory tests of streaming conversion.
fn print_peak_rss() {
    if let Some(bytes) = qlora_candle::finetune::peak_rss_bytes() {
        eprintln!("peak RSS: {} kB", bytes / 1024);
    }
}
