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
//! **Decode.** `vpmovzxbd` of 16 codes; the 256-entry map lives in 16 registers and is looked up
//! with eight `vpermt2ps` and a blend tree (faster than `vgatherdps`, which is slower than scalar
//! loads on AMD cores); `vmulps` by the scale.

use crate::encoder::{Table, OFFSET_BITS};
use crate::simd::Normalize;
use core::arch::x86_64::*;

const NORM_NONE: u8 = 0;
const NORM_MUL: u8 = 1;
const NORM_DIV: u8 = 2;

/// The AVX-512 kernels; a value exists only on a CPU with AVX-512 F, BW and VL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// True when the CPU has AVX-512 F, BW and VL.
    pub(crate) fn is_available() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }

    /// The kernels, if the CPU has the features.
    pub(crate) fn new() -> Option<Self> {
        Self::is_available().then_some(Kernel {
            _features_detected: (),
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
    pub(crate) fn decode_scaled(
        self,
        values: &[f32; 256],
        codes: &[u8],
        scale: f32,
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), codes.len(), "decode: output length");
        // SAFETY: features detected (`new`); equal lengths asserted; `values` holds 256 entries,
        // so every u8 code indexes inside it.
        unsafe { decode_scaled(values, codes, scale, out) }
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
    }
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
    let off = _mm512_and_si512(d, c.off_mask);
    let up = _mm512_cmpge_epu32_mask(off, _mm512_and_si512(e, c.step_mask));
    let base = _mm512_srli_epi32::<OFFSET_BITS>(e);
    let code = _mm512_mask_sub_epi32(base, up, base, _mm512_set1_epi32(-1));
    // Outside [-1, 1]: above 1 → 255; below −1 and NaN → 0 (the binary search's clamps).
    let in_range = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(v), c.one);
    let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, c.one);
    let code = _mm512_mask_mov_epi32(_mm512_maskz_mov_epi32(in_range, code), above, c.c255);
    _mm512_cvtepi32_epi8(code)
}

/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn encode<const NORM: u8>(t: &Table, x: &[f32], p: f32, out: &mut [u8]) {
    let c = consts(t, p);
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
