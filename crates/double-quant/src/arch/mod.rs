//! The SIMD slice kernels, one module per architecture and instruction set. This is the only
//! place in the crate with `unsafe` code; each kernel type is constructed only after its CPU
//! features were detected, so its methods are safe to call.
//!
//! Compiled only with `cfg(qlora_simd)`, which `build.rs` sets for Rust 1.89 and later (stable
//! AVX-512 intrinsics, safe intrinsic calls inside `#[target_feature]` functions); older
//! compilers within the workspace MSRV run the scalar code.

#[cfg(all(target_arch = "x86_64", qlora_simd))]
#[clippy::msrv = "1.89"]
pub(crate) mod x86_64;

#[cfg(all(target_arch = "aarch64", qlora_simd))]
#[clippy::msrv = "1.89"]
pub(crate) mod aarch64;
