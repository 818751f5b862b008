//! CUDA kernels for QLoRA, compiled at run time with NVRTC: NF4/FP4 quantization and
//! dequantization (with fused double-quantized scales), the 8-bit blockwise codec with
//! bitsandbytes' dynamic maps, the 8-bit and 32-bit Adam/AdamW steps, and a fused 4-bit
//! dequantize + matrix-vector product.
//!
//! # Should I use this crate?
//! Only if you want the raw GPU kernels. It sits at the bottom of the workspace and depends on
//! no other qlora crate; `qlora-codec` and `qlora-optim` use it behind their `cuda` features.
//! Without the `cuda` feature it still gives the kernel sources ([`Program`]) and the constants
//! shared with them ([`constants`]), which need no GPU and no CUDA toolkit.
//!
//! # Numerics
//! Kernels follow the bitsandbytes 0.50.2 CUDA semantics (reference notes §2–§6, §12) and are
//! compiled **without fast math** ([`NVRTC_OPTIONS`]): IEEE division and square root, no FMA
//! contraction. Where bitsandbytes' own `--use_fast_math` build differs, the quantize and
//! dequantize kernels reproduce it on purpose with inline PTX: the reciprocal of the absmax is
//! `rcp.approx.ftz.f32` (`MUFU.RCP`), and the products `x · inv`, `code · absmax` and
//! `code2[q] · nested_absmax` are `mul.rn.ftz.f32` (flush to zero). So quantization equals the
//! CPU oracle (which reproduces `MUFU.RCP` from a measured table) and bitsandbytes on a GPU bit for
//! bit (including the all-zero block → code 0 and the NaN/Inf rules of §2.5), dequantization is one
//! flushing f32 multiply and a round-to-nearest-even conversion, and the double-quantized scale is
//! `f32(ftz(code2[q] · nested_absmax[j/256]) + offset)` with two roundings. The optimizer kernels
//! are IEEE and document their exact evaluation order in their source.
//!
//! # Features
//! | feature | what it adds |
//! |---|---|
//! | `cuda` | `Device`: driver probe, NVRTC compilation per architecture (cached per process), safe launchers that check every length. cudarc loads `libcuda`/`libnvrtc` at run time, so building never needs CUDA. |
//! | `dynamic-linking` | cudarc's `dynamic-linking` (candle's CUDA backend selects it; cudarc refuses it next to `dynamic-loading`, which `cuda` falls back to otherwise): libcuda and libnvrtc become link-time dependencies, so building needs a CUDA toolkit, and the probes answer "present". `qlora-candle/cuda` turns it on. |
//! | `regenerate-bindings` | the test that regenerates `src/bindings.rs` from `cuda/qlora_kernels.h` with bindgen (needs libclang) |
//!
//! # Example (no GPU needed)
//! ```
//! use qlora_cuda::{constants, Program};
//! // Every kernel file states its launch contract before any code.
//! for program in Program::ALL {
//!     assert!(program.raw_source().starts_with("/*"));
//!     assert!(program.source().contains("QLORA_NF4_T15"));
//! }
//! assert_eq!(constants::NF4_CODEBOOK[7], 0.0);
//! assert_eq!(constants::NF4_THRESHOLDS[7].to_bits(), 0x3d22faff);
//! ```
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[allow(
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unreachable_pub,
    clippy::all
)]
#[rustfmt::skip]
mod bindings;

pub mod constants;
mod error;
mod kernels;

#[cfg(feature = "cuda")]
mod runtime;

pub use error::CudaError;
pub use kernels::{header_source, Program, NVRTC_OPTIONS};

#[cfg(feature = "cuda")]
pub use runtime::{
    compile_program, nvrtc_available, probe, Adam8bitState, AdamParams, Availability, Device,
    DynamicMaps, Element, Scales,
};

/// Re-exported so callers name the same cudarc version as the launchers.
#[cfg(feature = "cuda")]
pub use cudarc;

/// The 4-bit code book a tensor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 (§1.1).
    Nf4,
    /// FP4, 1 sign, 2 exponent, 1 mantissa bit (§1.3).
    Fp4,
}

impl QuantType {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn to_ffi(self) -> u32 {
        match self {
            QuantType::Nf4 => bindings::QloraQuantType_QLORA_QUANT_NF4,
            QuantType::Fp4 => bindings::QloraQuantType_QLORA_QUANT_FP4,
        }
    }
}
