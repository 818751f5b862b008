//! aarch64 kernels: NEON (part of the base ARMv8-A architecture).

pub(crate) mod neon;
