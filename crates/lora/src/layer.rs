//! The LoRA/DoRA linear layer: forward and backward over a dense or 4-bit base.

// Index loops over several parallel per-column arrays (c, y, v) read clearer than zips.
#![allow(clippy::needless_range_loop)]

use crate::base::BaseWeight;
use crate::error::{check_finite, check_len, Error, Result};
use crate::matmul::{self, view};
use rayon::prelude::*;

/// LoRA hyper-parameters of one layer (PEFT's `r`, `lora_alpha`, `use_rslora`, `lora_dropout`,
/// `use_dora`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraParams {
    /// Rank r ≥ 1.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA: scale by `alpha/√r` instead of `alpha/r`.
    pub use_rslora: bool,
    /// Dropout probability on the LoRA branch input, in `[0, 1)`.
    pub dropout: f32,
    /// DoRA (weight-decomposed LoRA): adds a magnitude vector.
    pub use_dora: bool,
}

impl LoraParams {
    /// Plain LoRA with rank `r` and `alpha`, no dropout.
    pub fn new(r: usize, alpha: f64) -> Self {
        LoraParams {
            r,
            alpha,
            use_rslora: false,
            dropout: 0.0,
            use_dora: false,
        }
    }

    /// The scaling s: `alpha/r`, or `alpha/√r` with rsLoRA (a Python float in PEFT; applied as
    /// f32 to f32 tensors).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Check r ≥ 1, finite alpha, and dropout in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidOption {
                option: "r".into(),
                reason: "rank must be at least 1".into(),
            });
        }
        if !self.alpha.is_finite() {
            return Err(Error::InvalidOption {
                option: "lora_alpha".into(),
                reason: format!("must be finite, found {}", self.alpha),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidOption {
                option: "lora_dropout".into(),
                reason: format!("must be in [0, 1), found {}", self.dropout),
            });
        }
        Ok(())
    }
}

/// The trainable tensors of one adapter, in PEFT's layout, always f32.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWeights {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Vec<f32>,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Vec<f32>,
    /// DoRA's `lora_magnitude_vector`, `[out]`.
    pub magnitude: Option<Vec<f32>>,
}

/// Gradients from [`LoraLinear::backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrads {
    /// ∂L/∂X, `[n, in]`.
    pub x: Vec<f32>,
    /// ∂L/∂A, `[r, in]`.
    pub a: Vec<f32>,
    /// ∂L/∂B, `[out, r]`.
    pub b: Vec<f32>,
    /// ∂L/∂m for DoRA, `[out]`.
    pub magnitude: Option<Vec<f32>>,
}

/// What a forward pass keeps for the backward pass. Holds `n·r` floats for LoRA
/// (`U = dropout(X)·Aᵀ`); DoRA adds `n·out + out` (the pre-scaling output and the row norms).
/// With dropout it also keeps the keep-mask as bits (`n·in/8` bytes).
#[derive(Debug, Clone)]
pub struct ForwardCache {
    n: usize,
    keep: Option<KeepBits>,
    u: Vec<f32>,
    dora: Option<DoraCache>,
}

#[derive(Debug, Clone)]
struct DoraCache {
    /// c = m / ‖W + s·BA‖_row.
    c: Vec<f32>,
    /// ‖W + s·BA‖_row.
    norm: Vec<f32>,
    /// The part of the output that c multiplies, before multiplying (`n·out`).
    v: Vec<f32>,
}

/// Whether a forward pass is in training mode (dropout active, with a seed for its mask) or in
/// evaluation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No dropout.
    Eval,
    /// Dropout active; the mask is a deterministic function of this seed and the element index.
    Train {
        /// Seed of the dropout mask.
        seed: u64,
    },
}

/// A LoRA (or DoRA) linear layer: `Y = X·Wᵀ + b + s·(dropout(X)·Aᵀ)·Bᵀ`.
///
/// The base weight `W` is frozen; with a 4-bit base it is dequantized one tile (≤ 2 MiB of f32)
/// at a time inside the matrix products and never held whole.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub(crate) base: BaseWeight,
    pub(crate) bias: Option<Vec<f32>>,
    pub(crate) params: LoraParams,
    pub(crate) weights: AdapterWeights,
    pub(crate) merged: Option<crate::merge::MergedState>,
}

impl LoraLinear {
    /// Build a layer from a base, an optional base bias `[out]`, hyper-parameters and adapter
    /// tensors, checking every shape (and that DoRA has a magnitude vector and plain LoRA none).
    pub fn new(
        base: BaseWeight,
        bias: Option<Vec<f32>>,
        params: LoraParams,
        weights: AdapterWeights,
    ) -> Result<Self> {
        params.validate()?;
        let (out_f, in_f, r) = (base.out_features(), base.in_features(), params.r);
        check_len("lora_A.weight", &[r, in_f], weights.a.len())?;
        check_len("lora_B.weight", &[out_f, r], weights.b.len())?;
        check_finite("lora_A.weight", &weights.a)?;
        check_finite("lora_B.weight", &weights.b)?;
        if let Some(b) = &bias {
            check_len("bias", &[out_f], b.len())?;
            check_finite("bias", b)?;
        }
        match (&weights.magnitude, params.use_dora) {
            (Some(m), true) => {
                check_len("lora_magnitude_vector", &[out_f], m.len())?;
                check_finite("lora_magnitude_vector", m)?;
            }
            (None, false) => {}
            (None, true) => {
                return Err(Error::InvalidOption {
                    option: "use_dora".into(),
                    reason: "DoRA needs a magnitude vector (see LoraLinear::init_dora_magnitude)"
                        .into(),
                })
            }
            (Some(_), false) => {
                return Err(Error::InvalidOption {
                    option: "use_dora".into(),
                    reason: "a magnitude vector was given but use_dora is false".into(),
                })
            }
        }
        Ok(LoraLinear {
            base,
            bias,
            params,
            weights,
            merged: None,
        })
    }

    /// The frozen base weight.
    pub fn base(&self) -> &BaseWeight {
        &self.base
    }

    /// The base bias.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &LoraParams {
        &self.params
    }

    /// The adapter tensors.
    pub fn weights(&self) -> &AdapterWeights {
        &self.weights
    }

    /// Mutable adapter tensors (for an optimizer step). Shapes must not change.
    pub fn weights_mut(&mut self) -> &mut AdapterWeights {
        &mut self.weights
    }

    /// Take the layer apart.
    pub fn into_parts(self) -> (BaseWeight, Option<Vec<f32>>, AdapterWeights) {
        (self.base, self.bias, self.weights)
    }

    /// True while the adapter is merged into the base.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// The scaling s as f32.
    pub fn scaling(&self) -> f32 {
        self.params.scaling() as f32
    }

    /// DoRA's row norms `‖W + s·B·A‖₂` per output row, computed tile by tile from the base as it
    /// is stored (dequantized for a 4-bit base), in f32. This is also PEFT's magnitude init.
    pub fn weight_norm(&self) -> Result<Vec<f32>> {
        row_norms(
            &self.base,
            &self.weights.a,
            &self.weights.b,
            self.params.r,
            self.scaling(),
        )
    }

    /// Set the DoRA magnitude to `‖W + s·BA‖_row` (PEFT's initialization: DoRA starts as LoRA).
    pub fn init_dora_magnitude(&mut self) -> Result<()> {
        self.params.use_dora = true;
        self.weights.magnitude = Some(self.weight_norm()?);
        Ok(())
    }

    fn check_input(&self, what: &str, data: &[f32], n: usize, cols: usize) -> Result<()> {
        check_len(what, &[n, cols], data.len())?;
        check_finite(what, data)
    }

    /// Forward pass for `n` rows of input `x: [n, in]` (flatten `[batch, seq, in]` first).
    /// Returns `Y: [n, out]` and what backward needs. When merged, returns the base output only.
    pub fn forward(&self, x: &[f32], n: usize, mode: Mode) -> Result<(Vec<f32>, ForwardCache)> {
        if self.merged.is_some() {
            self.check_input("input x", x, n, self.base.in_features())?;
            let mut y = vec![0.0f32; n * self.base.out_features()];
            self.base.x_wt(x, n, &mut y, false)?;
            add_bias(&mut y, self.bias.as_deref(), self.base.out_features());
            return Ok((
                y,
                ForwardCache {
                    n,
                    keep: None,
                    u: Vec::new(),
                    dora: None,
                },
            ));
        }
        self.check_input("input x", x, n, self.base.in_features())?;
        self.view().forward(x, n, mode)
    }

    /// Backward pass: given the same `x` and the cache from [`forward`](Self::forward), and
    /// `grad_y = ∂L/∂Y: [n, out]`, returns ∂L/∂X, ∂L/∂A, ∂L/∂B (and ∂L/∂m for DoRA). W gets no
    /// gradient. DoRA's norm is treated as a constant, as PEFT does.
    pub fn backward(&self, x: &[f32], cache: &ForwardCache, grad_y: &[f32]) -> Result<LoraGrads> {
        if self.merged.is_some() {
            return Err(Error::State(
                "backward through a merged layer: unmerge first".into(),
            ));
        }
        self.check_input("input x", x, cache.n, self.base.in_features())?;
        self.check_input("grad_y", grad_y, cache.n, self.base.out_features())?;
        self.view().backward(x, cache, grad_y)
    }

    /// The layer as borrowed parts ([`LoraView`]), for a caller that keeps the adapter tensors
    /// itself.
    fn view(&self) -> LoraView<'_> {
        LoraView {
            base: &self.base,
            bias: self.bias.as_deref(),
            params: self.params,
            a: &self.weights.a,
            b: &self.weights.b,
            magnitude: self.weights.magnitude.as_deref(),
        }
    }
}

/// A LoRA (or DoRA) layer lent as parts: the same forward and backward as [`LoraLinear`] for a
/// caller that owns the adapter tensors itself (a training framework's variables) and must not
/// copy them every step. Nothing is checked at construction; [`forward`](Self::forward) and
/// [`backward`](Self::backward) check the shapes of every part but, unlike [`LoraLinear`], do not
/// scan the input and gradient for non-finite values (a training loop checks its loss instead).
///
/// ```
/// use qlora_lora::layer::{LoraParams, LoraView, Mode};
/// use qlora_lora::{BaseWeight, DenseData};
///
/// // W = I (2×2), r = 1, A = [1, 1], B = [1, 0]ᵀ, s = alpha/r = 2.
/// let base = BaseWeight::dense(DenseData::F32(vec![1.0, 0.0, 0.0, 1.0]), 2, 2)?;
/// let (a, b) = ([1.0f32, 1.0], [1.0f32, 0.0]);
/// let view = LoraView { base: &base, bias: None, params: LoraParams::new(1, 2.0), a: &a, b: &b, magnitude: None };
/// let (y, cache) = view.forward(&[3.0, 4.0], 1, Mode::Eval)?;
/// assert_eq!(y, [3.0 + 2.0 * 7.0, 4.0]);
/// let grads = view.backward(&[3.0, 4.0], &cache, &[1.0, 0.0])?;
/// assert_eq!(grads.b, [2.0 * 7.0, 0.0]); // s · gᵀ · (x·Aᵀ)
/// # Ok::<(), qlora_lora::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct LoraView<'a> {
    /// The frozen base weight `[out, in]`.
    pub base: &'a BaseWeight,
    /// The base bias `[out]`.
    pub bias: Option<&'a [f32]>,
    /// Hyper-parameters.
    pub params: LoraParams,
    /// `lora_A.weight`, `[r, in]`.
    pub a: &'a [f32],
    /// `lora_B.weight`, `[out, r]`.
    pub b: &'a [f32],
    /// DoRA's magnitude `[out]` (with `params.use_dora`).
    pub magnitude: Option<&'a [f32]>,
}

impl LoraView<'_> {
    /// Check the parts' shapes against the base (`A: [r, in]`, `B: [out, r]`, bias and
    /// magnitude `[out]`, a magnitude exactly when `params.use_dora`).
    fn check_parts(&self) -> Result<()> {
        self.params.validate()?;
        let (out_f, in_f, r) = (
            self.base.out_features(),
            self.base.in_features(),
            self.params.r,
        );
        check_len("lora_A.weight", &[r, in_f], self.a.len())?;
        check_len("lora_B.weight", &[out_f, r], self.b.len())?;
        if let Some(b) = self.bias {
            check_len("bias", &[out_f], b.len())?;
        }
        match (self.magnitude, self.params.use_dora) {
            (Some(m), true) => check_len("lora_magnitude_vector", &[out_f], m.len()),
            (None, false) => Ok(()),
            (None, true) => Err(Error::InvalidOption {
                option: "use_dora".into(),
                reason: "DoRA needs a magnitude vector".into(),
            }),
            (Some(_), false) => Err(Error::InvalidOption {
                option: "use_dora".into(),
                reason: "a magnitude vector was given but use_dora is false".into(),
            }),
        }
    }

    fn scaling(&self) -> f32 {
        self.params.scaling() as f32
    }

    fn weight_norm(&self) -> Result<Vec<f32>> {
        row_norms(self.base, self.a, self.b, self.params.r, self.scaling())
    }

    /// Forward pass for `n` rows of input `x: [n, in]` (flatten `[batch, seq, in]` first).
    /// Returns `Y: [n, out]` and what backward needs.
    pub fn forward(&self, x: &[f32], n: usize, mode: Mode) -> Result<(Vec<f32>, ForwardCache)> {
        let (out_f, in_f, r) = (
            self.base.out_features(),
            self.base.in_features(),
            self.params.r,
        );
        self.check_parts()?;
        check_len("input x", &[n, in_f], x.len())?;
        let s = self.scaling();
        let seed = match mode {
            Mode::Train { seed } if self.params.dropout > 0.0 => Some(seed),
            _ => None,
        };
        let mut y = vec![0.0f32; n * out_f];
        let keep = seed.map(|sd| KeepBits::new(sd, self.params.dropout, x.len()));
        let xd_owned = keep.as_ref().map(|k| k.apply(x));
        let xd = xd_owned.as_deref().unwrap_or(x);
        // U = Xd · Aᵀ   [n, r]
        let u = matmul::mul(view(xd, n, in_f), view(self.a, r, in_f).transpose(), 1.0);
        // L = U · Bᵀ    [n, out] (unscaled)
        let l = matmul::mul(view(&u, n, r), view(self.b, out_f, r).transpose(), 1.0);
        // `y` is fresh zeros: accumulate instead of zeroing it again.
        self.base.x_wt(x, n, &mut y, true)?;
        let dora = if let Some(m) = &self.magnitude {
            let norm = self.weight_norm()?;
            let c: Vec<f32> = m.iter().zip(&norm).map(|(m, nn)| m / nn).collect();
            // V = Xd·Wᵀ + s·L: what c multiplies.
            let pd = if seed.is_some() {
                let mut p = vec![0.0f32; n * out_f];
                self.base.x_wt(xd, n, &mut p, false)?;
                Some(p)
            } else {
                None
            };
            let mut v = pd.clone().unwrap_or_else(|| y.clone());
            v.par_iter_mut()
                .zip(l.par_iter())
                .for_each(|(vv, lv)| *vv += lv * s);
            if let Some(pd) = pd {
                // y = X·Wᵀ + (c−1)⊙(Xd·Wᵀ) + c⊙s·L
                y.par_chunks_mut(out_f)
                    .zip(v.par_chunks(out_f).zip(pd.par_chunks(out_f)))
                    .for_each(|(yr, (vr, pr))| {
                        for j in 0..out_f {
                            yr[j] += (c[j] - 1.0) * pr[j] + c[j] * (vr[j] - pr[j]);
                        }
                    });
            } else {
                y.par_chunks_mut(out_f)
                    .zip(v.par_chunks(out_f))
                    .for_each(|(yr, vr)| {
                        for j in 0..out_f {
                            yr[j] = c[j] * vr[j];
                        }
                    });
            }
            Some(DoraCache { c, norm, v })
        } else {
            // PEFT: result + (lora_B(lora_A(x)) * scaling)
            y.par_iter_mut()
                .zip(l.par_iter())
                .for_each(|(yv, lv)| *yv += lv * s);
            None
        };
        add_bias(&mut y, self.bias, out_f);
        Ok((y, ForwardCache { n, keep, u, dora }))
    }

    /// Backward pass: given the same `x` and the cache from [`forward`](Self::forward), and
    /// `grad_y = ∂L/∂Y: [n, out]`, returns ∂L/∂X, ∂L/∂A, ∂L/∂B (and ∂L/∂m for DoRA). W gets no
    /// gradient. DoRA's norm is treated as a constant, as PEFT does. Errors if `x` or `grad_y`
    /// has the wrong length, or `cache` is from a pass of another shape.
    pub fn backward(&self, x: &[f32], cache: &ForwardCache, grad_y: &[f32]) -> Result<LoraGrads> {
        let (out_f, in_f, r) = (
            self.base.out_features(),
            self.base.in_features(),
            self.params.r,
        );
        let n = cache.n;
        self.check_parts()?;
        if cache.u.len() != n * r || cache.dora.is_some() != self.magnitude.is_some() {
            return Err(Error::State(format!(
                "the forward cache is from another layer or mode ({} rows of rank {}, DoRA {}), \
                 not this one (rank {r}, DoRA {})",
                cache.n,
                cache.u.len() / n.max(1),
                cache.dora.is_some(),
                self.magnitude.is_some()
            )));
        }
        check_len("input x", &[n, in_f], x.len())?;
        check_len("grad_y", &[n, out_f], grad_y.len())?;
        let s = self.scaling();
        let xd_owned = cache.keep.as_ref().map(|k| k.apply(x));
        let xd = xd_owned.as_deref().unwrap_or(x);
        let (gc_owned, dm) = match &cache.dora {
            Some(d) => {
                let mut gc = grad_y.to_vec();
                let mut dm = vec![0.0f64; out_f];
                for (gr, vr) in grad_y.chunks(out_f).zip(d.v.chunks(out_f)) {
                    for j in 0..out_f {
                        dm[j] += gr[j] as f64 * vr[j] as f64;
                    }
                }
                let dm: Vec<f32> = dm
                    .iter()
                    .zip(&d.norm)
                    .map(|(a, nn)| (*a / *nn as f64) as f32)
                    .collect();
                gc.par_chunks_mut(out_f).for_each(|gr| {
                    for j in 0..out_f {
                        gr[j] *= d.c[j];
                    }
                });
                (Some(gc), Some(dm))
            }
            None => (None, None),
        };
        let gc = gc_owned.as_deref().unwrap_or(grad_y);
        // dB = s · Gcᵀ U   [out, r]
        let db = matmul::mul(view(gc, n, out_f).transpose(), view(&cache.u, n, r), s);
        // GB = Gc · B      [n, r]
        let gb = matmul::mul(view(gc, n, out_f), view(self.b, out_f, r), 1.0);
        // dA = s · GBᵀ Xd  [r, in]
        let da = matmul::mul(view(&gb, n, r).transpose(), view(xd, n, in_f), s);
        // Branch gradient wrt Xd: s·GB·A (+ (G⊙(c−1))·W for DoRA with dropout).
        let mut dxd = matmul::mul(view(&gb, n, r), view(self.a, r, in_f), s);
        let mut dx = vec![0.0f32; n * in_f];
        match (&cache.dora, &cache.keep) {
            (Some(d), Some(_)) => {
                // y = X·Wᵀ + (c−1)⊙(Xd·Wᵀ) + c⊙s·L
                self.base.g_w(grad_y, n, &mut dx, false)?;
                let mut gcm1 = grad_y.to_vec();
                gcm1.par_chunks_mut(out_f).for_each(|gr| {
                    for j in 0..out_f {
                        gr[j] *= d.c[j] - 1.0;
                    }
                });
                self.base.g_w(&gcm1, n, &mut dxd, true)?;
            }
            // `dx` is fresh zeros: accumulate instead of zeroing it again.
            (Some(_), None) => self.base.g_w(gc, n, &mut dx, true)?,
            (None, _) => self.base.g_w(grad_y, n, &mut dx, true)?,
        }
        match &cache.keep {
            Some(keep) => dx
                .par_chunks_mut(CHUNK)
                .zip(dxd.par_chunks(CHUNK))
                .enumerate()
                .for_each(|(c, (o, d))| keep.for_chunk(c, o, d, |o, d, m| *o += d * m)),
            None => dx
                .par_iter_mut()
                .zip(dxd.par_iter())
                .for_each(|(o, d)| *o += d),
        }
        Ok(LoraGrads {
            x: dx,
            a: da,
            b: db,
            magnitude: dm,
        })
    }
}

fn add_bias(y: &mut [f32], bias: Option<&[f32]>, out_f: usize) {
    if let Some(b) = bias {
        y.par_chunks_mut(out_f)
            .for_each(|r| r.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
}

/// `‖W + s·B·A‖₂` per output row, tile by tile.
pub(crate) fn row_norms(
    base: &BaseWeight,
    a: &[f32],
    b: &[f32],
    r: usize,
    s: f32,
) -> Result<Vec<f32>> {
    let (out_f, in_f) = (base.out_features(), base.in_features());
    let mut norms = vec![0.0f32; out_f];
    if base.fan_in_fan_out() {
        // Stored [in, out]: small layers only (HF Conv1D); work on the logical transpose.
        let w = base.to_f32()?;
        let ba = matmul::mul(view(b, out_f, r), view(a, r, in_f), s);
        for j in 0..out_f {
            let row = &w[j * in_f..(j + 1) * in_f];
            let d = &ba[j * in_f..(j + 1) * in_f];
            norms[j] = row
                .iter()
                .zip(d)
                .map(|(w, d)| ((w + d) as f64).powi(2))
                .sum::<f64>()
                .sqrt() as f32;
        }
        return Ok(norms);
    }
    base.for_each_tile(|r0, r1, tile| {
        let ba = matmul::mul(view(&b[r0 * r..], r1 - r0, r), view(a, r, in_f), s);
        norms[r0..r1]
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, nv)| {
                let w = &tile[i * in_f..(i + 1) * in_f];
                let d = &ba[i * in_f..(i + 1) * in_f];
                *nv = w
                    .iter()
                    .zip(d)
                    .map(|(w, d)| ((w + d) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32;
            });
        Ok(())
    })?;
    Ok(norms)
}

/// SplitMix64's finalizer.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn keep_threshold(p: f32) -> u64 {
    // keep iff a 32-bit draw < (1 − p)·2³²
    ((1.0 - p as f64) * 4_294_967_296.0) as u64
}

/// The 64 random bits of the element pair `2j, 2j + 1` (SplitMix64 at counter `j`, keyed by the
/// seed): a counter-based generator, so the mask of element i depends only on (seed, i) —
/// reproducible across thread counts and between forward and backward. Element `2j` draws the
/// high 32 bits, `2j + 1` the low ones.
#[inline(always)]
fn pair_bits(key: u64, j: u64) -> u64 {
    mix(key.wrapping_add(j.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// The generator's key for `seed`.
fn key(seed: u64) -> u64 {
    mix(seed ^ 0x6a09_e667_f3bc_c909)
}

#[inline(always)]
fn kept(key: u64, i: u64, threshold: u64) -> bool {
    let bits = pair_bits(key, i / 2);
    let draw = if i % 2 == 0 {
        bits >> 32
    } else {
        bits & 0xffff_ffff
    };
    draw < threshold
}

/// The dropout keep-mask of element `i` of the input for `seed` and probability `p` (the same
/// mask forward and backward use): kept elements are scaled by `1/(1−p)`, the rest zeroed.
pub fn dropout_keeps(seed: u64, i: usize, p: f32) -> bool {
    kept(key(seed), i as u64, keep_threshold(p))
}

/// The dropout multipliers of elements `0..n` for `seed` and probability `p`: `1/(1−p)` where
/// [`dropout_keeps`] keeps the element, else 0 (computed in parallel).
///
/// ```
/// use qlora_lora::layer::{dropout_keeps, dropout_mask};
///
/// let m = dropout_mask(7, 0.25, 1000);
/// for (i, &v) in m.iter().enumerate() {
///     assert_eq!(v, if dropout_keeps(7, i, 0.25) { 1.0 / 0.75 } else { 0.0 });
/// }
/// ```
pub fn dropout_mask(seed: u64, p: f32, n: usize) -> Vec<f32> {
    KeepBits::new(seed, p, n).apply(&vec![1.0f32; n])
}

/// Elements per parallel task of the dropout passes (a multiple of 64).
const CHUNK: usize = 1 << 12;

/// A dropout keep-mask as bits (element `i` is bit `i % 64` of word `i / 64`): hashed once in the
/// forward pass, then read by the backward pass (n/8 bytes).
#[derive(Debug, Clone)]
struct KeepBits {
    words: Vec<u64>,
    /// `1/(1−p)`.
    scale: f32,
}

impl KeepBits {
    fn new(seed: u64, p: f32, n: usize) -> Self {
        let threshold = keep_threshold(p);
        let mut words = vec![0u64; n.div_ceil(64)];
        words
            .par_chunks_mut(CHUNK / 64)
            .enumerate()
            .for_each(|(c, ws)| fill_words(seed, threshold, (c * CHUNK) as u64, ws));
        KeepBits {
            words,
            scale: 1.0 / (1.0 - p),
        }
    }

    /// `f(out[j], src[j], m_j)` over chunk `c` (elements `c·CHUNK ..`), `m_j` the multiplier of
    /// element j: `1/(1−p)` if kept, else 0 (one table row per 8 elements; no branches).
    #[inline]
    fn for_chunk(&self, c: usize, out: &mut [f32], src: &[f32], f: impl Fn(&mut f32, f32, f32)) {
        let words = &self.words[c * (CHUNK / 64)..];
        for (w, (o64, s64)) in out.chunks_mut(64).zip(src.chunks(64)).enumerate() {
            let bytes = words[w].to_le_bytes();
            for (b, (o8, s8)) in o64.chunks_mut(8).zip(s64.chunks(8)).enumerate() {
                let ones = &KEEP_TABLE[bytes[b] as usize];
                for ((o, &x), &one) in o8.iter_mut().zip(s8).zip(ones) {
                    f(o, x, one * self.scale);
                }
            }
        }
    }

    /// `Xd = dropout(X)`.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (o, xs))| self.for_chunk(c, o, xs, |o, x, m| *o = x * m));
        out
    }
}

/// Row `b`: the 8 bits of `b` as 1.0 / 0.0, lowest bit first.
static KEEP_TABLE: [[f32; 8]; 256] = {
    let mut t = [[0.0f32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if b >> j & 1 == 1 {
                t[b][j] = 1.0;
            }
            j += 1;
        }
        b += 1;
    }
    t
};

/// The keep-bits of the 64-element words `ws`, the first element being number `first`.
fn fill_words(seed: u64, threshold: u64, first: u64, ws: &mut [u64]) {
    let key = key(seed);
    for (w, word) in ws.iter_mut().enumerate() {
        // `first` is a multiple of 64: word w holds elements base .. base + 64, 32 pairs.
        let base = first + w as u64 * 64;
        let mut bits = 0u64;
        for k in 0..32u64 {
            let r = pair_bits(key, base / 2 + k);
            bits |= (((r >> 32) < threshold) as u64) << (2 * k);
            bits |= (((r & 0xffff_ffff) < threshold) as u64) << (2 * k + 1);
        }
        *word = bits;
    }
}
