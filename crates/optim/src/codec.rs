//! A table-driven encoder that returns exactly what `DynamicMap::encode` (the CUDA kernels'
//! binary search) returns, several times faster.
//!
//! The kernel's search always ends on the nearest code, and a value exactly on the f32 midpoint
//! `(code[k] + code[k+1]) * 0.5` of two codes goes to the even index. So the code of `x` is
//! `cnt(x) = #{k : mid[k] < x}`, moved up by one when `x == mid[cnt]` and `cnt` is odd; NaN gives 0.
//! `cnt` is found by bucketing the order-preserving integer key of `x` (sign-folded f32 bits):
//! each bucket stores `cnt` of its smallest value, and a short scan over the (usually zero or one)
//! midpoints inside the bucket finishes the count. Tests compare it against `DynamicMap::encode`.

use qlora_double_quant::DynamicMap;
use std::sync::OnceLock;

/// Buckets are `2^SHIFT` consecutive f32 values wide (1/64 of an octave).
const SHIFT: u32 = 17;

/// Order-preserving map of f32 bit patterns to u32 (`a < b` ⇒ `key(a) < key(b)` for non-NaN).
#[inline(always)]
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline(always)]
fn unkey(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// Fast exact encoder for one dynamic map.
#[derive(Debug)]
pub(crate) struct FastEncoder {
    /// `mids[k]` for k < 255, `mids[255] = NaN` as a sentinel: `NaN < x` stops every scan and
    /// `x == NaN` never reports a tie.
    mids: [f32; 256],
    /// `cnt` of the smallest value of each bucket.
    base: Vec<u8>,
    key_lo: u32,
    last_bucket: u32,
}

impl FastEncoder {
    fn new(map: &DynamicMap) -> Self {
        let code = map.values();
        let mut mids = [f32::NAN; 256];
        for k in 0..255 {
            mids[k] = (code[k] + code[k + 1]) * 0.5;
        }
        // Below mids[0] every value encodes as 0; above mids[254] as 255.
        let key_lo = key(mids[0]) & !((1u32 << SHIFT) - 1);
        let key_hi = key(mids[254]);
        let last_bucket = (key_hi - key_lo) >> SHIFT;
        let base = (0..=last_bucket)
            .map(|b| {
                let lo = unkey(key_lo + (b << SHIFT));
                mids[..255].iter().filter(|&&m| m < lo).count() as u8
            })
            .collect();
        FastEncoder {
            mids,
            base,
            key_lo,
            last_bucket,
        }
    }

    /// The encoder of the signed map (`qmap1`).
    pub(crate) fn signed() -> &'static FastEncoder {
        static E: OnceLock<FastEncoder> = OnceLock::new();
        E.get_or_init(|| FastEncoder::new(DynamicMap::signed()))
    }

    /// The encoder of the unsigned map (`qmap2`).
    pub(crate) fn unsigned() -> &'static FastEncoder {
        static E: OnceLock<FastEncoder> = OnceLock::new();
        E.get_or_init(|| FastEncoder::new(DynamicMap::unsigned()))
    }

    /// The code of `x`, identical to `DynamicMap::encode(x)`.
    #[inline(always)]
    pub(crate) fn encode(&self, x: f32) -> u8 {
        if x.is_nan() {
            return 0;
        }
        let b = (key(x).saturating_sub(self.key_lo) >> SHIFT).min(self.last_bucket);
        let mut i = self.base[b as usize] as usize;
        while self.mids[i] < x {
            i += 1;
        }
        // `i` is now cnt(x) (the sentinel keeps it ≤ 255). An exact tie goes to the even index.
        if x == self.mids[i] && i & 1 == 1 {
            i += 1;
        }
        i as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 `d` units in the last place away from `x` in magnitude (both neighbours for ±1).
    fn ulp(x: f32, d: i32) -> f32 {
        f32::from_bits(x.to_bits().wrapping_add_signed(d))
    }

    fn check(map: &DynamicMap, enc: &FastEncoder, x: f32) {
        assert_eq!(
            enc.encode(x),
            map.encode(x),
            "x = {x:e} ({:#010x})",
            x.to_bits()
        );
    }

    #[test]
    fn equals_binary_search_on_midpoints_codes_and_neighbours() {
        for (map, enc) in [
            (DynamicMap::signed(), FastEncoder::signed()),
            (DynamicMap::unsigned(), FastEncoder::unsigned()),
        ] {
            let code = map.values();
            let mut probes = vec![
                0.0f32,
                -0.0,
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                f32::MIN,
                1e-30,
                -1e-30,
                f32::MIN_POSITIVE,
                1.5,
                -1.5,
            ];
            for k in 0..256 {
                let c = code[k];
                probes.extend([c, ulp(c, 1), ulp(c, -1)]);
                if k < 255 {
                    let m = (code[k] + code[k + 1]) * 0.5;
                    probes.extend([m, ulp(m, 1), ulp(m, -1)]);
                }
            }
            for &x in &probes {
                check(map, enc, x);
                check(map, enc, -x);
            }
        }
    }

    #[test]
    fn equals_binary_search_on_a_dense_sweep_of_bit_patterns() {
        // Every 257th f32 bit pattern of [-2, 2] (about 8 million values per map).
        for (map, enc) in [
            (DynamicMap::signed(), FastEncoder::signed()),
            (DynamicMap::unsigned(), FastEncoder::unsigned()),
        ] {
            for sign in [0u32, 0x8000_0000] {
                let mut bits = 0u32;
                while bits <= 2.0f32.to_bits() {
                    check(map, enc, f32::from_bits(bits | sign));
                    bits += 257;
                }
            }
        }
    }
}
