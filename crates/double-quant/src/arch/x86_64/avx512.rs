//! AVX-512 (F + BW + VL) slice kernels, 16 lanes.
//!
//! **Encode.** Per vector: the optional normalization (`vmulps` / `vdivps`, the scalar code's IEEE
//! operations), the order-preserving key (`x ^ (sign-mask | 0x8000_0000)`), the bucket index
//! `min((key - key_lo) >> shift, last)` (clamped, so every load stays inside the table), the 16
//! bucket entries (stored indices, 16 scalar loads, one vector reload: about 20 % faster than
//! `vpgatherdd` on AMD Zen 4, whose gathers are slow, and not hit by the microcode mitigation
//! that slows gathers on Intel cores), and `code = (entry >> 24) + (offset >= entry & 0xff_ffff)`
//! with an unsigned compare into a mask and a masked subtract of −1. Lanes outside `[-1, 1]` are
//! patched like the binary search clamps: `x > 1` → 255, everything else (`x < -1`, NaN) → 0. The
//! 16 codes are narrowed with `vpmovdb`. The last partial vector uses masked loads and stores.
//!
//! **Divided encode** (`x / p`, the optimizer's normalization): when `p` and `1/p` are normal,
//! the product `x · (1/p)` replaces the division (one `vmulps` instead of a `vdivps`). The product is
//! at most 4 keys from the quotient, so a vector with a lane within 8 keys of a threshold (or of
//! a bucket end, except for tiny values far below every threshold) is redone with the division:
//! the codes are the division's in every case (see `codes16_div`).
//!
//! **Decode.** With AVX-512 VBMI (Ice Lake, Zen 4 and later), 64 codes at a time from four byte
//! planes of the map (each a 256-entry byte table in four registers: two `vpermt2b` and a blend
//! per plane), assembled into f32 patterns with `vpunpck*` (about 3× the permute tree below).
//! Otherwise, and for the last < 64 codes: `vpmovzxbd` of 16 codes; the 256-entry map lives in
//! 16 registers and is looked up with eight `vpermt2ps` and a blend tree (faster than
//! `vgatherdps`, which is slower than scalar loads on AMD cores); `vmulps` by the scale.

use crate::encoder::{Table, OFFSET_BITS};
use crate::simd::Normalize;
use crate::{BytePlanes, DynamicMap};
use core::arch::x86_64::*;

const NORM_NONE: u8 = 0;
const NORM_MUL: u8 = 1;
const NORM_DIV: u8 = 2;

/// The AVX-512 kernels; a value exists only on a CPU with AVX-512 F, BW and VL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    /// AVX-512 VBMI is present too (byte permutes: the byte-plane decoder).
    vbmi: bool,
}

impl Kernel {
    /// True when the CPU has AVX-512 F, BW and VL.
    pub(crate) fn is_available() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }

    /// The kernels, if the CPU has the features.
    /// Detected once: the optimizer calls the slice kernels several times per 256-element block.
    pub(crate) fn new() -> Option<Self> {
        static DETECTED: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            Self::is_available().then(|| Kernel {
                vbmi: std::is_x86_feature_detected!("avx512vbmi"),
            })
        })
    }

    /// `out[i] = code(normalize(x[i]))`.
    pub(crate) fn encode(self, t: &Table, x: &[f32], how: Normalize, p: f32, out: &mut [u8]) {
        assert_eq!(out.len(), x.len(), "encode: output length");
        // SAFETY: `self` exists only after AVX-512 F, BW and VL were detected (`new`); `out` and
        // `x` have the same length (asserted), which is all the kernel's pointer accesses rely on.
        unsafe {
            match how {
                Normalize::None => encode::<NORM_NONE>(t, x, p, out),
                Normalize::Mul => encode::<NORM_MUL>(t, x, p, out),
                Normalize::Div => encode::<NORM_DIV>(t, x, p, out),
            }
        }
    }

    /// `out[i] = values[codes[i]] * scale`.
    pub(crate) fn decode_scaled(self, map: &DynamicMap, codes: &[u8], scale: f32, out: &mut [f32]) {
        assert_eq!(out.len(), codes.len(), "decode: output length");
        let (codes, out) = if self.vbmi {
            let whole = codes.len() / 64 * 64;
            let (c64, c_rest) = codes.split_at(whole);
            let (o64, o_rest) = out.split_at_mut(whole);
            // SAFETY: AVX-512 F, BW, VL and VBMI were detected (`new`); `c64` and `o64` both hold
            // `whole` elements, a multiple of 64.
            unsafe { decode_planes(map.byte_planes(), c64, scale, o64) };
            (c_rest, o_rest)
        } else {
            (codes, out)
        };
        // SAFETY: features detected (`new`); equal lengths (asserted, and split at the same
        // index); `values` holds 256 entries, so every u8 code indexes inside it.
        unsafe { decode_scaled(map.values(), codes, scale, out) }
    }
}

/// Broadcast constants of one encode call.
#[derive(Clone, Copy)]
struct Consts {
    entries: *const i32,
    key_lo: __m512i,
    last: __m512i,
    shift: __m512i,
    off_mask: __m512i,
    sign: __m512i,
    step_mask: __m512i,
    one: __m512,
    c255: __m512i,
    p: __m512,
    /// `1/p`, broadcast.
    r: __m512,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn consts(t: &Table, p: f32) -> Consts {
    Consts {
        entries: t.entries.as_ptr().cast::<i32>(),
        key_lo: _mm512_set1_epi32(t.key_lo as i32),
        last: _mm512_set1_epi32(t.last() as i32),
        shift: _mm512_set1_epi32(t.shift as i32),
        off_mask: _mm512_set1_epi32(((1u32 << t.shift) - 1) as i32),
        sign: _mm512_set1_epi32(i32::MIN),
        step_mask: _mm512_set1_epi32(((1u32 << OFFSET_BITS) - 1) as i32),
        one: _mm512_set1_ps(1.0),
        c255: _mm512_set1_epi32(255),
        p: _mm512_set1_ps(p),
        r: _mm512_set1_ps(1.0 / p),
    }
}

/// The bucket of each lane's key: its offset inside the bucket and the bucket's table entry (16
/// scalar loads from stored indices: about 20 % faster than `vpgatherdd` on AMD Zen 4).
///
/// # Safety
/// `c.entries` points to a table of `last + 1` entries (a [`Table`]'s).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn bucket16(c: &Consts, v: __m512) -> (__m512i, __m512i) {
    let b = _mm512_castps_si512(v);
    let key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32::<31>(b), c.sign));
    let d = _mm512_sub_epi32(key, c.key_lo);
    let idx = _mm512_min_epu32(_mm512_srlv_epi32(d, c.shift), c.last);
    let mut ix = [0u32; 16];
    // SAFETY: `ix` holds 16 u32.
    unsafe { _mm512_storeu_si512(ix.as_mut_ptr().cast(), idx) };
    // SAFETY: every index is at most `last` (clamped above), inside the table (caller).
    let ev: [i32; 16] = core::array::from_fn(|k| unsafe { *c.entries.add(ix[k] as usize) });
    // SAFETY: `ev` holds 16 i32.
    let e = unsafe { _mm512_loadu_si512(ev.as_ptr().cast()) };
    (_mm512_and_si512(d, c.off_mask), e)
}

/// The codes of the normalized values `v` from their [`bucket16`]: `base + (off >= step)`, then
/// the binary search's clamps outside `[-1, 1]` (above 1 → 255; below −1 and NaN → 0), narrowed
/// to bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn finish16(c: &Consts, v: __m512, off: __m512i, e: __m512i) -> __m128i {
    let up = _mm512_cmpge_epu32_mask(off, _mm512_and_si512(e, c.step_mask));
    let base = _mm512_srli_epi32::<OFFSET_BITS>(e);
    let code = _mm512_mask_sub_epi32(base, up, base, _mm512_set1_epi32(-1));
    let in_range = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(v), c.one);
    let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, c.one);
    let code = _mm512_mask_mov_epi32(_mm512_maskz_mov_epi32(in_range, code), above, c.c255);
    _mm512_cvtepi32_epi8(code)
}

/// The 16 codes of 16 (not yet normalized) values.
///
/// # Safety
/// `c.entries` points to a table of `last + 1` entries (a [`Table`]'s).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn codes16<const NORM: u8>(c: &Consts, v: __m512) -> __m128i {
    let v = match NORM {
        NORM_MUL => _mm512_mul_ps(v, c.p),
        NORM_DIV => _mm512_div_ps(v, c.p),
        _ => v,
    };
    // SAFETY: the caller's contract.
    let (off, e) = unsafe { bucket16(c, v) };
    finish16(c, v, off, e)
}

/// Key distance within which [`codes16_div`] treats a threshold as close enough that the
/// reciprocal product might land on its other side (the bound is 4; see there).
const MARGIN: u32 = 8;

/// Products below this magnitude are far from every decision threshold of either map (checked
/// by a test), so their codes never need the division.
pub(crate) const TINY: f32 = 1.0 / (1u64 << 30) as f32;

/// The codes of `x / p` (IEEE division) computed with `x · (1/p)` where that provably gives the
/// same code, and with the division where it might not.
///
/// `RN(x · RN(1/p))` is within 2 ulps of `RN(x / p)` (the reciprocal's relative error is at most
/// 2⁻²⁴, less than one ulp of the quotient, plus half an ulp from each rounding), so at most 4
/// apart in key units even across a binade boundary; subnormal quotients differ by less. The code
/// only changes at a threshold key, so if no threshold lies within [`MARGIN`] keys of the
/// product's key — the bucket's threshold (offset `step`) is farther and the key is not that close
/// to either end of its bucket (a neighbour bucket's threshold) — the product's code is the
/// quotient's. Otherwise the whole vector is redone with `vdivps`. The clamps at ±1 give the same
/// codes as the table there (0 at −1, 255 at 1), and NaN and infinities are the same either way.
/// Callers use it only when `p` and `1/p` are normal.
///
/// # Safety
/// As [`codes16`]; `c.r` holds `1/p`, which is normal.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn codes16_div(c: &Consts, x: __m512) -> __m128i {
    let v = _mm512_mul_ps(x, c.r);
    // SAFETY: the caller's contract.
    let (off, e) = unsafe { bucket16(c, v) };
    let step = _mm512_and_si512(e, c.step_mask);
    let margin = _mm512_set1_epi32(MARGIN as i32);
    // |off − step| < MARGIN, or off within MARGIN of either end of the bucket.
    let near_step = _mm512_cmplt_epu32_mask(
        _mm512_add_epi32(_mm512_sub_epi32(off, step), margin),
        _mm512_set1_epi32(2 * MARGIN as i32),
    );
    // Bucket ends matter only where a threshold could be near: ±0 (a bucket edge) and other
    // tiny products are far below every threshold (the smallest is above 2⁻³⁰ in magnitude).
    let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), _mm512_set1_ps(TINY));
    let near_end = (_mm512_cmplt_epu32_mask(off, margin)
        | _mm512_cmpgt_epu32_mask(off, _mm512_sub_epi32(c.off_mask, margin)))
        & !tiny;
    if near_step | near_end != 0 {
        // SAFETY: the caller's contract is `codes16`'s.
        return unsafe { codes16_divided_exactly(c, x) };
    }
    finish16(c, v, off, e)
}

/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn encode<const NORM: u8>(t: &Table, x: &[f32], p: f32, out: &mut [u8]) {
    let c = consts(t, p);
    if NORM == NORM_DIV && p.is_normal() && (1.0 / p).is_normal() {
        // SAFETY: the caller's contract; `1/p` is normal.
        unsafe { encode_div(&c, x, out) };
        return;
    }
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: elements i .. i+32 lie inside `x` and `out` (equal lengths); the table is `t`'s.
        unsafe {
            let a = codes16::<NORM>(&c, _mm512_loadu_ps(src.add(i)));
            let b = codes16::<NORM>(&c, _mm512_loadu_ps(src.add(i + 16)));
            _mm_storeu_si128(dst.add(i).cast(), a);
            _mm_storeu_si128(dst.add(i + 16).cast(), b);
        }
        i += 32;
    }
    while i < n {
        let m: __mmask16 = if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as u16
        };
        // SAFETY: the masked load and store touch only the `min(16, n - i)` elements from `i`,
        // inside `x` and `out`; masked-off lanes load 0.0 (any lane's bucket is clamped anyway).
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, src.add(i));
            _mm_mask_storeu_epi8(dst.add(i).cast(), m, codes16::<NORM>(&c, v));
        }
        i += 16;
    }
}

/// [`codes16`] with the division: the rare vectors [`codes16_div`] cannot settle, kept out of
/// line so that the common path inlines.
///
/// # Safety
/// As [`codes16`].
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn codes16_divided_exactly(c: &Consts, x: __m512) -> __m128i {
    // SAFETY: the caller's contract.
    unsafe { codes16::<NORM_DIV>(c, x) }
}

/// [`encode`] for `x / p` through [`codes16_div`].
///
/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`; `c.r` is `1/p` and normal.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn encode_div(c: &Consts, x: &[f32], out: &mut [u8]) {
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: elements i .. i+16 lie inside `x` and `out` (equal lengths).
        unsafe {
            let codes = codes16_div(c, _mm512_loadu_ps(src.add(i)));
            _mm_storeu_si128(dst.add(i).cast(), codes);
        }
        i += 16;
    }
    if i < n {
        let m = ((1u32 << (n - i)) - 1) as u16;
        // SAFETY: the masked load and store touch only the `n - i` elements from `i`.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, src.add(i));
            _mm_mask_storeu_epi8(dst.add(i).cast(), m, codes16_div(c, v));
        }
    }
}

/// Values of 64 codes from the four byte planes (AVX-512 VBMI), times `scale`.
///
/// Each plane is a 256-entry byte table in four registers: `vpermt2b` looks up codes 0–127 and
/// 128–255 (the low 7 bits) and a blend on bit 7 picks one. `vpunpck{l,h}bw` and `vpunpck{l,h}wd`
/// then assemble the f32 bit patterns, which leaves, in each 128-bit lane `L` of output vector
/// `k`, the elements `16L + 4k ..` of the input order; the codes are permuted beforehand (a 4×4
/// transpose of 4-byte groups) so that the outputs come out in order.
///
/// # Safety
/// AVX-512 F, BW, VL and VBMI are available; `codes.len() == out.len()`, a multiple of 64.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn decode_planes(planes: &BytePlanes, codes: &[u8], scale: f32, out: &mut [f32]) {
    let s = _mm512_set1_ps(scale);
    let t: [[__m512i; 4]; 4] = core::array::from_fn(|k| {
        core::array::from_fn(|q| {
            // SAFETY: each plane holds 256 bytes: four 64-byte loads at 64·q, q < 4.
            unsafe { _mm512_loadu_si512(planes[k].as_ptr().add(64 * q).cast()) }
        })
    });
    let transpose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 64 <= codes.len() {
        // SAFETY: codes i .. i+64 and outputs i .. i+64 are in bounds (equal lengths).
        unsafe {
            let c = _mm512_permutexvar_epi32(transpose, _mm512_loadu_si512(src.add(i).cast()));
            let high = _mm512_movepi8_mask(c);
            let plane = |k: usize| {
                let lo = _mm512_permutex2var_epi8(t[k][0], c, t[k][1]);
                let hi = _mm512_permutex2var_epi8(t[k][2], c, t[k][3]);
                _mm512_mask_blend_epi8(high, lo, hi)
            };
            let (b0, b1, b2, b3) = (plane(0), plane(1), plane(2), plane(3));
            let (lo01, hi01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
            let (lo23, hi23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
            let v = [
                _mm512_unpacklo_epi16(lo01, lo23),
                _mm512_unpackhi_epi16(lo01, lo23),
                _mm512_unpacklo_epi16(hi01, hi23),
                _mm512_unpackhi_epi16(hi01, hi23),
            ];
            for (k, v) in v.into_iter().enumerate() {
                _mm512_storeu_ps(
                    dst.add(i + 16 * k),
                    _mm512_mul_ps(_mm512_castsi512_ps(v), s),
                );
            }
        }
        i += 64;
    }
}

/// The map values of 16 codes (`idx` holds codes 0..=255): eight two-table permutes (`vpermt2ps`,
/// 32 entries each, indexed by bits 0–4) and a blend tree on bits 5, 6 and 7.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn lookup16(t: &[__m512; 16], idx: __m512i) -> __m512 {
    let p = |k: usize| _mm512_permutex2var_ps(t[2 * k], idx, t[2 * k + 1]);
    let bit = |b: i32| _mm512_test_epi32_mask(idx, _mm512_set1_epi32(b));
    let (m5, m6, m7) = (bit(32), bit(64), bit(128));
    let q0 = _mm512_mask_blend_ps(m5, p(0), p(1));
    let q1 = _mm512_mask_blend_ps(m5, p(2), p(3));
    let q2 = _mm512_mask_blend_ps(m5, p(4), p(5));
    let q3 = _mm512_mask_blend_ps(m5, p(6), p(7));
    let r0 = _mm512_mask_blend_ps(m6, q0, q1);
    let r1 = _mm512_mask_blend_ps(m6, q2, q3);
    _mm512_mask_blend_ps(m7, r0, r1)
}

/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == codes.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn decode_scaled(values: &[f32; 256], codes: &[u8], scale: f32, out: &mut [f32]) {
    let n = codes.len();
    let s = _mm512_set1_ps(scale);
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    // SAFETY: `values` holds 256 f32: 16 vectors of 16.
    let t: [__m512; 16] =
        core::array::from_fn(|k| unsafe { _mm512_loadu_ps(values.as_ptr().add(16 * k)) });
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: codes i .. i+16 and outputs i .. i+16 are in bounds (equal lengths).
        unsafe {
            let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(src.add(i).cast()));
            _mm512_storeu_ps(dst.add(i), _mm512_mul_ps(lookup16(&t, idx), s));
        }
        i += 16;
    }
    if i < n {
        let m = ((1u32 << (n - i)) - 1) as u16;
        // SAFETY: the masked load and store touch only the `n - i` elements from `i`.
        unsafe {
            let idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, src.add(i).cast()));
            _mm512_mask_storeu_ps(dst.add(i), m, _mm512_mul_ps(lookup16(&t, idx), s));
        }
    }
}
