//! [`Trainer`]: the QLoRA training loop (optimizer, schedule, clipping, checkpoints, resume).

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use qlora_atomic_write::TempOutput;
use qlora_optim::{AdamConfig, LrSchedule};
use serde::{Deserialize, Serialize};

use super::{io_err, FinetuneError, QLoraModel, Result};
use crate::data::{Batch, TokenDataset};
use crate::optim::{AdamW32bit, AdamW8bit, PagedAdamW8bit};

/// Checkpoint folders are `CHECKPOINT_PREFIX{step}` (transformers' `checkpoint-N`).
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// The optimizer state file of a checkpoint (bitsandbytes' state names).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state file of a checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The adapter folder inside a checkpoint.
const ADAPTER_DIR: &str = "adapter";

/// The optimizer (bitsandbytes' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    /// `bnb.optim.AdamW8bit`.
    #[serde(rename = "adamw8bit")]
    AdamW8bit,
    /// `bnb.optim.PagedAdamW8bit` (QLoRA's).
    #[serde(rename = "paged_adamw8bit")]
    PagedAdamW8bit,
    /// `bnb.optim.AdamW32bit`.
    #[serde(rename = "adamw32bit")]
    AdamW32bit,
}

impl OptimKind {
    /// Parses `adamw8bit`, `paged_adamw8bit` or `adamw32bit`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "adamw8bit" => Ok(OptimKind::AdamW8bit),
            "paged_adamw8bit" => Ok(OptimKind::PagedAdamW8bit),
            "adamw32bit" => Ok(OptimKind::AdamW32bit),
            other => Err(FinetuneError::Invalid(format!(
                "unknown optimizer {other:?} (expected adamw8bit, paged_adamw8bit or adamw32bit)"
            ))),
        }
    }

    /// The name `parse` reads.
    pub fn as_str(&self) -> &'static str {
        match self {
            OptimKind::AdamW8bit => "adamw8bit",
            OptimKind::PagedAdamW8bit => "paged_adamw8bit",
            OptimKind::AdamW32bit => "adamw32bit",
        }
    }
}

/// The learning-rate shape after warmup (transformers' `get_*_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// Constant after warmup.
    Constant,
    /// Cosine decay to 0 at the last step.
    Cosine,
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer.
    pub optim: OptimKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam's (β₁, β₂).
    pub betas: (f64, f64),
    /// Adam's ε.
    pub eps: f64,
    /// Variables with fewer elements keep f32 states in the 8-bit optimizers (bitsandbytes'
    /// `min_8bit_size`, 4096).
    pub min_8bit_size: usize,
    /// Linear warmup steps from 0 (transformers: the first step runs at lr 0 when > 0).
    pub warmup_steps: u64,
    /// Schedule after warmup.
    pub schedule: LrScheduleKind,
    /// Clip the global gradient norm to this (QLoRA: 0.3); `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Examples per batch.
    pub batch_size: usize,
    /// Seed of the data order and of dropout.
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end); `None`: never.
    pub save_every: Option<u64>,
}

impl Default for TrainConfig {
    /// QLoRA's recipe for small models: paged 8-bit AdamW, lr 2e-4, no weight decay, constant
    /// schedule, no warmup, `max_grad_norm` 0.3, batch 8, seed 0.
    fn default() -> Self {
        TrainConfig {
            optim: OptimKind::PagedAdamW8bit,
            lr: 2e-4,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            min_8bit_size: 4096,
            warmup_steps: 0,
            schedule: LrScheduleKind::Constant,
            max_grad_norm: Some(0.3),
            batch_size: 8,
            seed: 0,
            save_every: None,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(FinetuneError::Invalid(m));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate {} must be finite and >= 0", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight decay {} must be >= 0", self.weight_decay));
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return bad(format!("max_grad_norm {m} must be finite and > 0"));
            }
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if self.save_every == Some(0) {
            return bad("save_every must be at least 1".into());
        }
        Ok(())
    }

    fn schedule(&self, total_steps: u64) -> LrSchedule {
        match self.schedule {
            LrScheduleKind::Constant if self.warmup_steps == 0 => LrSchedule::Constant,
            LrScheduleKind::Constant => LrSchedule::ConstantWithWarmup {
                warmup_steps: self.warmup_steps,
            },
            LrScheduleKind::Cosine => LrSchedule::Cosine {
                warmup_steps: self.warmup_steps,
                total_steps,
                num_cycles: 0.5,
            },
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps completed, this one included (1-based).
    pub step: u64,
    /// The run's total steps.
    pub total_steps: u64,
    /// The batch's loss before the update (as transformers logs it).
    pub loss: f32,
    /// The learning rate of this step.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the batch (padding included).
    pub tokens: usize,
    /// Scored (label ≠ -100) positions of the batch.
    pub scored: usize,
}

enum Optim {
    A8(AdamW8bit),
    P8(PagedAdamW8bit),
    A32(AdamW32bit),
}

macro_rules! with_optim {
    ($o:expr, $x:ident => $e:expr) => {
        match $o {
            Optim::A8($x) => $e,
            Optim::P8($x) => $e,
            Optim::A32($x) => $e,
        }
    };
}

/// The trainer's state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    total_steps: u64,
    seed: u64,
    config_hash: String,
    losses: Vec<f32>,
}

/// The QLoRA training loop over a [`QLoraModel`]'s adapters.
///
/// Step `k` (0-based) trains on batch `k mod n` of epoch `k / n` of the dataset's seeded order
/// (`n` batches per epoch) with dropout seeds derived from `(seed, k)`, so the result depends only
/// on the config and the step count: a run resumed from a checkpoint is bit-identical to an
/// uninterrupted one.
pub struct Trainer {
    cfg: TrainConfig,
    optim: Optim,
    vars: Vec<Var>,
    schedule: LrSchedule,
    step: u64,
    total_steps: u64,
    losses: Vec<f32>,
    config_hash: String,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("cfg", &self.cfg)
            .field("step", &self.step)
            .field("total_steps", &self.total_steps)
            .finish_non_exhaustive()
    }
}

/// FNV-1a 64 of `s`, hex.
fn fnv_hex(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Trainer {
    /// A trainer for `model`'s adapters, planned for `total_steps` optimizer steps (the cosine
    /// schedule ends there).
    pub fn new(model: &QLoraModel, cfg: TrainConfig, total_steps: u64) -> Result<Self> {
        cfg.validate()?;
        if total_steps == 0 {
            return Err(FinetuneError::Invalid("the run has 0 steps".into()));
        }
        let schedule = cfg.schedule(total_steps);
        schedule
            .validate()
            .map_err(|e| FinetuneError::Invalid(e.to_string()))?;
        let vars = model.trainable_vars();
        let base = match cfg.optim {
            OptimKind::AdamW32bit => AdamConfig::adamw32bit(),
            _ => AdamConfig::adamw8bit(),
        };
        let acfg = base
            .lr(cfg.lr)
            .betas(cfg.betas.0, cfg.betas.1)
            .eps(cfg.eps)
            .weight_decay(cfg.weight_decay)
            .min_8bit_size(cfg.min_8bit_size);
        let optim = match cfg.optim {
            OptimKind::AdamW8bit => Optim::A8(AdamW8bit::with_config(vars.clone(), acfg)?),
            OptimKind::PagedAdamW8bit => {
                Optim::P8(PagedAdamW8bit::with_config(vars.clone(), acfg)?)
            }
            OptimKind::AdamW32bit => Optim::A32(AdamW32bit::with_config(vars.clone(), acfg)?),
        };
        let mut hashed = cfg.clone();
        hashed.save_every = None;
        let config_hash = fnv_hex(&format!(
            "{hashed:?}|{total_steps}|{:?}|{:?}",
            model.qlora_config(),
            model.config().parameter_shapes()
        ));
        Ok(Trainer {
            cfg,
            optim,
            vars,
            schedule,
            step: 0,
            total_steps,
            losses: Vec::new(),
            config_hash,
        })
    }

    /// Total steps of a run over `dataset`: `steps` if given, else `epochs` (default 1) times
    /// the batches per epoch.
    pub fn total_steps_for(
        dataset: &TokenDataset,
        batch_size: usize,
        steps: Option<u64>,
        epochs: Option<u64>,
    ) -> Result<u64> {
        if batch_size == 0 {
            return Err(FinetuneError::Invalid(
                "batch size must be at least 1".into(),
            ));
        }
        let per_epoch = dataset.len().div_ceil(batch_size) as u64;
        let total = match (steps, epochs) {
            (Some(_), Some(_)) => {
                return Err(FinetuneError::Invalid(
                    "give steps or epochs, not both".into(),
                ))
            }
            (Some(s), None) => s,
            (None, e) => e.unwrap_or(1) * per_epoch,
        };
        if total == 0 {
            return Err(FinetuneError::Invalid("the run has 0 steps".into()));
        }
        Ok(total)
    }

    /// The config.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Steps completed.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The planned total.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The loss of every step so far (restored on resume).
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// Bytes of the optimizer states.
    pub fn optimizer_state_bytes(&self) -> usize {
        with_optim!(&self.optim, o => o.state().inner().state_bytes())
    }

    /// How many variables have 8-bit states (after the first step).
    pub fn eight_bit_states(&self) -> usize {
        let mut n = 0;
        with_optim!(&self.optim, o => {
            let inner = o.state().inner();
            for v in &self.vars {
                if inner.kind_for(v.elem_count()) == qlora_optim::StateKind::Blockwise8bit {
                    n += 1;
                }
            }
        });
        n
    }

    /// The learning rate of the next step.
    pub fn current_lr(&self) -> f64 {
        self.cfg.lr * self.schedule.factor(self.step)
    }

    /// One optimizer step on `batch`: forward (dropout seeded by the step), loss, backward,
    /// clipping, update. Returns the loss before the update.
    pub fn step(&mut self, model: &QLoraModel, batch: &Batch) -> Result<StepReport> {
        let lr = self.current_lr();
        model.set_training(true);
        model.set_dropout_seed(self.cfg.seed ^ self.step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let loss = model.loss(&batch.input_ids, &batch.labels);
        model.set_training(false);
        let loss = loss?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(FinetuneError::Invalid(format!(
                "step {}: the loss is {value} (no scored label in the batch, or divergence)",
                self.step + 1
            )));
        }
        let mut grads = loss.backward()?;
        let grad_norm = self.clip(&mut grads)?;
        with_optim!(&mut self.optim, o => {
            o.state_mut().set_learning_rate(lr);
            o.state_mut().step(&grads)?;
        });
        self.step += 1;
        self.losses.push(value);
        let labels: Vec<i64> = batch.labels.flatten_all()?.to_vec1()?;
        Ok(StepReport {
            step: self.step,
            total_steps: self.total_steps,
            loss: value,
            lr,
            grad_norm,
            tokens: batch.input_ids.elem_count(),
            scored: labels.iter().filter(|&&l| l != -100).count(),
        })
    }

    /// The global gradient norm (f64 accumulation); scales the gradients in place when it
    /// exceeds `max_grad_norm` (torch's `clip_grad_norm_`).
    fn clip(&self, grads: &mut GradStore) -> Result<f64> {
        let mut sumsq = 0f64;
        for v in &self.vars {
            if let Some(g) = grads.get(v) {
                let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                sumsq += g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
            }
        }
        let norm = sumsq.sqrt();
        if let Some(max) = self.cfg.max_grad_norm {
            let coef = qlora_optim::clip_coefficient(norm, max)
                .map_err(|e| FinetuneError::Invalid(e.to_string()))?;
            if coef != 1.0 {
                for v in &self.vars {
                    if let Some(g) = grads.get(v) {
                        let scaled = (g * f64::from(coef))?;
                        grads.insert(v, scaled);
                    }
                }
            }
        }
        Ok(norm)
    }

    /// The batch of step `k` (0-based): batch `k mod n` of epoch `k / n`.
    pub fn batch_for_step(
        &self,
        dataset: &TokenDataset,
        k: u64,
        model: &QLoraModel,
    ) -> Result<Batch> {
        let bs = self.cfg.batch_size;
        let per_epoch = dataset.len().div_ceil(bs) as u64;
        let epoch = k / per_epoch;
        let j = (k % per_epoch) as usize;
        let order = dataset.epoch_order(self.cfg.seed, epoch);
        let end = ((j + 1) * bs).min(order.len());
        Ok(dataset.batch(&order[j * bs..end], model.device())?)
    }

    /// Trains from the current step to `total_steps` on `dataset`, calling `on_step` after every
    /// step and writing a checkpoint under `checkpoint_root` every `save_every` steps and at the
    /// end (when both are set). `on_step` returning `false` stops the run after that step (a
    /// checkpoint is written first when a root is set).
    pub fn train(
        &mut self,
        model: &QLoraModel,
        dataset: &TokenDataset,
        checkpoint_root: Option<&Path>,
        mut on_step: impl FnMut(&StepReport) -> bool,
    ) -> Result<()> {
        let max = model.config().max_position_embeddings;
        if dataset.seq_len() > max {
            return Err(crate::llama::LlamaError::SequenceTooLong {
                len: dataset.seq_len(),
                max,
            }
            .into());
        }
        while self.step < self.total_steps {
            let batch = self.batch_for_step(dataset, self.step, model)?;
            let report = self.step(model, &batch)?;
            let go_on = on_step(&report);
            if let (Some(root), Some(every)) = (checkpoint_root, self.cfg.save_every) {
                if self.step % every == 0 || self.step == self.total_steps || !go_on {
                    self.save_checkpoint(model, root)?;
                }
            }
            if !go_on {
                break;
            }
        }
        Ok(())
    }

    /// Writes `root/checkpoint-{step}/` (`adapter/` PEFT folder, `optimizer.safetensors`,
    /// `trainer_state.json`) atomically: the folder appears complete or not at all.
    pub fn save_checkpoint(&self, model: &QLoraModel, root: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        let dir = root.join(format!("{CHECKPOINT_PREFIX}{}", self.step));
        let tmp = TempOutput::folder(&dir)?;
        let adapter = tmp.path().join(ADAPTER_DIR);
        std::fs::create_dir(&adapter).map_err(io_err(&adapter))?;
        model.write_adapter(&adapter)?;
        let bytes = with_optim!(&self.optim, o => o.state().state_to_bytes()?);
        let opt = tmp.path().join(OPTIMIZER_FILE);
        std::fs::write(&opt, bytes).map_err(io_err(&opt))?;
        let state = TrainerState {
            step: self.step,
            total_steps: self.total_steps,
            seed: self.cfg.seed,
            config_hash: self.config_hash.clone(),
            losses: self.losses.clone(),
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| FinetuneError::Invalid(e.to_string()))?;
        let st = tmp.path().join(TRAINER_STATE_FILE);
        std::fs::write(&st, json).map_err(io_err(&st))?;
        tmp.commit()?;
        Ok(dir)
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint) of a
    /// run with the same model, QLoRA and training config (checked by hash): adapter weights,
    /// optimizer states, step and losses are restored.
    pub fn resume(&mut self, model: &QLoraModel, checkpoint: &Path) -> Result<()> {
        let bad = |reason: String| FinetuneError::BadCheckpoint {
            path: checkpoint.to_path_buf(),
            reason,
        };
        let st = checkpoint.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&st).map_err(io_err(&st))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| bad(format!("{TRAINER_STATE_FILE}: {e}")))?;
        if state.config_hash != self.config_hash {
            return Err(bad(
                "it was written by a run with other settings (model, LoRA, optimizer, data \
                 order, steps or schedule); resume with the same options"
                    .into(),
            ));
        }
        if state.step > self.total_steps || state.losses.len() as u64 != state.step {
            return Err(bad(format!(
                "inconsistent trainer state (step {}, {} losses)",
                state.step,
                state.losses.len()
            )));
        }
        model.load_adapter(checkpoint.join(ADAPTER_DIR))?;
        let opt = checkpoint.join(OPTIMIZER_FILE);
        let bytes = std::fs::read(&opt).map_err(io_err(&opt))?;
        with_optim!(&mut self.optim, o => o.state_mut().load_state_bytes(&bytes)?);
        self.step = state.step;
        self.losses = state.losses;
        Ok(())
    }
}

/// The complete checkpoint with the highest step under `root` (`checkpoint-N` folders; hidden
/// temporaries of interrupted saves are never considered), or `None`.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    if !root.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(n) = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if !entry.path().join(TRAINER_STATE_FILE).is_file() {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}
