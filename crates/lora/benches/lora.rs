//! LoRA forward and backward over a 4-bit (NF4, block 64, double quant) base against the same over
//! a dense bf16 base, at Llama-7B layer shapes, for 1 token (decode) and 512 tokens (a training
//! micro-batch). A memcpy of the bf16 weight is measured alongside as a bandwidth baseline.
//!
//! Short run: `cargo bench -p qlora-lora --bench lora -- --warm-up-time 1 --measurement-time 3`.
//! Set `QLORA_BENCH_SHAPES=4096x4096` (or `11008x4096`) and `QLORA_BENCH_RANKS=16` to narrow it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qlora_lora::init::init_random;
use qlora_lora::{
    BaseWeight, DenseData, LoraLinear, LoraParams, Mode, QuantizeOptions, QuantizedTensor,
};
use std::hint::black_box;

fn weights(out_f: usize, in_f: usize) -> Vec<f32> {
    // Deterministic, roughly Gaussian-looking values of a trained weight's scale.
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..out_f * in_f)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let v = ((s >> 16) & 0xff_ffff) as f32 / (1u64 << 24) as f32;
            (u + v - 1.0) * 0.02
        })
        .collect()
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(str::to_string)
        .collect()
}

fn bench(c: &mut Criterion) {
    for shape in env_list("QLORA_BENCH_SHAPES", "4096x4096,11008x4096") {
        let (out_f, in_f) = match shape.split_once('x').map(|(a, b)| (a.parse(), b.parse())) {
            Some((Ok(a), Ok(b))) => (a, b),
            _ => panic!("bad shape {shape:?} (expected OUTxIN)"),
        };
        let w = weights(out_f, in_f);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let q = QuantizedTensor::quantize(&wb, &[out_f, in_f], QuantizeOptions::qlora())
            .expect("quantize");
        let bases = [
            ("nf4", BaseWeight::quantized(q).expect("base")),
            (
                "bf16",
                BaseWeight::dense(DenseData::Bf16(wb.clone()), out_f, in_f).expect("base"),
            ),
        ];
        let mut g = c.benchmark_group(format!("memcpy/{shape}"));
        g.throughput(Throughput::Bytes((2 * out_f * in_f) as u64));
        let mut dst = wb.clone();
        g.bench_function("bf16 weight", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&wb)))
        });
        g.finish();
        for r in env_list("QLORA_BENCH_RANKS", "16,64") {
            let r: usize = r.parse().expect("rank");
            let params = LoraParams::new(r, 2.0 * r as f64);
            let adapter = init_random(r, in_f, out_f, 7);
            for tokens in [1usize, 512] {
                let x: Vec<f32> = weights(tokens, in_f).iter().map(|v| v * 50.0).collect();
                let gy: Vec<f32> = weights(tokens, out_f).iter().map(|v| v * 50.0).collect();
                let mut g = c.benchmark_group(format!("lora/{shape}/r{r}/t{tokens}"));
                g.sample_size(10);
                g.throughput(Throughput::Elements((out_f * in_f * tokens) as u64));
                for (name, base) in &bases {
                    let layer = LoraLinear::new(base.clone(), None, params, adapter.clone())
                        .expect("layer");
                    g.bench_function(BenchmarkId::new("forward", name), |b| {
                        b.iter(|| {
                            layer
                                .forward(black_box(&x), tokens, Mode::Eval)
                                .expect("forward")
                        })
                    });
                    let (_, cache) = layer.forward(&x, tokens, Mode::Eval).expect("forward");
                    g.bench_function(BenchmarkId::new("backward", name), |b| {
                        b.iter(|| {
                            layer
                                .backward(black_box(&x), &cache, &gy)
                                .expect("backward")
                        })
                    });
                }
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
