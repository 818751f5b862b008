//! AVX2 + FMA + F16C fused 4-bit matrix–vector kernel (see [`crate::gemv`] for the semantics).
//!
//! Per block: the two halves of the codebook times the absmax (`vmulps`), rounded to the dtype
//! (integer round-to-nearest-even for bf16, `vcvtps2ph`/`vcvtph2ps` for f16). Per 32-element
//! chunk of a row: two `vpmovzxbd` of 8 code bytes each, a shift for the high nibbles, and for
//! each 8 nibbles two `vpermps` (table halves) and a `vblendvps` on bit 3 of the code; per token
//! four `vfmadd` into the accumulators of lanes `2l` (even) and `2l+1` (odd), `x` rearranged in
//! the same order. A chunk that straddles two blocks blends both tables' lookups. The row's tail
//! and the reduction are the scalar code of [`crate::gemv`], inlined.

use super::avx2::bf16_rne8;
use crate::gemv::{finish_row, Matrix};
use crate::{Dtype, Implementation};
use core::arch::x86_64::*;

const DT_F32: u8 = 0;
const DT_F16: u8 = 1;
const DT_BF16: u8 = 2;

/// Tokens that share one pass over a row's codes (4 accumulators each of 16 registers).
const MAX_TOKENS: usize = 2;

/// The AVX2 matrix–vector kernel; a value exists only on a CPU with AVX2, FMA and F16C.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Avx2`] (AVX2, FMA, F16C).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Avx2.is_available().then_some(Kernel {
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
            // SAFETY: AVX2, FMA and F16C were detected (`new`). Rows `r0..r0+nrows` lie inside
            // the codes and `cols` is even (asserted), so every row starts on a byte and its full
            // chunks' loads are in bounds; tokens `t0..t0+nt` have `stride` ≥ the padded row
            // length of rearranged x each (asserted); blocks are ≥ 32 elements, so a chunk
            // touches at most two; absmax values are read through the bounds-checked view.
            unsafe {
                match (nt, m.dtype) {
                    (1, Dtype::F32) => rows_n::<1, DT_F32>(m, xs, stride, n, t0, r0, yt),
                    (_, Dtype::F32) => rows_n::<2, DT_F32>(m, xs, stride, n, t0, r0, yt),
                    (1, Dtype::F16) => rows_n::<1, DT_F16>(m, xs, stride, n, t0, r0, yt),
                    (_, Dtype::F16) => rows_n::<2, DT_F16>(m, xs, stride, n, t0, r0, yt),
                    (1, Dtype::BF16) => rows_n::<1, DT_BF16>(m, xs, stride, n, t0, r0, yt),
                    (_, Dtype::BF16) => rows_n::<2, DT_BF16>(m, xs, stride, n, t0, r0, yt),
                }
            }
            t0 += nt;
        }
    }
}

/// Half of a block's 16 weights: `round_dtype(table_half · a)` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_half<const DT: u8>(half: __m256, a: __m256) -> __m256 {
    let s = _mm256_mul_ps(half, a);
    match DT {
        DT_F32 => s,
        DT_F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(s)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bf16_rne8(_mm256_castps_si256(s)))),
    }
}

/// A block's table as two halves (codes 0–7, 8–15).
#[derive(Clone, Copy)]
struct Table {
    lo: __m256,
    hi: __m256,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_table<const DT: u8>(values: &[f32; 16], lo: __m256, hi: __m256, a: f32) -> Table {
    if !qlora_double_quant::fastmath::is_plain_scale(a) {
        // NaN, infinite or tiny scale: the products dequantization computes (ftz, CUDA's NaN).
        let t = values.map(|v| qlora_double_quant::fastmath::mul_ftz(v, a));
        let one = _mm256_set1_ps(1.0);
        // SAFETY: `t` holds 16 f32.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_ps(t.as_ptr()),
                _mm256_loadu_ps(t.as_ptr().add(8)),
            )
        };
        return Table {
            lo: scaled_half::<DT>(lo, one),
            hi: scaled_half::<DT>(hi, one),
        };
    }
    let a = _mm256_set1_ps(a);
    Table {
        lo: scaled_half::<DT>(lo, a),
        hi: scaled_half::<DT>(hi, a),
    }
}

/// The weights of 8 codes (low 4 bits of each dword of `idx` count).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lookup(idx: __m256i, t: Table) -> __m256 {
    let lo = _mm256_permutevar8x32_ps(t.lo, idx);
    let hi = _mm256_permutevar8x32_ps(t.hi, idx);
    _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
}

/// Lookups of 8 codes where lanes whose residue `lanes[l] ≥ d` use `next`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lookup2(idx: __m256i, t: Table, next: Table, lanes: __m256i, d_minus_1: __m256i) -> __m256 {
    let in_next = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, d_minus_1));
    _mm256_blendv_ps(lookup(idx, t), lookup(idx, next), in_next)
}

/// `nt = N` tokens starting at token `t0`, rows `r0 .. r0 + yt.len()/n`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `m.cols` is even; rows `r0..r0 + yt.len()/n` lie inside
/// `m.packed`; `m.blocksize` is a power of two ≥ 32; `xs` holds `n` tokens of `stride ≥ 32·⌈cols/32⌉`
/// values and `t0 + N ≤ n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let (tab_lo, tab_hi) = unsafe {
        (
            _mm256_loadu_ps(table.as_ptr()),
            _mm256_loadu_ps(table.as_ptr().add(8)),
        )
    };
    let cols = m.cols;
    let bs = m.blocksize;
    let full = cols / 32;
    // Block sizes are powers of two (`check_blocksize`).
    let shift = bs.trailing_zeros();
    // Residues (element offsets in the chunk) of the four 8-lane groups: even 0–14, odd 1–15,
    // even 16–30, odd 17–31.
    let lanes_e0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    let lanes_o0 = _mm256_add_epi32(lanes_e0, _mm256_set1_epi32(1));
    let lanes_e1 = _mm256_add_epi32(lanes_e0, _mm256_set1_epi32(16));
    let lanes_o1 = _mm256_add_epi32(lanes_e0, _mm256_set1_epi32(17));
    for (j, yrow) in (r0..).zip(yt.chunks_exact_mut(n)) {
        let g0 = j * cols;
        // SAFETY: `g0/2` is inside `packed` or one past it (row `j` lies inside the codes).
        let p = unsafe { m.packed.as_ptr().add(g0 / 2) };
        // Per token: even 0–7, odd 0–7, even 8–15, odd 8–15 (accumulator lanes 2l / 2l+1).
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        // Chunks advance by 32 ≤ bs elements, so each crosses at most one block boundary; the
        // first chunk moves `block` onto its own block and loads that table (a row without full
        // chunks reads no absmax).
        let mut block = (g0 >> shift).wrapping_sub(1);
        let mut boundary = (g0 >> shift) << shift;
        let mut t = Table {
            lo: _mm256_setzero_ps(),
            hi: _mm256_setzero_ps(),
        };
        for c in 0..full {
            let g = g0 + 32 * c;
            if g >= boundary {
                block = block.wrapping_add(1);
                boundary += bs;
                t = scaled_table::<DT>(table, tab_lo, tab_hi, m.absmax.get(block));
            }
            // SAFETY: chunk `c` (elements g .. g+32, bytes g/2 .. g/2+16) lies inside the row.
            let (v0, v1) = unsafe {
                (
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(16 * c).cast())),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(16 * c + 8).cast())),
                )
            };
            let (e0, e1) = (_mm256_srli_epi32::<4>(v0), _mm256_srli_epi32::<4>(v1));
            let w = if g + 32 <= boundary {
                [lookup(e0, t), lookup(v0, t), lookup(e1, t), lookup(v1, t)]
            } else {
                let d1 = _mm256_set1_epi32((boundary - g) as i32 - 1);
                let next = scaled_table::<DT>(table, tab_lo, tab_hi, m.absmax.get(block + 1));
                let w = [
                    lookup2(e0, t, next, lanes_e0, d1),
                    lookup2(v0, t, next, lanes_o0, d1),
                    lookup2(e1, t, next, lanes_e1, d1),
                    lookup2(v1, t, next, lanes_o1, d1),
                ];
                block += 1;
                boundary += bs;
                t = next;
                w
            };
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: token t0+i < n has `stride` ≥ 32·full values at offset (t0+i)·stride;
                // the chunk's rearranged x is even 0–15 at +0, odd 0–15 at +16.
                let xv = unsafe {
                    let px = xs.as_ptr().add((t0 + i) * stride + 32 * c);
                    [
                        _mm256_loadu_ps(px),
                        _mm256_loadu_ps(px.add(16)),
                        _mm256_loadu_ps(px.add(8)),
                        _mm256_loadu_ps(px.add(24)),
                    ]
                };
                for q in 0..4 {
                    a[q] = _mm256_fmadd_ps(w[q], xv[q], a[q]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut even = [0.0f32; 16];
            let mut odd = [0.0f32; 16];
            // SAFETY: each array holds 16 f32; 8 are written at offsets 0 and 8.
            unsafe {
                _mm256_storeu_ps(even.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(odd.as_mut_ptr(), a[1]);
                _mm256_storeu_ps(even.as_mut_ptr().add(8), a[2]);
                _mm256_storeu_ps(odd.as_mut_ptr().add(8), a[3]);
            }
            let x = &xs[(t0 + i) * stride..(t0 + i + 1) * stride];
            yrow[t0 + i] = finish_row(m, j, 32 * full, x, &mut even, &mut odd);
        }
    }
}
