//! Criterion benchmarks of the dynamic 8-bit map encoder (`qlora-double-quant`): the oracle
//! (`DynamicMap::encode`, the transliterated CUDA binary search), the table-driven scalar encoder
//! and each SIMD [`Implementation`] of the slice methods, plus `decode_scaled`, and the double
//! quantization of 1 Mi absmax values.
//! `Throughput::Elements`: criterion reports elements/s.
//!
//! The input is 64 Ki centred, normalized absmax-like values spread over `[-1, 1]` (what double
//! quantization encodes), cache-resident, so the rows show the encoders' compute rate.
//!
//! ```text
//! cargo bench -p qlora-benches --bench dynamic_map
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qlora_codec::testing::SplitMix64;
use qlora_double_quant::{absmax_mean, DoubleQuantAbsmax, DynamicMap, Encoder, Implementation};
use std::hint::black_box;
use std::time::Duration;

const N: usize = 1 << 16;

fn input() -> Vec<f32> {
    let mut rng = SplitMix64::new(7);
    (0..N)
        .map(|_| {
            // Absmax values around a scale with a log-normal spread, centred on their mean and
            // normalized per 256-value block like double quantization does.
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((u - 0.5) * 1.6).exp() as f32 - 1.05
        })
        .collect()
}

fn encoders(c: &mut Criterion) {
    let x = input();
    let scale = 1.0 / x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut out = vec![0u8; N];
    let mut g = c.benchmark_group("dynamic_map_encode");
    g.throughput(Throughput::Elements(N as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    let map = DynamicMap::signed();
    g.bench_function("oracle_binary_search", |b| {
        b.iter(|| {
            for (o, &v) in out.iter_mut().zip(&x) {
                *o = map.encode(black_box(v) * scale);
            }
            black_box(&out);
        })
    });
    let enc = Encoder::signed();
    for imp in Implementation::available() {
        g.bench_function(BenchmarkId::new("encode_scaled", imp.name()), |b| {
            b.iter(|| {
                imp.encode_scaled(enc, black_box(&x), scale, &mut out);
                black_box(&out);
            })
        });
    }
    for imp in Implementation::available() {
        g.bench_function(BenchmarkId::new("encode_divided", imp.name()), |b| {
            b.iter(|| {
                imp.encode_divided(enc, black_box(&x), 1.0 / scale, &mut out);
                black_box(&out);
            })
        });
    }
    g.finish();

    let codes = out.clone();
    let mut back = vec![0f32; N];
    let mut g = c.benchmark_group("dynamic_map_decode");
    g.throughput(Throughput::Elements(N as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for imp in Implementation::available() {
        g.bench_function(BenchmarkId::new("decode_scaled", imp.name()), |b| {
            b.iter(|| {
                imp.decode_scaled(map, black_box(&codes), 0.37, &mut back);
                black_box(&back);
            })
        });
    }
    g.finish();
}

/// Double quantization of 1 Mi absmax values (the absmax of a 64 Mi-element tensor at block 64):
/// the crate's `DoubleQuantAbsmax::compress` and the codec's fused `double_quantize_absmax`.
fn double_quant(c: &mut Criterion) {
    let mut rng = SplitMix64::new(11);
    let absmax: Vec<f32> = (0..1 << 20)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            // bf16-exact, as the absmax of bf16 weights is.
            let v = (0.02 * ((u - 0.5) * 1.5).exp()) as f32;
            f32::from_bits(v.to_bits() & 0xffff_0000)
        })
        .collect();
    let mut g = c.benchmark_group("double_quant_1Mi");
    g.throughput(Throughput::Elements(absmax.len() as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(30);
    g.bench_function("DoubleQuantAbsmax::compress", |b| {
        b.iter(|| black_box(DoubleQuantAbsmax::compress(black_box(&absmax))))
    });
    g.bench_function("qlora_codec::double_quantize_absmax", |b| {
        b.iter(|| black_box(qlora_codec::double_quantize_absmax(black_box(&absmax))))
    });
    g.bench_function("absmax_mean", |b| {
        b.iter(|| black_box(absmax_mean(black_box(&absmax))))
    });
    g.finish();
}

criterion_group!(benches, encoders, double_quant);
criterion_main!(benches);
