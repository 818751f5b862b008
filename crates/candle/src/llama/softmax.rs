//! Attention probabilities in one pass on the CPU: `softmax(scale · s + causal mask)` over the
//! last dimension, with its backward in one pass too.
//!
//! The composed form (multiply, broadcast add of a `[t, t]` mask, then max, subtract, exp, sum,
//! divide) makes seven `[batch, heads, t, t]` tensors per layer and as many nodes for autograd,
//! each gradient of which candle accumulates into a fresh zeroed tensor; for a small model those
//! element-wise passes cost more than the matrix products. The forward here computes exactly what
//! the composed form computes (same operations in the same order: `x·scale`, masked to `-inf`,
//! the row max, `exp(x − max)`, the sequential sum, the division), so the logits do not change;
//! the backward is `scale · p ⊙ (g − Σ g ⊙ p)` per row.
//!
//! CPU, f32 and f64 only: the model uses the composed form elsewhere (CUDA, and bf16/f16 models
//! whose scores are scaled in their own dtype).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// `softmax(scale · s + mask)` over the last dimension of `s: [.., t, t]`; position `(i, j)` is
/// masked when `j > i` or `i − j ≥ window`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalSoftmax {
    pub(crate) scale: f64,
    pub(crate) window: usize,
}

/// The backward of [`CausalSoftmax`]: `(p, g) ↦ scale · p ⊙ (g − Σ_row g ⊙ p)`.
#[derive(Debug, Clone, Copy)]
struct CausalSoftmaxBackward {
    scale: f64,
}

/// The floating-point types of the op.
pub(crate) trait Float: Copy + PartialOrd + std::ops::Mul<Output = Self> {
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn exp(self) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn sqrt(self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
        }
    };
}
float!(f32);
float!(f64);

/// The contiguous elements of `layout` in `data`, and `t` (rows of length `t` whose query position
/// is the row index mod `t`).
fn rows<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<(&'a [T], usize)> {
    let dims = layout.dims();
    let (Some(&t), Some(&tq)) = (dims.last(), dims.len().checked_sub(2).map(|i| &dims[i])) else {
        candle_core::bail!("{what}: needs a [.., t, t] tensor, found {dims:?}");
    };
    if t != tq {
        candle_core::bail!("{what}: the last two dimensions differ ({dims:?})");
    }
    Ok((contiguous(data, layout, what)?, t))
}

/// The elements of a contiguous `layout` in `data`; an error for a strided one.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the input is not contiguous"),
    }
}

fn forward<T: Float>(s: &[T], t: usize, scale: T, window: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; s.len()];
    for (r, (row, o)) in s.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
        let i = r % t;
        let visible = |j: usize| j <= i && i - j < window;
        let mut max = T::NEG_INFINITY;
        for (j, (&x, o)) in row.iter().zip(o.iter_mut()).enumerate() {
            let v = if visible(j) {
                x * scale
            } else {
                T::NEG_INFINITY
            };
            *o = v;
            if v > max {
                max = v;
            }
        }
        let mut sum = T::ZERO;
        for o in o.iter_mut() {
            let e = o.sub(max).exp();
            *o = e;
            sum = sum.add(e);
        }
        for o in o.iter_mut() {
            *o = o.div(sum);
        }
    }
    out
}

fn backward<T: Float>(p: &[T], g: &[T], t: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::ZERO; p.len()];
    for ((p, g), o) in p
        .chunks_exact(t)
        .zip(g.chunks_exact(t))
        .zip(out.chunks_exact_mut(t))
    {
        let mut dot = T::ZERO;
        for (&p, &g) in p.iter().zip(g) {
            dot = dot.add(p * g);
        }
        for ((&p, &g), o) in p.iter().zip(g).zip(o.iter_mut()) {
            *o = p * g.sub(dot) * scale;
        }
    }
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "qlora-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = "causal softmax";
        let out = match storage {
            CpuStorage::F32(v) => {
                let (s, t) = rows(v, layout, what)?;
                CpuStorage::F32(forward(s, t, f32::from_f64(self.scale), self.window))
            }
            CpuStorage::F64(v) => {
                let (s, t) = rows(v, layout, what)?;
                CpuStorage::F64(forward(s, t, self.scale, self.window))
            }
            other => candle_core::bail!("{what}: f32 or f64 scores, found {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &g,
            &CausalSoftmaxBackward { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "qlora-causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "causal softmax backward";
        if lp.dims() != lg.dims() {
            candle_core::bail!("{what}: shapes differ ({:?} vs {:?})", lp.dims(), lg.dims());
        }
        let out = match (p, g) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                let ((p, t), (g, _)) = (rows(p, lp, what)?, rows(g, lg, what)?);
                CpuStorage::F32(backward(p, g, t, f32::from_f64(self.scale)))
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                let ((p, t), (g, _)) = (rows(p, lp, what)?, rows(g, lg, what)?);
                CpuStorage::F64(backward(p, g, t, self.scale))
            }
            (p, g) => candle_core::bail!(
                "{what}: f32 or f64 of one dtype, found {:?} and {:?}",
                p.dtype(),
                g.dtype()
            ),
        };
        Ok((out, lp.shape().clone()))
    }
}
