//! `qlora demo`: a complete QLoRA run on a model small enough to train on a laptop CPU.
//!
//! 1. A character-level MLP language model ([`model`]) is initialized from the seed and
//!    pretrained briefly, dense f32 with 32-bit Adam, on *Coriolanus* (embedded).
//! 2. Its weights are rounded to bf16 (the base model's dtype); the two hidden linear layers
//!    are quantized to NF4 with double quantization (block 64), as `load_in_4bit` does. The
//!    embedding and `lm_head` stay bf16 and frozen, as transformers leaves them.
//! 3. LoRA adapters (PEFT's default init) go on both hidden layers (`all-linear`, which excludes
//!    `lm_head`), trained with paged 8-bit AdamW (host pool) on Juliet's lines from *Romeo and
//!    Juliet* (embedded).
//! 4. It reports losses, memory by component and samples, saves the adapter (PEFT), the 4-bit
//!    base and the merged model (dense bf16), and reloads both to check they reproduce the loss.

mod model;
mod persist;

use clap::Args;
use half::bf16;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use model::{cross_entropy, windows, CharMlp, DenseLinear, Hidden, SplitMix64, Vocab};
use model::{CONTEXT, EMBED, FC1_IN, FC_NAMES, HIDDEN};
use qlora_codec::{QuantizeOptions, QuantizedTensor};
use qlora_lora::{init, AdapterWeights, BaseWeight, LoraLinear, LoraParams, MergeOptions, Mode};
use qlora_optim::{
    clip_coefficient, global_grad_norm, Adam, AdamConfig, LrSchedule, PagedStorage, ParamId,
    ParamUpdate, Pool, PoolConfig, StateKind, TensorMut, TensorRef,
};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// The pretraining text: *Coriolanus*, the first play of the tiny-shakespeare corpus.
const PRETRAIN_TEXT: &str = include_str!("../../data/coriolanus.txt");
/// The fine-tuning text: every speech of Juliet in *Romeo and Juliet*.
const FINETUNE_TEXT: &str = include_str!("../../data/juliet.txt");
/// Characters of *Coriolanus* (its end) on which forgetting is measured.
const FORGET_SLICE: usize = 20_000;

/// Characters per training batch.
const BATCH: usize = 128;
/// Pretraining learning rate (cosine schedule with warmup).
const PRETRAIN_LR: f64 = 3e-3;
/// Fine-tuning learning rate (constant after 3 % warmup, QLoRA's schedule).
const FINETUNE_LR: f64 = 2e-3;
/// QLoRA's `max_grad_norm`.
const MAX_GRAD_NORM: f64 = 0.3;
/// QLoRA's `lora_dropout` for small models is 0.05–0.1.
const LORA_DROPOUT: f32 = 0.05;
/// Characters generated for each sample.
const SAMPLE_LEN: usize = 240;
/// Sampling temperature.
const TEMPERATURE: f64 = 0.7;
/// The prompt of both samples (exactly one context).
const PROMPT: &str = "JULIET:\n";
/// The merged bf16 model may differ from the trained one by bf16 rounding of the merged
/// weights; its loss must be within this many nats per character.
const MERGED_TOLERANCE: f64 = 1e-2;
/// The reloaded adapter runs the same arithmetic as training; its loss must match this closely.
const ADAPTER_TOLERANCE: f64 = 1e-9;

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Lora(#[from] qlora_lora::Error),
    #[error(transparent)]
    Optim(#[from] qlora_optim::Error),
    #[error(transparent)]
    Codec(#[from] qlora_codec::Error),
    #[error(transparent)]
    Checkpoint(#[from] qlora_checkpoint::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("paged pool: {0}")]
    Pool(String),
    #[error("progress bar: {0}")]
    Progress(String),
}

/// Arguments of `qlora demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Fine-tuning steps (each a batch of 128 characters).
    #[arg(long, default_value_t = 800)]
    steps: u64,
    /// LoRA rank r (lora_alpha is 2r).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Seed of everything random: base weights, batches, adapter init, dropout, sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created if missing; each file in it is replaced atomically).
    #[arg(long, default_value = "qlora-demo-out")]
    out: PathBuf,
    /// Pretraining steps of the base model (each a batch of 128 characters).
    #[arg(long, default_value_t = 1500)]
    pretrain_steps: u64,
    /// Print the summary as one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

impl DemoArgs {
    fn validate(&self) -> Result<(), DemoError> {
        if self.steps == 0 {
            return Err(DemoError::Invalid("--steps must be at least 1".into()));
        }
        if self.pretrain_steps == 0 {
            return Err(DemoError::Invalid(
                "--pretrain-steps must be at least 1".into(),
            ));
        }
        if !(1..=HIDDEN).contains(&self.rank) {
            return Err(DemoError::Invalid(format!(
                "--rank must be between 1 and {HIDDEN} (the layers' width), found {}",
                self.rank
            )));
        }
        Ok(())
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

/// Random training positions (each with a full context before it).
fn batch_positions(rng: &mut SplitMix64, len: usize) -> Vec<usize> {
    (0..BATCH)
        .map(|_| CONTEXT + rng.below(len - CONTEXT))
        .collect()
}

/// The base model as stored: every parameter rounded to bf16.
#[derive(Debug, Clone)]
pub(crate) struct BaseBf16 {
    pub(crate) embed: Vec<bf16>,
    pub(crate) fc_w: [Vec<bf16>; 2],
    pub(crate) fc_b: [Vec<bf16>; 2],
    pub(crate) head_w: Vec<bf16>,
    pub(crate) head_b: Vec<bf16>,
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn widen(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

impl BaseBf16 {
    fn from_dense(m: &CharMlp) -> Result<Self, DemoError> {
        let (Hidden::Dense(fc1), Hidden::Dense(fc2)) = (&m.fc[0], &m.fc[1]) else {
            return Err(DemoError::Invalid("the base model must be dense".into()));
        };
        Ok(BaseBf16 {
            embed: to_bf16(&m.embed),
            fc_w: [to_bf16(&fc1.w), to_bf16(&fc2.w)],
            fc_b: [to_bf16(&fc1.b), to_bf16(&fc2.b)],
            head_w: to_bf16(&m.head.w),
            head_b: to_bf16(&m.head.b),
        })
    }

    fn vocab_size(&self) -> usize {
        self.head_b.len()
    }

    /// The dense model with these (bf16-valued) weights.
    fn dense_model(&self) -> CharMlp {
        let dims = [(HIDDEN, FC1_IN), (HIDDEN, HIDDEN)];
        let fc = |i: usize| {
            Hidden::Dense(DenseLinear {
                w: widen(&self.fc_w[i]),
                b: widen(&self.fc_b[i]),
                out_f: dims[i].0,
                in_f: dims[i].1,
            })
        };
        CharMlp {
            vocab_size: self.vocab_size(),
            embed: widen(&self.embed),
            fc: [fc(0), fc(1)],
            head: self.head(),
        }
    }

    fn head(&self) -> DenseLinear {
        DenseLinear {
            w: widen(&self.head_w),
            b: widen(&self.head_b),
            out_f: self.vocab_size(),
            in_f: HIDDEN,
        }
    }

    /// Bytes of the parts that stay dense (embedding, head, biases).
    fn frozen_dense_bytes(&self) -> usize {
        2 * (self.embed.len()
            + self.head_w.len()
            + self.head_b.len()
            + self.fc_b.iter().map(Vec::len).sum::<usize>())
    }
}

/// The 4-bit QLoRA model: the bf16 base with NF4+DQ hidden layers and fresh adapters.
fn qlora_model(
    base: &BaseBf16,
    quantized: &[QuantizedTensor; 2],
    params: LoraParams,
    seed: u64,
) -> Result<CharMlp, DemoError> {
    let mut fc = Vec::with_capacity(2);
    for (i, q) in quantized.iter().enumerate() {
        let (out_f, in_f) = (q.shape()[0], q.shape()[1]);
        let weights = init::init_default(params.r, in_f, out_f, seed.wrapping_add(i as u64));
        let layer = LoraLinear::new(
            BaseWeight::quantized(q.clone())?,
            Some(widen(&base.fc_b[i])),
            params,
            weights,
        )?;
        fc.push(Hidden::Lora(Box::new(layer)));
    }
    let fc: [Hidden; 2] = fc
        .try_into()
        .map_err(|_| DemoError::Invalid("expected two hidden layers".into()))?;
    Ok(CharMlp {
        vocab_size: base.vocab_size(),
        embed: widen(&base.embed),
        fc,
        head: base.head(),
    })
}

fn lora_layers(m: &CharMlp) -> Result<[&LoraLinear; 2], DemoError> {
    match (&m.fc[0], &m.fc[1]) {
        (Hidden::Lora(a), Hidden::Lora(b)) => Ok([a, b]),
        _ => Err(DemoError::Invalid("expected LoRA layers".into())),
    }
}

/// One row of the memory table.
#[derive(Debug, Clone)]
struct MemoryRow {
    key: &'static str,
    label: String,
    bytes: usize,
    /// Parameters the bytes stand for (for bits per parameter), if meaningful.
    params: Option<usize>,
}

fn decode(vocab: &Vocab, ids: &[u32]) -> String {
    ids.iter().map(|&t| vocab.decode(t)).collect()
}

#[derive(Debug, Default)]
struct Timing {
    pretrain: f64,
    quantize: f64,
    finetune: f64,
    eval: f64,
    save_reload: f64,
}

fn run(args: &DemoArgs) -> Result<(), DemoError> {
    args.validate()?;
    // Fail on an unusable output directory now, not after a minute of training.
    persist::create_dir(&args.out)?;
    let start = Instant::now();
    let mut timing = Timing::default();
    let vocab = Vocab::from_texts(&[PRETRAIN_TEXT, FINETUNE_TEXT]);
    let pre_tokens = vocab.encode(PRETRAIN_TEXT)?;
    let ft_tokens = vocab.encode(FINETUNE_TEXT)?;
    let forget_tokens = &pre_tokens[pre_tokens.len().saturating_sub(FORGET_SLICE)..];
    let prompt = vocab.encode(PROMPT)?;
    let v = vocab.len();

    // 1. Pretraining: dense f32, 32-bit Adam, cosine schedule.
    let t = Instant::now();
    let mut dense = CharMlp::init(v, args.seed);
    let mut opt = Adam::new(AdamConfig::adam32bit().lr(PRETRAIN_LR))?;
    let ids = dense.register_dense(&mut opt)?;
    let schedule = LrSchedule::Cosine {
        warmup_steps: (args.pretrain_steps / 30).max(1),
        total_steps: args.pretrain_steps,
        num_cycles: 0.5,
    };
    let mut rng = SplitMix64::new(args.seed ^ 0x5EED_0001);
    let bar = progress(args.pretrain_steps, "pretrain")?;
    let mut ema = None::<f64>;
    for step in 0..args.pretrain_steps {
        let pos = batch_positions(&mut rng, pre_tokens.len());
        let (ctx, tgt) = windows(&pre_tokens, &pos);
        let act = dense.forward(&ctx, Mode::Eval)?;
        let (loss, dlogits) = cross_entropy(&act.logits, &tgt, v);
        let grads = dense.backward_dense(&ctx, &act, &dlogits)?;
        opt.apply_schedule(&schedule, step)?;
        dense.step_dense(&mut opt, &ids, &grads)?;
        let e = ema.map_or(loss, |e| 0.95 * e + 0.05 * loss);
        ema = Some(e);
        bar.inc(1);
        if step % 10 == 0 {
            let tps = ((step + 1) as usize * BATCH) as f64 / t.elapsed().as_secs_f64();
            bar.set_message(format!("loss {e:.3}  {tps:.0} tok/s"));
        }
    }
    bar.finish_and_clear();
    timing.pretrain = t.elapsed().as_secs_f64();
    let pretrain_train_loss = ema.unwrap_or(f64::NAN);

    // 2. The base model in bf16, its hidden layers in NF4 + double quant.
    let t = Instant::now();
    let base = BaseBf16::from_dense(&dense)?;
    let dims = [[HIDDEN, FC1_IN], [HIDDEN, HIDDEN]];
    let quantize = |opts: QuantizeOptions| -> Result<[QuantizedTensor; 2], DemoError> {
        Ok([
            QuantizedTensor::quantize(&base.fc_w[0], &dims[0], opts)?,
            QuantizedTensor::quantize(&base.fc_w[1], &dims[1], opts)?,
        ])
    };
    let quantized = quantize(QuantizeOptions::qlora())?;
    let nf4_plain = quantize(QuantizeOptions {
        double_quant: false,
        ..QuantizeOptions::qlora()
    })?;
    timing.quantize = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let spin = spinner("evaluating the base model");
    let bf16_model = base.dense_model();
    let base_bf16_loss = bf16_model.mean_loss(&ft_tokens)?;
    let params = LoraParams {
        r: args.rank,
        alpha: 2.0 * args.rank as f64,
        use_rslora: false,
        dropout: LORA_DROPOUT,
        use_dora: false,
    };
    let mut qmodel = qlora_model(&base, &quantized, params, args.seed ^ 0xADA_0001)?;
    let loss_before = qmodel.mean_loss(&ft_tokens)?;
    let forget_before = qmodel.mean_loss(forget_tokens)?;
    let sample_seed = args.seed ^ 0x5A3_0001;
    let sample_before = decode(
        &vocab,
        &qmodel.generate(&prompt, SAMPLE_LEN, TEMPERATURE, sample_seed)?,
    );
    spin.finish_and_clear();
    timing.eval += t.elapsed().as_secs_f64();

    // 3. Fine-tune the adapters with paged 8-bit AdamW on a host pool.
    let t = Instant::now();
    let pool =
        Pool::new(PoolConfig::host(256 << 20)).map_err(|e| DemoError::Pool(e.to_string()))?;
    // bitsandbytes pages only parameters of ≥ 10⁵ elements; every adapter here is smaller, so
    // page them all to put the states in the pool.
    let storage = PagedStorage::new(pool.clone()).with_min_numel(0);
    let config = AdamConfig::adamw8bit().lr(FINETUNE_LR).weight_decay(0.0);
    let mut opt = Adam::with_storage(config, storage)?;
    let mut adapter_ids: Vec<(ParamId, ParamId)> = Vec::new();
    let mut adapter_numels = Vec::new();
    for l in lora_layers(&qmodel)? {
        let w = l.weights();
        adapter_ids.push((opt.add_param(0, w.a.len())?, opt.add_param(0, w.b.len())?));
        adapter_numels.extend([w.a.len(), w.b.len()]);
    }
    let schedule = LrSchedule::ConstantWithWarmup {
        warmup_steps: qlora_optim::warmup_steps_from_ratio(args.steps, 0.03)?,
    };
    let mut rng = SplitMix64::new(args.seed ^ 0x5EED_0002);
    let bar = progress(args.steps, "fine-tune")?;
    let mut ema = None::<f64>;
    let mut activation_bytes = 0usize;
    for step in 0..args.steps {
        let pos = batch_positions(&mut rng, ft_tokens.len());
        let (ctx, tgt) = windows(&ft_tokens, &pos);
        let dropout_seed = args.seed.wrapping_mul(0x9E37_79B9).wrapping_add(step);
        let act = qmodel.forward(&ctx, Mode::Train { seed: dropout_seed })?;
        activation_bytes = act.bytes() + 2 * 4 * BATCH * args.rank;
        let (loss, dlogits) = cross_entropy(&act.logits, &tgt, v);
        let grads = qmodel.backward_lora(&act, &dlogits)?;
        let norm = global_grad_norm(&[
            TensorRef::F32(&grads[0].a),
            TensorRef::F32(&grads[0].b),
            TensorRef::F32(&grads[1].a),
            TensorRef::F32(&grads[1].b),
        ]);
        let coef = clip_coefficient(norm, MAX_GRAD_NORM)?;
        opt.apply_schedule(&schedule, step)?;
        let [Hidden::Lora(l1), Hidden::Lora(l2)] = &mut qmodel.fc else {
            return Err(DemoError::Invalid("expected LoRA layers".into()));
        };
        let mut updates = Vec::with_capacity(4);
        for ((layer, ids), g) in [l1, l2].into_iter().zip(&adapter_ids).zip(&grads) {
            let w = layer.weights_mut();
            updates.push(ParamUpdate {
                id: ids.0,
                param: TensorMut::F32(&mut w.a),
                grad: TensorRef::F32(&g.a),
            });
            updates.push(ParamUpdate {
                id: ids.1,
                param: TensorMut::F32(&mut w.b),
                grad: TensorRef::F32(&g.b),
            });
        }
        opt.step_scaled(&mut updates, coef)?;
        let e = ema.map_or(loss, |e| 0.95 * e + 0.05 * loss);
        ema = Some(e);
        bar.inc(1);
        if step % 10 == 0 {
            let tps = ((step + 1) as usize * BATCH) as f64 / t.elapsed().as_secs_f64();
            bar.set_message(format!("loss {e:.3}  {tps:.0} tok/s"));
        }
    }
    bar.finish_and_clear();
    timing.finetune = t.elapsed().as_secs_f64();
    let tokens_per_s = (args.steps as usize * BATCH) as f64 / timing.finetune;

    let t = Instant::now();
    let spin = spinner("evaluating the fine-tuned model");
    let loss_after = qmodel.mean_loss(&ft_tokens)?;
    let forget_after = qmodel.mean_loss(forget_tokens)?;
    let sample_after = decode(
        &vocab,
        &qmodel.generate(&prompt, SAMPLE_LEN, TEMPERATURE, sample_seed)?,
    );
    // PEFT's merge into a 4-bit layer re-quantizes W + s·BA; how much of the gain survives?
    let mut requant = qmodel.clone();
    for h in requant.fc.iter_mut() {
        if let Hidden::Lora(l) = h {
            l.merge(MergeOptions::default())?;
        }
    }
    let merged_nf4_loss = requant.mean_loss(&ft_tokens)?;
    spin.finish_and_clear();
    timing.eval += t.elapsed().as_secs_f64();

    // 4. Save and reload.
    let t = Instant::now();
    let spin = spinner("saving and reloading");
    let layers = lora_layers(&qmodel)?;
    let adapters: [AdapterWeights; 2] = [layers[0].weights().clone(), layers[1].weights().clone()];
    let saved = persist::save_all(&args.out, &vocab, &base, &quantized, &adapters, params)?;
    let reload = persist::reload_and_check(&saved, &vocab, &ft_tokens)?;
    spin.finish_and_clear();
    timing.save_reload = t.elapsed().as_secs_f64();
    let adapter_diff = (reload.adapter_loss - loss_after).abs();
    let merged_diff = (reload.merged_loss - loss_after).abs();
    let reload_ok = adapter_diff <= ADAPTER_TOLERANCE && merged_diff <= MERGED_TOLERANCE;

    // Memory by component.
    let n_quant: usize = quantized.iter().map(QuantizedTensor::numel).sum();
    let n_adapter: usize = adapter_numels.iter().sum();
    let state_bytes =
        |kind: StateKind| -> usize { adapter_numels.iter().map(|&n| kind.state_bytes(n)).sum() };
    let kinds: Vec<StateKind> = adapter_numels.iter().map(|&n| opt.kind_for(n)).collect();
    let n_8bit: usize = adapter_numels
        .iter()
        .zip(&kinds)
        .filter(|(_, k)| **k == StateKind::Blockwise8bit)
        .map(|(n, _)| n)
        .sum();
    let states_8bit: usize = adapter_numels
        .iter()
        .zip(&kinds)
        .map(|(&n, k)| k.state_bytes(n))
        .sum();
    let pool_stats = pool.stats();
    let n_frozen = base.frozen_dense_bytes() / 2;
    let memory = vec![
        MemoryRow {
            key: "base_linear_bf16",
            label: "base linear weights, bf16".into(),
            bytes: 2 * n_quant,
            params: Some(n_quant),
        },
        MemoryRow {
            key: "base_linear_nf4",
            label: "base linear weights, NF4 (f32 absmax)".into(),
            bytes: nf4_plain.iter().map(QuantizedTensor::nbytes).sum(),
            params: Some(n_quant),
        },
        MemoryRow {
            key: "base_linear_nf4_dq",
            label: "base linear weights, NF4 + double quant".into(),
            bytes: quantized.iter().map(QuantizedTensor::nbytes).sum(),
            params: Some(n_quant),
        },
        MemoryRow {
            key: "frozen_dense_bf16",
            label: "embedding, lm_head, biases (bf16, frozen)".into(),
            bytes: base.frozen_dense_bytes(),
            params: Some(n_frozen),
        },
        MemoryRow {
            key: "adapters_f32",
            label: format!("LoRA adapters A, B (f32, r={})", args.rank),
            bytes: 4 * n_adapter,
            params: Some(n_adapter),
        },
        MemoryRow {
            key: "adapter_grads_f32",
            label: "adapter gradients (f32)".into(),
            bytes: 4 * n_adapter,
            params: Some(n_adapter),
        },
        MemoryRow {
            key: "optimizer_32bit",
            label: "AdamW states, 32-bit".into(),
            bytes: state_bytes(StateKind::Full32bit),
            params: Some(n_adapter),
        },
        MemoryRow {
            key: "optimizer_8bit",
            label: format!("paged AdamW states, 8-bit ({n_8bit}/{n_adapter} params 8-bit)"),
            bytes: states_8bit,
            params: Some(n_adapter),
        },
        MemoryRow {
            key: "activations",
            label: format!("activations kept for backward (batch {BATCH})"),
            bytes: activation_bytes,
            params: None,
        },
    ];
    let total_s = start.elapsed().as_secs_f64();
    let n_params = base.embed.len()
        + base.fc_w.iter().map(Vec::len).sum::<usize>()
        + base.fc_b.iter().map(Vec::len).sum::<usize>()
        + base.head_w.len()
        + base.head_b.len();

    let summary = json!({
        "model": {
            "kind": "character-level MLP language model",
            "vocab_size": v,
            "context": CONTEXT,
            "embed_dim": EMBED,
            "hidden": HIDDEN,
            "parameters": n_params,
            "quantized_layers": FC_NAMES,
            "quantization": "NF4, block 64, double quant (bitsandbytes layout)",
        },
        "seed": args.seed,
        "pretrain": {
            "text": "Coriolanus (tiny-shakespeare)",
            "chars": PRETRAIN_TEXT.chars().count(),
            "steps": args.pretrain_steps,
            "batch": BATCH,
            "final_train_loss": pretrain_train_loss,
        },
        "finetune": {
            "text": "Juliet's speeches, Romeo and Juliet (tiny-shakespeare)",
            "chars": FINETUNE_TEXT.chars().count(),
            "steps": args.steps,
            "batch": BATCH,
            "rank": args.rank,
            "lora_alpha": params.alpha,
            "lora_dropout": LORA_DROPOUT,
            "lr": FINETUNE_LR,
            "optimizer": "paged AdamW 8-bit (host pool), weight decay 0, max_grad_norm 0.3",
            "tokens_per_s": tokens_per_s,
        },
        "loss_base_bf16": base_bf16_loss,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "pretrain_text_loss_before": forget_before,
        "pretrain_text_loss_after": forget_after,
        "merged_nf4_loss": merged_nf4_loss,
        "reload_ok": reload_ok,
        "reload": {
            "adapter_loss": reload.adapter_loss,
            "merged_bf16_loss": reload.merged_loss,
            "adapter_abs_diff": adapter_diff,
            "merged_abs_diff": merged_diff,
            "merged_tolerance": MERGED_TOLERANCE,
        },
        "memory_bytes": memory.iter().map(|r| (r.key.to_string(), Value::from(r.bytes))).collect::<serde_json::Map<_, _>>(),
        "memory_table": memory.iter().map(|r| json!({
            "component": r.label,
            "bytes": r.bytes,
            "bits_per_param": r.params.map(|p| 8.0 * r.bytes as f64 / p as f64),
        })).collect::<Vec<_>>(),
        "paged_pool": {
            "bytes_in_use": pool_stats.bytes_in_use,
            "bytes_reserved": pool_stats.bytes_reserved,
            "prefetches_to_device": pool_stats.prefetches_to_device,
        },
        "samples": {
            "prompt": PROMPT,
            "temperature": TEMPERATURE,
            "before": sample_before,
            "after": sample_after,
        },
        "out": {
            "dir": args.out.display().to_string(),
            "adapter": saved.adapter_dir.display().to_string(),
            "base": saved.base_path.display().to_string(),
            "merged": saved.merged_path.display().to_string(),
            "merged_format": "dense bf16 safetensors (W = deq(NF4) + s·B·A, rounded once)",
        },
        "timing_s": {
            "total": total_s,
            "pretrain": timing.pretrain,
            "quantize": timing.quantize,
            "finetune": timing.finetune,
            "eval": timing.eval,
            "save_reload": timing.save_reload,
        },
    });
    persist::write_summary(&args.out, &summary)?;

    if args.json {
        println!("{summary}");
    } else {
        println!(
            "qlora demo: character-level MLP LM (vocab {v}, context {CONTEXT}, embed {EMBED}, \
             hidden {HIDDEN}x2; {n_params} parameters), seed {}",
            args.seed
        );
        println!(
            "  pretrained {} steps x {BATCH} chars on Coriolanus (dense f32, Adam) in {:.1} s",
            args.pretrain_steps, timing.pretrain
        );
        println!(
            "  fine-tuned {} steps x {BATCH} chars on Juliet's lines: LoRA r={} alpha={} on {} \
             over NF4+DQ, paged AdamW 8-bit; {:.1} s, {tokens_per_s:.0} tok/s",
            args.steps,
            args.rank,
            params.alpha,
            FC_NAMES.join(", "),
            timing.finetune
        );
        println!();
        println!("{:<44} {:>9} {:>9}", "loss (nats/char)", "before", "after");
        println!(
            "{:<44} {:>9.4} {:>9.4}",
            "Juliet (fine-tune text)", loss_before, loss_after
        );
        println!(
            "{:<44} {:>9.4} {:>9.4}",
            "Coriolanus (last 20k chars, pretrain text)", forget_before, forget_after
        );
        println!(
            "{:<44} {:>9.4}",
            "Juliet, bf16 base before quantization", base_bf16_loss
        );
        println!(
            "{:<44} {:>19.4}",
            "Juliet, merged and re-quantized to NF4", merged_nf4_loss
        );
        println!();
        println!("{:<52} {:>10} {:>10}", "memory", "bytes", "bits/param");
        for r in &memory {
            let bits = r
                .params
                .map(|p| format!("{:.3}", 8.0 * r.bytes as f64 / p as f64))
                .unwrap_or_default();
            println!("{:<52} {:>10} {:>10}", r.label, r.bytes, bits);
        }
        println!();
        println!("sample before fine-tuning (prompt {PROMPT:?}, temperature {TEMPERATURE}):");
        println!("{}", indent(&format!("{PROMPT}{sample_before}")));
        println!("sample after fine-tuning (same seed):");
        println!("{}", indent(&format!("{PROMPT}{sample_after}")));
        println!("saved:");
        println!("  adapter (PEFT)        {}", saved.adapter_dir.display());
        println!("  base (NF4+DQ, bnb)    {}", saved.base_path.display());
        println!("  merged (dense bf16)   {}", saved.merged_path.display());
        println!(
            "reload: adapter+base loss {:.6} (|diff| {:.1e}), merged bf16 loss {:.6} (|diff| {:.1e} <= {MERGED_TOLERANCE}): {}",
            reload.adapter_loss,
            adapter_diff,
            reload.merged_loss,
            merged_diff,
            if reload_ok { "ok" } else { "FAILED" }
        );
        println!(
            "time: {total_s:.1} s (pretrain {:.1}, quantize {:.2}, fine-tune {:.1}, eval {:.1}, save+reload {:.1})",
            timing.pretrain, timing.quantize, timing.finetune, timing.eval, timing.save_reload
        );
    }
    if !reload_ok {
        return Err(DemoError::Invalid(format!(
            "reload check failed: adapter loss differs by {adapter_diff:.3e}, merged loss by {merged_diff:.3e}"
        )));
    }
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
