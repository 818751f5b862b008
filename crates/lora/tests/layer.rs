//! Forward/backward of the LoRA layer against an f64 reference and its finite differences, and
//! the 4-bit paths (tiled and fused) against the same math on a dense copy of the weight.

use half::bf16;
use qlora_lora::init::init_random;
use qlora_lora::layer::dropout_keeps;
use qlora_lora::{
    AdapterWeights, BaseWeight, DenseData, Error, LoraLinear, LoraParams, Mode, QuantizeOptions,
    QuantizedTensor,
};

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

/// Everything the f64 reference needs.
struct Case {
    n: usize,
    out_f: usize,
    in_f: usize,
    r: usize,
    s: f64,
    w: Vec<f64>, // logical [out, in]
    bias: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    m: Option<Vec<f64>>,
    /// DoRA norm, held constant (PEFT detaches it).
    norm: Option<Vec<f64>>,
    mask: Option<Vec<f64>>, // per element of x: 0 or 1/(1-p)
}

impl Case {
    fn loss(&self, x: &[f64], a: &[f64], b: &[f64], m: Option<&[f64]>, g: &[f64]) -> f64 {
        let (n, o, i, r) = (self.n, self.out_f, self.in_f, self.r);
        let xd: Vec<f64> = match &self.mask {
            Some(mk) => x.iter().zip(mk).map(|(x, k)| x * k).collect(),
            None => x.to_vec(),
        };
        let mut loss = 0.0;
        for t in 0..n {
            let u: Vec<f64> = (0..r)
                .map(|k| (0..i).map(|c| xd[t * i + c] * a[k * i + c]).sum())
                .collect();
            for j in 0..o {
                let base: f64 = (0..i).map(|c| x[t * i + c] * self.w[j * i + c]).sum();
                let based: f64 = (0..i).map(|c| xd[t * i + c] * self.w[j * i + c]).sum();
                let l: f64 = (0..r).map(|k| u[k] * b[j * r + k]).sum::<f64>() * self.s;
                let y = match (m, &self.norm) {
                    (Some(m), Some(nrm)) => {
                        let c = m[j] / nrm[j];
                        base + (c - 1.0) * based + c * l
                    }
                    _ => base + l,
                } + self.bias[j];
                loss += y * g[t * o + j];
            }
        }
        loss
    }
}

fn fd(f: impl Fn(&[f64]) -> f64, p: &[f64]) -> Vec<f64> {
    let mut q = p.to_vec();
    (0..p.len())
        .map(|k| {
            let h = 1e-6 * (1.0 + p[k].abs());
            q[k] = p[k] + h;
            let up = f(&q);
            q[k] = p[k] - h;
            let dn = f(&q);
            q[k] = p[k];
            (up - dn) / (2.0 * h)
        })
        .collect()
}

fn close(what: &str, ours: &[f32], want: &[f64], tol: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let err = ours
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()))
        / scale;
    assert!(err < tol, "{what}: relative error {err} (tolerance {tol})");
}

fn check_gradients(base: BaseWeight, dora: bool, dropout: f32, n: usize) {
    let (out_f, in_f, r) = (base.out_features(), base.in_features(), 4);
    let params = LoraParams {
        r,
        alpha: 6.0,
        use_rslora: false,
        dropout,
        use_dora: dora,
    };
    let mut weights = init_random(r, in_f, out_f, 3);
    let bias = values(out_f, 9, 0.5);
    if dora {
        weights.magnitude = Some(vec![0.0; out_f]);
    }
    let mut layer = LoraLinear::new(base, Some(bias.clone()), params, weights).unwrap();
    if dora {
        layer.init_dora_magnitude().unwrap();
        let m: Vec<f32> = layer.weights().magnitude.clone().unwrap();
        let jitter = values(out_f, 11, 0.3);
        layer.weights_mut().magnitude =
            Some(m.iter().zip(&jitter).map(|(m, j)| m * (1.0 + j)).collect());
    }
    let x = values(n * in_f, 5, 1.0);
    let g = values(n * out_f, 6, 1.0);
    let seed = 42;
    let mode = if dropout > 0.0 {
        Mode::Train { seed }
    } else {
        Mode::Eval
    };
    let (_, cache) = layer.forward(&x, n, mode).unwrap();
    let grads = layer.backward(&x, &cache, &g).unwrap();

    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let w = to64(&layer.base().to_f32().unwrap());
    let wts = layer.weights().clone();
    let case = Case {
        n,
        out_f,
        in_f,
        r,
        s: params.scaling() as f32 as f64,
        w,
        bias: to64(&bias),
        a: to64(&wts.a),
        b: to64(&wts.b),
        m: wts.magnitude.as_deref().map(to64),
        norm: dora.then(|| to64(&layer.weight_norm().unwrap())),
        mask: (dropout > 0.0).then(|| {
            (0..n * in_f)
                .map(|i| {
                    if dropout_keeps(seed, i, dropout) {
                        1.0 / (1.0 - dropout as f64)
                    } else {
                        0.0
                    }
                })
                .collect()
        }),
    };
    let (x64, g64) = (to64(&x), to64(&g));
    let m64 = case.m.clone();
    let dx = fd(
        |p| case.loss(p, &case.a, &case.b, m64.as_deref(), &g64),
        &x64,
    );
    let da = fd(
        |p| case.loss(&x64, p, &case.b, m64.as_deref(), &g64),
        &case.a,
    );
    let db = fd(
        |p| case.loss(&x64, &case.a, p, m64.as_deref(), &g64),
        &case.b,
    );
    let tag = format!("dora={dora} p={dropout} n={n}");
    close(&format!("dX {tag}"), &grads.x, &dx, 1e-4);
    close(&format!("dA {tag}"), &grads.a, &da, 1e-4);
    close(&format!("dB {tag}"), &grads.b, &db, 1e-4);
    if let Some(m) = &m64 {
        let dm = fd(|p| case.loss(&x64, &case.a, &case.b, Some(p), &g64), m);
        close(
            &format!("dm {tag}"),
            grads.magnitude.as_ref().unwrap(),
            &dm,
            1e-4,
        );
    }
}

fn dense(out_f: usize, in_f: usize) -> BaseWeight {
    BaseWeight::dense(DenseData::F32(values(out_f * in_f, 1, 0.2)), out_f, in_f).unwrap()
}

fn nf4(out_f: usize, in_f: usize, opts: QuantizeOptions) -> BaseWeight {
    let q = QuantizedTensor::quantize(&values(out_f * in_f, 1, 0.2), &[out_f, in_f], opts).unwrap();
    BaseWeight::quantized(q).unwrap()
}

#[test]
fn gradients_match_finite_differences_dense() {
    check_gradients(dense(12, 16), false, 0.0, 3);
    check_gradients(dense(12, 16), false, 0.3, 7);
}

#[test]
fn gradients_match_finite_differences_dora() {
    check_gradients(dense(12, 16), true, 0.0, 3);
    check_gradients(dense(12, 16), true, 0.25, 6);
}

#[test]
fn gradients_match_finite_differences_4bit() {
    check_gradients(nf4(12, 64, QuantizeOptions::qlora()), false, 0.2, 5);
    check_gradients(nf4(12, 64, QuantizeOptions::qlora()), true, 0.0, 2);
}

#[test]
fn gradients_match_finite_differences_fan_in_fan_out() {
    let w = values(16 * 12, 1, 0.2);
    let base = BaseWeight::dense_fan_in_fan_out(DenseData::F32(w), 12, 16).unwrap();
    check_gradients(base, false, 0.1, 6);
}

/// A 4-bit base must give the same results as a dense f32 base holding its dequantized values,
/// on both the fused decode path (few tokens) and the tiled path (several tiles).
#[test]
fn four_bit_paths_equal_dense_math() {
    // 2100 × 512 → tiles of 1024 rows: three tiles.
    for (out_f, in_f, opts) in [
        (2100usize, 512usize, QuantizeOptions::qlora()),
        (96, 200, QuantizeOptions::qlora()), // rows do not start on block boundaries
        (64, 128, QuantizeOptions::qlora().with_blocksize(128)),
    ] {
        for dtype in ["f32", "bf16"] {
            let w = values(out_f * in_f, 1, 0.2);
            let q = if dtype == "f32" {
                QuantizedTensor::quantize(&w, &[out_f, in_f], opts).unwrap()
            } else {
                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                QuantizedTensor::quantize(&wb, &[out_f, in_f], opts).unwrap()
            };
            let q4 = BaseWeight::quantized(q).unwrap();
            let deq = q4.to_f32().unwrap();
            if dtype == "bf16" {
                assert!(deq.iter().all(|v| bf16::from_f32(*v).to_f32() == *v));
            }
            let d = BaseWeight::dense(DenseData::F32(deq), out_f, in_f).unwrap();
            let params = LoraParams::new(8, 16.0);
            let ad = init_random(8, in_f, out_f, 4);
            let l4 = LoraLinear::new(q4, None, params, ad.clone()).unwrap();
            let ld = LoraLinear::new(d, None, params, ad).unwrap();
            for n in [1usize, 3, 9] {
                let x = values(n * in_f, 2, 1.0);
                let g = values(n * out_f, 3, 1.0);
                let (y4, c4) = l4.forward(&x, n, Mode::Eval).unwrap();
                let (yd, cd) = ld.forward(&x, n, Mode::Eval).unwrap();
                let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                close(
                    &format!("y {out_f}x{in_f} {dtype} n={n}"),
                    &y4,
                    &to64(&yd),
                    1e-5,
                );
                let g4 = l4.backward(&x, &c4, &g).unwrap();
                let gd = ld.backward(&x, &cd, &g).unwrap();
                close("dx", &g4.x, &to64(&gd.x), 1e-5);
                close("dA", &g4.a, &to64(&gd.a), 1e-5);
                close("dB", &g4.b, &to64(&gd.b), 1e-5);
            }
        }
    }
}

#[test]
fn bf16_dense_base_uses_its_rounded_values() {
    let (out_f, in_f) = (40, 24);
    let w = values(out_f * in_f, 1, 0.2);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
    let params = LoraParams::new(4, 8.0);
    let ad = init_random(4, in_f, out_f, 4);
    let lb = LoraLinear::new(
        BaseWeight::dense(DenseData::Bf16(wb), out_f, in_f).unwrap(),
        None,
        params,
        ad.clone(),
    )
    .unwrap();
    let lf = LoraLinear::new(
        BaseWeight::dense(DenseData::F32(wr), out_f, in_f).unwrap(),
        None,
        params,
        ad,
    )
    .unwrap();
    for n in [1, 6] {
        let x = values(n * in_f, 2, 1.0);
        let (yb, _) = lb.forward(&x, n, Mode::Eval).unwrap();
        let (yf, _) = lf.forward(&x, n, Mode::Eval).unwrap();
        close(
            "bf16 vs f32",
            &yb,
            &yf.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            1e-6,
        );
    }
}

#[test]
fn dropout_mask_is_reproducible_and_has_the_right_rate() {
    let p = 0.3;
    let kept = (0..100_000).filter(|&i| dropout_keeps(7, i, p)).count();
    assert!((kept as f64 / 1e5 - 0.7).abs() < 0.01, "{kept}");
    let a: Vec<bool> = (0..1000).map(|i| dropout_keeps(7, i, p)).collect();
    let b: Vec<bool> = (0..1000).map(|i| dropout_keeps(7, i, p)).collect();
    let c: Vec<bool> = (0..1000).map(|i| dropout_keeps(8, i, p)).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // eval mode ignores dropout; train mode with the same seed gives the same output
    let params = LoraParams {
        dropout: p,
        ..LoraParams::new(4, 8.0)
    };
    let layer = LoraLinear::new(dense(8, 16), None, params, init_random(4, 16, 8, 1)).unwrap();
    let x = values(3 * 16, 2, 1.0);
    let y1 = layer.forward(&x, 3, Mode::Train { seed: 5 }).unwrap().0;
    let y2 = layer.forward(&x, 3, Mode::Train { seed: 5 }).unwrap().0;
    let y3 = layer.forward(&x, 3, Mode::Train { seed: 6 }).unwrap().0;
    let ye = layer.forward(&x, 3, Mode::Eval).unwrap().0;
    assert_eq!(y1, y2);
    assert_ne!(y1, y3);
    assert_ne!(y1, ye);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let params = LoraParams::new(4, 8.0);
    let ad = init_random(4, 16, 8, 1);
    let layer = LoraLinear::new(dense(8, 16), None, params, ad.clone()).unwrap();
    assert!(matches!(
        layer.forward(&[0.0; 15], 1, Mode::Eval),
        Err(Error::Shape { .. })
    ));
    let mut x = vec![0.5f32; 32];
    x[17] = f32::NAN;
    match layer.forward(&x, 2, Mode::Eval) {
        Err(Error::NonFinite { index, .. }) => assert_eq!(index, 17),
        other => panic!("{other:?}"),
    }
    let (_, cache) = layer.forward(&[0.1; 32], 2, Mode::Eval).unwrap();
    assert!(matches!(
        layer.backward(&[0.1; 32], &cache, &[0.0; 15]),
        Err(Error::Shape { .. })
    ));
    let bad_a = AdapterWeights {
        a: vec![0.0; 63],
        ..ad.clone()
    };
    assert!(matches!(
        LoraLinear::new(dense(8, 16), None, params, bad_a),
        Err(Error::Shape { .. })
    ));
    for bad in [
        LoraParams { r: 0, ..params },
        LoraParams {
            dropout: 1.0,
            ..params
        },
        LoraParams {
            alpha: f64::NAN,
            ..params
        },
    ] {
        assert!(matches!(
            LoraLinear::new(dense(8, 16), None, bad, ad.clone()),
            Err(Error::InvalidOption { .. })
        ));
    }
    let dora = LoraParams {
        use_dora: true,
        ..params
    };
    assert!(matches!(
        LoraLinear::new(dense(8, 16), None, dora, ad.clone()),
        Err(Error::InvalidOption { .. })
    ));
}
