//! GPU speed and memory of the QLoRA layers against dense bf16 ones, measured in the same run
//! (issue #14's GPU targets; H200, bf16, LoRA r 16 over a 28672×8192 base):
//!
//! 1. forward + backward (`dX`, `dA`, `dB`) at 4096 tokens: `LoraLinear` over `Linear4bit`
//!    (NF4 + double quant) vs over a dense bf16 `candle_nn::Linear` — target ≤ 1.1×;
//! 2. 1-token forward: `Linear4bit` (fused 4-bit GEMV) vs the dense bf16 `Linear` — target < 1×;
//! 3. one `AdamW8bit` step on 2^28 f32 parameters vs a device-to-device copy of them — target
//!    copy time / step time ≥ 0.5;
//! 4. peak device memory of one training step (forward, backward, `AdamW8bit` step on `A`, `B`)
//!    for both layers, from the default memory pool's high-water mark.
//!
//! ```sh
//! bash scripts/build-candle-cuda.sh run --release -p qlora-candle --features cuda \
//!     --example cuda_bench            # the issue's shapes
//! … --example cuda_bench -- --quick   # 4096×1024, 512 tokens, 2^24 parameters: a smoke run
//! ```
//!
//! Times are medians over repetitions, each bracketed by a device synchronization.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use qlora_candle::{AdamW8bit, Linear4bit, LoraInit, LoraLinear};
use qlora_codec::{QuantizeOptions, QuantizedTensor};
use qlora_lora::LoraParams;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Shape {
    out_f: usize,
    in_f: usize,
    tokens: usize,
    adam_params: usize,
    reps: usize,
}

fn median_ms(dev: &Device, reps: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?; // warm-up (kernel loading, cuBLAS heuristics, pool growth)
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        dev.synchronize()?;
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The device's default memory pool (where cudarc's stream-ordered allocations come from).
struct MemPool(sys::CUmemoryPool);

impl MemPool {
    fn new(ordinal: i32) -> Res<Self> {
        let mut dev: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver queries with valid out pointers; candle created the context.
        unsafe {
            sys::cuDeviceGet(&mut dev, ordinal).result()?;
            sys::cuDeviceGetDefaultMemPool(&mut pool, dev).result()?;
        }
        Ok(MemPool(pool))
    }

    fn attr(&self, a: sys::CUmemPool_attribute) -> Res<u64> {
        let mut v: u64 = 0;
        // SAFETY: the used/reserved attributes are cuuint64_t; `v` is a valid out pointer.
        unsafe { sys::cuMemPoolGetAttribute(self.0, a, (&mut v as *mut u64).cast()).result()? };
        Ok(v)
    }

    /// Bytes in use now.
    fn used(&self) -> Res<u64> {
        self.attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The high-water mark of bytes in use since the last reset.
    fn peak(&self) -> Res<u64> {
        self.attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    fn reset_peak(&self) -> Res<()> {
        let mut zero: u64 = 0;
        // SAFETY: resetting the high-water mark takes a cuuint64_t 0 by pointer.
        unsafe {
            sys::cuMemPoolSetAttribute(
                self.0,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
            .result()?
        };
        Ok(())
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn main() -> Res<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Shape {
            out_f: 4096,
            in_f: 1024,
            tokens: 512,
            adam_params: 1 << 24,
            reps: 5,
        }
    } else {
        Shape {
            out_f: 28672,
            in_f: 8192,
            tokens: 4096,
            adam_params: 1 << 28,
            reps: 10,
        }
    };
    let dev = Device::new_cuda(0)?;
    let pool = MemPool::new(0)?;
    let (out_f, in_f, n) = (s.out_f, s.in_f, s.tokens);
    println!("# qlora-candle CUDA benchmark: base {out_f}×{in_f}, LoRA r 16, bf16, {n} tokens");

    // The same weights for both layers: quantized on the host, dense bf16 on the device.
    let w = Tensor::randn(0f32, 0.02, (out_f, in_f), &dev)?;
    let w_host: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let q = QuantizedTensor::quantize(&w_host, &[out_f, in_f], QuantizeOptions::qlora())?;
    drop(w_host);
    let base4 = Linear4bit::new(q, None)?.to_device(&dev)?;
    let dense_w = w.to_dtype(DType::BF16)?;
    drop(w);
    let dense = candle_nn::Linear::new(dense_w.clone(), None);
    let params = LoraParams::new(16, 32.0);
    let lora4 = LoraLinear::new(base4.clone(), params, LoraInit::Gaussian { seed: 1 })?;
    let lora_dense = LoraLinear::new(dense.clone(), params, LoraInit::Gaussian { seed: 1 })?;

    // 1. forward + backward at `n` tokens.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, in_f), &dev)?.to_dtype(DType::BF16)?)?;
    let g = Tensor::randn(0f32, 1.0, (n, out_f), &dev)?.to_dtype(DType::BF16)?;
    let step = |layer: &LoraLinear| -> Res<()> {
        let y = layer.forward(x.as_tensor())?;
        let loss = (y * &g)?.to_dtype(DType::F32)?.sum_all()?;
        let grads = loss.backward()?;
        assert!(grads.get(layer.a().as_tensor()).is_some());
        Ok(())
    };
    let t4 = median_ms(&dev, s.reps, || step(&lora4))?;
    let td = median_ms(&dev, s.reps, || step(&lora_dense))?;
    println!();
    println!("| measurement | NF4 + DQ | dense bf16 | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| LoRA r16 forward + backward, {n} tokens | {t4:.3} ms | {td:.3} ms | {:.3} | ≤ 1.1 |",
        t4 / td
    );

    // 2. one-token forward of the plain layers.
    let x1 = Tensor::randn(0f32, 1.0, (1, in_f), &dev)?.to_dtype(DType::BF16)?;
    let inner = 100;
    let f4 = median_ms(&dev, s.reps, || {
        for _ in 0..inner {
            base4.forward(&x1)?;
        }
        Ok(())
    })? / inner as f64;
    let fd = median_ms(&dev, s.reps, || {
        for _ in 0..inner {
            dense.forward(&x1)?;
        }
        Ok(())
    })? / inner as f64;
    println!(
        "| 1-token forward (Linear4bit vs Linear) | {f4:.4} ms | {fd:.4} ms | {:.3} | < 1 |",
        f4 / fd
    );

    // 3. peak device memory of a training step (forward, backward, AdamW8bit on A and B).
    let adam = ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut peaks = Vec::new();
    for layer in [&lora4, &lora_dense] {
        let mut opt = AdamW8bit::new(layer.vars(), adam.clone())?;
        let train = |opt: &mut AdamW8bit| -> Res<()> {
            let y = layer.forward(x.as_tensor())?;
            let loss = (y * &g)?.to_dtype(DType::F32)?.sum_all()?;
            opt.backward_step(&loss)?;
            Ok(())
        };
        train(&mut opt)?; // states allocated
        dev.synchronize()?;
        let before = pool.used()?;
        pool.reset_peak()?;
        train(&mut opt)?;
        dev.synchronize()?;
        peaks.push((pool.peak()?.saturating_sub(before), before));
    }
    println!(
        "| peak device memory of a training step above what was live | {:.0} MiB | {:.0} MiB | {:.3} | |",
        mib(peaks[0].0),
        mib(peaks[1].0),
        peaks[0].0 as f64 / peaks[1].0.max(1) as f64
    );
    let w4 = base4.device_bytes() as u64;
    let wd = (dense_w.elem_count() * 2) as u64;
    println!(
        "| base weight on the device | {:.1} MiB ({:.3} bits/weight) | {:.1} MiB | {:.3} | |",
        mib(w4),
        8.0 * w4 as f64 / (out_f * in_f) as f64,
        mib(wd),
        w4 as f64 / wd as f64
    );
    drop((lora4, lora_dense, base4, dense, dense_w, x, g));

    // 4. AdamW8bit step vs device-to-device copy of the parameters.
    let np = s.adam_params;
    let p = Var::from_tensor(&Tensor::randn(0f32, 1.0, np, &dev)?)?;
    let mut grads = (p.as_tensor() * 0.0)?.sum_all()?.backward()?;
    grads.insert(p.as_tensor(), Tensor::randn(0f32, 1e-3, np, &dev)?);
    let mut opt = AdamW8bit::new(vec![p.clone()], adam)?;
    let t_step = median_ms(&dev, s.reps, || Ok(opt.step(&grads)?))?;
    let t_copy = median_ms(&dev, s.reps, || {
        p.as_tensor().copy()?;
        Ok(())
    })?;
    println!(
        "| AdamW8bit step vs copy, 2^{} f32 params | {t_step:.3} ms ({:.1} Gparam/s) | copy {t_copy:.3} ms | {:.3} (copy/step) | ≥ 0.5 |",
        np.trailing_zeros(),
        np as f64 / t_step / 1e6,
        t_copy / t_step
    );
    Ok(())
}
