//! Run-time selection of the slice kernels of [`Encoder`] and [`DynamicMap::decode_scaled`]: the
//! scalar code, AVX2, AVX-512 and NEON, the best one picked once and cached.
//!
//! This module is safe code; the `unsafe` SIMD lives in `crate::arch`. Every implementation
//! produces the same bytes as [`DynamicMap::encode`] (tested for every implementation the machine
//! has).

use crate::encoder::Encoder;
use crate::DynamicMap;
use std::sync::OnceLock;

/// How a slice kernel normalizes each input before encoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Normalize {
    /// `x` as is.
    None,
    /// `x * p` (f32 product).
    Mul,
    /// `x / p` (IEEE f32 division).
    Div,
}

/// A CPU implementation of the slice kernels ([`Encoder::encode_slice`],
/// [`Encoder::encode_scaled`], [`Encoder::encode_divided`], [`DynamicMap::decode_scaled`]).
///
/// [`Implementation::active`] is what those methods use; tests and benchmarks can run a specific
/// one through the methods of this type. Every implementation returns the same bytes.
///
/// ```
/// use qlora_double_quant::{Encoder, Implementation};
///
/// let x = [0.5f32, -0.25, 2.0, f32::NAN];
/// let mut reference = [0u8; 4];
/// Implementation::Scalar.encode_scaled(Encoder::signed(), &x, 0.5, &mut reference);
/// for imp in Implementation::available() {
///     let mut codes = [0u8; 4];
///     imp.encode_scaled(Encoder::signed(), &x, 0.5, &mut codes);
///     assert_eq!(codes, reference, "{imp}");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Implementation {
    /// Safe scalar code: one table lookup per element.
    Scalar,
    /// x86-64 AVX2: 8 lanes, `vpgatherdd` (decode is the scalar loop).
    Avx2,
    /// x86-64 AVX-512 F + BW + VL: 16 lanes, masked tails; decode by `vpermt2ps`.
    Avx512,
    /// aarch64 NEON: 4 lanes of key arithmetic and compares, scalar table loads.
    Neon,
}

/// Every implementation, best first.
const ALL: [Implementation; 4] = [
    Implementation::Avx512,
    Implementation::Avx2,
    Implementation::Neon,
    Implementation::Scalar,
];

/// Runs `$body` with `$k` bound to the SIMD kernel of `$imp`, or `$scalar` for the scalar code.
macro_rules! dispatch {
    ($imp:expr, $k:ident => $body:expr, $scalar:expr) => {
        match $imp {
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx512 => {
                let $k = crate::arch::x86_64::avx512::Kernel::new()
                    .expect("the AVX-512 implementation is not available on this CPU");
                $body
            }
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx2 => {
                let $k = crate::arch::x86_64::avx2::Kernel::new()
                    .expect("the AVX2 implementation is not available on this CPU");
                $body
            }
            #[cfg(all(target_arch = "aarch64", qlora_simd))]
            Implementation::Neon => {
                let $k = crate::arch::aarch64::neon::Kernel::new()
                    .expect("the NEON implementation is not available on this CPU");
                $body
            }
            Implementation::Scalar => $scalar,
            #[allow(unreachable_patterns)]
            other => panic!("the {other} implementation is not available on this machine"),
        }
    };
}

impl Implementation {
    /// A short name: `scalar`, `avx2`, `avx512`, `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Scalar => "scalar",
            Implementation::Avx2 => "avx2",
            Implementation::Avx512 => "avx512",
            Implementation::Neon => "neon",
        }
    }

    /// True when this implementation can run on this machine (and was compiled in).
    pub fn is_available(self) -> bool {
        match self {
            Implementation::Scalar => true,
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx2 => crate::arch::x86_64::avx2::Kernel::is_available(),
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx512 => crate::arch::x86_64::avx512::Kernel::is_available(),
            #[cfg(all(target_arch = "aarch64", qlora_simd))]
            Implementation::Neon => crate::arch::aarch64::neon::Kernel::is_available(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The implementations this machine can run, best first (the scalar code is always last).
    pub fn available() -> Vec<Implementation> {
        ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest implementation this machine can run (ignores `QLORA_FORCE_SCALAR`).
    pub fn best() -> Implementation {
        ALL.into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Implementation::Scalar)
    }

    /// The implementation the slice methods use: [`best`](Self::best), or the scalar code when the
    /// environment variable `QLORA_FORCE_SCALAR` is `1` (read once, on first use).
    #[inline]
    pub fn active() -> Implementation {
        static ACTIVE: OnceLock<Implementation> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            if std::env::var_os("QLORA_FORCE_SCALAR").is_some_and(|v| v == "1") {
                Implementation::Scalar
            } else {
                Implementation::best()
            }
        })
    }

    /// `out[i] = enc.encode(normalize(x[i], ps[i / size]))`.
    #[inline]
    fn encode(
        self,
        enc: &Encoder,
        x: &[f32],
        how: Normalize,
        size: usize,
        ps: &[f32],
        out: &mut [u8],
    ) {
        assert!(out.len() >= x.len(), "encode: output shorter than input");
        let out = &mut out[..x.len()];
        dispatch!(self, k => k.encode(enc, x, how, size, ps, out), {
            for ((x, out), &p) in x.chunks(size).zip(out.chunks_mut(size)).zip(ps) {
                match how {
                    Normalize::None => scalar_encode(enc, x, out, |v| v),
                    Normalize::Mul => scalar_encode(enc, x, out, |v| v * p),
                    Normalize::Div => scalar_encode(enc, x, out, |v| v / p),
                }
            }
        })
    }

    /// [`encode`](Self::encode) with one `p` for the whole slice.
    #[inline]
    fn encode_one(self, enc: &Encoder, x: &[f32], how: Normalize, p: f32, out: &mut [u8]) {
        self.encode(enc, x, how, x.len().max(1), &[p], out)
    }

    /// [`encode`](Self::encode) by blocks of `size`, checking that there is one `p` per block.
    fn encode_blocks(
        self,
        enc: &Encoder,
        x: &[f32],
        how: Normalize,
        size: usize,
        ps: &[f32],
        out: &mut [u8],
    ) {
        assert!(size > 0, "block size 0");
        assert_eq!(
            ps.len(),
            x.len().div_ceil(size),
            "one divisor or scale per block"
        );
        self.encode(enc, x, how, size, ps, out)
    }

    /// [`Encoder::encode_slice`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `xn`, or the implementation is not
    /// [available](Self::is_available) here.
    pub fn encode_slice(self, enc: &Encoder, xn: &[f32], out: &mut [u8]) {
        self.encode_one(enc, xn, Normalize::None, 1.0, out)
    }

    /// [`Encoder::encode_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `values`, or the implementation is not
    /// [available](Self::is_available) here.
    pub fn encode_scaled(self, enc: &Encoder, values: &[f32], scale: f32, out: &mut [u8]) {
        self.encode_one(enc, values, Normalize::Mul, scale, out)
    }

    /// [`Encoder::encode_divided`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `values`, or the implementation is not
    /// [available](Self::is_available) here.
    #[inline]
    pub fn encode_divided(self, enc: &Encoder, values: &[f32], divisor: f32, out: &mut [u8]) {
        self.encode_one(enc, values, Normalize::Div, divisor, out)
    }

    /// [`Encoder::encode_blocks_divided`] with this implementation.
    ///
    /// # Panics
    /// If `size` is 0, `divisors` does not hold one divisor per block, `out` is shorter than
    /// `values`, or the implementation is not [available](Self::is_available) here.
    pub fn encode_blocks_divided(
        self,
        enc: &Encoder,
        values: &[f32],
        size: usize,
        divisors: &[f32],
        out: &mut [u8],
    ) {
        self.encode_blocks(enc, values, Normalize::Div, size, divisors, out)
    }

    /// [`Encoder::encode_blocks_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `size` is 0, `scales` does not hold one scale per block, `out` is shorter than
    /// `values`, or the implementation is not [available](Self::is_available) here.
    pub fn encode_blocks_scaled(
        self,
        enc: &Encoder,
        values: &[f32],
        size: usize,
        scales: &[f32],
        out: &mut [u8],
    ) {
        self.encode_blocks(enc, values, Normalize::Mul, size, scales, out)
    }

    /// [`DynamicMap::decode_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `codes`, or the implementation is not
    /// [available](Self::is_available) here.
    #[inline]
    pub fn decode_scaled(self, map: &DynamicMap, codes: &[u8], scale: f32, out: &mut [f32]) {
        self.decode(map, codes, codes.len().max(1), &[scale], out)
    }

    /// [`DynamicMap::decode_blocks_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `size` is 0, `scales` does not hold one scale per block, `out` is shorter than
    /// `codes`, or the implementation is not [available](Self::is_available) here.
    pub fn decode_blocks_scaled(
        self,
        map: &DynamicMap,
        codes: &[u8],
        size: usize,
        scales: &[f32],
        out: &mut [f32],
    ) {
        assert!(size > 0, "block size 0");
        assert_eq!(
            scales.len(),
            codes.len().div_ceil(size),
            "one scale per block"
        );
        self.decode(map, codes, size, scales, out)
    }

    #[inline]
    fn decode(self, map: &DynamicMap, codes: &[u8], size: usize, scales: &[f32], out: &mut [f32]) {
        assert!(
            out.len() >= codes.len(),
            "decode_scaled: output shorter than input"
        );
        let out = &mut out[..codes.len()];
        dispatch!(self, k => k.decode_scaled(map, codes, size, scales, out), {
            for ((codes, out), &scale) in codes.chunks(size).zip(out.chunks_mut(size)).zip(scales) {
                for (o, &c) in out.iter_mut().zip(codes) {
                    *o = map.values()[c as usize] * scale;
                }
            }
        })
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline(always)]
fn scalar_encode(enc: &Encoder, x: &[f32], out: &mut [u8], norm: impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = enc.encode(norm(v));
    }
}
