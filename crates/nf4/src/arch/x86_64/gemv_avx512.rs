//! AVX-512 (F + BW) fused 4-bit matrix–vector kernel (see [`crate::gemv`] for the semantics).
//!
//! Per block: the codebook times the absmax (`vmulps`, the oracle's IEEE product), rounded to the
//! dtype (integer round-to-nearest-even for bf16, `vcvtps2ph`/`vcvtph2ps` for f16) — one register
//! holding the block's 16 weights. Per 32-element chunk of a row: one `vpmovzxbd` of 16 code
//! bytes, a shift for the high nibbles, two `vpermps` (even elements, odd elements) and, per
//! token, two `vfmadd` into the accumulators of lanes `2l` and `2l+1` against `x` rearranged in
//! the same even/odd order. A chunk that straddles two blocks blends both tables' lookups by a
//! lane mask. The row's tail (`cols mod 32` elements) and the final reduction are the scalar
//! code of [`crate::gemv`], inlined here.

use super::avx512::bf16_rne;
use crate::gemv::{finish_row, Matrix};
use crate::{Dtype, Implementation};
use core::arch::x86_64::*;

const DT_F32: u8 = 0;
const DT_F16: u8 = 1;
const DT_BF16: u8 = 2;

/// Tokens that share one pass over a row's codes.
const MAX_TOKENS: usize = 4;

/// The AVX-512 matrix–vector kernel; a value exists only on a CPU with AVX-512 F and BW.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Avx512`] (AVX-512 F, BW, DQ, VL; this kernel uses F and BW).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Avx512.is_available().then_some(Kernel {
            _features_detected: (),
        })
    }

    /// Rows `r0 .. r0 + yt.len()/n` for `n` tokens: `yt[(j − r0)·n + t]`. `xs` is
    /// [`crate::gemv::prepare_x`]'s rearranged x with `stride` values per token.
    pub(crate) fn rows(
        self,
        m: &Matrix<'_>,
        xs: &[f32],
        stride: usize,
        n: usize,
        r0: usize,
        yt: &mut [f32],
    ) {
        let nrows = yt.len() / n.max(1);
        assert!(m.cols.is_multiple_of(2), "odd rows do not start on a byte");
        assert!(
            m.blocksize >= 32 && m.blocksize.is_power_of_two(),
            "block size {}",
            m.blocksize
        );
        assert!(
            (r0 + nrows) * m.cols <= 2 * m.packed.len(),
            "rows outside the codes"
        );
        assert!(
            stride >= m.cols.div_ceil(32) * 32 && xs.len() >= n * stride,
            "x length"
        );
        assert_eq!(
            m.absmax.len(),
            (m.rows * m.cols).div_ceil(m.blocksize),
            "absmax length"
        );
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(MAX_TOKENS);
            // SAFETY: AVX-512 F and BW were detected (`new`). Rows `r0..r0+nrows` lie inside the
            // codes and `cols` is even (asserted), so every row starts on a byte and its full
            // chunks' 16-byte loads are in bounds; tokens `t0..t0+nt` have `stride` ≥ the padded
            // row length of rearranged x each (asserted); blocks are ≥ 32 elements, so a chunk
            // touches at most two; absmax values are read through the bounds-checked view.
            unsafe {
                match (nt, m.dtype) {
                    (1, Dtype::F32) => rows_n::<1, DT_F32>(m, xs, stride, n, t0, r0, yt),
                    (2, Dtype::F32) => rows_n::<2, DT_F32>(m, xs, stride, n, t0, r0, yt),
                    (3, Dtype::F32) => rows_n::<3, DT_F32>(m, xs, stride, n, t0, r0, yt),
                    (_, Dtype::F32) => rows_n::<4, DT_F32>(m, xs, stride, n, t0, r0, yt),
                    (1, Dtype::F16) => rows_n::<1, DT_F16>(m, xs, stride, n, t0, r0, yt),
                    (2, Dtype::F16) => rows_n::<2, DT_F16>(m, xs, stride, n, t0, r0, yt),
                    (3, Dtype::F16) => rows_n::<3, DT_F16>(m, xs, stride, n, t0, r0, yt),
                    (_, Dtype::F16) => rows_n::<4, DT_F16>(m, xs, stride, n, t0, r0, yt),
                    (1, Dtype::BF16) => rows_n::<1, DT_BF16>(m, xs, stride, n, t0, r0, yt),
                    (2, Dtype::BF16) => rows_n::<2, DT_BF16>(m, xs, stride, n, t0, r0, yt),
                    (3, Dtype::BF16) => rows_n::<3, DT_BF16>(m, xs, stride, n, t0, r0, yt),
                    (_, Dtype::BF16) => rows_n::<4, DT_BF16>(m, xs, stride, n, t0, r0, yt),
                }
            }
            t0 += nt;
        }
    }
}

/// The 16 weights of a block with absmax `a`: `round_dtype(table · a)` as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn scaled_table<const DT: u8>(values: &[f32; 16], table: __m512, a: f32) -> __m512 {
    let s = if qlora_double_quant::fastmath::is_plain_scale(a) {
        _mm512_mul_ps(table, _mm512_set1_ps(a))
    } else {
        // NaN, infinite or tiny scale: the products dequantization computes (ftz, CUDA's NaN).
        let t = values.map(|v| qlora_double_quant::fastmath::mul_ftz(v, a));
        // SAFETY: `t` holds 16 f32.
        unsafe { _mm512_loadu_ps(t.as_ptr()) }
    };
    match DT {
        DT_F32 => s,
        DT_F16 => _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(s)),
        _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bf16_rne(_mm512_castps_si512(s)))),
    }
}

/// `nt = N` tokens starting at token `t0`, rows `r0 .. r0 + yt.len()/n`.
///
/// # Safety
/// AVX-512 F and BW must be available; `m.cols` is even; rows `r0..r0 + yt.len()/n` lie inside
/// `m.packed`; `m.blocksize` is a power of two ≥ 32; `xs` holds `n` tokens of `stride ≥ 32·⌈cols/32⌉`
/// values and `t0 + N ≤ n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_n<const N: usize, const DT: u8>(
    m: &Matrix<'_>,
    xs: &[f32],
    stride: usize,
    n: usize,
    t0: usize,
    r0: usize,
    yt: &mut [f32],
) {
    let table = m.quant_type.table();
    // SAFETY: `table` holds 16 f32.
    let tab = unsafe { _mm512_loadu_ps(table.as_ptr()) };
    let cols = m.cols;
    let bs = m.blocksize;
    let full = cols / 32;
    // Block sizes are powers of two (`check_blocksize`).
    let shift = bs.trailing_zeros();
    let lanes_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let lanes_odd = _mm512_add_epi32(lanes_even, _mm512_set1_epi32(1));
    for (j, yrow) in (r0..).zip(yt.chunks_exact_mut(n)) {
        let g0 = j * cols;
        // SAFETY: `g0/2` is inside `packed` or one past it (row `j` lies inside the codes).
        let p = unsafe { m.packed.as_ptr().add(g0 / 2) };
        let mut ae = [_mm512_setzero_ps(); N];
        let mut ao = [_mm512_setzero_ps(); N];
        // Chunks advance by 32 ≤ bs elements, so each crosses at most one block boundary; the
        // first chunk moves `block` onto its own block and loads that table (a row without full
        // chunks reads no absmax).
        let mut block = (g0 >> shift).wrapping_sub(1);
        let mut boundary = (g0 >> shift) << shift;
        let mut t = _mm512_setzero_ps();
        for c in 0..full {
            let g = g0 + 32 * c;
            if g >= boundary {
                block = block.wrapping_add(1);
                boundary += bs;
                t = scaled_table::<DT>(table, tab, m.absmax.get(block));
            }
            // SAFETY: chunk `c` (elements g .. g+32, bytes g/2 .. g/2+16) lies inside the row.
            let v = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.add(16 * c).cast()) });
            let ie = _mm512_srli_epi32::<4>(v);
            let (we, wo) = if g + 32 <= boundary {
                (_mm512_permutexvar_ps(ie, t), _mm512_permutexvar_ps(v, t))
            } else {
                // Elements from `d` on belong to the next block.
                let d = _mm512_set1_epi32((boundary - g) as i32);
                let next = scaled_table::<DT>(table, tab, m.absmax.get(block + 1));
                let me = _mm512_cmpge_epi32_mask(lanes_even, d);
                let mo = _mm512_cmpge_epi32_mask(lanes_odd, d);
                let we = _mm512_mask_blend_ps(
                    me,
                    _mm512_permutexvar_ps(ie, t),
                    _mm512_permutexvar_ps(ie, next),
                );
                let wo = _mm512_mask_blend_ps(
                    mo,
                    _mm512_permutexvar_ps(v, t),
                    _mm512_permutexvar_ps(v, next),
                );
                block += 1;
                boundary += bs;
                t = next;
                (we, wo)
            };
            for i in 0..N {
                // SAFETY: token t0+i < n has `stride` ≥ 32·full values at offset (t0+i)·stride.
                let (xe, xo) = unsafe {
                    let px = xs.as_ptr().add((t0 + i) * stride + 32 * c);
                    (_mm512_loadu_ps(px), _mm512_loadu_ps(px.add(16)))
                };
                ae[i] = _mm512_fmadd_ps(we, xe, ae[i]);
                ao[i] = _mm512_fmadd_ps(wo, xo, ao[i]);
            }
        }
        for i in 0..N {
            let mut even = [0.0f32; 16];
            let mut odd = [0.0f32; 16];
            // SAFETY: each array holds 16 f32.
            unsafe {
                _mm512_storeu_ps(even.as_mut_ptr(), ae[i]);
                _mm512_storeu_ps(odd.as_mut_ptr(), ao[i]);
            }
            let x = &xs[(t0 + i) * stride..(t0 + i + 1) * stride];
            yrow[t0 + i] = finish_row(m, j, 32 * full, x, &mut even, &mut odd);
        }
    }
}
