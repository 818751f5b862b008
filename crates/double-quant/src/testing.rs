//! Proptest strategies and reference oracles for property tests against this crate (feature
//! `testing`).
//!
//! The oracles restate bitsandbytes' rules without the kernel's binary search: the nearest code
//! found by counting f32 midpoints (ties to the even index), and blockwise quantization as a
//! plain loop. The strategies draw what the codec meets in practice: per-block absmax values of
//! 4-bit weights (positive, clustered around a per-tensor scale) and optimizer moments spanning
//! several decades.
//!
//! ```
//! use proptest::prelude::*;
//! use qlora_double_quant::fastmath::rcp_approx_ftz;
//! use qlora_double_quant::testing::{absmax_values, reference_encode};
//! use qlora_double_quant::{DoubleQuantAbsmax, DynamicMap};
//!
//! proptest!(ProptestConfig::with_cases(8), |(absmax in absmax_values(1..2000))| {
//!     let dq = DoubleQuantAbsmax::compress(&absmax);
//!     let centred: Vec<f32> = absmax.iter().map(|a| a - dq.offset).collect();
//!     for (j, &c) in dq.codes.iter().enumerate() {
//!         let scale = dq.nested_absmax[j / 256];
//!         let xn = centred[j] * rcp_approx_ftz(scale);
//!         prop_assert_eq!(c, reference_encode(DynamicMap::signed(), xn));
//!     }
//! });
//! ```

use crate::fastmath::{ftz, rcp_approx_ftz};
use crate::{DynamicMap, MapKind, NESTED_BLOCKSIZE};
use proptest::prelude::*;
use std::ops::Range;

/// The nearest code of `xn` in `map`, restated: count the f32 midpoints `(v[i] + v[i+1]) · 0.5`
/// strictly below `xn`; a value exactly on a midpoint takes the even one of the two indices;
/// NaN → 0; values beyond the table clamp.
pub fn reference_encode(map: &DynamicMap, xn: f32) -> u8 {
    if xn.is_nan() {
        return 0;
    }
    let v = map.values();
    let mids: Vec<f32> = (0..255).map(|i| (v[i] + v[i + 1]) * 0.5).collect();
    let k = mids.iter().filter(|&&m| xn > m).count();
    if k < 255 && xn == mids[k] && k % 2 == 1 {
        return (k + 1) as u8;
    }
    k as u8
}

/// Blockwise 8-bit quantization as a plain loop, with the CUDA build's fast math: per block
/// `absmax = max ftz(|x|)` (NaN ignored), `inv = rcp_approx_ftz(absmax)`,
/// `code = reference_encode(ftz(ftz(x) · inv))`. Returns `(codes, absmax)`.
pub fn reference_quantize_blockwise(
    map: &DynamicMap,
    input: &[f32],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(input.len());
    let mut absmax = Vec::with_capacity(input.len().div_ceil(blocksize));
    for block in input.chunks(blocksize) {
        let a = block
            .iter()
            .filter(|x| !x.is_nan())
            .fold(0.0f32, |m, &x| m.max(ftz(x).abs()));
        let inv = rcp_approx_ftz(a);
        codes.extend(
            block
                .iter()
                .map(|&x| reference_encode(map, ftz(ftz(x) * inv))),
        );
        absmax.push(a);
    }
    (codes, absmax)
}

/// `f32(map[code] · absmax[block])` per element.
pub fn reference_dequantize_blockwise(
    map: &DynamicMap,
    codes: &[u8],
    absmax: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map.decode(c) * absmax[i / blocksize])
        .collect()
}

/// Largest gap between adjacent codes of `map` divided by two: the worst error of one element
/// relative to its block's absmax.
pub fn max_half_gap(map: &DynamicMap) -> f32 {
    map.values()
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f32::max)
        / 2.0
}

fn unit(seed: &mut u64) -> f64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// Per-block absmax values of a 4-bit weight: positive, log-normal around a per-tensor scale
/// between 1e-3 and 1 (the absmax of 64 normal weights is about 2.4 standard deviations), a length
/// drawn from `len` (more than 256 exercises several nested blocks).
pub fn absmax_values(len: Range<usize>) -> impl Strategy<Value = Vec<f32>> {
    (any::<u64>(), -3.0f64..0.0, 0.05f64..0.5, len).prop_map(|(mut seed, log_scale, spread, n)| {
        let scale = 10f64.powf(log_scale);
        (0..n)
            .map(|_| {
                let z = (unit(&mut seed) - 0.5) * 2.0 * 1.7320508; // unit variance
                (scale * (spread * z).exp()) as f32
            })
            .collect()
    })
}

/// Adam moments as the 8-bit optimizer meets them: signed first moments or non-negative second
/// moments spanning several decades within a block, with occasional exact zeros.
pub fn optimizer_moments(kind: MapKind, len: Range<usize>) -> impl Strategy<Value = Vec<f32>> {
    (any::<u64>(), -8.0f64..-1.0, len).prop_map(move |(mut seed, log_scale, n)| {
        (0..n)
            .map(|_| {
                let u = unit(&mut seed);
                if u < 0.02 {
                    return 0.0;
                }
                let magnitude = 10f64.powf(log_scale + 3.0 * unit(&mut seed));
                let v = match kind {
                    MapKind::Signed if unit(&mut seed) < 0.5 => -magnitude,
                    _ => magnitude,
                };
                v as f32
            })
            .collect()
    })
}

/// Block sizes the 8-bit blockwise codec accepts (64 … 4096).
pub fn blocksize_8bit() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![64usize, 128, 256, 512, 1024, 2048, 4096])
}

/// The nested block size of double quantization, for tests that mirror it.
pub const NESTED: usize = NESTED_BLOCKSIZE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dequantize_blockwise, quantize_blockwise};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn blockwise_codec_matches_the_oracle(
            x in optimizer_moments(MapKind::Signed, 1..5000),
            bs in blocksize_8bit(),
        ) {
            let map = DynamicMap::signed();
            let mut codes = vec![0u8; x.len()];
            let mut absmax = vec![0f32; x.len().div_ceil(bs)];
            quantize_blockwise(map, &x, bs, &mut codes, &mut absmax).unwrap();
            let (rc, ra) = reference_quantize_blockwise(map, &x, bs);
            prop_assert_eq!(&codes, &rc);
            prop_assert_eq!(&absmax, &ra);
            let mut back = vec![0f32; x.len()];
            dequantize_blockwise(map, &codes, &absmax, bs, &mut back).unwrap();
            prop_assert_eq!(back, reference_dequantize_blockwise(map, &rc, &ra, bs));
        }
    }

    #[test]
    fn half_gaps_are_those_of_the_maps() {
        // The signed map's widest gap sits next to ±1 (0.0070 relative), far below NF4's.
        let g = max_half_gap(DynamicMap::signed());
        assert!(g > 0.001 && g < 0.01, "{g}");
        assert!(max_half_gap(DynamicMap::unsigned()) < 0.01);
    }
}
