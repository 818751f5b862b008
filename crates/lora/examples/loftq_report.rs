//! How much of the 4-bit quantization error LoftQ removes, on real-shaped matrices.
//!
//! `cargo run --release -p qlora-lora --example loftq_report [-- OUT IN]` (default 1024 4096).
//! Prints, for r = 16 and 64 and alpha = 2r (s = 2): the plain NF4 error ‖W − deq(Q(W))‖, and the
//! error left by LoftQ (‖W − deq(Q) − s·BA‖) with PEFT's unscaled factors and with ours, after
//! 1 and 5 alternations, for a Gaussian matrix and for a low-rank-plus-noise matrix.

use qlora_lora::init::{init_loftq, LoftqOptions};
use qlora_lora::LoraParams;
use std::time::Instant;

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn main() -> Result<(), qlora_lora::Error> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (out_f, in_f) = (
        *args.first().unwrap_or(&1024),
        *args.get(1).unwrap_or(&4096),
    );
    let noise: Vec<f32> = gaussian(out_f * in_f, 1).iter().map(|v| v * 0.02).collect();
    // Low rank (64) plus noise, half of the energy in each part: W = P·Q + N.
    let k = 64;
    let p = gaussian(out_f * k, 2);
    let q = gaussian(k * in_f, 3);
    let mut lowrank = vec![0.0f32; out_f * in_f];
    let scale = 0.02 / (k as f32).sqrt();
    for i in 0..out_f {
        for l in 0..k {
            let pv = p[i * k + l] * scale;
            let row = &mut lowrank[i * in_f..(i + 1) * in_f];
            for (r, qv) in row.iter_mut().zip(&q[l * in_f..(l + 1) * in_f]) {
                *r += pv * qv;
            }
        }
    }
    let lowrank: Vec<f32> = lowrank.iter().zip(&noise).map(|(a, b)| a + b).collect();
    println!("| matrix | r | s | method | T | ‖W−Q‖/‖W‖ | ‖W−Q−sBA‖/‖W‖ | error removed | time |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, w) in [("gaussian", &noise), ("low-rank 64 + noise", &lowrank)] {
        let wn = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        for r in [16usize, 64] {
            let params = LoraParams::new(r, 2.0 * r as f64);
            for (method, compensate, iters) in [
                ("PEFT (unscaled)", false, 1),
                ("ours (scaled)", true, 1),
                ("ours (scaled)", true, 5),
            ] {
                let t = Instant::now();
                let opts = LoftqOptions {
                    iterations: iters,
                    compensate_scaling: compensate,
                    ..LoftqOptions::default()
                };
                let res = init_loftq(w, out_f, in_f, &params, opts)?;
                println!(
                    "| {name} {out_f}×{in_f} | {r} | {} | {method} | {iters} | {:.5} | {:.5} | {:.2} % | {:.1} s |",
                    params.scaling(),
                    res.error_quantized / wn,
                    res.error_loftq / wn,
                    100.0 * res.error_reduction(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}
