//! [`Encoder`]: a table-driven encoder that returns exactly what [`DynamicMap::encode`] (the CUDA
//! kernels' binary search) returns, many times faster, with SIMD slice forms.
//!
//! The kernel's search always ends on the nearest code, and a value exactly on the f32 midpoint
//! `(code[k] + code[k+1]) * 0.5` of two codes goes to the even index. So the code of `x` is
//! `#{k : mid[k] < x}`, moved up by one when `x == mid[k]` for an odd `k`; NaN gives 0. Folding the
//! tie rule into the thresholds (`thr[k] = mid[k]` for even `k`, the next f32 below for odd `k`)
//! makes it a plain count `#{k : x > thr[k]}`. In the order-preserving integer key of `x`
//! (sign-folded f32 bits) that count is found by bucketing: buckets are `2^shift` consecutive keys,
//! narrow enough that none holds more than one threshold (the closest two thresholds of the signed
//! map are 176 948 keys apart, of the unsigned map 88 474), and each bucket stores one `u32`: the
//! count of its smallest key in the top byte and the offset inside the bucket from which the count
//! is one higher in the low 24 bits. A code is then one table load, one compare and one add; values
//! outside `[-1, 1]` (and NaN) clamp to 0 / 255 as the search does. The slice methods run the same
//! computation 16 (AVX-512), 8 (AVX2: `vpgatherdd`) or 4 (NEON) lanes at a time; see
//! [`Implementation`]. Tests compare every implementation with `DynamicMap::encode` on every
//! midpoint, code and neighbour, the special values and a dense sweep of bit patterns.

use crate::simd::Implementation;
use crate::DynamicMap;
use std::sync::OnceLock;

/// Order-preserving map of f32 bit patterns to u32 (`a < b` ⇒ `key(a) < key(b)` for non-NaN).
#[inline(always)]
pub(crate) fn key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

#[inline(always)]
fn unkey(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// Bits of a bucket entry that hold the in-bucket offset at which the count steps up.
pub(crate) const OFFSET_BITS: u32 = 24;

/// The bucket table of one map, as the SIMD kernels read it.
#[derive(Debug)]
pub(crate) struct Table {
    /// Per bucket: `base << 24 | step`, where `base` is the code of the bucket's smallest key and
    /// the code is `base + 1` from in-bucket offset `step` on (`step == 2^shift`: never).
    pub(crate) entries: Box<[u32]>,
    /// `log2` of the bucket width in keys.
    pub(crate) shift: u32,
    /// The key of the first bucket's smallest value (at or below `key(-1.0)`).
    pub(crate) key_lo: u32,
}

impl Table {
    /// Index of the last bucket (indices are clamped to it, so any input stays in bounds).
    #[inline(always)]
    pub(crate) fn last(&self) -> u32 {
        (self.entries.len() - 1) as u32
    }

    /// The code of `x` for `|x| <= 1` (not NaN); an unspecified code otherwise.
    #[inline(always)]
    pub(crate) fn lookup(&self, x: f32) -> u8 {
        let d = key(x).wrapping_sub(self.key_lo);
        let b = ((d >> self.shift) as usize).min(self.entries.len() - 1);
        let e = self.entries[b];
        let off = d & ((1u32 << self.shift) - 1);
        ((e >> OFFSET_BITS) + u32::from(off >= e & ((1 << OFFSET_BITS) - 1))) as u8
    }
}

/// Fast exact encoder for one dynamic map: [`DynamicMap::encode`], code for code, without the
/// binary search.
///
/// Get one with [`DynamicMap::encoder`] (built once per map: 64 KiB of tables for the signed map,
/// 128 KiB for the unsigned one, of which data in `[0.01, 1]` touches a few KiB).
///
/// The slice methods ([`encode_slice`](Self::encode_slice), [`encode_scaled`](Self::encode_scaled),
/// [`encode_divided`](Self::encode_divided)) run the best SIMD [`Implementation`] of the CPU,
/// picked once (`QLORA_FORCE_SCALAR=1` forces the scalar code); [`Implementation`]'s methods run a
/// chosen one. All give the same bytes.
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
    table: Table,
}

impl Encoder {
    fn new(map: &'static DynamicMap) -> Self {
        let code = map.values();
        // Threshold keys: the code of `x` is the number of `k` with `key(x) > kt[k]`. For odd `k`
        // the threshold is the next f32 below the midpoint (key one lower), so a tie moves up.
        let kt: Vec<u32> = (0..255)
            .map(|k| {
                let mid = (code[k] + code[k + 1]) * 0.5;
                assert!(mid != 0.0 && mid.is_finite());
                key(mid) - (k as u32 & 1)
            })
            .collect();
        assert!(kt.windows(2).all(|w| w[0] < w[1]));
        let min_gap = kt.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(u32::MAX);
        // The widest buckets that hold at most one threshold each.
        let shift = min_gap.ilog2().min(OFFSET_BITS - 1);
        // The table covers every value of [-1, 1]; others are clamped by the callers.
        let key_lo = key(-1.0) & !((1u32 << shift) - 1);
        let buckets = (((key(1.0) - key_lo) >> shift) + 1) as usize;
        let mut entries = vec![0u32; buckets].into_boxed_slice();
        let mut below = 0usize; // thresholds with key < first key of the bucket
        for (b, e) in entries.iter_mut().enumerate() {
            let first = key_lo + ((b as u32) << shift);
            let last = first + ((1 << shift) - 1);
            while below < kt.len() && kt[below] < first {
                below += 1;
            }
            let mut inside = kt[below..].iter().take_while(|&&t| t <= last);
            let step = inside.next().map_or(1 << shift, |&t| t - first + 1);
            assert!(inside.next().is_none(), "bucket {b} holds two thresholds");
            *e = (below as u32) << OFFSET_BITS | step;
        }
        debug_assert_eq!(unkey(key(-0.5)), -0.5);
        Encoder {
            map,
            table: Table {
                entries,
                shift,
                key_lo,
            },
        }
    }

    pub(crate) fn table(&self) -> &Table {
        &self.table
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
        self.table.lookup(x)
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
        Implementation::active().encode_slice(self, xn, out);
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
        Implementation::active().encode_scaled(self, values, scale, out);
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
        Implementation::active().encode_divided(self, values, divisor, out);
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
