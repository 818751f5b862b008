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

use crate::DynamicMap;
use crate::Implementation;
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

/// Fixed-point scale of the segment coordinate in [`Segments`]: `2^15` units per code.
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
pub(crate) const FIX: f32 = 32768.0;

/// Fixed-point units (of [`FIX`] per code, so `2^-12` of a code spacing) within which a coordinate
/// counts as near a threshold. The thresholds lie within 0.7 units of their integers, one f32
/// step of `|x|` is at most 0.3 units, and the coordinate is rounded once (at most half a unit).
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
pub(crate) const NEAR_UNITS: i32 = 8;

/// Bits of the fixed-point coordinate tested for nearness: `(t + NEAR_UNITS) mod FIX` is below
/// `2 · NEAR_UNITS` exactly when `(t + NEAR_UNITS) & NEAR_MASK == 0`.
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
pub(crate) const NEAR_MASK: i32 = (FIX as i32 - 1) & !(2 * NEAR_UNITS - 1);

/// How far below a split (in keys) its [`Segments::octave`] entry starts: the entry is
/// `((split − SPLIT_BELOW) & !15) | segment`, so `d = key − entry` is in `[0, SPLIT_WINDOW)` for
/// every key within 48 below to 64 above the split (flagged), and above `SPLIT_UP` exactly for
/// the keys above the split outside that window.
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
pub(crate) const SPLIT_BELOW: i32 = 48;

/// Width of the flagged window of `d` around a split.
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
pub(crate) const SPLIT_WINDOW: u32 = 128;

/// `d > SPLIT_UP` chooses the upper segment (inside the window either choice is flagged).
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
pub(crate) const SPLIT_UP: i32 = 64;

/// Octave entry of an octave without a split: `d` wraps to a negative value for every key.
const NO_SPLIT: i32 = i32::MIN;

/// The map's positive codes as straight segments, for an encoder without table loads per lane.
///
/// bitsandbytes' dynamic maps are decades: in decade `k` the codes are `n` evenly spaced values
/// `10^k · (0.1 + (j + ½) · 0.9 / n)`, so inside a decade the decision thresholds (midpoints) lie
/// on an even grid too. Per segment — the zero code, each decade, the top code `1.0` — a linear
/// coordinate `t = |x| · scale − offset` (fixed point, [`FIX`] units per code, the segment's first
/// code folded in) puts every threshold inside the segment within a few millionths of a code of
/// an integer, so `min(⌊t⌋, max_code)` is the code wherever `t` is not within [`NEAR_UNITS`] of an
/// integer. The segment of `|x|` comes from its binary exponent: every octave `[2^e, 2^(e+1))`
/// holds at most one segment split (a threshold between two decades), so per octave one integer
/// compare with that split's key (one table entry holds the key, rounded, and the first segment
/// of the octave) picks between two consecutive segments. Lanes near a split ([`SPLIT_BELOW`],
/// [`SPLIT_WINDOW`]) or near an integer coordinate are flagged, and the caller encodes them with
/// the exact table.
///
/// Negative values: the signed map is symmetric (`code(−x) = max(254 − code(x), 0)`, its tie
/// rule included); for the unsigned map every negative bit pattern (−0 and negative NaN too)
/// counts as +0, whose code 0 is theirs. NaN and ±inf are always flagged (their coordinate is
/// NaN, which truncates to `i32::MIN`, a multiple of [`FIX`]). The SIMD kernel (x86-64 AVX-512) and
/// `Segments::code` (its scalar model, for tests) compute exactly this; tests check that every
/// unflagged f32 of `[-2, 2]` gets the exact code and that every value within 8 keys of a
/// threshold is flagged.
#[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Segments {
    /// Per octave (biased exponent `& 31`): `((split − SPLIT_BELOW) & !15) | segment`, with the
    /// f32 bits of the split inside the octave and the segment of the octave's smallest value;
    /// `i32::MIN | segment` for an octave without a split.
    pub(crate) octave: [i32; 32],
    /// Per segment: the coordinate's scale (fixed point).
    pub(crate) scale: [f32; 16],
    /// Per segment: the coordinate's offset (fixed point, the first code folded in).
    pub(crate) offset: [f32; 16],
    /// Per segment: its largest code.
    pub(crate) max_code: [i32; 16],
    /// The smallest biased exponent looked up (smaller ones are clamped to it).
    pub(crate) exp_min: u32,
    /// The signed map (mirror negative values) or the unsigned one (negative values give 0).
    pub(crate) signed: bool,
}

impl Segments {
    /// Segments of `map` whose threshold keys are `kt` (see [`Encoder`]).
    fn new(map: &DynamicMap, kt: &[u32]) -> Self {
        let v = map.values();
        let signed = map.kind() == crate::MapKind::Signed;
        // Decade sizes from the smallest positive code up, then the code of 1.0.
        let (zero, sizes): (usize, &[usize]) = if signed {
            (127, &[1, 2, 4, 8, 16, 32, 64])
        } else {
            (0, &[2, 4, 8, 16, 32, 64, 128])
        };
        assert_eq!(v[zero], 0.0);
        assert_eq!(v[255], 1.0);
        assert_eq!(zero + 1 + sizes.iter().sum::<usize>(), 255);
        // The value above which the code is at least `c` (c > 0).
        let threshold = |c: usize| unkey(kt[c - 1]);
        let mut scale = [0.0f32; 16];
        let mut offset = [0.0f32; 16];
        let mut max_code = [0i32; 16];
        // Splits: `splits[s - 1]` separates segment s - 1 from segment s.
        let mut splits = Vec::new();
        let constant = |code: usize| -((code as f64 + 0.5) * FIX as f64) as f32;
        // Segment 0: the zero code.
        offset[0] = constant(zero);
        max_code[0] = zero as i32;
        let mut c0 = zero + 1;
        for (i, &n) in sizes.iter().enumerate() {
            let s = i + 1;
            let (first, last) = (v[c0] as f64, v[c0 + n - 1] as f64);
            // Spacing of the decade (a single code: twice its value, so `t` stays in [0, 2)).
            let g = if n > 1 {
                (last - first) / (n - 1) as f64
            } else {
                2.0 * first
            };
            if n > 1 {
                for c in c0..c0 + n - 1 {
                    let gap = (v[c + 1] - v[c]) as f64;
                    assert!((gap / g - 1.0).abs() < 1e-4, "code {c}: uneven decade");
                }
            }
            scale[s] = (FIX as f64 / g) as f32;
            offset[s] = ((first / g - 0.5 - c0 as f64) * FIX as f64) as f32;
            max_code[s] = (c0 + n - 1) as i32;
            splits.push(threshold(c0));
            c0 += n;
        }
        // The top segment: code 255 (1.0).
        let top = sizes.len() + 1;
        offset[top] = constant(255);
        max_code[top] = 255;
        splits.push(threshold(255));
        let segments = top + 1;
        assert!(segments <= 16);
        // The coordinate of every threshold inside a segment is an integer to well within
        // NEAR_UNITS (exact f64 arithmetic on the f32 constants, as the FMA computes it).
        for s in 1..top {
            let (lo, hi) = (splits[s - 1], splits[s]);
            for c in 1..255 {
                let th = threshold(c);
                if th > lo && th < hi {
                    let t = th as f64 * scale[s] as f64 - offset[s] as f64;
                    let err = (t - c as f64 * FIX as f64).abs();
                    assert!(err < NEAR_UNITS as f64 / 4.0, "threshold {c}: off by {err}");
                }
            }
            // Just above the split the coordinate is well inside the segment's first code.
            let t = splits[s - 1] as f64 * scale[s] as f64 - offset[s] as f64;
            let first = (max_code[s - 1] + 1) as f64 * FIX as f64;
            assert!(
                t > first + 0.1 * FIX as f64,
                "segment {s} starts below its first code"
            );
        }
        let exp = |x: f32| x.to_bits() >> 23;
        let exp_min = exp(splits[0]);
        assert!(127 - exp_min < 32, "segment tables span too many octaves");
        let mut octave = [NO_SPLIT; 32];
        for e in exp_min..=127 {
            let start = f32::from_bits(e << 23);
            let slot = (e & 31) as usize;
            let first = splits.iter().filter(|&&b| b < start).count() as i32;
            let mut inside = splits.iter().filter(|&&b| exp(b) == e);
            let key = inside.next().map_or(NO_SPLIT, |&b| {
                let k = (b.to_bits() as i32 - SPLIT_BELOW) & !15;
                // The rounded key stays inside the octave, so the window stays around the split.
                assert!(
                    k as u32 >> 23 == e,
                    "split {b:e} too close to its octave's start"
                );
                k
            });
            octave[slot] = key | first;
            assert!(inside.next().is_none(), "two splits in octave {e}");
        }
        Segments {
            octave,
            scale,
            offset,
            max_code,
            exp_min,
            signed,
        }
    }

    /// The code of `y` and whether it is flagged (near a threshold: use the exact table), exactly
    /// as the SIMD kernels compute them (the code is only meaningful when not flagged).
    #[cfg(test)]
    pub(crate) fn code(&self, y: f32) -> (u8, bool) {
        // Signed map: the magnitude. Unsigned map: negative bit patterns become +0.
        let a_bits = if self.signed {
            y.to_bits() & 0x7fff_ffff
        } else {
            (y.to_bits() as i32).max(0) as u32
        };
        let a = f32::from_bits(a_bits);
        let slot = ((a_bits >> 23).clamp(self.exp_min, 127) & 31) as usize;
        let entry = self.octave[slot];
        let d = (a_bits as i32).wrapping_sub(entry);
        let s = ((entry & 15) + i32::from(d > SPLIT_UP)) as usize;
        let t = a.mul_add(self.scale[s], -self.offset[s]);
        // vcvttps2dq: truncation; NaN and out-of-range give i32::MIN.
        let ti = if !(-2147483648.0..2147483648.0).contains(&t) {
            i32::MIN
        } else {
            t as i32
        };
        let mut code = ((ti as u32 >> 15) as i32).min(self.max_code[s]);
        let near_int = ti.wrapping_add(NEAR_UNITS) & NEAR_MASK == 0;
        let near_split = (d as u32) < SPLIT_WINDOW;
        if self.signed && y.is_sign_negative() {
            code = (254 - code).max(0);
        }
        (code as u8, near_int || near_split)
    }
}

/// The 255 threshold keys of `map`, ascending: the code of `x` is the number of `k` with
/// `key(x) > kt[k]`. For odd `k` the threshold is the next f32 below the midpoint
/// `(code[k] + code[k+1]) * 0.5` (key one lower), so a tie moves up to the even index.
pub(crate) fn threshold_keys(map: &DynamicMap) -> Vec<u32> {
    let code = map.values();
    let kt: Vec<u32> = (0..255)
        .map(|k| {
            let mid = (code[k] + code[k + 1]) * 0.5;
            assert!(mid != 0.0 && mid.is_finite());
            key(mid) - (k as u32 & 1)
        })
        .collect();
    assert!(kt.windows(2).all(|w| w[0] < w[1]));
    kt
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
    #[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
    segments: Segments,
}

impl Encoder {
    fn new(map: &'static DynamicMap) -> Self {
        let kt = threshold_keys(map);
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
            segments: Segments::new(map, &kt),
        }
    }

    pub(crate) fn table(&self) -> &Table {
        &self.table
    }

    #[cfg_attr(not(all(target_arch = "x86_64", qlora_simd)), allow(dead_code))]
    pub(crate) fn segments(&self) -> &Segments {
        &self.segments
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
    #[inline]
    pub fn encode_divided(&self, values: &[f32], divisor: f32, out: &mut [u8]) {
        assert!(
            out.len() >= values.len(),
            "encode_divided: output shorter than input"
        );
        Implementation::active().encode_divided(self, values, divisor, out);
    }

    /// [`encode_divided`](Self::encode_divided) block by block: block `j` (elements
    /// `j·size .. (j+1)·size`, the last one possibly shorter) is divided by `divisors[j]`. One
    /// call for many blocks (bitsandbytes' 8-bit optimizers re-quantize blocks of 256, each with
    /// its fresh absmax) saves the per-call set-up of the SIMD kernels.
    ///
    /// ```
    /// use qlora_double_quant::Encoder;
    ///
    /// let enc = Encoder::signed();
    /// let x = [0.5f32, -1.0, 2.0, 4.0, -1.0];
    /// let mut codes = [0u8; 5];
    /// enc.encode_blocks_divided(&x, 2, &[1.0, 4.0, 1.0], &mut codes);
    /// let mut expected = [0u8; 5];
    /// enc.encode_divided(&x[..2], 1.0, &mut expected[..2]);
    /// enc.encode_divided(&x[2..4], 4.0, &mut expected[2..4]);
    /// enc.encode_divided(&x[4..], 1.0, &mut expected[4..]);
    /// assert_eq!(codes, expected);
    /// ```
    ///
    /// # Panics
    /// If `size` is 0, `divisors.len()` is not the number of blocks (`values.len().div_ceil(size)`)
    /// or `out` is shorter than `values`.
    pub fn encode_blocks_divided(
        &self,
        values: &[f32],
        size: usize,
        divisors: &[f32],
        out: &mut [u8],
    ) {
        Implementation::active().encode_blocks_divided(self, values, size, divisors, out);
    }

    /// [`encode_scaled`](Self::encode_scaled) block by block: block `j` of `size` elements is
    /// multiplied by `scales[j]` (see [`encode_blocks_divided`](Self::encode_blocks_divided)).
    ///
    /// # Panics
    /// If `size` is 0, `scales.len()` is not the number of blocks or `out` is shorter than
    /// `values`.
    pub fn encode_blocks_scaled(
        &self,
        values: &[f32],
        size: usize,
        scales: &[f32],
        out: &mut [u8],
    ) {
        Implementation::active().encode_blocks_scaled(self, values, size, scales, out);
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
mod segment_tests {
    use super::*;

    fn encoders() -> [(&'static DynamicMap, &'static Encoder); 2] {
        [
            (DynamicMap::signed(), Encoder::signed()),
            (DynamicMap::unsigned(), Encoder::unsigned()),
        ]
    }

    #[test]
    fn unflagged_codes_are_exact_near_every_threshold() {
        for (map, enc) in encoders() {
            let seg = enc.segments();
            for kt in threshold_keys(map) {
                for d in -3000i64..=3000 {
                    let k = (kt as i64 + d) as u32;
                    for x in [unkey(k), -unkey(k)] {
                        let (code, flagged) = seg.code(x);
                        if !flagged {
                            assert_eq!(code, map.encode(x), "x = {x:e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn values_a_few_keys_from_a_threshold_are_flagged() {
        // The divided encoder's reciprocal product is at most 4 keys from the quotient; this
        // checks a margin of twice that on both sides of every threshold (the signed map's
        // thresholds of either sign, where the negative side is computed as a mirror; the
        // unsigned map has positive thresholds only).
        for (map, enc) in encoders() {
            let seg = enc.segments();
            for kt in threshold_keys(map) {
                for d in -7i64..=8 {
                    let x = unkey((kt as i64 + d) as u32);
                    assert!(seg.code(x).1, "x = {x:e} not flagged");
                    if map.kind() == crate::MapKind::Signed {
                        assert!(seg.code(-x).1, "x = {:e} not flagged", -x);
                    }
                }
            }
        }
    }

    #[test]
    fn unflagged_codes_are_exact_on_a_sweep_and_special_values() {
        for (map, enc) in encoders() {
            let seg = enc.segments();
            let mut flagged = 0usize;
            let mut total = 0usize;
            let mut bits = 0u32;
            while bits <= 0x4080_0000 {
                for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                    let (code, f) = seg.code(x);
                    total += 1;
                    if f {
                        flagged += 1;
                    } else {
                        assert_eq!(code, map.encode(x), "x = {x:e}");
                    }
                }
                bits += 101;
            }
            for x in [
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                2.0,
                -2.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                -f32::NAN,
                f32::MAX,
                f32::MIN,
                f32::MIN_POSITIVE,
                1e-40,
                -1e-40,
            ] {
                let (code, f) = seg.code(x);
                if !f {
                    assert_eq!(code, map.encode(x), "x = {x:e}");
                }
            }
            // Flagged lanes are rare (they cost an exact re-encode of their vector).
            assert!(flagged * 200 < total, "{flagged} of {total} flagged");
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
