//! Dense pretraining of a [`LlamaForCausalLM`] whose weights live in a [`VarMap`] (as
//! [`LlamaForCausalLM::init_random`] makes them): candle's AdamW, linear warmup then cosine decay,
//! gradient clipping by global norm, seeded shuffled batches that cycle through the dataset; plus
//! the token-weighted mean loss of a model over a dataset, for evaluation.
//!
//! ```
//! use candle_core::{DType, Device};
//! use qlora_candle::data::{BpeTokenizer, TokenDataset};
//! use qlora_candle::llama::{LlamaConfig, LlamaForCausalLM};
//! use qlora_candle::pretrain::{mean_loss, pretrain, PretrainConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let text = "to be or not to be, that is the question. ".repeat(20);
//! let tok = BpeTokenizer::train(&[&text], 300, &[])?;
//! let data = TokenDataset::from_text(&tok, &text, 16)?;
//! let cfg = LlamaConfig::tiny(tok.vocab_size(), 32, 1, 2, 2);
//! let (model, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 0)?;
//! let before = mean_loss(&model, &data, 8)?;
//! let run = PretrainConfig { steps: 30, batch_size: 4, lr: 1e-2, ..PretrainConfig::default() };
//! let losses = pretrain(&model, &varmap, &data, &run, |_| {})?;
//! assert_eq!(losses.len(), 30);
//! let after = mean_loss(&model, &data, 8)?;
//! assert!(after < before - 1.0, "{before} -> {after}"); // a repeated sentence is learned fast
//! # Ok(())
//! # }
//! ```

use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

use crate::data::TokenDataset;
use crate::llama::{LlamaError, LlamaForCausalLM};

/// Hyper-parameters of [`pretrain`].
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainConfig {
    /// Optimizer steps (one batch each).
    pub steps: u64,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup from 0 to `lr` over this many steps; then cosine decay to `min_lr_ratio · lr`.
    pub warmup_steps: u64,
    /// The final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (none if `None`).
    pub max_grad_norm: Option<f64>,
    /// Seed of the batch order (epoch `e` uses [`TokenDataset::epoch_order`]`(seed, e)`).
    pub seed: u64,
}

impl Default for PretrainConfig {
    /// 100 steps of 8 sequences, lr 1e-3 with 10 warmup steps decaying to 0.1·lr, weight decay
    /// 0.01, clipping at 1.0, seed 0.
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 8,
            lr: 1e-3,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 0,
        }
    }
}

impl PretrainConfig {
    /// The learning rate of step `step` (0-based): `lr·(step+1)/warmup` during warmup, then
    /// cosine from `lr` down to `min_lr_ratio·lr` at the last step.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)
    }

    fn validate(&self) -> Result<(), LlamaError> {
        let bad = |m: String| Err(LlamaError::InvalidInput(m));
        if self.batch_size == 0 {
            return bad("batch_size is 0".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} is not positive", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "min_lr_ratio {} is not in [0, 1]",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {} is negative", self.weight_decay));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!("max_grad_norm {n} is not positive"));
            }
        }
        Ok(())
    }
}

/// What [`pretrain`] reports after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step just taken (0-based).
    pub step: u64,
    /// Its batch's loss (before the update).
    pub loss: f64,
    /// Its learning rate.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Labelled tokens in its batch.
    pub tokens: usize,
}

/// Global L2 norm of the gradients of `vars` (missing gradients count as zero).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64, LlamaError> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

/// Scales every gradient of `vars` by `coef` (in place in `grads`).
pub fn scale_grads(grads: &mut GradStore, vars: &[Var], coef: f64) -> Result<(), LlamaError> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * coef)?);
        }
    }
    Ok(())
}

/// Trains every variable of `varmap` (the weights `model` was built from) on `data` for
/// `cfg.steps` steps of AdamW; `on_step` sees each step's report. Returns the batch losses.
/// Errors on invalid hyper-parameters, an empty dataset or a non-finite loss (training diverged).
pub fn pretrain(
    model: &LlamaForCausalLM,
    varmap: &VarMap,
    data: &TokenDataset,
    cfg: &PretrainConfig,
    mut on_step: impl FnMut(&StepReport),
) -> Result<Vec<f64>, LlamaError> {
    cfg.validate()?;
    if data.is_empty() {
        return Err(LlamaError::InvalidInput("the dataset is empty".into()));
    }
    let vars = varmap.all_vars();
    let params = ParamsAdamW {
        lr: cfg.lr_at(0),
        weight_decay: cfg.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vars.clone(), params)?;
    let device = model.device().clone();
    let mut losses = Vec::with_capacity(cfg.steps as usize);
    let (mut epoch, mut order, mut pos) = (0u64, data.epoch_order(cfg.seed, 0), 0usize);
    for step in 0..cfg.steps {
        let mut idx = Vec::with_capacity(cfg.batch_size);
        while idx.len() < cfg.batch_size {
            if pos == order.len() {
                epoch += 1;
                order = data.epoch_order(cfg.seed, epoch);
                pos = 0;
            }
            idx.push(order[pos]);
            pos += 1;
        }
        let tokens = idx
            .iter()
            .map(|&i| data.examples()[i].input_ids.len() - 1)
            .sum();
        let batch = data
            .batch(&idx, &device)
            .map_err(|e| LlamaError::InvalidInput(e.to_string()))?;
        let loss = model.loss(&batch.input_ids, &batch.labels)?;
        let value = f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        if !value.is_finite() {
            return Err(LlamaError::InvalidInput(format!(
                "the loss is {value} at step {step}: training diverged (lower the learning rate)"
            )));
        }
        let mut grads = loss.backward()?;
        let norm = grad_norm(&grads, &vars)?;
        if let Some(max) = cfg.max_grad_norm {
            if norm > max {
                scale_grads(&mut grads, &vars, max / (norm + 1e-6))?;
            }
        }
        let lr = cfg.lr_at(step);
        opt.set_learning_rate(lr);
        opt.step(&grads)?;
        losses.push(value);
        on_step(&StepReport {
            step,
            loss: value,
            lr,
            grad_norm: norm,
            tokens,
        });
    }
    Ok(losses)
}

/// The mean cross-entropy (nats per predicted token) of `model` over every labelled position of
/// `data`, batches of `batch_size` in order; weighted by labelled tokens, so the result does not
/// depend on the batch size (up to float rounding).
pub fn mean_loss(
    model: &LlamaForCausalLM,
    data: &TokenDataset,
    batch_size: usize,
) -> Result<f64, LlamaError> {
    if batch_size == 0 {
        return Err(LlamaError::InvalidInput("batch_size is 0".into()));
    }
    if data.is_empty() {
        return Err(LlamaError::InvalidInput("the dataset is empty".into()));
    }
    let (mut total, mut count) = (0f64, 0usize);
    let order: Vec<usize> = (0..data.len()).collect();
    for idx in order.chunks(batch_size) {
        // Labels shifted by one: position 0's label is never predicted.
        let n: usize = idx
            .iter()
            .map(|&i| {
                data.examples()[i].labels[1..]
                    .iter()
                    .filter(|&&l| l != crate::llama::IGNORE_INDEX)
                    .count()
            })
            .sum();
        if n == 0 {
            continue;
        }
        let batch = data
            .batch(idx, model.device())
            .map_err(|e| LlamaError::InvalidInput(e.to_string()))?;
        let loss = model.loss(&batch.input_ids, &batch.labels)?;
        total += f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?) * n as f64;
        count += n;
    }
    if count == 0 {
        return Err(LlamaError::InvalidInput(
            "no labelled position in the dataset".into(),
        ));
    }
    Ok(total / count as f64)
}

/// Samples `max_new_tokens` tokens after `prompt` (token ids) with temperature `temperature`
/// (0 = greedy), from a ChaCha8 stream seeded by `seed`: the same seed gives the same text. The
/// context is the last `max_position_embeddings` tokens (the model has no KV cache: each token
/// re-runs the context). Returns only the new tokens.
pub fn generate(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
) -> Result<Vec<u32>, LlamaError> {
    use rand::{RngExt, SeedableRng};
    if prompt.is_empty() {
        return Err(LlamaError::InvalidInput("the prompt is empty".into()));
    }
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(LlamaError::InvalidInput(format!(
            "temperature {temperature} is negative or not finite"
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let max_ctx = model.config().max_position_embeddings;
    let mut ids = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let ctx = &ids[ids.len().saturating_sub(max_ctx)..];
        let input = Tensor::from_slice(ctx, (1, ctx.len()), model.device())?;
        let logits: Vec<f32> = model
            .forward(&input)?
            .narrow(1, ctx.len() - 1, 1)?
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let next = if temperature == 0.0 {
            argmax(&logits)
        } else {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f64> = logits
                .iter()
                .map(|&l| (f64::from(l - max) / temperature).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut u = rng.random::<f64>() * total;
            let mut pick = weights.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if u < *w {
                    pick = i;
                    break;
                }
                u -= w;
            }
            pick as u32
        };
        ids.push(next);
        out.push(next);
    }
    Ok(out)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::BpeTokenizer;
    use crate::llama::LlamaConfig;
    use candle_core::{DType, Device};

    fn setup() -> (LlamaForCausalLM, VarMap, TokenDataset) {
        let text = "the cat sat on the mat. the dog sat on the log. ".repeat(8);
        let tok = BpeTokenizer::train(&[&text], 280, &[]).unwrap();
        let data = TokenDataset::from_text(&tok, &text, 12).unwrap();
        let cfg = LlamaConfig::tiny(tok.vocab_size(), 32, 1, 2, 1);
        let (model, varmap) =
            LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
        (model, varmap, data)
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = PretrainConfig {
            steps: 100,
            lr: 1.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            ..PretrainConfig::default()
        };
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(55) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn same_seed_same_run_and_bad_settings_are_errors() {
        let cfg = PretrainConfig {
            steps: 5,
            batch_size: 3,
            lr: 1e-2,
            ..PretrainConfig::default()
        };
        let (m1, v1, data) = setup();
        let (m2, v2, _) = setup();
        let mut reports = Vec::new();
        let a = pretrain(&m1, &v1, &data, &cfg, |r| reports.push(*r)).unwrap();
        let b = pretrain(&m2, &v2, &data, &cfg, |_| {}).unwrap();
        assert_eq!(a, b);
        assert_eq!(reports.len(), 5);
        assert!(reports.iter().all(|r| r.tokens > 0 && r.grad_norm > 0.0));
        assert_eq!(
            mean_loss(&m1, &data, 2).unwrap(),
            mean_loss(&m2, &data, 2).unwrap()
        );
        // The mean is over tokens, whatever the batch size.
        let (l1, l7) = (
            mean_loss(&m1, &data, 1).unwrap(),
            mean_loss(&m1, &data, 7).unwrap(),
        );
        assert!((l1 - l7).abs() < 1e-5, "{l1} vs {l7}");
        for bad in [
            PretrainConfig {
                batch_size: 0,
                ..cfg.clone()
            },
            PretrainConfig {
                lr: f64::NAN,
                ..cfg.clone()
            },
            PretrainConfig {
                max_grad_norm: Some(0.0),
                ..cfg.clone()
            },
            PretrainConfig {
                min_lr_ratio: 2.0,
                ..cfg.clone()
            },
        ] {
            assert!(matches!(
                pretrain(&m1, &v1, &data, &bad, |_| {}),
                Err(LlamaError::InvalidInput(_))
            ));
        }
        assert!(mean_loss(&m1, &data, 0).is_err());
    }

    #[test]
    fn generation_is_seeded_and_greedy_is_argmax() {
        let (m, _, _) = setup();
        let a = generate(&m, &[1, 2, 3], 20, 0.8, 5).unwrap();
        assert_eq!(a, generate(&m, &[1, 2, 3], 20, 0.8, 5).unwrap());
        assert_eq!(a.len(), 20);
        let v = m.config().vocab_size as u32;
        assert!(a.iter().all(|&t| t < v));
        let g = generate(&m, &[1, 2, 3], 1, 0.0, 0).unwrap();
        let logits: Vec<f32> = m
            .forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap())
            .unwrap()
            .narrow(1, 2, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g[0], argmax(&logits));
        // Longer than the context: only the last positions are kept, no error.
        assert_eq!(generate(&m, &[1; 130], 2, 1.0, 0).unwrap().len(), 2);
        assert!(generate(&m, &[], 2, 1.0, 0).is_err());
        assert!(generate(&m, &[1], 2, -1.0, 0).is_err());
        assert!(generate(&m, &[9999], 2, 1.0, 0).is_err());
    }
}
