//! x86-64 kernels: AVX2 and AVX-512 (F + BW + VL).

pub(crate) mod avx2;
pub(crate) mod avx512;
