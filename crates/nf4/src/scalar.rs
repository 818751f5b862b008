//! The scalar reference implementation (the *oracle*): plain safe Rust, one element at a time,
//! following bitsandbytes' CUDA kernels step by step. Every fast path (SIMD, GPU) must produce the
//! same bytes as these functions.
//!
//! The functions here take pre-validated buffers; the checked, multi-threaded entry points are
//! [`crate::quantize_into`] and [`crate::dequantize_into`].

use crate::{AbsmaxView, Element, QuantType};
use qlora_double_quant::block_absmax;
use qlora_double_quant::fastmath::{ftz, mul_ftz, rcp_approx_ftz};

/// Largest |x| of a block in f32 as the CUDA kernel reduces it: `max(ftz(|x|))` — NaN ignored
/// (`fmaxf`), subnormal values flushed to zero — and zero for an all-zero or empty block.
#[inline]
pub fn absmax_of<T: Element>(block: &[T]) -> f32 {
    block
        .iter()
        .fold(0.0f32, |m, &x| m.max(ftz(x.to_f32().abs())))
}

/// Quantize whole blocks: `input` starts at a block boundary; `packed` holds
/// `input.len().div_ceil(2)` bytes and `absmax` one value per (possibly partial) block.
///
/// Per block, as bitsandbytes' CUDA kernel compiled with `--use_fast_math` computes it:
/// `absmax = max(ftz(|x|))` (NaN ignored), `inv = rcp.approx.ftz(absmax)`
/// ([`rcp_approx_ftz`]: the GPU's approximate reciprocal, from the measured table), code of
/// `ftz(ftz(x) * inv)` ([`ftz`]: subnormals become signed zeros — so for FP4 a negative product
/// that underflows gets code 0, not 8); the element with the even index goes into the high nibble.
/// When the input length is odd, the last byte's low nibble is the code of the kernel's zero
/// padding, `encode(0 * inv)` (code 7 for NF4 — or code 0 in an all-zero block, where `0 * inf`
/// is NaN).
///
/// # Panics
/// If the buffer lengths do not match or `blocksize` is odd.
pub fn quantize_blocks<T: Element>(
    quant_type: QuantType,
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    assert!(blocksize % 2 == 0, "block size must be even");
    assert_eq!(packed.len(), input.len().div_ceil(2), "packed length");
    assert_eq!(
        absmax.len(),
        input.len().div_ceil(blocksize),
        "absmax length"
    );
    let encode = quant_type.encoder();
    for ((block, bytes), am) in input
        .chunks(blocksize)
        .zip(packed.chunks_mut(blocksize / 2))
        .zip(absmax.iter_mut())
    {
        let a = absmax_of(block);
        *am = a;
        let inv = rcp_approx_ftz(a);
        let code = |x: f32| encode(ftz(ftz(x) * inv));
        let mut pairs = block.chunks(2);
        for byte in bytes.iter_mut() {
            let pair = pairs.next().expect("one pair per byte");
            let hi = code(pair[0].to_f32());
            let lo = match pair.get(1) {
                Some(x) => code(x.to_f32()),
                None => code(0.0),
            };
            *byte = (hi << 4) | lo;
        }
    }
}

/// The 4-bit code of element `i` of a packed buffer (high nibble for even `i`).
#[inline]
pub fn code_at(packed: &[u8], i: usize) -> u8 {
    let b = packed[i >> 1];
    if i & 1 == 0 {
        b >> 4
    } else {
        b & 0x0f
    }
}

/// Dequantize elements `start .. start + out.len()` of a quantized tensor:
/// `out[k] = T(f32(table[code] * absmax[block]))`, rounding to nearest even for f16/bf16, with the
/// CUDA build's product ([`mul_ftz`]: a subnormal product is flushed to zero, a NaN is CUDA's
/// `0x7fffffff`, which becomes `0x7fff` in f16/bf16).
///
/// `packed` and `absmax` are the tensor's full buffers (indices are global).
///
/// # Panics
/// If the range is outside the buffers.
pub fn dequantize_range<T: Element>(
    quant_type: QuantType,
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    blocksize: usize,
    start: usize,
    out: &mut [T],
) {
    let table = quant_type.table();
    for (i, o) in (start..).zip(out.iter_mut()) {
        let a = absmax.get(i / blocksize);
        *o = T::from_f32(mul_ftz(table[code_at(packed, i) as usize], a));
    }
}

/// Absmax of every block via [`block_absmax`] semantics, for f32 input (re-exported helper for
/// other implementations' tests).
pub fn absmax_f32(block: &[f32]) -> f32 {
    block_absmax(block)
}
