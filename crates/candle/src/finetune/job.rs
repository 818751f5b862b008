//! [`finetune`]: a whole QLoRA fine-tuning job, from a model folder and a data file to the
//! adapter, the 4-bit base and the merged model (what `qlora finetune` runs).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use qlora_atomic_write::TempOutput;
use serde::Serialize;

use super::{
    latest_checkpoint, FinetuneError, MemoryReport, QLoraConfig, QLoraModel, Result, StepReport,
    TrainConfig, Trainer,
};
use crate::data::{BpeTokenizer, TokenDataset};
use crate::llama::{DenseLinears, LlamaError, LlamaForCausalLM};

/// Largest relative difference accepted between the merged model's evaluation loss and the
/// QLoRA model's (f32 merge of `dequant(W) + s·B·A`, then rounding to the output dtype: f32
/// differs by operation order only; bf16 rounds every weight to 8 bits of mantissa).
const MERGED_LOSS_TOLERANCE_F32: f64 = 1e-4;
const MERGED_LOSS_TOLERANCE_HALF: f64 = 5e-2;

/// What a [`finetune`] job does.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// The model folder (config.json, safetensors, tokenizer.json).
    pub model_dir: PathBuf,
    /// Training data: `.txt` (packed) or `.jsonl` (`text`, or `prompt`/`completion`).
    pub data: PathBuf,
    /// The output folder (must not exist): `adapter/`, `base-4bit/`, `merged/`,
    /// `training.json`. Written atomically: it appears complete or not at all.
    pub out: PathBuf,
    /// Quantization and adapters.
    pub qlora: QLoraConfig,
    /// Optimizer, schedule, batch size, seed, checkpoint interval.
    pub train: TrainConfig,
    /// Optimizer steps (exclusive with `epochs`; neither: one epoch).
    pub steps: Option<u64>,
    /// Epochs over the data.
    pub epochs: Option<u64>,
    /// Tokens per example (at most the model's `max_position_embeddings`).
    pub seq_len: usize,
    /// Continue from the latest checkpoint in [`checkpoint_dir`](Self::checkpoint_dir).
    pub resume: bool,
    /// The dtype of the merged model.
    pub merged_dtype: DType,
    /// The device.
    pub device: Device,
}

impl FinetuneOptions {
    /// Where checkpoints go: the folder `OUT-checkpoints` next to the output (kept after the
    /// run; a complete `checkpoint-N/` per save).
    pub fn checkpoint_dir(&self) -> PathBuf {
        let mut name = self
            .out
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "out".into());
        name.push("-checkpoints");
        self.out.with_file_name(name)
    }
}

/// Progress of a [`finetune`] job, for a progress display.
#[derive(Debug, Clone)]
pub enum FinetuneEvent<'a> {
    /// The model and data are loaded.
    Loaded {
        /// Sizes of the model's parts.
        memory: MemoryReport,
        /// Examples in the dataset.
        examples: usize,
        /// Planned optimizer steps.
        total_steps: u64,
    },
    /// Training continues from this checkpoint.
    Resumed {
        /// The checkpoint folder.
        checkpoint: &'a Path,
        /// Steps it had completed.
        step: u64,
    },
    /// One optimizer step finished.
    Step(&'a StepReport),
    /// Writing the outputs.
    Saving,
}

/// What a [`finetune`] job did (also written as `training.json` in the output).
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    /// The output folder.
    pub out: PathBuf,
    /// Steps trained in total (resumed ones included).
    pub steps: u64,
    /// The loss of every step.
    pub losses: Vec<f32>,
    /// Loss of the evaluation batch (the first batch of the first epoch) before training.
    pub eval_loss_before: f32,
    /// Loss of the evaluation batch after training.
    pub eval_loss_after: f32,
    /// The same loss from `base-4bit/` + `adapter/` read back (equal bit for bit).
    pub eval_loss_reloaded: f32,
    /// The same loss from `merged/` read back as a dense model.
    pub eval_loss_merged: f32,
    /// The step training resumed from (0 for a fresh run).
    pub resumed_from: u64,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Bytes of the weights (4-bit base, dense frozen tensors, adapters).
    pub weight_bytes: usize,
    /// Bytes of the optimizer states.
    pub optimizer_state_bytes: usize,
    /// Peak resident set size of the process, where known.
    pub peak_rss_bytes: Option<u64>,
    /// Tokens trained on (padding included) in this process.
    pub tokens: u64,
    /// Wall time of the training steps in this process, seconds.
    pub train_seconds: f64,
}

fn eos_id(model: &QLoraModel) -> Option<u32> {
    match model.config().extra.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
        _ => None,
    }
}

/// Runs a QLoRA fine-tuning job: loads the tokenizer (`MODEL_DIR/tokenizer.json`), the data and
/// the model (quantized to 4 bits, adapters added), trains (checkpoints every
/// `train.save_every` steps in [`FinetuneOptions::checkpoint_dir`], resuming from the latest
/// one with `resume`), then writes `out/` atomically with `adapter/` (PEFT), `base-4bit/`
/// (transformers + bitsandbytes), `merged/` (dense, `merged_dtype`) and `training.json`, after
/// reading the outputs back and checking that they reproduce the evaluation loss. Bad input is
/// an error before anything is written.
pub fn finetune(
    opts: &FinetuneOptions,
    mut on_event: impl FnMut(&FinetuneEvent<'_>),
) -> Result<FinetuneSummary> {
    if opts.out.exists() {
        return Err(FinetuneError::Invalid(format!(
            "output {} already exists; remove it or choose another path",
            opts.out.display()
        )));
    }
    if !opts.data.is_file() {
        return Err(FinetuneError::Io {
            path: opts.data.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such data file"),
        });
    }
    let tok_path = opts.model_dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(FinetuneError::Io {
            path: tok_path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the model folder has no tokenizer.json",
            ),
        });
    }
    let model = QLoraModel::from_pretrained(&opts.model_dir, &opts.qlora, &opts.device)?;
    let max = model.config().max_position_embeddings;
    if opts.seq_len > max {
        return Err(LlamaError::SequenceTooLong {
            len: opts.seq_len,
            max,
        }
        .into());
    }
    let tok = BpeTokenizer::from_file(opts.model_dir.join("tokenizer.json"))?;
    if tok.vocab_size() > model.config().vocab_size {
        return Err(FinetuneError::Invalid(format!(
            "the tokenizer has {} tokens, the model's vocab_size is {}",
            tok.vocab_size(),
            model.config().vocab_size
        )));
    }
    let dataset = TokenDataset::from_file(&tok, &opts.data, opts.seq_len, eos_id(&model))?;
    let total = Trainer::total_steps_for(&dataset, opts.train.batch_size, opts.steps, opts.epochs)?;
    let mut trainer = Trainer::new(&model, opts.train.clone(), total)?;
    on_event(&FinetuneEvent::Loaded {
        memory: model.memory(),
        examples: dataset.len(),
        total_steps: total,
    });
    let eval_batch = trainer.batch_for_step(&dataset, 0, &model)?;
    let eval = |m: &QLoraModel| -> Result<f32> {
        Ok(m.loss(&eval_batch.input_ids, &eval_batch.labels)?
            .to_scalar::<f32>()?)
    };
    let eval_loss_before = eval(&model)?;
    let ckpt_root = opts.checkpoint_dir();
    let mut resumed_from = 0;
    if opts.resume {
        let Some(ckpt) = latest_checkpoint(&ckpt_root)? else {
            return Err(FinetuneError::Invalid(format!(
                "--resume: no checkpoint in {}",
                ckpt_root.display()
            )));
        };
        trainer.resume(&model, &ckpt)?;
        resumed_from = trainer.steps_done();
        on_event(&FinetuneEvent::Resumed {
            checkpoint: &ckpt,
            step: resumed_from,
        });
    }
    let root = opts.train.save_every.map(|_| ckpt_root.as_path());
    let mut tokens = 0u64;
    let start = std::time::Instant::now();
    trainer.train(&model, &dataset, root, |r| {
        tokens += r.tokens as u64;
        on_event(&FinetuneEvent::Step(r));
        true
    })?;
    let train_seconds = start.elapsed().as_secs_f64();
    on_event(&FinetuneEvent::Saving);
    let eval_loss_after = eval(&model)?;

    let tmp = TempOutput::folder(&opts.out)?;
    let (adapter, base, merged) = (
        tmp.path().join("adapter"),
        tmp.path().join("base-4bit"),
        tmp.path().join("merged"),
    );
    model.save_adapter(&adapter)?;
    model.save_base_4bit(&base)?;
    model.save_merged(&merged, opts.merged_dtype)?;

    // Read the outputs back: 4-bit base + adapter give the same loss bit for bit; the merged
    // dense model within the rounding of its dtype.
    let reloaded = QLoraModel::from_pretrained(&base, &opts.qlora, &opts.device)?;
    reloaded.load_adapter(&adapter)?;
    let eval_loss_reloaded = eval(&reloaded)?;
    if eval_loss_reloaded.to_bits() != eval_loss_after.to_bits() {
        return Err(FinetuneError::Invalid(format!(
            "reload check failed: base-4bit + adapter give loss {eval_loss_reloaded}, the \
             trained model {eval_loss_after}"
        )));
    }
    drop(reloaded);
    let dense =
        LlamaForCausalLM::from_pretrained(&merged, DType::F32, &opts.device, &mut DenseLinears)?;
    let eval_loss_merged = dense
        .loss(&eval_batch.input_ids, &eval_batch.labels)?
        .to_scalar::<f32>()?;
    drop(dense);
    let tol = if opts.merged_dtype == DType::F32 {
        MERGED_LOSS_TOLERANCE_F32
    } else {
        MERGED_LOSS_TOLERANCE_HALF
    };
    let rel = (f64::from(eval_loss_merged) - f64::from(eval_loss_after)).abs()
        / f64::from(eval_loss_after).abs().max(1e-6);
    if rel.is_nan() || rel > tol {
        return Err(FinetuneError::Invalid(format!(
            "reload check failed: the merged model gives loss {eval_loss_merged}, the trained \
             model {eval_loss_after} (relative difference {rel:.2e} > {tol:.0e})"
        )));
    }
    let memory = model.memory();
    let summary = FinetuneSummary {
        out: opts.out.clone(),
        steps: trainer.steps_done(),
        losses: trainer.losses().to_vec(),
        eval_loss_before,
        eval_loss_after,
        eval_loss_reloaded,
        eval_loss_merged,
        resumed_from,
        trainable_parameters: memory.trainable_parameters,
        weight_bytes: memory.weight_bytes(),
        optimizer_state_bytes: trainer.optimizer_state_bytes(),
        peak_rss_bytes: super::peak_rss_bytes(),
        tokens,
        train_seconds,
    };
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| FinetuneError::Invalid(e.to_string()))?;
    let path = tmp.path().join("training.json");
    std::fs::write(&path, json).map_err(super::io_err(&path))?;
    tmp.commit()?;
    Ok(summary)
}
