//! Every kernel against the CPU oracles of the workspace, on a real GPU:
//! `qlora-codec` (NF4/FP4), `qlora-double-quant` (dynamic maps, 8-bit codec, double quant) and
//! `qlora-optim` (8-bit and 32-bit AdamW). The codecs and the optimizer steps must agree bit for
//! bit (the kernels are compiled without fast math); the fused GEMV within a summation-order
//! tolerance.
//!
//! Skips with a message when no GPU (driver, device or NVRTC) is found; fails instead when
//! `QLORA_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use qlora_cuda::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use qlora_cuda::{
    Adam8bitState, AdamParams, CudaError, Device, DynamicMaps, Element, QuantType, Scales,
};
use qlora_double_quant::{DoubleQuantAbsmax, DynamicMap};

fn device() -> Option<Device> {
    match Device::new(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            if std::env::var("QLORA_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("QLORA_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

fn up<T: DeviceRepr>(dev: &Device, data: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(data).expect("upload")
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &Device, n: usize) -> CudaSlice<T> {
    dev.stream().alloc_zeros(n).expect("alloc")
}

fn down<T: DeviceRepr>(dev: &Device, s: &CudaSlice<T>) -> Vec<T> {
    dev.stream().clone_dtoh(s).expect("download")
}

/// splitmix64: deterministic data without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Approximately N(0, 1): sum of four uniforms, centred and scaled.
    fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * 1.732_050_8
    }
}

/// Weights with the awkward cases mixed in: an all-zero block, NaN, ±Inf, exact threshold
/// multiples, tiny values.
fn test_data(n: usize, blocksize: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 0.02).collect();
    if n > 3 * blocksize {
        x[blocksize..2 * blocksize].fill(0.0);
        x[2 * blocksize + 3] = f32::NAN;
        // A block whose absmax is exactly 1 with values on every NF4 threshold.
        let b = 3 * blocksize;
        let end = (b + blocksize).min(n);
        x[b] = 1.0;
        for (k, t) in qlora_cuda::constants::NF4_THRESHOLDS.iter().enumerate() {
            if b + 1 + k < end {
                x[b + 1 + k] = *t;
            }
        }
    }
    if n > 5 * blocksize {
        x[4 * blocksize + 1] = f32::INFINITY;
        x[5 * blocksize + 2] = f32::NEG_INFINITY;
        x[5 * blocksize + 3] = 1e-30;
    }
    x
}

fn bits<T: qlora_codec::Element>(v: &[T]) -> Vec<u32> {
    v.iter()
        .map(|x| {
            let f = x.to_f32();
            if f.is_nan() {
                0x7fc0_0000
            } else {
                f.to_bits()
            }
        })
        .collect()
}

fn codec_quant(q: QuantType) -> qlora_codec::QuantType {
    match q {
        QuantType::Nf4 => qlora_codec::QuantType::Nf4,
        QuantType::Fp4 => qlora_codec::QuantType::Fp4,
    }
}

const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

fn quantize_case<T>(dev: &Device, quant: QuantType, blocksize: usize, n: usize)
where
    T: Element + qlora_codec::Element + DeviceRepr,
{
    let x: Vec<T> = test_data(n, blocksize, n as u64 ^ blocksize as u64)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let blocks = n.div_ceil(blocksize);
    let mut cpu_packed = vec![0u8; n.div_ceil(2)];
    let mut cpu_absmax = vec![0f32; blocks];
    qlora_codec::quantize_into(
        codec_quant(quant),
        &x,
        blocksize,
        &mut cpu_packed,
        &mut cpu_absmax,
    )
    .unwrap();

    let gx = up(dev, &x);
    let mut packed = zeros::<u8>(dev, n.div_ceil(2));
    let mut absmax = zeros::<f32>(dev, blocks);
    dev.quantize_4bit(&gx, quant, blocksize, &mut packed, &mut absmax)
        .unwrap();
    let gpu_packed = down(dev, &packed);
    let gpu_absmax = down(dev, &absmax);
    let what = format!(
        "{quant:?} {} bs={blocksize} n={n}",
        std::any::type_name::<T>()
    );
    assert_eq!(
        bits(&gpu_absmax),
        bits(&cpu_absmax),
        "absmax differs: {what}"
    );
    if let Some(i) = (0..gpu_packed.len()).find(|&i| gpu_packed[i] != cpu_packed[i]) {
        panic!(
            "packed byte {i} differs ({:#04x} GPU vs {:#04x} CPU): {what}",
            gpu_packed[i], cpu_packed[i]
        );
    }

    // Dequantize, plain and double-quantized, into every output type.
    dequantize_case::<T>(dev, quant, blocksize, &cpu_packed, &cpu_absmax, n);
}

fn dequantize_case<T>(
    dev: &Device,
    quant: QuantType,
    blocksize: usize,
    packed: &[u8],
    absmax: &[f32],
    n: usize,
) where
    T: Element + qlora_codec::Element + DeviceRepr,
{
    let gpacked = up(dev, packed);
    let gabsmax = up(dev, absmax);
    let mut out = zeros::<T>(dev, n);
    dev.dequantize_4bit(
        &gpacked,
        Scales::Absmax(&gabsmax),
        quant,
        blocksize,
        &mut out,
    )
    .unwrap();
    let mut cpu = vec![T::from_f32(0.0); n];
    qlora_codec::dequantize_into(
        codec_quant(quant),
        packed,
        qlora_codec::AbsmaxView::F32(absmax),
        blocksize,
        &mut cpu,
    )
    .unwrap();
    assert_eq!(
        bits(&down(dev, &out)),
        bits(&cpu),
        "dequantize {quant:?} bs={blocksize}"
    );

    // Double quantization needs finite absmax values.
    if absmax.iter().all(|a| a.is_finite()) {
        let dq = DoubleQuantAbsmax::compress(absmax);
        let gq = up(dev, &dq.codes);
        let gnested = up(dev, &dq.nested_absmax);
        let gcode = up(dev, DynamicMap::signed().values());
        let scales = Scales::Double {
            qabsmax: &gq,
            nested_absmax: &gnested,
            nested_code: &gcode,
            offset: dq.offset,
        };
        dev.dequantize_4bit(&gpacked, scales, quant, blocksize, &mut out)
            .unwrap();
        qlora_codec::dequantize_into(
            codec_quant(quant),
            packed,
            qlora_codec::AbsmaxView::Double {
                codes: &dq.codes,
                nested_absmax: &dq.nested_absmax,
                offset: dq.offset,
            },
            blocksize,
            &mut cpu,
        )
        .unwrap();
        assert_eq!(
            bits(&down(dev, &out)),
            bits(&cpu),
            "double-quant dequantize {quant:?} bs={blocksize}"
        );
    }
}

#[test]
fn gpu_4bit_codec_matches_cpu_oracle() {
    let Some(dev) = device() else { return };
    for quant in [QuantType::Nf4, QuantType::Fp4] {
        for bs in BLOCKSIZES {
            for n in [1, 2, 31, 1001, 6 * bs + 7, 100_003] {
                quantize_case::<f32>(&dev, quant, bs, n);
                quantize_case::<f16>(&dev, quant, bs, n);
                quantize_case::<bf16>(&dev, quant, bs, n);
            }
        }
    }
}

#[test]
fn gpu_4bit_reference_vector_bs64() {
    // Reference §10.2: a_i = f32(((i*7919) mod 2001) - 1000) / 256, first packed bytes.
    let Some(dev) = device() else { return };
    let n: usize = 1_000_003;
    let x: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 7919) % 2001) as f32 - 1000.0) / 256.0)
        .collect();
    let gx = up(&dev, &x);
    let mut packed = zeros::<u8>(&dev, n.div_ceil(2));
    let mut absmax = zeros::<f32>(&dev, n.div_ceil(64));
    dev.quantize_4bit(&gx, QuantType::Nf4, 64, &mut packed, &mut absmax)
        .unwrap();
    let packed = down(&dev, &packed);
    let absmax = down(&dev, &absmax);
    assert_eq!(packed.len(), 500_002);
    assert_eq!(
        &packed[..8],
        &[0x0f, 0xee, 0xed, 0xcc, 0xba, 0x98, 0x76, 0x54]
    );
    assert_eq!(packed[packed.len() - 1], 0x07);
    assert_eq!(
        &absmax[..4],
        &[3.90625, 3.851_562_5, 3.839_843_8, 3.867_187_5]
    );
}

#[test]
fn gpu_8bit_codec_matches_cpu_oracle() {
    let Some(dev) = device() else { return };
    for map in [DynamicMap::signed(), DynamicMap::unsigned()] {
        let gcode = up(&dev, map.values());
        for bs in [64, 128, 256, 512, 1024, 2048, 4096] {
            for n in [1, 255, 6 * bs + 5, 70_001] {
                let mut x = test_data(n, bs, 7 + n as u64);
                // Exact midpoints between neighbouring codes (ties go to the even index).
                let v = map.values();
                for k in 0..n.min(255) {
                    if k % 3 == 0 {
                        x[k] = (v[k] + v[k + 1]) * 0.5 * 0.01;
                    }
                }
                x.retain(|v| v.is_finite());
                let n = x.len();
                let blocks = n.div_ceil(bs);
                let mut cpu_codes = vec![0u8; n];
                let mut cpu_absmax = vec![0f32; blocks];
                qlora_double_quant::quantize_blockwise(
                    map,
                    &x,
                    bs,
                    &mut cpu_codes,
                    &mut cpu_absmax,
                )
                .unwrap();
                let gx = up(&dev, &x);
                let mut codes = zeros::<u8>(&dev, n);
                let mut absmax = zeros::<f32>(&dev, blocks);
                dev.quantize_8bit(&gx, &gcode, bs, &mut codes, &mut absmax)
                    .unwrap();
                assert_eq!(
                    down(&dev, &absmax),
                    cpu_absmax,
                    "8-bit absmax bs={bs} n={n}"
                );
                assert_eq!(down(&dev, &codes), cpu_codes, "8-bit codes bs={bs} n={n}");

                let mut cpu_out = vec![0f32; n];
                qlora_double_quant::dequantize_blockwise(
                    map,
                    &cpu_codes,
                    &cpu_absmax,
                    bs,
                    &mut cpu_out,
                )
                .unwrap();
                let mut out = zeros::<f32>(&dev, n);
                let gabs = up(&dev, &cpu_absmax);
                let gcodes = up(&dev, &cpu_codes);
                dev.dequantize_8bit(&gcodes, &gcode, &gabs, bs, &mut out)
                    .unwrap();
                assert_eq!(
                    bits(&down(&dev, &out)),
                    bits(&cpu_out),
                    "8-bit dequant bs={bs}"
                );
            }
        }
    }
}

fn adam8bit_case<T>(dev: &Device, n: usize, steps: u32)
where
    T: Element
        + qlora_optim::Element
        + qlora_codec::Element
        + DeviceRepr
        + PartialEq
        + std::fmt::Debug,
{
    let mut rng = Rng(n as u64 + 99);
    let mut p_cpu: Vec<T> = (0..n)
        .map(|_| <T as qlora_optim::Element>::from_f32(rng.normal() * 0.1))
        .collect();
    let blocks = n.div_ceil(256);
    let (mut s1, mut s2) = (vec![0u8; n], vec![0u8; n]);
    let (mut a1, mut a2) = (vec![0f32; blocks], vec![0f32; blocks]);
    let mut gp = up(dev, &p_cpu);
    let (mut gs1, mut gs2) = (up(dev, &s1), up(dev, &s2));
    let (mut ga1, mut ga2) = (up(dev, &a1), up(dev, &a2));
    let gq1 = up(dev, DynamicMap::signed().values());
    let gq2 = up(dev, DynamicMap::unsigned().values());
    for step in 1..=steps {
        let mut g: Vec<T> = (0..n)
            .map(|_| <T as qlora_optim::Element>::from_f32(rng.normal() * 0.01))
            .collect();
        if n > 10 {
            g[3] = <T as qlora_optim::Element>::from_f32(f32::NAN);
            g[7] = <T as qlora_optim::Element>::from_f32(f32::INFINITY);
        }
        let hp = qlora_optim::AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            step,
            gnorm_scale: 1.0,
        };
        qlora_optim::adam_step_8bit(
            &mut p_cpu,
            &g,
            qlora_optim::Blockwise8bitMut {
                state1: &mut s1,
                state2: &mut s2,
                absmax1: &mut a1,
                absmax2: &mut a2,
            },
            &hp,
        )
        .unwrap();
        let params = AdamParams {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
            step,
            gnorm_scale: 1.0,
            skip_zeros: false,
        };
        let gg = up(dev, &g);
        dev.adam8bit_step(
            &mut gp,
            &gg,
            Adam8bitState {
                state1: &mut gs1,
                state2: &mut gs2,
                absmax1: &mut ga1,
                absmax2: &mut ga2,
            },
            DynamicMaps {
                signed: &gq1,
                unsigned: &gq2,
            },
            &params,
        )
        .unwrap();
        let what = format!("{} n={n} step={step}", std::any::type_name::<T>());
        assert_eq!(bits(&down(dev, &ga1)), bits(&a1), "absmax1 {what}");
        assert_eq!(bits(&down(dev, &ga2)), bits(&a2), "absmax2 {what}");
        assert_eq!(down(dev, &gs1), s1, "state1 {what}");
        assert_eq!(down(dev, &gs2), s2, "state2 {what}");
        assert_eq!(bits(&down(dev, &gp)), bits(&p_cpu), "params {what}");
    }
}

#[test]
fn gpu_adam8bit_matches_cpu_oracle() {
    let Some(dev) = device() else { return };
    for n in [1, 256, 4097, 65_537] {
        adam8bit_case::<f32>(&dev, n, 5);
        adam8bit_case::<f16>(&dev, n, 5);
        adam8bit_case::<bf16>(&dev, n, 5);
    }
}

fn adam32bit_case<T>(dev: &Device, n: usize, steps: u32)
where
    T: Element + qlora_optim::Element + qlora_codec::Element + DeviceRepr,
{
    let mut rng = Rng(n as u64 + 7);
    let mut p_cpu: Vec<T> = (0..n)
        .map(|_| <T as qlora_optim::Element>::from_f32(rng.normal() * 0.1))
        .collect();
    let (mut s1, mut s2) = (vec![0f32; n], vec![0f32; n]);
    let mut gp = up(dev, &p_cpu);
    let (mut gs1, mut gs2) = (up(dev, &s1), up(dev, &s2));
    for step in 1..=steps {
        let g: Vec<T> = (0..n)
            .map(|_| <T as qlora_optim::Element>::from_f32(rng.normal() * 0.01))
            .collect();
        let hp = qlora_optim::AdamStep {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.995,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
            gnorm_scale: 0.75,
        };
        qlora_optim::adam_step_32bit(&mut p_cpu, &g, &mut s1, &mut s2, &hp).unwrap();
        let params = AdamParams {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
            step,
            gnorm_scale: hp.gnorm_scale,
            skip_zeros: false,
        };
        let gg = up(dev, &g);
        dev.adam32bit_step(&mut gp, &gg, &mut gs1, &mut gs2, &params)
            .unwrap();
        let what = format!("{} n={n} step={step}", std::any::type_name::<T>());
        assert_eq!(bits(&down(dev, &gs1)), bits(&s1), "state1 {what}");
        assert_eq!(bits(&down(dev, &gs2)), bits(&s2), "state2 {what}");
        assert_eq!(bits(&down(dev, &gp)), bits(&p_cpu), "params {what}");
    }
}

#[test]
fn gpu_adam32bit_matches_cpu_oracle() {
    let Some(dev) = device() else { return };
    for n in [1, 4095, 4096, 40_001] {
        adam32bit_case::<f32>(&dev, n, 4);
        adam32bit_case::<f16>(&dev, n, 4);
        adam32bit_case::<bf16>(&dev, n, 4);
    }
}

fn gemv_case<T>(dev: &Device, rows: usize, out_f: usize, in_f: usize, bs: usize, double: bool)
where
    T: Element + qlora_codec::Element + DeviceRepr,
{
    let mut rng = Rng((rows * out_f * in_f) as u64);
    let w: Vec<f32> = (0..out_f * in_f)
        .map(|_| rng.normal() / (in_f as f32).sqrt())
        .collect();
    let a: Vec<T> = (0..rows * in_f)
        .map(|_| T::from_f32(rng.normal()))
        .collect();
    let n = w.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    qlora_codec::quantize_into(
        qlora_codec::QuantType::Nf4,
        &w,
        bs,
        &mut packed,
        &mut absmax,
    )
    .unwrap();
    let dq = DoubleQuantAbsmax::compress(&absmax);
    let view = if double {
        qlora_codec::AbsmaxView::Double {
            codes: &dq.codes,
            nested_absmax: &dq.nested_absmax,
            offset: dq.offset,
        }
    } else {
        qlora_codec::AbsmaxView::F32(&absmax)
    };
    let mut wd = vec![0f32; n];
    qlora_codec::dequantize_into(qlora_codec::QuantType::Nf4, &packed, view, bs, &mut wd).unwrap();
    // f64 reference of the dequantized product.
    let reference: Vec<f64> = (0..rows)
        .flat_map(|m| {
            let (a, wd) = (&a, &wd);
            (0..out_f).map(move |j| {
                (0..in_f)
                    .map(|k| a[m * in_f + k].to_f32() as f64 * wd[j * in_f + k] as f64)
                    .sum::<f64>()
            })
        })
        .collect();

    let ga = up(dev, &a);
    let gpacked = up(dev, &packed);
    let gabs = up(dev, &absmax);
    let gq = up(dev, &dq.codes);
    let gn = up(dev, &dq.nested_absmax);
    let gc = up(dev, DynamicMap::signed().values());
    let scales = if double {
        Scales::Double {
            qabsmax: &gq,
            nested_absmax: &gn,
            nested_code: &gc,
            offset: dq.offset,
        }
    } else {
        Scales::Absmax(&gabs)
    };
    let mut out = zeros::<T>(dev, rows * out_f);
    dev.gemv_4bit(
        &ga,
        rows,
        &gpacked,
        scales,
        QuantType::Nf4,
        bs,
        (out_f, in_f),
        &mut out,
    )
    .unwrap();
    let got = down(dev, &out);
    // f32 accumulation over K terms, then the output's rounding to T: at most half an ulp of T,
    // i.e. the unit roundoff u_T (2^-24 for f32, 2^-11 for f16, 2^-8 for bf16) relative to the
    // accumulated value, plus half of f16's smallest subnormal step near zero. (The old bound
    // used f32's epsilon for every T, so a correctly rounded bf16 1.21875 for 1.21503 failed.)
    let ulp_of_one = (1..=30)
        .map(|k| 2f32.powi(-k))
        .take_while(|&e| T::from_f32(1.0 + e).to_f32() != 1.0)
        .last()
        .expect("T represents 1.5");
    let unit_roundoff = ulp_of_one as f64 / 2.0;
    for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
        let scale: f64 = (0..in_f)
            .map(|k| {
                let (m, j) = (i / out_f, i % out_f);
                (a[m * in_f + k].to_f32() as f64 * wd[j * in_f + k] as f64).abs()
            })
            .sum();
        let accumulation = scale * (in_f as f64 * f32::EPSILON as f64);
        let tol = accumulation + (r.abs() + accumulation) * unit_roundoff + 3e-8;
        assert!(
            (g.to_f32() as f64 - r).abs() <= tol,
            "gemv out[{i}] = {} vs {r} (tol {tol}), rows={rows} N={out_f} K={in_f} bs={bs}",
            g.to_f32()
        );
    }
}

#[test]
fn gpu_gemv_4bit_matches_dequantized_product() {
    let Some(dev) = device() else { return };
    for (rows, out_f, in_f, bs) in [(1, 257, 1024, 64), (3, 64, 4096, 128), (8, 33, 130, 32)] {
        for double in [false, true] {
            gemv_case::<f32>(&dev, rows, out_f, in_f, bs, double);
            gemv_case::<f16>(&dev, rows, out_f, in_f, bs, double);
            gemv_case::<bf16>(&dev, rows, out_f, in_f, bs, double);
        }
    }
}

#[test]
fn gpu_launchers_reject_bad_lengths_before_launching() {
    let Some(dev) = device() else { return };
    let x = zeros::<f32>(&dev, 100);
    let mut packed = zeros::<u8>(&dev, 49);
    let mut absmax = zeros::<f32>(&dev, 2);
    assert!(matches!(
        dev.quantize_4bit(&x, QuantType::Nf4, 64, &mut packed, &mut absmax),
        Err(CudaError::LengthMismatch {
            what: "packed",
            expected: 50,
            found: 49
        })
    ));
    let mut packed = zeros::<u8>(&dev, 50);
    assert!(matches!(
        dev.quantize_4bit(&x, QuantType::Nf4, 48, &mut packed, &mut absmax),
        Err(CudaError::InvalidBlocksize { blocksize: 48, .. })
    ));
    let mut p = zeros::<f32>(&dev, 10);
    let g = zeros::<f32>(&dev, 10);
    let (mut s1, mut s2) = (zeros::<f32>(&dev, 10), zeros::<f32>(&dev, 9));
    assert!(matches!(
        dev.adam32bit_step(&mut p, &g, &mut s1, &mut s2, &AdamParams::default()),
        Err(CudaError::LengthMismatch { what: "state2", .. })
    ));
    let mut s2 = zeros::<f32>(&dev, 10);
    let bad = AdamParams {
        step: 0,
        ..AdamParams::default()
    };
    assert!(matches!(
        dev.adam32bit_step(&mut p, &g, &mut s1, &mut s2, &bad),
        Err(CudaError::InvalidArgument { .. })
    ));
}
