//! Loads every model folder under `testdata/llama/` with `qlora_candle::llama` and saves it again
//! under OUT_DIR (`cargo run -p qlora-candle --example llama_resave -- OUT_DIR`), and trains our BPE
//! on `testdata/llama/tokenizer/corpus.txt` into OUT_DIR/tokenizer, for
//! `tools/gen_llama_vectors.py --check-ours OUT_DIR` to load with transformers.

use std::path::Path;

use candle_core::Device;
use qlora_candle::data::BpeTokenizer;
use qlora_candle::llama::{load_safetensors, save_pretrained, LlamaConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .ok_or("usage: llama_resave OUT_DIR")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/llama");
    let mut names: Vec<_> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").is_file())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let src = root.join(&name);
        let cfg = LlamaConfig::from_file(src.join("config.json"))?;
        let tensors = load_safetensors(&src, &Device::Cpu)?;
        let dst = Path::new(&out).join(&name);
        save_pretrained(&dst, &cfg, &tensors)?;
        println!("{}", dst.display());
    }
    let corpus = std::fs::read_to_string(root.join("tokenizer/corpus.txt"))?;
    let tok = BpeTokenizer::train(&[corpus.as_str()], 400, &["<|endoftext|>"])?;
    let dst = Path::new(&out).join("tokenizer");
    tok.save_pretrained(&dst, Some("<|endoftext|>"), 128)?;
    println!("{}", dst.display());
    Ok(())
}
