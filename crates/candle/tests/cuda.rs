//! The CUDA side against the CPU side, on a real GPU: `Linear4bit` forward and input gradient
//! (fused GEMV, one tile and several tiles; f32, bf16, f16), `LoraLinear` gradients (LoRA and
//! DoRA over NF4 + double quant), the four optimizers' trajectories and state files (the AdamW
//! kernels are IEEE and bit-exact to `qlora-optim`, as `crates/cuda/tests/gpu.rs` checks, so the
//! parameters and state bytes must be identical), resuming across devices, and the errors for
//! mixed devices.
//!
//! Skips with a message when no GPU (driver, device or NVRTC) is found; fails instead when
//! `QLORA_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use qlora_candle::{
    AdamW32bit, AdamW8bit, Error, Linear4bit, LoraInit, LoraLinear, Mode, PagedAdamW32bit,
    PagedAdamW8bit,
};
use qlora_codec::{QuantType, QuantizeOptions, QuantizedTensor};
use qlora_lora::{AdapterWeights, LoraParams};
use qlora_paged_alloc::{Pool, PoolConfig};

fn gpu() -> Option<Device> {
    let require = std::env::var("QLORA_REQUIRE_GPU").as_deref() == Ok("1");
    let why = match qlora_cuda::probe() {
        qlora_cuda::Availability::Ready { .. } => match Device::new_cuda(0) {
            Ok(d) => return Some(d),
            Err(e) => format!("candle's CUDA device: {e}"),
        },
        other => format!("{other:?}"),
    };
    if require {
        panic!("QLORA_REQUIRE_GPU=1 but no usable GPU: {why}");
    }
    eprintln!("skipping GPU test: {why}");
    None
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

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The unit roundoff of a dtype (half an ulp of 1).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-9),
        DType::F16 => 2f64.powi(-12),
        _ => 2f64.powi(-25),
    }
}

/// `got ≈ a·bᵀ` (`a: [n, k]`, `b: [m, k]`, row-major, f64 sums) within the error of a product
/// whose operands were rounded to `dtype` and accumulated in f32 over `k` terms, output rounded
/// to `dtype`: `Σ|a||b|·(2u + k·ε₃₂) + |ref|·u`.
fn assert_product(what: &str, got: &[f32], a: &[f32], b: &[f32], n: usize, k: usize, dtype: DType) {
    let m = b.len() / k;
    assert_eq!(got.len(), n * m, "{what}: output length");
    let u = unit_roundoff(dtype);
    let mut worst = 0f64;
    for i in 0..n {
        for j in 0..m {
            let (mut r, mut scale) = (0f64, 0f64);
            for t in 0..k {
                let p = a[i * k + t] as f64 * b[j * k + t] as f64;
                r += p;
                scale += p.abs();
            }
            let tol = scale * (2.0 * u + k as f64 * f32::EPSILON as f64) + r.abs() * u + 1e-6;
            let err = (got[i * m + j] as f64 - r).abs();
            worst = worst.max(err / tol);
            assert!(
                err <= tol,
                "{what}: [{i}, {j}] = {} vs {r} (tol {tol:.3e})",
                got[i * m + j]
            );
        }
    }
    eprintln!("{what}: worst error / bound = {worst:.3}");
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

fn linear4bit_case(dev: &Device, out_f: usize, in_f: usize, options: QuantizeOptions) {
    let w = values(
        out_f * in_f,
        (out_f * in_f) as u64,
        1.0 / (in_f as f32).sqrt(),
    );
    let q = QuantizedTensor::quantize(&w, &[out_f, in_f], options).unwrap();
    let cpu = Linear4bit::new(q, None).unwrap();
    let cuda = cpu.to_device(dev).unwrap();
    assert!(cuda.device().is_cuda());
    let wd = host(&cpu.dequantize().unwrap());
    let wd_t = transpose(&wd, out_f, in_f);
    for n in [1usize, 3, 7, 33] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let what = format!("[{out_f}, {in_f}] {options:?} n={n} {dtype:?}");
            let x_host = values(n * in_f, n as u64 + 7, 1.0);
            let x = Tensor::from_vec(x_host, (n, in_f), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x_rounded = host(&x);
            let xv = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
            let y = cuda.forward(xv.as_tensor()).unwrap();
            assert_eq!(y.dims(), &[n, out_f], "{what}");
            assert_eq!(y.dtype(), dtype, "{what}");
            assert!(y.device().is_cuda(), "{what}");
            assert_product(
                &format!("forward {what}"),
                &host(&y),
                &x_rounded,
                &wd,
                n,
                in_f,
                dtype,
            );
            // The CPU layer computes the same product in f32.
            let y_cpu = host(&cpu.forward(&x).unwrap());
            assert_product(
                &format!("cpu forward {what}"),
                &y_cpu,
                &x_rounded,
                &wd,
                n,
                in_f,
                dtype,
            );
            // Input gradient: d(Σ y ⊙ G)/dx = G·deq(W).
            let g = Tensor::from_vec(values(n * out_f, n as u64 + 99, 1.0), (n, out_f), dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g_rounded = host(&g);
            let loss = (&y * &g)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let dx = grads.get(xv.as_tensor()).expect("input gradient");
            assert_eq!(dx.dtype(), dtype, "{what}");
            assert_product(
                &format!("input gradient {what}"),
                &host(dx),
                &g_rounded,
                &wd_t,
                n,
                out_f,
                dtype,
            );
        }
    }
}

#[test]
fn cuda_linear4bit_forward_and_input_gradient_match_the_dequantized_product() {
    let Some(dev) = gpu() else { return };
    let dq = QuantizeOptions::qlora();
    let fp4 = QuantizeOptions {
        quant_type: QuantType::Fp4,
        blocksize: 128,
        double_quant: false,
    };
    // One tile; odd in_features (tiles still start on scale blocks); FP4 without DQ.
    linear4bit_case(&dev, 96, 320, dq);
    linear4bit_case(&dev, 130, 200, dq);
    linear4bit_case(&dev, 70, 256, fp4);
}

#[test]
fn cuda_linear4bit_over_several_tiles() {
    let Some(dev) = gpu() else { return };
    // 4200 × 8192 = 34.4 M elements > the 32 Mi-element tile: two tiles (4096 + 104 rows).
    let (out_f, in_f) = (4200, 8192);
    let w = values(out_f * in_f, 5, 1.0 / (in_f as f32).sqrt());
    let q = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora()).unwrap();
    let cpu = Linear4bit::new(q, None).unwrap();
    let cuda = cpu.to_device(&dev).unwrap();
    let wd = host(&cpu.dequantize().unwrap());
    let n = 9;
    let x_host = values(n * in_f, 3, 1.0);
    let x = Tensor::from_vec(x_host.clone(), (n, in_f), &dev).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = cuda.forward(xv.as_tensor()).unwrap();
    assert_product(
        "forward, two tiles",
        &host(&y),
        &x_host,
        &wd,
        n,
        in_f,
        DType::F32,
    );
    let g_host = values(n * out_f, 4, 1.0);
    let g = Tensor::from_vec(g_host.clone(), (n, out_f), &dev).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = host(grads.get(xv.as_tensor()).unwrap());
    let wd_t = transpose(&wd, out_f, in_f);
    assert_product(
        "input gradient, two tiles",
        &dx,
        &g_host,
        &wd_t,
        n,
        out_f,
        DType::F32,
    );
    // The device holds the codes and scales only: 4.127 bits per weight with NF4 + DQ.
    let bits = 8.0 * cuda.device_bytes() as f64 / (out_f * in_f) as f64;
    assert!(
        (bits - cuda.bits_per_weight()).abs() < 1e-3,
        "{bits} bits per weight"
    );
}

fn lora_grads(layer: &LoraLinear, x: &Tensor, g: &Tensor) -> Vec<Vec<f32>> {
    let xv = Var::from_tensor(x).unwrap();
    let y = layer.forward_mode(xv.as_tensor(), Mode::Eval).unwrap();
    let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![
        host(&y),
        host(grads.get(xv.as_tensor()).unwrap()),
        host(grads.get(layer.a().as_tensor()).unwrap()),
        host(grads.get(layer.b().as_tensor()).unwrap()),
    ];
    if let Some(m) = layer.magnitude() {
        out.push(host(grads.get(m.as_tensor()).unwrap()));
    }
    out
}

#[test]
fn cuda_lora_gradients_match_cpu() {
    let Some(dev) = gpu() else { return };
    let (out_f, in_f, r, n) = (64, 96, 8, 12);
    let w = values(out_f * in_f, 11, 0.1);
    let q = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora()).unwrap();
    let bias = Tensor::from_vec(values(out_f, 12, 0.1), out_f, &Device::Cpu).unwrap();
    let base = Linear4bit::new(q, Some(bias)).unwrap();
    for dora in [false, true] {
        let mut params = LoraParams::new(r, 16.0);
        params.use_dora = dora;
        let weights = AdapterWeights {
            a: values(r * in_f, 13, 0.1),
            b: values(out_f * r, 14, 0.1),
            magnitude: None,
        };
        let cpu = LoraLinear::from_weights(base.clone(), params, weights.clone()).unwrap();
        let cuda =
            LoraLinear::from_weights(base.to_device(&dev).unwrap(), params, weights).unwrap();
        assert!(cuda.a().device().is_cuda() && cuda.b().device().is_cuda());
        let x = Tensor::from_vec(values(n * in_f, 15, 1.0), (n, in_f), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(values(n * out_f, 16, 1.0), (n, out_f), &Device::Cpu).unwrap();
        let want = lora_grads(&cpu, &x, &g);
        let got = lora_grads(
            &cuda,
            &x.to_device(&dev).unwrap(),
            &g.to_device(&dev).unwrap(),
        );
        assert_eq!(got.len(), want.len());
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            let max = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= 2e-5 * max.max(1.0),
                "dora={dora} tensor {k} (y, dX, dA, dB, dm): max diff {diff} (max {max})"
            );
        }
    }
    // A fresh adapter over the CUDA base puts its Vars there too.
    let fresh = LoraLinear::new(
        base.to_device(&dev).unwrap(),
        LoraParams::new(4, 8.0),
        LoraInit::Default { seed: 1 },
    )
    .unwrap();
    assert!(fresh.a().device().is_cuda());
}

/// (shape, dtype) of the optimizer test's variables: 8-bit states, f32 states (small), bf16,
/// and one large enough to be paged (≥ 10⁵ elements).
const VARS: [(&[usize], DType); 4] = [
    (&[64, 128], DType::F32),
    (&[32, 16], DType::F32),
    (&[48, 128], DType::BF16),
    (&[320, 320], DType::F32),
];

fn make_vars(dev: &Device) -> Vec<Var> {
    VARS.iter()
        .enumerate()
        .map(|(i, (shape, dtype))| {
            let n = shape.iter().product();
            let t = Tensor::from_vec(values(n, i as u64 + 1, 1.0), *shape, dev)
                .unwrap()
                .to_dtype(*dtype)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect()
}

fn run<O: Optimizer<Config = ParamsAdamW>>(
    vars: &[Var],
    opt: &mut O,
    steps: std::ops::Range<usize>,
) {
    let dev = vars[0].device().clone();
    for step in steps {
        let mut loss = Tensor::new(0f32, &dev).unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (shape, dtype) = VARS[i];
            let n = shape.iter().product();
            let g = Tensor::from_vec(values(n, 100 * step as u64 + i as u64, 0.5), shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let term = (v.as_tensor() * g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            loss = (loss + term).unwrap();
        }
        opt.backward_step(&loss).unwrap();
    }
}

fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| {
            let t = v.as_tensor().to_device(&Device::Cpu).unwrap();
            match t.dtype() {
                DType::BF16 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
                _ => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            }
        })
        .collect()
}

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 3e-3,
        beta1: 0.85,
        beta2: 0.99,
        eps: 1e-7,
        weight_decay: 0.05,
    }
}

macro_rules! trajectory_case {
    ($dev:expr, $opt:ty, $state:ident) => {{
        let dev: &Device = $dev;
        let name = stringify!($opt);
        let cpu_vars = make_vars(&Device::Cpu);
        let gpu_vars = make_vars(dev);
        let mut cpu = <$opt>::new(cpu_vars.clone(), params()).unwrap();
        let mut gpu = <$opt>::new(gpu_vars.clone(), params()).unwrap();
        assert!(gpu.$state().device().is_cuda(), "{name}");
        for step in 0..4 {
            run(&cpu_vars, &mut cpu, step..step + 1);
            run(&gpu_vars, &mut gpu, step..step + 1);
            assert_eq!(
                bits(&gpu_vars),
                bits(&cpu_vars),
                "{name}: parameters after step {step}"
            );
            assert_eq!(
                gpu.$state().state_to_bytes().unwrap(),
                cpu.$state().state_to_bytes().unwrap(),
                "{name}: state file after step {step}"
            );
        }
        assert_eq!(
            gpu.$state().state_bytes(),
            cpu.$state().state_bytes(),
            "{name}: state bytes"
        );
        // Resume across devices: the CUDA state into a fresh CPU optimizer and back.
        let saved = gpu.$state().state_to_bytes().unwrap();
        let cpu2_vars = make_vars(&Device::Cpu);
        for (a, b) in cpu2_vars.iter().zip(&cpu_vars) {
            a.set(b.as_tensor()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let gpu_file = dir.path().join("gpu.safetensors");
        gpu.$state().save_state(&gpu_file).unwrap();
        assert_eq!(
            std::fs::read(&gpu_file).unwrap(),
            saved,
            "{name}: saved file"
        );
        let mut cpu2 = <$opt>::new(cpu2_vars.clone(), params()).unwrap();
        cpu2.state_mut().load_state(&gpu_file).unwrap();
        let gpu2_vars = make_vars(dev);
        for (a, b) in gpu2_vars.iter().zip(&gpu_vars) {
            a.set(b.as_tensor()).unwrap();
        }
        let mut gpu2 = <$opt>::new(gpu2_vars.clone(), params()).unwrap();
        let cpu_file = dir.path().join("cpu.safetensors");
        cpu.$state().save_state(&cpu_file).unwrap();
        gpu2.state_mut().load_state(&cpu_file).unwrap();
        run(&cpu_vars, &mut cpu, 4..6);
        run(&cpu2_vars, &mut cpu2, 4..6);
        run(&gpu2_vars, &mut gpu2, 4..6);
        assert_eq!(
            bits(&cpu2_vars),
            bits(&cpu_vars),
            "{name}: CPU resumed from CUDA"
        );
        assert_eq!(
            bits(&gpu2_vars),
            bits(&cpu_vars),
            "{name}: CUDA resumed from CPU"
        );
        assert_eq!(
            gpu2.$state().state_to_bytes().unwrap(),
            cpu.$state().state_to_bytes().unwrap(),
            "{name}: resumed state"
        );
    }};
}

#[test]
fn cuda_optimizer_trajectories_equal_cpu() {
    let Some(dev) = gpu() else { return };
    trajectory_case!(&dev, AdamW8bit, state);
    trajectory_case!(&dev, AdamW32bit, state);
    trajectory_case!(&dev, PagedAdamW8bit, state);
    trajectory_case!(&dev, PagedAdamW32bit, state);
}

#[test]
fn cuda_paged_optimizer_takes_a_cuda_pool() {
    let Some(dev) = gpu() else { return };
    let vars = make_vars(&dev);
    let pool = Pool::new(PoolConfig::cuda(0, 64 << 20)).unwrap();
    let mut opt = PagedAdamW8bit::with_pool(vars.clone(), params(), pool.clone()).unwrap();
    run(&vars, &mut opt, 0..2);
    // Only the 320×320 variable is paged: its two 8-bit states.
    assert_eq!(pool.stats().bytes_allocated, 2 * 320 * 320);
    let host_pool = Pool::new(PoolConfig::host(64 << 20)).unwrap();
    let err = PagedAdamW8bit::with_pool(make_vars(&dev), params(), host_pool).unwrap_err();
    assert!(matches!(err, Error::Optimizer(_)), "{err}");
}

#[test]
fn cuda_mixed_devices_are_errors() {
    let Some(dev) = gpu() else { return };
    let w = Tensor::from_vec(values(32 * 64, 1, 0.1), (32, 64), &Device::Cpu).unwrap();
    let cpu = Linear4bit::from_tensor(&w, None, QuantizeOptions::qlora()).unwrap();
    let cuda = cpu.to_device(&dev).unwrap();
    let x_cpu = Tensor::ones((2, 64), DType::F32, &Device::Cpu).unwrap();
    let x_gpu = x_cpu.to_device(&dev).unwrap();
    for (layer, x) in [(&cuda, &x_cpu), (&cpu, &x_gpu)] {
        let err = layer.forward(x).unwrap_err().to_string();
        assert!(err.contains("expected a tensor on"), "{err}");
    }
    let lora = LoraLinear::new(
        cuda.clone(),
        LoraParams::new(4, 8.0),
        LoraInit::Default { seed: 0 },
    )
    .unwrap();
    let err = lora.forward_mode(&x_cpu, Mode::Eval).unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err}");
    // One optimizer, one device.
    let vars = vec![
        Var::from_tensor(&x_cpu).unwrap(),
        Var::from_tensor(&x_gpu).unwrap(),
    ];
    let err = AdamW8bit::new(vars, params()).unwrap_err().to_string();
    assert!(
        err.contains("one optimizer updates the variables of one device"),
        "{err}"
    );
    // A gradient of another dtype than its variable, and one on the CPU.
    let v = Var::from_tensor(&x_gpu).unwrap();
    let mut opt = AdamW32bit::new(vec![v.clone()], params()).unwrap();
    let mut grads = v.as_tensor().sum_all().unwrap().backward().unwrap();
    grads.insert(v.as_tensor(), x_gpu.to_dtype(DType::BF16).unwrap());
    let err = opt.step(&grads).unwrap_err().to_string();
    assert!(err.contains("gradient of variable 0"), "{err}");
    grads.insert(v.as_tensor(), x_cpu.clone());
    let err = opt.step(&grads).unwrap_err().to_string();
    assert!(err.contains("gradient of variable 0"), "{err}");
    // Nothing was updated by the refused steps.
    assert_eq!(host(v.as_tensor()), host(&x_gpu));
    // The CPU layer goes back from the device unchanged.
    let back = cuda.to_device(&Device::Cpu).unwrap();
    assert!(back.device().is_cpu());
    let diff = (back.forward(&x_cpu).unwrap() - cpu.forward(&x_cpu).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}
