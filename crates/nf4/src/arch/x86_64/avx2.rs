//! AVX2 + F16C kernels.
//!
//! **Dequantize.** Per block the table is scaled by the absmax once (two `vmulps`, the oracle's
//! IEEE product). f32 out: two `vpermps` over the table halves, chosen by bit 3 of the index with
//! `vblendvps`. f16/bf16 out: the scaled table is rounded once (`vcvtps2ph` RNE, or an integer
//! round-to-nearest-even for bf16), split into a low-byte and a high-byte plane, and looked up with
//! two `vpshufb` per 32 outputs. Vectors start at multiples of 32 elements, so each lies inside
//! one block; the unaligned head and the tail go through the scalar oracle.
//!
//! **Quantize.** absmax by `vmaxps(|x|, acc)` (NaN ignored), `xn = x * (1/absmax)`, NF4 code by
//! counting the 15 thresholds strictly exceeded (`_CMP_GT_OQ`), FP4 by the sign test and counting
//! the 7 magnitude thresholds; the zero-padded last vector of a partial block goes through a stack
//! buffer. Blocks go in groups of 2048 elements: the absmax of the next group is reduced (and its
//! reciprocal table entries prefetched) before this group is encoded, and the input two groups
//! ahead is prefetched into L2 while it is.

use crate::kernel::{self, Dense, DenseMut, DequantJob, Kernel as KernelTrait};
use crate::{codebook, scalar, AbsmaxView, Element, QuantType};
use core::arch::x86_64::*;
use half::{bf16, f16};
use qlora_double_quant::{fastmath, Implementation};

const SRC_F32: u8 = 0;
const SRC_F16: u8 = 1;
const SRC_BF16: u8 = 2;
const OUT_F32: u8 = 0;
const OUT_F16: u8 = 1;
const OUT_BF16: u8 = 2;

/// The AVX2 kernels; a value exists only on a CPU with AVX2 and F16C.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Avx2`] (AVX2, FMA, F16C; these kernels use AVX2 and F16C).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Avx2.is_available().then_some(Kernel {
            _features_detected: (),
        })
    }

    fn quantize<const SRC: u8>(
        self,
        qt: QuantType,
        x: &[u8],
        elem_size: usize,
        bs: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        let n = x.len() / elem_size;
        assert!(bs >= 8 && bs.is_multiple_of(8), "block size {bs}");
        assert_eq!(packed.len(), n.div_ceil(2), "packed length");
        assert_eq!(absmax.len(), n.div_ceil(bs), "absmax length");
        // SAFETY: `self` exists only after AVX2 and F16C were detected (`new`); the lengths the
        // kernel's pointer accesses rely on were asserted above.
        unsafe {
            match qt {
                QuantType::Nf4 => quantize_blocks::<SRC, true>(x, elem_size, bs, packed, absmax),
                QuantType::Fp4 => quantize_blocks::<SRC, false>(x, elem_size, bs, packed, absmax),
            }
        }
    }

    fn dequantize<T: Element, const OUT: u8>(self, job: &DequantJob<'_>, out: &mut [T]) {
        let (qt, packed, absmax, bs, start) = (job.qt, job.packed, job.absmax, job.bs, job.start);
        assert!(
            bs >= 32 && bs.is_power_of_two(),
            "block size {bs} must be a power of two ≥ 32"
        );
        assert!(
            start
                .checked_add(out.len())
                .is_some_and(|end| end <= 2 * packed.len()),
            "range outside the packed codes"
        );
        let head = ((32 - start % 32) % 32).min(out.len());
        let (head_out, rest) = out.split_at_mut(head);
        let groups = rest.len() / 32;
        let (mid, tail) = rest.split_at_mut(groups * 32);
        scalar::dequantize_range(qt, packed, absmax, bs, start, head_out);
        if groups > 0 {
            // SAFETY: AVX2 and F16C were detected (`new`). `mid` holds `groups·32` elements of
            // `T` (`32·size_of::<T>()` bytes per group); elements `start+head ..` up to
            // `2·packed.len()` (asserted) have their bytes in `packed`; `bs` is a power of two
            // ≥ 32 (asserted), so a group of 32 starting at a multiple of 32 lies in one block.
            unsafe {
                dequantize_groups::<OUT>(
                    qt.table(),
                    packed,
                    absmax,
                    bs,
                    start + head,
                    groups,
                    mid.as_mut_ptr().cast(),
                )
            }
        }
        scalar::dequantize_range(qt, packed, absmax, bs, start + head + groups * 32, tail);
    }
}

impl KernelTrait for Kernel {
    fn quantize(self, qt: QuantType, x: Dense<'_>, bs: usize, p: &mut [u8], a: &mut [f32]) {
        match x {
            Dense::F32(x) => self.quantize::<SRC_F32>(qt, bytemuck::cast_slice(x), 4, bs, p, a),
            Dense::F16(x) => self.quantize::<SRC_F16>(qt, bytemuck::cast_slice(x), 2, bs, p, a),
            Dense::Bf16(x) => self.quantize::<SRC_BF16>(qt, bytemuck::cast_slice(x), 2, bs, p, a),
        }
    }
    fn dequantize(self, job: &DequantJob<'_>, out: DenseMut<'_>) {
        match out {
            DenseMut::F32(o) => self.dequantize::<f32, OUT_F32>(job, o),
            DenseMut::F16(o) => self.dequantize::<f16, OUT_F16>(job, o),
            DenseMut::Bf16(o) => self.dequantize::<bf16, OUT_BF16>(job, o),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantize

/// Load 8 elements as f32 (exact widening).
///
/// # Safety
/// AVX2 and F16C must be available and 8 elements readable at `p`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8<const SRC: u8>(p: *const u8) -> __m256 {
    match SRC {
        // SAFETY: 32 bytes readable at `p` (caller).
        SRC_F32 => unsafe { _mm256_loadu_ps(p.cast()) },
        // SAFETY: 16 bytes readable at `p` (caller).
        SRC_F16 => _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) }),
        _ => {
            // SAFETY: 16 bytes readable at `p` (caller).
            let h = unsafe { _mm_loadu_si128(p.cast()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn abs8(x: __m256) -> __m256 {
    _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
}

/// Largest lane of non-negative, non-NaN values (order-independent).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn hmax8(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// Codes of 8 values `x · inv` (one per dword; `inv` the block's `rcp_approx_ftz(absmax)`, absmax
/// not tiny). FP4's sign follows the CUDA build's flush-to-zero: set only when `x` and the product
/// are both at most `−f32::MIN_POSITIVE`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn encode8<const NF4: bool>(x: __m256, inv: __m256) -> __m256i {
    let xn = _mm256_mul_ps(x, inv);
    let mut count = _mm256_setzero_si256();
    if NF4 {
        for t in codebook::NF4_THRESHOLDS {
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(xn, _mm256_set1_ps(t));
            count = _mm256_sub_epi32(count, _mm256_castps_si256(gt));
        }
        count
    } else {
        let m = abs8(xn);
        for t in codebook::FP4_THRESHOLDS {
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_set1_ps(t));
            count = _mm256_sub_epi32(count, _mm256_castps_si256(gt));
        }
        let patterns = _mm256_setr_epi32(0, 1, 6, 7, 4, 5, 2, 3);
        let pattern = _mm256_permutevar8x32_epi32(patterns, count);
        let neg_min = _mm256_set1_ps(-f32::MIN_POSITIVE);
        let negative = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_LE_OQ>(xn, neg_min),
            _mm256_cmp_ps::<_CMP_LE_OQ>(x, neg_min),
        );
        let sign = _mm256_and_si256(_mm256_castps_si256(negative), _mm256_set1_epi32(8));
        _mm256_or_si256(pattern, sign)
    }
}

/// 8 codes (one per dword) → 4 bytes, the even element in the high nibble.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn pack8(code: __m256i) -> [u8; 4] {
    let pairs = _mm256_or_si256(_mm256_slli_epi64::<4>(code), _mm256_srli_epi64::<32>(code));
    let gather = _mm256_setr_epi8(
        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1,
    );
    let s = _mm256_shuffle_epi8(pairs, gather);
    let both = _mm_unpacklo_epi16(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    _mm_cvtsi128_si32(both).to_le_bytes()
}

/// Quantize whole blocks, in groups of about 2048 elements: pass 1 of the next group (every
/// absmax, and a prefetch of each block's reciprocal table entry) runs before pass 2 of this one
/// (the codes), so that the table loads arrive while this group is encoded.
///
/// # Safety
/// AVX2 and F16C must be available; `x` holds `n` elements of `elem_size` bytes, `packed`
/// `ceil(n/2)` bytes, `absmax` `ceil(n/bs)` values, and `bs` is a positive multiple of 8.
#[target_feature(enable = "avx2,f16c")]
unsafe fn quantize_blocks<const SRC: u8, const NF4: bool>(
    x: &[u8],
    elem_size: usize,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    let n = x.len() / elem_size;
    let nblocks = absmax.len();
    let group = (2048 / bs).max(1);
    let block = |b: usize| &x[b * bs * elem_size..(b * bs + bs.min(n - b * bs)) * elem_size];
    let pass1 = |g0: usize, g1: usize, absmax: &mut [f32]| {
        for (b, am) in (g0..g1).zip(&mut absmax[g0..g1]) {
            // SAFETY: the caller's contract (features, whole elements) holds for this block.
            *am = fastmath::ftz_absmax(unsafe { block_absmax8::<SRC>(block(b), elem_size) });
            fastmath::prefetch_rcp_approx_ftz(*am);
        }
    };
    pass1(0, group.min(nblocks), absmax);
    let mut g0 = 0;
    while g0 < nblocks {
        let g1 = (g0 + group).min(nblocks);
        pass1(g1, (g1 + group).min(nblocks), absmax);
        for (b, &a) in (g0..g1).zip(&absmax[g0..g1]) {
            // The input two groups ahead (8 KiB of f16/bf16, 16 KiB of f32 at block sizes up to
            // 2048) into L2, one block per block: hardware prefetchers stop at 4 KiB pages.
            let ahead = x.as_ptr().wrapping_add((b + 2 * group) * bs * elem_size);
            for off in (0..bs * elem_size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(off).cast());
            }
            let (block, s) = (block(b), b * bs);
            let bytes = &mut packed[s / 2..s / 2 + (block.len() / elem_size).div_ceil(2)];
            if fastmath::is_tiny_absmax(a) {
                kernel::oracle_block(QuantType::of_nf4(NF4), SRC, block, bytes);
            } else {
                // SAFETY: the caller's contract (features, whole elements); `bytes` holds one
                // byte per two elements of `block`.
                unsafe { encode_block8::<SRC, NF4>(block, elem_size, a, bytes) };
            }
        }
        g0 = g1;
    }
}

/// The largest |x| of one block (NaN ignored), the zero-padded partial vector included.
///
/// # Safety
/// AVX2 and F16C must be available; `block` holds whole elements of `elem_size` bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_absmax8<const SRC: u8>(block: &[u8], elem_size: usize) -> f32 {
    let len = block.len() / elem_size;
    let (full, rem) = (len / 8, len % 8);
    let mut tail = [0u8; 32];
    tail[..rem * elem_size].copy_from_slice(&block[full * 8 * elem_size..]);
    let mut acc = _mm256_setzero_ps();
    for v in 0..full {
        // SAFETY: vector `v` lies inside `block` (v < len/8).
        let xv = unsafe { load8::<SRC>(block.as_ptr().add(v * 8 * elem_size)) };
        acc = _mm256_max_ps(abs8(xv), acc);
    }
    if rem > 0 {
        // SAFETY: `tail` holds 32 bytes, ≥ 8 elements.
        let xv = unsafe { load8::<SRC>(tail.as_ptr()) };
        acc = _mm256_max_ps(abs8(xv), acc);
    }
    hmax8(acc)
}

/// The codes of one block with absmax `a` (not tiny) into `bytes` (`ceil(len/2)` bytes).
///
/// # Safety
/// AVX2 and F16C must be available; `block` holds whole elements of `elem_size` bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn encode_block8<const SRC: u8, const NF4: bool>(
    block: &[u8],
    elem_size: usize,
    a: f32,
    bytes: &mut [u8],
) {
    let len = block.len() / elem_size;
    let (full, rem) = (len / 8, len % 8);
    let inv = _mm256_set1_ps(fastmath::rcp_approx_ftz(a));
    for v in 0..full {
        // SAFETY: vector `v` lies inside `block`.
        let xv = unsafe { load8::<SRC>(block.as_ptr().add(v * 8 * elem_size)) };
        let four = pack8(encode8::<NF4>(xv, inv));
        bytes[4 * v..4 * v + 4].copy_from_slice(&four);
    }
    if rem > 0 {
        let mut tail = [0u8; 32];
        tail[..rem * elem_size].copy_from_slice(&block[full * 8 * elem_size..]);
        // SAFETY: `tail` holds 32 bytes, ≥ 8 elements.
        let xv = unsafe { load8::<SRC>(tail.as_ptr()) };
        let four = pack8(encode8::<NF4>(xv, inv));
        bytes[4 * full..].copy_from_slice(&four[..rem.div_ceil(2)]);
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize

/// bf16 bits (low half of each dword) of 8 f32, exactly `half::bf16::from_f32`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) fn bf16_rne8(x: __m256i) -> __m256i {
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
    let rounded = _mm256_srli_epi32::<16>(biased);
    let magnitude = _mm256_and_si256(x, _mm256_set1_epi32(0x7fff_ffff));
    let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f80_0000));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

/// Split 16 u16 (two vectors of 8) into a low-byte and a high-byte plane of 16 bytes, each
/// broadcast to both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn byte_planes(h0: __m128i, h1: __m128i) -> (__m256i, __m256i) {
    let even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    let odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    let lo = _mm_unpacklo_epi64(_mm_shuffle_epi8(h0, even), _mm_shuffle_epi8(h1, even));
    let hi = _mm_unpacklo_epi64(_mm_shuffle_epi8(h0, odd), _mm_shuffle_epi8(h1, odd));
    (
        _mm256_broadcastsi128_si256(lo),
        _mm256_broadcastsi128_si256(hi),
    )
}

/// The block's table: two f32 halves (f32 out) or the two byte planes of the 16-bit values.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn scaled_tables<const OUT: u8>(
    table: &[f32; 16],
    lo: __m256,
    hi: __m256,
    absmax: f32,
) -> (__m256i, __m256i) {
    let (s0, s1) = if fastmath::is_plain_scale(absmax) {
        let a = _mm256_set1_ps(absmax);
        (_mm256_mul_ps(lo, a), _mm256_mul_ps(hi, a))
    } else {
        // NaN, infinite or tiny scale: the CUDA build's products (ftz, CUDA's NaN).
        let t = table.map(|v| fastmath::mul_ftz(v, absmax));
        // SAFETY: `t` holds 16 f32.
        unsafe {
            (
                _mm256_loadu_ps(t.as_ptr()),
                _mm256_loadu_ps(t.as_ptr().add(8)),
            )
        }
    };
    match OUT {
        OUT_F32 => (_mm256_castps_si256(s0), _mm256_castps_si256(s1)),
        OUT_F16 => {
            // Bits 1:0 = 0: round to nearest even; bit 2 = 0: the immediate overrides MXCSR.
            const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;
            byte_planes(_mm256_cvtps_ph::<RNE>(s0), _mm256_cvtps_ph::<RNE>(s1))
        }
        _ => {
            let r0 = bf16_rne8(_mm256_castps_si256(s0));
            let r1 = bf16_rne8(_mm256_castps_si256(s1));
            // packus works per 128-bit lane: [r0 0..4, r1 0..4, r0 4..8, r1 4..8] → reorder.
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(r0, r1));
            byte_planes(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p))
        }
    }
}

/// Dequantize `groups` groups of 32 elements starting at element `j0` into `dst`.
///
/// # Safety
/// AVX2 and F16C must be available; `j0` is a multiple of 32; `dst` has room for `32·groups`
/// output elements; `2·packed.len() ≥ j0 + 32·groups`; `bs` is a power of two ≥ 32.
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequantize_groups<const OUT: u8>(
    table: &[f32; 16],
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    bs: usize,
    j0: usize,
    groups: usize,
    dst: *mut u8,
) {
    // SAFETY: `table` holds 16 f32.
    let (tab_lo, tab_hi) = unsafe {
        (
            _mm256_loadu_ps(table.as_ptr()),
            _mm256_loadu_ps(table.as_ptr().add(8)),
        )
    };
    let shift = bs.trailing_zeros();
    let mut current = usize::MAX;
    let mut t = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let nibble = _mm_set1_epi8(0x0f);
    for g in 0..groups {
        let j = j0 + 32 * g;
        let block = j >> shift;
        if block != current {
            t = scaled_tables::<OUT>(table, tab_lo, tab_hi, absmax.get(block));
            current = block;
        }
        // SAFETY: the 16 bytes of elements j .. j+32 are inside `packed` (caller).
        let bytes = unsafe { _mm_loadu_si128(packed.as_ptr().add(j >> 1).cast()) };
        if OUT == OUT_F32 {
            let (t0, t1) = (_mm256_castsi256_ps(t.0), _mm256_castsi256_ps(t.1));
            let quads = [
                bytes,
                _mm_srli_si128::<4>(bytes),
                _mm_srli_si128::<8>(bytes),
                _mm_srli_si128::<12>(bytes),
            ];
            for (q, four) in quads.into_iter().enumerate() {
                let v = _mm256_cvtepu8_epi64(four);
                let idx = _mm256_or_si256(_mm256_srli_epi64::<4>(v), _mm256_slli_epi64::<32>(v));
                let r0 = _mm256_permutevar8x32_ps(t0, idx);
                let r1 = _mm256_permutevar8x32_ps(t1, idx);
                let upper = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
                let r = _mm256_blendv_ps(r0, r1, upper);
                // SAFETY: elements 32g + 8q .. +8 of `dst` are writable (caller).
                unsafe { _mm256_storeu_ps(dst.cast::<f32>().add(32 * g + 8 * q), r) };
            }
        } else {
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble);
            let lo = _mm_and_si128(bytes, nibble);
            let idx = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
            let rl = _mm256_shuffle_epi8(t.0, idx);
            let rh = _mm256_shuffle_epi8(t.1, idx);
            let w0 = _mm256_unpacklo_epi8(rl, rh);
            let w1 = _mm256_unpackhi_epi8(rl, rh);
            let first = _mm256_permute2x128_si256::<0x20>(w0, w1);
            let second = _mm256_permute2x128_si256::<0x31>(w0, w1);
            // SAFETY: elements 32g .. 32g+32 (64 bytes) of `dst` are writable (caller).
            unsafe {
                let d = dst.cast::<u16>().add(32 * g);
                _mm256_storeu_si256(d.cast(), first);
                _mm256_storeu_si256(d.add(16).cast(), second);
            }
        }
    }
}
