//! One optimizer step of a causal LM: forward, transformers' causal-LM loss, backward through
//! candle's autograd, optionally accumulated over several micro-batches, then any
//! [`candle_nn::Optimizer`] (AdamW, SGD, or this crate's 8-bit optimizers).
//!
//! With accumulation the loss is weighted as transformers does when it knows the number of
//! labelled tokens in the whole step (`num_items_in_batch`): every labelled token of the step counts
//! the same, however the micro-batches split them. So `k` micro-batches give the same gradient as one
//! batch holding all their rows (tested).
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW};
//! use qlora_candle::data::{BpeTokenizer, TokenDataset};
//! use qlora_candle::llama::{LlamaConfig, LlamaForCausalLM};
//! use qlora_candle::train::Trainer;
//!
//! let text = "to be or not to be, that is the question. ".repeat(30);
//! let tok = BpeTokenizer::train(&[text.as_str()], 280, &["<|endoftext|>"])?;
//! let data = TokenDataset::from_text(&tok, &text, 16)?;
//! let cfg = LlamaConfig::tiny(tok.vocab_size(), 32, 1, 2, 1);
//! let (model, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 1)?;
//! let opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
//! let mut trainer = Trainer::new(opt, varmap.all_vars());
//! let batches = data.batches(4, 0, 0, &Device::Cpu)?;
//! let first = trainer.step(&model, &batches[..1])?.loss;
//! for _ in 0..10 {
//!     trainer.step(&model, &batches[..1])?;
//! }
//! assert!(trainer.step(&model, &batches[..1])?.loss < first);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use candle_nn::Optimizer;

use crate::data::Batch;
use crate::llama::{LlamaError, LlamaForCausalLM, IGNORE_INDEX};

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step's loss: mean cross-entropy over all its labelled tokens (before the update).
    pub loss: f32,
    /// Labelled (scored) tokens in the step.
    pub labelled_tokens: usize,
    /// Input tokens in the step, padding included.
    pub tokens: usize,
}

/// Runs optimizer steps on a model whose trainable parameters are `vars`.
#[derive(Debug)]
pub struct Trainer<O: Optimizer> {
    optimizer: O,
    vars: Vec<Var>,
    steps: usize,
}

/// Number of labelled positions after the shift (labels[:, 1:] != -100).
fn labelled(batch: &Batch) -> Result<usize, LlamaError> {
    let (_, t) = batch.labels.dims2()?;
    if t < 2 {
        return Ok(0);
    }
    let labels: Vec<Vec<i64>> = batch
        .labels
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::I64)?
        .to_vec2()?;
    Ok(labels
        .iter()
        .flatten()
        .filter(|&&l| l != IGNORE_INDEX)
        .count())
}

impl<O: Optimizer> Trainer<O> {
    /// A trainer stepping `optimizer`, which updates `vars` (the same variables the optimizer was
    /// built with: their gradients are the ones accumulated).
    pub fn new(optimizer: O, vars: Vec<Var>) -> Self {
        Self {
            optimizer,
            vars,
            steps: 0,
        }
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The optimizer, mutably (e.g. to change its learning rate).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The loss of `batches` (token-weighted as in [`step`](Self::step)) without a gradient or an
    /// update.
    pub fn eval(&self, model: &LlamaForCausalLM, batches: &[Batch]) -> Result<f32, LlamaError> {
        let counts = batches
            .iter()
            .map(labelled)
            .collect::<Result<Vec<_>, _>>()?;
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Err(LlamaError::InvalidInput("no labelled token".to_string()));
        }
        let mut sum = 0f64;
        for (b, &c) in batches.iter().zip(&counts) {
            if c > 0 {
                let loss = model.loss(&b.input_ids, &b.labels)?.detach();
                sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?) * c as f64;
            }
        }
        Ok((sum / total as f64) as f32)
    }

    /// One optimizer step over `micro_batches` (gradient accumulation when more than one): each
    /// micro-batch's mean loss is weighted by its share of the step's labelled tokens, the
    /// gradients summed, then the optimizer steps once. Errors if no token is labelled.
    pub fn step(
        &mut self,
        model: &LlamaForCausalLM,
        micro_batches: &[Batch],
    ) -> Result<StepStats, LlamaError> {
        let counts = micro_batches
            .iter()
            .map(labelled)
            .collect::<Result<Vec<_>, _>>()?;
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Err(LlamaError::InvalidInput(
                "no labelled token in the step's batches".to_string(),
            ));
        }
        let tokens = micro_batches.iter().map(|b| b.input_ids.elem_count()).sum();
        let mut loss_sum = 0f64;
        let mut acc = GradStore::default();
        for (batch, &count) in micro_batches.iter().zip(&counts) {
            if count == 0 {
                continue;
            }
            let weight = count as f64 / total as f64;
            let loss = (model.loss(&batch.input_ids, &batch.labels)? * weight)?;
            loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            let grads = loss.backward()?;
            // Keep only the parameters' gradients (the store also holds every activation's).
            for var in &self.vars {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let sum = match acc.get(var.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    acc.insert(var.as_tensor(), sum);
                }
            }
        }
        self.optimizer.step(&acc)?;
        self.steps += 1;
        Ok(StepStats {
            loss: loss_sum as f32,
            labelled_tokens: total,
            tokens,
        })
    }
}
