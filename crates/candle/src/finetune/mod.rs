//! QLoRA fine-tuning of a Llama-family model from and to Hugging Face folders.
//!
//! * [`QLoraModel`]: a model folder (dense f32/bf16/f16 safetensors, single or sharded, or
//!   transformers' bitsandbytes-4bit folder) loaded as transformers' `load_in_4bit` does: every
//!   linear layer of the decoder blocks becomes a frozen [`Linear4bit`](crate::Linear4bit)
//!   (NF4/FP4, block 64, double quant optional); those PEFT's `target_modules` names get a
//!   [`LoraLinear`](crate::LoraLinear) adapter (rank, alpha, dropout, rsLoRA, DoRA, PEFT's init).
//!   Embeddings, norms and `lm_head` stay dense and frozen. Outputs: the PEFT adapter folder,
//!   the 4-bit base as a transformers/bitsandbytes folder, the merged dense model.
//! * [`Trainer`]: AdamW 8-bit / paged 8-bit / 32-bit (bitsandbytes' rules), warmup + constant
//!   or cosine learning rate, gradient-norm clipping, steps or epochs over a
//!   [`TokenDataset`](crate::data::TokenDataset), a loss callback per step, and atomic
//!   checkpoints (`checkpoint-N/`: adapter, optimizer state, trainer state) from which
//!   [`Trainer::resume`] continues to exactly the result of an uninterrupted run.
//! * [`finetune`]: the whole job (`qlora finetune`): tokenizer, data, model, training,
//!   checkpoints, outputs, reload check.
//!
//! Accuracy: a run on `testdata/qlora-train` (the 4-bit base, initial adapter, batches and
//! hyper-parameters of a PEFT + bitsandbytes reference run) reproduces PEFT's per-step losses
//! within 1e-4 with 32-bit states and within 2e-3 with 8-bit states (bitsandbytes' CPU 8-bit
//! path rounds differently from the CUDA rule this crate follows; see `testdata/README.md`,
//! section qlora-train, and `tests/finetune_reference.rs`).
//!
//! ```
//! use candle_core::{DType, Device};
//! use qlora_candle::finetune::{QLoraConfig, QLoraModel, TrainConfig, Trainer};
//! use qlora_candle::llama::{save_pretrained, varmap_tensors, LlamaConfig, LlamaForCausalLM};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A tiny random Llama saved as a Hugging Face folder.
//! let dir = tempfile::tempdir()?;
//! let cfg = LlamaConfig::tiny(64, 64, 2, 4, 2);
//! let (_, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 1)?;
//! save_pretrained(dir.path().join("base"), &cfg, &varmap_tensors(&varmap))?;
//!
//! // NF4 + double quant, LoRA r 8 on every linear layer.
//! let model = QLoraModel::from_pretrained(dir.path().join("base"), &QLoraConfig::default(), &Device::Cpu)?;
//! assert_eq!(model.lora_modules().len(), 2 * 7);
//! let mut trainer = Trainer::new(&model, TrainConfig { lr: 1e-2, ..TrainConfig::default() }, 5)?;
//! let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 2, 7, 3]], &Device::Cpu)?;
//! let labels = ids.to_dtype(DType::I64)?;
//! let batch = qlora_candle::data::Batch { input_ids: ids, labels };
//! let first = trainer.step(&model, &batch)?.loss;
//! let mut last = first;
//! for _ in 0..4 {
//!     last = trainer.step(&model, &batch)?.loss;
//! }
//! assert!(last < first);
//! model.save_adapter(dir.path().join("adapter"))?;
//! assert!(dir.path().join("adapter/adapter_model.safetensors").is_file());
//! # Ok(())
//! # }
//! ```

mod job;
mod model;
mod train;

pub use job::{finetune, FinetuneEvent, FinetuneOptions, FinetuneSummary};
pub use model::{peak_rss_bytes, rss_bytes, MemoryReport, QLoraConfig, QLoraModel};
pub use train::{
    latest_checkpoint, LrScheduleKind, OptimKind, StepReport, TrainConfig, Trainer,
    CHECKPOINT_PREFIX, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};

use std::path::PathBuf;

/// What can go wrong building, training or saving a QLoRA model.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// The model folder could not be read, or the model could not be built or run.
    #[error(transparent)]
    Llama(#[from] crate::llama::LlamaError),
    /// A layer, adapter or optimizer error.
    #[error(transparent)]
    Layer(#[from] crate::Error),
    /// A tokenizer or dataset error.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A 4-bit checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] qlora_checkpoint::Error),
    /// An atomic output could not be written.
    #[error(transparent)]
    Output(#[from] qlora_atomic_write::Error),
    /// A PEFT adapter could not be read or written.
    #[error(transparent)]
    Adapter(#[from] qlora_lora::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A bad option or an inconsistent input.
    #[error("{0}")]
    Invalid(String),
    /// A checkpoint does not belong to this run, or is unreadable.
    #[error("checkpoint {path}: {reason}")]
    BadCheckpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl From<candle_core::Error> for FinetuneError {
    fn from(e: candle_core::Error) -> Self {
        FinetuneError::Llama(crate::llama::LlamaError::Candle(e))
    }
}

/// Results of this module.
pub type Result<T, E = FinetuneError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FinetuneError + '_ {
    move |source| FinetuneError::Io {
        path: path.to_path_buf(),
        source,
    }
}
