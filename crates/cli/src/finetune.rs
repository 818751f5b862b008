//! `qlora finetune MODEL_DIR --data FILE --out DIR`: QLoRA fine-tuning of a Llama-family model
//! (the job is `qlora_candle::finetune::finetune`; this file parses, draws progress, prints).

use crate::convert::DtypeArg;
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qlora_candle::finetune::{
    finetune, FinetuneEvent, FinetuneOptions, LrScheduleKind, OptimKind, QLoraConfig, TrainConfig,
};
use qlora_codec::{QuantType, QuantizeOptions};
use qlora_lora::peft::TargetModules;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum QuantArg {
    Nf4,
    Fp4,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OptimArg {
    #[value(name = "adamw8bit")]
    Adamw8bit,
    #[value(name = "paged_adamw8bit")]
    PagedAdamw8bit,
    #[value(name = "adamw32bit")]
    Adamw32bit,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ScheduleArg {
    Constant,
    Cosine,
}

/// Arguments of `qlora finetune`.
#[derive(Debug, Args)]
pub(crate) struct FinetuneArgs {
    /// A Llama/Mistral/Qwen2 model folder: config.json, model.safetensors (or shards; dense, or
    /// a transformers bitsandbytes-4bit folder) and tokenizer.json.
    model_dir: PathBuf,
    /// Training data: .txt (tokenized and packed into --seq-len pieces) or .jsonl (`text`, or
    /// `prompt` + `completion` with the prompt not scored).
    #[arg(long)]
    data: PathBuf,
    /// Output folder (must not exist): adapter/ (PEFT), base-4bit/ (transformers +
    /// bitsandbytes), merged/ (dense), training.json. Checkpoints go to OUT-checkpoints/.
    #[arg(long)]
    out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scaling alpha/rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Modules that get adapters: comma-separated names (q_proj,v_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    target_modules: String,
    /// rsLoRA scaling (alpha/√rank).
    #[arg(long)]
    rslora: bool,
    /// DoRA (weight-decomposed LoRA).
    #[arg(long)]
    dora: bool,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value = "constant")]
    schedule: ScheduleArg,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 0.3)]
    max_grad_norm: f64,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Epochs over the data.
    #[arg(long)]
    epochs: Option<u64>,
    /// Examples per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per example (at most the model's max_position_embeddings).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// 4-bit code of the base.
    #[arg(long, value_enum, default_value = "nf4")]
    quant_type: QuantArg,
    /// Double quantization of the absmax values (QLoRA's).
    #[arg(long)]
    double_quant: bool,
    /// Elements per absmax block.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Optimizer (bitsandbytes' names).
    #[arg(long, value_enum, default_value = "paged_adamw8bit")]
    optim: OptimArg,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Write a checkpoint (adapter, optimizer state, trainer state) every N steps.
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Continue from the latest checkpoint in OUT-checkpoints/ (same options as the first run).
    #[arg(long)]
    resume: bool,
    /// Seed of the adapter init, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype of the merged model.
    #[arg(long, value_enum, default_value = "bf16")]
    merged_dtype: DtypeArg,
    /// Print one JSON object (the summary) instead of text; no progress bar.
    #[arg(long)]
    json: bool,
}

fn device(d: DeviceArg) -> Result<Device, String> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if !candle_core::utils::cuda_is_available() => Err(
            "--device cuda: this build of qlora has no CUDA backend (candle was built without \
             its `cuda` feature); use --device cpu"
                .into(),
        ),
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| format!("--device cuda: {e}")),
    }
}

fn options(a: &FinetuneArgs) -> Result<FinetuneOptions, String> {
    let target_modules = if a.target_modules == "all-linear" {
        TargetModules::Pattern("all-linear".into())
    } else {
        let names: Vec<String> = a
            .target_modules
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() {
            return Err("--target-modules: no module name given".into());
        }
        TargetModules::List(names)
    };
    if !(a.max_grad_norm.is_finite() && a.max_grad_norm >= 0.0) {
        return Err(format!("--max-grad-norm {} must be >= 0", a.max_grad_norm));
    }
    if a.steps == Some(0) || a.epochs == Some(0) {
        return Err("--steps/--epochs must be at least 1".into());
    }
    let qlora = QLoraConfig {
        quant: QuantizeOptions {
            quant_type: match a.quant_type {
                QuantArg::Nf4 => QuantType::Nf4,
                QuantArg::Fp4 => QuantType::Fp4,
            },
            blocksize: a.blocksize,
            double_quant: a.double_quant,
        },
        rank: a.rank,
        alpha: a.alpha,
        dropout: a.dropout,
        target_modules,
        use_rslora: a.rslora,
        use_dora: a.dora,
        init_seed: a.seed,
    };
    let train = TrainConfig {
        optim: match a.optim {
            OptimArg::Adamw8bit => OptimKind::AdamW8bit,
            OptimArg::PagedAdamw8bit => OptimKind::PagedAdamW8bit,
            OptimArg::Adamw32bit => OptimKind::AdamW32bit,
        },
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup_steps: a.warmup_steps,
        schedule: match a.schedule {
            ScheduleArg::Constant => LrScheduleKind::Constant,
            ScheduleArg::Cosine => LrScheduleKind::Cosine,
        },
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        batch_size: a.batch_size,
        seed: a.seed,
        save_every: a.save_every,
        ..TrainConfig::default()
    };
    Ok(FinetuneOptions {
        model_dir: a.model_dir.clone(),
        data: a.data.clone(),
        out: a.out.clone(),
        qlora,
        train,
        steps: a.steps,
        epochs: a.epochs,
        seq_len: a.seq_len,
        resume: a.resume,
        merged_dtype: match a.merged_dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        },
        device: device(a.device)?,
    })
}

fn mb(bytes: usize) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

pub(crate) fn run(args: &FinetuneArgs) -> Result<(), String> {
    let opts = options(args)?;
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if args.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_prefix("training");
    let json = args.json;
    let summary = finetune(&opts, |e| match e {
        FinetuneEvent::Loaded {
            memory,
            examples,
            total_steps,
        } => {
            bar.set_length(*total_steps);
            if !json {
                bar.println(format!(
                    "model: {} parameters, 4-bit base {} ({} linear weights), dense frozen {}, \
                     adapters {} trainable ({}); {} examples",
                    memory.parameters,
                    mb(memory.base_4bit_bytes),
                    memory.base_4bit_parameters,
                    mb(memory.dense_bytes),
                    memory.trainable_parameters,
                    mb(memory.trainable_bytes),
                    examples
                ));
            }
        }
        FinetuneEvent::Resumed { checkpoint, step } => {
            bar.set_position(*step);
            if !json {
                bar.println(format!(
                    "resumed from {} (step {step})",
                    checkpoint.display()
                ));
            }
        }
        FinetuneEvent::Step(r) => {
            bar.set_position(r.step);
            bar.set_message(format!("loss {:.4} lr {:.2e}", r.loss, r.lr));
        }
        FinetuneEvent::Saving => {
            bar.finish_and_clear();
        }
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let last = summary.losses.last().copied().unwrap_or(f32::NAN);
    println!(
        "trained {} steps ({} in this run, {:.0} tokens/s); last step loss {last:.4}",
        summary.steps,
        summary.steps - summary.resumed_from,
        summary.tokens as f64 / summary.train_seconds.max(1e-9)
    );
    println!(
        "eval loss (first batch): {:.4} -> {:.4}; reloaded 4-bit base + adapter {:.4}, merged {:.4}",
        summary.eval_loss_before,
        summary.eval_loss_after,
        summary.eval_loss_reloaded,
        summary.eval_loss_merged
    );
    println!(
        "memory: weights {}, optimizer states {}, peak RSS {}",
        mb(summary.weight_bytes),
        mb(summary.optimizer_state_bytes),
        summary
            .peak_rss_bytes
            .map_or("unknown".to_string(), |b| mb(b as usize))
    );
    println!(
        "wrote {}: adapter/ (PEFT), base-4bit/ (transformers + bitsandbytes), merged/, training.json",
        summary.out.display()
    );
    Ok(())
}
