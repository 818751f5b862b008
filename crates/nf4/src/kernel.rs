//! Run-time selection of the CPU kernels (memchr's layout): the scalar oracle, AVX2, AVX-512 and
//! NEON implementations, the best one picked once and cached, and the multi-threaded drivers that
//! cut a tensor into ranges of whole blocks for them.
//!
//! This module is safe code; the `unsafe` SIMD lives in `crate::arch`. Every implementation
//! produces the same bytes as [`crate::scalar`] (tested for every implementation the machine has).

use crate::{scalar, AbsmaxView, Element, QuantType, PARALLEL_THRESHOLD};
use half::{bf16, f16};
use rayon::prelude::*;
use std::any::TypeId;
use std::sync::OnceLock;

/// Outputs at least this large are written with non-temporal (cache-bypassing) stores where the
/// implementation has them: a tensor this size does not stay in the cache anyway, and streaming
/// stores save the read-for-ownership of every output line.
pub(crate) const STREAMING_BYTES: usize = 16 << 20;

/// Runs `$body` with `$k` bound to the kernel of implementation `$imp`.
macro_rules! with_kernel {
    ($imp:expr, $k:ident => $body:expr) => {
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
            Implementation::Scalar => {
                let $k = ScalarKernel;
                $body
            }
            #[allow(unreachable_patterns)]
            other => panic!("the {other} implementation is not available on this machine"),
        }
    };
}

/// A CPU implementation of the 4-bit kernels.
///
/// [`Implementation::active`] is what [`crate::quantize_into`] and the dequantize functions use;
/// tests and benchmarks can run a specific one through the methods of this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Implementation {
    /// The safe scalar oracle ([`crate::scalar`]).
    Scalar,
    /// x86-64 AVX2 + F16C.
    Avx2,
    /// x86-64 AVX-512 F + BW.
    Avx512,
    /// aarch64 NEON.
    Neon,
}

/// Every implementation, best first.
const ALL: [Implementation; 4] = [
    Implementation::Avx512,
    Implementation::Avx2,
    Implementation::Neon,
    Implementation::Scalar,
];

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

    /// The implementations this machine can run, best first (the scalar oracle is always last).
    pub fn available() -> Vec<Implementation> {
        ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest implementation this machine can run (ignores `QLORA_FORCE_SCALAR`).
    pub fn best() -> Implementation {
        ALL.into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Implementation::Scalar)
    }

    /// The implementation the crate's entry points use: [`best`](Self::best), or the scalar oracle
    /// when the environment variable `QLORA_FORCE_SCALAR` is `1` (read once, on first use).
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

    /// [`crate::quantize_into`] with this implementation.
    ///
    /// # Panics
    /// If the implementation is not [available](Self::is_available) here.
    pub fn quantize_into<T: Element>(
        self,
        quant_type: QuantType,
        input: &[T],
        blocksize: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) -> Result<(), crate::Error> {
        crate::validate_quantize(input.len(), blocksize, packed, absmax)?;
        with_kernel!(self, k => drive_quantize(k, quant_type, input, blocksize, packed, absmax));
        Ok(())
    }

    /// [`crate::dequantize_into`] with this implementation.
    ///
    /// # Panics
    /// If the implementation is not [available](Self::is_available) here.
    pub fn dequantize_into<T: Element>(
        self,
        quant_type: QuantType,
        packed: &[u8],
        absmax: AbsmaxView<'_>,
        blocksize: usize,
        out: &mut [T],
    ) -> Result<(), crate::Error> {
        crate::validate_dequantize(packed, absmax, blocksize, out.len(), 0, out.len())?;
        with_kernel!(self, k => drive_dequantize(k, quant_type, packed, absmax, blocksize, out));
        Ok(())
    }

    /// [`crate::dequantize_range_into`] with this implementation.
    ///
    /// # Panics
    /// If the implementation is not [available](Self::is_available) here.
    #[allow(clippy::too_many_arguments)]
    pub fn dequantize_range_into<T: Element>(
        self,
        quant_type: QuantType,
        packed: &[u8],
        absmax: AbsmaxView<'_>,
        blocksize: usize,
        n: usize,
        start: usize,
        out: &mut [T],
    ) -> Result<(), crate::Error> {
        crate::validate_dequantize(packed, absmax, blocksize, n, start, out.len())?;
        let streaming = std::mem::size_of_val(out) >= STREAMING_BYTES;
        with_kernel!(self, k => dequantize_chunk(k, quant_type, packed, absmax, blocksize, start, out, streaming));
        Ok(())
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The kernels one implementation provides for the three element types.
///
/// Quantize: `input` starts at a block boundary, `packed` holds `ceil(len/2)` bytes and `absmax`
/// `ceil(len/blocksize)` values. Dequantize: `packed` and `absmax` are the whole tensor's, `out`
/// receives elements `start .. start + out.len()`. Implementations check these lengths (they are
/// safe functions) and produce exactly the bytes of [`crate::scalar`].
pub(crate) trait Kernel: Copy + Send + Sync {
    fn quantize_f32(self, qt: QuantType, x: &[f32], bs: usize, p: &mut [u8], a: &mut [f32]);
    fn quantize_f16(self, qt: QuantType, x: &[f16], bs: usize, p: &mut [u8], a: &mut [f32]);
    fn quantize_bf16(self, qt: QuantType, x: &[bf16], bs: usize, p: &mut [u8], a: &mut [f32]);
    #[allow(clippy::too_many_arguments)]
    fn dequantize_f32(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [f32],
        streaming: bool,
    );
    #[allow(clippy::too_many_arguments)]
    fn dequantize_f16(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [f16],
        streaming: bool,
    );
    #[allow(clippy::too_many_arguments)]
    fn dequantize_bf16(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [bf16],
        streaming: bool,
    );
}

/// The oracle as a [`Kernel`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScalarKernel;

impl Kernel for ScalarKernel {
    fn quantize_f32(self, qt: QuantType, x: &[f32], bs: usize, p: &mut [u8], a: &mut [f32]) {
        scalar::quantize_blocks(qt, x, bs, p, a)
    }
    fn quantize_f16(self, qt: QuantType, x: &[f16], bs: usize, p: &mut [u8], a: &mut [f32]) {
        scalar::quantize_blocks(qt, x, bs, p, a)
    }
    fn quantize_bf16(self, qt: QuantType, x: &[bf16], bs: usize, p: &mut [u8], a: &mut [f32]) {
        scalar::quantize_blocks(qt, x, bs, p, a)
    }
    fn dequantize_f32(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [f32],
        _streaming: bool,
    ) {
        scalar::dequantize_range(qt, p, a, bs, start, out)
    }
    fn dequantize_f16(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [f16],
        _streaming: bool,
    ) {
        scalar::dequantize_range(qt, p, a, bs, start, out)
    }
    fn dequantize_bf16(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [bf16],
        _streaming: bool,
    ) {
        scalar::dequantize_range(qt, p, a, bs, start, out)
    }
}

/// Blocks per parallel work item: enough elements that a task is worth scheduling.
pub(crate) fn blocks_per_task(blocksize: usize) -> usize {
    (PARALLEL_THRESHOLD / 4 / blocksize).max(1)
}

fn is<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<U>()
}

/// Quantize whole blocks with kernel `k`, routing the three built-in element types to their SIMD
/// kernels (a user-defined [`Element`] runs the oracle).
fn quantize_chunk<K: Kernel, T: Element>(
    k: K,
    qt: QuantType,
    x: &[T],
    bs: usize,
    p: &mut [u8],
    a: &mut [f32],
) {
    if is::<T, f32>() {
        k.quantize_f32(qt, bytemuck::cast_slice(x), bs, p, a)
    } else if is::<T, bf16>() {
        k.quantize_bf16(qt, bytemuck::cast_slice(x), bs, p, a)
    } else if is::<T, f16>() {
        k.quantize_f16(qt, bytemuck::cast_slice(x), bs, p, a)
    } else {
        scalar::quantize_blocks(qt, x, bs, p, a)
    }
}

#[allow(clippy::too_many_arguments)]
fn dequantize_chunk<K: Kernel, T: Element>(
    k: K,
    qt: QuantType,
    p: &[u8],
    a: AbsmaxView<'_>,
    bs: usize,
    start: usize,
    out: &mut [T],
    streaming: bool,
) {
    if is::<T, f32>() {
        k.dequantize_f32(
            qt,
            p,
            a,
            bs,
            start,
            bytemuck::cast_slice_mut(out),
            streaming,
        )
    } else if is::<T, bf16>() {
        k.dequantize_bf16(
            qt,
            p,
            a,
            bs,
            start,
            bytemuck::cast_slice_mut(out),
            streaming,
        )
    } else if is::<T, f16>() {
        k.dequantize_f16(
            qt,
            p,
            a,
            bs,
            start,
            bytemuck::cast_slice_mut(out),
            streaming,
        )
    } else {
        scalar::dequantize_range(qt, p, a, bs, start, out)
    }
}

/// Quantize a validated tensor, on the rayon pool when it is large.
pub(crate) fn drive_quantize<K: Kernel, T: Element>(
    k: K,
    qt: QuantType,
    input: &[T],
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    if input.len() < PARALLEL_THRESHOLD {
        quantize_chunk(k, qt, input, bs, packed, absmax);
        return;
    }
    let bpt = blocks_per_task(bs);
    input
        .par_chunks(bpt * bs)
        .zip(packed.par_chunks_mut(bpt * bs / 2))
        .zip(absmax.par_chunks_mut(bpt))
        .for_each(|((x, p), a)| quantize_chunk(k, qt, x, bs, p, a));
}

/// Dequantize a validated whole tensor, on the rayon pool when it is large.
pub(crate) fn drive_dequantize<K: Kernel, T: Element>(
    k: K,
    qt: QuantType,
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    bs: usize,
    out: &mut [T],
) {
    let streaming = std::mem::size_of_val(out) >= STREAMING_BYTES;
    if out.len() < PARALLEL_THRESHOLD {
        dequantize_chunk(k, qt, packed, absmax, bs, 0, out, streaming);
        return;
    }
    let chunk = blocks_per_task(bs) * bs;
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, o)| dequantize_chunk(k, qt, packed, absmax, bs, i * chunk, o, streaming));
}
