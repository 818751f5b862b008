//! x86-64 kernels: AVX2 (+F16C) and AVX-512 (F + BW), and the fused matrix–vector kernels
//! (`gemv_*`).

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod gemv_avx2;
pub(crate) mod gemv_avx512;
