//! Loads every model folder under `testdata/llama/` with `qlora_candle::llama` and saves it again
//! under OUT_DIR (`cargo run -p qlora-candle --example llama_resave -- OUT_DIR`), for
//! `tools/gen_llama_vectors.py --check-ours OUT_DIR` to load with transformers.

use std::path::Path;

use candle_core::Device;
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
    Ok(())
}
