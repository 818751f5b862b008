//! The CPU kernels of each [`Implementation`] (memchr's layout): the scalar oracle, AVX2, AVX-512
//! and NEON, run through [`CodecKernels`] for the implementation `qlora-double-quant` picks once
//! for the whole process, and the multi-threaded drivers that cut a tensor into ranges of whole
//! blocks for them.
//!
//! This module is safe code; the `unsafe` SIMD lives in `crate::arch`. Every implementation
//! produces the same bytes as [`crate::scalar`] (tested for every implementation the machine has).

use crate::{scalar, AbsmaxView, Element, QuantType, QuantizedTensor, PARALLEL_THRESHOLD};
use half::{bf16, f16};
use qlora_double_quant::{Implementation, MeanScan};
use rayon::prelude::*;
use std::any::TypeId;

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

/// The 4-bit kernels run with a chosen [`Implementation`] (the workspace's one run-time choice,
/// shared with `qlora-double-quant` and `qlora-optim`).
///
/// [`Implementation::active`] is what [`crate::quantize_into`], the dequantize functions and
/// [`QuantizedTensor::gemv`] use; tests and benchmarks can run a specific implementation through
/// these methods (implemented for [`Implementation`]; the trait exists because the type is
/// `qlora-double-quant`'s). Every implementation returns the same bytes.
///
/// ```
/// use qlora_codec::{CodecKernels, Implementation, QuantType};
///
/// let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
/// let (mut packed, mut absmax) = (vec![0u8; 128], vec![0f32; 4]);
/// Implementation::Scalar.quantize_into(QuantType::Nf4, &x, 64, &mut packed, &mut absmax)?;
/// for imp in Implementation::available() {
///     let (mut p, mut a) = (vec![0u8; 128], vec![0f32; 4]);
///     imp.quantize_into(QuantType::Nf4, &x, 64, &mut p, &mut a)?;
///     assert_eq!((&p, &a), (&packed, &absmax), "{imp}");
/// }
/// # Ok::<(), qlora_codec::Error>(())
/// ```
pub trait CodecKernels: Copy + Into<Implementation> {
    /// [`crate::quantize_into`] with this implementation.
    ///
    /// # Panics
    /// If the implementation is not [available](Implementation::is_available) here.
    fn quantize_into<T: Element>(
        self,
        quant_type: QuantType,
        input: &[T],
        blocksize: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) -> Result<(), crate::Error> {
        crate::validate_quantize(input.len(), blocksize, packed, absmax)?;
        let imp: Implementation = self.into();
        with_kernel!(imp, k => drive_quantize(k, quant_type, input, blocksize, packed, absmax));
        Ok(())
    }

    /// [`crate::quantize_double_into`] with this implementation (the double quantization runs
    /// `qlora-double-quant`'s kernels, which follow the process's one choice).
    ///
    /// # Panics
    /// If the implementation is not [available](Implementation::is_available) here.
    #[allow(clippy::too_many_arguments)]
    fn quantize_double_into<T: Element>(
        self,
        quant_type: QuantType,
        input: &[T],
        blocksize: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
        codes: &mut [u8],
        nested_absmax: &mut [f32],
    ) -> Result<f32, crate::Error> {
        crate::validate_quantize(input.len(), blocksize, packed, absmax)?;
        crate::check_len("codes", absmax.len(), codes.len())?;
        crate::check_len(
            "nested_absmax",
            absmax.len().div_ceil(qlora_double_quant::NESTED_BLOCKSIZE),
            nested_absmax.len(),
        )?;
        let imp: Implementation = self.into();
        let scan = with_kernel!(imp, k => drive_quantize_scan(k, quant_type, input, blocksize, packed, absmax));
        let dq_len = |e: qlora_double_quant::Error| match e {
            qlora_double_quant::Error::Length {
                what,
                expected,
                found,
            } => crate::Error::Length {
                what,
                expected,
                found,
            },
            qlora_double_quant::Error::BlockSize(b) => crate::Error::BlockSize(b),
        };
        let offset = scan.mean(absmax).map_err(dq_len)?;
        qlora_double_quant::DoubleQuantAbsmax::compress_with_offset_into(
            absmax,
            offset,
            codes,
            nested_absmax,
        )
        .map_err(dq_len)?;
        Ok(offset)
    }

    /// [`crate::dequantize_into`] with this implementation.
    ///
    /// # Panics
    /// If the implementation is not [available](Implementation::is_available) here.
    fn dequantize_into<T: Element>(
        self,
        quant_type: QuantType,
        packed: &[u8],
        absmax: AbsmaxView<'_>,
        blocksize: usize,
        out: &mut [T],
    ) -> Result<(), crate::Error> {
        crate::validate_dequantize(packed, absmax, blocksize, out.len(), 0, out.len())?;
        let imp: Implementation = self.into();
        with_kernel!(imp, k => drive_dequantize(k, quant_type, packed, absmax, blocksize, out));
        Ok(())
    }

    /// [`crate::dequantize_range_into`] with this implementation.
    ///
    /// # Panics
    /// If the implementation is not [available](Implementation::is_available) here.
    #[allow(clippy::too_many_arguments)]
    fn dequantize_range_into<T: Element>(
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
        let job = DequantJob {
            qt: quant_type,
            packed,
            absmax,
            bs: blocksize,
            start,
            streaming: std::mem::size_of_val(out) >= STREAMING_BYTES,
        };
        let imp: Implementation = self.into();
        with_kernel!(imp, k => dequantize_chunk(k, &job, out));
        Ok(())
    }

    /// [`QuantizedTensor::gemv`] with this implementation.
    ///
    /// Every implementation returns the same bits; one this machine cannot run runs the scalar
    /// oracle instead.
    fn gemv(
        self,
        q: &QuantizedTensor,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), crate::Error> {
        crate::gemv::gemv_with(self.into(), q, x, n, y)
    }
}

impl CodecKernels for Implementation {}

/// A dense input of one of the three element types the SIMD kernels handle.
#[derive(Clone, Copy)]
pub(crate) enum Dense<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Dense<'a> {
    /// The slice as one of the built-in types, or `None` for a user-defined [`Element`].
    fn of<T: Element>(x: &'a [T]) -> Option<Self> {
        if is::<T, f32>() {
            Some(Dense::F32(bytemuck::cast_slice(x)))
        } else if is::<T, bf16>() {
            Some(Dense::Bf16(bytemuck::cast_slice(x)))
        } else if is::<T, f16>() {
            Some(Dense::F16(bytemuck::cast_slice(x)))
        } else {
            None
        }
    }
}

/// A dense output of one of the three element types the SIMD kernels handle.
pub(crate) enum DenseMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
}

impl<'a> DenseMut<'a> {
    /// The slice as one of the built-in types, or `Err(out)` for a user-defined [`Element`].
    fn of<T: Element>(out: &'a mut [T]) -> Result<Self, &'a mut [T]> {
        if is::<T, f32>() {
            Ok(DenseMut::F32(bytemuck::cast_slice_mut(out)))
        } else if is::<T, bf16>() {
            Ok(DenseMut::Bf16(bytemuck::cast_slice_mut(out)))
        } else if is::<T, f16>() {
            Ok(DenseMut::F16(bytemuck::cast_slice_mut(out)))
        } else {
            Err(out)
        }
    }
}

/// Everything a dequantization needs besides its output: the whole tensor's codes and absmax,
/// and where the output starts.
#[derive(Clone, Copy)]
pub(crate) struct DequantJob<'a> {
    pub(crate) qt: QuantType,
    pub(crate) packed: &'a [u8],
    pub(crate) absmax: AbsmaxView<'a>,
    pub(crate) bs: usize,
    /// Index of the first output element in the tensor.
    pub(crate) start: usize,
    /// Write with non-temporal stores where the implementation has them (only AVX-512 does).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) streaming: bool,
}

/// The kernels one implementation provides.
///
/// Quantize: `x` starts at a block boundary, `p` holds `ceil(len/2)` bytes and `a`
/// `ceil(len/bs)` values. Dequantize: the job's `packed` and `absmax` are the whole tensor's,
/// `out` receives elements `start .. start + out.len()`. Implementations check these lengths
/// (they are safe functions) and produce exactly the bytes of [`crate::scalar`].
pub(crate) trait Kernel: Copy + Send + Sync {
    fn quantize(self, qt: QuantType, x: Dense<'_>, bs: usize, p: &mut [u8], a: &mut [f32]);
    fn dequantize(self, job: &DequantJob<'_>, out: DenseMut<'_>);
}

/// The oracle as a [`Kernel`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScalarKernel;

impl Kernel for ScalarKernel {
    fn quantize(self, qt: QuantType, x: Dense<'_>, bs: usize, p: &mut [u8], a: &mut [f32]) {
        match x {
            Dense::F32(x) => scalar::quantize_blocks(qt, x, bs, p, a),
            Dense::F16(x) => scalar::quantize_blocks(qt, x, bs, p, a),
            Dense::Bf16(x) => scalar::quantize_blocks(qt, x, bs, p, a),
        }
    }
    fn dequantize(self, j: &DequantJob<'_>, out: DenseMut<'_>) {
        let (qt, p, a, bs, start) = (j.qt, j.packed, j.absmax, j.bs, j.start);
        match out {
            DenseMut::F32(o) => scalar::dequantize_range(qt, p, a, bs, start, o),
            DenseMut::F16(o) => scalar::dequantize_range(qt, p, a, bs, start, o),
            DenseMut::Bf16(o) => scalar::dequantize_range(qt, p, a, bs, start, o),
        }
    }
}

/// Run whole blocks of raw element bytes (`src`: 0 = f32, 1 = f16, 2 = bf16, the SIMD kernels'
/// tags) through the oracle: the SIMD kernels' path for blocks with a tiny absmax
/// ([`qlora_double_quant::fastmath::is_tiny_absmax`]), where flushing subnormal inputs matters.
#[cfg_attr(not(qlora_simd), allow(dead_code))]
pub(crate) fn oracle_blocks(
    qt: QuantType,
    src: u8,
    x: &[u8],
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    match src {
        0 => scalar::quantize_blocks(qt, bytemuck::cast_slice::<u8, f32>(x), bs, packed, absmax),
        1 => scalar::quantize_blocks(qt, bytemuck::cast_slice::<u8, f16>(x), bs, packed, absmax),
        _ => scalar::quantize_blocks(qt, bytemuck::cast_slice::<u8, bf16>(x), bs, packed, absmax),
    }
}

/// [`oracle_blocks`] for one (possibly partial) block; its absmax is not written.
#[cfg_attr(not(qlora_simd), allow(dead_code))]
pub(crate) fn oracle_block(qt: QuantType, src: u8, block: &[u8], bytes: &mut [u8]) {
    let elem_size = if src == 0 { 4 } else { 2 };
    let len = block.len() / elem_size;
    let bs = (len + len % 2).max(2);
    oracle_blocks(qt, src, block, bs, bytes, &mut [0f32]);
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
    match Dense::of(x) {
        Some(dense) => k.quantize(qt, dense, bs, p, a),
        None => scalar::quantize_blocks(qt, x, bs, p, a),
    }
}

/// Dequantize elements `job.start ..` into `out` with kernel `k` (the oracle for a user-defined
/// [`Element`]).
fn dequantize_chunk<K: Kernel, T: Element>(k: K, job: &DequantJob<'_>, out: &mut [T]) {
    match DenseMut::of(out) {
        Ok(dense) => k.dequantize(job, dense),
        Err(out) => {
            scalar::dequantize_range(job.qt, job.packed, job.absmax, job.bs, job.start, out)
        }
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

/// [`drive_quantize`], and the [`MeanScan`] of the absmax values, each task's scanned right after
/// it wrote them (in L1) instead of in a second pass over the whole vector.
pub(crate) fn drive_quantize_scan<K: Kernel, T: Element>(
    k: K,
    qt: QuantType,
    input: &[T],
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> MeanScan {
    if input.len() < PARALLEL_THRESHOLD {
        quantize_chunk(k, qt, input, bs, packed, absmax);
        return MeanScan::of(absmax);
    }
    let bpt = blocks_per_task(bs);
    input
        .par_chunks(bpt * bs)
        .zip(packed.par_chunks_mut(bpt * bs / 2))
        .zip(absmax.par_chunks_mut(bpt))
        .map(|((x, p), a)| {
            quantize_chunk(k, qt, x, bs, p, a);
            MeanScan::of(a)
        })
        .reduce_with(MeanScan::merge)
        .unwrap_or_else(|| MeanScan::of(&[]))
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
    let job = DequantJob {
        qt,
        packed,
        absmax,
        bs,
        start: 0,
        streaming: std::mem::size_of_val(out) >= STREAMING_BYTES,
    };
    if out.len() < PARALLEL_THRESHOLD {
        dequantize_chunk(k, &job, out);
        return;
    }
    let chunk = blocks_per_task(bs) * bs;
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
        let job = DequantJob {
            start: i * chunk,
            ..job
        };
        dequantize_chunk(k, &job, o)
    });
}
