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
//! NaN (NaN ignored, like `f32::max`); `xn = x * (1/absmax)` with an IEEE division; codes by a
//! 4-step binary search over the sorted thresholds (`vpermps` + `vcmpps` `_CMP_GT_OQ`, so NaN gets
//! code 0): the count of thresholds strictly exceeded, as the oracle's tree. Packed with `vpmovqb`.

use crate::kernel::Kernel as KernelTrait;
use crate::{codebook, scalar, AbsmaxView, Element, QuantType};
use core::arch::x86_64::*;
use half::{bf16, f16};

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
    /// True when the CPU has AVX-512 F and BW.
    pub(crate) fn is_available() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
    }

    /// The kernels, if the CPU has the features.
    pub(crate) fn new() -> Option<Self> {
        Self::is_available().then_some(Kernel {
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

    #[allow(clippy::too_many_arguments)]
    fn dequantize<T: Element, const OUT: u8>(
        self,
        qt: QuantType,
        packed: &[u8],
        absmax: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [T],
        streaming: bool,
    ) {
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
    fn quantize_f32(self, qt: QuantType, x: &[f32], bs: usize, p: &mut [u8], a: &mut [f32]) {
        self.quantize::<SRC_F32>(qt, bytemuck::cast_slice(x), 4, bs, p, a)
    }
    fn quantize_f16(self, qt: QuantType, x: &[f16], bs: usize, p: &mut [u8], a: &mut [f32]) {
        self.quantize::<SRC_F16>(qt, bytemuck::cast_slice(x), 2, bs, p, a)
    }
    fn quantize_bf16(self, qt: QuantType, x: &[bf16], bs: usize, p: &mut [u8], a: &mut [f32]) {
        self.quantize::<SRC_BF16>(qt, bytemuck::cast_slice(x), 2, bs, p, a)
    }
    fn dequantize_f32(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [f32],
        streaming: bool,
    ) {
        self.dequantize::<f32, OUT_F32>(qt, p, a, bs, start, out, streaming)
    }
    fn dequantize_f16(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [f16],
        streaming: bool,
    ) {
        self.dequantize::<f16, OUT_F16>(qt, p, a, bs, start, out, streaming)
    }
    fn dequantize_bf16(
        self,
        qt: QuantType,
        p: &[u8],
        a: AbsmaxView<'_>,
        bs: usize,
        start: usize,
        out: &mut [bf16],
        streaming: bool,
    ) {
        self.dequantize::<bf16, OUT_BF16>(qt, p, a, bs, start, out, streaming)
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

/// NF4 codes: the number of the 15 thresholds `xn` strictly exceeds, by binary search.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn encode_nf4(xn: __m512, thresholds: __m512) -> __m512i {
    // First step against the middle threshold directly (no lookup needed).
    let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xn, _mm512_set1_ps(codebook::NF4_THRESHOLDS[7]));
    let mut code = _mm512_maskz_mov_epi32(above, _mm512_set1_epi32(8));
    for step in [4, 2, 1] {
        let probe = _mm512_add_epi32(code, _mm512_set1_epi32(step - 1));
        let t = _mm512_permutexvar_ps(probe, thresholds);
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xn, t);
        code = _mm512_mask_add_epi32(code, gt, code, _mm512_set1_epi32(step));
    }
    code
}

/// FP4 codes: sign bit from `xn < 0`, magnitude pattern from the count of the 7 magnitude
/// thresholds `|xn|` strictly exceeds (the tree of `dQuantizeFP4`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn encode_fp4(xn: __m512, thresholds: __m512, patterns: __m512i) -> __m512i {
    let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(xn, _mm512_setzero_ps());
    let m = _mm512_abs_ps(xn);
    let mut level = _mm512_setzero_si512();
    for step in [4, 2, 1] {
        let probe = _mm512_add_epi32(level, _mm512_set1_epi32(step - 1));
        let t = _mm512_permutexvar_ps(probe, thresholds);
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, t);
        level = _mm512_mask_add_epi32(level, gt, level, _mm512_set1_epi32(step));
    }
    let pattern = _mm512_permutexvar_epi32(level, patterns);
    _mm512_mask_or_epi32(pattern, negative, pattern, _mm512_set1_epi32(8))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn encode<const NF4: bool>(xn: __m512, thresholds: __m512, patterns: __m512i) -> __m512i {
    if NF4 {
        encode_nf4(xn, thresholds)
    } else {
        encode_fp4(xn, thresholds, patterns)
    }
}

/// 16 codes (one per dword) → 8 bytes, the even element in the high nibble.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack16(code: __m512i) -> __m128i {
    let pairs = _mm512_or_si512(_mm512_slli_epi64::<4>(code), _mm512_srli_epi64::<32>(code));
    _mm512_cvtepi64_epi8(pairs)
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
    let mut thr = [f32::INFINITY; 16];
    if NF4 {
        thr[..15].copy_from_slice(&codebook::NF4_THRESHOLDS);
    } else {
        thr[..7].copy_from_slice(&codebook::FP4_THRESHOLDS);
    }
    // SAFETY: `thr` holds 16 f32.
    let thresholds = unsafe { _mm512_loadu_ps(thr.as_ptr()) };
    // Magnitude level (count of thresholds exceeded) → FP4 bit pattern.
    let patterns = _mm512_setr_epi32(0, 1, 6, 7, 4, 5, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0);
    let nblocks = absmax.len();
    // Blocks go in groups: first every absmax of the group, then every code. The division and
    // the reduction of one block then overlap the encoding of others instead of stalling it.
    let group = (2048 / bs).max(1);
    let mut g0 = 0;
    while g0 < nblocks {
        let g1 = (g0 + group).min(nblocks);
        for (b, am) in absmax.iter_mut().enumerate().take(g1).skip(g0) {
            let s = b * bs;
            let len = bs.min(n - s);
            // SAFETY: the caller's contract (features, lengths) holds for this block.
            *am =
                unsafe { block_absmax::<SRC>(&x[s * elem_size..(s + len) * elem_size], elem_size) };
        }
        for (b, &a) in absmax.iter().enumerate().take(g1).skip(g0) {
            let s = b * bs;
            let len = bs.min(n - s);
            let bytes = &mut packed[s / 2..s / 2 + len.div_ceil(2)];
            // SAFETY: the caller's contract (features, lengths) holds for this block.
            unsafe {
                encode_block::<SRC, NF4>(
                    &x[s * elem_size..(s + len) * elem_size],
                    elem_size,
                    1.0f32 / a,
                    bytes,
                    thresholds,
                    patterns,
                )
            };
        }
        g0 = g1;
    }
}

/// The largest |x| of one block (NaN ignored), the zero-padded partial vector included.
///
/// # Safety
/// AVX-512 F and BW must be available; `block` holds whole elements of `elem_size` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn block_absmax<const SRC: u8>(block: &[u8], elem_size: usize) -> f32 {
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
/// last vector is zero-padded: its pad nibble is the code of `0·inv`, as in the kernels.
///
/// # Safety
/// AVX-512 F and BW must be available; `block` holds whole elements of `elem_size` bytes and
/// `bytes` holds half as many bytes as elements, rounded up.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn encode_block<const SRC: u8, const NF4: bool>(
    block: &[u8],
    elem_size: usize,
    inv: f32,
    bytes: &mut [u8],
    thresholds: __m512,
    patterns: __m512i,
) {
    let len = block.len() / elem_size;
    let (full, rem) = (len / 16, len % 16);
    let inv = _mm512_set1_ps(inv);
    // Two vectors per 16-byte store (a `vpmovqb` straight to memory is slow on some cores).
    let mut v = 0;
    while v + 2 <= full {
        // SAFETY: vectors `v`, `v+1` lie inside `block`.
        let (x0, x1) = unsafe {
            (
                load16::<SRC>(block.as_ptr().add(v * 16 * elem_size)),
                load16::<SRC>(block.as_ptr().add((v + 1) * 16 * elem_size)),
            )
        };
        let p0 = pack16(encode::<NF4>(_mm512_mul_ps(x0, inv), thresholds, patterns));
        let p1 = pack16(encode::<NF4>(_mm512_mul_ps(x1, inv), thresholds, patterns));
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
        let packed8 = pack16(encode::<NF4>(_mm512_mul_ps(xv, inv), thresholds, patterns));
        // SAFETY: bytes 8v .. 8v+8 lie inside `bytes` (16(v+1) ≤ len).
        unsafe { _mm_storel_epi64(bytes.as_mut_ptr().add(8 * v).cast(), packed8) };
    }
    if rem > 0 {
        let mut tail = [0u8; 64];
        tail[..rem * elem_size].copy_from_slice(&block[full * 16 * elem_size..]);
        // SAFETY: `tail` holds 64 bytes, ≥ 16 elements.
        let xv = unsafe { load16::<SRC>(tail.as_ptr()) };
        let packed8 = pack16(encode::<NF4>(_mm512_mul_ps(xv, inv), thresholds, patterns));
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
fn bf16_rne(x: __m512i) -> __m512i {
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
fn scaled_table<const OUT: u8>(table: __m512, absmax: f32) -> __m512i {
    let scaled = _mm512_mul_ps(table, _mm512_set1_ps(absmax));
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
    let mut t = scaled_table::<OUT>(tab, absmax.get(block));
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
                t = scaled_table::<OUT>(tab, absmax.get(block));
            }
            r
        } else {
            let next = scaled_table::<OUT>(tab, absmax.get(block + 1));
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
