//! `qlora bench`: CPU throughput of the 4-bit codecs, as a ratio to a memcpy of the same bytes
//! measured in the same run.
//!
//! For every case (quantize and dequantize × NF4/FP4 × with/without double quant × f32/bf16/f16)
//! it counts the bytes really moved — the dense tensor, the packed codes and the absmax storage
//! (f32 per block, or the double-quantized codes + nested scales + offset) — and times the best of
//! `--reps` runs after a warm-up, on buffers touched beforehand (no page faults in the timing).
//! Quantization with double quant is `quantize_double_into` (one call, into the same reused
//! buffers: the absmax codes and nested scales too).
//! The memcpy baseline copies half that many bytes (so it also moves them, read + write), split
//! over the same threads, measured right after each case.

use clap::Args;
use half::{bf16, f16};
use qlora_codec::{
    dequantize_into, num_blocks, packed_len, quantize_double_into, quantize_into, AbsmaxView,
    Element, Implementation, QuantType, NESTED_BLOCKSIZE,
};
use rayon::prelude::*;
use std::time::Instant;

use crate::convert::CliResult;

/// Arguments of `qlora bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Elements per tensor.
    #[arg(long, default_value_t = 64 << 20)]
    size: usize,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Block size (32 … 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Timed runs per case; the fastest counts.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print JSON records instead of a table.
    #[arg(long)]
    json: bool,
}

/// One measured case.
struct Record {
    op: &'static str,
    quant_type: QuantType,
    double_quant: bool,
    dtype: &'static str,
    elements: usize,
    bytes: usize,
    seconds: f64,
    memcpy_seconds: f64,
}

impl Record {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }
    fn memcpy_gbps(&self) -> f64 {
        self.bytes as f64 / self.memcpy_seconds / 1e9
    }
    fn ratio(&self) -> f64 {
        self.memcpy_seconds / self.seconds
    }
}

/// Bytes of absmax storage: f32 per block, or codes + nested scales + offset.
fn absmax_bytes(view: AbsmaxView<'_>) -> usize {
    match view {
        AbsmaxView::F32(a) => 4 * a.len(),
        AbsmaxView::Double {
            codes,
            nested_absmax,
            ..
        } => codes.len() + 4 * nested_absmax.len() + 4,
    }
}

/// Best wall time of `reps` runs of `f`, after one warm-up run.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Buffers for the memcpy baseline, grown on demand and touched before use.
struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
    threads: usize,
}

impl Memcpy {
    /// Time a parallel copy that moves `bytes` bytes (reads `bytes/2`, writes `bytes/2`).
    fn time(&mut self, bytes: usize, reps: usize) -> f64 {
        let len = bytes / 2;
        if self.src.len() < len {
            self.src = vec![0x5a; len];
            self.dst = vec![0xa5; len];
        }
        let chunk = len.div_ceil(self.threads).max(1);
        let (src, dst) = (&self.src[..len], &mut self.dst[..len]);
        best_of(reps, || {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&mut *dst);
        })
    }
}

/// Weight-like data: roughly normal (sum of four uniforms), generated in parallel.
fn weights(n: usize) -> Vec<f32> {
    let mut x = vec![0f32; n];
    x.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
        let mut s = (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for v in out {
            let mut sum = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                sum += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            *v = (sum - 2.0) * 0.05;
        }
    });
    x
}

fn bench_dtype<T: Element>(
    name: &'static str,
    args: &BenchArgs,
    base: &[f32],
    memcpy: &mut Memcpy,
    records: &mut Vec<Record>,
) -> CliResult {
    let n = base.len();
    let bs = args.blocksize;
    let input: Vec<T> = base.par_iter().map(|&v| T::from_f32(v)).collect();
    let mut out: Vec<T> = vec![T::from_f32(1.0); n];
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, bs)];
    let mut dq_codes = vec![0u8; absmax.len()];
    let mut dq_nested = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    let dense = n * std::mem::size_of::<T>();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for dq in [false, true] {
            // Quantize into reused buffers, with double quantization when asked.
            let mut offset = 0.0;
            let mut err = None;
            let seconds = best_of(args.reps, || {
                let done = if dq {
                    quantize_double_into(
                        qt,
                        &input,
                        bs,
                        &mut packed,
                        &mut absmax,
                        &mut dq_codes,
                        &mut dq_nested,
                    )
                    .map(|o| offset = o)
                } else {
                    quantize_into(qt, &input, bs, &mut packed, &mut absmax)
                };
                if let Err(e) = done {
                    err = Some(e);
                }
            });
            if let Some(e) = err {
                return Err(format!("quantize: {e}"));
            }
            let codes = &packed[..];
            let view = if dq {
                AbsmaxView::Double {
                    codes: &dq_codes,
                    nested_absmax: &dq_nested,
                    offset,
                }
            } else {
                AbsmaxView::F32(&absmax)
            };
            let bytes = dense + codes.len() + absmax_bytes(view);
            records.push(Record {
                op: "quantize",
                quant_type: qt,
                double_quant: dq,
                dtype: name,
                elements: n,
                bytes,
                seconds,
                memcpy_seconds: memcpy.time(bytes, args.reps),
            });

            // Dequantize (a double-quantized absmax is reconstructed inside the kernel).
            let seconds = best_of(args.reps, || {
                if let Err(e) = dequantize_into(qt, codes, view, bs, &mut out) {
                    err = Some(e);
                }
            });
            if let Some(e) = err {
                return Err(format!("dequantize: {e}"));
            }
            std::hint::black_box(&out);
            records.push(Record {
                op: "dequantize",
                quant_type: qt,
                double_quant: dq,
                dtype: name,
                elements: n,
                bytes,
                seconds,
                memcpy_seconds: memcpy.time(bytes, args.reps),
            });
        }
    }
    Ok(())
}

/// Run `qlora bench`.
pub(crate) fn run(args: &BenchArgs) -> CliResult {
    qlora_codec::check_blocksize(args.blocksize).map_err(|e| e.to_string())?;
    if args.size == 0 {
        return Err("--size must be at least 1".to_string());
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    let records = pool.install(|| -> Result<Vec<Record>, String> {
        let base = weights(args.size);
        let mut memcpy = Memcpy {
            src: Vec::new(),
            dst: Vec::new(),
            threads,
        };
        let mut records = Vec::new();
        bench_dtype::<f32>("f32", args, &base, &mut memcpy, &mut records)?;
        bench_dtype::<bf16>("bf16", args, &base, &mut memcpy, &mut records)?;
        bench_dtype::<f16>("f16", args, &base, &mut memcpy, &mut records)?;
        Ok(records)
    })?;
    if args.json {
        print_json(&records, args, threads);
    } else {
        print_table(&records, args, threads);
    }
    Ok(())
}

fn print_json(records: &[Record], args: &BenchArgs, threads: usize) {
    let rows: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "op": r.op,
                "quant_type": r.quant_type.as_str(),
                "double_quant": r.double_quant,
                "dtype": r.dtype,
                "elements": r.elements,
                "seconds": r.seconds,
                "gbps": r.gbps(),
                "ratio_to_memcpy": r.ratio(),
                "bytes": r.bytes,
                "memcpy_gbps": r.memcpy_gbps(),
                "blocksize": args.blocksize,
                "threads": threads,
                "implementation": Implementation::active().name(),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&rows).expect("plain values serialize")
    );
}

fn print_table(records: &[Record], args: &BenchArgs, threads: usize) {
    println!(
        "qlora bench: {} elements, block {}, {} thread(s), kernels: {}, best of {}",
        args.size,
        args.blocksize,
        threads,
        Implementation::active(),
        args.reps.max(1)
    );
    println!("GB/s counts the bytes moved: dense tensor + packed codes + absmax storage.");
    println!("memcpy: a parallel copy moving the same number of bytes, timed after each case.\n");
    println!(
        "{:<11} {:<4} {:<3} {:<5} {:>10} {:>8} {:>12} {:>9}",
        "op", "type", "dq", "dtype", "Gelem/s", "GB/s", "memcpy GB/s", "vs memcpy"
    );
    for r in records {
        println!(
            "{:<11} {:<4} {:<3} {:<5} {:>10.3} {:>8.2} {:>12.2} {:>9.2}",
            r.op,
            r.quant_type.as_str(),
            if r.double_quant { "yes" } else { "no" },
            r.dtype,
            r.elements as f64 / r.seconds / 1e9,
            r.gbps(),
            r.memcpy_gbps(),
            r.ratio()
        );
    }
}
