//! Adapter initialization: PEFT's default (Kaiming-uniform A, zero B), gaussian, PiSSA (SVD),
//! OLoRA (QR) and LoftQ (alternating 4-bit quantization and rank-r SVD).

use crate::base::BaseWeight;
use crate::error::{check_finite, check_len, Error, Result};
use crate::layer::{AdapterWeights, LoraParams};
use crate::matmul::{self, view};
use faer::MatRef;
use qlora_codec::{QuantType, QuantizeOptions, QuantizedTensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// PEFT's `init_lora_weights=True`: `A ~ U(−1/√in, 1/√in)` (Kaiming-uniform with a = √5),
/// `B = 0`, so the adapter starts as a no-op. Deterministic in `seed`.
pub fn init_default(r: usize, in_f: usize, out_f: usize, seed: u64) -> AdapterWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (in_f as f32).sqrt();
    let a = (0..r * in_f)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    AdapterWeights {
        a,
        b: vec![0.0; out_f * r],
        magnitude: None,
    }
}

/// PEFT's `"gaussian"`: `A ~ N(0, 1/r)` (standard deviation 1/r), `B = 0`.
pub fn init_gaussian(r: usize, in_f: usize, out_f: usize, seed: u64) -> AdapterWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let std = 1.0 / r as f64;
    let a = (0..r * in_f)
        .map(|_| {
            // Box–Muller.
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    AdapterWeights {
        a,
        b: vec![0.0; out_f * r],
        magnitude: None,
    }
}

/// PEFT's `init_lora_weights=False` (nn.Linear defaults): `A ~ U(±1/√in)`, `B ~ U(±1/√r)`. The
/// adapter is not a no-op; used to test merges.
pub fn init_random(r: usize, in_f: usize, out_f: usize, seed: u64) -> AdapterWeights {
    let mut w = init_default(r, in_f, out_f, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_0B0B);
    let bound = 1.0 / (r as f32).sqrt();
    w.b.iter_mut()
        .for_each(|v| *v = rng.random_range(-bound..bound));
    w
}

fn check_weight(w: &[f32], out_f: usize, in_f: usize, r: usize) -> Result<()> {
    check_len("base weight", &[out_f, in_f], w.len())?;
    check_finite("base weight", w)?;
    if r > out_f.min(in_f) {
        return Err(Error::InvalidOption {
            option: "r".into(),
            reason: format!(
                "rank {r} exceeds min(out, in) = {} of a {out_f}×{in_f} weight",
                out_f.min(in_f)
            ),
        });
    }
    Ok(())
}

/// The top-`r` SVD factors of `m: [rows, cols]`: `(U_r [rows, r], S_r, V_rᵀ [r, cols])`.
fn svd_r(m: &[f32], rows: usize, cols: usize, r: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let svd = MatRef::from_row_major_slice(m, rows, cols)
        .thin_svd()
        .map_err(|e| Error::Decomposition(format!("SVD of a {rows}×{cols} matrix: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut ur = vec![0.0f32; rows * r];
    let mut vt = vec![0.0f32; r * cols];
    let sr: Vec<f32> = (0..r).map(|k| s[k]).collect();
    for i in 0..rows {
        for k in 0..r {
            ur[i * r + k] = u[(i, k)];
        }
    }
    for k in 0..r {
        for j in 0..cols {
            vt[k * cols + j] = v[(j, k)];
        }
    }
    Ok((ur, sr, vt))
}

/// Split `U diag(S) Vᵀ / scale` into `B = U √(S/scale)`, `A = √(S/scale) Vᵀ`.
fn split(
    ur: &[f32],
    sr: &[f32],
    vt: &[f32],
    rows: usize,
    cols: usize,
    scale: f64,
) -> (Vec<f32>, Vec<f32>) {
    let r = sr.len();
    let root: Vec<f32> = sr
        .iter()
        .map(|s| ((*s as f64) / scale).sqrt() as f32)
        .collect();
    let mut b = ur.to_vec();
    for i in 0..rows {
        for k in 0..r {
            b[i * r + k] *= root[k];
        }
    }
    let mut a = vt.to_vec();
    for k in 0..r {
        a[k * cols..(k + 1) * cols]
            .iter_mut()
            .for_each(|v| *v *= root[k]);
    }
    (a, b)
}

/// An initialization that also changes the base weight (PiSSA, OLoRA).
#[derive(Debug, Clone, PartialEq)]
pub struct ResidualInit {
    /// The adapter tensors.
    pub weights: AdapterWeights,
    /// The residual base `W − s·B·A`, `[out, in]` f32, to be stored (or quantized) in place of W.
    pub residual: Vec<f32>,
}

fn residual(
    w: &[f32],
    weights: &AdapterWeights,
    params: &LoraParams,
    out_f: usize,
    in_f: usize,
) -> Vec<f32> {
    let d = crate::merge::delta_weight(params, weights, out_f, in_f);
    w.par_iter().zip(d.par_iter()).map(|(w, d)| w - d).collect()
}

/// PiSSA (`"pissa"`): `A = diag(√(S_r/s)) V_rᵀ`, `B = U_r diag(√(S_r/s))`, base ← `W − s·BA`
/// (W minus its top-r singular part), so `residual + s·BA = W`.
pub fn init_pissa(
    w: &[f32],
    out_f: usize,
    in_f: usize,
    params: &LoraParams,
) -> Result<ResidualInit> {
    let r = params.r;
    check_weight(w, out_f, in_f, r)?;
    let (ur, sr, vt) = svd_r(w, out_f, in_f, r)?;
    let (a, b) = split(&ur, &sr, &vt, out_f, in_f, params.scaling());
    let weights = AdapterWeights {
        a,
        b,
        magnitude: None,
    };
    let residual = residual(w, &weights, params, out_f, in_f);
    Ok(ResidualInit { weights, residual })
}

/// OLoRA (`"olora"`): thin QR `W = Q R`; `A = R[:r]`, `B = Q[:, :r]`, base ← `W − s·BA`.
pub fn init_olora(
    w: &[f32],
    out_f: usize,
    in_f: usize,
    params: &LoraParams,
) -> Result<ResidualInit> {
    let r = params.r;
    check_weight(w, out_f, in_f, r)?;
    let qr = MatRef::from_row_major_slice(w, out_f, in_f).qr();
    let q = qr.compute_thin_Q();
    let rm = qr.thin_R();
    let mut b = vec![0.0f32; out_f * r];
    let mut a = vec![0.0f32; r * in_f];
    for i in 0..out_f {
        for k in 0..r {
            b[i * r + k] = q[(i, k)];
        }
    }
    for k in 0..r {
        for j in 0..in_f {
            a[k * in_f + j] = if j >= k { rm[(k, j)] } else { 0.0 };
        }
    }
    let weights = AdapterWeights {
        a,
        b,
        magnitude: None,
    };
    let residual = residual(w, &weights, params, out_f, in_f);
    Ok(ResidualInit { weights, residual })
}

/// LoftQ settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoftqOptions {
    /// Alternations T ≥ 1 (PEFT's `loftq_iter`, default 1).
    pub iterations: usize,
    /// The quantizer (PEFT: NF4, block 64, no double quantization).
    pub quantize: QuantizeOptions,
    /// Take the scaling s into account, so that `deq(Q) + s·BA ≈ W` for any alpha. PEFT does not
    /// (its B·A ≈ W − Q is right only when s = 1); `false` reproduces PEFT.
    pub compensate_scaling: bool,
}

impl Default for LoftqOptions {
    fn default() -> Self {
        LoftqOptions {
            iterations: 1,
            quantize: QuantizeOptions {
                quant_type: QuantType::Nf4,
                blocksize: 64,
                double_quant: false,
            },
            compensate_scaling: true,
        }
    }
}

/// The result of [`init_loftq`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoftqInit {
    /// The adapter (B ≈ U_r√(S_r/s), A ≈ √(S_r/s)V_rᵀ of the last quantization residual).
    pub weights: AdapterWeights,
    /// The 4-bit base to train on.
    pub base: QuantizedTensor,
    /// `‖W − deq(Q(W))‖_F`: plain quantization error (QLoRA's starting point).
    pub error_quantized: f64,
    /// `‖W − (deq(base) + s·BA)‖_F`: the error LoftQ starts from.
    pub error_loftq: f64,
}

impl LoftqInit {
    /// Fraction of the quantization error LoftQ removes: `1 − error_loftq / error_quantized`.
    pub fn error_reduction(&self) -> f64 {
        1.0 - self.error_loftq / self.error_quantized
    }
}

fn frob_diff(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b.par_iter())
        .map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// LoftQ: for T rounds, quantize `W − s·B·A` (B·A = 0 at first), then set B, A to the rank-r SVD
/// split of `(W − deq(Q))/s`. Returns the last round's Q and its B, A.
pub fn init_loftq(
    w: &[f32],
    out_f: usize,
    in_f: usize,
    params: &LoraParams,
    options: LoftqOptions,
) -> Result<LoftqInit> {
    let r = params.r;
    check_weight(w, out_f, in_f, r)?;
    if options.iterations == 0 {
        return Err(Error::InvalidOption {
            option: "loftq_iter".into(),
            reason: "must be at least 1".into(),
        });
    }
    let s = params.scaling();
    let scale = if options.compensate_scaling { s } else { 1.0 };
    let shape = [out_f, in_f];
    let mut target = w.to_vec();
    let mut error_quantized = f64::NAN;
    let mut last = None;
    for i in 0..options.iterations {
        let q = QuantizedTensor::quantize(&target, &shape, options.quantize)?;
        let deq = BaseWeight::quantized(q.clone())?.to_f32()?;
        if i == 0 {
            error_quantized = frob_diff(w, &deq);
        }
        let res: Vec<f32> = w
            .par_iter()
            .zip(deq.par_iter())
            .map(|(w, q)| w - q)
            .collect();
        let (ur, sr, vt) = svd_r(&res, out_f, in_f, r)?;
        let (a, b) = split(&ur, &sr, &vt, out_f, in_f, scale);
        if i + 1 < options.iterations {
            // Next round quantizes W minus the low-rank part the forward will add.
            let lr = matmul::mul(view(&b, out_f, r), view(&a, r, in_f), scale as f32);
            target = w
                .par_iter()
                .zip(lr.par_iter())
                .map(|(w, l)| w - l)
                .collect();
        }
        last = Some((
            q,
            deq,
            AdapterWeights {
                a,
                b,
                magnitude: None,
            },
        ));
    }
    let (base, deq, weights) = last.ok_or_else(|| Error::State("no LoftQ round ran".into()))?;
    let d = crate::merge::delta_weight(params, &weights, out_f, in_f);
    let approx: Vec<f32> = deq
        .par_iter()
        .zip(d.par_iter())
        .map(|(q, d)| q + d)
        .collect();
    let error_loftq = frob_diff(w, &approx);
    Ok(LoftqInit {
        weights,
        base,
        error_quantized,
        error_loftq,
    })
}
