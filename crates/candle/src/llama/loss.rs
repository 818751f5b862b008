//! transformers' causal-LM loss in one pass each way on the CPU.
//!
//! The composed form (narrow, reshape, max, subtract, exp, sum, log, subtract, gather, mask,
//! sum) makes about ten `[batch·(t−1), vocab]`-sized nodes, each of whose gradients candle
//! accumulates into a freshly zeroed tensor. Here the forward pass computes each labelled row's
//! `log p(label) = (x_l − max) − ln Σ exp(x − max)` (the same operations as `log_softmax`) and
//! keeps `max + ln Σ exp(x − max)` per row; the backward pass writes
//! `g · (softmax(x) − onehot(label)) / count` for the labelled rows and zeros elsewhere.
//!
//! CPU, f32 and f64 logits; elsewhere the composed form runs.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::{lanes, Float};
use crate::cpu_op::contiguous;

/// Rows per parallel task.
const ROWS: usize = 16;

/// Mean cross-entropy of `logits: [b, t, v]` against `targets` (one per position `(b, i)`,
/// `i < t − 1`: the label of position `i + 1`, or `None` for an ignored one).
pub(crate) struct CausalLmLoss {
    pub(crate) targets: Vec<Option<u32>>,
    pub(crate) count: usize,
    /// `max + ln Σ exp(x − max)` of each labelled row, from the forward pass.
    lse: Mutex<Vec<f64>>,
}

impl CausalLmLoss {
    pub(crate) fn new(targets: Vec<Option<u32>>, count: usize) -> Self {
        CausalLmLoss {
            targets,
            count,
            lse: Mutex::new(Vec::new()),
        }
    }

    /// `(b, t, v)` of the logits' layout, checked against the targets.
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let &[b, t, v] = layout.dims() else {
            candle_core::bail!(
                "causal-LM loss: logits must be [batch, seq, vocab], found {:?}",
                layout.dims()
            );
        };
        if b * t.saturating_sub(1) != self.targets.len() {
            candle_core::bail!(
                "causal-LM loss: {} targets for logits {:?}",
                self.targets.len(),
                layout.dims()
            );
        }
        Ok((b, t, v))
    }

    /// The labelled rows `(row of the logits, label)`, in order.
    fn labelled(&self, t: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.targets
            .iter()
            .enumerate()
            .filter_map(move |(k, l)| l.map(|l| ((k / (t - 1)) * t + k % (t - 1), l as usize)))
    }

    fn forward<T: Float>(&self, x: &[T], t: usize, v: usize) -> (T, Vec<f64>) {
        let rows: Vec<(usize, usize)> = self.labelled(t).collect();
        let per_row: Vec<(T, f64)> = rows
            .par_chunks(ROWS)
            .flat_map_iter(|chunk| {
                chunk.iter().map(|&(row, l)| {
                    let x = &x[row * v..(row + 1) * v];
                    let max = lanes(x, T::NEG_INFINITY, |acc, e| if e > acc { e } else { acc });
                    let exps: Vec<T> = x.iter().map(|&e| e.sub(max).exp()).collect();
                    let ln = lanes(&exps, T::ZERO, |acc, e| acc.add(e)).ln();
                    (x[l].sub(max).sub(ln), max.to_f64() + ln.to_f64())
                })
            })
            .collect();
        let mut total = T::ZERO;
        for &(logp, _) in &per_row {
            total = total.add(logp);
        }
        let loss = total * T::from_f64(-1.0 / self.count as f64);
        (loss, per_row.into_iter().map(|(_, lse)| lse).collect())
    }

    fn backward<T: Float>(&self, x: &[T], t: usize, v: usize, g: f64) -> Vec<T> {
        let lse = self.lse.lock().unwrap_or_else(|p| p.into_inner());
        // Per row of the logits: its label and `max + ln Σ exp` if it is labelled.
        let mut label: Vec<Option<(usize, f64)>> = vec![None; x.len() / v];
        for ((row, l), &c) in self.labelled(t).zip(lse.iter()) {
            label[row] = Some((l, c));
        }
        let coef = g / self.count as f64;
        let mut out = vec![T::ZERO; x.len()];
        out.par_chunks_mut(v * ROWS)
            .zip(x.par_chunks(v * ROWS))
            .zip(label.par_chunks(ROWS))
            .for_each(|((o, x), label)| {
                for ((o, x), label) in o.chunks_exact_mut(v).zip(x.chunks_exact(v)).zip(label) {
                    let Some((l, c)) = *label else { continue };
                    let (c, coef) = (T::from_f64(c), T::from_f64(coef));
                    for (o, &e) in o.iter_mut().zip(x) {
                        *o = e.sub(c).exp() * coef;
                    }
                    o[l] = o[l].sub(coef);
                }
            });
        out
    }
}

impl CustomOp1 for CausalLmLoss {
    fn name(&self) -> &'static str {
        "qlora-causal-lm-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = "causal-LM loss";
        let (_, t, v) = self.dims(layout)?;
        let (loss, lse) = match storage {
            CpuStorage::F32(x) => {
                let (loss, lse) = self.forward(contiguous(x, layout, what)?, t, v);
                (CpuStorage::F32(vec![loss]), lse)
            }
            CpuStorage::F64(x) => {
                let (loss, lse) = self.forward(contiguous(x, layout, what)?, t, v);
                (CpuStorage::F64(vec![loss]), lse)
            }
            other => candle_core::bail!("{what}: f32 or f64 logits, found {:?}", other.dtype()),
        };
        *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = lse;
        Ok((loss, Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let x = logits.contiguous()?;
        let (_, t, v) = x.dims3()?;
        let grad = match x.dtype() {
            DType::F32 => {
                let x = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(self.backward(&x, t, v, g), logits.shape(), logits.device())?
            }
            DType::F64 => {
                let x = x.flatten_all()?.to_vec1::<f64>()?;
                Tensor::from_vec(self.backward(&x, t, v, g), logits.shape(), logits.device())?
            }
            other => candle_core::bail!("causal-LM loss: f32 or f64 logits, found {other:?}"),
        };
        Ok(Some(grad))
    }
}
