//! NEON kernels (aarch64).
//!
//! **Dequantize.** Per block the table is scaled by the absmax once (`fmul`, the oracle's IEEE
//! product, never fused) and kept as bytes: f32 out looks up the 64-byte table with `tbl` (4
//! registers) on byte indices `4·code + k`; f16/bf16 out rounds the 16 scaled values once (bf16 by
//! an integer round-to-nearest-even, f16 through `half` because Rust's NEON f16 vector types are
//! not stable), splits them into a low-byte and a high-byte plane and looks both up with one-
//! register `tbl`, interleaved by `zip`. Groups of 32 start at multiples of 32 elements (inside one
//! block); the unaligned head and the tail go through the scalar oracle.
//!
//! **Quantize.** absmax by compare-and-select (`|x| > acc`: NaN compares false and is ignored, as
//! `f32::max` documents), `xn = x * (1/absmax)`, NF4 code by counting the 15 thresholds strictly
//! exceeded (`fcmgt`), FP4 by the sign test and counting the 7 magnitude thresholds. f16 input is
//! widened exactly with integer operations.

use crate::kernel::{self, Dense, DenseMut, DequantJob, Kernel as KernelTrait};
use crate::{codebook, scalar, AbsmaxView, Element, QuantType};
use core::arch::aarch64::*;
use half::{bf16, f16};
use qlora_double_quant::{fastmath, Implementation};

const SRC_F32: u8 = 0;
const SRC_F16: u8 = 1;
const OUT_F32: u8 = 0;
const OUT_F16: u8 = 1;
const OUT_BF16: u8 = 2;
const SRC_BF16: u8 = 2;

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
        // SAFETY: `self` exists only after NEON was detected (`new`); the lengths the kernel's
        // pointer accesses rely on were asserted above.
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
            // SAFETY: NEON was detected (`new`). `mid` holds `groups·32` elements of `T`;
            // elements `start+head ..` up to `2·packed.len()` (asserted) have their bytes in
            // `packed`; `bs` is a power of two ≥ 32 (asserted), so a group of 32 starting at a
            // multiple of 32 lies in one block.
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

/// Exact f16 → f32 of four values held in the low halves of u32 lanes.
#[inline]
#[target_feature(enable = "neon")]
fn f16_to_f32(h: uint32x4_t) -> float32x4_t {
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let em = vandq_u32(h, vdupq_n_u32(0x7fff));
    let exp = vandq_u32(em, vdupq_n_u32(0x7c00));
    // Normal numbers, and Inf/NaN with the exponent moved to 0xff.
    let mut bits = vaddq_u32(vshlq_n_u32::<13>(em), vdupq_n_u32((127 - 15) << 23));
    let special = vceqq_u32(exp, vdupq_n_u32(0x7c00));
    bits = vaddq_u32(bits, vandq_u32(special, vdupq_n_u32((128 - 16) << 23)));
    // Subnormals (and zero): em · 2⁻²⁴, exact.
    let sub = vreinterpretq_u32_f32(vmulq_n_f32(vcvtq_f32_u32(em), 1.0 / 16_777_216.0));
    let is_sub = vceqq_u32(exp, vdupq_n_u32(0));
    vreinterpretq_f32_u32(vorrq_u32(vbslq_u32(is_sub, sub, bits), sign))
}

/// Load 4 elements as f32 (exact widening).
///
/// # Safety
/// NEON must be available and 4 elements readable at `p`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load4<const SRC: u8>(p: *const u8) -> float32x4_t {
    match SRC {
        // SAFETY: 16 bytes readable at `p` (caller).
        SRC_F32 => unsafe { vld1q_f32(p.cast()) },
        SRC_F16 => {
            // SAFETY: 8 bytes readable at `p` (caller).
            let h = unsafe { vld1_u16(p.cast()) };
            f16_to_f32(vmovl_u16(h))
        }
        // SAFETY: 8 bytes readable at `p` (caller).
        _ => vreinterpretq_f32_u32(vshlq_n_u32::<16>(vmovl_u16(unsafe { vld1_u16(p.cast()) }))),
    }
}

/// Codes of 4 values `x · inv` (one per u32 lane; `inv` the block's `rcp_approx_ftz(absmax)`,
/// absmax not tiny). FP4's sign follows the CUDA build's flush-to-zero: set only when `x` and the
/// product are both at most `−f32::MIN_POSITIVE`.
#[inline]
#[target_feature(enable = "neon")]
fn encode4<const NF4: bool>(x: float32x4_t, inv: f32) -> uint32x4_t {
    let xn = vmulq_n_f32(x, inv);
    let mut count = vdupq_n_u32(0);
    if NF4 {
        for t in codebook::NF4_THRESHOLDS {
            count = vsubq_u32(count, vcgtq_f32(xn, vdupq_n_f32(t)));
        }
        count
    } else {
        let m = vabsq_f32(xn);
        for t in codebook::FP4_THRESHOLDS {
            count = vsubq_u32(count, vcgtq_f32(m, vdupq_n_f32(t)));
        }
        // Level → bit pattern (0, 1, 6, 7, 4, 5, 2, 3): a per-lane table of nibbles.
        let pattern = vandq_u32(
            vshlq_u32(
                vdupq_n_u32(0x3254_7610),
                vnegq_s32(vreinterpretq_s32_u32(vshlq_n_u32::<2>(count))),
            ),
            vdupq_n_u32(0xf),
        );
        let neg_min = vdupq_n_f32(-f32::MIN_POSITIVE);
        let negative = vandq_u32(vcleq_f32(xn, neg_min), vcleq_f32(x, neg_min));
        let sign = vandq_u32(negative, vdupq_n_u32(8));
        vorrq_u32(pattern, sign)
    }
}

/// 16 codes (four vectors of four) → 8 bytes, the even element in the high nibble.
#[inline]
#[target_feature(enable = "neon")]
fn pack16(c: [uint32x4_t; 4]) -> uint8x8_t {
    let lo = vcombine_u16(vmovn_u32(c[0]), vmovn_u32(c[1]));
    let hi = vcombine_u16(vmovn_u32(c[2]), vmovn_u32(c[3]));
    let codes = vcombine_u8(vmovn_u16(lo), vmovn_u16(hi));
    let even = vuzp1q_u8(codes, codes);
    let odd = vuzp2q_u8(codes, codes);
    vget_low_u8(vorrq_u8(vshlq_n_u8::<4>(even), odd))
}

/// Quantize whole blocks.
///
/// # Safety
/// NEON must be available; `x` holds `n` elements of `elem_size` bytes, `packed` `ceil(n/2)`
/// bytes, `absmax` `ceil(n/bs)` values, and `bs` is a positive multiple of 16.
#[target_feature(enable = "neon")]
unsafe fn quantize_blocks<const SRC: u8, const NF4: bool>(
    x: &[u8],
    elem_size: usize,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    let n = x.len() / elem_size;
    for (b, am) in absmax.iter_mut().enumerate() {
        let s = b * bs;
        let len = bs.min(n - s);
        let (full, rem) = (len / 16, len % 16);
        let block = &x[s * elem_size..(s + len) * elem_size];
        let mut tail = [0u8; 64];
        tail[..rem * elem_size].copy_from_slice(&block[full * 16 * elem_size..]);
        let vectors = |v: usize| -> *const u8 {
            if v < full {
                block[v * 16 * elem_size..].as_ptr()
            } else {
                tail.as_ptr()
            }
        };
        let count = full + usize::from(rem > 0);
        let mut acc = vdupq_n_f32(0.0);
        for v in 0..count {
            let p = vectors(v);
            for k in 0..4 {
                // SAFETY: vector `v` (16 elements) lies inside `block` or `tail`.
                let m = vabsq_f32(unsafe { load4::<SRC>(p.add(4 * k * elem_size)) });
                acc = vbslq_f32(vcgtq_f32(m, acc), m, acc);
            }
        }
        let a = fastmath::ftz_absmax(vmaxvq_f32(acc));
        *am = a;
        let bytes = &mut packed[s / 2..s / 2 + len.div_ceil(2)];
        if fastmath::is_tiny_absmax(a) {
            kernel::oracle_block(QuantType::of_nf4(NF4), SRC, block, bytes);
            continue;
        }
        let inv = fastmath::rcp_approx_ftz(a);
        for v in 0..count {
            let p = vectors(v);
            // SAFETY: vector `v` (16 elements) lies inside `block` or `tail`.
            let c = unsafe {
                [0, 1, 2, 3].map(|k| encode4::<NF4>(load4::<SRC>(p.add(4 * k * elem_size)), inv))
            };
            let mut eight = [0u8; 8];
            // SAFETY: `eight` holds 8 bytes.
            unsafe { vst1_u8(eight.as_mut_ptr(), pack16(c)) };
            let take = (len - 16 * v).min(16).div_ceil(2);
            bytes[8 * v..8 * v + take].copy_from_slice(&eight[..take]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize

/// bf16 bits (low half of each lane) of 4 f32, exactly `half::bf16::from_f32`.
#[inline]
#[target_feature(enable = "neon")]
fn bf16_rne4(x: uint32x4_t) -> uint32x4_t {
    let lsb = vandq_u32(vshrq_n_u32::<16>(x), vdupq_n_u32(1));
    let rounded = vshrq_n_u32::<16>(vaddq_u32(vaddq_u32(x, vdupq_n_u32(0x7fff)), lsb));
    let nan = vcgtq_u32(
        vandq_u32(x, vdupq_n_u32(0x7fff_ffff)),
        vdupq_n_u32(0x7f80_0000),
    );
    let quiet = vorrq_u32(vshrq_n_u32::<16>(x), vdupq_n_u32(0x40));
    vbslq_u32(nan, quiet, rounded)
}

/// The block's table as bytes: the 64-byte f32 table, or the low/high byte planes of the 16-bit
/// values (in `.0` and `.1`).
#[inline]
#[target_feature(enable = "neon")]
fn scaled_table<const OUT: u8>(table: &[f32; 16], absmax: f32) -> uint8x16x4_t {
    let t = table.map(|v| fastmath::mul_ftz(v, absmax));
    let z = vdupq_n_u8(0);
    match OUT {
        OUT_F32 => {
            let t = t.map(f32::to_bits);
            let bytes: [u8; 64] = bytemuck::cast(t);
            let load = |k: usize| {
                let chunk: [u8; 16] = bytes[16 * k..16 * k + 16].try_into().expect("16 bytes");
                vreinterpretq_u8_u32(vld1q_u32_array(bytemuck::cast(chunk)))
            };
            uint8x16x4_t(load(0), load(1), load(2), load(3))
        }
        OUT_F16 => {
            let h = t.map(|v| f16::from_f32(v).to_bits());
            let (a, b) = (
                vld1q_u16_array(h[..8].try_into().expect("8 values")),
                vld1q_u16_array(h[8..].try_into().expect("8 values")),
            );
            let (a, b) = (vreinterpretq_u8_u16(a), vreinterpretq_u8_u16(b));
            uint8x16x4_t(vuzp1q_u8(a, b), vuzp2q_u8(a, b), z, z)
        }
        _ => {
            let bits = t.map(f32::to_bits);
            let r = [0, 1, 2, 3].map(|k| {
                bf16_rne4(vld1q_u32_array(
                    bits[4 * k..4 * k + 4].try_into().expect("4"),
                ))
            });
            let a = vreinterpretq_u8_u16(vcombine_u16(vmovn_u32(r[0]), vmovn_u32(r[1])));
            let b = vreinterpretq_u8_u16(vcombine_u16(vmovn_u32(r[2]), vmovn_u32(r[3])));
            uint8x16x4_t(vuzp1q_u8(a, b), vuzp2q_u8(a, b), z, z)
        }
    }
}

#[inline]
#[target_feature(enable = "neon")]
fn vld1q_u32_array(v: [u32; 4]) -> uint32x4_t {
    // SAFETY: `v` holds 4 u32.
    unsafe { vld1q_u32(v.as_ptr()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn vld1q_u16_array(v: [u16; 8]) -> uint16x8_t {
    // SAFETY: `v` holds 8 u16.
    unsafe { vld1q_u16(v.as_ptr()) }
}

/// Dequantize `groups` groups of 32 elements starting at element `j0` into `dst`.
///
/// # Safety
/// NEON must be available; `j0` is a multiple of 32; `dst` has room for `32·groups` output
/// elements; `2·packed.len() ≥ j0 + 32·groups`; `bs` is a power of two ≥ 32.
#[target_feature(enable = "neon")]
unsafe fn dequantize_groups<const OUT: u8>(
    table: &[f32; 16],
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    bs: usize,
    j0: usize,
    groups: usize,
    dst: *mut u8,
) {
    let shift = bs.trailing_zeros();
    let mut current = usize::MAX;
    let z = vdupq_n_u8(0);
    let mut t = uint8x16x4_t(z, z, z, z);
    let nibble = vdup_n_u8(0x0f);
    // Byte k of the f32 of element 4q + e: table byte 4·code + k.
    let repeat: [[u8; 16]; 4] = [0u8, 1, 2, 3].map(|q| {
        let mut r = [0u8; 16];
        for (i, v) in r.iter_mut().enumerate() {
            *v = 4 * q + (i / 4) as u8;
        }
        r
    });
    // SAFETY: each array holds 16 bytes.
    let repeat = repeat.map(|r| unsafe { vld1q_u8(r.as_ptr()) });
    let lane_byte = vreinterpretq_u8_u32(vdupq_n_u32(0x0302_0100));
    let out_size = if OUT == OUT_F32 { 4 } else { 2 };
    for g in 0..groups {
        let j = j0 + 32 * g;
        let block = j >> shift;
        if block != current {
            t = scaled_table::<OUT>(table, absmax.get(block));
            current = block;
        }
        for half in 0..2 {
            let e = j + 16 * half;
            // SAFETY: the 8 bytes of elements e .. e+16 are inside `packed` (caller).
            let b = unsafe { vld1_u8(packed.as_ptr().add(e >> 1)) };
            let hi = vshr_n_u8::<4>(b);
            let lo = vand_u8(b, nibble);
            let idx = vcombine_u8(vzip1_u8(hi, lo), vzip2_u8(hi, lo));
            // SAFETY: elements 32g + 16·half .. +16 of `dst` are writable (caller).
            let d = unsafe { dst.add((32 * g + 16 * half) * out_size) };
            if OUT == OUT_F32 {
                for (q, rep) in repeat.iter().enumerate() {
                    let code = vqtbl1q_u8(idx, *rep);
                    let bi = vaddq_u8(vshlq_n_u8::<2>(code), lane_byte);
                    // SAFETY: 16 of the 64 bytes at `d` (caller).
                    unsafe { vst1q_u8(d.add(16 * q), vqtbl4q_u8(t, bi)) };
                }
            } else {
                let l = vqtbl1q_u8(t.0, idx);
                let h = vqtbl1q_u8(t.1, idx);
                // SAFETY: 32 bytes at `d` (caller).
                unsafe {
                    vst1q_u8(d, vzip1q_u8(l, h));
                    vst1q_u8(d.add(16), vzip2q_u8(l, h));
                }
            }
        }
    }
}
