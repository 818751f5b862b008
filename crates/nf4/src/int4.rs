//! A symmetric INT4 absmax baseline, for comparing NF4/FP4 against the plain integer grid (the
//! comparison of the QLoRA paper). Not a bitsandbytes format.
//!
//! Per block: `scale = absmax / 7`, `q = clamp(round_half_even(x / scale), −7, 7)`, stored as
//! `q + 8` in a nibble (so 15 of the 16 codes are used and 0 is exact); dequantized as
//! `(code − 8) · scale`. Packing and absmax are as for NF4.

use crate::{
    check_blocksize, check_len, num_blocks, packed_len, scalar::absmax_of, Element, Error,
};

/// Quantize into caller-provided buffers (same layout as [`crate::quantize_into`]).
pub fn quantize_into<T: Element>(
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    check_len("packed", packed_len(input.len()), packed.len())?;
    check_len("absmax", num_blocks(input.len(), blocksize), absmax.len())?;
    for ((block, bytes), am) in input
        .chunks(blocksize)
        .zip(packed.chunks_mut(blocksize / 2))
        .zip(absmax.iter_mut())
    {
        let a = absmax_of(block);
        *am = a;
        let inv = if a > 0.0 { 7.0 / a } else { 0.0 };
        let code = |x: f32| ((x * inv).round_ties_even().clamp(-7.0, 7.0) as i32 + 8) as u8;
        for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
            let hi = code(pair[0].to_f32());
            let lo = pair.get(1).map_or(8, |x| code(x.to_f32()));
            *byte = (hi << 4) | lo;
        }
    }
    Ok(())
}

/// Dequantize `out.len()` elements.
pub fn dequantize_into<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    out: &mut [T],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    check_len("packed", packed_len(out.len()), packed.len())?;
    check_len("absmax", num_blocks(out.len(), blocksize), absmax.len())?;
    for (i, o) in out.iter_mut().enumerate() {
        let c = crate::scalar::code_at(packed, i) as i32 - 8;
        *o = T::from_f32(c as f32 * (absmax[i / blocksize] / 7.0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn int4_roundtrip_bound() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 201) as f32 / 100.0 - 1.0)
            .collect();
        let mut p = vec![0u8; 500];
        let mut a = vec![0f32; 16];
        super::quantize_into(&x, 64, &mut p, &mut a).unwrap();
        let mut y = vec![0f32; 1000];
        super::dequantize_into(&p, &a, 64, &mut y).unwrap();
        for (i, (u, v)) in x.iter().zip(&y).enumerate() {
            assert!((u - v).abs() <= a[i / 64] / 14.0 + 1e-6, "{i}: {u} {v}");
        }
    }
}
