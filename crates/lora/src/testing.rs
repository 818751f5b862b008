//! Proptest strategies and reference oracles for downstream property tests (feature `testing`).
//!
//! [`lora_case`] draws a layer over a 4-bit base with realistic weights (from
//! `qlora_codec::testing`), a non-trivial adapter (B ≠ 0) and an input batch; the oracles
//! [`reference_forward`] and [`reference_delta`] compute `Y = X·Wᵀ + b + s·(X·Aᵀ)·Bᵀ` and
//! `ΔW = s·B·A` in f64 with plain loops, together with the sum of absolute terms, so that a
//! property can bound the f32 error relative to it.
//!
//! ```
//! use proptest::prelude::*;
//! use qlora_lora::testing::{lora_case, reference_forward};
//! use qlora_lora::Mode;
//!
//! proptest!(ProptestConfig::with_cases(4), |(case in lora_case(1..40, 1..40, 1..6))| {
//!     let (y, _) = case.layer.forward(&case.x, case.n, Mode::Eval).unwrap();
//!     let r = reference_forward(&case.base_f32, case.layer.bias(), case.layer.params(),
//!                               case.layer.weights(), &case.x, case.n);
//!     for ((a, b), s) in y.iter().zip(&r.y).zip(&r.magnitude) {
//!         prop_assert!((f64::from(*a) - b).abs() <= 1e-5 * s + 1e-30);
//!     }
//! });
//! ```

use crate::base::{BaseWeight, DenseData};
use crate::layer::{AdapterWeights, LoraLinear, LoraParams};
use proptest::prelude::*;
use qlora_codec::testing::{quantized_matrix, SplitMix64};
use qlora_codec::{QuantizeOptions, QuantizedTensor};
use std::ops::Range;

/// Hyper-parameters: rank 1..=`max_r`, alpha in (0.5, 64), rsLoRA on or off, dropout in [0, 0.5),
/// DoRA off (a layer strategy sets it when it adds a magnitude vector).
pub fn lora_params(max_r: usize) -> impl Strategy<Value = LoraParams> {
    (1..=max_r.max(1), 0.5f64..64.0, any::<bool>(), 0.0f32..0.5).prop_map(
        |(r, alpha, use_rslora, dropout)| LoraParams {
            r,
            alpha,
            use_rslora,
            dropout,
            use_dora: false,
        },
    )
}

/// Adapter tensors of the given shape with values of a trained adapter's scale (|A| ≤ 0.5,
/// |B| ≤ 0.5), optionally with a DoRA magnitude vector in (0.1, 2).
pub fn adapter_weights(
    r: usize,
    in_f: usize,
    out_f: usize,
    dora: bool,
) -> impl Strategy<Value = AdapterWeights> {
    (
        prop::collection::vec(-0.5f32..0.5, r * in_f),
        prop::collection::vec(-0.5f32..0.5, out_f * r),
        prop::collection::vec(0.1f32..2.0, out_f),
    )
        .prop_map(move |(a, b, m)| AdapterWeights {
            a,
            b,
            magnitude: dora.then_some(m),
        })
}

/// A small layer (out, in < 48; rank ≤ 4) over a dense f32 base or a 4-bit (QLoRA recipe) base,
/// with or without DoRA.
pub fn small_layer() -> impl Strategy<Value = LoraLinear> {
    (
        1usize..48,
        1usize..48,
        lora_params(4),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(out_f, in_f, params, quantized, dora)| {
            (
                prop::collection::vec(-1.0f32..1.0, out_f * in_f),
                adapter_weights(params.r, in_f, out_f, dora),
                Just((out_f, in_f, params, quantized, dora)),
            )
        })
        .prop_map(|(w, ad, (out_f, in_f, params, quantized, dora))| {
            let base = if quantized {
                let q = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora())
                    .expect("valid shape and block size");
                BaseWeight::quantized(q).expect("2-D")
            } else {
                BaseWeight::dense(DenseData::F32(w), out_f, in_f).expect("matching length")
            };
            LoraLinear::new(
                base,
                None,
                LoraParams {
                    use_dora: dora,
                    ..params
                },
                ad,
            )
            .expect("consistent shapes")
        })
}

/// Adapter tensors for an `[out, in]` layer of rank `r`, drawn from `seed`: A as PEFT's default
/// (uniform in ±1/√in), B normal with standard deviation 0.02 (a trained adapter; PEFT's initial
/// B = 0 would make every LoRA property trivial).
pub fn adapter_from_seed(r: usize, in_f: usize, out_f: usize, seed: u64) -> AdapterWeights {
    let mut rng = SplitMix64::new(seed);
    let bound = 1.0 / (in_f as f64).sqrt();
    AdapterWeights {
        a: (0..r * in_f)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
            .collect(),
        b: (0..out_f * r)
            .map(|_| (0.02 * rng.normal()) as f32)
            .collect(),
        magnitude: None,
    }
}

/// A LoRA layer over a 4-bit base with an input batch, and the dequantized base the oracle uses.
#[derive(Debug, Clone)]
pub struct LoraCase {
    /// The layer (NF4 + double quant base, block 64; optional bias).
    pub layer: LoraLinear,
    /// The base weight the layer computes with, dequantized to f32, `[out, in]`.
    pub base_f32: Vec<f32>,
    /// Input rows, `[n, in]`.
    pub x: Vec<f32>,
    /// Number of input rows.
    pub n: usize,
}

/// A [`LoraCase`] with `out` and `in` features and `n` rows drawn from the given ranges.
pub fn lora_case(
    out_features: Range<usize>,
    in_features: Range<usize>,
    rows: Range<usize>,
) -> impl Strategy<Value = LoraCase> {
    (
        quantized_matrix(out_features, in_features),
        lora_params(16),
        any::<u64>(),
        rows,
        any::<bool>(),
    )
        .prop_map(|(base, params, seed, n, with_bias)| {
            let shape = base.tensor.shape().to_vec();
            let (out_f, in_f) = (shape[0], shape[1]);
            let weights = adapter_from_seed(params.r, in_f, out_f, seed);
            let mut rng = SplitMix64::new(seed ^ 0x5EED);
            let x: Vec<f32> = (0..n * in_f).map(|_| rng.normal() as f32).collect();
            let bias = with_bias.then(|| (0..out_f).map(|_| 0.1 * rng.normal() as f32).collect());
            let base_weight =
                BaseWeight::quantized(base.tensor).expect("a 2-D tensor is a valid base");
            let base_f32 = base_weight
                .to_f32()
                .expect("dequantization of a valid tensor");
            let layer =
                LoraLinear::new(base_weight, bias, params, weights).expect("shapes drawn to fit");
            LoraCase {
                layer,
                base_f32,
                x,
                n,
            }
        })
}

/// An oracle result: the values and, per element, the sum of the absolute values of the terms
/// that make it up (the natural scale of its rounding error).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// The exact-ish (f64) values.
    pub y: Vec<f64>,
    /// Sum of absolute terms per value.
    pub magnitude: Vec<f64>,
}

/// `Y = X·Wᵀ + b + s·(X·Aᵀ)·Bᵀ` in f64 with plain loops (`w` is `[out, in]` row-major, `x` is
/// `[n, in]`).
///
/// # Panics
/// If the lengths do not fit `params.r`, `n` and the adapter shapes.
pub fn reference_forward(
    w: &[f32],
    bias: Option<&[f32]>,
    params: &LoraParams,
    weights: &AdapterWeights,
    x: &[f32],
    n: usize,
) -> Reference {
    let r = params.r;
    let in_f = weights.a.len() / r;
    let out_f = weights.b.len() / r;
    assert_eq!(w.len(), out_f * in_f, "base length");
    assert_eq!(x.len(), n * in_f, "input length");
    let s = params.scaling();
    let mut y = vec![0.0; n * out_f];
    let mut magnitude = vec![0.0; n * out_f];
    for row in 0..n {
        let xr = &x[row * in_f..(row + 1) * in_f];
        let u: Vec<f64> = (0..r)
            .map(|k| {
                (0..in_f)
                    .map(|i| f64::from(xr[i]) * f64::from(weights.a[k * in_f + i]))
                    .sum()
            })
            .collect();
        let u_abs: Vec<f64> = (0..r)
            .map(|k| {
                (0..in_f)
                    .map(|i| (f64::from(xr[i]) * f64::from(weights.a[k * in_f + i])).abs())
                    .sum()
            })
            .collect();
        for j in 0..out_f {
            let mut acc = bias.map_or(0.0, |b| f64::from(b[j]));
            let mut mag = acc.abs();
            for i in 0..in_f {
                let t = f64::from(xr[i]) * f64::from(w[j * in_f + i]);
                acc += t;
                mag += t.abs();
            }
            for k in 0..r {
                let bjk = f64::from(weights.b[j * r + k]);
                acc += s * u[k] * bjk;
                mag += (s * u_abs[k] * bjk).abs();
            }
            y[row * out_f + j] = acc;
            magnitude[row * out_f + j] = mag;
        }
    }
    Reference { y, magnitude }
}

/// `ΔW = s·B·A` (`[out, in]`) in f64, with the sum of absolute terms per element.
pub fn reference_delta(params: &LoraParams, weights: &AdapterWeights) -> Reference {
    let r = params.r;
    let in_f = weights.a.len() / r;
    let out_f = weights.b.len() / r;
    let s = params.scaling();
    let mut y = vec![0.0; out_f * in_f];
    let mut magnitude = vec![0.0; out_f * in_f];
    for j in 0..out_f {
        for i in 0..in_f {
            for k in 0..r {
                let t = s * f64::from(weights.b[j * r + k]) * f64::from(weights.a[k * in_f + i]);
                y[j * in_f + i] += t;
                magnitude[j * in_f + i] += t.abs();
            }
        }
    }
    Reference { y, magnitude }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Mode;
    use crate::merge::delta_weight;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn forward_matches_the_oracle(case in lora_case(1..48, 1..48, 1..5)) {
            let (y, _) = case.layer.forward(&case.x, case.n, Mode::Eval).unwrap();
            let r = reference_forward(&case.base_f32, case.layer.bias(), case.layer.params(),
                                      case.layer.weights(), &case.x, case.n);
            for ((a, b), s) in y.iter().zip(&r.y).zip(&r.magnitude) {
                prop_assert!((f64::from(*a) - b).abs() <= 1e-5 * s + 1e-30, "{} vs {}", a, b);
            }
        }

        #[test]
        fn delta_matches_the_oracle(case in lora_case(1..48, 1..48, 1..2)) {
            let l = &case.layer;
            let (out_f, in_f) = (l.base().out_features(), l.base().in_features());
            let d = delta_weight(l.params(), l.weights(), out_f, in_f);
            let r = reference_delta(l.params(), l.weights());
            for ((a, b), s) in d.iter().zip(&r.y).zip(&r.magnitude) {
                prop_assert!((f64::from(*a) - b).abs() <= 1e-5 * s + 1e-30, "{} vs {}", a, b);
            }
        }
    }
}
