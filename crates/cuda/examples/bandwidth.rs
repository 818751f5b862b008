//! Prints the effective memory bandwidth of the main kernels (NF4 quantize, dequantize with and
//! without double quantization, 8-bit AdamW step, fused NF4 GEMV) next to a device-to-device copy
//! measured in the same run (the ceiling any streaming kernel can reach on this GPU).
//!
//! ```sh
//! cargo run --release -p qlora-cuda --features cuda --example bandwidth
//! ```
//!
//! `QLORA_BENCH_ELEMS` sets the tensor size (default 2^28 elements), `QLORA_BENCH_ITERS` the
//! timed iterations per kernel (default 20, after 3 warm-up launches). Without a GPU it says so
//! and exits 0, or 1 when `QLORA_REQUIRE_GPU=1`.
//!
//! Bytes moved are the bytes each kernel must read and write at least once (the quantity
//! bitsandbytes and the reference notes use): e.g. NF4 quantize of f16 reads 2 B and writes
//! 0.5 B per element plus 4 B of absmax per block.

use std::error::Error;

use half::f16;
use qlora_cuda::cudarc::driver::{sys::CUevent_flags, CudaSlice};
use qlora_cuda::{Adam8bitState, AdamParams, Device, DynamicMaps, QuantType, Scales};
use qlora_double_quant::{DoubleQuantAbsmax, DynamicMap};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Mean milliseconds per launch of `f` over `iters` launches, after warm-up.
fn time_ms(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<(), Box<dyn Error>>,
) -> Result<f64, Box<dyn Error>> {
    for _ in 0..3 {
        f()?;
    }
    let start = dev
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = dev
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(dev.stream())?;
    for _ in 0..iters {
        f()?;
    }
    end.record(dev.stream())?;
    end.synchronize()?;
    Ok(f64::from(start.elapsed_ms(&end)?) / iters as f64)
}

fn main() -> Result<(), Box<dyn Error>> {
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("bandwidth: no usable GPU ({e})");
            let required = std::env::var("QLORA_REQUIRE_GPU").as_deref() == Ok("1");
            std::process::exit(i32::from(required));
        }
    };
    let n = env_usize("QLORA_BENCH_ELEMS", 1 << 28);
    let iters = env_usize("QLORA_BENCH_ITERS", 20).max(1);
    let bs = 64;
    let blocks = n.div_ceil(bs);
    let stream = dev.stream().clone();
    println!(
        "device {} ({}), n = {n} elements, {iters} iterations per kernel",
        dev.context().name()?,
        dev.arch()
    );

    // Inputs: a deterministic pattern, so no host RNG time is spent.
    let host: Vec<f16> = (0..n)
        .map(|i| f16::from_f32((((i as u64 * 7919) % 2001) as f32 - 1000.0) / 25_600.0))
        .collect();
    let x: CudaSlice<f16> = stream.clone_htod(&host)?;
    let mut copy_dst: CudaSlice<f16> = stream.alloc_zeros(n)?;
    let mut packed: CudaSlice<u8> = stream.alloc_zeros(n.div_ceil(2))?;
    let mut absmax: CudaSlice<f32> = stream.alloc_zeros(blocks)?;
    let mut out: CudaSlice<f16> = stream.alloc_zeros(n)?;

    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    let copy_bytes = 2.0 * 2.0 * n as f64;
    let copy_ms = time_ms(&dev, iters, || Ok(stream.memcpy_dtod(&x, &mut copy_dst)?))?;
    rows.push(("device-to-device copy (f16)", copy_bytes, copy_ms));

    let q_bytes = 2.0 * n as f64 + n.div_ceil(2) as f64 + 4.0 * blocks as f64;
    let q_ms = time_ms(&dev, iters, || {
        Ok(dev.quantize_4bit(&x, QuantType::Nf4, bs, &mut packed, &mut absmax)?)
    })?;
    rows.push(("quantize NF4 f16, bs 64", q_bytes, q_ms));

    let dq_bytes = n.div_ceil(2) as f64 + 4.0 * blocks as f64 + 2.0 * n as f64;
    let dq_ms = time_ms(&dev, iters, || {
        Ok(dev.dequantize_4bit(
            &packed,
            Scales::Absmax(&absmax),
            QuantType::Nf4,
            bs,
            &mut out,
        )?)
    })?;
    rows.push(("dequantize NF4 -> f16, bs 64", dq_bytes, dq_ms));

    let host_absmax = stream.clone_dtoh(&absmax)?;
    let dq = DoubleQuantAbsmax::compress(&host_absmax);
    let qabsmax = stream.clone_htod(&dq.codes)?;
    let nested = stream.clone_htod(&dq.nested_absmax)?;
    let code = stream.clone_htod(DynamicMap::signed().values())?;
    let ddq_bytes =
        n.div_ceil(2) as f64 + blocks as f64 + 4.0 * dq.nested_absmax.len() as f64 + 2.0 * n as f64;
    let ddq_ms = time_ms(&dev, iters, || {
        let scales = Scales::Double {
            qabsmax: &qabsmax,
            nested_absmax: &nested,
            nested_code: &code,
            offset: dq.offset,
        };
        Ok(dev.dequantize_4bit(&packed, scales, QuantType::Nf4, bs, &mut out)?)
    })?;
    rows.push(("dequantize NF4+DQ -> f16, bs 64", ddq_bytes, ddq_ms));
    drop((copy_dst, out, packed, absmax));

    // 8-bit AdamW on f32 parameters: reads p, g, both states and both absmax; writes p, both
    // states and both absmax.
    let mut p: CudaSlice<f32> = stream.clone_htod(&vec![0.01f32; n])?;
    let g: CudaSlice<f32> = stream.clone_htod(&vec![1e-3f32; n])?;
    let mut s1: CudaSlice<u8> = stream.alloc_zeros(n)?;
    let mut s2: CudaSlice<u8> = stream.alloc_zeros(n)?;
    let opt_blocks = n.div_ceil(256);
    let mut a1: CudaSlice<f32> = stream.alloc_zeros(opt_blocks)?;
    let mut a2: CudaSlice<f32> = stream.alloc_zeros(opt_blocks)?;
    let q1 = stream.clone_htod(DynamicMap::signed().values())?;
    let q2 = stream.clone_htod(DynamicMap::unsigned().values())?;
    let adam_bytes =
        (4.0 + 4.0 + 1.0 + 1.0 + 4.0 + 1.0 + 1.0) * n as f64 + 16.0 * opt_blocks as f64;
    let mut step = 0u32;
    let adam_ms = time_ms(&dev, iters, || {
        step += 1;
        let params = AdamParams {
            step,
            ..AdamParams::default()
        };
        let state = Adam8bitState {
            state1: &mut s1,
            state2: &mut s2,
            absmax1: &mut a1,
            absmax2: &mut a2,
        };
        let maps = DynamicMaps {
            signed: &q1,
            unsigned: &q2,
        };
        Ok(dev.adam8bit_step(&mut p, &g, state, maps, &params)?)
    })?;
    rows.push(("AdamW 8-bit step, f32 params", adam_bytes, adam_ms));

    drop((p, g, s1, s2, a1, a2));

    // Fused NF4 GEMV, one row (decode): a Llama-7B MLP projection, 11008 x 4096, f16.
    let (out_f, in_f) = (11_008usize, 4_096usize);
    let w_elems = out_f * in_f;
    let w_host: Vec<u8> = (0..w_elems.div_ceil(2))
        .map(|i| (i * 37 % 251) as u8)
        .collect();
    let w_packed = stream.clone_htod(&w_host)?;
    let w_absmax: CudaSlice<f32> = stream.clone_htod(&vec![0.05f32; w_elems.div_ceil(bs)])?;
    let a_row: CudaSlice<f16> = stream.clone_htod(&host[..in_f])?;
    let mut y: CudaSlice<f16> = stream.alloc_zeros(out_f)?;
    let gemv_bytes = w_elems.div_ceil(2) as f64
        + 4.0 * w_elems.div_ceil(bs) as f64
        + 2.0 * (in_f + out_f) as f64;
    let gemv_ms = time_ms(&dev, iters, || {
        Ok(dev.gemv_4bit(
            &a_row,
            1,
            &w_packed,
            Scales::Absmax(&w_absmax),
            QuantType::Nf4,
            bs,
            (out_f, in_f),
            &mut y,
        )?)
    })?;
    rows.push(("GEMV NF4 11008x4096, 1 row, f16", gemv_bytes, gemv_ms));

    let copy_gbs = copy_bytes / (copy_ms * 1e6);
    println!();
    println!(
        "| {:<34} | {:>10} | {:>9} | {:>8} | {:>7} |",
        "kernel", "MB moved", "ms", "GB/s", "vs copy"
    );
    println!(
        "|{:-<36}|{:->12}|{:->11}|{:->10}|{:->9}|",
        "", "", "", "", ""
    );
    for (name, bytes, ms) in rows {
        let gbs = bytes / (ms * 1e6);
        println!(
            "| {name:<34} | {:>10.1} | {ms:>9.3} | {gbs:>8.1} | {:>6.1}% |",
            bytes / 1e6,
            100.0 * gbs / copy_gbs
        );
    }
    Ok(())
}
