//! [`Encoder`]: a table-driven encoder that returns exactly what [`DynamicMap::encode`] (the CUDA
//! kernels' binary search) returns, several times faster.
//!
//! The kernel's search always ends on the nearest code, and a value exactly on the f32 midpoint
//! `(code[k] + code[k+1]) * 0.5` of two codes goes to the even index. So the code of `x` is
//! `#{k : mid[k] < x}`, moved up by one when `x == mid[k]` for an odd `k`; NaN gives 0. Folding the
//! tie rule into the thresholds (`thr[k] = mid[k]` for even `k`, the next f32 below for odd `k`)
//! makes it a plain count `#{k : x > thr[k]}`, found by bucketing the order-preserving integer
//! key of `x` (sign-folded f32 bits): each bucket stores the count of its smallest value, and two
//! compares against the (at most two) thresholds inside the bucket finish it, without branches.
//! Tests compare it against `DynamicMap::encode` on every midpoint, code and neighbour and on a
//! dense sweep of bit patterns.

use crate::DynamicMap;
use std::sync::OnceLock;

/// Buckets are `2^SHIFT` consecutive f32 values wide (1/64 of an octave); at this width no
/// bucket of either map holds more than [`MAX_MIDS_PER_BUCKET`] midpoints (checked when the
/// table is built and by a test), so two compares finish every count without a loop.
const SHIFT: u32 = 17;

/// Most decision thresholds inside one bucket.
const MAX_MIDS_PER_BUCKET: usize = 2;

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

/// Number of buckets covering `[-1, 1]` (`(key(1.0) - key_lo) >> SHIFT` is 16 256).
const BUCKETS: usize = 1 << 14;

/// Fast exact encoder for one dynamic map: [`DynamicMap::encode`], code for code, without the
/// binary search.
///
/// Get one with [`DynamicMap::encoder`] (built once per map, about 17 KiB of tables).
///
/// ```
/// use qlora_double_quant::DynamicMap;
///
/// let map = DynamicMap::signed();
/// let enc = map.encoder();
/// for x in [-1.0f32, -0.3, 0.0, 1e-6, 0.25, 0.9999, 1.0] {
///     assert_eq!(enc.encode(x), map.encode(x));
/// }
/// let mut codes = [0u8; 3];
/// enc.encode_slice(&[-1.0, 0.0, 1.0], &mut codes);
/// assert_eq!(codes, [0, 127, 255]);
/// ```
#[derive(Debug)]
pub struct Encoder {
    map: &'static DynamicMap,
    /// Decision thresholds: the code of `x` is the number of `k` with `x > thr[k]`. For even `k`
    /// `thr[k]` is the midpoint between codes `k` and `k+1` (a tie stays at the even `k`), for
    /// odd `k` the next f32 below it (a tie moves up to the even `k+1`). Entries from 255 on are
    /// NaN: `x > NaN` is false, so a count never passes 255.
    thr: Box<[f32; 512]>,
    /// The count of the smallest value of each bucket.
    base: Box<[u8; BUCKETS]>,
    key_lo: u32,
}

impl Encoder {
    fn new(map: &'static DynamicMap) -> Self {
        let code = map.values();
        let mut thr = Box::new([f32::NAN; 512]);
        for k in 0..255 {
            let mid = (code[k] + code[k + 1]) * 0.5;
            assert!(mid != 0.0 && mid.is_finite());
            thr[k] = if k % 2 == 0 {
                mid
            } else if mid > 0.0 {
                f32::from_bits(mid.to_bits() - 1)
            } else {
                f32::from_bits(mid.to_bits() + 1)
            };
        }
        // The table covers every value of [-1, 1]; others take the exact slow path.
        let key_lo = key(-1.0) & !((1u32 << SHIFT) - 1);
        let buckets = (((key(1.0) - key_lo) >> SHIFT) + 1) as usize;
        assert!(buckets <= BUCKETS);
        let cnt = |x: f32| thr[..255].iter().filter(|&&t| x > t).count();
        let mut base = Box::new([255u8; BUCKETS]);
        for b in 0..buckets {
            let first = key_lo + ((b as u32) << SHIFT);
            let last = first + ((1 << SHIFT) - 1);
            base[b] = cnt(unkey(first)) as u8;
            // Thresholds crossed inside the bucket: at most two, so two compares finish a count.
            let inside = cnt(unkey(last)) - base[b] as usize;
            assert!(
                inside <= MAX_MIDS_PER_BUCKET,
                "bucket {b} holds {inside} thresholds"
            );
        }
        Encoder {
            map,
            thr,
            base,
            key_lo,
        }
    }

    /// The encoder of the signed map (`qmap1`, `nested_quant_map`).
    pub fn signed() -> &'static Encoder {
        static E: OnceLock<Encoder> = OnceLock::new();
        E.get_or_init(|| Encoder::new(DynamicMap::signed()))
    }

    /// The encoder of the unsigned map (`qmap2`).
    pub fn unsigned() -> &'static Encoder {
        static E: OnceLock<Encoder> = OnceLock::new();
        E.get_or_init(|| Encoder::new(DynamicMap::unsigned()))
    }

    /// The map this encoder encodes with.
    pub fn map(&self) -> &'static DynamicMap {
        self.map
    }

    /// The code of `x`, identical to [`DynamicMap::encode`]`(x)` for every f32 (NaN included).
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        // Normalized states always lie in [-1, 1]; NaN (0/0 of an all-zero block) and the
        // impossible rest go the exact slow way.
        if x.abs() <= 1.0 {
            self.encode_in_range(x)
        } else {
            self.map.encode(x)
        }
    }

    /// [`encode`](Self::encode) for `|x| <= 1` (not NaN); any other input gives an unspecified
    /// code (but no panic).
    #[inline(always)]
    pub fn encode_in_range(&self, x: f32) -> u8 {
        let b = (key(x).wrapping_sub(self.key_lo) >> SHIFT) as usize & (BUCKETS - 1);
        let i = self.base[b] as usize;
        let i = i + usize::from(x > self.thr[i]);
        (i + usize::from(x > self.thr[i & 511])) as u8
    }

    /// `out[i] = self.encode(xn[i])` for every element.
    ///
    /// # Panics
    /// If `out` is shorter than `xn`.
    pub fn encode_slice(&self, xn: &[f32], out: &mut [u8]) {
        assert!(
            out.len() >= xn.len(),
            "encode_slice: output shorter than input"
        );
        for (o, &x) in out.iter_mut().zip(xn) {
            *o = self.encode(x);
        }
    }

    /// `out[i] = self.encode(values[i] * scale)` (f32 product), as bitsandbytes' blockwise
    /// quantization normalizes (`x * (1 / absmax)`).
    ///
    /// # Panics
    /// If `out` is shorter than `values`.
    pub fn encode_scaled(&self, values: &[f32], scale: f32, out: &mut [u8]) {
        assert!(
            out.len() >= values.len(),
            "encode_scaled: output shorter than input"
        );
        for (o, &x) in out.iter_mut().zip(values) {
            *o = self.encode(x * scale);
        }
    }

    /// `out[i] = self.encode(values[i] / divisor)` (IEEE f32 division), as bitsandbytes' 8-bit
    /// optimizer kernels normalize their states (`s / new_absmax`).
    ///
    /// # Panics
    /// If `out` is shorter than `values`.
    pub fn encode_divided(&self, values: &[f32], divisor: f32, out: &mut [u8]) {
        assert!(
            out.len() >= values.len(),
            "encode_divided: output shorter than input"
        );
        for (o, &x) in out.iter_mut().zip(values) {
            *o = self.encode(x / divisor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 `d` units in the last place away from `x` in magnitude (both neighbours for ±1).
    fn ulp(x: f32, d: i32) -> f32 {
        f32::from_bits(x.to_bits().wrapping_add_signed(d))
    }

    fn check(map: &DynamicMap, enc: &Encoder, x: f32) {
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
            (DynamicMap::signed(), Encoder::signed()),
            (DynamicMap::unsigned(), Encoder::unsigned()),
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
            (DynamicMap::signed(), Encoder::signed()),
            (DynamicMap::unsigned(), Encoder::unsigned()),
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

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn fast_encoder_equals_the_binary_search(x in any::<f32>(), small in -1.0f32..1.0) {
            for v in [x, small, small * 1e-6] {
                prop_assert_eq!(Encoder::signed().encode(v), DynamicMap::signed().encode(v));
                prop_assert_eq!(Encoder::unsigned().encode(v), DynamicMap::unsigned().encode(v));
            }
        }
    }
}
