//! NEON fused 4-bit matrix–vector kernel (see [`crate::gemv`] for the semantics).
//!
//! Per block the scaled, dtype-rounded table comes from [`Matrix::scaled_table`] (the scalar
//! oracle's own values). Per 32-element chunk of a row: one 16-byte load, `ushr`/`and` split the
//! high (even) and low (odd) nibbles, the 32 weights are looked up from the table, and per token
//! eight `fmla` (4 lanes each) accumulate into the lanes `2l` (even) and `2l+1` (odd) against `x`
//! rearranged in the same order. The row's tail and the reduction are the scalar code of
//! [`crate::gemv`], inlined.

use crate::gemv::{finish_row, Matrix};
use crate::Implementation;
use core::arch::aarch64::*;

/// Tokens that share one pass over a row's codes (8 accumulators each).
const MAX_TOKENS: usize = 2;

/// The NEON matrix–vector kernel; a value exists only where NEON was detected.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    _features_detected: (),
}

impl Kernel {
    /// The kernels, if the CPU has the features of [`Implementation::Neon`] (NEON).
    pub(crate) fn new() -> Option<Self> {
        Implementation::Neon.is_available().then_some(Kernel {
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
            // SAFETY: NEON was detected (`new`). Rows `r0..r0+nrows` lie inside the codes and
            // `cols` is even (asserted), so every row starts on a byte and its full chunks'
            // 16-byte loads are in bounds; tokens `t0..t0+nt` have `stride` ≥ the padded row
            // length of rearranged x each (asserted).
            unsafe {
                if nt == 1 {
                    rows_n::<1>(m, xs, stride, n, t0, r0, yt)
                } else {
                    rows_n::<2>(m, xs, stride, n, t0, r0, yt)
                }
            }
            t0 += nt;
        }
    }
}

/// `nt = N` tokens starting at token `t0`, rows `r0 .. r0 + yt.len()/n`.
///
/// # Safety
/// NEON must be available; `m.cols` is even; rows `r0..r0 + yt.len()/n` lie inside `m.packed`;
/// `m.blocksize` is a power of two ≥ 32; `xs` holds `n` tokens of `stride ≥ 32·⌈cols/32⌉` values
/// and `t0 + N ≤ n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
unsafe fn rows_n<const N: usize>(
    m: &Matrix<'_>,
    xs: &[f32],
    stride: usize,
    n: usize,
    t0: usize,
    r0: usize,
    yt: &mut [f32],
) {
    let cols = m.cols;
    let bs = m.blocksize;
    let full = cols / 32;
    // Block sizes are powers of two (`check_blocksize`).
    let shift = bs.trailing_zeros();
    let low_nibble = vdupq_n_u8(0x0f);
    for (j, yrow) in (r0..).zip(yt.chunks_exact_mut(n)) {
        let g0 = j * cols;
        // SAFETY: `g0/2` is inside `packed` or one past it (row `j` lies inside the codes).
        let p = unsafe { m.packed.as_ptr().add(g0 / 2) };
        // Per token: even 0–15 in 4 registers, then odd 0–15 in 4.
        let mut acc = [[vdupq_n_f32(0.0); 8]; N];
        // Chunks advance by 32 ≤ bs elements, so each crosses at most one block boundary; the
        // first chunk moves `block` onto its own block and loads that table (a row without full
        // chunks reads no absmax).
        let mut block = (g0 >> shift).wrapping_sub(1);
        let mut boundary = (g0 >> shift) << shift;
        let mut t = [0.0f32; 16];
        for c in 0..full {
            let g = g0 + 32 * c;
            if g >= boundary {
                block = block.wrapping_add(1);
                boundary += bs;
                t = m.scaled_table(block);
            }
            // SAFETY: chunk `c` (elements g .. g+32, bytes g/2 .. g/2+16) lies inside the row.
            let v = unsafe { vld1q_u8(p.add(16 * c)) };
            let mut codes = [0u8; 32];
            // SAFETY: `codes` holds 32 bytes: high nibbles (even elements) at 0, low at 16.
            unsafe {
                vst1q_u8(codes.as_mut_ptr(), vshrq_n_u8::<4>(v));
                vst1q_u8(codes.as_mut_ptr().add(16), vandq_u8(v, low_nibble));
            }
            let mut w = [0.0f32; 32];
            if g + 32 <= boundary {
                for (o, &code) in w.iter_mut().zip(&codes) {
                    *o = t[code as usize];
                }
            } else {
                // Elements from offset `d` on belong to the next block.
                let d = boundary - g;
                let next = m.scaled_table(block + 1);
                for (s, (o, &code)) in w.iter_mut().zip(&codes).enumerate() {
                    let offset = if s < 16 { 2 * s } else { 2 * (s - 16) + 1 };
                    *o = if offset >= d { next } else { t }[code as usize];
                }
                block += 1;
                boundary += bs;
                t = next;
            }
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: token t0+i < n has `stride` ≥ 32·full values at offset (t0+i)·stride;
                // `w` holds 32 f32.
                unsafe {
                    let px = xs.as_ptr().add((t0 + i) * stride + 32 * c);
                    for (q, aq) in a.iter_mut().enumerate() {
                        *aq = vfmaq_f32(
                            *aq,
                            vld1q_f32(w.as_ptr().add(4 * q)),
                            vld1q_f32(px.add(4 * q)),
                        );
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 32];
            for (q, aq) in a.iter().enumerate() {
                // SAFETY: `lanes` holds 32 f32; 4 are written at offset 4q < 32.
                unsafe { vst1q_f32(lanes.as_mut_ptr().add(4 * q), *aq) };
            }
            let mut even = [0.0f32; 16];
            let mut odd = [0.0f32; 16];
            even.copy_from_slice(&lanes[..16]);
            odd.copy_from_slice(&lanes[16..]);
            let x = &xs[(t0 + i) * stride..(t0 + i + 1) * stride];
            yrow[t0 + i] = finish_row(m, j, 32 * full, x, &mut even, &mut odd);
        }
    }
}
