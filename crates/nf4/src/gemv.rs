//! Fused 4-bit matrix–vector products: `y = W·x` for a few token vectors `x`, decoded straight
//! from the packed codes (the weight is never written out, not even a row of it).
//!
//! # What is computed
//!
//! A [`QuantizedTensor`] of shape `[d0, …, d(m−1)]` is read as a row-major matrix of
//! `rows = d0·…·d(m−2)` rows and `cols = d(m−1)` columns (a 2-D `[out, in]` weight is the matrix
//! itself; a 0-D tensor is 1×1). For tokens `t < n`,
//!
//! ```text
//! y[t·rows + j] = Σ_k W[j, k] · x[t·cols + k]
//! ```
//!
//! where `W[j, k]` is **exactly the value dequantization gives in the tensor's own dtype**:
//! `f32(table[code] · absmax)` rounded to nearest even to [`QuantizedTensor::dtype`] (bf16, f16,
//! or f32 unrounded), i.e. the elements of `q.dequantize::<T>()` for `T` = that dtype, widened to
//! f32 (exact). Double-quantized absmax values are reconstructed as dequantization does.
//!
//! # Summation order (the same bits on every implementation)
//!
//! Each output is one f32 sum in a fixed order, [`dot`]'s:
//!
//! 1. 32 accumulators `acc[0..32]` start at `+0.0`;
//! 2. for `k = 0, 1, …, cols−1` in turn, `acc[k mod 32] = fma(W[j,k], x[k], acc[k mod 32])`
//!    (fused multiply-add, one rounding);
//! 3. `s[l] = acc[2l] + acc[2l+1]` for `l < 16`, then for `h = 8, 4, 2, 1`:
//!    `s[l] = s[l] + s[l+h]` for `l < h`; the result is `s[0]` ([`reduce`]).
//!
//! The scalar oracle follows these steps literally; the SIMD kernels keep the 32 accumulators in
//! vector lanes and perform the very same operations, so every [`Implementation`] returns the
//! same bits (NaN payloads aside), and the result equals [`dot`] of the dequantized row with `x`
//! bit for bit. Against the exact sum `Σ W·x` the usual bound for recursive summation holds:
//! `|y − Σ W·x| ≤ γ(c) · Σ |W·x|` with `γ(c) = c·u/(1 − c·u)`, `u = 2⁻²⁴`, and
//! `c = ⌈cols/32⌉ + 5` (the longest chain of roundings an element's product goes through).
//!
//! # Kernels
//!
//! Per block the 16-entry codebook is multiplied by the block's absmax and rounded to the dtype
//! once; each 32-element chunk of a row (16 code bytes) is then two table lookups — one
//! `vpermps` each for the 16 high (even) and 16 low (odd) nibbles on AVX-512, two `vpermps` +
//! `vblendvps` per 8 on AVX2 — and two FMAs per token against `x` rearranged once per call into
//! the same even/odd order. A chunk that straddles two blocks blends the lookups of both tables.
//! The last `cols mod 32` elements of a row, the reduction, NEON's table lookups and tensors with
//! an odd `cols` (whose rows do not start on a byte) run scalar code of the same order. Up to four
//! tokens (AVX-512; two on AVX2 and NEON) share one pass over the codes; more tokens take more
//! passes. Rows are split over the rayon pool in tasks of about [`TASK_ELEMS`] weights.

use crate::{
    check_len, scalar, AbsmaxView, Dtype, Error, Implementation, QuantType, QuantizedTensor,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Accumulators per output (the `k mod 32` lanes of the summation order).
pub const LANES: usize = 32;

/// Weights (rows × cols) per parallel task of the matrix–vector product.
pub const TASK_ELEMS: usize = 1 << 16;

/// The final reduction of the 32 accumulators, given as `even[l] = acc[2l]` and
/// `odd[l] = acc[2l+1]`: `s[l] = even[l] + odd[l]`, then halving steps `s[l] += s[l + h]` for
/// `h = 8, 4, 2, 1`.
#[inline(always)]
pub fn reduce(even: &[f32; 16], odd: &[f32; 16]) -> f32 {
    let mut s = [0.0f32; 16];
    for l in 0..16 {
        s[l] = even[l] + odd[l];
    }
    for h in [8, 4, 2, 1] {
        for l in 0..h {
            s[l] += s[l + h];
        }
    }
    s[0]
}

/// The dot product `Σ w[k]·x[k]` in the summation order of this module: the reference that
/// [`QuantizedTensor::gemv`] equals bit for bit when `w` is a dequantized row.
///
/// ```
/// use qlora_codec::gemv::dot;
///
/// assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0])?, 32.0);
/// assert!(dot(&[1.0], &[1.0, 2.0]).is_err());
/// # Ok::<(), qlora_codec::Error>(())
/// ```
pub fn dot(w: &[f32], x: &[f32]) -> Result<f32, Error> {
    check_len("x", w.len(), x.len())?;
    let mut even = [0.0f32; 16];
    let mut odd = [0.0f32; 16];
    for (k, (&wk, &xk)) in w.iter().zip(x).enumerate() {
        let lane = k % LANES;
        let acc = if lane % 2 == 0 {
            &mut even[lane / 2]
        } else {
            &mut odd[lane / 2]
        };
        *acc = wk.mul_add(xk, *acc);
    }
    Ok(reduce(&even, &odd))
}

/// Round an f32 to what `dtype` holds (round to nearest even), widened back (exact).
#[inline(always)]
pub(crate) fn round_to(dtype: Dtype, v: f32) -> f32 {
    match dtype {
        Dtype::F32 => v,
        Dtype::BF16 => bf16::from_f32(v).to_f32(),
        Dtype::F16 => f16::from_f32(v).to_f32(),
    }
}

/// A validated 4-bit tensor read as a `rows × cols` matrix (the kernels' view).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Matrix<'a> {
    pub(crate) quant_type: QuantType,
    pub(crate) dtype: Dtype,
    pub(crate) packed: &'a [u8],
    pub(crate) absmax: AbsmaxView<'a>,
    pub(crate) blocksize: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl Matrix<'_> {
    /// The 16 weights codes of block `b` stand for, as dequantization rounds them.
    #[inline]
    pub(crate) fn scaled_table(&self, b: usize) -> [f32; 16] {
        let a = self.absmax.get(b);
        let table = self.quant_type.table();
        let mut t = [0.0f32; 16];
        for (o, &v) in t.iter_mut().zip(table) {
            *o = round_to(self.dtype, qlora_double_quant::fastmath::mul_ftz(v, a));
        }
        t
    }
}

/// The x of all tokens rearranged for the kernels: per token `cols` rounded up to a multiple of
/// 32 values, each chunk of 32 as its 16 even-index elements then its 16 odd-index elements
/// (the order of the high and low nibbles of 16 code bytes); padding is zero.
pub(crate) fn prepare_x(x: &[f32], n: usize, cols: usize) -> (Vec<f32>, usize) {
    let stride = cols.div_ceil(LANES) * LANES;
    let mut xs = vec![0.0f32; n * stride];
    for (dst, src) in xs
        .chunks_exact_mut(stride.max(1))
        .zip(x.chunks_exact(cols.max(1)))
    {
        for (k, &v) in src.iter().enumerate() {
            dst[position(k)] = v;
        }
    }
    (xs, stride)
}

/// Where element `k` of a row sits in the rearranged x.
#[inline(always)]
pub(crate) fn position(k: usize) -> usize {
    let i = k % LANES;
    k - i + (i & 1) * 16 + i / 2
}

/// Accumulate elements `k_from..cols` of row `row` against one token's rearranged `xs` into the
/// accumulators (`even[l] = acc[2l]`, `odd[l] = acc[2l+1]`), in the order of the module docs, and
/// reduce. The scalar oracle is this with `k_from = 0`; the SIMD kernels run it for the tail of
/// each row (inlined into them, where `mul_add` is one FMA instruction).
#[inline(always)]
pub(crate) fn finish_row(
    m: &Matrix<'_>,
    row: usize,
    k_from: usize,
    xs: &[f32],
    even: &mut [f32; 16],
    odd: &mut [f32; 16],
) -> f32 {
    let g0 = row * m.cols;
    let mut block = usize::MAX;
    let mut table = [0.0f32; 16];
    for k in k_from..m.cols {
        let g = g0 + k;
        if g / m.blocksize != block {
            block = g / m.blocksize;
            table = m.scaled_table(block);
        }
        let w = table[scalar::code_at(m.packed, g) as usize];
        let i = k % LANES;
        let acc = if i % 2 == 0 {
            &mut even[i / 2]
        } else {
            &mut odd[i / 2]
        };
        *acc = w.mul_add(xs[position(k)], *acc);
    }
    reduce(even, odd)
}

/// The scalar oracle for rows `r0..r0 + yt.len()/n`: `yt[(j − r0)·n + t]` for tokens `t < n`.
pub(crate) fn rows_scalar(
    m: &Matrix<'_>,
    xs: &[f32],
    stride: usize,
    n: usize,
    r0: usize,
    yt: &mut [f32],
) {
    for (j, yrow) in (r0..).zip(yt.chunks_exact_mut(n)) {
        for (t, y) in yrow.iter_mut().enumerate() {
            let mut even = [0.0f32; 16];
            let mut odd = [0.0f32; 16];
            *y = finish_row(
                m,
                j,
                0,
                &xs[t * stride..(t + 1) * stride],
                &mut even,
                &mut odd,
            );
        }
    }
}

/// Rows `r0..` with implementation `imp` (the oracle where it has no kernel here or `cols` is
/// odd).
fn rows_with(
    imp: Implementation,
    m: &Matrix<'_>,
    xs: &[f32],
    stride: usize,
    n: usize,
    r0: usize,
    yt: &mut [f32],
) {
    if m.cols % 2 == 0 {
        match imp {
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx512 => {
                if let Some(k) = crate::arch::x86_64::gemv_avx512::Kernel::new() {
                    return k.rows(m, xs, stride, n, r0, yt);
                }
            }
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx2 => {
                if let Some(k) = crate::arch::x86_64::gemv_avx2::Kernel::new() {
                    return k.rows(m, xs, stride, n, r0, yt);
                }
            }
            #[cfg(all(target_arch = "aarch64", qlora_simd))]
            Implementation::Neon => {
                if let Some(k) = crate::arch::aarch64::gemv_neon::Kernel::new() {
                    return k.rows(m, xs, stride, n, r0, yt);
                }
            }
            _ => {}
        }
    }
    rows_scalar(m, xs, stride, n, r0, yt)
}

/// `(rows, cols)` of the matrix view of a tensor shape.
fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&cols, lead)) => (lead.iter().product(), cols),
        None => (1, 1),
    }
}

/// [`QuantizedTensor::gemv`] with implementation `imp` ([`CodecKernels::gemv`](crate::CodecKernels::gemv)):
/// the scalar oracle where `imp` cannot run here.
pub(crate) fn gemv_with(
    imp: Implementation,
    q: &QuantizedTensor,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> Result<(), Error> {
    let (rows, cols) = matrix_dims(q.shape());
    check_len("x", n.saturating_mul(cols), x.len())?;
    check_len("y", n.saturating_mul(rows), y.len())?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    let m = Matrix {
        quant_type: q.quant_type(),
        dtype: q.dtype(),
        packed: q.packed(),
        absmax: q.absmax().view(),
        blocksize: q.blocksize(),
        rows,
        cols,
    };
    let (xs, stride) = prepare_x(x, n, cols);
    let rows_per_task = (TASK_ELEMS / cols.max(1)).max(1);
    let run = |yt: &mut [f32]| {
        if rows * cols < TASK_ELEMS * 2 {
            rows_with(imp, &m, &xs, stride, n, 0, yt);
        } else {
            yt.par_chunks_mut(rows_per_task * n)
                .enumerate()
                .for_each(|(i, c)| rows_with(imp, &m, &xs, stride, n, i * rows_per_task, c));
        }
    };
    if n == 1 {
        run(y);
    } else {
        let mut yt = vec![0.0f32; rows * n];
        run(&mut yt);
        for (j, yrow) in yt.chunks_exact(n).enumerate() {
            for (t, &v) in yrow.iter().enumerate() {
                y[t * rows + j] = v;
            }
        }
    }
    Ok(())
}

impl QuantizedTensor {
    /// Fused matrix–vector product for `n` tokens: `y[t·rows + j] = Σ_k W[j,k]·x[t·cols + k]`
    /// with `W` read as `rows × cols` (`cols` the last dimension), decoded straight from the
    /// packed codes. `x` holds `n·cols` values, `y` receives `n·rows` (overwritten).
    ///
    /// `W[j,k]` are the values [`dequantize`](Self::dequantize) gives in the tensor's dtype, and
    /// each output is summed in the fixed order of [`gemv`](crate::gemv) — the result equals
    /// [`gemv::dot`](crate::gemv::dot) of the dequantized row with `x`, bit for bit, on every
    /// [`Implementation`]. Runs the active implementation, on the rayon pool for large tensors.
    ///
    /// ```
    /// use qlora_codec::{gemv, QuantizeOptions, QuantizedTensor};
    ///
    /// let (rows, cols) = (48, 256);
    /// let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    /// let q = QuantizedTensor::quantize(&w, &[rows, cols], QuantizeOptions::qlora())?;
    /// let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.1).sin()).collect(); // two tokens
    /// let mut y = vec![0.0f32; 2 * rows];
    /// q.gemv(&x, 2, &mut y)?;
    ///
    /// let deq: Vec<f32> = q.dequantize()?;
    /// for t in 0..2 {
    ///     for j in 0..rows {
    ///         let want = gemv::dot(&deq[j * cols..][..cols], &x[t * cols..][..cols])?;
    ///         assert_eq!(y[t * rows + j].to_bits(), want.to_bits());
    ///     }
    /// }
    /// assert!(q.gemv(&x, 3, &mut y).is_err()); // x holds 2 tokens, not 3
    /// # Ok::<(), qlora_codec::Error>(())
    /// ```
    pub fn gemv(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), Error> {
        gemv_with(Implementation::active(), self, x, n, y)
    }
}
