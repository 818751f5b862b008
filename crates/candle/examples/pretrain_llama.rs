//! Pretrains a small Llama (about 3.2 M parameters) on *Coriolanus* with candle's AdamW and saves
//! it as a Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`) that `AutoModelForCausalLM` / `AutoTokenizer` load:
//!
//! ```text
//! cargo run --release -p qlora-candle --example pretrain_llama -- OUT_DIR [STEPS] [CORPUS.txt]
//! ```
//!
//! The corpus defaults to the demo's `crates/cli/data/coriolanus.txt`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use qlora_candle::data::{BpeTokenizer, TokenDataset};
use qlora_candle::llama::{save_pretrained, varmap_tensors, LlamaConfig, LlamaForCausalLM};
use qlora_candle::train::Trainer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: pretrain_llama OUT_DIR [STEPS]")?);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100);
    let corpus_path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cli/data/coriolanus.txt")
    });
    let corpus = std::fs::read_to_string(&corpus_path)
        .map_err(|e| format!("{}: {e}", corpus_path.display()))?;
    let device = Device::Cpu;

    let t0 = Instant::now();
    let tok = BpeTokenizer::train(&[corpus.as_str()], 512, &["<|endoftext|>"])?;
    println!(
        "tokenizer: {} tokens in {:.1?}",
        tok.vocab_size(),
        t0.elapsed()
    );
    let seq_len = 128;
    let data = TokenDataset::from_text(&tok, &corpus, seq_len)?;
    println!("data: {} sequences of up to {seq_len} tokens", data.len());

    let mut cfg = LlamaConfig::tiny(tok.vocab_size(), 256, 4, 8, 4);
    cfg.max_position_embeddings = seq_len;
    cfg.extra.insert("eos_token_id".into(), 0.into());
    cfg.extra.insert("bos_token_id".into(), 0.into());
    let (model, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &device, 0)?;
    println!("model: {} parameters", cfg.num_parameters());
    let params = ParamsAdamW {
        lr: 2e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut trainer = Trainer::new(AdamW::new(varmap.all_vars(), params)?, varmap.all_vars());
    let batch_size = 8;
    let mut epoch = 0;
    let mut batches = data.batches(batch_size, 0, epoch, &device)?.into_iter();
    let start = Instant::now();
    let mut tokens = 0;
    for step in 1..=steps {
        let batch = match batches.next() {
            Some(b) => b,
            None => {
                epoch += 1;
                batches = data.batches(batch_size, 0, epoch, &device)?.into_iter();
                batches.next().ok_or("no batch")?
            }
        };
        let stats = trainer.step(&model, &[batch])?;
        tokens += stats.tokens;
        if step == 1 || step % 10 == 0 || step == steps {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "step {step:4}  loss {:.4}  {:.0} tokens/s",
                stats.loss,
                tokens as f64 / secs
            );
        }
    }
    save_pretrained(&out, &cfg, &varmap_tensors(&varmap))?;
    tok.save_pretrained(&out, Some("<|endoftext|>"), seq_len)?;
    println!("saved {}", out.display());
    Ok(())
}
