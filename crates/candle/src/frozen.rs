//! A frozen dense linear layer on the CPU (QLoRA's `lm_head`): `X·Wᵀ (+ b)` as one candle op
//! whose backward is the input gradient `G·W` only. candle's own `matmul` would also compute the
//! weight's gradient (a product as large as the forward one, and a zeroed buffer to accumulate it
//! in), which nothing uses for a frozen weight. Off the CPU, or for other dtypes, it is
//! `candle_nn::Linear`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};

use crate::cpu_op::{f32s, with_f32s};

/// `Y = X·Wᵀ + b` with `W: [out, in]` frozen.
pub(crate) struct FrozenLinear {
    linear: candle_nn::Linear,
}

impl FrozenLinear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        FrozenLinear {
            linear: candle_nn::Linear::new(weight, bias),
        }
    }
}

impl Module for FrozenLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.linear.weight();
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !(cpu_f32(xs) && cpu_f32(w) && w.rank() == 2) {
            return self.linear.forward(xs);
        }
        let y = xs.contiguous()?.apply_op1(FrozenMatmul {
            weight: w.clone(),
            transposed: false,
        })?;
        match self.linear.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `[.., in] ↦ [.., out] = X·Wᵀ`, or transposed `[.., out] ↦ [.., in] = G·W`; each one's
/// backward is the other (both are linear in their input); the weight gets no gradient.
struct FrozenMatmul {
    weight: Tensor,
    transposed: bool,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        if self.transposed {
            "qlora-frozen-g-w"
        } else {
            "qlora-frozen-x-wt"
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.weight.dims2()?;
        let (k, n) = if self.transposed {
            (out_f, in_f)
        } else {
            (in_f, out_f)
        };
        let mut dims = lx.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("{}: the input {dims:?} does not end in {k}", self.name());
        }
        let m = lx.shape().elem_count() / k.max(1);
        let x = f32s(x, lx, self.name())?;
        let y = with_f32s(&self.weight, self.name(), |w| {
            let y = if self.transposed {
                qlora_lora::matmul::g_w(x, w, m, k, n)
            } else {
                qlora_lora::matmul::x_wt(x, w, m, k, n)
            };
            y.ok_or_else(|| candle_core::Error::Msg(format!("{}: shapes do not fit", self.name())))
        })?;
        *dims.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let other = FrozenMatmul {
            weight: self.weight.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(other)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and input gradient equal `candle_nn::Linear`'s (to f32 rounding), and the weight
    /// gets no gradient.
    #[test]
    fn frozen_linear_equals_candle_linear() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(
            (0..35)
                .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
                .collect::<Vec<_>>(),
            (5, 7),
            &dev,
        )?;
        let b = Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.0, 0.5], 5, &dev)?;
        let x = Var::from_tensor(&Tensor::from_vec(
            (0..42)
                .map(|i| ((i * 5) % 13) as f32 / 6.0 - 1.0)
                .collect::<Vec<_>>(),
            (2, 3, 7),
            &dev,
        )?)?;
        let g = Tensor::from_vec(
            (0..30)
                .map(|i| ((i * 3) % 7) as f32 - 3.0)
                .collect::<Vec<_>>(),
            (2, 3, 5),
            &dev,
        )?;
        let ours = FrozenLinear::new(w.clone(), Some(b.clone())).forward(x.as_tensor())?;
        let theirs = candle_nn::Linear::new(w.clone(), Some(b)).forward(x.as_tensor())?;
        let go = (&ours * &g)?.sum_all()?.backward()?;
        let gt = (&theirs * &g)?.sum_all()?.backward()?;
        let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert_eq!(ours.dims(), &[2, 3, 5]);
        assert!(diff(&ours, &theirs)? < 1e-5);
        assert!(
            diff(
                go.get(x.as_tensor()).unwrap(),
                gt.get(x.as_tensor()).unwrap()
            )? < 1e-5
        );
        assert!(go.get(&w).is_none());
        Ok(())
    }
}
