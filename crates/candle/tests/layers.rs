//! Linear4bit and LoraLinear in candle against dequantize-then-matmul, finite differences,
//! qlora-lora's own forward/backward, and PEFT + bitsandbytes (testdata/peft).

use candle_core::{DType, Device, Module, Tensor, Var};
use qlora_candle::{Linear4bit, LoraBase, LoraInit, LoraLinear, Mode};
use qlora_codec::{Absmax, DoubleQuantAbsmax, Dtype, QuantType, QuantizeOptions, QuantizedTensor};
use qlora_lora::{AdapterWeights, BaseWeight, DenseData, LoraParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn quantized(out_f: usize, in_f: usize, seed: u64, options: QuantizeOptions) -> QuantizedTensor {
    QuantizedTensor::quantize(&values(out_f * in_f, seed, 0.1), &[out_f, in_f], options).unwrap()
}

#[test]
fn linear4bit_forward_equals_dequantize_then_matmul() {
    for (options, n) in [
        (QuantizeOptions::qlora(), 3),  // fused gemv path
        (QuantizeOptions::qlora(), 37), // tiled path
        (QuantizeOptions::qlora().with_blocksize(128), 300),
        (
            QuantizeOptions {
                quant_type: QuantType::Fp4,
                blocksize: 64,
                double_quant: false,
            },
            9,
        ),
    ] {
        let (out_f, in_f) = (96, 192);
        let bias = values(out_f, 5, 1.0);
        let layer =
            Linear4bit::new(quantized(out_f, in_f, 1, options), Some(t(&bias, &[out_f]))).unwrap();
        let x = t(&values(n * in_f, 2, 1.0), &[n, in_f]);
        let y = layer.forward(&x).unwrap();
        let want = x
            .matmul(&layer.dequantize().unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(&t(&bias, &[out_f]))
            .unwrap();
        let e = rel_err(&vec_of(&y), &vec_of(&want));
        assert!(e < 1e-5, "{options:?}, n = {n}: relative error {e}");
        // A 3-D bf16 input comes back as bf16 [b, s, out].
        let x3 = x
            .reshape((1, n, in_f))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y3 = layer.forward(&x3).unwrap();
        assert_eq!((y3.dims(), y3.dtype()), (&[1, n, out_f][..], DType::BF16));
    }
}

#[test]
fn linear4bit_from_bf16_tensor_keeps_bitsandbytes_codes() {
    let (out_f, in_f) = (64, 128);
    let w: Vec<half::bf16> = values(out_f * in_f, 3, 0.1)
        .iter()
        .map(|&v| half::bf16::from_f32(v))
        .collect();
    let wt = Tensor::from_slice(&w, (out_f, in_f), &Device::Cpu).unwrap();
    let layer = Linear4bit::from_tensor(&wt, None, QuantizeOptions::qlora()).unwrap();
    let want = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora()).unwrap();
    assert_eq!(layer.weight(), &want);
    assert_eq!(layer.weight().dtype(), Dtype::BF16);
    assert!((layer.bits_per_weight() - 4.127).abs() < 0.01);
}

#[test]
fn linear4bit_input_gradient_equals_finite_differences() {
    let (out_f, in_f, n) = (40, 128, 6);
    let layer = Linear4bit::new(quantized(out_f, in_f, 7, QuantizeOptions::qlora()), None).unwrap();
    let xv = values(n * in_f, 8, 1.0);
    let gy = values(n * out_f, 9, 1.0);
    let x = Var::from_slice(&xv, (n, in_f), &Device::Cpu).unwrap();
    let loss = (layer.forward(x.as_tensor()).unwrap() * t(&gy, &[n, out_f]))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let dx = vec_of(grads.get(&x).unwrap());
    // f64 loss of the dequantized weight: L(x) = Σ gy ⊙ (x·Wᵀ).
    let w: Vec<f64> = layer
        .weight()
        .dequantize::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let loss64 = |x: &[f64]| -> f64 {
        let mut l = 0.0;
        for i in 0..n {
            for o in 0..out_f {
                let y: f64 = (0..in_f).map(|k| x[i * in_f + k] * w[o * in_f + k]).sum();
                l += gy[i * out_f + o] as f64 * y;
            }
        }
        l
    };
    let x64: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
    for idx in [0, 1, 77, in_f + 3, n * in_f - 1] {
        let h = 1e-3;
        let (mut xp, mut xm) = (x64.clone(), x64.clone());
        xp[idx] += h;
        xm[idx] -= h;
        let fd = (loss64(&xp) - loss64(&xm)) / (2.0 * h);
        assert!(
            (dx[idx] as f64 - fd).abs() <= 1e-5 * fd.abs().max(1.0),
            "dx[{idx}] = {} vs finite difference {fd}",
            dx[idx]
        );
    }
    // And the whole gradient equals G·deq(W).
    let want = t(&gy, &[n, out_f])
        .matmul(&layer.dequantize().unwrap())
        .unwrap();
    assert!(rel_err(&dx, &vec_of(&want)) < 1e-5);
}

#[test]
fn linear4bit_loads_the_tiny_llama_checkpoint() {
    let file = qlora_checkpoint::MappedFile::open(
        testdata().join("checkpoints/tiny-llama-nf4-dq/model.safetensors"),
    )
    .unwrap();
    let ckpt = file.checkpoint().unwrap();
    let dequant = candle_core::safetensors::load(
        testdata().join("checkpoints/tiny-llama-nf4-dq.dequant.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let module = "model.layers.1.self_attn.q_proj";
    let layer = Linear4bit::from_checkpoint(&ckpt, module).unwrap();
    let want_w = &dequant[&format!("{module}.weight")];
    assert_eq!(
        vec_of(&layer.dequantize().unwrap()),
        vec_of(want_w),
        "dequantized weight differs from bitsandbytes' dequantize_4bit"
    );
    let x = t(&values(5 * 64, 4, 1.0), &[5, 64]);
    let y = layer.forward(&x).unwrap();
    let want = x
        .matmul(&want_w.to_dtype(DType::F32).unwrap().t().unwrap())
        .unwrap();
    assert!(rel_err(&vec_of(&y), &vec_of(&want)) < 1e-5);
    assert!(Linear4bit::from_checkpoint(&ckpt, "model.layers.9.mlp.up_proj").is_err());
}

/// A qlora-lora layer and the same candle layer.
fn pair(
    base: BaseWeight,
    params: LoraParams,
    weights: AdapterWeights,
) -> (qlora_lora::LoraLinear, LoraLinear) {
    let reference =
        qlora_lora::LoraLinear::new(base.clone(), None, params, weights.clone()).unwrap();
    let cbase = LoraBase::from_base_weight(base, None, &Device::Cpu).unwrap();
    let layer = LoraLinear::new(cbase, params, LoraInit::Weights(weights)).unwrap();
    (reference, layer)
}

fn random_weights(r: usize, in_f: usize, out_f: usize, dora: bool, seed: u64) -> AdapterWeights {
    AdapterWeights {
        a: values(r * in_f, seed, 0.2),
        b: values(out_f * r, seed + 1, 0.2),
        magnitude: dora.then(|| {
            values(out_f, seed + 2, 0.5)
                .iter()
                .map(|v| 1.0 + v)
                .collect()
        }),
    }
}

fn candle_grads(layer: &LoraLinear, x: &[f32], gy: &[f32], n: usize, mode: Mode) -> Grads {
    let in_f = x.len() / n;
    let out_f = gy.len() / n;
    let xv = Var::from_slice(x, (n, in_f), &Device::Cpu).unwrap();
    let y = layer.forward_mode(xv.as_tensor(), mode).unwrap();
    let loss = (&y * t(gy, &[n, out_f])).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    Grads {
        y: vec_of(&y),
        x: vec_of(g.get(&xv).unwrap()),
        a: vec_of(g.get(layer.a()).unwrap()),
        b: vec_of(g.get(layer.b()).unwrap()),
        m: layer.magnitude().map(|m| vec_of(g.get(m).unwrap())),
    }
}

struct Grads {
    y: Vec<f32>,
    x: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    m: Option<Vec<f32>>,
}

#[test]
fn lora_gradients_equal_qlora_lora_backward() {
    let (out_f, in_f, r, n) = (72, 128, 8, 11);
    let bases = [
        (
            "nf4+dq",
            BaseWeight::quantized(quantized(out_f, in_f, 11, QuantizeOptions::qlora())).unwrap(),
        ),
        (
            "dense f32",
            BaseWeight::dense(DenseData::F32(values(out_f * in_f, 12, 0.1)), out_f, in_f).unwrap(),
        ),
        (
            "dense bf16",
            BaseWeight::dense(
                DenseData::from_f32(&values(out_f * in_f, 13, 0.1), Dtype::BF16),
                out_f,
                in_f,
            )
            .unwrap(),
        ),
    ];
    for (name, base) in bases {
        for (rslora, dropout, dora) in [
            (false, 0.0, false),
            (true, 0.0, false),
            (false, 0.25, false),
            (false, 0.0, true),
            (false, 0.1, true),
        ] {
            let params = LoraParams {
                use_rslora: rslora,
                dropout,
                use_dora: dora,
                ..LoraParams::new(r, 16.0)
            };
            let weights = random_weights(r, in_f, out_f, dora, 20);
            let (reference, layer) = pair(base.clone(), params, weights);
            let x = values(n * in_f, 30, 1.0);
            let gy = values(n * out_f, 31, 1.0);
            let mode = Mode::Train { seed: 99 };
            let (y, cache) = reference.forward(&x, n, mode).unwrap();
            let g = reference.backward(&x, &cache, &gy).unwrap();
            let c = candle_grads(&layer, &x, &gy, n, mode);
            let case = format!("{name}, rslora {rslora}, dropout {dropout}, dora {dora}");
            // bf16 dense bases: candle multiplies in bf16 where qlora-lora widens to f32.
            let tol = if name == "dense bf16" { 1e-2 } else { 2e-5 };
            for (what, ours, want) in [
                ("y", &c.y, &y),
                ("dx", &c.x, &g.x),
                ("dA", &c.a, &g.a),
                ("dB", &c.b, &g.b),
            ] {
                let e = rel_err(ours, want);
                assert!(e < tol, "{case}: {what} relative error {e}");
            }
            if let (Some(m), Some(want)) = (&c.m, &g.magnitude) {
                let e = rel_err(m, want);
                assert!(e < tol, "{case}: dm relative error {e}");
            }
        }
    }
}

/// f64 forward of LoRA/DoRA over a fixed f64 weight, the DoRA norm given (a constant, as PEFT
/// treats it): the function whose finite differences the gradients must match.
#[allow(clippy::too_many_arguments)]
fn loss64(
    w: &[f64],
    a: &[f64],
    b: &[f64],
    m: Option<&[f64]>,
    norm: &[f64],
    x: &[f64],
    gy: &[f64],
    (n, in_f, out_f, r, s): (usize, usize, usize, usize, f64),
) -> f64 {
    let mut l = 0.0;
    for i in 0..n {
        let xi = &x[i * in_f..(i + 1) * in_f];
        let u: Vec<f64> = (0..r)
            .map(|k| (0..in_f).map(|j| a[k * in_f + j] * xi[j]).sum())
            .collect();
        for o in 0..out_f {
            let xw: f64 = (0..in_f).map(|j| w[o * in_f + j] * xi[j]).sum();
            let lo: f64 = (0..r).map(|k| b[o * r + k] * u[k]).sum();
            let y = match m {
                None => xw + s * lo,
                Some(m) => m[o] / norm[o] * (xw + s * lo),
            };
            l += gy[i * out_f + o] * y;
        }
    }
    l
}

#[test]
fn lora_and_dora_gradients_equal_f64_finite_differences() {
    let (out_f, in_f, r, n) = (24, 64, 4, 5);
    let q = quantized(out_f, in_f, 40, QuantizeOptions::qlora());
    let w: Vec<f64> = q
        .dequantize::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    for dora in [false, true] {
        let params = LoraParams {
            use_dora: dora,
            ..LoraParams::new(r, 8.0)
        };
        let weights = random_weights(r, in_f, out_f, dora, 41);
        let base = Linear4bit::new(q.clone(), None).unwrap();
        let layer = LoraLinear::new(base, params, LoraInit::Weights(weights.clone())).unwrap();
        let x = values(n * in_f, 42, 1.0);
        let gy = values(n * out_f, 43, 1.0);
        let c = candle_grads(&layer, &x, &gy, n, Mode::Eval);
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (a, b, x64, gy64) = (f(&weights.a), f(&weights.b), f(&x), f(&gy));
        let m = weights.magnitude.as_deref().map(f);
        let norm = f(&vec_of(&layer.weight_norm().unwrap()));
        let dims = (n, in_f, out_f, r, params.scaling());
        let h = 1e-4;
        let check = |what: &str, got: f32, lp: f64, lm: f64| {
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (got as f64 - fd).abs() <= 1e-4 * fd.abs().max(1.0),
                "dora {dora}: {what} = {got} vs finite difference {fd}"
            );
        };
        for idx in [0, 5, r * in_f - 1] {
            let (mut ap, mut am) = (a.clone(), a.clone());
            ap[idx] += h;
            am[idx] -= h;
            let lp = loss64(&w, &ap, &b, m.as_deref(), &norm, &x64, &gy64, dims);
            let lm = loss64(&w, &am, &b, m.as_deref(), &norm, &x64, &gy64, dims);
            check(&format!("dA[{idx}]"), c.a[idx], lp, lm);
        }
        for idx in [0, 7, out_f * r - 1] {
            let (mut bp, mut bm) = (b.clone(), b.clone());
            bp[idx] += h;
            bm[idx] -= h;
            let lp = loss64(&w, &a, &bp, m.as_deref(), &norm, &x64, &gy64, dims);
            let lm = loss64(&w, &a, &bm, m.as_deref(), &norm, &x64, &gy64, dims);
            check(&format!("dB[{idx}]"), c.b[idx], lp, lm);
        }
        if let Some(m) = &m {
            for idx in [0, out_f - 1] {
                let (mut mp, mut mm) = (m.clone(), m.clone());
                mp[idx] += h;
                mm[idx] -= h;
                let lp = loss64(&w, &a, &b, Some(&mp), &norm, &x64, &gy64, dims);
                let lm = loss64(&w, &a, &b, Some(&mm), &norm, &x64, &gy64, dims);
                check(&format!("dm[{idx}]"), c.m.as_ref().unwrap()[idx], lp, lm);
            }
        }
    }
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(testdata().join(name), &Device::Cpu).unwrap()
}

fn meta(name: &str) -> HashMap<String, String> {
    let bytes = std::fs::read(testdata().join(name)).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// PEFT 0.21.2 (+ bitsandbytes 0.50.2 for the NF4 base) forward and gradients, within the
/// tolerance of qlora-lora's own PEFT tests (2·10⁻⁶ relative).
fn peft_case(name: &str) {
    let file = format!("peft/layer-{name}.safetensors");
    let (f, md) = (load(&file), meta(&file));
    let params = LoraParams {
        r: md["r"].parse().unwrap(),
        alpha: md["lora_alpha"].parse().unwrap(),
        use_rslora: md["use_rslora"] == "True",
        dropout: 0.0,
        use_dora: md["use_dora"] == "True",
    };
    let bias = Some(f["bias"].clone());
    let base: LoraBase = if name == "nf4" {
        let q = QuantizedTensor::from_parts(
            QuantType::Nf4,
            64,
            Dtype::F32,
            vec![48, 64],
            u8s(&f["W4.packed"]),
            Absmax::Double(DoubleQuantAbsmax {
                codes: u8s(&f["W4.absmax_codes"]),
                nested_absmax: vec_of(&f["W4.nested_absmax"]),
                offset: vec_of(&f["W4.offset"])[0],
            }),
        )
        .unwrap();
        Linear4bit::new(q, bias).unwrap().into()
    } else {
        candle_nn::Linear::new(f["W"].clone(), bias).into()
    };
    let weights = AdapterWeights {
        a: vec_of(&f["A"]),
        b: vec_of(&f["B"]),
        magnitude: params.use_dora.then(|| vec_of(&f["m"])),
    };
    let layer = LoraLinear::new(base, params, LoraInit::Weights(weights)).unwrap();
    let x = vec_of(&f["x"]);
    let n = x.len() / 64;
    let c = candle_grads(&layer, &x, &vec_of(&f["gy"]), n, Mode::Eval);
    let mut errs = vec![
        ("y", rel_err(&c.y, &vec_of(&f["y"]))),
        ("dx", rel_err(&c.x, &vec_of(&f["dx"]))),
        ("dA", rel_err(&c.a, &vec_of(&f["dA"]))),
        ("dB", rel_err(&c.b, &vec_of(&f["dB"]))),
    ];
    if let Some(m) = &c.m {
        errs.push(("dm", rel_err(m, &vec_of(&f["dm"]))));
    }
    eprintln!("layer-{name}: {errs:?}");
    for (what, e) in errs {
        assert!(e < 2e-6, "layer-{name}: {what} relative error {e}");
    }
}

#[test]
fn lora_over_bnb_nf4_matches_peft() {
    peft_case("nf4");
}

#[test]
fn lora_rslora_dora_over_f32_match_peft() {
    for name in ["lora", "rslora", "dora"] {
        peft_case(name);
    }
}

#[test]
fn peft_adapters_load_onto_the_4bit_tiny_llama_and_save_byte_identical() {
    let file = qlora_checkpoint::MappedFile::open(
        testdata().join("checkpoints/tiny-llama-nf4-dq/model.safetensors"),
    )
    .unwrap();
    let ckpt = file.checkpoint().unwrap();
    for name in ["lora", "rslora", "dora"] {
        let dir = testdata().join(format!("peft/adapters/{name}"));
        let adapter = qlora_lora::peft::PeftAdapter::load(&dir).unwrap();
        let mut layers = Vec::new();
        for module in adapter.modules.keys() {
            let base = Linear4bit::from_checkpoint(&ckpt, module).unwrap();
            layers.push((
                module.as_str(),
                LoraLinear::from_peft(base, &adapter, module).unwrap(),
            ));
        }
        let out = tempfile::tempdir().unwrap();
        qlora_candle::save_peft_adapter(
            out.path(),
            adapter.config.clone(),
            layers.iter().map(|(m, l)| (*m, l)),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(out.path().join("adapter_model.safetensors")).unwrap(),
            std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
            "{name}: adapter_model.safetensors differs from PEFT's"
        );
        let again = qlora_lora::peft::PeftAdapter::load(out.path()).unwrap();
        assert_eq!(again.modules, adapter.modules);
    }
}

#[test]
fn merge_gives_the_layer_output() {
    let (out_f, in_f, r, n) = (48, 64, 4, 7);
    let dense = candle_nn::Linear::new(
        t(&values(out_f * in_f, 50, 0.1), &[out_f, in_f]),
        Some(t(&values(out_f, 51, 1.0), &[out_f])),
    );
    for dora in [false, true] {
        let params = LoraParams {
            use_dora: dora,
            ..LoraParams::new(r, 8.0)
        };
        let layer = LoraLinear::new(dense.clone(), params, LoraInit::Random { seed: 3 }).unwrap();
        let merged = layer.merge(qlora_lora::MergeOptions::default()).unwrap();
        let LoraBase::Dense(merged) = merged else {
            panic!("a dense base merges into a dense base")
        };
        let x = t(&values(n * in_f, 52, 1.0), &[n, in_f]);
        let e = rel_err(
            &vec_of(&merged.forward(&x).unwrap()),
            &vec_of(&layer.forward(&x).unwrap()),
        );
        assert!(e < 1e-5, "dora {dora}: merged output relative error {e}");
    }
    // A 4-bit base is re-quantized (PEFT's Linear4bit.merge): close, not equal.
    let q = Linear4bit::new(quantized(out_f, in_f, 53, QuantizeOptions::qlora()), None).unwrap();
    let layer = LoraLinear::new(q, LoraParams::new(r, 8.0), LoraInit::Random { seed: 4 }).unwrap();
    let LoraBase::Quantized(m) = layer.merge(Default::default()).unwrap() else {
        panic!("a 4-bit base merges into a 4-bit base")
    };
    assert!(m.weight().is_double_quant());
    let x = t(&values(n * in_f, 54, 1.0), &[n, in_f]);
    let e = rel_err(
        &vec_of(&m.forward(&x).unwrap()),
        &vec_of(&layer.forward(&x).unwrap()),
    );
    assert!(e < 0.2, "re-quantized merge relative error {e}");
}

#[test]
fn inits_start_where_peft_starts() {
    let (out_f, in_f, r, n) = (48, 64, 4, 5);
    let w = values(out_f * in_f, 60, 0.1);
    let dense = candle_nn::Linear::new(t(&w, &[out_f, in_f]), None);
    let x = t(&values(n * in_f, 61, 1.0), &[n, in_f]);
    let y0 = vec_of(&dense.forward(&x).unwrap());
    let params = LoraParams::new(r, 8.0);
    // B = 0: the layer starts as its base.
    for init in [
        LoraInit::Default { seed: 1 },
        LoraInit::Gaussian { seed: 1 },
    ] {
        let layer = LoraLinear::new(dense.clone(), params, init.clone()).unwrap();
        assert_eq!(vec_of(&layer.forward(&x).unwrap()), y0, "{init:?}");
        assert!(vec_of(layer.a().as_tensor()).iter().any(|&v| v != 0.0));
    }
    // PiSSA / OLoRA: residual + s·B·A = W, so the output is unchanged up to f32 rounding.
    for init in [LoraInit::Pissa, LoraInit::Olora] {
        let layer = LoraLinear::new(dense.clone(), params, init.clone()).unwrap();
        let e = rel_err(&vec_of(&layer.forward(&x).unwrap()), &y0);
        assert!(e < 1e-4, "{init:?}: relative error {e}");
    }
    // LoftQ: the base becomes 4-bit, and closer to W than plain NF4 with the adapter added.
    let loftq = LoraLinear::new(
        dense.clone(),
        params,
        LoraInit::Loftq(qlora_lora::init::LoftqOptions::default()),
    )
    .unwrap();
    assert!(matches!(loftq.base(), LoraBase::Quantized(_)));
    let plain =
        Linear4bit::from_tensor(&t(&w, &[out_f, in_f]), None, QuantizeOptions::qlora()).unwrap();
    let e_loftq = rel_err(&vec_of(&loftq.forward(&x).unwrap()), &y0);
    let e_plain = rel_err(&vec_of(&plain.forward(&x).unwrap()), &y0);
    assert!(e_loftq < e_plain, "LoftQ {e_loftq} vs plain NF4 {e_plain}");
    // DoRA starts equal to LoRA (magnitude = row norms).
    let dora = LoraParams {
        use_dora: true,
        ..params
    };
    let a = LoraLinear::new(dense.clone(), dora, LoraInit::Random { seed: 2 }).unwrap();
    let b = LoraLinear::new(dense.clone(), params, LoraInit::Random { seed: 2 }).unwrap();
    let e = rel_err(
        &vec_of(&a.forward(&x).unwrap()),
        &vec_of(&b.forward(&x).unwrap()),
    );
    assert!(e < 1e-5, "DoRA at init vs LoRA: {e}");
}

#[test]
fn training_mode_draws_a_new_dropout_mask_each_call() {
    let (out_f, in_f, r, n) = (16, 64, 4, 3);
    let dense = candle_nn::Linear::new(t(&values(out_f * in_f, 70, 0.1), &[out_f, in_f]), None);
    let params = LoraParams {
        dropout: 0.5,
        ..LoraParams::new(r, 8.0)
    };
    let layer = LoraLinear::new(dense, params, LoraInit::Random { seed: 5 }).unwrap();
    let x = t(&values(n * in_f, 71, 1.0), &[n, in_f]);
    let eval = vec_of(&layer.forward(&x).unwrap());
    layer.set_training(true);
    layer.set_seed(10);
    let t1 = vec_of(&layer.forward(&x).unwrap());
    let t2 = vec_of(&layer.forward(&x).unwrap());
    assert_ne!(t1, eval);
    assert_ne!(t1, t2);
    assert_eq!(
        t1,
        vec_of(&layer.forward_mode(&x, Mode::Train { seed: 10 }).unwrap())
    );
    assert_eq!(
        t2,
        vec_of(&layer.forward_mode(&x, Mode::Train { seed: 11 }).unwrap())
    );
}
