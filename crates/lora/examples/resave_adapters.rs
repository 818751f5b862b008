//! Load every PEFT adapter under testdata/peft/adapters with our reader and write it back with our
//! writer to `OUT/<name>/`, for `tools/gen_peft_vectors.py --check-ours OUT`.
//!
//! `cargo run -p qlora-lora --example resave_adapters -- OUT`

use qlora_lora::peft::PeftAdapter;
use std::path::{Path, PathBuf};

fn main() -> Result<(), qlora_lora::Error> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/peft-ours".into()),
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/peft/adapters");
    let entries = std::fs::read_dir(&src).map_err(|source| qlora_lora::Error::Io {
        path: src.clone(),
        source,
    })?;
    for e in entries.flatten() {
        if e.path().is_dir() {
            let adapter = PeftAdapter::load(&e.path())?;
            let dst = out.join(e.file_name());
            adapter.save(&dst)?;
            println!(
                "{} -> {} ({} modules)",
                e.path().display(),
                dst.display(),
                adapter.modules.len()
            );
        }
    }
    Ok(())
}
