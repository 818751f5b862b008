//! Shared pieces of the fuzz targets: the checks themselves (also used by the regression tests
//! of crashes), and a stable-Rust smoke driver that mutates seed inputs when libFuzzer is not
//! available.
#![forbid(unsafe_code)]

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Define a fuzz target: under cargo-fuzz (`--cfg fuzzing`) a libFuzzer entry point, otherwise a
/// `main` that runs the smoke driver over `$seeds`.
#[macro_export]
macro_rules! target {
    ($name:expr, $seeds:expr, $check:path) => {
        #[cfg(fuzzing)]
        libfuzzer_sys::fuzz_target!(|data: &[u8]| $check(data));

        #[cfg(not(fuzzing))]
        fn main() {
            $crate::smoke_main($name, &$seeds, $check)
        }
    };
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [&[u8]; 14] = [
    b"0",
    b"-1",
    b"1e308",
    b"NaN",
    b"null",
    b"[]",
    b"{}",
    b"\"",
    b"4294967296",
    b"18446744073709551615",
    b"\xff",
    b"\x00",
    b",",
    b"}",
];

fn mutate(rng: &mut Rng, seeds: &[&[u8]], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                input.drain(i..i + n);
            }
            4 => input.truncate(rng.below(len + 1)),
            5 => {
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(len + 1);
                input.splice(i..i, tok.iter().copied());
            }
            6 if len >= 8 => {
                // The 8-byte little-endian length prefix of safetensors, or any u64.
                let i = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(len - 7)
                };
                let v: u64 = match rng.below(4) {
                    0 => rng.next(),
                    1 => rng.below(len * 2) as u64,
                    2 => u64::MAX - rng.below(16) as u64,
                    _ => u64::from_le_bytes(input[i..i + 8].try_into().unwrap_or_default())
                        .wrapping_add(rng.below(17) as u64)
                        .wrapping_sub(8),
                };
                input[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            7 if len > 0 => {
                // Change a digit: offsets, shapes, sizes in JSON.
                let digits: Vec<usize> = (0..len).filter(|&i| input[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    input[i] = b'0' + rng.below(10) as u8;
                }
            }
            _ => {
                // Splice in part of another seed.
                let other = seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a + 1);
                    let i = rng.below(len + 1);
                    input.splice(i..i, other[a..b].iter().copied());
                }
            }
        }
    }
}

/// Run `check` over the seeds and then over random mutations of them, for `iterations` inputs
/// (argv[1], default 100 000) or `seconds` (argv[2]), whichever ends first. A panic saves the
/// input to `artifacts/<name>/crash-<n>` and exits with status 1.
pub fn smoke_main(name: &str, seeds: &[&[u8]], check: fn(&[u8])) {
    let args: Vec<String> = std::env::args().collect();
    let iterations: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let seconds: f64 = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(f64::INFINITY);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds.min(1e9));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ iterations);
    std::panic::set_hook(Box::new(|_| {}));
    let run = |input: &[u8], n: u64| {
        if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
            let dir = std::path::Path::new("artifacts").join(name);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{n}"));
            let _ = std::fs::File::create(&path).and_then(|mut f| f.write_all(input));
            let _ = std::panic::take_hook();
            eprintln!("{name}: input {n} panicked; saved to {}", path.display());
            // Re-run outside catch_unwind for the panic message.
            check(input);
            std::process::exit(1);
        }
    };
    for (i, s) in seeds.iter().enumerate() {
        run(s, i as u64);
    }
    let mut done = 0;
    let mut input = Vec::new();
    while done < iterations && Instant::now() < deadline {
        input.clear();
        input.extend_from_slice(seeds[rng.below(seeds.len())]);
        mutate(&mut rng, seeds, &mut input);
        run(&input, done);
        done += 1;
    }
    eprintln!("{name}: {done} mutated inputs, no panic");
}

/// Parse a safetensors file held in memory, group it, read every 4-bit group and dense tensor.
pub fn check_safetensors_checkpoint(data: &[u8]) {
    if let Ok(ck) = qlora_checkpoint::read_checkpoint_bytes(data, "fuzz") {
        for e in ck.entries() {
            match e {
                qlora_checkpoint::Entry::Quantized { name, .. } => {
                    if let Ok(q) = ck.quantized(name) {
                        let _ = q.dequantize::<f32>();
                    }
                }
                qlora_checkpoint::Entry::Dense { name, .. } => {
                    let _ = ck.dense_as::<f32>(name);
                }
            }
        }
    }
}

/// The same through the lazy folder reader (own header validation, per-tensor maps): the bytes
/// are written to a temporary file first.
pub fn check_model_file(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("qlora-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(model) = qlora_checkpoint::ModelFolder::open(&path) {
        for e in model.entries() {
            match e {
                qlora_checkpoint::Entry::Quantized { name, .. } => {
                    if let Ok(q) = model.quantized(name) {
                        let _ = q.dequantize::<f32>();
                    }
                }
                qlora_checkpoint::Entry::Dense { name, .. } => {
                    let _ = model.dense_as::<f32>(name);
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Parse a quant-state blob; an accepted blob must survive a write/parse round trip.
pub fn check_quant_state_json(data: &[u8]) {
    if let Ok(s) = qlora_checkpoint::QuantState::from_json_bytes(data) {
        let again = qlora_checkpoint::QuantState::from_json_bytes(&s.to_json_bytes())
            .expect("a written quant state parses");
        assert_eq!(again, s);
    }
}

/// Parse a shard index.
pub fn check_index_json(data: &[u8]) {
    let _ = qlora_checkpoint::parse_index_json(data, std::path::Path::new("fuzz.index.json"));
}

/// Parse and validate a config.json.
pub fn check_config_json(data: &[u8]) {
    if let Ok(c) =
        qlora_checkpoint::parse_config_json(data, std::path::Path::new("fuzz-config.json"))
    {
        let _ = qlora_checkpoint::config_dtype(&c);
        let _ = qlora_checkpoint::is_bnb_4bit(&c);
    }
}

/// Arbitrary bytes as a 4-bit tensor: the first bytes choose quant type, block size, double
/// quant and shape; the rest are the packed codes and absmax. Whatever `from_parts` accepts must
/// dequantize without panicking.
pub fn check_dequantize_bytes(data: &[u8]) {
    use qlora_codec::{Absmax, Dtype, QuantType, QuantizedTensor, BLOCK_SIZES};
    if data.len() < 4 {
        return;
    }
    let quant_type = if data[0] & 1 == 0 {
        QuantType::Nf4
    } else {
        QuantType::Fp4
    };
    let double_quant = data[0] & 2 != 0;
    // Out-of-range block sizes on purpose now and then (1 in 8).
    let blocksize = match data[1] as usize % 9 {
        8 => 48,
        i => BLOCK_SIZES[i],
    };
    let rows = data[2] as usize % 17;
    let cols = data[3] as usize % 67 + 1;
    let n = rows * cols;
    // The remaining bytes, repeated as needed, fill the codes and the absmax; bit 2 of the first
    // byte drops one absmax value (a count mismatch that must be refused, not read past).
    if data.len() == 4 {
        return;
    }
    let mut src = data[4..].iter().copied().cycle();
    let packed: Vec<u8> = src.by_ref().take(n.div_ceil(2)).collect();
    let blocks = n
        .div_ceil(blocksize)
        .saturating_sub(usize::from(data[0] & 4 != 0));
    let mut f32s = |k: usize| -> Vec<f32> {
        (0..k)
            .map(|_| f32::from_le_bytes([0; 4].map(|_| src.next().unwrap_or(0))))
            .collect()
    };
    let absmax = if double_quant {
        let codes: Vec<u8> = (0..blocks)
            .map(|i| data[4 + i % (data.len() - 4)])
            .collect();
        Absmax::Double(qlora_codec::DoubleQuantAbsmax {
            codes,
            nested_absmax: f32s(n.div_ceil(blocksize).div_ceil(256)),
            offset: 0.25,
        })
    } else {
        Absmax::F32(f32s(blocks))
    };
    if let Ok(q) = QuantizedTensor::from_parts(
        quant_type,
        blocksize,
        Dtype::BF16,
        vec![rows, cols],
        packed,
        absmax,
    ) {
        let out: Vec<f32> = q.dequantize().expect("from_parts accepted it");
        assert_eq!(out.len(), n);
        let _ = q.dequantize::<half::bf16>();
    }
}
