//! Criterion benchmarks of the dynamic 8-bit map encoder (`qlora-double-quant`): the oracle
//! (`DynamicMap::encode`, the transliterated CUDA binary search), the table-driven scalar encoder
//! and each SIMD [`Implementation`] of the slice methods, plus `decode_scaled`.
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
use qlora_double_quant::{DynamicMap, Encoder, Implementation};
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

criterion_group!(benches, encoders);
criterion_main!(benches);
