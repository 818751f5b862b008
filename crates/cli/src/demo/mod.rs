//! `qlora demo`: the QLoRA pipeline end to end on a Llama-architecture model small enough to
//! pretrain on a laptop CPU, with nothing downloaded.
//!
//! 1. A byte-level BPE tokenizer is trained on *Coriolanus* (embedded).
//! 2. A small Llama ([`MODEL_HIDDEN`] wide, [`MODEL_LAYERS`] layers) is pretrained dense f32 with
//!    AdamW on the first 90 % of *Coriolanus* and saved as a Hugging Face model folder.
//! 3. Every projection of its decoder is quantized to NF4 with double quantization (block 64),
//!    as `load_in_4bit` does; embedding, norms and `lm_head` stay dense and frozen.
//! 4. LoRA adapters on all seven projections are trained with paged 8-bit AdamW on 90 % of
//!    Juliet's lines from *Romeo and Juliet* (embedded).
//! 5. It reports losses (Juliet held-out; Coriolanus held-out, for forgetting), memory by
//!    component beside `qlora estimate`'s prediction, and samples; saves the PEFT adapter, the
//!    4-bit base and the merged model, and reloads them to check they reproduce the losses.

use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qlora_atomic_write::{write_atomically, TempOutput};
use qlora_candle::data::{BpeTokenizer, TokenDataset};
use qlora_candle::finetune::{
    peak_rss_bytes, LrScheduleKind, OptimKind, QLoraConfig, QLoraModel, TrainConfig,
    Trainer as FinetuneTrainer,
};
use qlora_candle::llama::{
    save_pretrained, varmap_tensors, DenseLinears, LlamaConfig, LlamaForCausalLM,
};
use qlora_candle::pretrain::{generate, mean_loss, pretrain};
use qlora_candle::pretrain::{PretrainConfig, StepReport};
use qlora_codec::QuantizeOptions;
use qlora_lora::peft::TargetModules;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The pretraining text: *Coriolanus*, the first play of the tiny-shakespeare corpus.
const PRETRAIN_TEXT: &str = include_str!("../../data/coriolanus.txt");
/// The fine-tuning text: every speech of Juliet in *Romeo and Juliet*.
const FINETUNE_TEXT: &str = include_str!("../../data/juliet.txt");

/// Tokenizer vocabulary (256 byte tokens, the end-of-text token, BPE merges).
const VOCAB_SIZE: usize = 768;
/// The end-of-text special token (id 0).
const EOS: &str = "<|endoftext|>";
/// Hidden size of the demo model.
pub(crate) const MODEL_HIDDEN: usize = 256;
/// Decoder layers.
pub(crate) const MODEL_LAYERS: usize = 2;
/// Attention heads (head_dim 64).
const MODEL_HEADS: usize = 4;
/// Key/value heads (grouped-query attention, 2 queries per key/value head).
const MODEL_KV_HEADS: usize = 2;
/// Tokens per training sequence.
const SEQ_LEN: usize = 64;
/// Sequences per batch (pretraining and fine-tuning).
const BATCH: usize = 8;
/// Pretraining peak learning rate (warmup then cosine to a tenth).
const PRETRAIN_LR: f64 = 3e-3;
/// Fine-tuning learning rate (constant after 3 % warmup, QLoRA's schedule).
const FINETUNE_LR: f64 = 1e-3;
/// QLoRA's `max_grad_norm`.
const MAX_GRAD_NORM: f64 = 0.3;
/// QLoRA's `lora_dropout` for small models is 0.05–0.1.
const LORA_DROPOUT: f32 = 0.05;
/// Tokens generated for each sample.
const SAMPLE_TOKENS: usize = 80;
/// Sampling temperature.
const TEMPERATURE: f64 = 0.8;
/// The prompt of both samples.
const PROMPT: &str = "JULIET:\n";
/// The adapter reloaded over the saved 4-bit base runs the same arithmetic as training.
const ADAPTER_TOLERANCE: f64 = 1e-6;
/// The merged f32 model differs from the adapter model by float rounding of `W + s·B·A`.
const MERGED_TOLERANCE: f64 = 1e-3;

/// The projections that carry adapters (PEFT's `all-linear` for Llama: `lm_head` excluded).
const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Layers(#[from] qlora_candle::Error),
    #[error(transparent)]
    Llama(#[from] qlora_candle::llama::LlamaError),
    #[error(transparent)]
    Data(#[from] qlora_candle::data::DataError),
    #[error(transparent)]
    Lora(#[from] qlora_lora::Error),
    #[error(transparent)]
    Checkpoint(#[from] qlora_checkpoint::Error),
    #[error(transparent)]
    Finetune(#[from] qlora_candle::finetune::FinetuneError),
    #[error(transparent)]
    Write(#[from] qlora_atomic_write::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("progress bar: {0}")]
    Progress(String),
}

/// Where the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceArg {
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU (needs a build with candle's CUDA backend).
    Cuda,
}

/// Arguments of `qlora demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Fine-tuning steps (each a batch of 8 sequences of 64 tokens).
    #[arg(long, default_value_t = 160)]
    steps: u64,
    /// Pretraining steps of the base model (each a batch of 8 sequences of 64 tokens).
    #[arg(long, default_value_t = 480)]
    pretrain_steps: u64,
    /// LoRA rank r (lora_alpha is 2r).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Seed of everything random: weights, batches, adapter init, dropout, sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created if missing).
    #[arg(long, default_value = "qlora-demo-out")]
    out: PathBuf,
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Print the summary as one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

impl DemoArgs {
    fn validate(&self) -> Result<Device, DemoError> {
        if self.steps == 0 {
            return Err(DemoError::Invalid("--steps must be at least 1".into()));
        }
        if self.pretrain_steps == 0 {
            return Err(DemoError::Invalid(
                "--pretrain-steps must be at least 1".into(),
            ));
        }
        if !(1..=MODEL_HIDDEN).contains(&self.rank) {
            return Err(DemoError::Invalid(format!(
                "--rank must be between 1 and {MODEL_HIDDEN} (the model's width), found {}",
                self.rank
            )));
        }
        match self.device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if !candle_core::utils::cuda_is_available() => Err(DemoError::Invalid(
                "--device cuda: this build of qlora has no CUDA backend (candle was built \
                     without its `cuda` feature); use --device cpu"
                    .into(),
            )),
            DeviceArg::Cuda => Ok(Device::new_cuda(0)?),
        }
    }
}

/// Entry point of `qlora demo`.
pub(crate) fn demo(args: &DemoArgs) -> Result<(), String> {
    run(args).map_err(|e| e.to_string())
}

fn progress(len: u64, prefix: &'static str) -> Result<ProgressBar, DemoError> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:24.cyan/blue}] {pos:>4}/{len} {elapsed:>4} {msg}",
    )
    .map_err(|e| DemoError::Progress(e.to_string()))?
    .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(style);
    bar.set_prefix(prefix);
    Ok(bar)
}

/// A spinner for a phase without steps (evaluation, saving), on stderr when it is a terminal.
fn spinner(message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::default_spinner());
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn create_dir(dir: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Splits `text` at the first line break after `fraction` of its bytes: (train, held-out).
fn split(text: &str, fraction: f64) -> (&str, &str) {
    let at = (text.len() as f64 * fraction) as usize;
    let cut = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
    text.split_at(cut)
}

/// The demo model's config.
pub(crate) fn model_config(vocab_size: usize) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(
        vocab_size,
        MODEL_HIDDEN,
        MODEL_LAYERS,
        MODEL_HEADS,
        MODEL_KV_HEADS,
    );
    cfg.max_position_embeddings = 2 * SEQ_LEN;
    cfg.extra.insert("bos_token_id".into(), json!(0));
    cfg.extra.insert("eos_token_id".into(), json!(0));
    cfg
}

/// One row of the memory table: measured bytes beside `qlora estimate`'s.
struct MemoryRow {
    key: &'static str,
    label: String,
    measured: Option<usize>,
    estimate: u128,
}

/// `qlora estimate`'s accounting for the demo's model and setup.
fn estimate_for(cfg: &LlamaConfig, rank: usize) -> Result<crate::estimate::Estimate, DemoError> {
    use crate::estimate::{
        estimate, AdapterDtype, AttentionArg, BaseFormat, ModelShape, OptimizerArg, Setup,
    };
    let model = ModelShape {
        name: "qlora demo".into(),
        hidden: cfg.hidden_size as u128,
        intermediate: cfg.intermediate_size as u128,
        layers: cfg.num_hidden_layers as u128,
        heads: cfg.num_attention_heads as u128,
        kv_heads: cfg.kv_heads() as u128,
        head_dim: cfg.head_dim() as u128,
        vocab: cfg.vocab_size as u128,
        tied: cfg.tie_word_embeddings,
        attention_bias: cfg.qkv_bias(),
        mlp_bias: cfg.mlp_bias(),
    };
    let setup = Setup {
        format: BaseFormat::Nf4Dq,
        blocksize: 64,
        rank: rank as u128,
        targets: (0..TARGET_MODULES.len()).collect(),
        optimizer: OptimizerArg::EightBit,
        adapter_dtype: AdapterDtype::F32,
        batch: BATCH as u128,
        seq: SEQ_LEN as u128,
        attention: AttentionArg::Eager,
    };
    estimate(&model, &setup).map_err(DemoError::Invalid)
}

#[derive(Debug, Default)]
struct Timing {
    tokenizer: f64,
    pretrain: f64,
    quantize: f64,
    finetune: f64,
    eval: f64,
    save_reload: f64,
}

fn ema(prev: Option<f64>, x: f64) -> f64 {
    prev.map_or(x, |e| 0.9 * e + 0.1 * x)
}

#[allow(clippy::too_many_lines)]
fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let device = args.validate()?;
    // Fail on an unusable output directory now, not after a minute of training.
    create_dir(&args.out)?;
    let start = Instant::now();
    let mut timing = Timing::default();

    // 1. Tokenizer.
    let t = Instant::now();
    let tok = BpeTokenizer::train(&[PRETRAIN_TEXT], VOCAB_SIZE, &[EOS])?;
    let (pre_train, pre_held) = split(PRETRAIN_TEXT, 0.9);
    let (ft_train, ft_held) = split(FINETUNE_TEXT, 0.9);
    let pre_data = TokenDataset::from_text(&tok, pre_train, SEQ_LEN)?;
    let pre_held_data = TokenDataset::from_text(&tok, pre_held, SEQ_LEN)?;
    let ft_data = TokenDataset::from_text(&tok, ft_train, SEQ_LEN)?;
    let ft_held_data = TokenDataset::from_text(&tok, ft_held, SEQ_LEN)?;
    let prompt = tok.encode(PROMPT)?;
    timing.tokenizer = t.elapsed().as_secs_f64();
    let cfg = model_config(tok.vocab_size());

    // 2. Pretraining: dense f32, AdamW, warmup + cosine.
    let t = Instant::now();
    let (dense, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &device, args.seed)?;
    let pre_cfg = PretrainConfig {
        steps: args.pretrain_steps,
        batch_size: BATCH,
        lr: PRETRAIN_LR,
        warmup_steps: (args.pretrain_steps / 20).max(1),
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        seed: args.seed ^ 0x5EED_0001,
    };
    let bar = progress(args.pretrain_steps, "pretrain")?;
    let mut avg = None::<f64>;
    let mut tokens = 0usize;
    let losses = pretrain(&dense, &varmap, &pre_data, &pre_cfg, |r: &StepReport| {
        avg = Some(ema(avg, r.loss));
        tokens += r.tokens;
        bar.inc(1);
        let tps = tokens as f64 / t.elapsed().as_secs_f64();
        bar.set_message(format!(
            "loss {:.3}  {tps:.0} tok/s",
            avg.unwrap_or(f64::NAN)
        ));
    })?;
    bar.finish_and_clear();
    timing.pretrain = t.elapsed().as_secs_f64();
    let pretrain_first_loss = losses.first().copied().unwrap_or(f64::NAN);
    let pretrain_last_loss = avg.unwrap_or(f64::NAN);
    let dense_tensors = varmap_tensors(&varmap);

    let t = Instant::now();
    let spin = spinner("evaluating the base model");
    let base_juliet = mean_loss(&dense, &ft_held_data, BATCH)?;
    let base_coriolanus = mean_loss(&dense, &pre_held_data, BATCH)?;
    spin.finish_and_clear();
    timing.eval += t.elapsed().as_secs_f64();

    // 3. Save the pretrained model as a Hugging Face folder; load it back with every decoder
    //    projection quantized to NF4 + double quant and fresh LoRA adapters on all seven.
    let t = Instant::now();
    let dirs = [
        args.out.join("base"),
        args.out.join("adapter"),
        args.out.join("base-nf4"),
        args.out.join("merged"),
    ];
    let [base_dir, adapter_dir, nf4_dir, merged_dir] = &dirs;
    {
        let tmp = TempOutput::folder(base_dir)?;
        save_pretrained(tmp.path(), &cfg, &dense_tensors)?;
        tok.save_pretrained(tmp.path(), Some(EOS), cfg.max_position_embeddings)?;
        tmp.commit()?;
    }
    let qcfg = QLoraConfig {
        quant: QuantizeOptions::qlora(),
        rank: args.rank,
        alpha: 2.0 * args.rank as f64,
        dropout: LORA_DROPOUT,
        target_modules: TargetModules::Pattern("all-linear".into()),
        use_rslora: false,
        use_dora: false,
        init_seed: args.seed ^ 0xADA_0001,
    };
    let q = QLoraModel::from_pretrained(base_dir, &qcfg, &device)?;
    timing.quantize = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let spin = spinner("evaluating the 4-bit model");
    let loss_before = mean_loss(q.model(), &ft_held_data, BATCH)?;
    let forget_before = mean_loss(q.model(), &pre_held_data, BATCH)?;
    let sample_seed = args.seed ^ 0x5A3_0001;
    let sample_before = tok.decode(&generate(
        q.model(),
        &prompt,
        SAMPLE_TOKENS,
        TEMPERATURE,
        sample_seed,
    )?)?;
    spin.finish_and_clear();
    timing.eval += t.elapsed().as_secs_f64();

    // 4. QLoRA: paged 8-bit AdamW on the adapters, constant lr after 3 % warmup, clipping.
    let t = Instant::now();
    let tcfg = TrainConfig {
        optim: OptimKind::PagedAdamW8bit,
        lr: FINETUNE_LR,
        warmup_steps: ((args.steps as f64 * 0.03).ceil() as u64).max(1),
        schedule: LrScheduleKind::Constant,
        max_grad_norm: Some(MAX_GRAD_NORM),
        batch_size: BATCH,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let mut trainer = FinetuneTrainer::new(&q, tcfg, args.steps)?;
    let bar = progress(args.steps, "fine-tune")?;
    let mut avg = None::<f64>;
    let mut tokens = 0usize;
    trainer.train(&q, &ft_data, None, |r| {
        avg = Some(ema(avg, f64::from(r.loss)));
        tokens += r.tokens;
        bar.inc(1);
        let tps = tokens as f64 / t.elapsed().as_secs_f64();
        bar.set_message(format!(
            "loss {:.3}  {tps:.0} tok/s",
            avg.unwrap_or(f64::NAN)
        ));
        true
    })?;
    bar.finish_and_clear();
    timing.finetune = t.elapsed().as_secs_f64();
    let tokens_per_s = tokens as f64 / timing.finetune;

    let t = Instant::now();
    let spin = spinner("evaluating the fine-tuned model");
    let loss_after = mean_loss(q.model(), &ft_held_data, BATCH)?;
    let forget_after = mean_loss(q.model(), &pre_held_data, BATCH)?;
    let sample_after = tok.decode(&generate(
        q.model(),
        &prompt,
        SAMPLE_TOKENS,
        TEMPERATURE,
        sample_seed,
    )?)?;
    spin.finish_and_clear();
    timing.eval += t.elapsed().as_secs_f64();

    // 5. Save the adapter, the 4-bit base and the merged model; reload each.
    let t = Instant::now();
    let spin = spinner("saving and reloading");
    q.save_adapter(adapter_dir)?;
    q.save_base_4bit(nf4_dir)?;
    q.save_merged(merged_dir, DType::F32)?;

    let base_reloaded =
        LlamaForCausalLM::from_pretrained(base_dir, DType::F32, &device, &mut DenseLinears)?;
    let base_reload_loss = mean_loss(&base_reloaded, &ft_held_data, BATCH)?;
    let adapter_reloaded = QLoraModel::from_pretrained(nf4_dir, &qcfg, &device)?;
    adapter_reloaded.load_adapter(adapter_dir)?;
    let adapter_reload_loss = mean_loss(adapter_reloaded.model(), &ft_held_data, BATCH)?;
    let merged_reloaded =
        LlamaForCausalLM::from_pretrained(merged_dir, DType::F32, &device, &mut DenseLinears)?;
    let merged_reload_loss = mean_loss(&merged_reloaded, &ft_held_data, BATCH)?;
    let tok_reloaded = BpeTokenizer::from_file(base_dir.join("tokenizer.json"))?;
    let tokenizer_ok = tok_reloaded.encode(FINETUNE_TEXT)? == tok.encode(FINETUNE_TEXT)?;
    spin.finish_and_clear();
    timing.save_reload = t.elapsed().as_secs_f64();
    let base_diff = (base_reload_loss - base_juliet).abs();
    let adapter_diff = (adapter_reload_loss - loss_after).abs();
    let merged_diff = (merged_reload_loss - loss_after).abs();
    let reload_ok = base_diff <= ADAPTER_TOLERANCE
        && adapter_diff <= ADAPTER_TOLERANCE
        && merged_diff <= MERGED_TOLERANCE
        && tokenizer_ok;

    // Memory by component, measured and as `qlora estimate` predicts it.
    let est = estimate_for(&cfg, args.rank)?;
    let mem = q.memory();
    let peak_rss = peak_rss_bytes();
    let memory = vec![
        MemoryRow {
            key: "base_linear_nf4_dq",
            label: "decoder projections, NF4 + double quant".into(),
            measured: Some(mem.base_4bit_bytes),
            estimate: est.base_linears,
        },
        MemoryRow {
            key: "base_linear_bf16",
            label: "  (the same projections in bf16)".into(),
            measured: Some(2 * mem.base_4bit_parameters),
            estimate: est.base_by_format[0],
        },
        MemoryRow {
            key: "frozen_dense",
            label: "embedding, norms, lm_head (f32 here, bf16 in estimate)".into(),
            measured: Some(mem.dense_bytes),
            estimate: est.dense,
        },
        MemoryRow {
            key: "adapters_f32",
            label: format!("LoRA adapters A, B (f32, r={})", args.rank),
            measured: Some(mem.trainable_bytes),
            estimate: est.lora_weights,
        },
        MemoryRow {
            key: "adapter_grads_f32",
            label: "adapter gradients (f32, one per adapter weight)".into(),
            measured: Some(mem.trainable_bytes),
            estimate: est.lora_grads,
        },
        MemoryRow {
            key: "optimizer_8bit",
            label: format!(
                "paged AdamW states ({} of {} tensors 8-bit, f32 under 4096 elements)",
                trainer.eight_bit_states(),
                q.trainable_vars().len()
            ),
            measured: Some(trainer.optimizer_state_bytes()),
            estimate: est.optimizer_states,
        },
        MemoryRow {
            key: "activations",
            label: format!("activations for backward (batch {BATCH}x{SEQ_LEN}, eager)"),
            measured: None,
            estimate: est.activations_full,
        },
    ];
    let total_s = start.elapsed().as_secs_f64();
    let n_params = cfg.num_parameters();

    let summary = json!({
        "model": {
            "architecture": "LlamaForCausalLM",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.kv_heads(),
            "parameters": n_params,
            "quantized_modules": TARGET_MODULES,
            "quantization": "NF4, block 64, double quant (bitsandbytes layout)",
        },
        "seed": args.seed,
        "tokenizer": {"kind": "byte-level BPE", "vocab_size": tok.vocab_size(), "eos": EOS},
        "pretrain": {
            "text": "Coriolanus (tiny-shakespeare), first 90 %",
            "tokens": pre_data.num_labelled(),
            "steps": args.pretrain_steps,
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "lr": PRETRAIN_LR,
            "first_loss": pretrain_first_loss,
            "final_train_loss": pretrain_last_loss,
        },
        "finetune": {
            "text": "Juliet's speeches, Romeo and Juliet (tiny-shakespeare), first 90 %",
            "tokens": ft_data.num_labelled(),
            "steps": args.steps,
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "rank": args.rank,
            "lora_alpha": qcfg.alpha,
            "lora_dropout": LORA_DROPOUT,
            "lr": FINETUNE_LR,
            "optimizer": "paged AdamW 8-bit, weight decay 0, max_grad_norm 0.3",
            "tokens_per_s": tokens_per_s,
        },
        "loss_base_f32": base_juliet,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "pretrain_text_loss_base_f32": base_coriolanus,
        "pretrain_text_loss_before": forget_before,
        "pretrain_text_loss_after": forget_after,
        "reload_ok": reload_ok,
        "reload": {
            "base_loss": base_reload_loss,
            "adapter_loss": adapter_reload_loss,
            "merged_loss": merged_reload_loss,
            "base_abs_diff": base_diff,
            "adapter_abs_diff": adapter_diff,
            "merged_abs_diff": merged_diff,
            "adapter_tolerance": ADAPTER_TOLERANCE,
            "merged_tolerance": MERGED_TOLERANCE,
            "tokenizer_ok": tokenizer_ok,
        },
        "memory_bytes": memory.iter().filter_map(|r| r.measured.map(|m| (r.key.to_string(), Value::from(m)))).collect::<serde_json::Map<_, _>>(),
        "peak_rss_bytes": peak_rss,
        "memory_estimate_bytes": memory.iter().map(|r| (r.key.to_string(), Value::from(r.estimate as u64))).collect::<serde_json::Map<_, _>>(),
        "samples": {
            "prompt": PROMPT,
            "temperature": TEMPERATURE,
            "tokens": SAMPLE_TOKENS,
            "before": sample_before,
            "after": sample_after,
        },
        "out": {
            "dir": args.out.display().to_string(),
            "base": base_dir.display().to_string(),
            "adapter": adapter_dir.display().to_string(),
            "base_nf4": nf4_dir.display().to_string(),
            "merged": merged_dir.display().to_string(),
        },
        "timing_s": {
            "total": total_s,
            "tokenizer": timing.tokenizer,
            "pretrain": timing.pretrain,
            "quantize": timing.quantize,
            "finetune": timing.finetune,
            "eval": timing.eval,
            "save_reload": timing.save_reload,
        },
    });
    write_summary(&args.out, &summary)?;

    if args.json {
        println!("{summary}");
    } else {
        println!(
            "qlora demo: Llama ({} layers, hidden {}, {} heads / {} kv heads, MLP {}; \
             vocab {}; {n_params} parameters), seed {}",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads(),
            cfg.intermediate_size,
            cfg.vocab_size,
            args.seed
        );
        println!(
            "  tokenizer: byte-level BPE, {} tokens, trained on Coriolanus in {:.1} s",
            tok.vocab_size(),
            timing.tokenizer
        );
        println!(
            "  pretrained {} steps x {BATCH}x{SEQ_LEN} tokens on Coriolanus (dense f32, AdamW): \
             loss {pretrain_first_loss:.2} -> {pretrain_last_loss:.2} in {:.1} s",
            args.pretrain_steps, timing.pretrain
        );
        println!(
            "  fine-tuned {} steps x {BATCH}x{SEQ_LEN} tokens on Juliet's lines: LoRA r={} \
             alpha={} on all 7 projections over NF4+DQ, paged AdamW 8-bit; {:.1} s, \
             {tokens_per_s:.0} tok/s",
            args.steps, args.rank, qcfg.alpha, timing.finetune
        );
        println!();
        println!(
            "{:<44} {:>9} {:>9} {:>9}",
            "loss (nats/token, held-out 10 %)", "f32 base", "before", "after"
        );
        println!(
            "{:<44} {:>9.4} {:>9.4} {:>9.4}",
            "Juliet (fine-tune text)", base_juliet, loss_before, loss_after
        );
        println!(
            "{:<44} {:>9.4} {:>9.4} {:>9.4}",
            "Coriolanus (pretrain text: forgetting)", base_coriolanus, forget_before, forget_after
        );
        println!();
        println!(
            "{:<56} {:>10} {:>10}",
            "memory (bytes)", "measured", "estimate"
        );
        for r in &memory {
            let m = r
                .measured
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into());
            println!("{:<56} {:>10} {:>10}", r.label, m, r.estimate);
        }
        if let Some(p) = peak_rss {
            println!(
                "{:<56} {:>10}",
                "process peak RSS (whole run, pretraining included)", p
            );
        }
        println!();
        println!("sample before fine-tuning (prompt {PROMPT:?}, temperature {TEMPERATURE}):");
        println!("{}", indent(&format!("{PROMPT}{sample_before}")));
        println!("sample after fine-tuning (same seed):");
        println!("{}", indent(&format!("{PROMPT}{sample_after}")));
        println!("saved:");
        println!("  base model (HF, f32)        {}", base_dir.display());
        println!("  adapter (PEFT)              {}", adapter_dir.display());
        println!("  base (NF4+DQ, bitsandbytes) {}", nf4_dir.display());
        println!("  merged (HF, f32)            {}", merged_dir.display());
        println!(
            "reload: base {:.6} (|diff| {base_diff:.1e}), adapter over 4-bit base {:.6} \
             (|diff| {adapter_diff:.1e}), merged {:.6} (|diff| {merged_diff:.1e}), tokenizer {}: {}",
            base_reload_loss,
            adapter_reload_loss,
            merged_reload_loss,
            if tokenizer_ok { "same" } else { "DIFFERENT" },
            if reload_ok { "ok" } else { "FAILED" }
        );
        println!(
            "time: {total_s:.1} s (tokenizer {:.1}, pretrain {:.1}, quantize {:.2}, fine-tune {:.1}, \
             eval {:.1}, save+reload {:.1})",
            timing.tokenizer,
            timing.pretrain,
            timing.quantize,
            timing.finetune,
            timing.eval,
            timing.save_reload
        );
    }
    if !reload_ok {
        return Err(DemoError::Invalid(format!(
            "reload check failed: base loss differs by {base_diff:.3e}, adapter loss by \
             {adapter_diff:.3e}, merged loss by {merged_diff:.3e}, tokenizer same: {tokenizer_ok}"
        )));
    }
    Ok(())
}

/// Writes `summary.json` atomically.
fn write_summary(out: &Path, summary: &Value) -> Result<(), DemoError> {
    let text = serde_json::to_string_pretty(summary).unwrap_or_default() + "\n";
    write_atomically(&out.join("summary.json"), text.as_bytes())?;
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
