//! Global gradient-norm clipping (`torch.nn.utils.clip_grad_norm_`, QLoRA: `max_grad_norm = 0.3`).

use crate::element::{Element, TensorMut, TensorRef};
use crate::error::Error;

/// The L2 norm over all elements of all gradients, accumulated in f64 (torch accumulates each
/// tensor's norm in f32, so the two agree to f32 rounding). NaN or inf elements give NaN or inf.
pub fn global_grad_norm(grads: &[TensorRef<'_>]) -> f64 {
    fn sumsq<T: Element>(s: &[T]) -> f64 {
        s.iter()
            .map(|x| {
                let v = x.to_f32() as f64;
                v * v
            })
            .sum()
    }
    grads
        .iter()
        .map(|g| match g {
            TensorRef::F32(s) => sumsq(s),
            TensorRef::Bf16(s) => sumsq(s),
            TensorRef::F16(s) => sumsq(s),
        })
        .sum::<f64>()
        .sqrt()
}

/// The factor torch applies: `min(1, max_norm / (total_norm + 1e-6))`, as the f32 torch uses.
///
/// Errors when `max_norm` is not finite and positive.
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> Result<f32, Error> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(Error::HyperParameter {
            name: "max_grad_norm",
            value: max_norm,
            reason: "must be finite and > 0",
        });
    }
    let coef = (max_norm / (total_norm + 1e-6)) as f32;
    // NaN stays NaN (torch's clamp keeps it), so non-finite gradients stay visible.
    Ok(if coef > 1.0 { 1.0 } else { coef })
}

/// The outcome of [`clip_grad_norm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradClip {
    /// The global norm before clipping.
    pub total_norm: f64,
    /// The factor applied (1 when the norm was already within bounds).
    pub coef: f32,
}

/// Scale all gradients in place so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does: each element becomes `T(g · coef)` (rounded in its own
/// dtype). When only the optimizer reads the gradients, passing `coef` as `gnorm_scale` to
/// [`Adam::step_scaled`](crate::Adam::step_scaled) avoids this extra pass.
pub fn clip_grad_norm(grads: &mut [TensorMut<'_>], max_norm: f64) -> Result<GradClip, Error> {
    let views: Vec<TensorRef<'_>> = grads.iter().map(|g| g.as_ref()).collect();
    let total_norm = global_grad_norm(&views);
    let coef = clip_coefficient(total_norm, max_norm)?;
    fn scale<T: Element>(s: &mut [T], c: f32) {
        for x in s {
            *x = T::from_f32(x.to_f32() * c);
        }
    }
    if coef != 1.0 {
        for g in grads.iter_mut() {
            match g {
                TensorMut::F32(s) => scale(s, coef),
                TensorMut::Bf16(s) => scale(s, coef),
                TensorMut::F16(s) => scale(s, coef),
            }
        }
    }
    Ok(GradClip { total_norm, coef })
}
