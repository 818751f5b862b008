//! Proptest strategies and reference oracles for property tests against this crate's types
//! (feature `testing`).
//!
//! The strategies draw weights the way trained networks look — normal with a per-tensor scale
//! between 1e-3 and 0.1, a few heavy-tailed outliers, optional all-zero blocks — from a seed, so a
//! failing case shrinks to a short tensor and a small seed. The oracles restate the format in the
//! plainest form (f64 where it helps) so that a property can compare the crate with something it
//! does not share code with.
//!
//! ```
//! use proptest::prelude::*;
//! use qlora_codec::testing::{quantized_case, reference_dequantize};
//!
//! proptest!(ProptestConfig::with_cases(8), |(case in quantized_case(1..600))| {
//!     let fast: Vec<f32> = case.tensor.dequantize().unwrap();
//!     prop_assert_eq!(fast, reference_dequantize(&case.tensor));
//! });
//! ```

use crate::{QuantType, QuantizeOptions, QuantizedTensor, BLOCK_SIZES};
use proptest::prelude::*;
use std::ops::Range;

/// A deterministic generator (SplitMix64), so a case is reproducible from its seed alone.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Start from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform on the open interval `(0, 1)` (never 0 nor 1: safe under `ln`).
    pub fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// How a synthetic weight tensor is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightSpec {
    /// Seed of the values.
    pub seed: u64,
    /// Standard deviation of the bulk (1e-3 ..= 0.1 from [`weight_spec`]).
    pub std: f32,
    /// Probability that an element is an outlier of 5–20 standard deviations.
    pub outlier_rate: f32,
    /// Probability that a 64-element stretch is all zero (pruned or padded rows).
    pub zero_block_rate: f32,
}

impl WeightSpec {
    /// Draw `n` values.
    pub fn generate(&self, n: usize) -> Vec<f32> {
        let mut rng = SplitMix64::new(self.seed);
        let mut out = Vec::with_capacity(n);
        let mut zero_run = 0usize;
        for i in 0..n {
            if i % 64 == 0 {
                zero_run = if rng.uniform() < f64::from(self.zero_block_rate) {
                    64
                } else {
                    0
                };
            }
            if zero_run > 0 {
                zero_run -= 1;
                out.push(0.0);
                continue;
            }
            let z = rng.normal();
            let v = if rng.uniform() < f64::from(self.outlier_rate) {
                z.signum() * (5.0 + 15.0 * rng.uniform())
            } else {
                z
            };
            out.push((v * f64::from(self.std)) as f32);
        }
        out
    }
}

/// Weight distributions seen in trained transformer layers: normal bulk with a per-tensor scale,
/// up to 1 % outliers, sometimes all-zero stretches.
pub fn weight_spec() -> impl Strategy<Value = WeightSpec> {
    (
        any::<u64>(),
        -3.0f32..-1.0,
        prop_oneof![Just(0.0f32), 0.0f32..0.01],
        prop_oneof![3 => Just(0.0f32), 1 => 0.0f32..0.3],
    )
        .prop_map(
            |(seed, log_std, outlier_rate, zero_block_rate)| WeightSpec {
                seed,
                std: 10f32.powf(log_std),
                outlier_rate,
                zero_block_rate,
            },
        )
}

/// A weight vector of a length in `len`, drawn by [`weight_spec`].
pub fn weights(len: Range<usize>) -> impl Strategy<Value = Vec<f32>> {
    (weight_spec(), len).prop_map(|(spec, n)| spec.generate(n))
}

/// Any valid quantization options: NF4 or FP4, every supported block size, with or without
/// double quantization.
pub fn quantize_options() -> impl Strategy<Value = QuantizeOptions> {
    (
        prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)],
        prop::sample::select(BLOCK_SIZES.to_vec()),
        any::<bool>(),
    )
        .prop_map(|(quant_type, blocksize, double_quant)| QuantizeOptions {
            quant_type,
            blocksize,
            double_quant,
        })
}

/// A quantized tensor together with the weights it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedCase {
    /// The original f32 weights.
    pub weights: Vec<f32>,
    /// Their quantization (a flat shape `[len]`).
    pub tensor: QuantizedTensor,
}

/// Weights of a length in `len`, quantized with [`quantize_options`].
pub fn quantized_case(len: Range<usize>) -> impl Strategy<Value = QuantizedCase> {
    (weights(len), quantize_options()).prop_map(|(weights, options)| {
        let tensor = QuantizedTensor::quantize(&weights, &[weights.len()], options)
            .expect("the strategy draws valid options and finite weights");
        QuantizedCase { weights, tensor }
    })
}

/// A `[rows, cols]` matrix quantized with the QLoRA options (NF4, block 64, double quant), with
/// `rows` and `cols` drawn from the given ranges.
pub fn quantized_matrix(
    rows: Range<usize>,
    cols: Range<usize>,
) -> impl Strategy<Value = QuantizedCase> {
    (weight_spec(), rows, cols).prop_map(|(spec, r, c)| {
        let weights = spec.generate(r * c);
        let tensor = QuantizedTensor::quantize(&weights, &[r, c], QuantizeOptions::qlora())
            .expect("valid options and finite weights");
        QuantizedCase { weights, tensor }
    })
}

/// The oracle's dequantization: `f32(table[code] · absmax[block])` element by element, the
/// absmax first reconstructed as `f32(f32(map[q] · nested) + offset)` when double-quantized.
pub fn reference_dequantize(q: &QuantizedTensor) -> Vec<f32> {
    let table = q.quant_type().table();
    let absmax = q.absmax().to_f32();
    (0..q.numel())
        .map(|i| {
            let byte = q.packed()[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            table[code as usize] * absmax[i / q.blocksize()]
        })
        .collect()
}

/// The oracle's absmax of each block (`max |x|`, NaN ignored), in f64 then rounded: exact for
/// f32 input.
pub fn reference_absmax(weights: &[f32], blocksize: usize) -> Vec<f32> {
    weights
        .chunks(blocksize)
        .map(|b| {
            b.iter()
                .filter(|x| !x.is_nan())
                .fold(0.0f64, |m, &x| m.max(f64::from(x).abs())) as f32
        })
        .collect()
}

/// The largest round-trip error element `i` of `weights` may have after quantization to `q`:
/// `max(a, â) · max_half_gap + |â − a|` where `a` is the block's true absmax and `â` the stored
/// one (they differ only with double quantization), plus two f32 roundings and a relative slack
/// of 1e-4 for the decision thresholds, which are f32 approximations of the code midpoints.
///
/// # Panics
/// If `weights` and `q` differ in length.
pub fn error_bound(weights: &[f32], q: &QuantizedTensor, i: usize) -> f32 {
    assert_eq!(weights.len(), q.numel(), "weights and tensor lengths");
    let bs = q.blocksize();
    let block = &weights[i / bs * bs..(i / bs * bs + bs).min(weights.len())];
    let true_am = reference_absmax(block, bs)[0];
    let stored = q.absmax().view().get(i / bs);
    let bound = true_am.max(stored) * q.quant_type().max_half_gap()
        + (stored - true_am).abs()
        + 2.0 * f32::EPSILON * stored.abs();
    bound * 1.0001 + 1e-30
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn oracle_agrees_with_the_codec(case in quantized_case(1..3000)) {
            let fast: Vec<f32> = case.tensor.dequantize().unwrap();
            prop_assert_eq!(fast, reference_dequantize(&case.tensor));
        }

        #[test]
        fn round_trip_within_the_bound(case in quantized_case(1..3000)) {
            let q = &case.tensor;
            if !q.is_double_quant() {
                prop_assert_eq!(q.absmax().to_f32(), reference_absmax(&case.weights, q.blocksize()));
            }
            let back: Vec<f32> = q.dequantize().unwrap();
            for (i, (a, b)) in case.weights.iter().zip(&back).enumerate() {
                let bound = error_bound(&case.weights, q, i);
                prop_assert!((a - b).abs() <= bound, "element {}: {} vs {} (bound {})", i, a, b, bound);
            }
        }
    }

    #[test]
    fn generator_is_deterministic_and_scaled() {
        let spec = WeightSpec {
            seed: 7,
            std: 0.02,
            outlier_rate: 0.0,
            zero_block_rate: 0.0,
        };
        let a = spec.generate(10_000);
        assert_eq!(a, spec.generate(10_000));
        let var = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
    }
}
