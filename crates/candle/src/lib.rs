//! QLoRA for [candle](https://github.com/huggingface/candle): fine-tune a model whose frozen base
//! weights are stored in 4 bits (NF4/FP4 with double quantization, bitsandbytes' layout) by
//! training LoRA adapters with 8-bit (paged) AdamW, through candle's autograd, on CPU or CUDA.
//!
//! # Should I use this crate?
//!
//! Use it when your model runs in candle (or mistral.rs) and you want QLoRA layers and optimizers
//! that speak candle's idioms (`Module`, `Var`, `Optimizer`). The math underneath lives in the
//! framework-free layers (`qlora-codec`, `qlora-lora`, `qlora-optim`); use those directly from
//! another framework.
//!
//! # Modules
//!
//! * [`llama`]: a Llama-family causal LM (Llama, Mistral, Qwen2) from and to Hugging Face model
//!   folders, whose linear layers are built by a caller's factory (dense, or QLoRA layers), with
//!   transformers' causal-LM loss. f32 logits match transformers to 1e-5 relative.
//! * [`data`]: byte-level BPE tokenizers (`tokenizer.json`), datasets from `.txt` / `.jsonl`,
//!   seeded shuffled batches.
//! * [`pretrain`]: dense pretraining of a model (AdamW, warmup + cosine, clipping), its mean
//!   loss over a dataset, and seeded sampling of text.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod data;
pub mod error;
pub mod linear4bit;
pub mod llama;
pub mod lora;
pub mod optim;
pub mod pretrain;

pub use error::{Error, Result};
pub use linear4bit::Linear4bit;
pub use lora::{save_peft_adapter, LoraBase, LoraInit, LoraLinear, Mode};
pub use optim::{AdamVars, AdamW32bit, AdamW8bit, PagedAdamW32bit, PagedAdamW8bit};
