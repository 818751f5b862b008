//! Downstream-style property tests: the facade's types checked against the layers' exported
//! strategies and oracles.

use proptest::prelude::*;
use qlora_nf4::codec::testing::{
    error_bound, quantized_case, quantized_matrix, reference_dequantize,
};
use qlora_nf4::double_quant::testing::{
    absmax_values, blocksize_8bit, optimizer_moments, reference_quantize_blockwise,
};
use qlora_nf4::double_quant::{quantize_blockwise, DoubleQuantAbsmax, DynamicMap, MapKind};
use qlora_nf4::lora::testing::{lora_case, reference_delta, reference_forward};
use qlora_nf4::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The codec's (SIMD-dispatched) dequantization equals the oracle bit for bit, and every
    /// element is within the documented round-trip bound.
    #[test]
    fn codec_round_trip(case in quantized_case(1..5000)) {
        let back: Vec<f32> = case.tensor.dequantize().unwrap();
        prop_assert_eq!(&back, &reference_dequantize(&case.tensor));
        for (i, (w, b)) in case.weights.iter().zip(&back).enumerate() {
            prop_assert!((w - b).abs() <= error_bound(&case.weights, &case.tensor, i));
        }
    }

    /// Re-quantizing a dequantized tensor with f32 absmax gives the same codes (idempotence).
    #[test]
    fn requantization_is_idempotent(case in quantized_matrix(1..40, 1..200)) {
        let opts = QuantizeOptions { double_quant: false, ..QuantizeOptions::qlora() };
        let shape = case.tensor.shape().to_vec();
        let q1 = QuantizedTensor::quantize(&case.weights, &shape, opts).unwrap();
        let back: Vec<f32> = q1.dequantize().unwrap();
        let q2 = QuantizedTensor::quantize(&back, &shape, opts).unwrap();
        prop_assert_eq!(q1, q2);
    }

    /// Double quantization of realistic absmax values stays within half a code step of the
    /// nested scale per value.
    #[test]
    fn double_quant_error(absmax in absmax_values(1..3000)) {
        let dq = DoubleQuantAbsmax::compress(&absmax);
        let back = dq.decompress();
        for (j, (a, b)) in absmax.iter().zip(&back).enumerate() {
            let scale = dq.nested_absmax[j / 256];
            // Widest gap of the signed map is 0.0141 (next to ±1): half of it, plus roundings.
            prop_assert!((a - b).abs() <= scale * 0.00704 + 4.0 * f32::EPSILON * a.abs().max(scale),
                "block {}: {} vs {}", j, a, b);
        }
    }

    /// The 8-bit blockwise codec (optimizer states) equals the plain-loop oracle.
    #[test]
    fn blockwise_8bit_matches_oracle(x in optimizer_moments(MapKind::Unsigned, 1..4000), bs in blocksize_8bit()) {
        let map = DynamicMap::unsigned();
        let mut codes = vec![0u8; x.len()];
        let mut absmax = vec![0f32; x.len().div_ceil(bs)];
        quantize_blockwise(map, &x, bs, &mut codes, &mut absmax).unwrap();
        let (rc, ra) = reference_quantize_blockwise(map, &x, bs);
        prop_assert_eq!(codes, rc);
        prop_assert_eq!(absmax, ra);
    }

    /// A LoRA layer over a 4-bit base computes `X·Wᵀ + b + s·(X·Aᵀ)·Bᵀ` with the dequantized base.
    #[test]
    fn lora_forward_matches_oracle(case in lora_case(1..64, 1..64, 1..6)) {
        let l = &case.layer;
        let (y, _) = l.forward(&case.x, case.n, Mode::Eval).unwrap();
        let r = reference_forward(&case.base_f32, l.bias(), l.params(), l.weights(), &case.x, case.n);
        for ((a, b), s) in y.iter().zip(&r.y).zip(&r.magnitude) {
            prop_assert!((f64::from(*a) - b).abs() <= 1e-5 * s + 1e-30, "{} vs {}", a, b);
        }
    }

    /// Merging into a dense f32 weight gives `deq(W) + s·B·A`, and the merged layer computes what
    /// the unmerged one did.
    #[test]
    fn merge_matches_oracle(case in lora_case(1..48, 1..48, 1..4)) {
        let l = &case.layer;
        let options = MergeOptions { safe: false, output: MergeOutput::Dense(Dtype::F32) };
        let (merged, _) = merge_weight(l.base(), l.params(), l.weights(), options).unwrap();
        let merged = merged.to_f32().unwrap();
        let delta = reference_delta(l.params(), l.weights());
        for (((m, w), d), s) in merged.iter().zip(&case.base_f32).zip(&delta.y).zip(&delta.magnitude) {
            let expected = f64::from(*w) + d;
            prop_assert!((f64::from(*m) - expected).abs() <= 1e-5 * (s + f64::from(w.abs())) + 1e-30);
        }
    }
}
