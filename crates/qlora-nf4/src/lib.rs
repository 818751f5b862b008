//! QLoRA in Rust: 4-bit NF4 weights bit-exact with bitsandbytes, LoRA adapters trained over them
//! with 8-bit AdamW, and files that PEFT and transformers read.
//!
//! # Should I use this crate?
//!
//! This crate is a facade: it re-exports the layers of the workspace under one name and adds
//! nothing of its own. Depend on it when you want the whole recipe; depend on a layer directly
//! when you need one piece (each is useful alone and documents itself):
//!
//! | module | crate | what it does |
//! |---|---|---|
//! | [`atomic_write`] | `qlora-atomic-write` | atomic file and folder outputs (training checkpoints too); temporaries removed on errors, signals (one call) and after killed runs |
//! | [`double_quant`] | `qlora-double-quant` | bitsandbytes' dynamic 8-bit maps, blockwise 8-bit codec, double quantization of the absmax |
//! | [`codec`] | `qlora-codec` | NF4/FP4 4-bit blockwise quantization, SIMD kernels with a scalar oracle, INT4 baseline |
//! | [`checkpoint`] | `qlora-checkpoint` | bitsandbytes/transformers 4-bit safetensors files, byte-exact quant-state JSON |
//! | [`lora`] | `qlora-lora` | LoRA/DoRA forward and backward over a 4-bit base, merge, init, PEFT adapter files |
//! | [`paged_alloc`] | `qlora-paged-alloc` | a pool over CUDA unified memory (or host memory) for paged optimizer states |
//! | [`optim`] | `qlora-optim` | AdamW with 8-bit blockwise and f32 states, exact to bitsandbytes' kernels, paged variants |
//! | `cuda` | `qlora-cuda` | CUDA kernels compiled at run time with NVRTC (feature `cuda`) |
//! | `candle` | `qlora-candle` | QLoRA layers and optimizers for candle (feature `candle`) |
//!
//! Dependencies point downward only: `double_quant` ← `codec` ← `checkpoint`, `lora`;
//! `double_quant` + `paged_alloc` ← `optim`. `docs/architecture.md` in the repository draws the
//! data flow; `docs/guide.md` covers formats, error bounds and GPU notes; `docs/memory.md` the
//! memory model behind `qlora estimate`.
//!
//! # The recipe
//!
//! Quantize a frozen weight to NF4 with double quantization, wrap it in a LoRA layer, take
//! training steps with 8-bit AdamW, merge the adapter, and save both the PEFT adapter and the
//! merged weights:
//!
//! ```
//! use qlora_nf4::prelude::*;
//! use qlora_nf4::checkpoint::{write_safetensors_atomic, MappedFile, TensorData};
//! use qlora_nf4::lora::peft::{AdapterConfig, PeftAdapter, TargetModules};
//! use std::collections::BTreeMap;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (out_f, in_f, r, n) = (64, 512, 8, 16);
//! // A frozen base weight, N(0, 0.02)-like, deterministic.
//! let w: Vec<f32> = (0..out_f * in_f)
//!     .map(|i| ((i * 7919 % 1999) as f32 / 1999.0 - 0.5) * 0.07)
//!     .collect();
//!
//! // 1. Quantize: NF4, block 64, double-quantized absmax (QLoRA's recipe).
//! let q = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora())?;
//! assert!((q.bits_per_param() - 4.127).abs() < 0.01);
//!
//! // 2. Wrap it in a LoRA layer: A Kaiming-uniform, B = 0 (PEFT's default), alpha = 16.
//! let params = LoraParams::new(r, 16.0);
//! let adapter = lora::init::init_default(r, in_f, out_f, 42);
//! let mut layer = LoraLinear::new(BaseWeight::quantized(q)?, None, params, adapter)?;
//!
//! // 3. Train: loss = ½‖Y − target‖², gradients from the layer, 8-bit AdamW on A and B.
//! let x: Vec<f32> = (0..n * in_f).map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5).collect();
//! let target: Vec<f32> = (0..n * out_f).map(|i| ((i * 13 % 11) as f32 / 11.0) - 0.5).collect();
//! let loss = |y: &[f32]| -> f32 {
//!     y.iter().zip(&target).map(|(a, b)| 0.5 * (a - b) * (a - b)).sum()
//! };
//! let mut opt = Adam::new(AdamConfig::adamw8bit().lr(1e-2))?;
//! let id_a = opt.add_param(0, r * in_f)?; // 4096 elements: 8-bit blockwise states
//! let id_b = opt.add_param(0, out_f * r)?; // 512 elements (< 4096): f32 states, as in bitsandbytes
//! let (y0, _) = layer.forward(&x, n, Mode::Eval)?;
//! for step in 0..5 {
//!     let (y, cache) = layer.forward(&x, n, Mode::Train { seed: step })?;
//!     let grad_y: Vec<f32> = y.iter().zip(&target).map(|(a, b)| a - b).collect();
//!     let grads = layer.backward(&x, &cache, &grad_y)?;
//!     let AdapterWeights { a, b, .. } = layer.weights_mut();
//!     opt.step(&mut [
//!         ParamUpdate { id: id_a, param: TensorMut::F32(a), grad: TensorRef::F32(&grads.a) },
//!         ParamUpdate { id: id_b, param: TensorMut::F32(b), grad: TensorRef::F32(&grads.b) },
//!     ])?;
//! }
//! let (y1, _) = layer.forward(&x, n, Mode::Eval)?;
//! assert!(loss(&y1) < loss(&y0));
//! // 8-bit states: 2 bytes + 8/256 per parameter for A, 8 bytes per parameter for B.
//! assert_eq!(opt.state_bytes(), (2 * 4096 + 8 * 16) + 8 * 512);
//!
//! // 4. Merge: W' = deq(W) + (alpha/r)·B·A, rounded once to bf16 (PEFT's merge_and_unload).
//! let options = MergeOptions { safe: false, output: MergeOutput::Dense(Dtype::BF16) };
//! let (merged, report) = merge_weight(layer.base(), layer.params(), layer.weights(), options)?;
//! assert!(report.delta_norm > 0.0);
//! let BaseWeight::Dense { data: DenseData::Bf16(merged_bf16), .. } = merged else {
//!     unreachable!("a dense bf16 output was requested")
//! };
//!
//! // 5. Save: the PEFT adapter folder and the merged weights as safetensors.
//! let dir = std::env::temp_dir().join(format!("qlora-nf4-recipe-{}", std::process::id()));
//! let module = "model.layers.0.self_attn.q_proj";
//! let adapter = PeftAdapter {
//!     config: AdapterConfig::new(r, 16.0, TargetModules::List(vec!["q_proj".into()])),
//!     modules: BTreeMap::from([(module.to_string(), layer.weights().clone())]),
//!     other_tensors: BTreeMap::new(),
//! };
//! adapter.save(&dir.join("adapter"))?; // adapter_config.json + adapter_model.safetensors
//! let merged_path = dir.join("model.safetensors");
//! let tensor = TensorData::from_elements(&merged_bf16, vec![out_f, in_f]);
//! write_safetensors_atomic(&merged_path, vec![(format!("{module}.weight"), tensor)], None)?;
//!
//! // Both read back as written.
//! let loaded = PeftAdapter::load(&dir.join("adapter"))?;
//! assert_eq!((loaded.config.r, &loaded.modules), (r, &adapter.modules));
//! let file = MappedFile::open(&merged_path)?;
//! let back: Vec<half::bf16> = file.checkpoint()?.dense_as(&format!("{module}.weight"))?;
//! assert_eq!(back, merged_bf16);
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `atomic-write` | yes | [`atomic_write`] |
//! | `double-quant` | yes | [`double_quant`] |
//! | `codec` | yes | [`codec`] (implies `double-quant`) |
//! | `checkpoint` | yes | [`checkpoint`] (implies `codec`) |
//! | `lora` | yes | [`lora`] (implies `codec`) |
//! | `paged-alloc` | yes | [`paged_alloc`] |
//! | `optim` | yes | [`optim`] (implies `paged-alloc`, `double-quant`) |
//! | `cuda` | no | `cuda` (`qlora-cuda` with its run-time NVRTC side) and the CUDA unified-memory backend of `paged_alloc` / paged `optim` |
//! | `candle` | no | `candle` (`qlora-candle`): 4-bit and LoRA layers as candle `Module`s, 8-bit (paged) AdamW as candle `Optimizer`s (implies `lora`, `optim`, `checkpoint`) |
//! | `testing` | no | proptest strategies and reference oracles of the layers (`testing` modules) |
//!
//! Building never needs a CUDA toolkit: with `cuda`, the driver and NVRTC are loaded at run time
//! and kernels are compiled for the device found.
//!
//! # Numbers
//!
//! | quantity | value | where it comes from |
//! |---|---|---|
//! | NF4 + double quant, block 64 | 4.127 bits per parameter | `8/64 + 32/(64·256)` bits of absmax on top of 4 ([`double_quant::absmax_bits_per_param`]) |
//! | NF4, block 64, f32 absmax | 4.5 bits per parameter | `32/64` bits of absmax on top of 4 |
//! | 4-bit round-trip error | `≤ absmax · g/2` per element (`g/2` = 0.1519 NF4, 0.1667 FP4) | [`codec::QuantType::max_half_gap`] |
//! | 8-bit AdamW states | `2 + 8/256` bytes per parameter (tensors ≥ 4096 elements) | `optim::StateKind::state_bytes` |
//!
//! Throughput depends on the machine; `qlora bench` and the criterion benches in `benches/` and
//! in each crate measure it beside a memcpy baseline.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "atomic-write")]
#[doc(inline)]
pub use qlora_atomic_write as atomic_write;
#[cfg(feature = "candle")]
#[doc(inline)]
pub use qlora_candle as candle;
#[cfg(feature = "checkpoint")]
#[doc(inline)]
pub use qlora_checkpoint as checkpoint;
#[cfg(feature = "codec")]
#[doc(inline)]
pub use qlora_codec as codec;
#[cfg(feature = "cuda")]
#[doc(inline)]
pub use qlora_cuda as cuda;
#[cfg(feature = "double-quant")]
#[doc(inline)]
pub use qlora_double_quant as double_quant;
#[cfg(feature = "lora")]
#[doc(inline)]
pub use qlora_lora as lora;
#[cfg(feature = "optim")]
#[doc(inline)]
pub use qlora_optim as optim;
#[cfg(feature = "paged-alloc")]
#[doc(inline)]
pub use qlora_paged_alloc as paged_alloc;

/// The names the recipe needs, for `use qlora_nf4::prelude::*`.
///
/// Layer modules are re-exported too (`codec`, `lora`, `optim`, …) so that less common items
/// stay one path away.
pub mod prelude {
    #[cfg(feature = "checkpoint")]
    pub use crate::checkpoint;
    #[cfg(feature = "codec")]
    pub use crate::codec::{self, Dtype, QuantType, QuantizeOptions, QuantizedTensor};
    #[cfg(feature = "double-quant")]
    pub use crate::double_quant::{self, DoubleQuantAbsmax, DynamicMap};
    #[cfg(feature = "lora")]
    pub use crate::lora::{
        self, merge_weight, AdapterWeights, BaseWeight, DenseData, LoraGrads, LoraLinear,
        LoraParams, MergeOptions, MergeOutput, Mode,
    };
    #[cfg(feature = "optim")]
    pub use crate::optim::{
        self, clip_grad_norm, Adam, AdamConfig, LrSchedule, PagedAdam, ParamUpdate, TensorMut,
        TensorRef,
    };
}
