//! NEON slice kernels (aarch64), 8 values per step as two 4-lane vectors.
//!
//! **Encode.** The key arithmetic, the clamped bucket index, the compare against the entry's step
//! offset (`cmhs`) and the out-of-range patch (`facge`/`fcmgt` masks) run 4 lanes wide; NEON has
//! no gather, so the 4 bucket entries are loaded one by one. Codes are narrowed twice (`xtn`) and
//! stored 8 at a time; a last partial group goes through a zero-padded stack buffer.
//!
//! **Decode.** 4-lane multiply of the looked-up map values (the table lookup is scalar).

use crate::encoder::{Encoder, Table, OFFSET_BITS};
use crate::simd::Normalize;
use crate::{DynamicMap, Implementation};
use core::arch::aarch64::*;

const NORM_NONE: u8 = 0;
const NORM_MUL: u8 = 1;
const NORM_DIV: u8 = 2;

/// The NEON kernels; a value exists only where NEON was detected.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Neon`] (NEON; always on aarch64 Linux/macOS, checked anyway).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Neon.is_available().then_some(Kernel {
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
            // SAFETY: `self` exists only after NEON was detected (`new`); `out` and `x` have the
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
            // SAFETY: NEON detected (`new`); equal lengths asserted (and chunked alike).
            unsafe { decode_scaled(values, codes, scale, out) }
        }
    }
}

/// The 4 codes of 4 (not yet normalized) values, as u32 lanes.
#[inline]
#[target_feature(enable = "neon")]
fn codes4<const NORM: u8>(t: &Table, v: float32x4_t, p: float32x4_t) -> uint32x4_t {
    let v = match NORM {
        NORM_MUL => vmulq_f32(v, p),
        NORM_DIV => vdivq_f32(v, p),
        _ => v,
    };
    let b = vreinterpretq_u32_f32(v);
    let neg = vreinterpretq_u32_s32(vshrq_n_s32::<31>(vreinterpretq_s32_u32(b)));
    let key = veorq_u32(b, vorrq_u32(neg, vdupq_n_u32(0x8000_0000)));
    let d = vsubq_u32(key, vdupq_n_u32(t.key_lo));
    // A negative shift count shifts right.
    let idx = vminq_u32(
        vshlq_u32(d, vdupq_n_s32(-(t.shift as i32))),
        vdupq_n_u32(t.last()),
    );
    let i = [
        vgetq_lane_u32::<0>(idx),
        vgetq_lane_u32::<1>(idx),
        vgetq_lane_u32::<2>(idx),
        vgetq_lane_u32::<3>(idx),
    ];
    // Indices are at most `last`, so the (safe, bounds-checked) loads never fail.
    let e = [
        t.entries[i[0] as usize],
        t.entries[i[1] as usize],
        t.entries[i[2] as usize],
        t.entries[i[3] as usize],
    ];
    let mut ev = vdupq_n_u32(e[0]);
    ev = vsetq_lane_u32::<1>(e[1], ev);
    ev = vsetq_lane_u32::<2>(e[2], ev);
    ev = vsetq_lane_u32::<3>(e[3], ev);
    let off = vandq_u32(d, vdupq_n_u32((1u32 << t.shift) - 1));
    let up = vcgeq_u32(off, vandq_u32(ev, vdupq_n_u32((1u32 << OFFSET_BITS) - 1)));
    let code = vsubq_u32(vshrq_n_u32::<{ OFFSET_BITS as i32 }>(ev), up);
    // Outside [-1, 1]: above 1 → 255; below −1 and NaN → 0 (the binary search's clamps).
    let one = vdupq_n_f32(1.0);
    let in_range = vcaleq_f32(v, one);
    let above = vcgtq_f32(v, one);
    vorrq_u32(
        vandq_u32(code, in_range),
        vandq_u32(above, vdupq_n_u32(255)),
    )
}

/// The 8 codes of 8 values.
#[inline]
#[target_feature(enable = "neon")]
fn codes8<const NORM: u8>(t: &Table, a: float32x4_t, b: float32x4_t, p: float32x4_t) -> uint8x8_t {
    let lo = vmovn_u32(codes4::<NORM>(t, a, p));
    let hi = vmovn_u32(codes4::<NORM>(t, b, p));
    vmovn_u16(vcombine_u16(lo, hi))
}

/// # Safety
/// NEON is available; `out.len() == x.len()`.
#[target_feature(enable = "neon")]
unsafe fn encode<const NORM: u8>(t: &Table, x: &[f32], p: f32, out: &mut [u8]) {
    let n = x.len();
    let pv = vdupq_n_f32(p);
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: elements i .. i+8 lie inside `x` and `out` (equal lengths).
        unsafe {
            let a = vld1q_f32(src.add(i));
            let b = vld1q_f32(src.add(i + 4));
            vst1_u8(dst.add(i), codes8::<NORM>(t, a, b, pv));
        }
        i += 8;
    }
    if i < n {
        let r = n - i;
        let mut buf = [0.0f32; 8];
        buf[..r].copy_from_slice(&x[i..]);
        let mut codes = [0u8; 8];
        // SAFETY: `buf` holds 8 f32 and `codes` 8 bytes.
        unsafe {
            let a = vld1q_f32(buf.as_ptr());
            let b = vld1q_f32(buf.as_ptr().add(4));
            vst1_u8(codes.as_mut_ptr(), codes8::<NORM>(t, a, b, pv));
        }
        out[i..].copy_from_slice(&codes[..r]);
    }
}

/// # Safety
/// NEON is available; `out.len() == codes.len()`.
#[target_feature(enable = "neon")]
unsafe fn decode_scaled(values: &[f32; 256], codes: &[u8], scale: f32, out: &mut [f32]) {
    let s = vdupq_n_f32(scale);
    let mut o4 = out.chunks_exact_mut(4);
    let mut c4 = codes.chunks_exact(4);
    for (o, c) in (&mut o4).zip(&mut c4) {
        let v = [
            values[c[0] as usize],
            values[c[1] as usize],
            values[c[2] as usize],
            values[c[3] as usize],
        ];
        // SAFETY: `v` holds 4 f32 and `o` 4 f32.
        unsafe { vst1q_f32(o.as_mut_ptr(), vmulq_f32(vld1q_f32(v.as_ptr()), s)) };
    }
    for (o, &c) in o4.into_remainder().iter_mut().zip(c4.remainder()) {
        *o = values[c as usize] * scale;
    }
}
