//! One 8-bit and one 32-bit AdamW step on a 16 M-parameter f32 tensor, beside a memcpy baseline
//! measured in the same run.
//!
//! Bytes moved per element and step (f32 parameter and gradient):
//! * 8-bit: parameter read + write (8), gradient read (4), two state codes read + write (4), and
//!   two f32 absmax per 256 elements read + write (16/256): 16.0625 bytes.
//! * 32-bit: parameter (8), gradient (4), two f32 states read + write (16): 28 bytes.
//! * memcpy: read + write of the source: 2 bytes per byte copied.
//!
//! The criterion runs use the active implementation ([`Implementation::active`]). After
//! criterion's report the bench prints, for every implementation this machine has, each step's
//! time and bandwidth and its ratio to the faster of a single-threaded and a rayon-parallel
//! memcpy (the bandwidth limit of this machine), all measured in the same run.
//! Short run: `cargo bench -p qlora-optim --bench adamw -- --warm-up-time 1 --measurement-time 4`;
//! `QLORA_BENCH_N` changes the tensor size (default 16 Mi elements).

use criterion::{criterion_group, Criterion, Throughput};
use qlora_optim::{AdamKernels, AdamStep, Blockwise8bitMut, Implementation, OPTIMIZER_BLOCKSIZE};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn numel() -> usize {
    std::env::var("QLORA_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16 << 20)
}

const BYTES_8BIT: f64 = 16.0 + 16.0 / OPTIMIZER_BLOCKSIZE as f64;
const BYTES_32BIT: f64 = 28.0;

struct Setup {
    p: Vec<f32>,
    g: Vec<f32>,
    c1: Vec<u8>,
    c2: Vec<u8>,
    a1: Vec<f32>,
    a2: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
    hp: AdamStep,
}

impl Setup {
    fn new(n: usize) -> Self {
        let nb = n.div_ceil(OPTIMIZER_BLOCKSIZE);
        let g: Vec<f32> = (0..n)
            .map(|i| ((i.wrapping_mul(2654435761) % 2001) as f32 - 1000.0) * 1e-5)
            .collect();
        let mut s = Setup {
            p: vec![0.1; n],
            g,
            c1: vec![0; n],
            c2: vec![0; n],
            a1: vec![0.0; nb],
            a2: vec![0.0; nb],
            s1: vec![0.0; n],
            s2: vec![0.0; n],
            hp: AdamStep {
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
                step: 1,
                gnorm_scale: 1.0,
            },
        };
        // A few steps so the states hold realistic codes.
        for _ in 0..3 {
            s.step8(Implementation::active());
            s.step32(Implementation::active());
            s.hp.step += 1;
        }
        s
    }
    fn step8(&mut self, imp: Implementation) {
        imp.adam_step_8bit(
            &mut self.p,
            &self.g,
            Blockwise8bitMut {
                state1: &mut self.c1,
                state2: &mut self.c2,
                absmax1: &mut self.a1,
                absmax2: &mut self.a2,
            },
            &self.hp,
        )
        .expect("valid inputs");
    }
    fn step32(&mut self, imp: Implementation) {
        imp.adam_step_32bit(&mut self.p, &self.g, &mut self.s1, &mut self.s2, &self.hp)
            .expect("valid inputs");
    }
}

fn par_copy(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(1 << 20)
        .zip(src.par_chunks(1 << 20))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

fn bench(c: &mut Criterion) {
    let n = numel();
    let mut s = Setup::new(n);
    // memcpy of as many bytes as the 8-bit step moves (half read, half written).
    let len = (n as f64 * BYTES_8BIT / 2.0) as usize;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];

    let mut group = c.benchmark_group("adamw_16M");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(2 * len as u64));
    group.bench_function("memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    group.bench_function("memcpy_rayon", |b| {
        b.iter(|| par_copy(&mut dst, black_box(&src)))
    });
    group.throughput(Throughput::Bytes((n as f64 * BYTES_8BIT) as u64));
    let imp = Implementation::active();
    group.bench_function("step_8bit", |b| b.iter(|| s.step8(imp)));
    group.throughput(Throughput::Bytes((n as f64 * BYTES_32BIT) as u64));
    group.bench_function("step_32bit", |b| b.iter(|| s.step32(imp)));
    group.finish();

    // The ratio summary: median of several timed repetitions of each, in this same process.
    let median = |f: &mut dyn FnMut()| -> Duration {
        let mut t: Vec<Duration> = (0..7)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed()
            })
            .collect();
        t.sort();
        t[3]
    };
    let gbs = |bytes: f64, d: Duration| bytes / d.as_secs_f64() / 1e9;
    let copy1 = gbs(2.0 * len as f64, median(&mut || dst.copy_from_slice(&src)));
    let copyn = gbs(2.0 * len as f64, median(&mut || par_copy(&mut dst, &src)));
    let limit = copy1.max(copyn);
    println!(
        "adamw bandwidth (n = {n}, {} threads): memcpy {copy1:.2} GB/s, memcpy_rayon {copyn:.2} GB/s",
        rayon::current_num_threads()
    );
    // Every implementation this machine has (the criterion runs above use the active one).
    for imp in Implementation::available() {
        let t8 = median(&mut || s.step8(imp));
        let t32 = median(&mut || s.step32(imp));
        let (b8, b32) = (
            gbs(n as f64 * BYTES_8BIT, t8),
            gbs(n as f64 * BYTES_32BIT, t32),
        );
        println!(
            "adamw {:<6} step_8bit  {:7.2} ms {b8:6.2} GB/s = {:.3} of memcpy limit ({BYTES_8BIT} B/param)",
            imp.name(),
            t8.as_secs_f64() * 1e3,
            b8 / limit
        );
        println!(
            "adamw {:<6} step_32bit {:7.2} ms {b32:6.2} GB/s = {:.3} of memcpy limit ({BYTES_32BIT} B/param)",
            imp.name(),
            t32.as_secs_f64() * 1e3,
            b32 / limit
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
