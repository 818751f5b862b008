//! The two pieces of GPU fast math that bitsandbytes' quantization kernels depend on, reproduced
//! exactly on the CPU.
//!
//! bitsandbytes' CUDA library is compiled with `--use_fast_math`. In its blockwise quantizers (4-bit
//! NF4/FP4 and 8-bit dynamic) that changes two things (measured on an NVIDIA H200, sm_90):
//!
//! * **The reciprocal** `1.0f / absmax` is the approximate `rcp.approx.ftz.f32` (`MUFU.RCP`), which
//!   differs from the IEEE reciprocal by one ulp (up or down) on 1,108,522 of the 8,388,608 f32
//!   mantissas. [`rcp_approx_ftz`] is the IEEE reciprocal corrected by the measured table (2 bits
//!   per mantissa, embedded in the crate: `data/rcp_approx_ftz_sm90.bin`, see `data/README.md`
//!   for provenance). The difference depends only on the mantissa for every input whose reciprocal
//!   is a normal number; other GPU generations are unverified.
//! * **Flush-to-zero**: subnormal operands and results of f32 arithmetic become signed zeros
//!   ([`ftz`]). Only inputs below 1.2e-38 (f32 or bf16 data) or blocks whose absmax is that small
//!   are affected, and FP4's sign bit (a negative product that underflows is −0.0, code 0).
//!
//! ```
//! use qlora_double_quant::fastmath::{ftz, rcp_approx_ftz};
//!
//! // MUFU.RCP is one ulp above the IEEE reciprocal here, one below there, equal for most inputs.
//! assert_eq!(rcp_approx_ftz(0.017).to_bits(), (1.0f32 / 0.017).to_bits() + 1);
//! assert_eq!(rcp_approx_ftz(0.03).to_bits(), (1.0f32 / 0.03).to_bits() - 1);
//! assert_eq!(rcp_approx_ftz(3.0), 1.0f32 / 3.0);
//! assert_eq!(rcp_approx_ftz(0.5), 2.0); // powers of two are exact
//! assert_eq!(rcp_approx_ftz(0.0), f32::INFINITY);
//! assert_eq!(rcp_approx_ftz(1e-40), f32::INFINITY); // subnormal input: flushed first
//! assert_eq!(ftz(-1e-40).to_bits(), (-0.0f32).to_bits());
//! ```

/// The measured table: entry `m` (2 bits, least significant pair first) is `v`, with
/// `bits(rcp_approx(x)) = bits(1/x) + v − 1` for mantissa `m`.
static RCP_TABLE: &[u8; 1 << 21] = include_bytes!("../data/rcp_approx_ftz_sm90.bin");

/// Bit pattern of `2^126`: from here on (in magnitude) the reciprocal would be subnormal (or is
/// 2^-126, which `MUFU.RCP` flushes as well) and [`rcp_approx_ftz`] returns ±0.
pub const RCP_FLUSH_FROM_BITS: u32 = 0x7e80_0000;

/// The correction `v − 1 ∈ {−1, 0, +1}` of mantissa `m` (the low 23 bits of `bits`).
#[inline(always)]
fn correction(bits: u32) -> u32 {
    let m = (bits & 0x007f_ffff) as usize;
    let v = (RCP_TABLE[m >> 2] >> (2 * (m & 3))) & 3;
    (v as u32).wrapping_sub(1)
}

/// `rcp.approx.ftz.f32(x)` as measured on an NVIDIA H200 (sm_90): what `1.0f / x` computes in
/// bitsandbytes' CUDA kernels.
///
/// * zero or subnormal `x` → ±inf (sign kept; subnormals are flushed first);
/// * ±inf → ±0; `|x| ≥ 2^126` → ±0 (the result would be subnormal and is flushed);
/// * NaN → NaN;
/// * otherwise the IEEE reciprocal moved by the table's −1, 0 or +1 ulp.
#[inline]
pub fn rcp_approx_ftz(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits & 0x7fff_ffff;
    if a < 0x0080_0000 {
        f32::from_bits(sign | 0x7f80_0000)
    } else if a >= RCP_FLUSH_FROM_BITS {
        if a > 0x7f80_0000 {
            x
        } else {
            f32::from_bits(sign)
        }
    } else {
        f32::from_bits((1.0f32 / x).to_bits().wrapping_add(correction(bits)))
    }
}

/// The correction of [`rcp_approx_ftz`] for `x`, in ulps (−1, 0 or +1): where the reciprocal is a
/// normal number, `bits(rcp_approx_ftz(x)) = bits(1/x) + rcp_correction(x)`. For SIMD kernels
/// that compute several IEEE quotients at once and apply the table lane by lane.
///
/// ```
/// use qlora_double_quant::fastmath::{rcp_approx_ftz, rcp_correction};
///
/// for x in [0.017f32, 0.03, 3.0, 1.5e-20] {
///     let ieee = (1.0f32 / x).to_bits();
///     assert_eq!(rcp_approx_ftz(x).to_bits(), ieee.wrapping_add(rcp_correction(x) as u32));
/// }
/// ```
#[inline(always)]
pub fn rcp_correction(x: f32) -> i32 {
    correction(x.to_bits()) as i32
}

/// A hint that [`rcp_approx_ftz`]`(x)` is coming: starts loading the cache line of the table entry
/// it reads, without waiting. The table (2 MiB) does not stay in the cache while a large tensor
/// streams through, so a quantizer that knows several blocks' absmax before it needs their
/// reciprocals (the SIMD kernels reduce a group of blocks ahead of encoding) hides the load
/// behind other work. No result and no effect but on timing; nothing on targets other than
/// x86-64.
///
/// ```
/// use qlora_double_quant::fastmath::{prefetch_rcp_approx_ftz, rcp_approx_ftz};
///
/// let absmax = [0.017f32, 3.5, 1e-3];
/// absmax.iter().for_each(|&a| prefetch_rcp_approx_ftz(a));
/// let inv = absmax.map(rcp_approx_ftz); // ... once the entries have arrived
/// assert_eq!(inv[1], 1.0 / 3.5);
/// ```
#[inline(always)]
pub fn prefetch_rcp_approx_ftz(x: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        let m = (x.to_bits() & 0x007f_ffff) as usize;
        let entry = RCP_TABLE[..].as_ptr().wrapping_add(m >> 2);
        // SAFETY: a prefetch only hints the cache: it never faults and changes no memory (the
        // address is inside the table anyway: `m >> 2 < 2^21`).
        #[allow(unsafe_code)]
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(entry.cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Flush-to-zero: a subnormal `x` becomes a zero of the same sign; everything else (NaN included)
/// is returned unchanged.
#[inline(always)]
pub fn ftz(x: f32) -> f32 {
    if x.to_bits() & 0x7fff_ffff < 0x0080_0000 {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// The NaN every CUDA f32 operation returns (NVIDIA GPUs do not propagate NaN payloads): positive,
/// all fraction bits set. x86's `0 · inf` is `0xffc00000` instead.
pub const CUDA_NAN_BITS: u32 = 0x7fff_ffff;

/// A product as the CUDA build computes it: `ftz(a · b)`, and [`CUDA_NAN_BITS`] for any NaN.
/// Converted to f16/bf16 (round to nearest even) this NaN becomes `0x7fff`, as on the GPU.
#[inline]
pub fn mul_ftz(a: f32, b: f32) -> f32 {
    let p = a * b;
    if p.is_nan() {
        f32::from_bits(CUDA_NAN_BITS)
    } else {
        ftz(p)
    }
}

/// True when `t · scale` is the same in IEEE and CUDA fast-math arithmetic for every `|t|` in
/// `{0} ∪ [2^-8, 1]` (the 4-bit codebooks' magnitudes): `scale` is finite and at least 2^-100 in
/// magnitude, so no product is NaN or subnormal. Dequantization kernels multiply whole tables by
/// such a scale in SIMD and take [`mul_ftz`] otherwise.
#[inline(always)]
pub fn is_plain_scale(scale: f32) -> bool {
    scale.is_finite() && !is_tiny_absmax(scale)
}

/// Below this absmax (the bit pattern of 2^-100) a block's inputs may be subnormal *and* matter:
/// `|subnormal · (1/absmax)|` can reach a decision threshold. SIMD kernels that skip the per-element
/// flush of inputs send such blocks (and all-zero blocks) to the scalar oracle; for larger absmax a
/// subnormal input times the reciprocal stays below 2^-26, where every code is that of zero (FP4's
/// sign aside, which the kernels test on the input).
pub const TINY_ABSMAX_BITS: u32 = 0x0d80_0000;

/// True when a block with this absmax must take the exact scalar path in a kernel that does not
/// flush its inputs element by element (see [`TINY_ABSMAX_BITS`]). NaN is not tiny.
#[inline(always)]
pub fn is_tiny_absmax(absmax: f32) -> bool {
    absmax.to_bits() & 0x7fff_ffff < TINY_ABSMAX_BITS
}

/// The absmax of a block as the CUDA kernels reduce it: `max(ftz(|x|))` with NaN ignored, zero for
/// an empty or all-zero (or all-subnormal) block. `raw` is the plain `max |x|` (NaN ignored); the
/// maximum of the flushed values is the raw maximum unless that is itself subnormal.
#[inline(always)]
pub fn ftz_absmax(raw: f32) -> f32 {
    ftz(raw).abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_counts_match_the_measurement() {
        let mut counts = [0usize; 4];
        for &b in RCP_TABLE.iter() {
            for k in 0..4 {
                counts[((b >> (2 * k)) & 3) as usize] += 1;
            }
        }
        assert_eq!(counts, [374_723, 7_280_086, 733_799, 0]);
    }

    #[test]
    fn table_is_the_measured_file() {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(RCP_TABLE);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "bbda0d685ab5a66767c2c3881a67dff147e1f5a2c766db1f6dd5b63fecedcf2c"
        );
    }

    #[test]
    fn specials() {
        assert_eq!(rcp_approx_ftz(0.0).to_bits(), f32::INFINITY.to_bits());
        assert_eq!(rcp_approx_ftz(-0.0).to_bits(), f32::NEG_INFINITY.to_bits());
        assert_eq!(
            rcp_approx_ftz(-1e-40).to_bits(),
            f32::NEG_INFINITY.to_bits()
        );
        assert_eq!(rcp_approx_ftz(f32::INFINITY).to_bits(), 0);
        assert_eq!(rcp_approx_ftz(f32::NEG_INFINITY).to_bits(), 0x8000_0000);
        assert_eq!(rcp_approx_ftz(f32::MAX).to_bits(), 0);
        assert_eq!(
            rcp_approx_ftz(f32::from_bits(RCP_FLUSH_FROM_BITS)).to_bits(),
            0
        );
        let below = f32::from_bits(RCP_FLUSH_FROM_BITS - 1);
        assert!(rcp_approx_ftz(below).is_normal());
        assert!(rcp_approx_ftz(f32::NAN).is_nan());
        assert_eq!(rcp_approx_ftz(f32::MIN_POSITIVE), 2f32.powi(126));
        assert_eq!(ftz(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
        assert_eq!(ftz(f32::MIN_POSITIVE.next_down()), 0.0);
        assert!(ftz(f32::NAN).is_nan());
        assert_eq!(ftz_absmax(-1e-39), 0.0);
        assert!(is_tiny_absmax(0.0) && is_tiny_absmax(2f32.powi(-101)));
        assert!(!is_tiny_absmax(2f32.powi(-100)) && !is_tiny_absmax(f32::NAN));
        assert_eq!(mul_ftz(0.0, f32::INFINITY).to_bits(), CUDA_NAN_BITS);
        assert_eq!(mul_ftz(-0.5, 1e-38).to_bits(), 0x8000_0000);
        assert_eq!(mul_ftz(0.5, 3.0), 1.5);
        assert!(is_plain_scale(1.0) && !is_plain_scale(f32::INFINITY) && !is_plain_scale(0.0));
    }

    /// The correction depends only on the mantissa, and the result is within one ulp of the IEEE
    /// reciprocal, for both signs and across exponents.
    #[test]
    fn within_one_ulp_and_exponent_independent() {
        let mut s = 0x2545_f491u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let m = s & 0x007f_ffff;
            let e = 1 + (s >> 23) % 252; // 1 ..= 252: normal input, normal reciprocal
            let x = f32::from_bits((e << 23) | m);
            let r = rcp_approx_ftz(x);
            let d = r.to_bits() as i64 - (1.0f32 / x).to_bits() as i64;
            assert!(d.abs() <= 1, "{x}: {d}");
            let one = f32::from_bits((127 << 23) | m);
            let d1 = rcp_approx_ftz(one).to_bits() as i64 - (1.0f32 / one).to_bits() as i64;
            assert_eq!(d, d1);
            assert_eq!(rcp_approx_ftz(-x).to_bits(), r.to_bits() | 0x8000_0000);
        }
    }
}
