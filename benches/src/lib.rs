//! Shared pieces of the workspace's benchmarks (`benches/benches/*.rs`) and of the error-table
//! example: reproducible weight-like data from several distributions, and the quantization error
//! of NF4, FP4 and the INT4 baseline on it.
#![forbid(unsafe_code)]

use qlora_codec::testing::SplitMix64;
use qlora_codec::{
    dequantize_into, int4, num_blocks, packed_len, quantize_into, AbsmaxView, DoubleQuantAbsmax,
    QuantType,
};

/// Standard normal by Box–Muller from two draws on the open interval (0, 1).
fn normal(rng: &mut SplitMix64) -> f64 {
    let (u, v) = (rng.open01(), rng.open01());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Weight distributions of the comparison, each scaled to unit variance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    /// Standard normal: what NF4's quantiles are built for.
    Normal,
    /// Laplace (heavier tails).
    Laplace,
    /// Student-t with ν = 5 (heavy tails, outliers).
    StudentT5,
    /// Uniform (no tails: the INT4 grid's best case).
    Uniform,
}

impl Distribution {
    /// All four, in table order.
    pub const ALL: [Distribution; 4] = [
        Distribution::Normal,
        Distribution::Laplace,
        Distribution::StudentT5,
        Distribution::Uniform,
    ];

    /// A label for tables.
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Normal => "normal",
            Distribution::Laplace => "Laplace",
            Distribution::StudentT5 => "Student-t (ν=5)",
            Distribution::Uniform => "uniform",
        }
    }

    /// One unit-variance sample.
    pub fn sample(self, rng: &mut SplitMix64) -> f64 {
        match self {
            Distribution::Normal => normal(rng),
            Distribution::Laplace => {
                // Inverse CDF; scale b = 1/√2 gives variance 2b² = 1.
                let u = rng.open01() - 0.5;
                -u.signum() * (1.0 - 2.0 * u.abs()).ln() / std::f64::consts::SQRT_2
            }
            Distribution::StudentT5 => {
                // Z / √(χ²₅/5), variance 5/3, scaled to 1.
                let chi2: f64 = (0..5).map(|_| normal(rng).powi(2)).sum();
                normal(rng) / (chi2 / 5.0).sqrt() * (3.0f64 / 5.0).sqrt()
            }
            Distribution::Uniform => (rng.open01() * 2.0 - 1.0) * 3.0f64.sqrt(),
        }
    }

    /// `n` samples as f32.
    pub fn samples(self, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| self.sample(&mut rng) as f32).collect()
    }
}

/// A 4-bit format of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// NormalFloat4.
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
    /// Symmetric INT4 absmax (the integer grid).
    Int4,
}

impl Format {
    /// All three, in table order.
    pub const ALL: [Format; 3] = [Format::Nf4, Format::Fp4, Format::Int4];

    /// A label for tables.
    pub fn name(self) -> &'static str {
        match self {
            Format::Nf4 => "NF4",
            Format::Fp4 => "FP4",
            Format::Int4 => "INT4",
        }
    }
}

/// Errors of one quantize → dequantize round trip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTripError {
    /// Mean squared error.
    pub mse: f64,
    /// Mean absolute error.
    pub mae: f64,
}

/// Quantize `x` with `format` at block size `blocksize` (optionally double-quantizing the absmax
/// values), dequantize, and measure the error against `x`.
///
/// # Panics
/// If `blocksize` is not a supported block size.
pub fn round_trip_error(
    format: Format,
    x: &[f32],
    blocksize: usize,
    double_quant: bool,
) -> RoundTripError {
    let n = x.len();
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, blocksize)];
    let mut back = vec![0f32; n];
    match format {
        Format::Int4 => {
            int4::quantize_into(x, blocksize, &mut packed, &mut absmax).expect("valid sizes");
            if double_quant {
                absmax = DoubleQuantAbsmax::compress(&absmax).decompress();
            }
            int4::dequantize_into(&packed, &absmax, blocksize, &mut back).expect("valid sizes");
        }
        Format::Nf4 | Format::Fp4 => {
            let qt = if format == Format::Nf4 {
                QuantType::Nf4
            } else {
                QuantType::Fp4
            };
            quantize_into(qt, x, blocksize, &mut packed, &mut absmax).expect("valid sizes");
            if double_quant {
                let dq = DoubleQuantAbsmax::compress(&absmax);
                let view = AbsmaxView::Double {
                    codes: &dq.codes,
                    nested_absmax: &dq.nested_absmax,
                    offset: dq.offset,
                };
                dequantize_into(qt, &packed, view, blocksize, &mut back).expect("valid sizes");
            } else {
                dequantize_into(qt, &packed, AbsmaxView::F32(&absmax), blocksize, &mut back)
                    .expect("valid sizes");
            }
        }
    }
    let (mut se, mut ae) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(&back) {
        let d = a as f64 - b as f64;
        se += d * d;
        ae += d.abs();
    }
    RoundTripError {
        mse: se / n as f64,
        mae: ae / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_have_unit_variance() {
        for d in Distribution::ALL {
            let x = d.samples(400_000, 7);
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
            assert!(mean.abs() < 0.01, "{}: mean {mean}", d.name());
            assert!((var - 1.0).abs() < 0.03, "{}: variance {var}", d.name());
        }
    }

    #[test]
    fn nf4_beats_int4_on_normal_weights() {
        let x = Distribution::Normal.samples(1 << 18, 11);
        for bs in [64, 256] {
            let nf4 = round_trip_error(Format::Nf4, &x, bs, false);
            let int4 = round_trip_error(Format::Int4, &x, bs, false);
            assert!(nf4.mse < int4.mse, "block {bs}: {nf4:?} vs {int4:?}");
        }
    }
}
