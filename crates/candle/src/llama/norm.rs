//! RMSNorm in one pass on the CPU, with its backward in one pass: `y = x / √(mean(x²) + ε) ⊙ w`
//! over the last dimension.
//!
//! The composed form (square, mean, add ε, square root, divide, multiply) makes six tensors per
//! norm and as many autograd nodes; this computes the same operations in the same order per row
//! (the sum of squares scaled by `1/n` as candle's `mean` does, `+ ε`, `√`, `x / d`, `· w`), so
//! the values equal the composed form's up to the order of the sum of squares. The backward, with
//! `x̂ = x / d` and `u = g ⊙ w`: `dx = (u − x̂ · mean(u ⊙ x̂)) / d`, `dw = Σ_rows g ⊙ x̂`.
//!
//! CPU, f32 and f64 only (input and weight of one dtype): the model uses the composed form
//! elsewhere (CUDA, and bf16/f16 models, whose norm runs in f32 and casts back before `· w`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::softmax::Float;
use crate::cpu_op::contiguous;
use rayon::prelude::*;

/// `x / √(mean(x²) + eps) ⊙ w` over the last dimension of `x`; `w: [h]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormOp {
    pub(crate) eps: f64,
}

/// The backward: `(x, w, g) ↦ [dx (flattened) | dw]` in one vector.
#[derive(Debug, Clone, Copy)]
struct RmsNormBackward {
    eps: f64,
}

/// `1 / d` of a row: `d = √(Σx² · (1/n) + eps)`.
fn denom<T: Float>(row: &[T], eps: T) -> T {
    let mut sum = T::ZERO;
    for &x in row {
        sum = sum.add(x * x);
    }
    let n = T::from_f64(1.0 / row.len() as f64);
    (sum * n).add(eps).sqrt()
}

/// Rows per parallel task (fixed, so that the results do not depend on the thread count).
const ROWS: usize = 16;

fn forward<T: Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(h * ROWS)
        .zip(x.par_chunks(h * ROWS))
        .for_each(|(out, x)| {
            for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
                let d = denom(row, eps);
                for ((o, &x), &w) in o.iter_mut().zip(row).zip(w) {
                    *o = x.div(d) * w;
                }
            }
        });
    out
}

fn backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    let rows = x.len() / h;
    let mut out = vec![T::ZERO; x.len() + h];
    let (dx, dw) = out.split_at_mut(rows * h);
    let inv_h = T::from_f64(1.0 / h as f64);
    // dx row by row in parallel; dw as one partial sum per task, added in task order.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(h * ROWS)
        .zip(x.par_chunks(h * ROWS).zip(g.par_chunks(h * ROWS)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::ZERO; h];
            for ((row, g), dx) in x
                .chunks_exact(h)
                .zip(g.chunks_exact(h))
                .zip(dx.chunks_exact_mut(h))
            {
                let d = denom(row, eps);
                let mut dot = T::ZERO;
                for ((&x, &g), &w) in row.iter().zip(g).zip(w) {
                    dot = dot.add(g * w * x.div(d));
                }
                let mean = dot * inv_h;
                for (((dx, &x), &g), (&w, dw)) in dx
                    .iter_mut()
                    .zip(row)
                    .zip(g)
                    .zip(w.iter().zip(dw.iter_mut()))
                {
                    let xhat = x.div(d);
                    *dx = (g * w).sub(xhat * mean).div(d);
                    *dw = dw.add(g * xhat);
                }
            }
            dw
        })
        .collect();
    for p in partials {
        for (dw, p) in dw.iter_mut().zip(p) {
            *dw = dw.add(p);
        }
    }
    out
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "qlora-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "rms norm";
        let h = lw.shape().elem_count();
        if lx.dims().last() != Some(&h) || lw.dims().len() != 1 {
            candle_core::bail!(
                "{what}: weight {:?} does not fit input {:?}",
                lw.dims(),
                lx.dims()
            );
        }
        let out = match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(forward(
                contiguous(x, lx, what)?,
                contiguous(w, lw, what)?,
                f32::from_f64(self.eps),
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(forward(
                contiguous(x, lx, what)?,
                contiguous(w, lw, what)?,
                self.eps,
            )),
            (x, w) => candle_core::bail!(
                "{what}: f32 or f64 of one dtype, found {:?} and {:?}",
                x.dtype(),
                w.dtype()
            ),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let x = x.contiguous()?;
        let packed = x.apply_op3_no_bwd(w, &g, &RmsNormBackward { eps: self.eps })?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "qlora-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "rms norm backward";
        if lx.dims() != lg.dims() {
            candle_core::bail!("{what}: shapes differ ({:?} vs {:?})", lx.dims(), lg.dims());
        }
        let n = lx.shape().elem_count() + lw.shape().elem_count();
        let out = match (x, w, g) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(
                    contiguous(x, lx, what)?,
                    contiguous(w, lw, what)?,
                    contiguous(g, lg, what)?,
                    f32::from_f64(self.eps),
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(
                    contiguous(x, lx, what)?,
                    contiguous(w, lw, what)?,
                    contiguous(g, lg, what)?,
                    self.eps,
                ))
            }
            (x, _, _) => candle_core::bail!("{what}: f32 or f64, found {:?}", x.dtype()),
        };
        Ok((out, Shape::from(n)))
    }
}
