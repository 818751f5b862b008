//! aarch64 kernels: NEON (part of the base ARMv8-A architecture), and the fused matrix–vector
//! kernel (`gemv_neon`).

pub(crate) mod gemv_neon;
pub(crate) mod neon;
