//! Double quantization of the absmax values, fast and exact: the same bytes as
//! [`DoubleQuantAbsmax::compress`]. The offset is [`absmax_mean`] (an exact parallel sum where the
//! sum is order-independent); per 256-value block, centring and the block absmax run in one
//! vectorized pass and the codes come from the SIMD slice encoder of the signed dynamic map
//! ([`Encoder::encode_scaled`], exact: the code of `x * (1/absmax)` that bitsandbytes' binary
//! search picks). Blocks are spread over the rayon pool in tasks of [`BLOCKS_PER_TASK`].

use qlora_double_quant::{absmax_mean, DoubleQuantAbsmax, Encoder, NESTED_BLOCKSIZE};
use rayon::prelude::*;

/// Nested blocks per parallel task (16 Ki absmax values, about 10 µs of work).
const BLOCKS_PER_TASK: usize = 64;

/// Lanes of the centring / absmax pass (independent max accumulators vectorize).
const LANES: usize = 16;

/// `x[i] - offset` into `centered`, and the largest `|x[i] - offset|` with NaN ignored — the same
/// value as [`qlora_double_quant::block_absmax`] of the centred block (a maximum does not depend on
/// the order, and `abs` makes every zero `+0.0`).
#[inline]
fn center_and_absmax(x: &[f32], offset: f32, centered: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut cs = centered.chunks_exact_mut(LANES);
    for (x, c) in (&mut xs).zip(&mut cs) {
        for j in 0..LANES {
            c[j] = x[j] - offset;
            acc[j] = acc[j].max(c[j].abs());
        }
    }
    for (j, (&x, c)) in xs.remainder().iter().zip(cs.into_remainder()).enumerate() {
        *c = x - offset;
        acc[j] = acc[j].max(c.abs());
    }
    acc.into_iter().fold(0.0f32, f32::max)
}

fn compress_blocks(
    enc: &Encoder,
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
        let m = center_and_absmax(a, offset, centered);
        enc.encode_scaled(centered, 1.0f32 / m, c);
        *n = m;
    }
}

/// [`DoubleQuantAbsmax::compress`], byte for byte, faster.
pub(crate) fn compress(absmax: &[f32]) -> DoubleQuantAbsmax {
    let offset = absmax_mean(absmax);
    let enc = Encoder::signed();
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    let per_task = BLOCKS_PER_TASK * NESTED_BLOCKSIZE;
    if absmax.len() <= per_task {
        compress_blocks(enc, offset, absmax, &mut codes, &mut nested_absmax);
    } else {
        absmax
            .par_chunks(per_task)
            .zip(codes.par_chunks_mut(per_task))
            .zip(nested_absmax.par_chunks_mut(BLOCKS_PER_TASK))
            .for_each(|((a, c), n)| compress_blocks(enc, offset, a, c, n));
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
    use qlora_double_quant::DynamicMap;

    /// Double quantization restated on the oracle `DynamicMap::encode` (the transliterated CUDA
    /// binary search) with a left-to-right f64 mean: (offset, codes, nested absmax).
    fn oracle(a: &[f32]) -> (f32, Vec<u8>, Vec<f32>) {
        let offset = if a.is_empty() {
            0.0
        } else {
            (a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64) as f32
        };
        let map = DynamicMap::signed();
        let (mut codes, mut nested) = (Vec::new(), Vec::new());
        for block in a.chunks(NESTED_BLOCKSIZE) {
            let c: Vec<f32> = block.iter().map(|&v| v - offset).collect();
            let m = c.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
            codes.extend(c.iter().map(|&x| map.encode(x * (1.0 / m))));
            nested.push(m);
        }
        (offset, codes, nested)
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
            300_001,
        ] {
            let mut a: Vec<f32> = (0..len).map(|_| (next() % 10_000) as f32 / 997.0).collect();
            if len % 2 == 1 {
                // bf16-exact values (what bf16 weights give): the mean's exact parallel path.
                for v in a.iter_mut() {
                    *v = f32::from_bits(v.to_bits() & 0xffff_0000);
                }
            }
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
            let (offset, codes, nested) = oracle(&a);
            assert_eq!(fast.offset.to_bits(), offset.to_bits(), "oracle, len {len}");
            assert_eq!(fast.codes, codes, "oracle, len {len}");
            assert_eq!(
                bits(&fast.nested_absmax),
                bits(&nested),
                "oracle, len {len}"
            );
        }
    }
}
