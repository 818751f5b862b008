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
//!   [`adam_step_32bit`] (`kOptimizer32bit2State`), per element in f32:
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
//! parameters and gradients: 16 bytes per element, plus 16 bytes of absmax per 256 elements),
//! fused per 256-block: dequantize, update and re-quantize while the block sits in L1. Tensors of
//! at least [`PARALLEL_THRESHOLD`] elements run on the rayon pool; results do not depend on
//! threading. Cost on one core of a (shared) 2-core AMD EPYC VM, scalar code (no `unsafe`, no
//! SIMD intrinsics; the update itself auto-vectorizes, the table lookups of the codes do not):
//! about 8 ns per element for the 8-bit step and 3 ns for the 32-bit step, i.e. the 8-bit step is
//! compute-bound on CPU and the 32-bit step close to memory-bound. `benches/adamw.rs` prints both
//! as a fraction of a memcpy measured in the same run.
//!
//! # Agreement with bitsandbytes
//!
//! CUDA compiles these kernels with `--use_fast_math` (`__powf`, `__fdividef`, approximate
//! `sqrtf`, FMA contraction); this crate uses IEEE f32 (`powf`, `/`, `sqrt`, no contraction), so
//! it is bit-exact to the kernel's *rule* and within f32 rounding of a GPU. bitsandbytes' CPU
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
    adam_step_32bit, adam_step_8bit, AdamStep, Blockwise8bitMut, Implementation, PARALLEL_THRESHOLD,
};
pub use optimizer::{
    write_atomically, Adam, AdamConfig, GroupHyper, GroupOptions, OptimBits, ParamId, ParamUpdate,
};
pub use paged::{MaybePaged, PagedAdam, PagedStorage, PAGED_MIN_NUMEL};
pub use qlora_double_quant::OPTIMIZER_BLOCKSIZE;
pub use qlora_paged_alloc::{Pool, PoolConfig};
pub use schedule::{warmup_steps_from_ratio, LrSchedule};
pub use state::{ParamState, StateKind, StateTensors, TensorData};
pub use storage::{HostStorage, StateBuffer, StateStorage};

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
