//! The fused matrix–vector product against its definition: dequantize (in the tensor's dtype),
//! widen, and [`gemv::dot`] each row with each token — bit for bit, on every implementation this
//! machine can run (implementations it lacks are listed and skipped). Shapes probe the 32-element
//! chunks (tails, rows shorter than a chunk), block boundaries inside chunks (`cols` not a
//! multiple of 32), odd `cols` (rows starting mid-byte), blocks longer than a row, token counts
//! around the kernels' token groups, NF4/FP4, f32/bf16/f16, plain and double-quantized absmax,
//! special absmax values, the multi-threaded path, and bad shapes.

use half::{bf16, f16};
use qlora_codec::{
    gemv, Absmax, CodecKernels, DoubleQuantAbsmax, Dtype, Element, Error, Implementation,
    QuantType, QuantizeOptions, QuantizedTensor, BLOCK_SIZES,
};

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
    fn signed(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
}

fn implementations() -> Vec<Implementation> {
    let all = Implementation::available();
    eprintln!("implementations available here: {all:?}");
    all
}

/// The dequantized matrix in the tensor's dtype, widened to f32.
fn dequantized(q: &QuantizedTensor) -> Vec<f32> {
    fn widen<T: Element>(q: &QuantizedTensor) -> Vec<f32> {
        let v: Vec<T> = q.dequantize().expect("dequantize");
        v.iter().map(|x| x.to_f32()).collect()
    }
    match q.dtype() {
        Dtype::F32 => widen::<f32>(q),
        Dtype::BF16 => widen::<bf16>(q),
        Dtype::F16 => widen::<f16>(q),
    }
}

/// `y[t·rows + j] = dot(W_j, x_t)` from the dequantized weights.
fn reference(q: &QuantizedTensor, x: &[f32], n: usize) -> Vec<f32> {
    let (rows, cols) = match q.shape().split_last() {
        Some((&cols, lead)) => (lead.iter().product(), cols),
        None => (1, 1),
    };
    let w = dequantized(q);
    let mut y = vec![0.0f32; n * rows];
    for t in 0..n {
        for j in 0..rows {
            y[t * rows + j] = gemv::dot(&w[j * cols..(j + 1) * cols], &x[t * cols..(t + 1) * cols])
                .expect("lengths");
        }
    }
    y
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn check(q: &QuantizedTensor, x: &[f32], n: usize, what: &str) {
    let want = reference(q, x, n);
    for imp in implementations() {
        let mut y = vec![f32::NAN; want.len()];
        imp.gemv(q, x, n, &mut y).expect("gemv");
        for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
            assert!(
                same_bits(a, b),
                "{imp} {what} shape {:?} bs {} {:?} {:?} dq {} n {n}: y[{i}] = {a:e}, want {b:e}",
                q.shape(),
                q.blocksize(),
                q.quant_type(),
                q.dtype(),
                q.is_double_quant(),
            );
        }
    }
    let mut y = vec![f32::NAN; want.len()];
    q.gemv(x, n, &mut y).expect("gemv");
    assert!(y.iter().zip(&want).all(|(&a, &b)| same_bits(a, b)));
}

fn quantize(w: &[f32], shape: &[usize], dtype: Dtype, options: QuantizeOptions) -> QuantizedTensor {
    match dtype {
        Dtype::F32 => QuantizedTensor::quantize(w, shape, options),
        Dtype::BF16 => {
            let v: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            QuantizedTensor::quantize(&v, shape, options)
        }
        Dtype::F16 => {
            let v: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
            QuantizedTensor::quantize(&v, shape, options)
        }
    }
    .expect("quantize")
}

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::BF16, Dtype::F16];
const QUANT_TYPES: [QuantType; 2] = [QuantType::Nf4, QuantType::Fp4];

#[test]
fn matches_dequantize_then_dot_everywhere() {
    let mut rng = Rng(0x5eed_0000_0000_0001);
    // cols: below a chunk, odd (rows start mid-byte), even but not a multiple of 32 (tails and
    // block boundaries inside chunks), multiples of 32 and of the block sizes.
    let cols_list = [1, 2, 6, 31, 33, 34, 62, 64, 96, 130, 191, 256, 322, 1000];
    for (ci, &cols) in cols_list.iter().enumerate() {
        let rows = 3 + ci % 4;
        for &bs in &BLOCK_SIZES {
            if bs > 256 && cols < 256 && bs != 4096 {
                continue;
            }
            for qt in QUANT_TYPES {
                for double_quant in [false, true] {
                    let dtype = DTYPES[(ci + bs.trailing_zeros() as usize) % 3];
                    let w: Vec<f32> = (0..rows * cols).map(|_| rng.signed() * 0.05).collect();
                    let options = QuantizeOptions {
                        quant_type: qt,
                        blocksize: bs,
                        double_quant,
                    };
                    let q = quantize(&w, &[rows, cols], dtype, options);
                    let n = 1 + (ci + bs) % 6;
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.signed() * 3.0).collect();
                    check(&q, &x, n, "random");
                }
            }
        }
    }
}

#[test]
fn every_dtype_token_count_and_block_size() {
    let mut rng = Rng(0x5eed_0000_0000_0002);
    for dtype in DTYPES {
        for (cols, bs) in [
            (64, 32),
            (96, 64),
            (160, 128),
            (4096, 64),
            (202, 32),
            (98, 64),
        ] {
            for n in 1..=9 {
                let rows = 5;
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.signed()).collect();
                let q = quantize(
                    &w,
                    &[rows, cols],
                    dtype,
                    QuantizeOptions::qlora().with_blocksize(bs),
                );
                let x: Vec<f32> = (0..n * cols).map(|_| rng.signed()).collect();
                check(&q, &x, n, "tokens");
            }
        }
    }
}

/// Arbitrary code bytes and absmax values of every class (NaN, ±Inf, subnormal, products that
/// overflow f16/bf16 or land on their rounding ties), plain and double-quantized.
#[test]
fn special_absmax_and_codes() {
    let mut rng = Rng(0x5eed_0000_0000_0003);
    let mut absmax: Vec<f32> = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        65504.0,
        65520.0,
        1.0e5,
        f32::MAX,
        1.0,
    ];
    absmax.extend((0..200).map(|_| f32::from_bits(rng.next() as u32)));
    for c in 0..16 {
        let t = QuantType::Nf4.table()[c];
        if t != 0.0 {
            absmax.push(f32::from_bits(0x3f80_8000) / t);
            absmax.push(f32::from_bits(0x3f80_1000) / t);
        }
    }
    for qt in QUANT_TYPES {
        for dtype in DTYPES {
            for (bs, cols) in [(32, 64), (64, 96), (32, 46)] {
                let numel = absmax.len() * bs;
                let rows = numel / cols;
                let numel = rows * cols;
                let blocks = numel.div_ceil(bs);
                let packed: Vec<u8> = (0..numel.div_ceil(2)).map(|_| rng.next() as u8).collect();
                let x: Vec<f32> = (0..2 * cols).map(|_| rng.signed()).collect();
                let q = QuantizedTensor::from_parts(
                    qt,
                    bs,
                    dtype,
                    vec![rows, cols],
                    packed.clone(),
                    Absmax::F32(absmax[..blocks].to_vec()),
                )
                .expect("parts");
                check(&q, &x, 2, "special absmax");
                let double = DoubleQuantAbsmax {
                    codes: (0..blocks).map(|_| rng.next() as u8).collect(),
                    nested_absmax: (0..blocks.div_ceil(256))
                        .map(|_| rng.unit() * 3.0 + 0.01)
                        .collect(),
                    offset: rng.unit() * 2.0,
                };
                let q = QuantizedTensor::from_parts(
                    qt,
                    bs,
                    dtype,
                    vec![rows, cols],
                    packed,
                    Absmax::Double(double),
                )
                .expect("parts");
                check(&q, &x[..cols], 1, "random double quant");
            }
        }
    }
}

/// Large enough for the rayon path (several tasks, a partial last one).
#[test]
fn multithreaded_matches() {
    let mut rng = Rng(0x5eed_0000_0000_0004);
    for (rows, cols, n) in [(333, 1024, 1), (257, 4096, 3), (700, 250, 5)] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.signed() * 0.02).collect();
        let q = quantize(&w, &[rows, cols], Dtype::BF16, QuantizeOptions::qlora());
        let x: Vec<f32> = (0..n * cols).map(|_| rng.signed()).collect();
        check(&q, &x, n, "large");
    }
}

/// Shapes other than 2-D: the last dimension is `cols`.
#[test]
fn other_ranks_and_empty_shapes() {
    let mut rng = Rng(0x5eed_0000_0000_0005);
    let w: Vec<f32> = (0..2 * 3 * 40).map(|_| rng.signed()).collect();
    let q = quantize(&w, &[2, 3, 40], Dtype::F32, QuantizeOptions::qlora());
    let x: Vec<f32> = (0..80).map(|_| rng.signed()).collect();
    check(&q, &x, 2, "3-D");
    let mut y = vec![0.0; 12];
    q.gemv(&x, 2, &mut y).expect("3-D");

    let q = quantize(&w[..40], &[40], Dtype::F32, QuantizeOptions::qlora());
    check(&q, &x[..40], 1, "1-D");

    let q = quantize(&w[..1], &[], Dtype::F32, QuantizeOptions::qlora());
    let mut y = [0.0f32; 1];
    q.gemv(&[2.0], 1, &mut y).expect("0-D");
    assert_eq!(y[0], dequantized(&q)[0] * 2.0);

    // [5, 0]: every output is the empty sum, +0.
    let q = quantize(&[], &[5, 0], Dtype::F32, QuantizeOptions::qlora());
    let mut y = vec![f32::NAN; 10];
    q.gemv(&[], 2, &mut y).expect("empty rows");
    assert!(y.iter().all(|v| v.to_bits() == 0));
    // No tokens.
    let q = quantize(&w, &[6, 40], Dtype::F32, QuantizeOptions::qlora());
    q.gemv(&[], 0, &mut []).expect("no tokens");
}

#[test]
fn bad_shapes_are_errors() {
    let w = vec![0.5f32; 6 * 64];
    let q = quantize(&w, &[6, 64], Dtype::BF16, QuantizeOptions::qlora());
    let x = vec![1.0f32; 64 * 2];
    let mut y = vec![0.0f32; 6 * 2];
    assert!(matches!(
        q.gemv(&x[..100], 2, &mut y),
        Err(Error::Length { what: "x", .. })
    ));
    assert!(matches!(
        q.gemv(&x, 2, &mut y[..11]),
        Err(Error::Length { what: "y", .. })
    ));
    assert!(matches!(
        q.gemv(&x, usize::MAX / 8, &mut y),
        Err(Error::Length { .. })
    ));
    for imp in Implementation::available() {
        assert!(imp.gemv(&q, &x, 1, &mut y).is_err());
    }
    // An implementation this machine cannot run falls back to the oracle (same bits).
    let mut want = vec![0.0f32; 12];
    Implementation::Scalar
        .gemv(&q, &x, 2, &mut want)
        .expect("scalar");
    for imp in [
        Implementation::Avx512,
        Implementation::Avx2,
        Implementation::Neon,
    ] {
        imp.gemv(&q, &x, 2, &mut y).expect("any implementation");
        assert_eq!(y, want, "{imp}");
    }
    assert!(gemv::dot(&[1.0, 2.0], &[1.0]).is_err());
}

/// [`gemv::dot`] is the documented order: lane `k mod 32`, FMA, then the fixed tree — written
/// out here independently, on data where other orders give other bits.
#[test]
fn dot_follows_the_documented_order() {
    fn documented(w: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0.0f32; 32];
        for k in 0..w.len() {
            acc[k % 32] = w[k].mul_add(x[k], acc[k % 32]);
        }
        let mut s: Vec<f32> = (0..16).map(|l| acc[2 * l] + acc[2 * l + 1]).collect();
        for h in [8, 4, 2, 1] {
            for l in 0..h {
                s[l] += s[l + h];
            }
        }
        s[0]
    }
    let mut rng = Rng(0x5eed_0000_0000_0006);
    let mut differs_from_sequential = 0;
    for len in [0usize, 1, 5, 31, 32, 33, 64, 100, 1000, 4097] {
        for _ in 0..20 {
            // Wide dynamic range so that the order matters.
            let w: Vec<f32> = (0..len)
                .map(|_| rng.signed() * 2f32.powi((rng.next() % 40) as i32 - 20))
                .collect();
            let x: Vec<f32> = (0..len).map(|_| rng.signed()).collect();
            let got = gemv::dot(&w, &x).expect("dot");
            assert_eq!(got.to_bits(), documented(&w, &x).to_bits(), "len {len}");
            let sequential = w.iter().zip(&x).fold(0.0f32, |a, (&p, &q)| p.mul_add(q, a));
            differs_from_sequential += usize::from(got.to_bits() != sequential.to_bits());
            // The error bound of the module docs against the exact sum.
            let exact: f64 = w.iter().zip(&x).map(|(&p, &q)| p as f64 * q as f64).sum();
            let magnitude: f64 = w
                .iter()
                .zip(&x)
                .map(|(&p, &q)| (p as f64 * q as f64).abs())
                .sum();
            let c = (len.div_ceil(32) + 5) as f64;
            let u = 2f64.powi(-24);
            let gamma = c * u / (1.0 - c * u);
            assert!(
                (got as f64 - exact).abs() <= gamma * magnitude + f64::from(f32::from_bits(1)),
                "len {len}: {got:e} vs exact {exact:e}"
            );
        }
    }
    // The test data does discriminate between summation orders.
    assert!(differs_from_sequential > 20, "{differs_from_sequential}");
}
