//! Merging an adapter into its base weight and taking it out again.
//!
//! `ΔW = s·B·A` (`[out, in]`; transposed for a `fan_in_fan_out` base), computed in f32 as
//! `(B·A)·s`, PEFT's order. DoRA merges `W' = (m/‖W₀+ΔW‖_row)·(W₀+ΔW)`.

use crate::base::{BaseWeight, DenseData};
use crate::error::{check_finite, Error, Result};
use crate::layer::{row_norms, AdapterWeights, LoraLinear, LoraParams};
use crate::matmul::{self, view};
use qlora_codec::{Dtype, QuantizeOptions, QuantizedTensor};
use rayon::prelude::*;

/// How to merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeOptions {
    /// PEFT's `safe_merge`: round ΔW to the base dtype first, then add, and refuse (with
    /// [`Error::NonFinite`]) a result holding NaN or infinity. The default (false) adds in f32 and
    /// rounds once, as PEFT's `merge_and_unload()` does; non-finite results are refused either
    /// way.
    pub safe: bool,
    /// What the merged weight becomes.
    pub output: MergeOutput,
}

/// The layout of a merged weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeOutput {
    /// Same kind as the base: a dense base stays dense in its dtype; a 4-bit base is
    /// re-quantized with its own quant type, block size and double-quant setting (new absmax),
    /// as PEFT's `Linear4bit.merge` does. The re-quantized tensor's dtype is f32, like PEFT's
    /// (the f32 delta promotes the sum).
    #[default]
    Same,
    /// A dense weight in this dtype (a 4-bit base is dequantized).
    Dense(Dtype),
    /// A 4-bit weight with these options (a dense base is quantized after the merge).
    Quantized(QuantizeOptions),
}

/// What a merge did to one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Frobenius norm of the intended change (`‖ΔW‖`, or for DoRA `‖W' − W₀‖`), in f64.
    pub delta_norm: f64,
    /// Set when the result is 4-bit.
    pub requantization: Option<RequantReport>,
}

/// How much of a merge survived 4-bit re-quantization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequantReport {
    /// `‖deq(Q(W₀+ΔW)) − (W₀+ΔW)‖_F`: the re-quantization error.
    pub error_norm: f64,
    /// `⟨deq(new) − W₀, ΔW⟩ / ‖ΔW‖²`: the fraction of the delta that survived (1 = all of it).
    /// PEFT only warns; for ‖ΔW‖/‖W‖ ≲ 1 % expect a few percent.
    pub survived: f64,
}

#[derive(Debug, Clone)]
pub(crate) struct MergedState {
    /// DoRA: the weight norm used at merge time (needed to unmerge).
    dora_norm: Option<Vec<f32>>,
}

/// `s·B·A` as `[out, in]` f32, computed as `(B·A)·s`.
pub fn delta_weight(
    params: &LoraParams,
    weights: &AdapterWeights,
    out_f: usize,
    in_f: usize,
) -> Vec<f32> {
    let r = params.r;
    let s = params.scaling() as f32;
    let mut d = matmul::mul(view(&weights.b, out_f, r), view(&weights.a, r, in_f), 1.0);
    d.par_iter_mut().for_each(|v| *v *= s);
    d
}

/// The exact merged target in the logical `[out, in]` layout, f32, plus the DoRA norm.
fn merged_target(
    w0: &[f32],
    params: &LoraParams,
    weights: &AdapterWeights,
    out_f: usize,
    in_f: usize,
    round_delta_to: Option<Dtype>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let mut delta = delta_weight(params, weights, out_f, in_f);
    if let Some(dt) = round_delta_to {
        crate::base::round_to_dtype(&mut delta, dt);
    }
    let mut t: Vec<f32> = w0
        .par_iter()
        .zip(delta.par_iter())
        .map(|(w, d)| w + d)
        .collect();
    let norm = weights.magnitude.as_ref().map(|m| {
        let norms: Vec<f32> = t
            .par_chunks(in_f)
            .map(|row| row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() as f32)
            .collect();
        t.par_chunks_mut(in_f).enumerate().for_each(|(j, row)| {
            let f = m[j] / norms[j];
            row.iter_mut().for_each(|v| *v *= f);
        });
        norms
    });
    (t, norm)
}

fn frob(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b.par_iter())
        .map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn build_output(
    base: &BaseWeight,
    logical: &[f32],
    output: MergeOutput,
    quant_dtype: Dtype,
) -> Result<BaseWeight> {
    let (out_f, in_f) = (base.out_features(), base.in_features());
    let fifo = base.fan_in_fan_out();
    let stored = || {
        if fifo {
            matmul::transpose(logical, out_f, in_f)
        } else {
            logical.to_vec()
        }
    };
    Ok(match (output, base) {
        (MergeOutput::Same, BaseWeight::Dense { data, .. }) => {
            let d = DenseData::from_f32(&stored(), data.dtype());
            BaseWeight::Dense {
                data: d,
                out_features: out_f,
                in_features: in_f,
                fan_in_fan_out: fifo,
            }
        }
        (MergeOutput::Same, BaseWeight::Quantized(q)) => {
            let opts = QuantizeOptions {
                quant_type: q.quant_type(),
                blocksize: q.blocksize(),
                double_quant: q.is_double_quant(),
            };
            let shape = [out_f, in_f];
            BaseWeight::Quantized(match quant_dtype {
                Dtype::F32 => QuantizedTensor::quantize(logical, &shape, opts)?,
                Dtype::BF16 => {
                    let v: Vec<half::bf16> =
                        logical.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    QuantizedTensor::quantize(&v, &shape, opts)?
                }
                Dtype::F16 => {
                    let v: Vec<half::f16> =
                        logical.iter().map(|&x| half::f16::from_f32(x)).collect();
                    QuantizedTensor::quantize(&v, &shape, opts)?
                }
            })
        }
        (MergeOutput::Dense(dt), _) => BaseWeight::Dense {
            data: DenseData::from_f32(&stored(), dt),
            out_features: out_f,
            in_features: in_f,
            fan_in_fan_out: fifo,
        },
        (MergeOutput::Quantized(opts), _) => {
            BaseWeight::Quantized(QuantizedTensor::quantize(logical, &[out_f, in_f], opts)?)
        }
    })
}

/// Merge an adapter into a base weight, returning the new weight and a report. The base is not
/// modified. Materializes the `[out, in]` weight in f32 (a merge is an offline operation).
pub fn merge_weight(
    base: &BaseWeight,
    params: &LoraParams,
    weights: &AdapterWeights,
    options: MergeOptions,
) -> Result<(BaseWeight, MergeReport)> {
    merge_weight_with_norm(base, params, weights, options).map(|(w, r, _)| (w, r))
}

fn merge_weight_with_norm(
    base: &BaseWeight,
    params: &LoraParams,
    weights: &AdapterWeights,
    options: MergeOptions,
) -> Result<(BaseWeight, MergeReport, Option<Vec<f32>>)> {
    let (out_f, in_f) = (base.out_features(), base.in_features());
    let w0 = base.to_f32()?;
    let round = if options.safe {
        Some(base.dtype())
    } else {
        None
    };
    let (target, norm) = merged_target(&w0, params, weights, out_f, in_f, round);
    check_finite("merged weight", &target)?;
    let delta_norm = frob(&target, &w0);
    // PEFT re-quantizes a 4-bit base from `deq(W) + ΔW`, which torch promotes to f32; DoRA's merge
    // casts back to the dequantized dtype first (`merge_safe(...).to(orig_dtype)`).
    let quant_dtype = if weights.magnitude.is_some() {
        base.dtype()
    } else {
        Dtype::F32
    };
    let out = build_output(base, &target, options.output, quant_dtype)?;
    let requantization = match &out {
        BaseWeight::Quantized(_) => {
            let q = out.to_f32()?;
            let mut dot = 0.0f64;
            let mut dd = 0.0f64;
            for ((qv, t), w) in q.iter().zip(&target).zip(&w0) {
                let d = (*t as f64) - (*w as f64);
                dot += ((*qv as f64) - (*w as f64)) * d;
                dd += d * d;
            }
            Some(RequantReport {
                error_norm: frob(&q, &target),
                survived: if dd > 0.0 { dot / dd } else { 1.0 },
            })
        }
        BaseWeight::Dense { .. } => None,
    };
    Ok((
        out,
        MergeReport {
            delta_norm,
            requantization,
        },
        norm,
    ))
}

impl LoraLinear {
    /// Merge the adapter into the base (`W ← W + s·BA`, or DoRA's rescaled form); forward then
    /// uses the base only. `options.output` must keep the base's kind ([`MergeOutput::Same`])
    /// for [`unmerge`](Self::unmerge) to apply.
    pub fn merge(&mut self, options: MergeOptions) -> Result<MergeReport> {
        if self.merged.is_some() {
            return Err(Error::State("adapter is already merged".into()));
        }
        let (w, report, dora_norm) =
            merge_weight_with_norm(&self.base, &self.params, &self.weights, options)?;
        self.base = w;
        self.merged = Some(MergedState { dora_norm });
        Ok(report)
    }

    /// Take a merged adapter out again: `W ← W − s·BA` (DoRA: `W/f − ΔW` with the norm cached at
    /// merge time), rounded to the base dtype, or re-quantized for a 4-bit base (lossy: a
    /// re-quantized weight does not return to its original codes).
    pub fn unmerge(&mut self) -> Result<MergeReport> {
        let state = self
            .merged
            .take()
            .ok_or_else(|| Error::State("adapter is not merged".into()))?;
        let (out_f, in_f) = (self.base.out_features(), self.base.in_features());
        let w = self.base.to_f32()?;
        let delta = delta_weight(&self.params, &self.weights, out_f, in_f);
        let mut t = w.clone();
        if let (Some(norm), Some(m)) = (&state.dora_norm, &self.weights.magnitude) {
            t.par_chunks_mut(in_f).enumerate().for_each(|(j, row)| {
                let f = m[j] / norm[j];
                row.iter_mut().for_each(|v| *v /= f);
            });
        }
        t.par_iter_mut()
            .zip(delta.par_iter())
            .for_each(|(v, d)| *v -= d);
        check_finite("unmerged weight", &t)?;
        let delta_norm = frob(&t, &w);
        let quant_dtype = if self.weights.magnitude.is_some() {
            self.base.dtype()
        } else {
            Dtype::F32
        };
        let out = build_output(&self.base, &t, MergeOutput::Same, quant_dtype)?;
        let requantization = match &out {
            BaseWeight::Quantized(_) => {
                let q = out.to_f32()?;
                Some(RequantReport {
                    error_norm: frob(&q, &t),
                    survived: f64::NAN,
                })
            }
            BaseWeight::Dense { .. } => None,
        };
        self.base = out;
        Ok(MergeReport {
            delta_norm,
            requantization,
        })
    }
}

/// DoRA's weight norm for a base and adapter (see [`LoraLinear::weight_norm`]).
pub fn dora_weight_norm(
    base: &BaseWeight,
    params: &LoraParams,
    weights: &AdapterWeights,
) -> Result<Vec<f32>> {
    row_norms(
        base,
        &weights.a,
        &weights.b,
        params.r,
        params.scaling() as f32,
    )
}

/// One module of a merged adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedModule {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj` (its weight is `<module>.weight`).
    pub module: String,
    /// The merged weight.
    pub weight: BaseWeight,
    /// What the merge did.
    pub report: MergeReport,
}

/// Merge every module of a PEFT adapter into its base weight.
///
/// `base_for(module)` returns the stored weight `<module>.weight` (dense as stored, `[rows,
/// cols]`; a `fan_in_fan_out` adapter reinterprets a dense weight as `[in, out]`), or `None` when
/// the base has no such weight. Each module gets the rank and alpha its config assigns
/// (`rank_pattern`, `alpha_pattern`). Errors name the module: a missing weight, factors whose
/// shapes do not fit it, a `fan_in_fan_out` adapter over a 4-bit weight.
pub fn merge_adapter(
    adapter: &crate::peft::PeftAdapter,
    mut base_for: impl FnMut(&str) -> Result<Option<BaseWeight>>,
    options: MergeOptions,
) -> Result<Vec<MergedModule>> {
    let cfg = &adapter.config;
    let mut out = Vec::with_capacity(adapter.modules.len());
    for (module, weights) in &adapter.modules {
        let merr = |reason: String| Error::Module {
            module: module.clone(),
            reason,
        };
        let stored = base_for(module)?
            .ok_or_else(|| merr(format!("the base has no weight {module}.weight")))?;
        let base = match (stored, cfg.fan_in_fan_out) {
            (
                BaseWeight::Dense {
                    data,
                    out_features: rows,
                    in_features: cols,
                    fan_in_fan_out: false,
                },
                true,
            ) => BaseWeight::dense_fan_in_fan_out(data, cols, rows)?,
            (BaseWeight::Quantized(_), true) => {
                return Err(merr(
                    "fan_in_fan_out adapters cannot apply to a 4-bit weight".into(),
                ))
            }
            (b, _) => b,
        };
        let params = cfg.params_for(module);
        let (out_f, in_f, r) = (base.out_features(), base.in_features(), params.r);
        if weights.a.len() != r * in_f || weights.b.len() != out_f * r {
            return Err(merr(format!(
                "adapter factors lora_A [{r}, {}] and lora_B [{}, {r}] do not fit the base weight [out {out_f}, in {in_f}]",
                weights.a.len() / r.max(1),
                weights.b.len() / r.max(1)
            )));
        }
        if let Some(m) = &weights.magnitude {
            if m.len() != out_f {
                return Err(merr(format!(
                    "lora_magnitude_vector has {} values, the weight has {out_f} outputs",
                    m.len()
                )));
            }
        }
        let (weight, report) =
            merge_weight(&base, &params, weights, options).map_err(|e| match e {
                Error::NonFinite { what, index, value } => Error::NonFinite {
                    what: format!("{module}: {what}"),
                    index,
                    value,
                },
                other => other,
            })?;
        out.push(MergedModule {
            module: module.clone(),
            weight,
            report,
        });
    }
    Ok(out)
}
