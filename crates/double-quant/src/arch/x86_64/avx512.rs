//! AVX-512 (F + BW + VL) slice kernels, 16 lanes.
//!
//! **Encode.** Per vector: the optional normalization (`vmulps`; for `x / p` the product
//! `x · (1/p)` when `p` and `1/p` are normal, otherwise `vdivps`), then the segment encoder of
//! [`Segments`] with no memory access per lane: the octave of `|v|` (exponent bits, clamped)
//! picks the split and the first segment from two-register tables (`vpermt2ps`, `vpermt2d`), one
//! compare chooses the segment, three one-register permutes fetch its scale, offset and largest
//! code, and one FMA, a truncation, a shift and a `vpminsd` give the code; the sign is mirrored
//! (signed map) or zeroes it (unsigned), NaN gives 0. A vector with a lane flagged near a
//! threshold or a split (about 1 in 50 on random data) is redone exactly: IEEE normalization,
//! then the bucket table (`base + (offset >= step)`, 16 scalar loads — faster than `vpgatherdd`
//! on AMD Zen 4 — clamped so every load stays in the table) with the binary search's clamps
//! outside `[-1, 1]`. Flagging covers every value within 16 keys of a threshold, and the product
//! `x · (1/p)` is within 4 keys of the quotient (see [`exact_codes16`]), so the codes are the
//! division's. The last partial vector uses masked loads and stores.
//!
//! **Decode.** With AVX-512 VBMI (Ice Lake, Zen 4 and later), 64 codes at a time from four byte
//! planes of the map (each a 256-entry byte table in four registers: two `vpermt2b` and a blend
//! per plane), assembled into f32 patterns with `vpunpck*` (about 3× the permute tree below).
//! Otherwise, and for the last < 64 codes: `vpmovzxbd` of 16 codes; the 256-entry map lives in
//! 16 registers and is looked up with eight `vpermt2ps` and a blend tree (faster than
//! `vgatherdps`, which is slower than scalar loads on AMD cores); `vmulps` by the scale.

use crate::encoder::{Encoder, Segments, Table, NEAR_KEYS, NEAR_MASK, NEAR_UNITS, OFFSET_BITS};
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
    pub(crate) fn encode(self, enc: &Encoder, x: &[f32], how: Normalize, p: f32, out: &mut [u8]) {
        assert_eq!(out.len(), x.len(), "encode: output length");
        let (t, s) = (enc.table(), enc.segments());
        // SAFETY: `self` exists only after AVX-512 F, BW and VL were detected (`new`); `out` and
        // `x` have the same length (asserted), which is all the kernel's pointer accesses rely on.
        unsafe {
            match how {
                Normalize::None => encode::<NORM_NONE>(t, s, x, p, out),
                Normalize::Mul => encode::<NORM_MUL>(t, s, x, p, out),
                Normalize::Div => encode::<NORM_DIV>(t, s, x, p, out),
            }
        }
    }

    /// The segment encoder alone on `v`: per lane the code and whether it is flagged, exactly as
    /// [`Segments::code`] computes them (for the tests).
    #[cfg(test)]
    pub(crate) fn segment_codes(self, s: &Segments, v: &[f32; 16]) -> ([u8; 16], u16) {
        // SAFETY: features detected (`new`); `v` holds 16 f32 and `out` 16 bytes.
        unsafe {
            let c = segment_consts(s);
            let (code, flags) = segment_codes16(&c, _mm512_loadu_ps(v.as_ptr()));
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(code));
            (out, flags)
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

/// Broadcast tables and constants of the segment encoder ([`Segments`]).
#[derive(Clone, Copy)]
struct SegmentConsts {
    split: [__m512; 2],
    first_segment: [__m512i; 2],
    scale: __m512,
    offset: __m512,
    max_code: __m512i,
    exp_min: __m512i,
    exp_max: __m512i,
    abs: __m512i,
    near_units: __m512i,
    near_mask: __m512i,
    near_keys: __m512i,
    near_keys2: __m512i,
    one: __m512i,
    c254: __m512i,
    signed: bool,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn segment_consts(s: &Segments) -> SegmentConsts {
    // SAFETY: each load reads 16 elements of an array of 16 or 32.
    let (split, first_segment, scale, offset, max_code) = unsafe {
        (
            [
                _mm512_loadu_ps(s.split.as_ptr()),
                _mm512_loadu_ps(s.split.as_ptr().add(16)),
            ],
            [
                _mm512_loadu_si512(s.first_segment.as_ptr().cast()),
                _mm512_loadu_si512(s.first_segment.as_ptr().add(16).cast()),
            ],
            _mm512_loadu_ps(s.scale.as_ptr()),
            _mm512_loadu_ps(s.offset.as_ptr()),
            _mm512_loadu_si512(s.max_code.as_ptr().cast()),
        )
    };
    SegmentConsts {
        split,
        first_segment,
        scale,
        offset,
        max_code,
        exp_min: _mm512_set1_epi32(s.exp_min as i32),
        exp_max: _mm512_set1_epi32(127),
        abs: _mm512_set1_epi32(i32::MAX),
        near_units: _mm512_set1_epi32(NEAR_UNITS),
        near_mask: _mm512_set1_epi32(NEAR_MASK),
        near_keys: _mm512_set1_epi32(NEAR_KEYS as i32),
        near_keys2: _mm512_set1_epi32(2 * NEAR_KEYS as i32),
        one: _mm512_set1_epi32(1),
        c254: _mm512_set1_epi32(254),
        signed: s.signed,
    }
}

/// The codes of 16 normalized values by [`Segments`] (as i32 lanes), and the lanes flagged near
/// a threshold or a split, whose codes must come from the exact table instead.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn segment_codes16(c: &SegmentConsts, v: __m512) -> (__m512i, __mmask16) {
    let vb = _mm512_castps_si512(v);
    let ab = _mm512_and_si512(vb, c.abs);
    let a = _mm512_castsi512_ps(ab);
    // The octave (biased exponent, clamped to the tables' range; the permutes read bits 0-4).
    let e = _mm512_min_epu32(
        _mm512_max_epu32(_mm512_srli_epi32::<23>(ab), c.exp_min),
        c.exp_max,
    );
    let split = _mm512_permutex2var_ps(c.split[0], e, c.split[1]);
    let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, split);
    let first = _mm512_permutex2var_epi32(c.first_segment[0], e, c.first_segment[1]);
    let seg = _mm512_mask_add_epi32(first, up, first, c.one);
    let scale = _mm512_permutexvar_ps(seg, c.scale);
    let offset = _mm512_permutexvar_ps(seg, c.offset);
    let max_code = _mm512_permutexvar_epi32(seg, c.max_code);
    // Fixed-point coordinate: code · 2^15 plus the fraction.
    let t = _mm512_cvttps_epi32(_mm512_fmsub_ps(a, scale, offset));
    let code = _mm512_min_epi32(_mm512_srli_epi32::<15>(t), max_code);
    let near_int = _mm512_testn_epi32_mask(_mm512_add_epi32(t, c.near_units), c.near_mask);
    let near_split = _mm512_cmplt_epu32_mask(
        _mm512_add_epi32(
            _mm512_sub_epi32(ab, _mm512_castps_si512(split)),
            c.near_keys,
        ),
        c.near_keys2,
    );
    let zero = _mm512_setzero_si512();
    let neg = _mm512_cmplt_epi32_mask(vb, zero);
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
    let code = if c.signed {
        let mirrored = _mm512_mask_sub_epi32(code, neg, c.c254, code);
        _mm512_maskz_max_epi32(ordered, mirrored, zero)
    } else {
        _mm512_maskz_mov_epi32(ordered & !neg, code)
    };
    (code, near_int | near_split)
}

/// The exact codes of 16 values: IEEE normalization (`vmulps` / `vdivps`) and the bucket table.
///
/// This is what the segment path falls back to for flagged vectors. Its product `x · (1/p)` is
/// `RN(x · RN(1/p))`, within 2 ulps of `RN(x / p)` (the reciprocal's relative error is at most
/// 2⁻²⁴, less than one ulp of the quotient, plus half an ulp from each rounding), so at most 4
/// apart in key units even across a binade boundary; every value within 16 keys of a threshold
/// is flagged (tested), so an unflagged product has the quotient's code.
///
/// # Safety
/// `c.entries` points to a table of `last + 1` entries (a [`Table`]'s).
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn exact_codes16<const NORM: u8>(c: &Consts, x: __m512) -> __m128i {
    // SAFETY: the caller's contract.
    unsafe { codes16::<NORM>(c, x) }
}

/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn encode<const NORM: u8>(t: &Table, s: &Segments, x: &[f32], p: f32, out: &mut [u8]) {
    let c = consts(t, p);
    let sc = segment_consts(s);
    // `x / p` as `x · (1/p)` when both are normal (see `exact_codes16`).
    let reciprocal = NORM == NORM_DIV && p.is_normal() && (1.0 / p).is_normal();
    let normalize = |v: __m512| match NORM {
        NORM_MUL => _mm512_mul_ps(v, c.p),
        NORM_DIV if reciprocal => _mm512_mul_ps(v, c.r),
        NORM_DIV => _mm512_div_ps(v, c.p),
        _ => v,
    };
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    // Output order of the two packs below: dword `j` of the result comes from dword
    // `4 · (j mod 4) + j / 4`.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: elements i .. i+64 lie inside `x` and `out` (equal lengths); the table is
        // `t`'s (for the exact path).
        unsafe {
            let xv: [__m512; 4] = core::array::from_fn(|k| _mm512_loadu_ps(src.add(i + 16 * k)));
            let mut codes = [_mm512_setzero_si512(); 4];
            let mut flags = [0u16; 4];
            for k in 0..4 {
                (codes[k], flags[k]) = segment_codes16(&sc, normalize(xv[k]));
            }
            if flags.iter().any(|&f| f != 0) {
                for k in 0..4 {
                    if flags[k] != 0 {
                        codes[k] = _mm512_cvtepu8_epi32(exact_codes16::<NORM>(&c, xv[k]));
                    }
                }
            }
            // Codes are 0..=255: unsigned saturation keeps them.
            let ab = _mm512_packus_epi32(codes[0], codes[1]);
            let cd = _mm512_packus_epi32(codes[2], codes[3]);
            let bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(ab, cd));
            _mm512_storeu_si512(dst.add(i).cast(), bytes);
        }
        i += 64;
    }
    while i < n {
        let m: __mmask16 = if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as u16
        };
        // SAFETY: the masked load and store touch only the `min(16, n - i)` elements from `i`,
        // inside `x` and `out` (equal lengths); masked-off lanes load 0.0 and are not stored.
        // The table is `t`'s (for the exact path).
        unsafe {
            let xv = _mm512_maskz_loadu_ps(m, src.add(i));
            let (code, flagged) = segment_codes16(&sc, normalize(xv));
            let codes = if flagged == 0 {
                _mm512_cvtepi32_epi8(code)
            } else {
                exact_codes16::<NORM>(&c, xv)
            };
            _mm_mask_storeu_epi8(dst.add(i).cast(), m, codes);
        }
        i += 16;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn encoders() -> [&'static Encoder; 2] {
        [Encoder::signed(), Encoder::unsigned()]
    }

    /// Every f32 bit pattern of `[0, 2]` and of its negation, 16 lanes per vector, in parallel
    /// runs of vectors: `f` gets the vectors of one run.
    fn every_f32_up_to_2(f: impl Fn(&mut dyn Iterator<Item = __m512>) + Sync) {
        let vectors = 2.0f32.to_bits() / 16 + 1;
        let runs = vectors.div_ceil(1 << 14);
        (0..runs).into_par_iter().for_each(|r| {
            let ks = (r << 14)..((r + 1) << 14).min(vectors);
            let mut it = ks.flat_map(|k| {
                [0u32, 0x8000_0000].map(|sign| {
                    let lanes: [u32; 16] = core::array::from_fn(|l| (16 * k + l as u32) | sign);
                    // SAFETY: `lanes` holds 16 u32 (an unaligned load; SSE2 is baseline).
                    unsafe { _mm512_loadu_ps(lanes.as_ptr().cast()) }
                })
            });
            f(&mut it);
        });
    }

    #[test]
    fn segment_codes_equal_the_table_for_every_unflagged_f32() {
        if Kernel::new().is_none() {
            return;
        }
        for enc in encoders() {
            let flagged = std::sync::atomic::AtomicU64::new(0);
            every_f32_up_to_2(|vectors| {
                // SAFETY: AVX-512 F, BW and VL were detected above; the table is the encoder's.
                unsafe {
                    let c = consts(enc.table(), 1.0);
                    let sc = segment_consts(enc.segments());
                    let mut count = 0u64;
                    for v in vectors {
                        let (code, f) = segment_codes16(&sc, v);
                        let exact = _mm512_cvtepu8_epi32(codes16::<NORM_NONE>(&c, v));
                        let wrong = _mm512_cmpneq_epi32_mask(code, exact) & !f;
                        if wrong != 0 {
                            let mut x = [0f32; 16];
                            _mm512_storeu_ps(x.as_mut_ptr(), v);
                            let l = wrong.trailing_zeros() as usize;
                            panic!("x = {:e} ({:#010x})", x[l], x[l].to_bits());
                        }
                        count += u64::from(f.count_ones());
                    }
                    flagged.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                }
            });
            // Flagged lanes (redone exactly) stay rare. (The f32 are dense near 0, where nothing
            // is flagged, so this rate is far below the one on data spread over [-1, 1].)
            let total = 2 * 16 * (2.0f32.to_bits() as u64 / 16 + 1);
            let flagged = flagged.into_inner();
            assert!(flagged * 1000 < total, "{flagged} of {total} flagged");
        }
    }

    #[test]
    fn simd_segment_codes_equal_the_model() {
        let Some(k) = Kernel::new() else { return };
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 32) as u32
        };
        for enc in encoders() {
            let s = enc.segments();
            for _ in 0..20_000 {
                // Random bit patterns of [-4, 4] plus the specials in lane 0.
                let mut v: [f32; 16] = core::array::from_fn(|_| {
                    f32::from_bits((next() % 0x4080_0000) | (next() & 0x8000_0000))
                });
                v[0] = [f32::NAN, f32::INFINITY, -0.0, 0.0, 1.0, -1.0, f32::MAX]
                    [(next() % 7) as usize];
                let (codes, flags) = k.segment_codes(s, &v);
                for l in 0..16 {
                    let (code, flagged) = s.code(v[l]);
                    assert_eq!(flags >> l & 1 == 1, flagged, "x = {:e}", v[l]);
                    assert_eq!(codes[l], code, "x = {:e}", v[l]);
                }
            }
        }
    }
}
