//! Tokens per second and peak memory of a QLoRA training step, measured the way
//! `tools/bench_peft_qlora_train.py` measures PEFT + bitsandbytes, so that the two can be run
//! back to back on the same machine (docs/bench-peft.md):
//!
//! ```text
//! cargo run --release -p qlora-candle --example qlora_train_bench -- [--layers 3] [--hidden 192]
//!     [--heads 6] [--kv-heads H] [--intermediate 512] [--vocab 512] [--rank 8] [--batch 8]
//!     [--seq 128] [--steps 20] [--warmup 3] [--optim adamw8bit|paged_adamw8bit|adamw32bit]
//!     [--min-8bit-size 4096] [--seed 0]
//! ```
//!
//! A seeded random `LlamaForCausalLM` of the given shape is saved as an f32 Hugging Face folder in
//! a temporary directory and loaded by [`QLoraModel::from_pretrained`] (NF4, block 64, double
//! quant; LoRA r, alpha 2r, dropout 0.05 on all seven projections of every block). One batch of
//! random tokens (labels = inputs) is trained on: `--warmup` untimed steps, then `--steps` timed
//! ones. One JSON line goes to stdout.
//!
//! Threads: matrix products (candle's and our 4-bit ones) run on rayon's pool
//! (`RAYON_NUM_THREADS`, default: every core). candle's element-wise ops run on its own spinning
//! barrier pool (`CANDLE_NUM_THREADS`). Like `qlora finetune` and `qlora demo`, this example applies
//! [`qlora_candle::tuning::for_cpu_training`]: element-wise ops on the calling thread unless
//! `CANDLE_NUM_THREADS` is set, and a heap that is kept between steps.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use qlora_candle::data::Batch;
use qlora_candle::finetune::{
    peak_rss_bytes, rss_bytes, OptimKind, QLoraConfig, QLoraModel, TrainConfig,
};
use qlora_candle::llama::{save_pretrained, varmap_tensors, LlamaConfig, LlamaForCausalLM};

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0), so that the next [`peak_rss_bytes`] covers
/// only what follows.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(b: Option<u64>) -> serde_json::Value {
    b.map(|b| serde_json::json!((b as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0))
        .unwrap_or(serde_json::Value::Null)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qlora_candle::tuning::for_cpu_training();
    let mut layers = 3usize;
    let mut hidden = 192usize;
    let mut heads = 6usize;
    let mut kv_heads: Option<usize> = None;
    let mut intermediate = 512usize;
    let mut vocab = 512usize;
    let mut rank = 8usize;
    let mut batch = 8usize;
    let mut seq = 128usize;
    let mut steps = 20usize;
    let mut warmup = 3usize;
    let mut optim = OptimKind::AdamW8bit;
    let mut min_8bit_size = 4096usize;
    let mut seed = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--layers" => layers = value()?.parse()?,
            "--hidden" => hidden = value()?.parse()?,
            "--heads" => heads = value()?.parse()?,
            "--kv-heads" => kv_heads = Some(value()?.parse()?),
            "--intermediate" => intermediate = value()?.parse()?,
            "--vocab" => vocab = value()?.parse()?,
            "--rank" => rank = value()?.parse()?,
            "--batch" => batch = value()?.parse()?,
            "--seq" => seq = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--warmup" => warmup = value()?.parse()?,
            "--optim" => optim = OptimKind::parse(&value()?)?,
            "--min-8bit-size" => min_8bit_size = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            other => return Err(format!("unknown flag {other} (see the example's docs)").into()),
        }
    }
    if steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let device = Device::Cpu;
    let rss_start = rss_bytes();

    let mut cfg = LlamaConfig::tiny(vocab, hidden, layers, heads, kv_heads.unwrap_or(heads));
    cfg.intermediate_size = intermediate;
    cfg.max_position_embeddings = seq.max(128);
    let dir = tempfile::tempdir()?;
    {
        let (_, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &device, seed)?;
        save_pretrained(dir.path(), &cfg, &varmap_tensors(&varmap))?;
    }
    let qcfg = QLoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.05,
        init_seed: seed,
        ..QLoraConfig::default()
    };
    let model = QLoraModel::from_pretrained(dir.path(), &qcfg, &device)?;
    let tcfg = TrainConfig {
        optim,
        min_8bit_size,
        max_grad_norm: None,
        batch_size: batch,
        seed,
        ..TrainConfig::default()
    };
    let mut trainer = qlora_candle::finetune::Trainer::new(&model, tcfg, (warmup + steps) as u64)?;

    // One batch of seeded random tokens, labels = inputs (transformers shifts them).
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect();
    let input_ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    let labels = input_ids.to_dtype(DType::I64)?;
    let data = Batch { input_ids, labels };

    let rss_before_train = rss_bytes();
    let reset = reset_peak_rss();
    for _ in 0..warmup {
        trainer.step(&model, &data)?;
    }
    let mut times = Vec::with_capacity(steps);
    let mut last_loss = f32::NAN;
    let t0 = Instant::now();
    for _ in 0..steps {
        let t = Instant::now();
        last_loss = trainer.step(&model, &data)?.loss;
        times.push(t.elapsed().as_secs_f64());
    }
    let total = t0.elapsed().as_secs_f64();
    let peak_train = if reset { peak_rss_bytes() } else { None };
    times.sort_by(f64::total_cmp);
    let mem = model.memory();
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = serde_json::json!({
        "impl": "qlora-candle",
        "threads": threads,
        "candle_threads": std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
        "layers": layers, "hidden": hidden, "heads": heads,
        "kv_heads": kv_heads.unwrap_or(heads), "intermediate": intermediate, "vocab": vocab,
        "parameters": mem.parameters,
        "trainable_parameters": mem.trainable_parameters,
        "rank": rank, "batch": batch, "seq": seq, "optim": optim.as_str(),
        "min_8bit_size": min_8bit_size,
        "eight_bit_states": trainer.eight_bit_states(),
        "optimizer_state_bytes": trainer.optimizer_state_bytes(),
        "warmup_steps": warmup, "steps": steps,
        "tokens_per_s": (batch * seq * steps) as f64 / total,
        "step_ms_median": times[times.len() / 2] * 1e3,
        "step_ms_min": times[0] * 1e3,
        "last_loss": last_loss,
        "rss_start_mib": mib(rss_start),
        "rss_before_train_mib": mib(rss_before_train),
        "peak_rss_train_mib": mib(peak_train),
        "peak_rss_mib": mib(peak_rss_bytes()),
    });
    println!("{out}");
    Ok(())
}
