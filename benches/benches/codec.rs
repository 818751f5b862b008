//! Criterion benchmarks of the 4-bit codec kernels, each beside a memcpy that moves the same bytes
//! (measured in the same run). `Throughput::Bytes` is the bytes really moved: dense tensor +
//! packed codes + absmax storage (f32 per block, or the double-quantized codes, nested scales and
//! offset), so criterion's GB/s compare directly with the memcpy rows and the machine's bandwidth.
//!
//! Two sizes: 256 Ki elements (cache-resident, shows the kernel's compute rate) and 16 Mi elements
//! (DRAM-bound). The scalar oracle is included at the small size for the speed-up.
//!
//! ```text
//! cargo bench -p qlora-benches --bench codec
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use qlora_benches::Distribution;
use qlora_codec::{
    num_blocks, packed_len, AbsmaxView, CodecKernels, DoubleQuantAbsmax, Element, Implementation,
    QuantType,
};
use std::hint::black_box;
use std::time::Duration;

const BLOCKSIZE: usize = 64;

struct Quantized {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dq: DoubleQuantAbsmax,
}

impl Quantized {
    fn new(qt: QuantType, x: &[f32]) -> Self {
        let mut packed = vec![0u8; packed_len(x.len())];
        let mut absmax = vec![0f32; num_blocks(x.len(), BLOCKSIZE)];
        qlora_codec::quantize_into(qt, x, BLOCKSIZE, &mut packed, &mut absmax).expect("sizes");
        let dq = DoubleQuantAbsmax::compress(&absmax);
        Quantized { packed, absmax, dq }
    }

    fn view(&self, double_quant: bool) -> AbsmaxView<'_> {
        if double_quant {
            AbsmaxView::Double {
                codes: &self.dq.codes,
                nested_absmax: &self.dq.nested_absmax,
                offset: self.dq.offset,
            }
        } else {
            AbsmaxView::F32(&self.absmax)
        }
    }

    fn absmax_bytes(&self, double_quant: bool) -> usize {
        if double_quant {
            self.dq.nbytes()
        } else {
            4 * self.absmax.len()
        }
    }
}

/// A memcpy that moves `bytes` bytes (copies `bytes/2`).
fn memcpy_row(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    bytes: usize,
) {
    let src = vec![0x5au8; bytes / 2];
    let mut dst = vec![0xa5u8; bytes / 2];
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(BenchmarkId::new("memcpy_same_bytes", name), |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
}

#[allow(clippy::too_many_arguments)]
fn dequant_row<T: Element>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    imp: Implementation,
    qt: QuantType,
    q: &Quantized,
    double_quant: bool,
    n: usize,
) {
    let name = format!(
        "dequantize_{}_{}{}_{}",
        qt.as_str(),
        T::DTYPE.torch_name(),
        if double_quant { "_dq" } else { "" },
        imp.name()
    );
    let bytes = q.packed.len() + q.absmax_bytes(double_quant) + n * T::DTYPE.size();
    let mut out = vec![T::from_f32(0.0); n];
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(BenchmarkId::new("kernel", &name), |b| {
        b.iter(|| {
            imp.dequantize_into(qt, &q.packed, q.view(double_quant), BLOCKSIZE, &mut out)
                .expect("sizes");
            black_box(&mut out);
        })
    });
    memcpy_row(group, &name, bytes);
}

fn quant_row<T: Element>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    qt: QuantType,
    x: &[f32],
    double_quant: bool,
) {
    let n = x.len();
    let input: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, BLOCKSIZE)];
    let absmax_bytes = if double_quant {
        DoubleQuantAbsmax::compress(&absmax).nbytes()
    } else {
        4 * absmax.len()
    };
    let bytes = n * T::DTYPE.size() + packed.len() + absmax_bytes;
    let name = format!(
        "quantize_{}_{}{}",
        T::DTYPE.torch_name(),
        qt.as_str(),
        if double_quant { "_dq" } else { "" }
    );
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(BenchmarkId::new("kernel", &name), |b| {
        b.iter(|| {
            qlora_codec::quantize_into(qt, &input, BLOCKSIZE, &mut packed, &mut absmax)
                .expect("sizes");
            if double_quant {
                black_box(qlora_codec::double_quantize_absmax(&absmax));
            }
            black_box(&mut packed);
        })
    });
    memcpy_row(group, &name, bytes);
}

fn codec(c: &mut Criterion) {
    let best = Implementation::active();
    for (label, n) in [("256Ki", 1usize << 18), ("16Mi", 1usize << 24)] {
        let x = Distribution::Normal.samples(n, 42);
        let nf4 = Quantized::new(QuantType::Nf4, &x);
        let fp4 = Quantized::new(QuantType::Fp4, &x);
        let mut group = c.benchmark_group(format!("codec_{label}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));

        dequant_row::<bf16>(&mut group, best, QuantType::Nf4, &nf4, true, n);
        dequant_row::<bf16>(&mut group, best, QuantType::Nf4, &nf4, false, n);
        dequant_row::<f32>(&mut group, best, QuantType::Nf4, &nf4, false, n);
        dequant_row::<f16>(&mut group, best, QuantType::Nf4, &nf4, false, n);
        dequant_row::<bf16>(&mut group, best, QuantType::Fp4, &fp4, true, n);
        if n <= 1 << 18 {
            dequant_row::<bf16>(
                &mut group,
                Implementation::Scalar,
                QuantType::Nf4,
                &nf4,
                true,
                n,
            );
        }
        quant_row::<bf16>(&mut group, QuantType::Nf4, &x, true);
        quant_row::<f32>(&mut group, QuantType::Nf4, &x, false);
        quant_row::<bf16>(&mut group, QuantType::Fp4, &x, false);
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
