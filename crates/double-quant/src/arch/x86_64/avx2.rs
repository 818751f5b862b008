//! AVX2 slice kernels, 8 lanes.
//!
//! **Encode.** The computation of the AVX-512 kernel on 8 lanes: key, clamped bucket index,
//! `vpgatherdd` of the bucket entries, `code = (entry >> 24) + (offset >= entry & 0xff_ffff)`
//! (a signed compare: both sides are below 2^24), lanes outside `[-1, 1]` patched to 0 / 255 with
//! masks from `vcmpps`. The 8 codes are gathered into 8 bytes with `vpshufb` + `vpermd`. A last
//! partial vector goes through a zero-padded stack buffer.
//!
//! **Decode.** Scalar loads and multiplies (faster than `vgatherdps` on the cores measured).

use crate::encoder::{Encoder, Table, OFFSET_BITS};
use crate::simd::Normalize;
use crate::{DynamicMap, Implementation};
use core::arch::x86_64::*;

const NORM_NONE: u8 = 0;
const NORM_MUL: u8 = 1;
const NORM_DIV: u8 = 2;

/// The AVX2 kernels; a value exists only on a CPU with AVX2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Avx2`] (AVX2, FMA, F16C).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Avx2.is_available().then_some(Kernel {
            _features_detected: (),
        })
    }

    /// `out[i] = code(normalize(x[i], p))` with `p = ps[i / size]`.
    pub(crate) fn encode(
        self,
        enc: &Encoder,
        x: &[f32],
        how: Normalize,
        size: usize,
        ps: &[f32],
        out: &mut [u8],
    ) {
        let t = enc.table();
        assert_eq!(out.len(), x.len(), "encode: output length");
        for (x, out, p) in crate::simd::blocks(x, out, size, ps) {
            // SAFETY: `self` exists only after AVX2 was detected (`new`); `out` and `x` have the
            // same length (asserted, and chunked alike), which is all the kernel's pointer
            // accesses rely on.
            unsafe {
                match how {
                    Normalize::None => encode::<NORM_NONE>(t, x, p, out),
                    Normalize::Mul => encode::<NORM_MUL>(t, x, p, out),
                    Normalize::Div => encode::<NORM_DIV>(t, x, p, out),
                }
            }
        }
    }

    /// The one-pass sum and exactness scan of [`crate::absmax_mean`], compiled for AVX2.
    pub(crate) fn sum_scan(self, x: &[f32]) -> crate::SumScan {
        // SAFETY: `self` exists only after AVX2 was detected (`new`); the function only reads
        // `x` through safe code.
        unsafe { sum_scan(x) }
    }

    /// `out[i] = values[codes[i]] * scales[i / size]`.
    pub(crate) fn decode_scaled(
        self,
        map: &DynamicMap,
        codes: &[u8],
        size: usize,
        scales: &[f32],
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), codes.len(), "decode: output length");
        let values = map.values();
        for (codes, out, scale) in crate::simd::blocks(codes, out, size, scales) {
            decode_scaled(values, codes, scale, out)
        }
    }
}

/// Broadcast constants of one encode call.
#[derive(Clone, Copy)]
struct Consts {
    entries: *const i32,
    key_lo: __m256i,
    last: __m256i,
    shift: __m128i,
    off_mask: __m256i,
    sign: __m256i,
    step_mask: __m256i,
    ones_i: __m256i,
    abs_mask: __m256,
    one: __m256,
    c255: __m256i,
    p: __m256,
    pick_bytes: __m256i,
    pick_dwords: __m256i,
}

#[inline]
#[target_feature(enable = "avx2")]
fn consts(t: &Table, p: f32) -> Consts {
    Consts {
        entries: t.entries.as_ptr().cast::<i32>(),
        key_lo: _mm256_set1_epi32(t.key_lo as i32),
        last: _mm256_set1_epi32(t.last() as i32),
        shift: _mm_cvtsi32_si128(t.shift as i32),
        off_mask: _mm256_set1_epi32(((1u32 << t.shift) - 1) as i32),
        sign: _mm256_set1_epi32(i32::MIN),
        step_mask: _mm256_set1_epi32(((1u32 << OFFSET_BITS) - 1) as i32),
        ones_i: _mm256_set1_epi32(1),
        abs_mask: _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)),
        one: _mm256_set1_ps(1.0),
        c255: _mm256_set1_epi32(255),
        p: _mm256_set1_ps(p),
        // Byte 0 of each dword into the low 4 bytes of each 128-bit half, then those two dwords
        // next to each other.
        pick_bytes: _mm256_setr_epi8(
            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1,
            -1, -1, -1, -1, -1, -1, -1, -1, -1,
        ),
        pick_dwords: _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1),
    }
}

/// The 8 codes of 8 (not yet normalized) values, in the low 8 bytes.
///
/// # Safety
/// `c.entries` points to a table of `last + 1` entries (a [`Table`]'s).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn codes8<const NORM: u8>(c: &Consts, v: __m256) -> __m128i {
    let v = match NORM {
        NORM_MUL => _mm256_mul_ps(v, c.p),
        NORM_DIV => _mm256_div_ps(v, c.p),
        _ => v,
    };
    let b = _mm256_castps_si256(v);
    let key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32::<31>(b), c.sign));
    let d = _mm256_sub_epi32(key, c.key_lo);
    let idx = _mm256_min_epu32(_mm256_srl_epi32(d, c.shift), c.last);
    // SAFETY: every index is at most `last` (clamped above), inside the table (caller).
    let e = unsafe { _mm256_i32gather_epi32::<4>(c.entries, idx) };
    let off = _mm256_and_si256(d, c.off_mask);
    let step = _mm256_and_si256(e, c.step_mask);
    // off >= step ⇔ off > step − 1; both lie in [0, 2^24], so the signed compare is exact.
    let up = _mm256_cmpgt_epi32(off, _mm256_sub_epi32(step, c.ones_i));
    let code = _mm256_sub_epi32(_mm256_srli_epi32::<{ OFFSET_BITS as i32 }>(e), up);
    // Outside [-1, 1]: above 1 → 255; below −1 and NaN → 0 (the binary search's clamps).
    let in_range = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(
        _mm256_and_ps(v, c.abs_mask),
        c.one,
    ));
    let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, c.one));
    let code = _mm256_or_si256(
        _mm256_and_si256(code, in_range),
        _mm256_and_si256(above, c.c255),
    );
    let bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, c.pick_bytes), c.pick_dwords);
    _mm256_castsi256_si128(bytes)
}

/// # Safety
/// AVX2 is available; `out.len() == x.len()`.
#[target_feature(enable = "avx2")]
unsafe fn encode<const NORM: u8>(t: &Table, x: &[f32], p: f32, out: &mut [u8]) {
    let c = consts(t, p);
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: elements i .. i+16 lie inside `x` and `out` (equal lengths); the table is `t`'s.
        unsafe {
            let a = codes8::<NORM>(&c, _mm256_loadu_ps(src.add(i)));
            let b = codes8::<NORM>(&c, _mm256_loadu_ps(src.add(i + 8)));
            _mm_storeu_si128(dst.add(i).cast(), _mm_unpacklo_epi64(a, b));
        }
        i += 16;
    }
    while i < n {
        let r = (n - i).min(8);
        let mut buf = [0.0f32; 8];
        buf[..r].copy_from_slice(&x[i..i + r]);
        let mut codes = [0u8; 16];
        // SAFETY: `buf` holds 8 f32 and `codes` 16 bytes; the table is `t`'s.
        unsafe {
            let v = codes8::<NORM>(&c, _mm256_loadu_ps(buf.as_ptr()));
            _mm_storeu_si128(codes.as_mut_ptr().cast(), v);
        }
        out[i..i + r].copy_from_slice(&codes[..r]);
        i += r;
    }
}

/// # Safety
/// AVX2 is available.
#[target_feature(enable = "avx2")]
unsafe fn sum_scan(x: &[f32]) -> crate::SumScan {
    let abs = _mm256_set1_epi32(i32::MAX);
    let one = _mm256_set1_epi32(1);
    let mut acc = [_mm256_setzero_pd(); 4];
    let mut max = _mm256_setzero_si256();
    let mut min_m1 = _mm256_set1_epi32(-1);
    let mut or = _mm256_setzero_si256();
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 f32.
        let (v0, v1) = unsafe {
            (
                _mm256_loadu_ps(c.as_ptr()),
                _mm256_loadu_ps(c.as_ptr().add(8)),
            )
        };
        for (k, v) in [v0, v1].into_iter().enumerate() {
            let a = _mm256_and_si256(_mm256_castps_si256(v), abs);
            acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            acc[2 * k + 1] = _mm256_add_pd(
                acc[2 * k + 1],
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            );
            max = _mm256_max_epu32(max, a);
            min_m1 = _mm256_min_epu32(min_m1, _mm256_sub_epi32(a, one));
            or = _mm256_or_si256(or, a);
        }
    }
    let mut sums = [0.0f64; 16];
    let (mut maxs, mut mins, mut ors) = ([0u32; 8], [0u32; 8], [0u32; 8]);
    // SAFETY: each array holds the 32 bytes (or 4 × 32 bytes) stored into it.
    unsafe {
        for (k, a) in acc.iter().enumerate() {
            _mm256_storeu_pd(sums.as_mut_ptr().add(4 * k), *a);
        }
        _mm256_storeu_si256(maxs.as_mut_ptr().cast(), max);
        _mm256_storeu_si256(mins.as_mut_ptr().cast(), min_m1);
        _mm256_storeu_si256(ors.as_mut_ptr().cast(), or);
    }
    let tail = crate::sum_scan_portable(chunks.remainder());
    crate::SumScan {
        sum: sums.iter().sum::<f64>() + tail.sum,
        max_abs_bits: maxs.into_iter().fold(tail.max_abs_bits, u32::max),
        min_abs_bits_m1: mins.into_iter().fold(tail.min_abs_bits_m1, u32::min),
        fraction_or: ors.into_iter().fold(tail.fraction_or, |a, b| a | b),
    }
}

/// The plain loop: on the cores measured (AMD Zen 4) `vgatherdps` of 8 map values is slower than
/// 8 scalar loads, and AVX2 has no permute wide enough for a 256-entry table.
fn decode_scaled(values: &[f32; 256], codes: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = values[c as usize] * scale;
    }
}
