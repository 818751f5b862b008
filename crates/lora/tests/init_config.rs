//! Initializations (default, gaussian, PiSSA, OLoRA, LoftQ) and adapter_config.json handling.

use qlora_lora::init::{
    init_default, init_gaussian, init_loftq, init_olora, init_pissa, LoftqOptions,
};
use qlora_lora::peft::{AdapterConfig, InitLoraWeights, PeftAdapter, TargetModules};
use qlora_lora::{delta_weight, AdapterWeights, Error, LoraParams};
use std::path::Path;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[test]
fn default_and_gaussian_follow_peft() {
    let w = init_default(16, 400, 30, 1);
    assert!(w.b.iter().all(|&v| v == 0.0));
    let max = w.a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max <= 0.05 && max > 0.049, "bound 1/√400: {max}");
    let g = init_gaussian(16, 400, 30, 1);
    let std = (g.a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / g.a.len() as f64).sqrt();
    assert!((std - 1.0 / 16.0).abs() < 0.003, "std {std}");
    assert_eq!(init_default(16, 400, 30, 1), w, "deterministic in the seed");
}

fn residual_identity(
    w: &[f32],
    res: &[f32],
    ad: &AdapterWeights,
    p: &LoraParams,
    o: usize,
    i: usize,
) -> f32 {
    let d = delta_weight(p, ad, o, i);
    w.iter()
        .zip(res)
        .zip(&d)
        .fold(0.0f32, |m, ((w, r), d)| m.max((w - r - d).abs()))
}

#[test]
fn pissa_and_olora_keep_w_equal_residual_plus_delta() {
    let (o, i) = (48, 80);
    let w = values(o * i, 1, 1.0);
    for p in [
        LoraParams::new(8, 16.0),
        LoraParams {
            use_rslora: true,
            ..LoraParams::new(8, 3.0)
        },
    ] {
        let pissa = init_pissa(&w, o, i, &p).unwrap();
        assert!(residual_identity(&w, &pissa.residual, &pissa.weights, &p, o, i) < 1e-5);
        // the residual has the top-8 singular part removed: smaller norm than W
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(n(&pissa.residual) < n(&w));
        let olora = init_olora(&w, o, i, &p).unwrap();
        assert!(residual_identity(&w, &olora.residual, &olora.weights, &p, o, i) < 1e-5);
        // B = Q[:, :r] has orthonormal columns
        let r = p.r;
        for a in 0..r {
            for b in 0..r {
                let dot: f32 = (0..o)
                    .map(|k| olora.weights.b[k * r + a] * olora.weights.b[k * r + b])
                    .sum();
                assert!((dot - if a == b { 1.0 } else { 0.0 }).abs() < 1e-4);
            }
        }
    }
    assert!(matches!(
        init_pissa(&w, o, i, &LoraParams::new(49, 1.0)),
        Err(Error::InvalidOption { .. })
    ));
    let mut bad = w.clone();
    bad[3] = f32::INFINITY;
    assert!(matches!(
        init_olora(&bad, o, i, &LoraParams::new(4, 1.0)),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn loftq_reduces_the_quantization_error_and_scaling_matters() {
    let (o, i) = (128, 256);
    // low rank + noise, so that a rank-8 correction can remove a visible part of the error
    let w: Vec<f32> = values(o * i, 1, 0.02)
        .iter()
        .enumerate()
        .map(|(k, v)| v + 0.05 * ((k / i) as f32 * 0.3).sin() * ((k % i) as f32 * 0.05).cos())
        .collect();
    let p = LoraParams::new(8, 32.0); // s = 4
    let ours1 = init_loftq(&w, o, i, &p, LoftqOptions::default()).unwrap();
    let ours5 = init_loftq(
        &w,
        o,
        i,
        &p,
        LoftqOptions {
            iterations: 5,
            ..Default::default()
        },
    )
    .unwrap();
    let peft = init_loftq(
        &w,
        o,
        i,
        &p,
        LoftqOptions {
            compensate_scaling: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ours1.error_reduction() > 0.0, "{}", ours1.error_reduction());
    assert!(ours5.error_loftq <= ours1.error_loftq * 1.001);
    // PEFT's unscaled factors overshoot by s: worse than not correcting at all when s = 4
    assert!(peft.error_loftq > ours1.error_loftq);
    // with s = 1 both agree
    let p1 = LoraParams::new(8, 8.0);
    let a = init_loftq(&w, o, i, &p1, LoftqOptions::default()).unwrap();
    let b = init_loftq(
        &w,
        o,
        i,
        &p1,
        LoftqOptions {
            compensate_scaling: false,
            ..Default::default()
        },
    )
    .unwrap();
    // Same quantized base and, up to the run-to-run summation order of the multi-threaded SVD and
    // norms (rayon), the same low-rank correction and errors. (The factors themselves are only
    // defined up to the sign of each singular pair, so compare their product.)
    assert_eq!(a.base, b.base);
    let (da, db) = (
        delta_weight(&p1, &a.weights, o, i),
        delta_weight(&p1, &b.weights, o, i),
    );
    let scale = da.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (x, y) in da.iter().zip(&db) {
        assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y} (scale {scale})");
    }
    assert!((a.error_quantized - b.error_quantized).abs() <= 1e-9 * a.error_quantized);
    assert!((a.error_loftq - b.error_loftq).abs() <= 1e-5 * a.error_loftq);
    assert!(matches!(
        init_loftq(
            &w,
            o,
            i,
            &p,
            LoftqOptions {
                iterations: 0,
                ..Default::default()
            }
        ),
        Err(Error::InvalidOption { .. })
    ));
}

#[test]
fn config_keeps_unknown_fields_and_matches_targets() {
    let text = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8.5, "target_modules": ".*\\.(q|v)_proj",
        "some_future_field": {"x": [1, 2]}, "use_rslora": true, "init_lora_weights": "pissa"}"#;
    let cfg = AdapterConfig::from_json(text, Path::new("mem")).unwrap();
    assert_eq!(cfg.extra["some_future_field"]["x"][1], 2);
    assert_eq!(
        cfg.init_lora_weights,
        InitLoraWeights::Method("pissa".into())
    );
    assert!(cfg.targets("model.layers.3.self_attn.q_proj"));
    assert!(!cfg.targets("model.layers.3.self_attn.k_proj"));
    assert_eq!(cfg.params_for("x.q_proj").scaling(), 8.5 / 2.0);
    let back = AdapterConfig::from_json(&cfg.to_json().unwrap(), Path::new("mem")).unwrap();
    assert_eq!(
        back.extra["some_future_field"],
        cfg.extra["some_future_field"]
    );
    assert_eq!(back.extra["inference_mode"], true);

    let mut cfg = AdapterConfig::new(8, 16.0, TargetModules::List(vec!["q_proj".into()]));
    cfg.layers_to_transform = Some(qlora_lora::peft::LayersToTransform::Many(vec![1]));
    cfg.layers_pattern = Some(serde_json::json!("layers"));
    assert!(cfg.targets("model.layers.1.self_attn.q_proj"));
    assert!(!cfg.targets("model.layers.0.self_attn.q_proj"));
    let all = AdapterConfig::new(8, 16.0, TargetModules::Pattern("all-linear".into()));
    assert!(all.targets("model.layers.0.mlp.up_proj") && !all.targets("lm_head"));
}

#[test]
fn malformed_configs_and_adapters_are_typed_errors() {
    for (text, what) in [
        ("{not json", "json"),
        (r#"{"peft_type": "IA3"}"#, "peft_type"),
        (r#"{"r": 0}"#, "r"),
        (r#"{"lora_dropout": 1.5}"#, "lora_dropout"),
        (r#"{"target_modules": "(unclosed"}"#, "target_modules"),
        (r#"{"lora_alpha": "big"}"#, "lora_alpha"),
        (r#"{"lora_bias": true}"#, "lora_bias"),
    ] {
        match AdapterConfig::from_json(text, Path::new("cfg.json")) {
            Err(Error::Config { message, .. }) => {
                assert!(message.contains(what) || what == "json", "{message}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // a folder with a config but a truncated weights file
    let dir = tempfile::tempdir().unwrap();
    let cfg = AdapterConfig::new(4, 8.0, TargetModules::List(vec!["q".into()]));
    std::fs::write(
        dir.path().join("adapter_config.json"),
        cfg.to_json().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        b"\x10\x00\x00",
    )
    .unwrap();
    assert!(matches!(
        PeftAdapter::load(dir.path()),
        Err(Error::Safetensors { .. })
    ));
    // a rank that does not fit the config
    let mut ad = PeftAdapter {
        config: AdapterConfig {
            r: 3,
            ..cfg.clone()
        },
        modules: Default::default(),
        other_tensors: Default::default(),
    };
    ad.modules.insert(
        "m.q".into(),
        AdapterWeights {
            a: vec![0.0; 3 * 5],
            b: vec![0.0; 2 * 3],
            magnitude: None,
        },
    );
    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        ad.to_safetensors().unwrap(),
    )
    .unwrap();
    match PeftAdapter::load(dir.path()) {
        Err(Error::Module { module, .. }) => assert_eq!(module, "m.q"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        PeftAdapter::load(Path::new("/nonexistent/adapter")),
        Err(Error::Io { .. })
    ));
}
