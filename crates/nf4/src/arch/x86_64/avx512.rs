//! AVX-512 (F + BW) kernels.
//!
//! **Dequantize.** Per block, the 16-entry table is multiplied by the block's absmax once
//! (`vmulps`: the same IEEE product as the oracle's per-element `table[code] * absmax`) and
//! converted to the output type — `vcvtps2ph` with round-to-nearest-even for f16, and an integer
//! round-to-nearest-even for bf16 (`vcvtneps2bf16` flushes subnormal results to zero, which
//! `half::bf16::from_f32` does not). Each 64-byte output vector is then one `vpermd` (16 f32) or
//! one `vpermw` (32 f16/bf16; the table is duplicated into both halves so the 5-bit index needs no
//! masking) of nibble indices. Output vectors are 64-byte aligned, written with streaming stores
//! for large outputs; a vector that straddles two blocks blends the lookups of both tables. A
//! double-quantized absmax is reconstructed per block inside the loop.
//!
//! **Quantize.** absmax by `vmaxps(|x|, acc)`, which returns its second operand when the first is
//! NaN (NaN ignored, like `f32::max`); for f16/bf16 by `vpmaxuw` over the sign-cleared bit
//! patterns (32 per instruction, the same order as the magnitudes), redone in f32 when a NaN
//! pattern shows up. `xn = x · inv` (`vmulps`) with `inv` the GPU's reciprocal of absmax
//! ([`fastmath::rcp_approx_ftz`]: the IEEE quotient `1/absmax` — one `vdivps` for 16 blocks of
//! 64 or 128 — moved by the measured table's correction, one scalar lookup per block). Codes by
//! bucket ([`Search`]): the exact floor of
//! `xn·scale + offset` (an FMA rounded toward −∞, truncated) picks one of 32 buckets (16 for FP4
//! magnitudes), narrower than the gap between two thresholds; two permutes fetch the count of
//! thresholds below the bucket and the one threshold inside it, and one `vcmpps` `_CMP_GT_OQ`
//! adds it when `xn` strictly exceeds it — the count of thresholds strictly exceeded, as the
//! oracle's tree (NaN: bucket 0, code 0). 64 codes are packed at once
//! (`vpackusdw`/`vpackuswb`, `vpmaddubsw` with `[16, 1]` to join the nibble pairs, one `vpermw`
//! to restore element order — which also absorbs the lane order of the bf16 widening by
//! `vpunpck{l,h}wd` against zero); partial groups use `vpmovqb`. Blocks of 64 and 128 elements go
//! 16 at a time: pass 1 reduces their 16 maxima together (a transposing tree), pass 2 encodes
//! them with no per-block work but a broadcast of the reciprocal; a group without NaN or infinity
//! takes the bucket with no conversion (its index read from the FMA's low mantissa bits) — for
//! FP4, if no input or product can be subnormal, buckets of the signed value that give the sign
//! too — and the input about 12 KiB ahead is prefetched into L2 while a group is encoded.

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

/// The AVX-512 kernels; a value exists only on a CPU with AVX-512 F and BW.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Avx512`] (AVX-512 F, BW, DQ, VL; these kernels use F and BW).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Avx512.is_available().then_some(Kernel {
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
        assert!(bs >= 16 && bs.is_multiple_of(16), "block size {bs}");
        assert_eq!(packed.len(), n.div_ceil(2), "packed length");
        assert_eq!(absmax.len(), n.div_ceil(bs), "absmax length");
        // SAFETY: `self` exists only after AVX-512 F and BW were detected (`new`); the lengths the
        // kernel's pointer accesses rely on were asserted above.
        unsafe {
            match qt {
                QuantType::Nf4 => quantize_blocks::<SRC, true>(x, elem_size, bs, packed, absmax),
                QuantType::Fp4 => quantize_blocks::<SRC, false>(x, elem_size, bs, packed, absmax),
            }
        }
    }

    fn dequantize<T: Element, const OUT: u8>(self, job: &DequantJob<'_>, out: &mut [T]) {
        let (qt, packed, absmax, bs) = (job.qt, job.packed, job.absmax, job.bs);
        let (start, streaming) = (job.start, job.streaming);
        assert!(bs >= 32 && bs.is_multiple_of(32), "block size {bs}");
        assert!(
            start
                .checked_add(out.len())
                .is_some_and(|end| end <= 2 * packed.len()),
            "range outside the packed codes"
        );
        let per_vec = 64 / std::mem::size_of::<T>();
        let head = out.as_ptr().align_offset(64).min(out.len());
        let (head_out, rest) = out.split_at_mut(head);
        let nvec = rest.len() / per_vec;
        let (mid, tail) = rest.split_at_mut(nvec * per_vec);
        scalar::dequantize_range(qt, packed, absmax, bs, start, head_out);
        if nvec > 0 {
            let j0 = start + head;
            let dst = mid.as_mut_ptr().cast::<u8>();
            debug_assert_eq!(dst as usize % 64, 0);
            // SAFETY: AVX-512 F and BW were detected (`new`). `dst` is 64-byte aligned
            // (`align_offset`) and `mid` holds `nvec` vectors of 64 bytes. Elements
            // `j0 .. j0 + nvec·per_vec` lie inside `2·packed.len()` (asserted), so every packed
            // byte read is in bounds; blocks ≥ 32 elements (asserted) mean a vector touches at most
            // two blocks; absmax values are read through the bounds-checked view.
            unsafe {
                if j0 & 1 == 0 {
                    dequantize_vectors::<OUT, false>(
                        qt.table(),
                        packed,
                        absmax,
                        bs,
                        j0,
                        nvec,
                        dst,
                        streaming,
                    )
                } else {
                    dequantize_vectors::<OUT, true>(
                        qt.table(),
                        packed,
                        absmax,
                        bs,
                        j0,
                        nvec,
                        dst,
                        streaming,
                    )
                }
            }
        }
        let tail_start = start + head + nvec * per_vec;
        scalar::dequantize_range(qt, packed, absmax, bs, tail_start, tail);
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

/// Load 16 elements as f32 (exact widening).
///
/// # Safety
/// AVX-512 F and BW must be available and 16 elements (`16·size` bytes) readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load16<const SRC: u8>(p: *const u8) -> __m512 {
    match SRC {
        // SAFETY: 64 bytes readable at `p` (caller).
        SRC_F32 => unsafe { _mm512_loadu_ps(p.cast()) },
        // SAFETY: 32 bytes readable at `p` (caller).
        SRC_F16 => _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) }),
        _ => {
            // SAFETY: 32 bytes readable at `p` (caller).
            let h = unsafe { _mm256_loadu_si256(p.cast()) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// Scale and offset of the NF4 buckets: bucket `k` holds the `xn` with `⌊xn·15.5 + 16⌋ = k`,
/// 32 buckets of width 1/15.5 ≈ 0.065 over `[-1.032, 1.032)`. (Integer offsets, so that
/// `offset + 2^23` is a float too: see [`Search::bucket`].)
const NF4_SCALE: f32 = 15.5;
const NF4_OFFSET: f32 = 16.0;
/// The same for FP4 magnitudes: `⌊|xn|·15⌋`, 16 buckets of width 1/15 over `[0, 1.067)`.
const FP4_SCALE: f32 = 15.0;
const FP4_OFFSET: f32 = 0.0;

/// Bucket of a threshold: `⌊t·scale + offset⌋`, exact in f64 (24 + 5 significant bits; the sum
/// spans less than 53 bits) and truncated as a non-negative value.
const fn bucket_of(t: f32, scale: f32, offset: f32) -> usize {
    let v = t as f64 * scale as f64 + offset as f64;
    assert!(v >= 0.0 && v < 32.0);
    v as usize
}

/// The bucket tables of `thresholds` (sorted): per bucket the count of thresholds in lower
/// buckets, and the one threshold inside the bucket (+∞ when there is none). Fails to compile if
/// a bucket would hold two thresholds.
const fn bucket_tables<const N: usize>(
    thresholds: &[f32; N],
    scale: f32,
    offset: f32,
) -> ([i32; 32], [f32; 32]) {
    let mut below = [0i32; 32];
    let mut inside = [f32::INFINITY; 32];
    let mut i = 0;
    while i < N {
        let k = bucket_of(thresholds[i], scale, offset);
        assert!(i == 0 || bucket_of(thresholds[i - 1], scale, offset) < k);
        inside[k] = thresholds[i];
        let mut j = k + 1;
        while j < 32 {
            below[j] += 1;
            j += 1;
        }
        i += 1;
    }
    (below, inside)
}

const NF4_BUCKETS: ([i32; 32], [f32; 32]) =
    bucket_tables(&codebook::NF4_THRESHOLDS, NF4_SCALE, NF4_OFFSET);
const FP4_BUCKETS: ([i32; 32], [f32; 32]) =
    bucket_tables(&codebook::FP4_THRESHOLDS, FP4_SCALE, FP4_OFFSET);
/// FP4 magnitude level (count of thresholds exceeded) → 3-bit pattern (the tree of `dQuantizeFP4`).
const FP4_PATTERNS: [i32; 8] = [0, 1, 6, 7, 4, 5, 2, 3];

/// The offset of [`FP4_SIGNED`]'s buckets (scale [`FP4_SCALE`]).
const FP4_SIGNED_OFFSET: f32 = 16.0;

/// FP4 on signed `xn` (for groups where flush-to-zero cannot matter, see [`Group::Clean`]): 32
/// buckets `⌊xn·15 + 16⌋` over `[-1.067, 1.067)`; buckets 16–31 are the magnitude buckets of
/// `xn ≥ 0` (−0.0 included), buckets 15 down to 0 those of `xn < 0` (magnitude intervals open
/// at the bottom instead of the top, which changes nothing: no threshold times 15 is an integer).
/// Per bucket: the code when the compare `xn > inside` fails and when it holds, and `inside`. On
/// the negative side the threshold `t` becomes the float just below `−t`, so that the compare
/// holds exactly when `−xn > t` does not: the lower level.
const FP4_SIGNED: ([i32; 32], [i32; 32], [f32; 32]) = {
    assert!(FP4_SIGNED_OFFSET == 16.0 && FP4_OFFSET == 0.0);
    let (below, inside) = &FP4_BUCKETS;
    let (mut fails, mut holds, mut thr) = ([0i32; 32], [0i32; 32], [0f32; 32]);
    let mut j = 0;
    while j < 16 {
        let (lower, higher) = (
            FP4_PATTERNS[below[j] as usize],
            FP4_PATTERNS[if below[j] < 7 { below[j] + 1 } else { 7 } as usize],
        );
        let t = inside[j];
        if t.is_finite() {
            let scaled = t as f64 * FP4_SCALE as f64;
            assert!(scaled != (scaled as i64) as f64);
        }
        (fails[16 + j], holds[16 + j], thr[16 + j]) = (lower, higher, t);
        let k = 15 - j;
        if t.is_finite() {
            (fails[k], holds[k]) = (8 | higher, 8 | lower);
            thr[k] = f32::from_bits((-t).to_bits() + 1);
        } else {
            (fails[k], holds[k], thr[k]) = (8 | lower, 8 | lower, f32::NEG_INFINITY);
        }
        j += 1;
    }
    (fails, holds, thr)
};

/// The bucket search in registers.
///
/// With at most one threshold per bucket, the code of `xn` is the count of thresholds below its
/// bucket plus one if `xn` strictly exceeds the threshold inside it — the count of thresholds
/// `xn` strictly exceeds, the oracle's tree. The bucket is computed exactly: the FMA
/// `xn·scale + offset` rounded toward −∞ (embedded rounding) and truncated is the floor of the
/// exact value (the floor is representable, so rounding down cannot pass below it); every finite
/// `|xn| < 1.032` lands in a bucket (`|x| ≤ absmax`, and the GPU's reciprocal is within an ulp).
/// NaN converts to `0x8000_0000`, bucket 0, whose code is 0 and whose compare fails: code 0.
#[derive(Clone, Copy)]
struct Search {
    scale: __m512,
    offset: __m512,
    /// `offset + 2^23` (exact: the offsets are small integers).
    offset_2p23: __m512,
    /// NF4: count of thresholds below buckets 0–15 and 16–31. FP4: pattern of the lower and of
    /// the higher level of buckets 0–15.
    low: __m512i,
    high: __m512i,
    /// The threshold inside buckets 0–15 and 16–31 (FP4: 0–15 only).
    inside_low: __m512,
    inside_high: __m512,
    /// FP4 only: the tables of [`FP4_SIGNED`], buckets 0–15 and 16–31 each.
    signed_fails: [__m512i; 2],
    signed_holds: [__m512i; 2],
    signed_inside: [__m512; 2],
}

impl Search {
    /// The tables for `NF4` (15 thresholds, 32 buckets) or FP4 (7 magnitude thresholds, 16).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn new<const NF4: bool>() -> Self {
        let half = |t: &[i32], h: usize| {
            // SAFETY: `t` holds at least 16·(h + 1) i32.
            unsafe { _mm512_loadu_si512(t[16 * h..16 * h + 16].as_ptr().cast()) }
        };
        let halfps = |t: &[f32], h: usize| {
            // SAFETY: `t` holds at least 16·(h + 1) f32.
            unsafe { _mm512_loadu_ps(t[16 * h..16 * h + 16].as_ptr()) }
        };
        if NF4 {
            let (below, inside) = &NF4_BUCKETS;
            Search {
                scale: _mm512_set1_ps(NF4_SCALE),
                offset: _mm512_set1_ps(NF4_OFFSET),
                offset_2p23: _mm512_set1_ps(NF4_OFFSET + 8_388_608.0),
                low: half(below, 0),
                high: half(below, 1),
                inside_low: halfps(inside, 0),
                inside_high: halfps(inside, 1),
                signed_fails: [_mm512_setzero_si512(); 2],
                signed_holds: [_mm512_setzero_si512(); 2],
                signed_inside: [_mm512_setzero_ps(); 2],
            }
        } else {
            let (below, inside) = &FP4_BUCKETS;
            let lower: [i32; 16] = core::array::from_fn(|k| FP4_PATTERNS[below[k] as usize]);
            let higher: [i32; 16] =
                core::array::from_fn(|k| FP4_PATTERNS[(below[k] as usize + 1).min(7)]);
            Search {
                scale: _mm512_set1_ps(FP4_SCALE),
                offset: _mm512_set1_ps(FP4_OFFSET),
                offset_2p23: _mm512_set1_ps(FP4_OFFSET + 8_388_608.0),
                low: half(&lower, 0),
                high: half(&higher, 0),
                inside_low: halfps(inside, 0),
                inside_high: halfps(inside, 1),
                signed_fails: [half(&FP4_SIGNED.0, 0), half(&FP4_SIGNED.0, 1)],
                signed_holds: [half(&FP4_SIGNED.1, 0), half(&FP4_SIGNED.1, 1)],
                signed_inside: [halfps(&FP4_SIGNED.2, 0), halfps(&FP4_SIGNED.2, 1)],
            }
        }
    }

    /// The bucket of each lane of `v`, in the low bits.
    ///
    /// `CLEAN` (no lane is NaN): the FMA adds `2^23` to the offset, so that the result rounded
    /// down lies in `[2^23, 2^24)`, where the floats are the integers: its low mantissa bits are
    /// the bucket, with no conversion. Otherwise a truncation converts, and NaN becomes
    /// `0x8000_0000`: bucket 0.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn bucket<const CLEAN: bool>(&self, v: __m512) -> __m512i {
        const RD: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
        if CLEAN {
            _mm512_castps_si512(_mm512_fmadd_round_ps::<RD>(v, self.scale, self.offset_2p23))
        } else {
            _mm512_cvttps_epi32(_mm512_fmadd_round_ps::<RD>(v, self.scale, self.offset))
        }
    }
}

/// NF4 codes: the number of the 15 thresholds `xn` strictly exceeds (NaN: 0), by bucket.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn encode_nf4<const CLEAN: bool>(xn: __m512, s: &Search) -> __m512i {
    let k = s.bucket::<CLEAN>(xn);
    let below = _mm512_permutex2var_epi32(s.low, k, s.high);
    let inside = _mm512_permutex2var_ps(s.inside_low, k, s.inside_high);
    let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xn, inside);
    _mm512_mask_add_epi32(below, gt, below, _mm512_set1_epi32(1))
}

/// FP4 codes: sign bit from `ftz(ftz(x) · inv) < 0`, magnitude pattern from the count of the 7
/// magnitude thresholds `|xn|` strictly exceeds (the tree of `dQuantizeFP4`), by bucket.
///
/// The CUDA build flushes subnormal inputs and products to zero, so the sign is set only when both
/// `x` and `xn` are at most `−f32::MIN_POSITIVE`. (The magnitude needs no flush: in blocks whose
/// absmax is not tiny, a subnormal `x` or `xn` is far below the smallest threshold.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn encode_fp4(x: __m512, xn: __m512, s: &Search) -> __m512i {
    let neg_min = _mm512_set1_ps(-f32::MIN_POSITIVE);
    let negative = _mm512_mask_cmp_ps_mask::<_CMP_LE_OQ>(
        _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, neg_min),
        xn,
        neg_min,
    );
    let m = _mm512_abs_ps(xn);
    let k = s.bucket::<false>(m);
    let inside = _mm512_permutexvar_ps(k, s.inside_low);
    let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, inside);
    let pattern = _mm512_mask_permutexvar_epi32(_mm512_permutexvar_epi32(k, s.low), gt, k, s.high);
    _mm512_mask_or_epi32(pattern, negative, pattern, _mm512_set1_epi32(8))
}

/// FP4 codes of signed `xn` by [`FP4_SIGNED`] (7 instructions instead of 10), for lanes where
/// the sign is that of `xn` and flush-to-zero changes nothing: `x` is zero or at least 2^-98 in
/// magnitude, and `xn` zero or normal ([`Group::Clean`]). Not NaN.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn encode_fp4_signed(xn: __m512, s: &Search) -> __m512i {
    const RD: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    let k = _mm512_castps_si512(_mm512_fmadd_round_ps::<RD>(
        xn,
        s.scale,
        _mm512_set1_ps(8_388_608.0 + FP4_SIGNED_OFFSET),
    ));
    let inside = _mm512_permutex2var_ps(s.signed_inside[0], k, s.signed_inside[1]);
    let holds = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xn, inside);
    _mm512_mask_blend_epi32(
        holds,
        _mm512_permutex2var_epi32(s.signed_fails[0], k, s.signed_fails[1]),
        _mm512_permutex2var_epi32(s.signed_holds[0], k, s.signed_holds[1]),
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
/// Codes of `x · inv` (`inv` the block's `rcp_approx_ftz(absmax)`, absmax not tiny). `CLEAN`:
/// the lanes are those of a [`Group::Clean`] (see [`Search::bucket`], [`encode_fp4_signed`]).
fn encode<const NF4: bool, const CLEAN: bool>(x: __m512, inv: __m512, s: &Search) -> __m512i {
    let xn = _mm512_mul_ps(x, inv);
    if NF4 {
        encode_nf4::<CLEAN>(xn, s)
    } else if CLEAN {
        encode_fp4_signed(xn, s)
    } else {
        encode_fp4(x, xn, s)
    }
}

/// 16 codes (one per dword) → 8 bytes, the even element in the high nibble.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack16(code: __m512i) -> __m128i {
    let pairs = _mm512_or_si512(_mm512_slli_epi64::<4>(code), _mm512_srli_epi64::<32>(code));
    _mm512_cvtepi64_epi8(pairs)
}

/// Where the 64 elements of one [`load64`] go: lane `i` of vector `k` holds element
/// `ELEMENT[SRC][k][i]` of the 64.
///
/// f32 and f16 load 16 consecutive elements per vector. bf16 widens 32 elements at a time with
/// `vpunpcklwd`/`vpunpckhwd` against zero (one instruction per 16 instead of two), which takes
/// words 0–3 (low) or 4–7 (high) of each 128-bit lane.
const fn element_of(bf16_order: bool, k: usize, i: usize) -> usize {
    if bf16_order {
        let (l, m) = (i / 4, i % 4);
        32 * (k / 2) + 8 * l + 4 * (k % 2) + m
    } else {
        16 * k + i
    }
}

/// `vpermw` indices that put the 32 packed bytes of a [`pack64`] in element order.
///
/// `vpackusdw` + `vpackuswb` of the four code vectors leave byte `16l + 4k + m` = lane `4l + m`
/// of vector `k`; `vpmaddubsw` with `[16, 1]` joins bytes `2j, 2j + 1` (lanes `m`, `m + 1`: two
/// consecutive elements, the even one first) into word `j`. Word `8l + 2k + m/2` therefore holds
/// the byte of element pair `element_of(k, 4l + m) / 2`; the index moves it there.
const fn pack64_order(bf16_order: bool) -> [i16; 32] {
    let mut idx = [0i16; 32];
    let mut l = 0;
    while l < 4 {
        let mut k = 0;
        while k < 4 {
            let mut h = 0;
            while h < 2 {
                let word = 8 * l + 2 * k + h;
                let pair = element_of(bf16_order, k, 4 * l + 2 * h) / 2;
                idx[pair] = word as i16;
                h += 1;
            }
            k += 1;
        }
        l += 1;
    }
    idx
}

static PACK64_PLAIN: [i16; 32] = pack64_order(false);
static PACK64_BF16: [i16; 32] = pack64_order(true);

/// Four vectors of 16 codes (lanes in the [`element_of`] order) → the 32 packed bytes of the 64
/// elements, the even element in the high nibble.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack64(c: [__m512i; 4], order: __m512i) -> __m256i {
    let bytes = _mm512_packus_epi16(
        _mm512_packus_epi32(c[0], c[1]),
        _mm512_packus_epi32(c[2], c[3]),
    );
    let words = _mm512_maddubs_epi16(bytes, _mm512_set1_epi16(0x0110));
    _mm512_cvtepi16_epi8(_mm512_permutexvar_epi16(order, words))
}

/// Load 64 elements as four f32 vectors in the [`element_of`] order (exact widening).
///
/// # Safety
/// AVX-512 F and BW must be available and 64 elements (`64·size` bytes) readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load64<const SRC: u8>(p: *const u8) -> [__m512; 4] {
    if SRC == SRC_BF16 {
        // SAFETY: 128 bytes readable at `p` (caller).
        let (r0, r1) = unsafe {
            (
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(64).cast()),
            )
        };
        let z = _mm512_setzero_si512();
        [
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, r0)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, r0)),
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, r1)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, r1)),
        ]
    } else {
        let size = if SRC == SRC_F32 { 4 } else { 2 };
        // SAFETY: 64 elements readable at `p` (caller).
        unsafe {
            [
                load16::<SRC>(p),
                load16::<SRC>(p.add(16 * size)),
                load16::<SRC>(p.add(32 * size)),
                load16::<SRC>(p.add(48 * size)),
            ]
        }
    }
}

/// Quantize whole blocks.
///
/// # Safety
/// AVX-512 F and BW must be available; `x` holds `n` elements of `elem_size` bytes, `packed`
/// `ceil(n/2)` bytes, `absmax` `ceil(n/bs)` values, and `bs` is a positive multiple of 16.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_blocks<const SRC: u8, const NF4: bool>(
    x: &[u8],
    elem_size: usize,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    let n = x.len() / elem_size;
    let search = Search::new::<NF4>();
    let order = if SRC == SRC_BF16 {
        &PACK64_BF16
    } else {
        &PACK64_PLAIN
    };
    // SAFETY: `order` holds 32 i16 = 64 bytes.
    let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
    let nblocks = absmax.len();
    let mut g0 = 0;
    // Block sizes 64 and 128 (the common ones): 16 whole blocks at a time with no per-block
    // work ([`absmax16`], then [`encode16`]). Pass 1 of the next group runs before pass 2 of this
    // one, so that the reciprocal table entries it prefetches arrive while this group is encoded.
    if bs == 64 || bs == 128 {
        let whole = n / bs / 16 * 16;
        let group_bytes = 16 * bs * elem_size;
        let pass1 = |g: usize, absmax: &mut [f32]| {
            let (x, absmax) = (
                &x[g * bs * elem_size..][..group_bytes],
                &mut absmax[g..g + 16],
            );
            // SAFETY: the caller's contract (features); `x` holds 16 whole blocks (sliced), their
            // absmax `absmax`; `bs` is 64 or 128.
            unsafe { absmax16::<SRC, NF4>(x, bs, absmax) }
        };
        // Input is prefetched into L2 `lead` groups ahead: 12 KiB at block size 64 (on Zen 4,
        // 6 KiB or 24 KiB are slower there; into L1 instead, twice as slow: too many misses in
        // flight), 24 KiB at 128. Hardware prefetchers stop at 4 KiB pages. Groups 1 .. lead at
        // once here, then one group per group, spread over its encoding. (A constant: computed
        // from the group size, the f32 loop came out measurably slower.)
        let lead: usize = if SRC == SRC_F32 { 3 } else { 6 };
        for off in (group_bytes..lead * group_bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(x.as_ptr().wrapping_add(off).cast());
        }
        let mut kind = if whole > 0 {
            pass1(0, absmax)
        } else {
            Group::Tiny
        };
        while g0 < whole {
            let next = g0 + 16;
            let ahead = if g0 + 16 * (lead + 1) <= whole {
                x.as_ptr().wrapping_add((g0 + 16 * lead) * bs * elem_size)
            } else {
                core::ptr::null()
            };
            let kind_next = if next < whole {
                pass1(next, absmax)
            } else {
                Group::Tiny
            };
            let (s, e) = (g0 * bs, next * bs);
            let (x, packed, absmax) = (
                &x[s * elem_size..e * elem_size],
                &mut packed[s / 2..e / 2],
                &mut absmax[g0..next],
            );
            match kind {
                Group::Tiny => {
                    kernel::oracle_blocks(QuantType::of_nf4(NF4), SRC, x, bs, packed, absmax)
                }
                // SAFETY: the caller's contract; `x` holds the 16 whole blocks from `g0`, `packed`
                // their codes, `absmax` their absmax (pass 1's).
                Group::Special => unsafe {
                    encode16::<SRC, NF4, false>(x, bs, packed, absmax, &search, order, ahead)
                },
                // SAFETY: as above, and pass 1 found no NaN or infinity in these blocks.
                Group::Clean => unsafe {
                    encode16::<SRC, NF4, true>(x, bs, packed, absmax, &search, order, ahead)
                },
            }
            (g0, kind) = (next, kind_next);
        }
    }
    // Blocks go in groups: first every absmax of the group, then every code. The division and
    // the reduction of one block then overlap the encoding of others instead of stalling it.
    let group = (2048 / bs).max(1);
    while g0 < nblocks {
        let g1 = (g0 + group).min(nblocks);
        for (b, am) in (g0..g1).zip(&mut absmax[g0..g1]) {
            let s = b * bs;
            let len = bs.min(n - s);
            // SAFETY: the caller's contract (features, lengths) holds for this block.
            let raw =
                unsafe { block_absmax::<SRC>(&x[s * elem_size..(s + len) * elem_size], elem_size) };
            *am = fastmath::ftz_absmax(raw);
            fastmath::prefetch_rcp_approx_ftz(*am);
        }
        for (b, &a) in (g0..g1).zip(&absmax[g0..g1]) {
            let s = b * bs;
            let len = bs.min(n - s);
            let bytes = &mut packed[s / 2..s / 2 + len.div_ceil(2)];
            let block = &x[s * elem_size..(s + len) * elem_size];
            if fastmath::is_tiny_absmax(a) {
                kernel::oracle_block(QuantType::of_nf4(NF4), SRC, block, bytes);
                continue;
            }
            // The same offset one group ahead (the next absmax pass): 4–16 KiB.
            let ahead = x.as_ptr().wrapping_add((s + group * bs) * elem_size);
            // SAFETY: the caller's contract (features, lengths) holds for this block.
            unsafe {
                encode_block::<SRC, NF4>(
                    block,
                    elem_size,
                    fastmath::rcp_approx_ftz(a),
                    bytes,
                    &search,
                    order,
                    ahead,
                )
            };
        }
        g0 = g1;
    }
}

/// The maximum of each of 16 vectors, as one vector of dwords (lane `i` = max of `a[i]`'s
/// lanes), by a transposing tree instead of 16 separate reductions: unsigned 32-bit lanes
/// (`WORDS = false`, 45 instructions) or unsigned 16-bit lanes (`WORDS`, 52 instructions: a first
/// level pairs the words of two vectors, the 32-bit tree then runs on 8 vectors with 16-bit
/// maxima, and a last level folds the two partial maxima of each vector).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn max16<const WORDS: bool>(a: &[__m512i; 16]) -> __m512i {
    let max = |x: __m512i, y: __m512i| {
        if WORDS {
            _mm512_max_epu16(x, y)
        } else {
            _mm512_max_epu32(x, y)
        }
    };
    let pair =
        |x: __m512i, y: __m512i| max(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    let quad =
        |x: __m512i, y: __m512i| max(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
    // Lanes 0, 2 | 1, 3 of each source, 128 bits at a time.
    let halves = |x: __m512i, y: __m512i| {
        max(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(x, y),
        )
    };
    if !WORDS {
        let c: [__m512i; 4] = core::array::from_fn(|j| {
            quad(
                pair(a[4 * j], a[4 * j + 1]),
                pair(a[4 * j + 2], a[4 * j + 3]),
            )
        });
        return halves(halves(c[0], c[1]), halves(c[2], c[3]));
    }
    // Word `2i` of vector `j` then holds partial maxima of `a[2j]`, word `2i + 1` of `a[2j + 1]`.
    let w: [__m512i; 8] = core::array::from_fn(|j| {
        max(
            _mm512_unpacklo_epi16(a[2 * j], a[2 * j + 1]),
            _mm512_unpackhi_epi16(a[2 * j], a[2 * j + 1]),
        )
    });
    let c: [__m512i; 2] = core::array::from_fn(|j| {
        quad(
            pair(w[4 * j], w[4 * j + 1]),
            pair(w[4 * j + 2], w[4 * j + 3]),
        )
    });
    // Words 0–7 and 8–15 now hold two partial maxima of a[0..8], words 16–31 of a[8..16].
    let v = halves(c[0], c[1]);
    _mm512_cvtepu16_epi32(_mm512_castsi512_si256(halves(v, v)))
}

/// Pass 1 over 16 whole blocks of 64 or 128 elements: their absmax, written to `absmax`.
///
/// Keeps one running maximum per block (sign-cleared bit patterns, compared as unsigned
/// integers: for non-NaN values the same order as the magnitudes; f16/bf16 in 16-bit lanes) and
/// reduces all 16 with [`max16`]; a block whose maximum
/// is a NaN pattern is redone by [`block_absmax`] (NaN ignored). Returns how to encode the group
/// ([`Group`]: from the same bit patterns); unless it goes to the oracle, prefetches the 16
/// reciprocal table entries that [`encode16`] will read.
///
/// # Safety
/// AVX-512 F and BW are available; `x` holds `16·bs` elements of the source type, `absmax` 16
/// values; `bs` is 64 or 128.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn absmax16<const SRC: u8, const NF4: bool>(
    x: &[u8],
    bs: usize,
    absmax: &mut [f32],
) -> Group {
    // FP4 from f32 or bf16: also the smallest non-zero |x| (f16 needs no check: its non-zero
    // values are at least 2^-24 and its absmax at most 65504).
    let check = !NF4 && SRC != SRC_F16;
    // |x| bit patterns minus one (a zero wraps to the maximum), their minimum.
    let mut smallest = _mm512_set1_epi32(-1);
    let elem_size = if SRC == SRC_F32 { 4 } else { 2 };
    let block_bytes = bs * elem_size;
    let vecs = block_bytes / 64;
    let magnitude = _mm512_set1_epi32(if SRC == SRC_F32 {
        0x7fff_ffff
    } else {
        0x7fff_7fff
    });
    let mut acc = [_mm512_setzero_si512(); 16];
    for (b, acc) in acc.iter_mut().enumerate() {
        let mut m = _mm512_setzero_si512();
        for v in 0..vecs {
            // SAFETY: bytes `b·block_bytes + 64v ..` + 64 lie inside `x` (16 whole blocks).
            let r = unsafe { _mm512_loadu_si512(x.as_ptr().add(b * block_bytes + 64 * v).cast()) };
            let r = _mm512_and_si512(r, magnitude);
            m = if SRC == SRC_F32 {
                _mm512_max_epu32(m, r)
            } else {
                _mm512_max_epu16(m, r)
            };
            if check {
                smallest = if SRC == SRC_F32 {
                    _mm512_min_epu32(smallest, _mm512_sub_epi32(r, _mm512_set1_epi32(1)))
                } else {
                    _mm512_min_epu16(smallest, _mm512_sub_epi16(r, _mm512_set1_epi16(1)))
                };
            }
        }
        *acc = m;
    }
    let bits = if SRC == SRC_F32 {
        max16::<false>(&acc)
    } else {
        max16::<true>(&acc)
    };
    let (infinity, values) = match SRC {
        SRC_F32 => (0x7f80_0000, _mm512_castsi512_ps(bits)),
        SRC_BF16 => (0x7f80, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))),
        _ => (0x7c00, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(bits))),
    };
    // SAFETY: `absmax` holds 16 f32.
    unsafe { _mm512_storeu_ps(absmax.as_mut_ptr(), values) };
    let nan = _mm512_cmpgt_epu32_mask(bits, _mm512_set1_epi32(infinity));
    let special = _mm512_cmpge_epu32_mask(bits, _mm512_set1_epi32(infinity)) != 0;
    // Blocks whose absmax is tiny (below 2^-100 as f32; for f16 data only zero is): from the
    // bit patterns, so that the common case needs no scalar pass over the 16 values.
    let tiny_bits = match SRC {
        SRC_F32 => fastmath::TINY_ABSMAX_BITS as i32,
        SRC_BF16 => (fastmath::TINY_ABSMAX_BITS >> 16) as i32,
        _ => 1,
    };
    let mut tiny = _mm512_cmplt_epu32_mask(bits, _mm512_set1_epi32(tiny_bits)) != 0;
    if nan != 0 {
        for (b, am) in absmax.iter_mut().enumerate() {
            if nan & (1 << b) != 0 {
                // SAFETY: block `b` lies inside `x`.
                *am = unsafe {
                    block_absmax::<SRC>(&x[b * block_bytes..(b + 1) * block_bytes], elem_size)
                };
                tiny |= fastmath::is_tiny_absmax(*am);
            }
        }
    }
    if tiny {
        return Group::Tiny;
    }
    absmax
        .iter()
        .for_each(|&a| fastmath::prefetch_rcp_approx_ftz(a));
    // FP4's sign test on `xn` alone needs every non-zero |x| ≥ 2^-98 and absmax ≤ 2^24: then
    // |xn| ≥ 2^-98 · 2^-24 · (1 − 2^-22) is normal, and flush-to-zero changes nothing.
    let flushable = check && {
        let (small, big) = if SRC == SRC_F32 {
            let small = _mm512_cmplt_epu32_mask(smallest, _mm512_set1_epi32(0x0e80_0000 - 1));
            (small != 0, 0x4b80_0000)
        } else {
            let small = _mm512_cmplt_epu16_mask(smallest, _mm512_set1_epi16(0x0e80 - 1));
            (small != 0, 0x4b80)
        };
        small || _mm512_cmpgt_epu32_mask(bits, _mm512_set1_epi32(big)) != 0
    };
    if special || flushable {
        Group::Special
    } else {
        Group::Clean
    }
}

/// How [`absmax16`] found a group of 16 blocks.
#[derive(Clone, Copy)]
enum Group {
    /// A block's absmax is tiny ([`fastmath::is_tiny_absmax`]: all zero, or small enough that
    /// subnormal inputs count): the group goes to the oracle (rare; it keeps the flush of inputs
    /// out of the vector loop).
    Tiny,
    /// A block holds a NaN or an infinity: [`encode16`] with the bucket conversion that maps NaN
    /// to bucket 0.
    Special,
    /// Finite values only: [`encode16`] with the cheaper `CLEAN` bucket. For FP4 also: every
    /// non-zero |x| at least 2^-98 and every absmax at most 2^24, so that no input or product
    /// is subnormal (the sign is that of `x · inv`: [`encode_fp4_signed`]).
    Clean,
}

/// Pass 2 over 16 whole blocks of 64 or 128 elements, given their absmax ([`absmax16`]): the
/// codes, 64 elements per step straight through the 16 blocks, the block's reciprocal broadcast
/// from memory: no per-block bookkeeping. Unless `ahead` is null, each step also prefetches into
/// L2 the bytes at the same offset from `ahead` (a later group: 16 blocks of the same size) and,
/// for f16/bf16, into L1 those two groups after `x` (read by the next pass 1).
///
/// # Safety
/// AVX-512 F and BW are available; `x` holds `16·bs` elements of the source type, `packed`
/// `8·bs` bytes, `absmax` the 16 blocks' absmax, none of them tiny; `bs` is 64 or 128; with
/// `CLEAN`, no element is NaN or infinite ([`Group::Clean`]). (`ahead` is only prefetched, never
/// read: any address will do.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn encode16<const SRC: u8, const NF4: bool, const CLEAN: bool>(
    x: &[u8],
    bs: usize,
    packed: &mut [u8],
    absmax: &[f32],
    search: &Search,
    order: __m512i,
    ahead: *const u8,
) {
    let elem_size = if SRC == SRC_F32 { 4 } else { 2 };
    // The GPU's reciprocals: the IEEE quotients of the 16 blocks at once (`vdivps`), and which of them take the table's
    // correction: all but those from 2^126 on (the result is 0; no absmax here is tiny). The
    // corrections are applied in the loop, one block at a time: 16 scalar quotients, a gather
    // of the table entries, or 16 lookups stored and reloaded as a vector (a failed store
    // forwarding) each measured 10–15 % slower.
    let (mut ieee, mut corrected) = ([0u32; 16], [0u32; 16]);
    // SAFETY: `absmax`, `ieee` and `corrected` hold 16 values of 4 bytes.
    unsafe {
        let a = _mm512_loadu_ps(absmax.as_ptr());
        let normal = _mm512_cmplt_epu32_mask(
            _mm512_castps_si512(a),
            _mm512_set1_epi32(fastmath::RCP_FLUSH_FROM_BITS as i32),
        );
        let q = _mm512_castps_si512(_mm512_div_ps(_mm512_set1_ps(1.0), a));
        _mm512_storeu_si512(ieee.as_mut_ptr().cast(), _mm512_maskz_mov_epi32(normal, q));
        _mm512_storeu_si512(
            corrected.as_mut_ptr().cast(),
            _mm512_maskz_mov_epi32(normal, _mm512_set1_epi32(-1)),
        );
    }
    let shift = (bs / 64).trailing_zeros();
    for c in 0..16 * bs / 64 {
        if !ahead.is_null() {
            // The 64·elem_size bytes of the group ahead at the same offset: elem_size lines.
            for l in 0..elem_size {
                let line = ahead.wrapping_add(64 * (c * elem_size + l));
                _mm_prefetch::<_MM_HINT_T1>(line.cast());
                if SRC != SRC_F32 {
                    // f16/bf16: also the next pass 1's input (the group after the next), from
                    // L2 into L1: 3–7 % faster with two threads (with f32, slower).
                    let near = x
                        .as_ptr()
                        .wrapping_add(32 * bs * elem_size + 64 * (c * elem_size + l));
                    _mm_prefetch::<_MM_HINT_T0>(near.cast());
                }
            }
        }
        // One table lookup per block (the entries were prefetched by pass 1): the GPU's
        // reciprocal.
        let b = c >> shift;
        let correction = fastmath::rcp_correction(absmax[b]) as u32 & corrected[b];
        let inv = _mm512_set1_ps(f32::from_bits(ieee[b].wrapping_add(correction)));
        // SAFETY: elements 64c .. 64c + 64 lie inside `x` and their 32 packed bytes inside
        // `packed`.
        unsafe {
            let v = load64::<SRC>(x.as_ptr().add(64 * c * elem_size));
            let codes = v.map(|v| encode::<NF4, CLEAN>(v, inv, search));
            _mm256_storeu_si256(packed.as_mut_ptr().add(32 * c).cast(), pack64(codes, order));
        }
    }
}

/// The largest |x| of one block (NaN ignored), the zero-padded partial vector included.
///
/// For f16 and bf16 the maximum is taken over the integer bit patterns with the sign cleared
/// (`vpmaxuw`, 32 elements per instruction), which orders non-NaN magnitudes exactly as their
/// values; a block holding a NaN (pattern above the infinity's) is redone in f32.
///
/// # Safety
/// AVX-512 F and BW must be available; `block` holds whole elements of `elem_size` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn block_absmax<const SRC: u8>(block: &[u8], elem_size: usize) -> f32 {
    if SRC != SRC_F32 {
        let (full, rem) = (block.len() / 64, block.len() % 64);
        let mut acc = _mm512_setzero_si512();
        let magnitude = _mm512_set1_epi16(0x7fff);
        for v in 0..full {
            // SAFETY: bytes 64v .. 64v + 64 lie inside `block`.
            let r = unsafe { _mm512_loadu_si512(block.as_ptr().add(64 * v).cast()) };
            acc = _mm512_max_epu16(acc, _mm512_and_si512(r, magnitude));
        }
        if rem > 0 {
            let mut tail = [0u8; 64];
            tail[..rem].copy_from_slice(&block[64 * full..]);
            // SAFETY: `tail` holds 64 bytes.
            let r = unsafe { _mm512_loadu_si512(tail.as_ptr().cast()) };
            acc = _mm512_max_epu16(acc, _mm512_and_si512(r, magnitude));
        }
        let low = _mm512_and_si512(acc, _mm512_set1_epi32(0xffff));
        let m = _mm512_reduce_max_epu32(_mm512_max_epu32(low, _mm512_srli_epi32::<16>(acc))) as u16;
        let infinity = if SRC == SRC_BF16 { 0x7f80 } else { 0x7c00 };
        if m <= infinity {
            return if SRC == SRC_BF16 {
                bf16::from_bits(m).to_f32()
            } else {
                f16::from_bits(m).to_f32()
            };
        }
    }
    let len = block.len() / elem_size;
    let (full, rem) = (len / 16, len % 16);
    let mut acc = _mm512_setzero_ps();
    for v in 0..full {
        // SAFETY: vector `v` lies inside `block` (v < len/16).
        let xv = unsafe { load16::<SRC>(block.as_ptr().add(v * 16 * elem_size)) };
        acc = _mm512_max_ps(_mm512_abs_ps(xv), acc);
    }
    if rem > 0 {
        let mut tail = [0u8; 64];
        tail[..rem * elem_size].copy_from_slice(&block[full * 16 * elem_size..]);
        // SAFETY: `tail` holds 64 bytes, ≥ 16 elements.
        let xv = unsafe { load16::<SRC>(tail.as_ptr()) };
        acc = _mm512_max_ps(_mm512_abs_ps(xv), acc);
    }
    _mm512_reduce_max_ps(acc)
}

/// Codes of one block, given `inv = 1/absmax`, into `bytes` (`ceil(len/2)` bytes). The partial
/// last vector is zero-padded: its pad nibble is the code of `0·inv`, as in the kernels. While
/// encoding, the bytes from `ahead` (as many as the block's whole groups of 64 elements) are
/// prefetched into L2.
///
/// # Safety
/// AVX-512 F and BW must be available; `block` holds whole elements of `elem_size` bytes and
/// `bytes` holds half as many bytes as elements, rounded up. (`ahead` is only prefetched, never
/// read: any address will do.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn encode_block<const SRC: u8, const NF4: bool>(
    block: &[u8],
    elem_size: usize,
    inv: f32,
    bytes: &mut [u8],
    search: &Search,
    order: __m512i,
    ahead: *const u8,
) {
    let len = block.len() / elem_size;
    let (full, rem) = (len / 16, len % 16);
    let inv = _mm512_set1_ps(inv);
    let mut v = 0;
    // Four vectors per 32-byte store.
    while v + 4 <= full {
        for l in 0..elem_size {
            let line = ahead.wrapping_add(v * 16 * elem_size + 64 * l);
            _mm_prefetch::<_MM_HINT_T1>(line.cast());
        }
        // SAFETY: vectors `v .. v+4` lie inside `block`.
        let x = unsafe { load64::<SRC>(block.as_ptr().add(v * 16 * elem_size)) };
        let c = x.map(|x| encode::<NF4, false>(x, inv, search));
        // SAFETY: bytes 8v .. 8v+32 lie inside `bytes` (16(v+4) ≤ len).
        unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().add(8 * v).cast(), pack64(c, order)) };
        v += 4;
    }
    // Two vectors per 16-byte store (a `vpmovqb` straight to memory is slow on some cores).
    while v + 2 <= full {
        // SAFETY: vectors `v`, `v+1` lie inside `block`.
        let (x0, x1) = unsafe {
            (
                load16::<SRC>(block.as_ptr().add(v * 16 * elem_size)),
                load16::<SRC>(block.as_ptr().add((v + 1) * 16 * elem_size)),
            )
        };
        let p0 = pack16(encode::<NF4, false>(x0, inv, search));
        let p1 = pack16(encode::<NF4, false>(x1, inv, search));
        // SAFETY: bytes 8v .. 8v+16 lie inside `bytes` (16(v+2) ≤ len).
        unsafe {
            _mm_storeu_si128(
                bytes.as_mut_ptr().add(8 * v).cast(),
                _mm_unpacklo_epi64(p0, p1),
            )
        };
        v += 2;
    }
    if v < full {
        // SAFETY: vector `v` lies inside `block`.
        let xv = unsafe { load16::<SRC>(block.as_ptr().add(v * 16 * elem_size)) };
        let packed8 = pack16(encode::<NF4, false>(xv, inv, search));
        // SAFETY: bytes 8v .. 8v+8 lie inside `bytes` (16(v+1) ≤ len).
        unsafe { _mm_storel_epi64(bytes.as_mut_ptr().add(8 * v).cast(), packed8) };
    }
    if rem > 0 {
        let mut tail = [0u8; 64];
        tail[..rem * elem_size].copy_from_slice(&block[full * 16 * elem_size..]);
        // SAFETY: `tail` holds 64 bytes, ≥ 16 elements.
        let xv = unsafe { load16::<SRC>(tail.as_ptr()) };
        let packed8 = pack16(encode::<NF4, false>(xv, inv, search));
        let mut out = [0u8; 16];
        // SAFETY: `out` holds 16 bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), packed8) };
        bytes[8 * full..].copy_from_slice(&out[..rem.div_ceil(2)]);
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize

/// bf16 bits (in the low half of each dword) of 16 f32, rounded to nearest even; NaN keeps its
/// sign and top payload bits and is made quiet — exactly `half::bf16::from_f32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn bf16_rne(x: __m512i) -> __m512i {
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let biased = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
    let rounded = _mm512_srli_epi32::<16>(biased);
    let magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
    _mm512_mask_blend_epi32(nan, rounded, quiet)
}

/// The block's table in output form: 16 f32, or 16 u16 duplicated into both 256-bit halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn scaled_table<const OUT: u8>(values: &[f32; 16], table: __m512, absmax: f32) -> __m512i {
    let scaled = if fastmath::is_plain_scale(absmax) {
        _mm512_mul_ps(table, _mm512_set1_ps(absmax))
    } else {
        // NaN, infinite or tiny scale: the CUDA build's products (ftz, CUDA's NaN).
        let t = values.map(|v| fastmath::mul_ftz(v, absmax));
        // SAFETY: `t` holds 16 f32.
        unsafe { _mm512_loadu_ps(t.as_ptr()) }
    };
    let half = match OUT {
        OUT_F32 => return _mm512_castps_si512(scaled),
        OUT_F16 => _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled),
        _ => _mm512_cvtepi32_epi16(bf16_rne(_mm512_castps_si512(scaled))),
    };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half), half)
}

/// Table indices of the 16 (f32) or 32 (16-bit) elements starting at element `j`, where
/// `p = packed + j/2`. Only the low 4 (`vpermd`) or 5 (`vpermw`, duplicated table) bits count.
///
/// # Safety
/// AVX-512 F and BW must be available. Readable: 8 bytes (f32, even `j`), 9 (f32, odd), 16
/// (16-bit, even) or 17 (16-bit, odd) at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn indices<const OUT: u8, const ODD: bool>(p: *const u8) -> __m512i {
    if OUT == OUT_F32 {
        // One byte per qword: element 2m is the high nibble, 2m+1 the low one.
        // SAFETY: 8 bytes readable at `p` (caller).
        let v = _mm512_cvtepu8_epi64(unsafe { _mm_loadl_epi64(p.cast()) });
        if !ODD {
            _mm512_or_si512(_mm512_srli_epi64::<4>(v), _mm512_slli_epi64::<32>(v))
        } else {
            // Element j (odd) is the low nibble of byte m, element j+1 the high one of byte m+1.
            // SAFETY: bytes 1..9 readable at `p` (caller).
            let w = _mm512_cvtepu8_epi64(unsafe { _mm_loadl_epi64(p.add(1).cast()) });
            _mm512_or_si512(v, _mm512_slli_epi64::<32>(_mm512_srli_epi64::<4>(w)))
        }
    } else {
        // One byte per dword, split into two words.
        // SAFETY: 16 bytes readable at `p` (caller).
        let v = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) });
        if !ODD {
            _mm512_or_si512(_mm512_srli_epi32::<4>(v), _mm512_slli_epi32::<16>(v))
        } else {
            // SAFETY: bytes 1..17 readable at `p` (caller).
            let w = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.add(1).cast()) });
            _mm512_or_si512(v, _mm512_slli_epi32::<16>(_mm512_srli_epi32::<4>(w)))
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn lookup<const OUT: u8>(idx: __m512i, table: __m512i) -> __m512i {
    if OUT == OUT_F32 {
        _mm512_permutexvar_epi32(idx, table)
    } else {
        _mm512_permutexvar_epi16(idx, table)
    }
}

/// Lanes `k..` from `b`, the rest from `a` (`0 < k <` lanes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn blend_from<const OUT: u8>(k: usize, a: __m512i, b: __m512i) -> __m512i {
    if OUT == OUT_F32 {
        _mm512_mask_blend_epi32((0xffffu32 << k) as u16, a, b)
    } else {
        _mm512_mask_blend_epi16(u32::MAX << k, a, b)
    }
}

/// Dequantize `nvec` 64-byte vectors of elements starting at element `j0` into `dst`.
///
/// # Safety
/// AVX-512 F and BW must be available; `dst` is 64-byte aligned with `64·nvec` writable bytes;
/// `j0 & 1 == ODD as usize`; `2·packed.len() ≥ j0 + nvec·lanes`; `bs` is a multiple of 32.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dequantize_vectors<const OUT: u8, const ODD: bool>(
    table: &[f32; 16],
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    bs: usize,
    j0: usize,
    nvec: usize,
    dst: *mut u8,
    streaming: bool,
) {
    let lanes = if OUT == OUT_F32 { 16 } else { 32 };
    // SAFETY: `table` holds 16 f32.
    let tab = unsafe { _mm512_loadu_ps(table.as_ptr()) };
    let mut block = j0 / bs;
    let mut boundary = (block + 1) * bs;
    let mut t = scaled_table::<OUT>(table, tab, absmax.get(block));
    let mut j = j0;
    for k in 0..nvec {
        // SAFETY: elements j .. j+lanes are inside the codes (caller), so are their bytes.
        let idx = unsafe { indices::<OUT, ODD>(packed.as_ptr().add(j >> 1)) };
        let r = if j + lanes < boundary {
            lookup::<OUT>(idx, t)
        } else if j + lanes == boundary {
            let r = lookup::<OUT>(idx, t);
            block += 1;
            boundary += bs;
            if k + 1 < nvec {
                t = scaled_table::<OUT>(table, tab, absmax.get(block));
            }
            r
        } else {
            let next = scaled_table::<OUT>(table, tab, absmax.get(block + 1));
            let r = blend_from::<OUT>(
                boundary - j,
                lookup::<OUT>(idx, t),
                lookup::<OUT>(idx, next),
            );
            t = next;
            block += 1;
            boundary += bs;
            r
        };
        // SAFETY: vector k of `dst` is writable and 64-byte aligned (caller).
        unsafe {
            let d = dst.add(64 * k).cast::<__m512i>();
            if streaming {
                _mm512_stream_si512(d, r);
            } else {
                _mm512_store_si512(d, r);
            }
        }
        j += lanes;
    }
    if streaming {
        // Order the weakly-ordered streaming stores before anything that follows.
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The count of `thresholds` each lane strictly exceeds (`_CMP_GT_OQ`: NaN exceeds none),
    /// one compare per threshold: the definition the bucket search must reproduce.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn count_exceeded(v: __m512, thresholds: &[f32]) -> __m512i {
        thresholds.iter().fold(_mm512_setzero_si512(), |acc, &t| {
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_set1_ps(t));
            _mm512_mask_add_epi32(acc, gt, acc, _mm512_set1_epi32(1))
        })
    }

    /// The codes of the bucket search (both conversions) equal the count of thresholds exceeded
    /// for every f32 of
    /// `[-1.03, 1.03]` (every normalized value a block can produce, with margin: `|x · inv| ≤ 1 +
    /// 2^-21`), and the oracle's codes for every 4099th of them and for NaN.
    #[test]
    fn bucket_search_is_exact_for_every_normalized_f32() {
        if Kernel::new().is_none() {
            return;
        }
        let top = 1.03f32.to_bits();
        let vectors = top / 16 + 1;
        let runs = vectors.div_ceil(1 << 14);
        let mismatches: usize = (0..runs)
            .into_par_iter()
            .map(|r| {
                let mut bad = 0;
                for k in (r << 14)..((r + 1) << 14).min(vectors) {
                    for sign in [0u32, 0x8000_0000] {
                        let lanes: [u32; 16] =
                            core::array::from_fn(|l| (16 * k + l as u32).min(top) | sign);
                        // SAFETY: AVX-512 F and BW were detected above; `lanes` holds 16 u32.
                        bad += unsafe { check_vector(&lanes, k % 4099 == 0) };
                    }
                }
                bad
            })
            .sum();
        assert_eq!(mismatches, 0);
        let nans = [
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x7fff_ffff,
        ];
        let lanes: [u32; 16] = core::array::from_fn(|l| nans[l % nans.len()]);
        // SAFETY: as above.
        assert_eq!(unsafe { check_vector(&lanes, true) }, 0);
    }

    /// Mismatching lanes of one vector of bit patterns (`xn = x`, `inv = 1`).
    ///
    /// # Safety
    /// AVX-512 F and BW must be available.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn check_vector(lanes: &[u32; 16], with_oracle: bool) -> usize {
        // SAFETY: `lanes` holds 16 u32.
        let x = unsafe { _mm512_loadu_ps(lanes.as_ptr().cast()) };
        let one = _mm512_set1_ps(1.0);
        let (nf4_search, fp4_search) = (Search::new::<true>(), Search::new::<false>());
        let nf4 = encode::<true, false>(x, one, &nf4_search);
        let fp4 = encode::<false, false>(x, one, &fp4_search);
        let nf4_count = count_exceeded(x, &codebook::NF4_THRESHOLDS);
        let level = count_exceeded(_mm512_abs_ps(x), &codebook::FP4_THRESHOLDS);
        let pattern = _mm512_permutexvar_epi32(level, {
            let p: [i32; 16] = core::array::from_fn(|l| FP4_PATTERNS[l % 8]);
            // SAFETY: `p` holds 16 i32.
            unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
        });
        let negative = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, _mm512_set1_ps(-f32::MIN_POSITIVE));
        let fp4_count = _mm512_mask_or_epi32(pattern, negative, pattern, _mm512_set1_epi32(8));
        let mut bad = (_mm512_cmpneq_epi32_mask(nf4, nf4_count).count_ones()
            + _mm512_cmpneq_epi32_mask(fp4, fp4_count).count_ones()) as usize;
        // The `CLEAN` bucket (no conversion) for the lanes that are not NaN; for FP4 (signed
        // buckets) only those a clean group can hold: zero or at least 2^-98 in magnitude.
        let finite = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x);
        let m = _mm512_abs_ps(x);
        let fp4_clean_lanes =
            _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(finite, m, _mm512_set1_ps(2f32.powi(-98)))
                | _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m, _mm512_setzero_ps());
        let nf4_clean = encode::<true, true>(x, one, &nf4_search);
        let fp4_clean = encode::<false, true>(x, one, &fp4_search);
        bad += (_mm512_mask_cmpneq_epi32_mask(finite, nf4_clean, nf4_count).count_ones()
            + _mm512_mask_cmpneq_epi32_mask(fp4_clean_lanes, fp4_clean, fp4_count).count_ones())
            as usize;
        if with_oracle {
            let (mut a, mut b) = ([0i32; 16], [0i32; 16]);
            // SAFETY: `a` and `b` hold 16 i32.
            unsafe {
                _mm512_storeu_si512(a.as_mut_ptr().cast(), nf4);
                _mm512_storeu_si512(b.as_mut_ptr().cast(), fp4);
            }
            for l in 0..16 {
                let xn = fastmath::ftz(f32::from_bits(lanes[l]));
                bad += usize::from(a[l] != i32::from(codebook::encode_nf4(xn)));
                bad += usize::from(b[l] != i32::from(codebook::encode_fp4(xn)));
            }
        }
        bad
    }
}
