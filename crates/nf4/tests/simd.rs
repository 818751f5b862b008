//! Every implementation this machine can run (AVX-512, AVX2, NEON, …) against the scalar oracle,
//! byte for byte: lengths around vector and block boundaries, every block size, every dtype,
//! NF4 and FP4, plain and double-quantized absmax, unaligned range starts and unaligned output
//! buffers, special values (NaN, ±Inf, ±0, subnormals, all-zero blocks, values on thresholds) and
//! arbitrary absmax bit patterns. Implementations the CPU lacks are skipped (and listed).

use half::{bf16, f16};
use qlora_codec::{
    codebook, scalar, AbsmaxView, CodecKernels, Element, Implementation, QuantType, BLOCK_SIZES,
    PARALLEL_THRESHOLD,
};

const QUANT_TYPES: [QuantType; 2] = [QuantType::Nf4, QuantType::Fp4];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn fast_impls() -> Vec<Implementation> {
    let all = Implementation::available();
    eprintln!("implementations available here: {all:?}");
    all.into_iter()
        .filter(|&i| i != Implementation::Scalar)
        .collect()
}

/// Lengths that probe vector (8/16/32) and block boundaries.
fn lengths(bs: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 65];
    for k in [1, 2, 3] {
        v.extend([k * bs - 1, k * bs, k * bs + 1, k * bs + 17, k * bs + 31]);
    }
    // 16 and more whole blocks: the AVX-512 kernel's 16-block path (block sizes 64 and 128).
    if bs <= 128 {
        v.extend([16 * bs - 1, 16 * bs, 16 * bs + 1, 33 * bs + 17]);
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Mostly smooth random values with special values sprinkled in; some blocks all zero, some
/// holding the NF4/FP4 thresholds exactly (with absmax 1 so that `x · (1/absmax)` is exact).
fn special_input(n: usize, bs: usize, rng: &mut Rng) -> Vec<f32> {
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::from_bits(1),            // smallest subnormal
        -f32::from_bits(0x007f_ffff), // largest subnormal
        f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        1.0,
        -1.0,
    ];
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let r = rng.next();
            match r % 97 {
                0..=3 => specials[(r >> 8) as usize % specials.len()],
                _ => (rng.unit() * 2.0 - 1.0) * 10f32.powi((r >> 20) as i32 % 7 - 3),
            }
        })
        .collect();
    for (b, block) in x.chunks_mut(bs).enumerate() {
        match b % 5 {
            1 => block.fill(0.0),
            2 => {
                // Exactly on thresholds and codebook values, absmax exactly 1.
                for (i, v) in block.iter_mut().enumerate() {
                    let t = &codebook::NF4_THRESHOLDS;
                    let f = &codebook::FP4_THRESHOLDS;
                    *v = match i % 4 {
                        0 => t[i / 4 % 15],
                        1 => f[i / 4 % 7],
                        2 => -f[i / 4 % 7],
                        _ => codebook::NF4_TABLE[i / 4 % 16],
                    };
                }
                block[0] = 1.0;
            }
            3 if b % 3 == 0 => {
                // A tiny absmax (below 2^-100): normal and subnormal values whose flush to zero
                // changes codes (the CUDA build's ftz).
                for v in block.iter_mut() {
                    *v *= 2f32.powi(-118);
                }
            }
            _ => {}
        }
    }
    x
}

fn bits<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn convert<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

fn check_quantize<T: Element>(imp: Implementation, qt: QuantType, x: &[T], bs: usize) {
    let n = x.len();
    let (mut p1, mut a1) = (vec![0xa5u8; n.div_ceil(2)], vec![-7.0f32; n.div_ceil(bs)]);
    let (mut p2, mut a2) = (vec![0x5au8; n.div_ceil(2)], vec![7.0f32; n.div_ceil(bs)]);
    imp.quantize_into(qt, x, bs, &mut p1, &mut a1).unwrap();
    scalar::quantize_blocks(qt, x, bs, &mut p2, &mut a2);
    assert_eq!(
        p1,
        p2,
        "{imp} quantize codes {qt:?} {:?} n={n} bs={bs}",
        T::DTYPE
    );
    assert_eq!(
        bits(&a1),
        bits(&a2),
        "{imp} quantize absmax {qt:?} {:?} n={n} bs={bs}",
        T::DTYPE
    );
}

fn check_dequantize<T: Element>(
    imp: Implementation,
    qt: QuantType,
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    bs: usize,
    n: usize,
) {
    let mut o1 = vec![T::from_f32(7.0); n];
    let mut o2 = vec![T::from_f32(-7.0); n];
    imp.dequantize_into(qt, packed, absmax, bs, &mut o1)
        .unwrap();
    scalar::dequantize_range(qt, packed, absmax, bs, 0, &mut o2);
    assert_eq!(
        bits(&o1),
        bits(&o2),
        "{imp} dequantize {qt:?} {:?} n={n} bs={bs}",
        T::DTYPE
    );
}

/// Ranges with unaligned starts, written into output buffers at every alignment offset.
fn check_ranges<T: Element>(
    imp: Implementation,
    qt: QuantType,
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    bs: usize,
    n: usize,
) {
    let starts = [0, 1, 2, 3, 15, 16, 17, 31, 33, bs - 1, bs, bs + 1, bs + 33];
    let lens = [
        0,
        1,
        2,
        17,
        31,
        32,
        33,
        64,
        95,
        bs + 3,
        2 * bs + 41,
        usize::MAX,
    ];
    let mut buf = vec![T::from_f32(0.0); n + 64];
    let mut oracle = vec![T::from_f32(0.0); n];
    for &start in starts.iter().filter(|&&s| s <= n) {
        for &len in &lens {
            let len = len.min(n - start);
            scalar::dequantize_range(qt, packed, absmax, bs, start, &mut oracle[..len]);
            for offset in [0, 1, 3, 8, 17] {
                let out = &mut buf[offset..offset + len];
                imp.dequantize_range_into(qt, packed, absmax, bs, n, start, out)
                    .unwrap();
                assert_eq!(
                    bits(out),
                    bits(&oracle[..len]),
                    "{imp} range {qt:?} {:?} bs={bs} n={n} start={start} len={len} offset={offset}",
                    T::DTYPE
                );
            }
        }
    }
}

fn random_double_quant(blocks: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>, f32) {
    let codes: Vec<u8> = (0..blocks).map(|_| rng.next() as u8).collect();
    let nested: Vec<f32> = (0..blocks.div_ceil(256))
        .map(|_| rng.unit() * 3.0 + 0.01)
        .collect();
    (codes, nested, rng.unit() * 2.0)
}

#[test]
fn quantize_matches_oracle_everywhere() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for imp in fast_impls() {
        for qt in QUANT_TYPES {
            for bs in BLOCK_SIZES {
                for n in lengths(bs) {
                    let x = special_input(n, bs, &mut rng);
                    check_quantize(imp, qt, &x, bs);
                    check_quantize(imp, qt, &convert::<f16>(&x), bs);
                    check_quantize(imp, qt, &convert::<bf16>(&x), bs);
                    // Without all-zero or tiny blocks (which send their group to the oracle), so
                    // that groups of blocks take the vector paths with NaN and subnormal values.
                    let mut y = x.clone();
                    for block in y.chunks_mut(bs) {
                        if block.iter().all(|v| v.abs() < 2f32.powi(-100)) {
                            block[0] = 0.75;
                        }
                    }
                    check_quantize(imp, qt, &y, bs);
                    check_quantize(imp, qt, &convert::<bf16>(&y), bs);
                    // The same without NaN, so that most blocks take the NaN-free paths.
                    let x: Vec<f32> = x
                        .iter()
                        .map(|&v| if v.is_nan() { 0.5 } else { v })
                        .collect();
                    check_quantize(imp, qt, &x, bs);
                    check_quantize(imp, qt, &convert::<f16>(&x), bs);
                    check_quantize(imp, qt, &convert::<bf16>(&x), bs);
                    // Finite values only (AVX-512: groups of blocks without NaN or infinity take
                    // the bucket search without conversion), still with subnormal values,
                    // thresholds, ±f32::MAX (absmax ≥ 2^126: reciprocal 0) and tiny blocks.
                    let x: Vec<f32> = x
                        .iter()
                        .map(|&v| if v.is_finite() { v } else { -0.25 })
                        .collect();
                    check_quantize(imp, qt, &x, bs);
                    check_quantize(imp, qt, &convert::<f16>(&x), bs);
                    check_quantize(imp, qt, &convert::<bf16>(&x), bs);
                    check_quantize(
                        imp,
                        qt,
                        &y.iter()
                            .map(|&v| if v.is_finite() { v } else { 0.125 })
                            .collect::<Vec<f32>>(),
                        bs,
                    );
                }
            }
        }
    }
}

#[test]
fn dequantize_matches_oracle_everywhere() {
    let mut rng = Rng(0x0bad_cafe_f00d_0001);
    for imp in fast_impls() {
        for qt in QUANT_TYPES {
            for bs in BLOCK_SIZES {
                for n in lengths(bs) {
                    let blocks = n.div_ceil(bs);
                    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.next() as u8).collect();
                    let absmax: Vec<f32> = (0..blocks).map(|_| rng.unit() * 4.0).collect();
                    let (codes, nested, offset) = random_double_quant(blocks, &mut rng);
                    let views = [
                        AbsmaxView::F32(&absmax),
                        AbsmaxView::Double {
                            codes: &codes,
                            nested_absmax: &nested,
                            offset,
                        },
                    ];
                    for view in views {
                        check_dequantize::<f32>(imp, qt, &packed, view, bs, n);
                        check_dequantize::<f16>(imp, qt, &packed, view, bs, n);
                        check_dequantize::<bf16>(imp, qt, &packed, view, bs, n);
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_ranges_match_oracle() {
    let mut rng = Rng(0x5eed_0000_0000_0042);
    for imp in fast_impls() {
        for qt in QUANT_TYPES {
            for bs in BLOCK_SIZES {
                let n = 3 * bs + 77;
                let blocks = n.div_ceil(bs);
                let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.next() as u8).collect();
                let absmax: Vec<f32> = (0..blocks).map(|_| rng.unit() * 4.0).collect();
                let (codes, nested, offset) = random_double_quant(blocks, &mut rng);
                let dq = AbsmaxView::Double {
                    codes: &codes,
                    nested_absmax: &nested,
                    offset,
                };
                for view in [AbsmaxView::F32(&absmax), dq] {
                    check_ranges::<f32>(imp, qt, &packed, view, bs, n);
                    check_ranges::<f16>(imp, qt, &packed, view, bs, n);
                    check_ranges::<bf16>(imp, qt, &packed, view, bs, n);
                }
            }
        }
    }
}

/// Every absmax bit pattern class (NaN with payloads, ±Inf, subnormals, huge values whose products
/// overflow f16/bf16, values whose products are rounding ties) through the output conversions.
#[test]
fn dequantize_special_absmax_matches_oracle() {
    let mut rng = Rng(0xdead_beef_0000_0007);
    let mut absmax: Vec<f32> = vec![
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc1_2345),
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::from_bits(1),
        f32::from_bits(0x0040_0000),
        f32::MIN_POSITIVE,
        6.0e-8,
        65504.0,
        65520.0,
        1.0e5,
        f32::MAX,
        3.0e38,
        1.0,
    ];
    absmax.extend((0..2000).map(|_| f32::from_bits(rng.next() as u32)));
    // Products that land on f16 and bf16 rounding ties: absmax = tie / table value.
    for c in 0..16 {
        let t = QuantType::Nf4.table()[c];
        if t != 0.0 {
            absmax.push(f32::from_bits(0x3f80_8000) / t);
            absmax.push(f32::from_bits(0x3f80_1000) / t);
        }
    }
    for imp in fast_impls() {
        for qt in QUANT_TYPES {
            for bs in [32, 64] {
                let n = absmax.len() * bs;
                let packed: Vec<u8> = (0..n / 2).map(|i| (i * 0x11 + i / 8) as u8).collect();
                let view = AbsmaxView::F32(&absmax);
                check_dequantize::<f32>(imp, qt, &packed, view, bs, n);
                check_dequantize::<f16>(imp, qt, &packed, view, bs, n);
                check_dequantize::<bf16>(imp, qt, &packed, view, bs, n);
            }
        }
    }
}

/// Large enough for the rayon path and for streaming stores (≥ 16 MiB of output).
#[test]
fn large_tensors_match_oracle() {
    let mut rng = Rng(0x600d_5eed_1234_0003);
    let n = (5 << 20) + 77;
    assert!(n > PARALLEL_THRESHOLD);
    let x: Vec<f32> = (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let xb: Vec<bf16> = convert(&x);
    for imp in fast_impls() {
        for (qt, bs) in [(QuantType::Nf4, 64), (QuantType::Fp4, 4096)] {
            check_quantize(imp, qt, &x, bs);
            check_quantize(imp, qt, &xb, bs);
            let mut packed = vec![0u8; n.div_ceil(2)];
            let mut absmax = vec![0f32; n.div_ceil(bs)];
            scalar::quantize_blocks(qt, &x, bs, &mut packed, &mut absmax);
            let dq = qlora_codec::DoubleQuantAbsmax::compress(&absmax);
            for view in [
                AbsmaxView::F32(&absmax),
                AbsmaxView::Double {
                    codes: &dq.codes,
                    nested_absmax: &dq.nested_absmax,
                    offset: dq.offset,
                },
            ] {
                check_dequantize::<f32>(imp, qt, &packed, view, bs, n);
                check_dequantize::<bf16>(imp, qt, &packed, view, bs, n);
                check_dequantize::<f16>(imp, qt, &packed, view, bs, n);
            }
        }
    }
}

#[test]
fn dispatch_reports_a_usable_implementation() {
    let available = Implementation::available();
    assert_eq!(available.last(), Some(&Implementation::Scalar));
    assert!(available.contains(&Implementation::best()));
    assert!(available.contains(&Implementation::active()));
    for imp in available {
        assert!(imp.is_available());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            assert!(Implementation::Avx2.is_available());
        }
        assert!(!Implementation::Neon.is_available());
    }
}

/// Whole groups of 16 blocks of 64 whose only unusual values are tiny negative inputs (subnormal,
/// or below 2^-98 with an absmax above 1) or a large absmax (above 2^24) next to a small negative
/// value: there flush-to-zero decides FP4's sign (the input or the product is flushed to −0.0:
/// code 0, not 8), which the AVX-512 kernel's signed-bucket FP4 path must not see.
#[test]
fn fp4_sign_under_flush_to_zero_matches_oracle() {
    let mut rng = Rng(0x5eed_f10a_7000_0001);
    let bs = 64;
    for imp in fast_impls() {
        for case in 0..4 {
            let mut x: Vec<f32> = (0..48 * bs).map(|_| rng.unit() - 0.5).collect();
            for g in 0..3 {
                let block = &mut x[(16 * g + 5) * bs..(16 * g + 6) * bs];
                match case {
                    // A subnormal input (flushed: code 0) in an ordinary block.
                    0 => block[7] = -1e-40,
                    // A tiny normal input whose product with 1/1024 is subnormal.
                    1 => {
                        block[0] = 1024.0;
                        block[9] = -2f32.powi(-120);
                    }
                    // A large absmax: −1e-28 (above 2^-98) · (1/2^40) is subnormal.
                    2 => {
                        block[0] = 2f32.powi(40);
                        block[3] = -1e-28;
                    }
                    // Just above the kernel's limits: still exact.
                    _ => {
                        block[0] = 2f32.powi(24);
                        block[3] = -2f32.powi(-98);
                    }
                }
            }
            for qt in QUANT_TYPES {
                check_quantize(imp, qt, &x, bs);
                check_quantize(imp, qt, &convert::<bf16>(&x), bs);
            }
        }
    }
}

/// `quantize_double_into` (the mean gathered per task, in any order) against the oracle's
/// quantization followed by `DoubleQuantAbsmax::compress`: the same codes, absmax, nested values
/// and offset, for small and multi-task inputs, smooth data (the mean's order-free path) and data
/// whose absmax span many octaves, NaN, infinities and zero blocks (its sequential path).
fn check_quantize_double<T: Element>(imp: Implementation, qt: QuantType, x: &[T], bs: usize) {
    let n = x.len();
    let blocks = n.div_ceil(bs);
    let (mut p1, mut a1) = (vec![0xa5u8; n.div_ceil(2)], vec![-7.0f32; blocks]);
    let (mut c1, mut s1) = (vec![0x5au8; blocks], vec![9.0f32; blocks.div_ceil(256)]);
    let offset = imp
        .quantize_double_into(qt, x, bs, &mut p1, &mut a1, &mut c1, &mut s1)
        .unwrap();
    let (mut p2, mut a2) = (vec![0u8; n.div_ceil(2)], vec![0f32; blocks]);
    scalar::quantize_blocks(qt, x, bs, &mut p2, &mut a2);
    let dq = qlora_codec::DoubleQuantAbsmax::compress(&a2);
    let what = format!("{imp} {qt:?} {:?} n={n} bs={bs}", T::DTYPE);
    assert_eq!(p1, p2, "codes {what}");
    assert_eq!(bits(&a1), bits(&a2), "absmax {what}");
    assert_eq!(offset.to_bits(), dq.offset.to_bits(), "offset {what}");
    assert_eq!(c1, dq.codes, "dq codes {what}");
    assert_eq!(bits(&s1), bits(&dq.nested_absmax), "nested absmax {what}");
}

#[test]
fn quantize_double_into_matches_quantize_then_compress() {
    let mut rng = Rng(0x600d_5eed_1234_0004);
    let n = PARALLEL_THRESHOLD * 4 + 77;
    let smooth: Vec<f32> = (0..n).map(|_| (rng.unit() * 2.0 - 1.0) * 0.05).collect();
    let special = special_input(n, 64, &mut rng);
    for imp in Implementation::available() {
        for qt in QUANT_TYPES {
            for len in [0, 1, 63, 64, 65, 16 * 64 + 3, 300 * 64 + 5, n] {
                for x in [&smooth[..len], &special[..len]] {
                    check_quantize_double::<f32>(imp, qt, x, 64);
                    check_quantize_double::<bf16>(imp, qt, &convert(x), 64);
                    check_quantize_double::<f16>(imp, qt, &convert(x), 64);
                }
            }
            check_quantize_double::<bf16>(imp, qt, &convert(&special), 4096);
        }
    }
}

#[test]
fn quantize_double_into_rejects_wrong_lengths() {
    let x = vec![0.5f32; 1000];
    let (mut p, mut a) = (vec![0u8; 500], vec![0f32; 16]);
    for (codes, nested) in [(15, 1), (17, 1), (16, 0), (16, 2)] {
        let (mut c, mut s) = (vec![0u8; codes], vec![0f32; nested]);
        let e = qlora_codec::quantize_double_into(
            QuantType::Nf4,
            &x,
            64,
            &mut p,
            &mut a,
            &mut c,
            &mut s,
        )
        .unwrap_err();
        assert!(matches!(e, qlora_codec::Error::Length { .. }), "{e}");
    }
    let (mut c, mut s) = (vec![0u8; 16], vec![0f32; 1]);
    let e =
        qlora_codec::quantize_double_into(QuantType::Nf4, &x, 48, &mut p, &mut a, &mut c, &mut s)
            .unwrap_err();
    assert_eq!(e, qlora_codec::Error::BlockSize(48));
}
