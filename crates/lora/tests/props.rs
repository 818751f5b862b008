//! Property tests: merge/unmerge round trips, merged forward = unmerged forward, zero B = base.

use half::bf16;
use proptest::prelude::*;
use qlora_lora::{
    AdapterWeights, BaseWeight, DenseData, LoraLinear, LoraParams, MergeOptions, Mode,
    QuantizeOptions, QuantizedTensor,
};

#[derive(Debug, Clone)]
struct Setup {
    out_f: usize,
    in_f: usize,
    r: usize,
    alpha: f64,
    rslora: bool,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    x: Vec<f32>,
    n: usize,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..24,
        1usize..40,
        1usize..6,
        1usize..5,
        0.5f64..64.0,
        any::<bool>(),
    )
        .prop_flat_map(|(out_f, in_f, r, n, alpha, rslora)| {
            (
                prop::collection::vec(-1.0f32..1.0, out_f * in_f),
                prop::collection::vec(-0.5f32..0.5, r * in_f),
                prop::collection::vec(-0.5f32..0.5, out_f * r),
                prop::collection::vec(-2.0f32..2.0, n * in_f),
            )
                .prop_map(move |(w, a, b, x)| Setup {
                    out_f,
                    in_f,
                    r,
                    alpha,
                    rslora,
                    w,
                    a,
                    b,
                    x,
                    n,
                })
        })
}

fn layer(s: &Setup, data: DenseData, zero_b: bool) -> LoraLinear {
    let params = LoraParams {
        use_rslora: s.rslora,
        ..LoraParams::new(s.r, s.alpha)
    };
    let b = if zero_b {
        vec![0.0; s.b.len()]
    } else {
        s.b.clone()
    };
    let w = AdapterWeights {
        a: s.a.clone(),
        b,
        magnitude: None,
    };
    LoraLinear::new(
        BaseWeight::dense(data, s.out_f, s.in_f).unwrap(),
        None,
        params,
        w,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn merge_then_unmerge_restores_f32_base(s in setup()) {
        let mut l = layer(&s, DenseData::F32(s.w.clone()), false);
        let delta = qlora_lora::delta_weight(l.params(), l.weights(), s.out_f, s.in_f);
        l.merge(MergeOptions::default()).unwrap();
        l.unmerge().unwrap();
        let back = l.base().to_f32().unwrap();
        for ((w, r), d) in s.w.iter().zip(&back).zip(&delta) {
            // two f32 roundings of values no larger than |w| + |d|
            let tol = 2.0 * f32::EPSILON * (w.abs() + d.abs()) + f32::MIN_POSITIVE;
            prop_assert!((w - r).abs() <= tol, "{w} vs {r} (delta {d})");
        }
    }

    #[test]
    fn merge_then_unmerge_restores_bf16_base_within_rounding(s in setup()) {
        let wb: Vec<bf16> = s.w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut l = layer(&s, DenseData::Bf16(wb.clone()), false);
        let delta = qlora_lora::delta_weight(l.params(), l.weights(), s.out_f, s.in_f);
        l.merge(MergeOptions::default()).unwrap();
        l.unmerge().unwrap();
        let back = l.base().to_f32().unwrap();
        for ((w, r), d) in wb.iter().zip(&back).zip(&delta) {
            // each of the two bf16 roundings is off by at most half an ulp (2^-8 relative)
            let w = w.to_f32();
            let tol = (w.abs() + 2.0 * d.abs()) * 2f32.powi(-8) + 1e-30;
            prop_assert!((w - r).abs() <= tol, "{w} vs {r} (delta {d})");
        }
    }

    #[test]
    fn merged_forward_equals_unmerged_forward(s in setup()) {
        let unmerged = layer(&s, DenseData::F32(s.w.clone()), false);
        let mut merged = unmerged.clone();
        merged.merge(MergeOptions::default()).unwrap();
        let (yu, _) = unmerged.forward(&s.x, s.n, Mode::Eval).unwrap();
        let (ym, _) = merged.forward(&s.x, s.n, Mode::Eval).unwrap();
        let scale: f32 = s.x.iter().map(|v| v.abs()).sum::<f32>() / s.n as f32 + 1.0;
        let delta = qlora_lora::delta_weight(unmerged.params(), unmerged.weights(), s.out_f, s.in_f);
        let dmax = delta.iter().chain(&s.w).fold(0.0f32, |m, v| m.max(v.abs()));
        for (u, m) in yu.iter().zip(&ym) {
            prop_assert!((u - m).abs() <= 1e-5 * scale * (dmax + 1.0), "{u} vs {m}");
        }
    }

    #[test]
    fn zero_b_gives_exactly_the_base_output(s in setup(), quantized in any::<bool>()) {
        let l = if quantized {
            let params = LoraParams::new(s.r, s.alpha);
            let q = QuantizedTensor::quantize(&s.w, &[s.out_f, s.in_f], QuantizeOptions::qlora()).unwrap();
            let w = AdapterWeights { a: s.a.clone(), b: vec![0.0; s.b.len()], magnitude: None };
            LoraLinear::new(BaseWeight::quantized(q).unwrap(), None, params, w).unwrap()
        } else {
            layer(&s, DenseData::F32(s.w.clone()), true)
        };
        let mut base_only = l.clone();
        // merging a zero delta into an f32 base leaves it unchanged; forward then skips LoRA
        if !quantized {
            base_only.merge(MergeOptions::default()).unwrap();
            prop_assert_eq!(base_only.base(), l.base());
        } else {
            base_only.merge(MergeOptions { output: qlora_lora::MergeOutput::Dense(qlora_lora::Dtype::F32), ..Default::default() }).unwrap();
        }
        let (y, _) = l.forward(&s.x, s.n, Mode::Eval).unwrap();
        let (yb, _) = base_only.forward(&s.x, s.n, Mode::Eval).unwrap();
        if !quantized {
            prop_assert_eq!(y, yb);
        } else {
            for (a, b) in y.iter().zip(&yb) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
        }
    }
}

#[cfg(feature = "testing")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any layer from the exported strategy runs forward and backward with finite results.
    #[test]
    fn exported_strategy_layers_run(layer in qlora_lora::testing::small_layer(), n in 1usize..4) {
        let in_f = layer.base().in_features();
        let out_f = layer.base().out_features();
        let x: Vec<f32> = (0..n * in_f).map(|i| (i as f32 * 0.3).sin()).collect();
        let (y, cache) = layer.forward(&x, n, Mode::Train { seed: 1 }).unwrap();
        let g = layer.backward(&x, &cache, &vec![1.0; n * out_f]).unwrap();
        prop_assert!(y.iter().chain(&g.x).chain(&g.a).chain(&g.b).all(|v| v.is_finite()));
    }
}
