//! LoRA and DoRA adapters over a frozen base weight that is dense (f32/bf16/f16) or 4-bit
//! (NF4/FP4, bitsandbytes layout): forward, backward, merge/unmerge, initialization (PEFT's
//! default, gaussian, PiSSA, OLoRA, LoftQ), and PEFT's adapter files.
//!
//! # Should I use this crate?
//!
//! Use it to train or apply a PEFT LoRA/DoRA adapter on CPU over a QLoRA base without Python, or
//! to merge a PEFT adapter into a dense or 4-bit checkpoint with the same result PEFT gives. For
//! the 4-bit codec alone use `qlora-codec`; for checkpoint files, `qlora-checkpoint`.
//!
//! # Example
//!
//! ```
//! use qlora_lora::init::init_random;
//! use qlora_lora::peft::{AdapterConfig, PeftAdapter, TargetModules};
//! use qlora_lora::{BaseWeight, LoraLinear, LoraParams, MergeOptions, Mode, QuantizeOptions, QuantizedTensor};
//!
//! let (out_f, in_f, n) = (64, 128, 4);
//! let w: Vec<f32> = (0..out_f * in_f).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
//! // A QLoRA base: NF4, block 64, double quantization.
//! let q = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora())?;
//! let params = LoraParams { dropout: 0.1, ..LoraParams::new(8, 16.0) }; // s = 16/8 = 2
//! let adapter = init_random(8, in_f, out_f, 0); // PEFT's init_lora_weights=False
//! let mut layer = LoraLinear::new(BaseWeight::quantized(q)?, None, params, adapter)?;
//!
//! let x = vec![0.5f32; n * in_f];
//! let (y, cache) = layer.forward(&x, n, Mode::Train { seed: 7 })?;
//! let grads = layer.backward(&x, &cache, &vec![1.0; n * out_f])?;
//! assert_eq!((y.len(), grads.a.len(), grads.b.len()), (n * out_f, 8 * in_f, out_f * 8));
//!
//! // Save as a PEFT adapter folder (PEFT loads it with PeftModel.from_pretrained).
//! let dir = std::env::temp_dir().join(format!("qlora-lora-doc-{}", std::process::id()));
//! let mut peft = PeftAdapter {
//!     config: AdapterConfig::new(8, 16.0, TargetModules::List(vec!["q_proj".into()])),
//!     modules: Default::default(),
//!     other_tensors: Default::default(),
//! };
//! peft.modules.insert("model.layers.0.self_attn.q_proj".into(), layer.weights().clone());
//! peft.save(&dir)?;
//! assert_eq!(PeftAdapter::load(&dir)?.modules, peft.modules);
//! # std::fs::remove_dir_all(&dir).ok();
//!
//! // Merge into the 4-bit base: dequantize, add s·B·A, re-quantize (NF4, 64, double quant).
//! let report = layer.merge(MergeOptions::default())?;
//! let survived = report.requantization.unwrap().survived;
//! assert!(survived > 0.0 && survived < 1.5);
//! # Ok::<(), qlora_lora::Error>(())
//! ```
//!
//! # Features
//!
//! | feature | what |
//! |---|---|
//! | `testing` | proptest strategies (module `testing`): hyper-parameters, adapter tensors, small layers over dense or 4-bit bases |
//!
//! # The math (row-major, `X: [n, in]`, `W: [out, in]`, `A: [r, in]`, `B: [out, r]`)
//!
//! | | |
//! |---|---|
//! | scaling | `s = alpha/r`, or `alpha/√r` with rsLoRA |
//! | forward | `Y = X·Wᵀ + b + s·(Xd·Aᵀ)·Bᵀ`, `Xd = X ⊙ M/(1−p)` (dropout on the LoRA input only) |
//! | backward | `dB = s·Gᵀ(Xd·Aᵀ)`, `dA = s·(G·B)ᵀ·Xd`, `dX = G·W + s·((G·B)·A) ⊙ M/(1−p)`; W frozen |
//! | DoRA | `c = m/‖W + s·B·A‖_row` (a constant in backward, as in PEFT); without dropout `Y = c ⊙ (X·Wᵀ + s·X·Aᵀ·Bᵀ) + b`; with dropout `Y = X·Wᵀ + b + (c−1)⊙(Xd·Wᵀ) + c⊙s·Xd·Aᵀ·Bᵀ` |
//! | merge | `W ← W + s·B·A` (transposed for `fan_in_fan_out`); DoRA `W ← (m/‖W+ΔW‖_row)·(W+ΔW)` |
//!
//! The dropout mask is a counter-based hash of `(seed, element index)`: backward regenerates it
//! from the seed instead of storing it, and it does not depend on the thread count.
//!
//! # Memory
//!
//! A 4-bit weight is dequantized one tile of at most [`base::TILE_ELEMS`] f32 values (2 MiB) at a
//! time inside each matrix product and never materialized whole; for at most
//! [`base::GEMV_MAX_TOKENS`] tokens (decoding) the product is the codec's fused matrix–vector
//! kernel ([`QuantizedTensor::gemv`]), which multiplies the input straight from the packed codes
//! through a per-block table of dequantized values — no weight scratch at all, and the result is
//! bit for bit `qlora_codec::gemv::dot` of each dequantized row with the input. Besides inputs and
//! outputs:
//!
//! | | holds (f32 values) | 4096×4096, r 16, 512 tokens |
//! |---|---|---|
//! | forward | one tile (≤ 2 MiB) + `U = Xd·Aᵀ` (`n·r`) + `L = U·Bᵀ` (`n·out`) + `Xd` (`n·in`, with dropout) | 2 + 0.03 + 8 (+ 8) MiB |
//! | kept for backward ([`ForwardCache`]) | `U` (`n·r`); DoRA adds `n·out + 2·out` | 32 KiB |
//! | backward | one tile + `dX` (`n·in`) + `G·B` (`n·r`) + `s·(G·B)·A` (`n·in`) + `Xd` (with dropout) | 2 + 8 + 0.03 + 8 (+ 8) MiB |
//!
//! The base itself costs 4.127 bits per parameter with double quantization (8.3 MiB for
//! 4096×4096, against 32 MiB in bf16). DoRA computes the row norms tile by tile too.
//!
//! # LoftQ: how much of the quantization error it removes
//!
//! `cargo run --release -p qlora-lora --example loftq_report` (NF4, block 64, no double quant,
//! alpha = 2r so s = 2; relative Frobenius errors; 1024×4096 matrices, a Gaussian one and a rank-64
//! plus noise one give the same numbers to two digits, since the quantization residual is
//! noise-like in both):
//!
//! | r | PEFT's LoftQ (factors not scaled), T = 1 | ours (scaled), T = 1 | ours, T = 5 |
//! |---|---|---|---|
//! | 16 | 0.0 % | 1.7 % | 6.3 % |
//! | 64 | 0.0 % | 6.6 % | 16.1 % |
//!
//! The plain NF4 error is 0.092·‖W‖. With s = 2 PEFT's factors (B·A ≈ W − Q, but the forward adds
//! 2·B·A) leave the error exactly where it was: ‖R − 2P‖ = ‖R‖ when P is R's top-r part.
//! [`init::LoftqOptions::compensate_scaling`] `= false` reproduces PEFT (identical when s = 1).
//!
//! # Speed (`cargo bench -p qlora-lora --bench lora`)
//!
//! Criterion medians on this project's 2-core AVX-512 (Zen 4-class, 2.6 GHz) development machine,
//! one run, shared with other builds while measuring (load average 2.5–4.3): a configuration's
//! absolute time scattered up to 3× between runs (the 11008×4096 r 64 NF4 forward at 512 tokens
//! below fell in a burst: 0.86–1.77 s within the run), so read the paired ratios after the table.
//!
//! | shape, r | 1 token fwd: NF4 / bf16 | 1 token bwd | 512 tokens fwd | 512 tokens bwd |
//! |---|---|---|---|---|
//! | 4096×4096, 16 | 1.47 / 2.26 ms | 7.4 / 5.1 ms | 0.80 / 0.79 s | 0.33 / 0.33 s |
//! | 4096×4096, 64 | 1.53 / 1.28 ms | 6.1 / 4.5 ms | 0.17 / 0.23 s | 0.23 / 0.24 s |
//! | 11008×4096, 16 | 4.19 / 6.46 ms | 59 / 19 ms | 0.53 / 0.43 s | 0.46 / 0.42 s |
//! | 11008×4096, 64 | 3.47 / 4.91 ms | 46 / 12 ms | 1.33 / 0.28 s | 0.34 / 0.31 s |
//!
//! A later run on the quiet machine (r 16, forward, load ≈ 1.5 from the bench itself): 1 token
//! 0.76 / 1.05 ms (0.72) at 4096×4096 and 2.02 / 3.47 ms (0.58) at 11008×4096; 512 tokens
//! 171.3 / 171.7 ms (1.00) at 4096×4096 and 398 / 369 ms (1.08) at 11008×4096 (a second run:
//! 376.8 / 375.6 ms, 1.00; r 64: 297.5 / 280.5 ms, 1.06). The 11008×4096 ratio was
//! 1.22–1.27 before the forward's fresh `[n, out]` buffers were written by the product instead of
//! read and then written: reading untouched zero pages first costs a second, copy-on-write page
//! fault per 4 KiB page with a TLB shootdown across the pool's threads (15 % of that forward in
//! the kernel's page-fault path).
//!
//! Paired runs (NF4 and bf16 forward alternating, so that load shifts hit both; process CPU time
//! over 6–10 pairs): NF4 / bf16 = 0.58–0.64 (medians) at 1 token for both shapes and ranks; at 512
//! tokens the run-to-run noise exceeds the difference: per-run medians 0.91–1.00 at 4096×4096 and
//! at 11008×4096 r 64, 0.91–1.31 at 11008×4096 r 16 (three of six runs above 1.15, the CPU time of
//! the very same product varying 2.5× within a run), while the work that differs is 2–4 % of the
//! forward (below).
//!
//! * 1 token: the 4-bit base is the codec's fused matrix–vector kernel (4.1 bits read per weight
//!   against 16; the kernel alone does 4096×4096 in about 0.66 ms on both cores). A bf16
//!   4096×4096 weight (32 MiB) can partly stay in this machine's 32 MiB L3 cache between calls,
//!   which is when bf16 comes close (the r 64 row); at 11008×4096 it cannot.
//! * 512 tokens: both bases run the same faer products over 2 MiB f32 tiles and differ only in
//!   making a tile: dequantizing and rounding costs 8 ms of CPU per 4096×4096 forward (24 ms at
//!   11008×4096) against 4 ms (7 ms) to widen bf16, 2–4 % of the forward.
//! * The 1-token backward (`dX = g·W`) still goes through the tiles, dequantizing the whole weight,
//!   hence its 1.4–3× against bf16.
//!
//! # Agreement with PEFT 0.21.2 (testdata/peft, `tests/peft_vectors.rs`)
//!
//! | what | result |
//! |---|---|
//! | forward and gradients (LoRA, rsLoRA, DoRA over f32; LoRA over bnb NF4 + double quant) | max relative error ≤ 3·10⁻⁷ |
//! | `merge_and_unload` on the bf16 tiny Llama (LoRA all-linear, rsLoRA with rank/alpha patterns, DoRA) | 100 % of elements bit-identical |
//! | `merge_and_unload` on its 4-bit base (NF4, block 64, double quant) | 100 % of codes identical |
//! | `adapter_model.safetensors` we write | byte-identical to PEFT's |
//!
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod base;
pub mod error;
pub mod init;
pub mod layer;
pub mod matmul;
pub mod merge;
pub mod peft;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use base::{BaseWeight, DenseData};
pub use error::{Error, Result};
pub use layer::{AdapterWeights, ForwardCache, LoraGrads, LoraLinear, LoraParams, LoraView, Mode};
pub use merge::{
    delta_weight, merge_adapter, merge_weight, MergeOptions, MergeOutput, MergeReport,
    MergedModule, RequantReport,
};
pub use qlora_codec::{Dtype, QuantType, QuantizeOptions, QuantizedTensor};
