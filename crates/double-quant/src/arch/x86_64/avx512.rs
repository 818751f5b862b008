//! AVX-512 (F + BW + VL) slice kernels, 16 lanes.
//!
//! **Encode.** Per vector: the optional normalization (`vmulps`; for `x / p` the product
//! `x · (1/p)` when `p` and `1/p` are normal, otherwise `vdivps`), then the segment encoder of
//! [`Segments`] with no memory access per lane: the octave of `|v|` (exponent bits, clamped)
//! fetches one table entry (`vpermt2d`) holding the split inside the octave and the octave's
//! first segment; an integer compare with the split picks the segment, three one-register
//! permutes fetch its scale, offset and largest code, and one FMA, a truncation, a shift and a
//! `vpminsd` give the code. The signed map mirrors negative values; for the unsigned map negative
//! bit patterns are clamped to +0 first. 64 codes are packed with `vpackus*` and stored at once.
//! Lanes flagged near a threshold or a split (about 1 in 1000 on random data) are then redone one
//! by one with the IEEE normalization and [`Encoder::encode`] (see [`fix_flagged`]; NaN lanes get
//! code 0 without it). Flagging covers every value within 8 keys of a threshold, and the product
//! `x · (1/p)` is within 4 keys of the quotient, so the codes are the division's. The last
//! partial vectors use masked loads and stores.
//!
//! **Decode.** With AVX-512 VBMI (Ice Lake, Zen 4 and later), 64 codes at a time from four byte
//! planes of the map (each a 256-entry byte table in four registers: two `vpermt2b` and a blend
//! per plane), assembled into f32 patterns with `vpunpck*` (about 3× the permute tree below).
//! Otherwise, and for the last < 64 codes: `vpmovzxbd` of 16 codes; the 256-entry map lives in
//! 16 registers and is looked up with eight `vpermt2ps` and a blend tree (faster than
//! `vgatherdps`, which is slower than scalar loads on AMD cores); `vmulps` by the scale.

use crate::encoder::{Encoder, Segments, NEAR_MASK, NEAR_UNITS, SPLIT_UP, SPLIT_WINDOW};
use crate::simd::Normalize;
#[cfg(test)]
use crate::NESTED_BLOCKSIZE;
use crate::{BytePlanes, CpuFeatures, DynamicMap, Implementation};
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
    /// The kernels, if the CPU has the features of [`Implementation::Avx512`] (AVX-512 F, BW, DQ,
    /// VL; these kernels use F, BW and VL, and VBMI where the CPU has it). Cheap (the features are
    /// detected once): the optimizer calls the slice kernels several times per 256-element block.
    #[inline]
    pub(crate) fn new() -> Option<Self> {
        Implementation::Avx512.is_available().then(|| Kernel {
            vbmi: CpuFeatures::get().avx512vbmi,
        })
    }

    /// `out[i] = code(normalize(x[i], p))` with `p = ps[i / size]`.
    #[inline]
    pub(crate) fn encode(
        self,
        enc: &Encoder,
        x: &[f32],
        how: Normalize,
        size: usize,
        ps: &[f32],
        out: &mut [u8],
    ) {
        assert_eq!(out.len(), x.len(), "encode: output length");
        // SAFETY: `self` exists only after AVX-512 F, BW and VL were detected (`new`); `out` and
        // `x` have the same length (asserted), which is all the kernel's pointer accesses rely on.
        unsafe {
            match how {
                Normalize::None => encode::<NORM_NONE>(enc, x, size, ps, out),
                Normalize::Mul => encode::<NORM_MUL>(enc, x, size, ps, out),
                Normalize::Div => encode::<NORM_DIV>(enc, x, size, ps, out),
            }
        }
    }

    /// [`Implementation::update_blockwise`](crate::Implementation::update_blockwise) in one
    /// function with the tables in registers; without VBMI nothing is done and the states come
    /// back as the error, for the caller's generic loop.
    #[inline]
    pub(crate) fn update_blocks<'a, U, A>(
        self,
        enc: [&Encoder; 2],
        pad: [u8; 2],
        st: crate::BlockwiseStatesMut<'a>,
        update: U,
        after: A,
    ) -> Result<(), crate::BlockwiseStatesMut<'a>>
    where
        U: FnMut(usize, &mut [f32; 256], &mut [f32; 256]) -> [f32; 2],
        A: FnMut(usize, &mut [u8], &mut [u8], &[f32; 256], &[f32; 256]),
    {
        if !self.vbmi {
            return Err(st);
        }
        // SAFETY: `self.vbmi` is set only after AVX-512 F, BW, VL and VBMI were detected (`new`);
        // the caller checked the lengths.
        unsafe { update_blocks_vbmi(enc, pad, st, update, after) };
        Ok(())
    }

    /// `centered[i] = x[i] - offset`, and the largest `|x[i] - offset|` with NaN ignored: the
    /// values of the portable `crate::center_and_absmax`, 16 lanes per instruction.
    #[inline]
    pub(crate) fn center_and_absmax(self, x: &[f32], offset: f32, centered: &mut [f32]) -> f32 {
        assert_eq!(centered.len(), x.len(), "center: output length");
        // SAFETY: `self` exists only after AVX-512 F, BW and VL were detected (`new`); the
        // lengths are equal (asserted), which is all the pointer accesses rely on.
        unsafe { center_and_absmax(x, offset, centered) }
    }

    /// The segment encoder alone on `v`: per lane the code and whether it is flagged, exactly as
    /// [`Segments::code`] computes them (for the tests).
    #[cfg(test)]
    pub(crate) fn segment_codes(self, s: &Segments, v: &[f32; 16]) -> ([u8; 16], u16) {
        // SAFETY: features detected (`new`); `v` holds 16 f32 and `out` 16 bytes.
        unsafe {
            let c = segment_consts(s);
            let (code, flags) = if s.signed {
                segment_codes16::<true>(&c, _mm512_loadu_ps(v.as_ptr()))
            } else {
                segment_codes16::<false>(&c, _mm512_loadu_ps(v.as_ptr()))
            };
            let code = _mm512_max_epi32(code, _mm512_setzero_si512());
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(code));
            (out, flags)
        }
    }

    /// `out[i] = values[codes[i]] * scales[i / size]`.
    #[inline]
    pub(crate) fn decode_scaled(
        self,
        map: &DynamicMap,
        codes: &[u8],
        size: usize,
        scales: &[f32],
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), codes.len(), "decode: output length");
        if self.vbmi && size.is_multiple_of(64) {
            let whole = codes.len() / 64 * 64;
            let (c64, c_rest) = codes.split_at(whole);
            let (o64, o_rest) = out.split_at_mut(whole);
            // SAFETY: AVX-512 F, BW, VL and VBMI were detected (`new`); `c64` and `o64` both hold
            // `whole` elements, a multiple of 64 (and `size` is one too).
            unsafe { decode_planes(map.byte_planes(), c64, size, scales, o64) };
            if let Some(&scale) = scales.get(whole / size) {
                // SAFETY: as below; the rest lies inside the block `whole / size`.
                unsafe { decode_scaled(map.values(), c_rest, scale, o_rest) }
            }
            return;
        }
        for (codes, out, scale) in crate::simd::blocks(codes, out, size, scales) {
            let (codes, out) = if self.vbmi {
                let whole = codes.len() / 64 * 64;
                let (c64, c_rest) = codes.split_at(whole);
                let (o64, o_rest) = out.split_at_mut(whole);
                // SAFETY: AVX-512 F, BW, VL and VBMI were detected (`new`); `c64` and `o64` both
                // hold `whole` elements, a multiple of 64, all in one block of that size.
                unsafe { decode_planes(map.byte_planes(), c64, whole.max(64), &[scale], o64) };
                (c_rest, o_rest)
            } else {
                (codes, out)
            };
            // SAFETY: features detected (`new`); equal lengths (asserted, chunked and split
            // alike); `values` holds 256 entries, so every u8 code indexes inside it.
            unsafe { decode_scaled(map.values(), codes, scale, out) }
        }
    }
}

/// Broadcast tables and constants of the segment encoder ([`Segments`]).
#[derive(Clone, Copy)]
struct SegmentConsts {
    octave: [__m512i; 2],
    scale: __m512,
    offset: __m512,
    max_code: __m512i,
    exp_min: __m512i,
    exp_max: __m512i,
    abs: __m512i,
    near_units: __m512i,
    near_mask: __m512i,
    split_up: __m512i,
    split_window: __m512i,
    fifteen: __m512i,
    one: __m512i,
    c254: __m512i,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn segment_consts(s: &Segments) -> SegmentConsts {
    // SAFETY: each load reads 16 elements of an array of 16 or 32.
    let (octave, scale, offset, max_code) = unsafe {
        (
            [
                _mm512_loadu_si512(s.octave.as_ptr().cast()),
                _mm512_loadu_si512(s.octave.as_ptr().add(16).cast()),
            ],
            _mm512_loadu_ps(s.scale.as_ptr()),
            _mm512_loadu_ps(s.offset.as_ptr()),
            _mm512_loadu_si512(s.max_code.as_ptr().cast()),
        )
    };
    SegmentConsts {
        octave,
        scale,
        offset,
        max_code,
        exp_min: _mm512_set1_epi32(s.exp_min as i32),
        exp_max: _mm512_set1_epi32(127),
        abs: _mm512_set1_epi32(i32::MAX),
        near_units: _mm512_set1_epi32(NEAR_UNITS),
        near_mask: _mm512_set1_epi32(NEAR_MASK),
        split_up: _mm512_set1_epi32(SPLIT_UP),
        split_window: _mm512_set1_epi32(SPLIT_WINDOW as i32),
        fifteen: _mm512_set1_epi32(15),
        one: _mm512_set1_epi32(1),
        c254: _mm512_set1_epi32(254),
    }
}

/// The codes of 16 normalized values by [`Segments`] (as i32 lanes, −1 standing for 0), and the
/// lanes flagged near a threshold or a split, whose codes must come from the exact table instead.
/// `SIGNED` must be the segments' signedness.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn segment_codes16<const SIGNED: bool>(c: &SegmentConsts, v: __m512) -> (__m512i, __mmask16) {
    let vb = _mm512_castps_si512(v);
    // Signed map: the magnitude (the sign is mirrored at the end). Unsigned map: negative values
    // (and -0, negative NaN) become +0, whose code 0 is theirs.
    let ab = if SIGNED {
        _mm512_and_si512(vb, c.abs)
    } else {
        _mm512_max_epi32(vb, _mm512_setzero_si512())
    };
    let a = _mm512_castsi512_ps(ab);
    // The octave (biased exponent, clamped to the tables' range; the permute reads bits 0-4),
    // its entry, and the key distance `d` from the entry (see `Segments::octave`).
    let e = _mm512_min_epu32(
        _mm512_max_epu32(_mm512_srli_epi32::<23>(ab), c.exp_min),
        c.exp_max,
    );
    let entry = _mm512_permutex2var_epi32(c.octave[0], e, c.octave[1]);
    let d = _mm512_sub_epi32(ab, entry);
    let up = _mm512_cmpgt_epi32_mask(d, c.split_up);
    let near_split = _mm512_cmplt_epu32_mask(d, c.split_window);
    let first = _mm512_and_si512(entry, c.fifteen);
    let seg = _mm512_mask_add_epi32(first, up, first, c.one);
    let scale = _mm512_permutexvar_ps(seg, c.scale);
    let offset = _mm512_permutexvar_ps(seg, c.offset);
    let max_code = _mm512_permutexvar_epi32(seg, c.max_code);
    // Fixed-point coordinate: code · 2^15 plus the fraction.
    let t = _mm512_cvttps_epi32(_mm512_fmsub_ps(a, scale, offset));
    let code = _mm512_min_epi32(_mm512_srli_epi32::<15>(t), max_code);
    let near_int = _mm512_testn_epi32_mask(_mm512_add_epi32(t, c.near_units), c.near_mask);
    // NaN and infinities are flagged by `near_int` (see `Segments`), so they need no patch here.
    let code = if SIGNED {
        // 254 − 255 = −1 for the top code's mirror: the callers' unsigned saturation (the packs,
        // or a max with 0) makes it 0.
        let neg = _mm512_cmplt_epi32_mask(vb, _mm512_setzero_si512());
        _mm512_mask_sub_epi32(code, neg, c.c254, code)
    } else {
        code
    };
    (code, near_int | near_split)
}

/// The exact codes of the flagged lanes `flags` (bit `l`: element `l`) of `x[..]`, written over
/// `out[l]`: the IEEE normalization (`x · p` or `x / p`) and [`Encoder::encode`].
///
/// This is what the segment path falls back to. Its product `x · (1/p)` is `RN(x · RN(1/p))`,
/// within 2 ulps of `RN(x / p)` (the reciprocal's relative error is at most 2⁻²⁴, less than one
/// ulp of the quotient, plus half an ulp from each rounding), so at most 4 apart in key units
/// even across a binade boundary; every value within 8 keys of a threshold is flagged (tested),
/// so an unflagged product has the quotient's code.
#[cold]
#[inline(never)]
fn fix_flagged<const NORM: u8>(enc: &Encoder, x: &[f32], p: f32, mut flags: u64, out: &mut [u8]) {
    while flags != 0 {
        let l = flags.trailing_zeros() as usize;
        flags &= flags - 1;
        let v = match NORM {
            NORM_MUL => x[l] * p,
            NORM_DIV => x[l] / p,
            _ => x[l],
        };
        out[l] = enc.encode(v);
    }
}

/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn encode<const NORM: u8>(
    enc: &Encoder,
    x: &[f32],
    size: usize,
    ps: &[f32],
    out: &mut [u8],
) {
    let sc = segment_consts(enc.segments());
    for (x, out, p) in crate::simd::blocks(x, out, size, ps) {
        // SAFETY: the caller's contract (chunked alike, so the lengths stay equal).
        unsafe { encode_with::<NORM>(enc, &sc, x, p, out) }
    }
}

/// [`encode_segments`] for the signedness of `enc`'s map.
///
/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`; `sc` are the constants of
/// `enc`'s segments.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn encode_with<const NORM: u8>(
    enc: &Encoder,
    sc: &SegmentConsts,
    x: &[f32],
    p: f32,
    out: &mut [u8],
) {
    // SAFETY: the caller's contract; the const parameter is the map's signedness.
    unsafe {
        if enc.segments().signed {
            encode_segments::<NORM, true>(enc, sc, x, p, out)
        } else {
            encode_segments::<NORM, false>(enc, sc, x, p, out)
        }
    }
}

/// # Safety
/// AVX-512 F, BW and VL are available; `out.len() == x.len()`; `sc` are the constants of
/// `enc`'s segments and `SIGNED` is their signedness.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn encode_segments<const NORM: u8, const SIGNED: bool>(
    enc: &Encoder,
    sc: &SegmentConsts,
    x: &[f32],
    p: f32,
    out: &mut [u8],
) {
    let (pv, rv) = (_mm512_set1_ps(p), _mm512_set1_ps(1.0 / p));
    // `x / p` as `x · (1/p)` when both are normal (see `fix_flagged`).
    let reciprocal = NORM == NORM_DIV && p.is_normal() && (1.0 / p).is_normal();
    let normalize = |v: __m512| match NORM {
        NORM_MUL => _mm512_mul_ps(v, pv),
        NORM_DIV if reciprocal => _mm512_mul_ps(v, rv),
        NORM_DIV => _mm512_div_ps(v, pv),
        _ => v,
    };
    let n = x.len();
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    // Output order of the two packs below: dword `j` of the result comes from dword
    // `4 · (j mod 4) + j / 4`.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: elements i .. i+64 lie inside `x` and `out` (equal lengths).
        unsafe {
            let v: [__m512; 4] =
                core::array::from_fn(|k| normalize(_mm512_loadu_ps(src.add(i + 16 * k))));
            let ((c0, f0), (c1, f1), (c2, f2), (c3, f3)) = (
                segment_codes16::<SIGNED>(sc, v[0]),
                segment_codes16::<SIGNED>(sc, v[1]),
                segment_codes16::<SIGNED>(sc, v[2]),
                segment_codes16::<SIGNED>(sc, v[3]),
            );
            // Codes are 0..=255: unsigned saturation keeps them.
            let lo = _mm512_packus_epi32(c0, c1);
            let hi = _mm512_packus_epi32(c2, c3);
            let bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(lo, hi));
            _mm512_storeu_si512(dst.add(i).cast(), bytes);
            let flags =
                u64::from(f0) | u64::from(f1) << 16 | u64::from(f2) << 32 | u64::from(f3) << 48;
            if flags != 0 {
                // NaN lanes (all of them in a block of zeros divided by its zero absmax) get code
                // 0 here, not one by one.
                let nan = v.map(|v| u64::from(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)));
                let nan = nan[0] | nan[1] << 16 | nan[2] << 32 | nan[3] << 48;
                _mm512_mask_storeu_epi8(dst.add(i).cast(), nan, _mm512_setzero_si512());
                let rest = flags & !nan;
                if rest != 0 {
                    fix_flagged::<NORM>(enc, &x[i..i + 64], p, rest, &mut out[i..i + 64]);
                }
            }
        }
        i += 64;
    }
    while i < n {
        let len = (n - i).min(16);
        let m = ((1u32 << len) - 1) as u16;
        // SAFETY: the masked load and store touch only the `len` elements from `i`, inside `x`
        // and `out` (equal lengths); masked-off lanes load 0.0 and are not stored.
        let flags = unsafe {
            let v = normalize(_mm512_maskz_loadu_ps(m, src.add(i)));
            let (code, flags) = segment_codes16::<SIGNED>(sc, v);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let code = _mm512_maskz_max_epi32(!nan, code, _mm512_setzero_si512());
            _mm_mask_storeu_epi8(dst.add(i).cast(), m, _mm512_cvtepi32_epi8(code));
            flags & m & !nan
        };
        if flags != 0 {
            fix_flagged::<NORM>(
                enc,
                &x[i..i + len],
                p,
                u64::from(flags),
                &mut out[i..i + len],
            );
        }
        i += 16;
    }
}

/// The byte planes of one map in registers, and the code permutation of [`decode64`].
#[derive(Clone, Copy)]
struct PlaneTables {
    t: [[__m512i; 4]; 4],
    transpose: __m512i,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn load_planes(planes: &BytePlanes) -> PlaneTables {
    PlaneTables {
        t: core::array::from_fn(|k| {
            core::array::from_fn(|q| {
                // SAFETY: each plane holds 256 bytes: four 64-byte loads at 64·q, q < 4.
                unsafe { _mm512_loadu_si512(planes[k].as_ptr().add(64 * q).cast()) }
            })
        }),
        transpose: _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
    }
}

/// Values of the 64 codes at `src` from the four byte planes (AVX-512 VBMI), times `s`, in order.
///
/// Each plane is a 256-entry byte table in four registers: `vpermt2b` looks up codes 0–127 and
/// 128–255 (the low 7 bits) and a blend on bit 7 picks one. `vpunpck{l,h}bw` and `vpunpck{l,h}wd`
/// then assemble the f32 bit patterns, which leaves, in each 128-bit lane `L` of output vector
/// `k`, the elements `16L + 4k ..` of the input order; the codes are permuted beforehand (a 4×4
/// transpose of 4-byte groups) so that the outputs come out in order.
///
/// # Safety
/// `src` points to 64 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn decode64(p: &PlaneTables, src: *const u8, s: __m512) -> [__m512; 4] {
    // SAFETY: the caller's contract.
    let c = _mm512_permutexvar_epi32(p.transpose, unsafe { _mm512_loadu_si512(src.cast()) });
    let high = _mm512_movepi8_mask(c);
    let t = &p.t;
    let plane = |k: usize| {
        let lo = _mm512_permutex2var_epi8(t[k][0], c, t[k][1]);
        let hi = _mm512_permutex2var_epi8(t[k][2], c, t[k][3]);
        _mm512_mask_blend_epi8(high, lo, hi)
    };
    let (b0, b1, b2, b3) = (plane(0), plane(1), plane(2), plane(3));
    let (lo01, hi01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
    let (lo23, hi23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
    [
        _mm512_unpacklo_epi16(lo01, lo23),
        _mm512_unpackhi_epi16(lo01, lo23),
        _mm512_unpacklo_epi16(hi01, hi23),
        _mm512_unpackhi_epi16(hi01, hi23),
    ]
    .map(|v| _mm512_mul_ps(_mm512_castsi512_ps(v), s))
}

/// Values of 64 codes at a time ([`decode64`]); block `j` of `size` codes is scaled by
/// `scales[j]`.
///
/// # Safety
/// AVX-512 F, BW, VL and VBMI are available; `codes.len() == out.len()`, a multiple of 64, and
/// `size` a multiple of 64 with `scales` holding one scale per started block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
#[inline]
unsafe fn decode_planes(
    planes: &BytePlanes,
    codes: &[u8],
    size: usize,
    scales: &[f32],
    out: &mut [f32],
) {
    let p = load_planes(planes);
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    let (mut s, mut block, mut block_end) = (_mm512_setzero_ps(), 0, 0);
    while i + 64 <= codes.len() {
        if i == block_end {
            s = _mm512_set1_ps(scales[block]);
            block += 1;
            block_end += size;
        }
        // SAFETY: codes i .. i+64 and outputs i .. i+64 are in bounds (equal lengths).
        unsafe {
            for (k, v) in decode64(&p, src.add(i), s).into_iter().enumerate() {
                _mm512_storeu_ps(dst.add(i + 16 * k), v);
            }
        }
        i += 64;
    }
}

/// One block of [`Kernel::update_blocks`]: `out = values[codes] · scale`, the lanes past
/// `codes.len()` decoded from `pad`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
fn decode_block(p: &PlaneTables, codes: &[u8], pad: u8, scale: f32, out: &mut [f32; 256]) {
    let s = _mm512_set1_ps(scale);
    let decode = |src: &[u8; 256], out: &mut [f32; 256]| {
        for q in 0..4 {
            // SAFETY: `src` holds 256 bytes and `out` 256 f32: 64 of each at 64·q, q < 4.
            unsafe {
                for (k, v) in decode64(p, src.as_ptr().add(64 * q), s)
                    .into_iter()
                    .enumerate()
                {
                    _mm512_storeu_ps(out.as_mut_ptr().add(64 * q + 16 * k), v);
                }
            }
        }
    };
    if let Ok(whole) = <&[u8; 256]>::try_from(codes) {
        decode(whole, out);
    } else {
        let mut padded = [pad; 256];
        padded[..codes.len()].copy_from_slice(codes);
        decode(&padded, out);
    }
}

/// [`Kernel::update_blocks`] with VBMI: everything in one function, tables loaded once.
///
/// # Safety
/// AVX-512 F, BW, VL and VBMI are available; `st` has consistent lengths (checked by the caller).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn update_blocks_vbmi<U, A>(
    enc: [&Encoder; 2],
    pad: [u8; 2],
    st: crate::BlockwiseStatesMut<'_>,
    mut update: U,
    mut after: A,
) where
    U: FnMut(usize, &mut [f32; 256], &mut [f32; 256]) -> [f32; 2],
    A: FnMut(usize, &mut [u8], &mut [u8], &[f32; 256], &[f32; 256]),
{
    const B: usize = crate::OPTIMIZER_BLOCKSIZE;
    let planes = [
        load_planes(enc[0].map().byte_planes()),
        load_planes(enc[1].map().byte_planes()),
    ];
    let sc = [
        segment_consts(enc[0].segments()),
        segment_consts(enc[1].segments()),
    ];
    let (mut s1, mut s2) = ([0f32; B], [0f32; B]);
    let blocks = st
        .state1
        .chunks_mut(B)
        .zip(st.state2.chunks_mut(B))
        .zip(st.absmax1.iter_mut().zip(st.absmax2.iter_mut()));
    for (j, ((c1, c2), (a1, a2))) in blocks.enumerate() {
        decode_block(&planes[0], c1, pad[0], *a1, &mut s1);
        decode_block(&planes[1], c2, pad[1], *a2, &mut s2);
        let [new1, new2] = update(j, &mut s1, &mut s2);
        let m = c1.len();
        // SAFETY: features detected (caller); `s1[..m]` and `c1` (`s2[..m]` and `c2`) both hold
        // `m` elements; `sc[k]` are the constants of `enc[k]`'s segments.
        unsafe {
            encode_with::<NORM_DIV>(enc[0], &sc[0], &s1[..m], new1, c1);
            encode_with::<NORM_DIV>(enc[1], &sc[1], &s2[..m], new2, c2);
        }
        after(j, c1, c2, &s1, &s2);
        *a1 = new1;
        *a2 = new2;
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

/// `x[i] - offset` into `centered` and the largest `|x[i] - offset|`, NaN ignored: `vmaxps`
/// returns its second operand (the running maximum, never NaN) when the first is NaN, as
/// `f32::max` does; the last partial vector is masked.
///
/// # Safety
/// AVX-512 F, BW and VL are available; `centered.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn center_and_absmax(x: &[f32], offset: f32, centered: &mut [f32]) -> f32 {
    let o = _mm512_set1_ps(offset);
    let mut acc = _mm512_setzero_ps();
    let n = x.len();
    let mut i = 0;
    while i < n {
        let m = if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        };
        // SAFETY: the masked load and store touch only elements `i .. min(i + 16, n)` of `x` and
        // `centered` (equal lengths).
        let c = unsafe {
            let c = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)), o);
            _mm512_mask_storeu_ps(centered.as_mut_ptr().add(i), m, c);
            c
        };
        acc = _mm512_mask_max_ps(acc, m, _mm512_abs_ps(c), acc);
        i += 16;
    }
    _mm512_reduce_max_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn center_and_absmax_equals_the_portable_code() {
        let Some(k) = Kernel::new() else {
            return;
        };
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::from_bits(1),
            -f32::MIN_POSITIVE / 2.0,
            1e30,
            -3.5,
        ];
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut checked = 0;
        for len in 0..=NESTED_BLOCKSIZE + 17 {
            for trial in 0..4 {
                let x: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = next();
                        if trial > 0 && r % 13 == 0 {
                            specials[(r >> 8) as usize % specials.len()]
                        } else {
                            ((r >> 40) as f32 / (1u64 << 24) as f32) * 0.1
                        }
                    })
                    .collect();
                for offset in [0.0f32, 0.05, -0.0, 3e-39] {
                    let (mut a, mut b) = (vec![7f32; len], vec![7f32; len]);
                    let ma = crate::center_and_absmax(&x, offset, &mut a);
                    let mb = k.center_and_absmax(&x, offset, &mut b);
                    assert_eq!(ma.to_bits(), mb.to_bits(), "len {len} offset {offset}");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "len {len} offset {offset}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000);
    }

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
                // SAFETY: AVX-512 F, BW and VL were detected above.
                unsafe {
                    let sc = segment_consts(enc.segments());
                    let mut count = 0u64;
                    for v in vectors {
                        let (code, f) = if enc.segments().signed {
                            segment_codes16::<true>(&sc, v)
                        } else {
                            segment_codes16::<false>(&sc, v)
                        };
                        let mut x = [0f32; 16];
                        let mut codes = [0i32; 16];
                        _mm512_storeu_ps(x.as_mut_ptr(), v);
                        let code = _mm512_max_epi32(code, _mm512_setzero_si512());
                        _mm512_storeu_si512(codes.as_mut_ptr().cast(), code);
                        for l in 0..16 {
                            if f >> l & 1 == 0 {
                                let exact = enc.encode(x[l]);
                                assert_eq!(codes[l], i32::from(exact), "x = {:e}", x[l]);
                            }
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
