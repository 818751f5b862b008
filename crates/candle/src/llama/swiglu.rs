//! The SwiGLU gate `silu(gate) ⊙ up` in one pass each way on the CPU (in parallel), instead of
//! candle's `silu` and multiply: two `[tokens, intermediate]` nodes less per layer for autograd
//! (each of whose gradients it would zero-fill and accumulate), and a vectorized `exp`.
//!
//! `σ(g) = 1/(1 + e^{−g})` is computed from `e^{−|g|}` (never overflows):
//! `σ = 1/(1+e)` for `g ≥ 0`, `e/(1+e)` otherwise; `silu(g) = g·σ`. The backward is
//! `d_gate = dh ⊙ up ⊙ σ(1 + g(1 − σ))`, `d_up = dh ⊙ silu(g)`. CPU, f32 and f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::Float;
use crate::cpu_op::contiguous;

/// Elements per parallel task.
const CHUNK: usize = 1 << 13;

/// `(gate, up) ↦ silu(gate) ⊙ up`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwiGlu;

#[inline(always)]
fn sigmoid<T: Float>(g: T) -> T {
    let one = T::from_f64(1.0);
    let neg_abs = if g > T::ZERO { Float::neg(g) } else { g };
    let e = neg_abs.exp();
    let d = Float::add(one, e);
    if g >= T::ZERO {
        one.div(d)
    } else {
        e.div(d)
    }
}

fn forward<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
    out
}

fn backward<T: Float>(g: &[T], u: &[T], dh: &[T]) -> (Vec<T>, Vec<T>) {
    let one = T::from_f64(1.0);
    let mut dg = vec![T::ZERO; g.len()];
    let mut du = vec![T::ZERO; g.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(dh.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), dh))| {
            for ((((dg, du), &g), &u), &dh) in
                dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh)
            {
                let s = sigmoid(g);
                *du = dh * (g * s);
                *dg = dh * u * (s * Float::add(one, g * one.sub(s)));
            }
        });
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "qlora-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "SwiGLU";
        if lg.dims() != lu.dims() {
            candle_core::bail!("{what}: gate {:?} and up {:?} differ", lg.dims(), lu.dims());
        }
        let out = match (g, u) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(forward(contiguous(g, lg, what)?, contiguous(u, lu, what)?))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(forward(contiguous(g, lg, what)?, contiguous(u, lu, what)?))
            }
            (g, u) => candle_core::bail!(
                "{what}: f32 or f64 of one dtype, found {:?} and {:?}",
                g.dtype(),
                u.dtype()
            ),
        };
        Ok((out, lg.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn grads<T: Float + candle_core::WithDType>(
            g: &Tensor,
            u: &Tensor,
            dh: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let data = |x: &Tensor| x.flatten_all()?.to_vec1::<T>();
            let (dg, du) = backward(&data(g)?, &data(u)?, &data(&dh.to_dtype(g.dtype())?)?);
            Ok((
                Some(Tensor::from_vec(dg, g.shape(), g.device())?),
                Some(Tensor::from_vec(du, u.shape(), u.device())?),
            ))
        }
        match g.dtype() {
            DType::F32 => grads::<f32>(g, u, dh),
            DType::F64 => grads::<f64>(g, u, dh),
            other => candle_core::bail!("SwiGLU: f32 or f64, found {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and gradients equal candle's `silu(g) * u` (f32 to 1e-6 relative, f64 to 1e-14),
    /// including large |g| where e^{−g} overflows.
    #[test]
    fn swiglu_equals_candle_silu_times_up() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-14)] {
            let gv: Vec<f64> = (0..300)
                .map(|i| (i as f64 - 150.0) * 0.37 + if i == 7 { -120.0 } else { 0.0 })
                .collect();
            let uv: Vec<f64> = (0..300)
                .map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0)
                .collect();
            let wv: Vec<f64> = (0..300)
                .map(|i| ((i * 104_729) % 97) as f64 / 48.0 - 1.0)
                .collect();
            let g =
                Var::from_tensor(&Tensor::from_vec(gv, (3, 100), &Device::Cpu)?.to_dtype(dtype)?)?;
            let u =
                Var::from_tensor(&Tensor::from_vec(uv, (3, 100), &Device::Cpu)?.to_dtype(dtype)?)?;
            let w = Tensor::from_vec(wv, (3, 100), &Device::Cpu)?.to_dtype(dtype)?;
            let fused = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu)?;
            let reference = (g.as_tensor().silu()? * u.as_tensor())?;
            let gf = (&fused * &w)?.sum_all()?.backward()?;
            let gr = (&reference * &w)?.sum_all()?.backward()?;
            let pairs = [
                (fused.clone(), reference.clone()),
                (
                    gf.get(g.as_tensor()).unwrap().clone(),
                    gr.get(g.as_tensor()).unwrap().clone(),
                ),
                (
                    gf.get(u.as_tensor()).unwrap().clone(),
                    gr.get(u.as_tensor()).unwrap().clone(),
                ),
            ];
            for (a, r) in pairs {
                let (a, r) = (
                    a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                    r.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                );
                for (i, (a, r)) in a.iter().zip(&r).enumerate() {
                    assert!(
                        (a - r).abs() <= tol * r.abs().max(1e-3),
                        "{dtype:?} element {i}: {a} vs {r}"
                    );
                }
            }
        }
        Ok(())
    }
}
