//! Proptest strategies for downstream property tests (feature `testing`).

use crate::base::{BaseWeight, DenseData};
use crate::layer::{AdapterWeights, LoraLinear, LoraParams};
use proptest::prelude::*;
use qlora_codec::{QuantizeOptions, QuantizedTensor};

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
