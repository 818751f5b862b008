//! Forward + backward of a LoRA r16 layer over an NF4 + double-quant base (`Linear4bit`) against
//! the same layer over a dense bf16 base (`candle_nn::Linear`, candle's matmul), both through
//! candle's autograd, plus the peak heap memory of one training step of each.
//!
//! Shape from the environment (defaults: LLaMA-7B's MLP, 11008×4096, 512 tokens):
//! `QLORA_BENCH_OUT`, `QLORA_BENCH_IN`, `QLORA_BENCH_TOKENS`; `QLORA_BENCH_PAIRS` alternating
//! pairs for the paired ratio printed at the end (default 6).

use candle_core::{DType, Device, Module, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use qlora_candle::{Linear4bit, LoraInit, LoraLinear};
use qlora_codec::QuantizeOptions;
use qlora_lora::LoraParams;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting live and peak heap bytes.
struct PeakAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged (so the
// GlobalAlloc contract holds as it does for `System`) and only adds atomic counting.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (that is, by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from this allocator; the caller upholds the new size's
        // contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Case {
    name: &'static str,
    layer: LoraLinear,
}

fn cases(out_f: usize, in_f: usize) -> Vec<Case> {
    let w = Tensor::randn(0f32, 0.02, (out_f, in_f), &Device::Cpu)
        .and_then(|w| w.to_dtype(DType::BF16))
        .expect("random weight");
    let params = LoraParams::new(16, 32.0);
    let nf4 = Linear4bit::from_tensor(&w, None, QuantizeOptions::qlora()).expect("quantize");
    eprintln!(
        "NF4 + double quant base: {:.3} bits per weight ({:.1} MiB; bf16: {:.1} MiB)",
        nf4.bits_per_weight(),
        nf4.bits_per_weight() * (out_f * in_f) as f64 / 8.0 / (1 << 20) as f64,
        (2 * out_f * in_f) as f64 / (1 << 20) as f64
    );
    let init = LoraInit::Random { seed: 1 };
    vec![
        Case {
            name: "nf4-dq",
            layer: LoraLinear::new(nf4, params, init.clone()).expect("nf4 layer"),
        },
        Case {
            name: "dense-bf16",
            layer: LoraLinear::new(candle_nn::Linear::new(w, None), params, init)
                .expect("dense layer"),
        },
    ]
}

/// One training step of the layer: forward, loss Σ y ⊙ g, backward (dX, dA, dB).
fn step(layer: &LoraLinear, x: &Var, gy: &Tensor) {
    let y = layer.forward(x.as_tensor()).expect("forward");
    let loss = (y * gy).and_then(|l| l.sum_all()).expect("loss");
    let grads = loss.backward().expect("backward");
    assert!(grads.get(layer.a()).is_some() && grads.get(x).is_some());
}

fn bench(c: &mut Criterion) {
    let (out_f, in_f, n) = (
        env("QLORA_BENCH_OUT", 11008),
        env("QLORA_BENCH_IN", 4096),
        env("QLORA_BENCH_TOKENS", 512),
    );
    let cases = cases(out_f, in_f);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, in_f), &Device::Cpu).expect("x"))
        .expect("x var");
    let gy = Tensor::randn(0f32, 1.0, (n, out_f), &Device::Cpu).expect("gy");

    for case in &cases {
        step(&case.layer, &x, &gy); // warm up (page in, thread pools)
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        step(&case.layer, &x, &gy);
        let peak = PEAK.load(Ordering::Relaxed) - before;
        eprintln!(
            "{}: peak heap of one training step above the resident layer and inputs: {:.1} MiB",
            case.name,
            peak as f64 / (1 << 20) as f64
        );
    }

    let mut group = c.benchmark_group(format!("lora-r16-fwd-bwd/{out_f}x{in_f}/{n}-tokens"));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(20));
    for case in &cases {
        group.bench_function(case.name, |b| b.iter(|| step(&case.layer, &x, &gy)));
    }
    group.finish();

    // Alternating pairs, so that load on a shared machine hits both layers alike.
    let pairs = env("QLORA_BENCH_PAIRS", 6);
    let mut ratios = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let mut t = [0f64; 2];
        for (i, case) in cases.iter().enumerate() {
            let start = Instant::now();
            step(&case.layer, &x, &gy);
            t[i] = start.elapsed().as_secs_f64();
        }
        ratios.push(t[0] / t[1]);
    }
    ratios.sort_by(f64::total_cmp);
    if let (Some(lo), Some(hi)) = (ratios.first(), ratios.last()) {
        eprintln!(
            "paired NF4 / dense-bf16 time ratio over {pairs} pairs: median {:.3} (range {lo:.3}–{hi:.3})",
            ratios[ratios.len() / 2]
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
