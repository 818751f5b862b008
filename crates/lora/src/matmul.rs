//! Thin safe wrappers over faer's matrix multiply, on row-major f32 slices: products large enough
//! are split into one band of rows per rayon thread, each a single-threaded faer product (one
//! join, no spinning barriers between blocks). [`x_wt`] and [`g_w`] are the two products of a
//! frozen dense linear layer, for a framework's custom op (qlora-candle's `lm_head`).

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// A row-major view of `rows × cols` with `stride` elements between row starts.
pub(crate) fn strided(s: &[f32], rows: usize, cols: usize, stride: usize) -> MatRef<'_, f32> {
    if rows == 0 || cols == 0 {
        return MatRef::from_row_major_slice(&s[..0], rows, cols);
    }
    MatRef::from_row_major_slice_with_stride(s, rows, cols, stride)
}

/// Products of fewer multiply-adds than this run on the calling thread: for a few tokens (the
/// LoRA factors at decode time) splitting over the pool costs more than the product.
const PARALLEL_MACS: usize = 1 << 20;

fn par(macs: usize) -> Par {
    if macs < PARALLEL_MACS {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// `dst[m, n] += alpha · lhs · rhs` with `dst` row-major (`dims = (m, n, stride)`).
pub(crate) fn gemm(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
) {
    gemm_accum(dst, dims, lhs, rhs, alpha, Accum::Add)
}

/// [`gemm`] that adds to `dst` (`Accum::Add`) or overwrites it (`Accum::Replace`).
fn gemm_accum(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
    accum: Accum,
) {
    let (m, n, stride) = dims;
    if m == 0 || n == 0 {
        return;
    }
    let macs = m.saturating_mul(n).saturating_mul(lhs.ncols());
    let threads = rayon::current_num_threads();
    if macs >= PARALLEL_MACS && threads > 1 && m >= 2 * SPLIT_ROWS {
        // One band of rows per thread, each a single-threaded product: one join at the end
        // instead of faer's barriers between its blocks (which spin: 15 % of a small training
        // step on 2 cores).
        let band = m.div_ceil(threads).max(SPLIT_ROWS);
        let mut bands = Vec::with_capacity(m.div_ceil(band));
        let mut rest = dst;
        let mut r0 = 0;
        while r0 < m {
            let rows = band.min(m - r0);
            let take = if r0 + rows == m {
                rest.len()
            } else {
                rows * stride
            };
            let (head, tail) = rest.split_at_mut(take);
            bands.push((r0, rows, head));
            rest = tail;
            r0 += rows;
        }
        bands.into_par_iter().for_each(|(r0, rows, d)| {
            product(
                d,
                (rows, n, stride),
                lhs.subrows(r0, rows),
                rhs,
                alpha,
                accum,
                Par::Seq,
            )
        });
        return;
    }
    product(dst, dims, lhs, rhs, alpha, accum, par(macs));
}

/// Rows below which a product is not split into bands (each band must amortize packing `rhs`).
const SPLIT_ROWS: usize = 64;

/// faer's product into a row-major `dst` of `dims = (m, n, stride)`.
fn product(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
    accum: Accum,
    par: Par,
) {
    let (m, n, stride) = dims;
    // faer 0.24.4's `from_row_major_slice_with_stride_mut` builds a column-major view (its
    // strides are swapped), so build the transpose of a column-major view instead.
    let d = MatMut::from_column_major_slice_with_stride_mut(dst, n, m, stride).transpose_mut();
    faer::linalg::matmul::matmul(d, accum, lhs, rhs, alpha, par);
}

/// `dst[:, c0..c1] += alpha · lhs · rhs` for a row-major `dst` of `m` rows and `ld` columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into_cols(
    dst: &mut [f32],
    ld: usize,
    c0: usize,
    c1: usize,
    m: usize,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    alpha: f32,
) {
    if m == 0 || c1 == c0 {
        return;
    }
    gemm(&mut dst[c0..], (m, c1 - c0, ld), lhs, rhs, alpha);
}

/// `C = alpha · A · B` (fresh row-major buffer of `m × n`).
pub(crate) fn mul(a: MatRef<'_, f32>, b: MatRef<'_, f32>, alpha: f32) -> Vec<f32> {
    let (m, n) = (a.nrows(), b.ncols());
    let mut c = vec![0.0f32; m * n];
    // Overwrite rather than add: a fresh large buffer is untouched zero pages, and reading them
    // before writing costs a second (copy-on-write) page fault per page, with a TLB shootdown
    // across the pool's threads — measured at 15 % of a 512-token forward at 11008×4096.
    gemm_accum(&mut c, (m, n, n), a, b, alpha, Accum::Replace);
    c
}

/// `Y[m, n] = X[m, k] · W[n, k]ᵀ` (a linear layer's output for a weight stored `[out, in]`),
/// row-major f32 slices; `None` if a length does not fit the shapes.
///
/// ```
/// // X = [[1, 2]], W = [[1, 0], [3, 4]]: Y = [[1, 11]]
/// let y = qlora_lora::matmul::x_wt(&[1.0, 2.0], &[1.0, 0.0, 3.0, 4.0], 1, 2, 2).unwrap();
/// assert_eq!(y, [1.0, 11.0]);
/// ```
pub fn x_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    if x.len() != m.checked_mul(k)? || w.len() != n.checked_mul(k)? {
        return None;
    }
    Some(mul(view(x, m, k), view(w, n, k).transpose(), 1.0))
}

/// `dX[m, k] = G[m, n] · W[n, k]` (the input gradient of [`x_wt`]), row-major f32 slices;
/// `None` if a length does not fit the shapes.
///
/// ```
/// let dx = qlora_lora::matmul::g_w(&[1.0, 1.0], &[1.0, 0.0, 3.0, 4.0], 1, 2, 2).unwrap();
/// assert_eq!(dx, [4.0, 4.0]);
/// ```
pub fn g_w(g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Option<Vec<f32>> {
    if g.len() != m.checked_mul(n)? || w.len() != n.checked_mul(k)? {
        return None;
    }
    Some(mul(view(g, m, n), view(w, n, k), 1.0))
}

/// Row-major view of a whole `rows × cols` slice.
pub(crate) fn view(s: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    strided(s, rows, cols, cols)
}

/// Transpose a row-major `rows × cols` matrix.
pub(crate) fn transpose(s: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; s.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = s[i * cols + j];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn mul_matches_naive() {
        for &(m, k, n) in &[(5, 64, 8), (5, 8, 48), (48, 5, 8), (1, 3, 1), (33, 70, 17)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let c = mul(view(&a, m, k), view(&b, k, n), 1.0);
            let want = naive(&a, &b, m, k, n);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{m}x{k}x{n}");
            }
        }
    }
}
