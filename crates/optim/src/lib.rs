//! Adam and AdamW with 32-bit and 8-bit blockwise states, following bitsandbytes' CUDA kernels
//! operation by operation.
//!
//! # Should I use this crate?
//!
//! Use it to train (Q)LoRA adapters or any f32/bf16/f16 parameters with the optimizers QLoRA
//! uses: `adamw_bnb_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit` and friends. It reuses
//! `qlora-double-quant` for bitsandbytes' dynamic maps; the `qlora-nf4` facade re-exports it.
//!
//! # What it implements
//!
//! * [`Adam`] with [`AdamConfig::adamw8bit`], [`adam8bit`](AdamConfig::adam8bit),
//!   [`adamw32bit`](AdamConfig::adamw32bit), [`adam32bit`](AdamConfig::adam32bit): bitsandbytes'
//!   `Optimizer2State("adam")`, parameter groups with their own lr / weight decay / betas / eps,
//!   states created on first use (`min_8bit_size = 4096`: smaller parameters keep f32 states).
//! * The kernels [`adam_step_8bit`] (`kOptimizerStatic8bit2StateBlockwise`) and
//!   [`adam_step_32bit`] (`kOptimizer32bit2State`), per element in f32 (run by the
//!   [`Implementation`] picked for the CPU; [`AdamKernels::adam_step_8bit`] runs a chosen one):
//!   ```text
//!   c1 = 1 - β₁^t          c2 = sqrt(1 - β₂^t)          step_size = (-lr · c2) / c1
//!   m  = qmap1[c1_old] · absmax1_old · β₁ + (1-β₁) · g      (8-bit: dequantized, old absmax)
//!   v  = qmap2[c2_old] · absmax2_old · β₂ + (1-β₂) · g · g
//!   p  = T(p + step_size · m / (sqrt(v) + c2 · ε))           (ε scaled by c2)
//!   p  = T(p · (1 - lr · wd))       if wd > 0                (decoupled, after the step)
//!   8-bit: absmax = max |·| over the 256-block; codes = nearest code of m/absmax1, v/absmax2
//!          (ties to the even index); a negative m whose code is +0 moves one code down.
//!   ```
//!   A NaN/inf gradient element resets that element's 8-bit states to 0 and leaves its parameter
//!   alone (the 32-bit kernel has no such mask). A partial last block also counts
//!   `|qmap1[128] · absmax1_old · β₁|` in its new absmax1, as the kernel's padding lanes do.
//!   bf16/f16 parameters are rounded (to nearest even) after the step and again after the decay.
//! * [`clip_grad_norm`] (torch's `clip_grad_norm_`) or the fused [`Adam::step_scaled`];
//!   [`LrSchedule`]: constant (with warmup), linear, cosine, as transformers defines them.
//! * State save/load in safetensors under bitsandbytes' names (`state1`, `state2`, `absmax1`,
//!   `absmax2`, `qmap1`, `qmap2`, `step`), exact resume ([`Adam::save_state`]).
//! * [`StateStorage`]: where `state1`/`state2` live; [`HostStorage`] by default.
//!   [`PagedAdam`] (`Adam<PagedStorage>`, bitsandbytes' `PagedAdamW8bit`/`PagedAdamW32bit`) keeps
//!   the states of parameters with at least 10⁵ elements in a `qlora-paged-alloc` pool and
//!   prefetches them before each tensor's update; the kernels work on the pool's memory in place.
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `cuda` | the CUDA unified-memory backend of the paged pool (`qlora-paged-alloc/cuda`) |
//!
//! # Example
//!
//! ```
//! use qlora_optim::{Adam, AdamConfig, ParamUpdate, TensorMut, TensorRef};
//!
//! let mut opt = Adam::new(AdamConfig::adamw8bit().lr(1e-2))?;
//! let id = opt.add_param(0, 8192)?;                  // group 0 holds the defaults
//! let mut w = vec![0.5f32; 8192];
//! let grad: Vec<f32> = (0..8192).map(|i| (i as f32 - 4096.0) * 1e-4).collect();
//! for _ in 0..3 {
//!     opt.step(&mut [ParamUpdate {
//!         id,
//!         param: TensorMut::F32(&mut w),
//!         grad: TensorRef::F32(&grad),
//!     }])?;
//! }
//! let state = opt.state(id)?.expect("created by the first step");
//! assert_eq!(state.step(), 3);
//! assert_eq!(state.allocated_bytes(), 2 * 8192 + 8 * 8192 / 256); // 2 + 8/256 bytes/param
//! assert!(w[0] > 0.5 && w[8191] < 0.5);                // moved against the gradient
//! # Ok::<(), qlora_optim::Error>(())
//! ```
//!
//! # Numbers
//!
//! | states | bytes per parameter |
//! |---|---|
//! | 8-bit blockwise (`n ≥ min_8bit_size`) | `2 + 8/256 = 2.03125` (`2n + 8·ceil(n/256)` exactly) |
//! | f32 | `8` |
//!
//! The 8-bit step reads and writes every byte of parameter, gradient and state once (for f32
//! parameters and gradients: 16 bytes per element, plus 16 bytes of absmax per 256 elements,
//! 16.0625 bytes per parameter), fused per 256-block while the block sits in L1, in one
//! [`qlora_double_quant::Implementation::update_blockwise`] call per task: dequantize both states,
//! update moments, absmax and parameters in branch-free loops over fixed-length f32 buffers
//! (whole blocks of f32 gradients read in place), re-quantize (`s / new_absmax`), then the sign
//! fix; the next block is prefetched while this one is re-quantized. The 32-bit step moves 28
//! bytes per parameter in one loop. Tensors of at least [`PARALLEL_THRESHOLD`] elements run on
//! the rayon pool in items of 4 Ki elements; results do not depend on threading.
//!
//! The loops are safe Rust. Besides the baseline build (SSE2 on x86-64, auto-vectorized), the
//! crate compiles the same loops for AVX2 and AVX-512 and picks the best the CPU has at run time
//! ([`Implementation`], `qlora-double-quant`'s one CPU dispatch for the whole workspace, re-exported
//! here; `QLORA_FORCE_SCALAR=1` forces the baseline build; on aarch64, [`Implementation::Neon`]
//! is the baseline build, which has NEON). All give the same bits:
//! same operations in the same order, no FMA contraction, IEEE division and square root (per
//! element three divisions and one square root, which no reciprocal approximation may replace).
//! The 8-bit codes come from `qlora-double-quant`'s exact encoders, whichever implementation runs.
//!
//! `benches/adamw.rs` prints each step for every implementation as a fraction of a memcpy
//! measured in the same run (the faster of a one-thread and a rayon memcpy). On a 2-core AMD EPYC
//! (Zen 4) VM, 16 Mi f32 parameters, four runs in a row (memcpy limit 30.9–36.2 GB/s):
//!
//! | step | AVX-512 | AVX2 | baseline (SSE2) |
//! |---|---|---|---|
//! | 8-bit | 10.9–11.5 ms, 23.4–24.8 GB/s, **0.65–0.80** of memcpy | 14.0–14.6 ms, 0.51–0.62 | 16.7–17.3 ms, 0.43–0.52 |
//! | 32-bit | 7.4–9.4 ms, 50–63 GB/s, 1.62–1.81 | | |
//!
//! (The AVX2 and baseline rows use the best double-quant encoder of the CPU, AVX-512 here.) The
//! memcpy of this shared VM moves between about 23 and 40 GB/s over a day; the 8-bit step is
//! compute-bound, so at the top of that range its ratio is about 0.6.
//!
//! In cache (1 Mi parameters) the 8-bit step takes about 0.61 ns per element on two cores, only
//! 5–15 % less than from memory. Of that, the two re-quantizations take about 46 % (AVX-512:
//! per-decade straight lines, no table load per value), the f32 update about 27 % (its IEEE
//! division and square root occupy the divider for 16 cycles per 16 lanes), and the two
//! dequantizations (VBMI byte planes) about 14 %; the sign fix runs only on blocks where it can
//! change a code.

//! # Agreement with bitsandbytes
//!
//! CUDA compiles these kernels with `--use_fast_math` (`__powf`, `__fdividef`, approximate
//! `sqrtf`, FMA contraction); this crate uses IEEE f32 (`powf`, `/`, `sqrt`, no contraction), so
//! it follows the kernel's *rule* but not its rounding. Against bitsandbytes' kernels on an
//! NVIDIA H200 (`testdata/bnb-cuda-sm90`, 10 steps, 17 618 parameters) the 8-bit state codes are
//! 100 % / 99.994 % equal and the parameter changes `p_t − p_0` are within 1e-4 of the largest
//! change for 99.994 % of elements (worst 1.55e-4): the GPU's bias corrections `1 − β^t` are
//! `1 − ex2(t·lg2 β)` with approximate `lg2`/`ex2`, off by up to ~1e-4 relative for β₂ = 0.999 at
//! early steps — bitsandbytes' rounding, not worth emulating. bitsandbytes' CPU
//! backend differs more (decay before the step, an approximate 8-bit quantizer); see the tests
//! against its recorded trajectories in `testdata/optim/`.
// `unsafe` is confined to `arch` (calls of `#[target_feature]` copies of the safe kernels).
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[allow(unsafe_code)]
mod arch;
mod clip;
mod element;
mod error;
mod kernel;
mod optimizer;
mod paged;
mod schedule;
mod state;
mod storage;

pub use clip::{clip_coefficient, clip_grad_norm, global_grad_norm, GradClip};
pub use element::{Dtype, Element, TensorMut, TensorRef};
pub use error::Error;
pub use kernel::{
    adam_step_32bit, adam_step_8bit, AdamKernels, AdamStep, Blockwise8bitMut, PARALLEL_THRESHOLD,
};
pub use optimizer::{
    write_atomically, Adam, AdamConfig, GroupHyper, GroupOptions, OptimBits, ParamId, ParamUpdate,
};
pub use paged::{MaybePaged, PagedAdam, PagedStorage, PAGED_MIN_NUMEL};
pub use qlora_double_quant::Implementation;
pub use qlora_double_quant::OPTIMIZER_BLOCKSIZE;
pub use qlora_paged_alloc::{Pool, PoolConfig};
pub use schedule::{warmup_steps_from_ratio, LrSchedule};
pub use state::{ParamState, StateKind, StateTensors, TensorData};
pub use storage::{HostStorage, StateBuffer, StateStorage};

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
