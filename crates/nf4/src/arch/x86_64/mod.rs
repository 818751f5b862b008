//! x86-64 kernels: AVX2 (+F16C) and AVX-512 (F + BW).

pub(crate) mod avx2;
pub(crate) mod avx512;
