//! Double quantization of the absmax values, fast and exact: the same bytes as
//! [`DoubleQuantAbsmax::compress`], with bitsandbytes' binary search over the signed dynamic map
//! written without data-dependent branches (the search path depends on the data, so the
//! branchy form mispredicts on nearly every step) and the 256-value blocks spread over the rayon
//! pool.

use qlora_double_quant::{
    absmax_mean, block_absmax, DoubleQuantAbsmax, DynamicMap, NESTED_BLOCKSIZE,
};
use rayon::prelude::*;

/// Nested blocks per parallel task.
const BLOCKS_PER_TASK: usize = 64;

/// [`DynamicMap::encode`] without branches on the data: the same seven-step search from pivot
/// 127 and the same midpoint test, so the same code for every input (NaN included).
#[inline]
pub(crate) fn encode_signed(code: &[f32; 256], xn: f32) -> u8 {
    let mut pivot = 127usize;
    let mut lower_pivot = 0usize;
    let mut upper_pivot = 255usize;
    for step in [64usize, 32, 16, 8, 4, 2, 1] {
        let gt = xn > code[pivot];
        lower_pivot = if gt { pivot } else { lower_pivot };
        upper_pivot = if gt { upper_pivot } else { pivot };
        pivot = if gt { pivot + step } else { pivot - step };
    }
    // A pivot never set keeps 0 / 255, whose values the kernel uses at the ends; a pivot set
    // during the search is ≥ 1 and ≤ 254, so `code[pivot]` is always the bound.
    let (lower, upper, val) = (code[lower_pivot], code[upper_pivot], code[pivot]);
    let q = if xn > val {
        if xn > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if xn < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    q as u8
}

/// Values searched side by side: independent searches overlap in the CPU, where one search alone
/// is a chain of dependent loads.
const LANES: usize = 8;

/// [`encode_signed`] of `LANES` values at once (the same steps, interleaved).
#[inline]
fn encode_signed_lanes(code: &[f32; 256], xn: [f32; LANES]) -> [u8; LANES] {
    let mut pivot = [127usize; LANES];
    let mut lower_pivot = [0usize; LANES];
    let mut upper_pivot = [255usize; LANES];
    for step in [64usize, 32, 16, 8, 4, 2, 1] {
        for k in 0..LANES {
            let p = pivot[k];
            let gt = xn[k] > code[p];
            lower_pivot[k] = if gt { p } else { lower_pivot[k] };
            upper_pivot[k] = if gt { upper_pivot[k] } else { p };
            pivot[k] = if gt { p + step } else { p - step };
        }
    }
    let mut out = [0u8; LANES];
    for k in 0..LANES {
        let (x, p, lp, up) = (xn[k], pivot[k], lower_pivot[k], upper_pivot[k]);
        let (lower, upper, val) = (code[lp], code[up], code[p]);
        let q = if x > val {
            if x > (upper + val) * 0.5 {
                up
            } else {
                p
            }
        } else if x < (lower + val) * 0.5 {
            lp
        } else {
            p
        };
        out[k] = q as u8;
    }
    out
}

fn compress_blocks(
    map: &[f32; 256],
    offset: f32,
    absmax: &[f32],
    codes: &mut [u8],
    nested: &mut [f32],
) {
    let mut centered = [0f32; NESTED_BLOCKSIZE];
    for ((a, c), n) in absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(nested.iter_mut())
    {
        let centered = &mut centered[..a.len()];
        for (x, &v) in centered.iter_mut().zip(a) {
            *x = v - offset;
        }
        let m = block_absmax(centered);
        let inv = 1.0f32 / m;
        let mut lanes = c.chunks_exact_mut(LANES).zip(centered.chunks_exact(LANES));
        for (c8, x8) in &mut lanes {
            let mut xn = [0f32; LANES];
            for (n, &x) in xn.iter_mut().zip(x8) {
                *n = x * inv;
            }
            c8.copy_from_slice(&encode_signed_lanes(map, xn));
        }
        let done = c.len() / LANES * LANES;
        for (c, &x) in c[done..].iter_mut().zip(&centered[done..]) {
            *c = encode_signed(map, x * inv);
        }
        *n = m;
    }
}

/// [`DoubleQuantAbsmax::compress`], byte for byte, faster.
pub(crate) fn compress(absmax: &[f32]) -> DoubleQuantAbsmax {
    let offset = absmax_mean(absmax);
    let map = DynamicMap::signed().values();
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    let per_task = BLOCKS_PER_TASK * NESTED_BLOCKSIZE;
    if absmax.len() <= per_task {
        compress_blocks(map, offset, absmax, &mut codes, &mut nested_absmax);
    } else {
        absmax
            .par_chunks(per_task)
            .zip(codes.par_chunks_mut(per_task))
            .zip(nested_absmax.par_chunks_mut(BLOCKS_PER_TASK))
            .for_each(|((a, c), n)| compress_blocks(map, offset, a, c, n));
    }
    DoubleQuantAbsmax {
        codes,
        nested_absmax,
        offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_the_branchy_search() {
        let map = DynamicMap::signed();
        // A stride through every f32 bit pattern (NaN, ±Inf, subnormals, out-of-range values),
        // then every map value, its neighbours and every midpoint.
        let mut xs: Vec<f32> = (0..(1u64 << 32))
            .step_by(1009)
            .map(|b| f32::from_bits(b as u32))
            .collect();
        for w in map.values().windows(2) {
            let mid = (w[0] + w[1]) * 0.5;
            xs.extend([
                w[0],
                w[0].next_up(),
                w[0].next_down(),
                mid,
                mid.next_up(),
                mid.next_down(),
            ]);
        }
        for &x in &xs {
            assert_eq!(
                encode_signed(map.values(), x),
                map.encode(x),
                "xn = {x:e} ({:#x})",
                x.to_bits()
            );
        }
        for chunk in xs.chunks_exact(LANES) {
            let codes = encode_signed_lanes(map.values(), chunk.try_into().expect("8 values"));
            for (&x, c) in chunk.iter().zip(codes) {
                assert_eq!(c, map.encode(x), "lanes, xn = {x:e}");
            }
        }
    }

    #[test]
    fn compress_matches_double_quant_crate() {
        let mut s = 0x1234_5678u32;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for len in [
            0usize,
            1,
            2,
            255,
            256,
            257,
            1000,
            64 * 256 - 1,
            64 * 256 + 300,
            100_000,
        ] {
            let mut a: Vec<f32> = (0..len).map(|_| (next() % 10_000) as f32 / 997.0).collect();
            for (i, v) in a.iter_mut().enumerate() {
                match i % 501 {
                    7 => *v = 0.0,
                    11 => *v = f32::INFINITY,
                    13 => *v = 1.0e30,
                    17 => *v = f32::from_bits(1),
                    _ => {}
                }
            }
            if len > 300 {
                a[..300].fill(0.25); // a constant block
            }
            let fast = compress(&a);
            let reference = DoubleQuantAbsmax::compress(&a);
            assert_eq!(
                fast.offset.to_bits(),
                reference.offset.to_bits(),
                "len {len}"
            );
            assert_eq!(fast.codes, reference.codes, "len {len}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fast.nested_absmax),
                bits(&reference.nested_absmax),
                "len {len}"
            );
        }
    }
}
