//! [`LoraLinear`]: LoRA/DoRA adapters as candle `Var`s over a frozen base ([`Linear4bit`] or a
//! dense `candle_nn::Linear`), PEFT's initializations and scaling, dropout, merge, and PEFT
//! adapter folders.

use crate::cpu_op::{f32s, with_f32s};
use crate::error::{check_device, check_float, Error, Result};
use crate::linear4bit::Linear4bit;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Shape, Tensor, Var};
use qlora_codec::{Absmax, QuantizeOptions, QuantizedTensor};
use qlora_lora::init::{self, LoftqOptions};
use qlora_lora::peft::{AdapterConfig, PeftAdapter};
use qlora_lora::{
    AdapterWeights, BaseWeight, DenseData, ForwardCache, LoraParams, LoraView, MergeOptions,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use qlora_lora::Mode;

/// The frozen base of a [`LoraLinear`].
#[derive(Debug, Clone)]
pub enum LoraBase {
    /// A 4-bit weight (QLoRA).
    Quantized(Linear4bit),
    /// A dense weight `[out, in]` (f32, bf16 or f16) and bias, multiplied by candle's matmul.
    Dense(candle_nn::Linear),
}

impl From<Linear4bit> for LoraBase {
    fn from(l: Linear4bit) -> Self {
        LoraBase::Quantized(l)
    }
}

impl From<candle_nn::Linear> for LoraBase {
    fn from(l: candle_nn::Linear) -> Self {
        LoraBase::Dense(l)
    }
}

impl LoraBase {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            LoraBase::Quantized(q) => Ok((q.out_features(), q.in_features())),
            LoraBase::Dense(l) => match l.weight().dims() {
                &[o, i] => Ok((o, i)),
                d => Err(Error::Shape {
                    what: "dense base weight (must be 2-D [out, in])".into(),
                    expected: vec![0, 0],
                    found: d.to_vec(),
                }),
            },
        }
    }

    /// The device of the base weight.
    pub fn device(&self) -> Device {
        match self {
            LoraBase::Quantized(q) => q.device().clone(),
            LoraBase::Dense(l) => l.weight().device().clone(),
        }
    }

    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            LoraBase::Quantized(q) => q.bias(),
            LoraBase::Dense(l) => l.bias(),
        }
    }

    /// `X·Wᵀ` without the bias, in the input's dtype.
    fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            LoraBase::Quantized(q) => q.matmul(xs),
            LoraBase::Dense(l) => {
                let w = l.weight();
                Ok(xs
                    .to_dtype(w.dtype())?
                    .broadcast_matmul(&w.t()?)?
                    .to_dtype(xs.dtype())?)
            }
        }
    }

    /// The base as `qlora-lora` sees it (a dense weight is copied to the host).
    pub fn to_base_weight(&self) -> Result<BaseWeight> {
        let (out_f, in_f) = self.dims()?;
        match self {
            LoraBase::Quantized(q) => Ok(BaseWeight::quantized(q.weight().clone())?),
            LoraBase::Dense(l) => {
                let w = l.weight().flatten_all()?;
                let data = match w.dtype() {
                    DType::BF16 => DenseData::Bf16(w.to_vec1()?),
                    DType::F16 => DenseData::F16(w.to_vec1()?),
                    _ => DenseData::F32(w.to_dtype(DType::F32)?.to_vec1()?),
                };
                Ok(BaseWeight::dense(data, out_f, in_f)?)
            }
        }
    }

    /// A base from `qlora-lora`'s form (bias attached), on `device` for a dense weight.
    pub fn from_base_weight(
        weight: BaseWeight,
        bias: Option<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        match weight {
            BaseWeight::Quantized(q) => Ok(LoraBase::Quantized(
                Linear4bit::new(q, bias)?.to_device(device)?,
            )),
            BaseWeight::Dense {
                data,
                out_features,
                in_features,
                fan_in_fan_out,
            } => {
                let shape = (out_features, in_features);
                let mut w = match data {
                    DenseData::F32(v) => Tensor::from_vec(v, shape, device)?,
                    DenseData::Bf16(v) => Tensor::from_vec(v, shape, device)?,
                    DenseData::F16(v) => Tensor::from_vec(v, shape, device)?,
                };
                if fan_in_fan_out {
                    w = w.reshape((in_features, out_features))?.t()?.contiguous()?;
                }
                Ok(LoraBase::Dense(candle_nn::Linear::new(w, bias)))
            }
        }
    }
}

/// How a [`LoraLinear`]'s adapter starts (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, PartialEq)]
pub enum LoraInit {
    /// `True`: A Kaiming-uniform (seeded), B = 0.
    Default {
        /// Seed of A.
        seed: u64,
    },
    /// `"gaussian"`: A ~ N(0, 1/r), B = 0.
    Gaussian {
        /// Seed of A.
        seed: u64,
    },
    /// `False`: A and B both random (the layer starts away from the base; for tests).
    Random {
        /// Seed of A and B.
        seed: u64,
    },
    /// `"pissa"`: A, B from the top-r singular triplets of W; the base becomes `W − s·B·A`
    /// (re-quantized with the base's own options for a 4-bit base).
    Pissa,
    /// `"olora"`: A, B from a thin QR of W; the base becomes `W − s·B·A`.
    Olora,
    /// `"loftq"`: alternate quantizing `W − s·B·A` and fitting B·A to the error; needs a dense
    /// base, which becomes 4-bit (`LoftqOptions::quantize`).
    Loftq(LoftqOptions),
    /// Given tensors (e.g. loaded from a PEFT adapter).
    Weights(AdapterWeights),
}

/// A LoRA (or DoRA) linear layer in candle:
/// `Y = X·Wᵀ + b + s·(dropout(X)·Aᵀ)·Bᵀ`, with `A: [r, in]`, `B: [out, r]` (and DoRA's magnitude
/// `m: [out]`) as f32 candle [`Var`]s and `W` frozen. Gradients come from candle's autograd
/// (`loss.backward()`); the 4-bit base's input gradient comes from [`Linear4bit`]'s custom op.
///
/// The dropout mask is `qlora-lora`'s counter-based mask of `(seed, element index)`, so a
/// forward in [`Mode::Train`] equals `qlora_lora::LoraLinear::forward` with the same seed. In
/// `Module::forward` the layer is in evaluation mode until [`set_training`](Self::set_training)
/// turns dropout on; then every call draws the next seed.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qlora_candle::{Linear4bit, LoraInit, LoraLinear};
/// use qlora_codec::QuantizeOptions;
/// use qlora_lora::LoraParams;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let w = Tensor::randn(0f32, 0.05, (64, 128), &Device::Cpu)?;
/// let base = Linear4bit::from_tensor(&w, None, QuantizeOptions::qlora())?;
/// let layer = LoraLinear::new(base, LoraParams::new(8, 16.0), LoraInit::Gaussian { seed: 1 })?;
/// let x = Tensor::randn(0f32, 1.0, (4, 128), &Device::Cpu)?;
/// let loss = layer.forward(&x)?.sqr()?.sum_all()?;
/// let grads = loss.backward()?;
/// let (da, db) = (grads.get(layer.a()).unwrap(), grads.get(layer.b()).unwrap());
/// assert_eq!((da.dims(), db.dims()), (&[8, 128][..], &[64, 8][..]));
/// assert_eq!(layer.vars().len(), 2); // A and B: hand them to an optimizer
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LoraLinear {
    base: LoraBase,
    params: LoraParams,
    a: Var,
    b: Var,
    magnitude: Option<Var>,
    training: AtomicBool,
    next_seed: AtomicU64,
}

impl Clone for LoraLinear {
    fn clone(&self) -> Self {
        LoraLinear {
            base: self.base.clone(),
            params: self.params,
            a: self.a.clone(),
            b: self.b.clone(),
            magnitude: self.magnitude.clone(),
            training: AtomicBool::new(self.training.load(Ordering::Relaxed)),
            next_seed: AtomicU64::new(self.next_seed.load(Ordering::Relaxed)),
        }
    }
}

impl LoraLinear {
    /// Wrap `base` with a fresh adapter: hyper-parameters `params` (rank, alpha, rsLoRA,
    /// dropout, DoRA) and the initialization `init`. With DoRA the magnitude starts at
    /// `‖W + s·B·A‖_row` (PEFT's init: DoRA starts equal to LoRA).
    pub fn new(base: impl Into<LoraBase>, params: LoraParams, init: LoraInit) -> Result<Self> {
        let mut base = base.into();
        params.validate()?;
        let (out_f, in_f) = base.dims()?;
        let r = params.r;
        let weights = match init {
            LoraInit::Default { seed } => init::init_default(r, in_f, out_f, seed),
            LoraInit::Gaussian { seed } => init::init_gaussian(r, in_f, out_f, seed),
            LoraInit::Random { seed } => init::init_random(r, in_f, out_f, seed),
            LoraInit::Weights(w) => w,
            LoraInit::Pissa | LoraInit::Olora => {
                let bw = base.to_base_weight()?;
                let w = bw.to_f32()?;
                let res = if init == LoraInit::Pissa {
                    init::init_pissa(&w, out_f, in_f, &params)?
                } else {
                    init::init_olora(&w, out_f, in_f, &params)?
                };
                let bias = base.bias().cloned();
                let residual = match &bw {
                    BaseWeight::Quantized(q) => BaseWeight::quantized(QuantizedTensor::quantize(
                        &res.residual,
                        &[out_f, in_f],
                        same_options(q),
                    )?)?,
                    BaseWeight::Dense { data, .. } => BaseWeight::dense(
                        DenseData::from_f32(&res.residual, data.dtype()),
                        out_f,
                        in_f,
                    )?,
                };
                base = LoraBase::from_base_weight(residual, bias, &base.device())?;
                res.weights
            }
            LoraInit::Loftq(options) => {
                let LoraBase::Dense(_) = &base else {
                    return Err(Error::Adapter {
                        module: "LoftQ".into(),
                        reason: "LoftQ quantizes the full-precision weight: build the layer \
                                 over the dense base (it becomes 4-bit)"
                            .into(),
                    });
                };
                let w = base.to_base_weight()?.to_f32()?;
                let res = init::init_loftq(&w, out_f, in_f, &params, options)?;
                let bias = base.bias().cloned();
                let device = base.device();
                base = LoraBase::Quantized(Linear4bit::new(res.base, bias)?.to_device(&device)?);
                res.weights
            }
        };
        Self::from_weights(base, params, weights)
    }

    /// Wrap `base` with the given adapter tensors (PEFT's layout), checking that they fit it.
    /// A DoRA layer (`params.use_dora`) without a magnitude gets PEFT's init.
    pub fn from_weights(
        base: impl Into<LoraBase>,
        params: LoraParams,
        weights: AdapterWeights,
    ) -> Result<Self> {
        let base = base.into();
        params.validate()?;
        let (out_f, in_f) = base.dims()?;
        let device = base.device();
        if let Some(b) = base.bias() {
            if b.dims() != [out_f] {
                return Err(Error::Shape {
                    what: "base bias".into(),
                    expected: vec![out_f],
                    found: b.dims().to_vec(),
                });
            }
        }
        let r = params.r;
        let check = |what: &str, shape: &[usize], v: &[f32]| -> Result<()> {
            if v.len() != shape.iter().product::<usize>() {
                return Err(Error::Adapter {
                    module: what.into(),
                    reason: format!(
                        "{} values do not fit shape {shape:?} (r = {r}, base [{out_f}, {in_f}])",
                        v.len()
                    ),
                });
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::Adapter {
                    module: what.into(),
                    reason: format!("non-finite value {} at flat index {i}", v[i]),
                });
            }
            Ok(())
        };
        check("lora_A.weight", &[r, in_f], &weights.a)?;
        check("lora_B.weight", &[out_f, r], &weights.b)?;
        let var = |v: &[f32], shape: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::from_slice(v, shape, &device)?)?)
        };
        let a = var(&weights.a, &[r, in_f])?;
        let b = var(&weights.b, &[out_f, r])?;
        let mut layer = LoraLinear {
            base,
            params,
            a,
            b,
            magnitude: None,
            training: AtomicBool::new(false),
            next_seed: AtomicU64::new(0),
        };
        match (weights.magnitude, params.use_dora) {
            (Some(m), true) => {
                check("lora_magnitude_vector", &[out_f], &m)?;
                layer.magnitude = Some(var(&m, &[out_f])?);
            }
            (None, true) => {
                let norm = layer.weight_norm()?;
                layer.magnitude = Some(Var::from_tensor(&norm)?);
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(Error::Adapter {
                    module: "lora_magnitude_vector".into(),
                    reason: "a DoRA magnitude was given but use_dora is false".into(),
                })
            }
        }
        Ok(layer)
    }

    /// Build the layer for `module` (e.g. `model.layers.0.self_attn.q_proj`) of a PEFT adapter
    /// over `base`, with the rank and alpha the adapter's config assigns to it (rank/alpha
    /// patterns included). Errors name the module when it is missing from the adapter, its
    /// tensors do not fit the base, or the config needs what this layer does not do
    /// (`fan_in_fan_out`).
    pub fn from_peft(
        base: impl Into<LoraBase>,
        adapter: &PeftAdapter,
        module: &str,
    ) -> Result<Self> {
        let weights = adapter
            .modules
            .get(module)
            .ok_or_else(|| Error::Adapter {
                module: module.into(),
                reason: format!(
                    "not in the adapter (it has {} modules)",
                    adapter.modules.len()
                ),
            })?
            .clone();
        if adapter.config.fan_in_fan_out {
            return Err(Error::Adapter {
                module: module.into(),
                reason: "fan_in_fan_out adapters (HF Conv1D bases) are not supported".into(),
            });
        }
        let params = adapter.config.params_for(module);
        Self::from_weights(base, params, weights).map_err(|e| match e {
            Error::Adapter {
                module: what,
                reason,
            } => Error::Adapter {
                module: module.into(),
                reason: format!("{what}: {reason}"),
            },
            e => e,
        })
    }

    /// The frozen base.
    pub fn base(&self) -> &LoraBase {
        &self.base
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &LoraParams {
        &self.params
    }

    /// The scaling s (`alpha/r`, or `alpha/√r` with rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.params.scaling()
    }

    /// `lora_A.weight`, `[r, in]`.
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// `lora_B.weight`, `[out, r]`.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// DoRA's `lora_magnitude_vector`, `[out]`.
    pub fn magnitude(&self) -> Option<&Var> {
        self.magnitude.as_ref()
    }

    /// The trainable variables: A, B (and the magnitude with DoRA), for an optimizer.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.a.clone(), self.b.clone()];
        v.extend(self.magnitude.clone());
        v
    }

    /// Turn dropout on (`true`) or off for `Module::forward`.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Set the seed the next training-mode `Module::forward` uses (each call then takes the
    /// next one).
    pub fn set_seed(&self, seed: u64) {
        self.next_seed.store(seed, Ordering::Relaxed);
    }

    /// The adapter tensors as `qlora-lora` holds them (copied from the `Var`s).
    pub fn adapter_weights(&self) -> Result<AdapterWeights> {
        let v = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        Ok(AdapterWeights {
            a: v(&self.a)?,
            b: v(&self.b)?,
            magnitude: self.magnitude.as_ref().map(|m| v(m)).transpose()?,
        })
    }

    /// DoRA's row norms `‖W + s·B·A‖₂` (f32 `[out]`, detached: PEFT treats them as constants):
    /// tile by tile from a 4-bit base, with candle's ops from a dense one.
    pub fn weight_norm(&self) -> Result<Tensor> {
        let s = self.scaling();
        match &self.base {
            LoraBase::Quantized(q) => {
                let w = self.adapter_weights()?;
                let norm = qlora_lora::merge::dora_weight_norm(q.base(), &self.params, &w)?;
                let n = norm.len();
                Ok(Tensor::from_vec(norm, n, &q.device().clone())?)
            }
            LoraBase::Dense(l) => {
                let ba = self.b.as_tensor().matmul(self.a.as_tensor())?;
                let full = (l.weight().to_dtype(DType::F32)? + (ba * s)?)?;
                Ok(full.sqr()?.sum(1)?.sqrt()?.detach())
            }
        }
    }

    /// Forward pass in the given mode for `xs: […, in]` (f32, bf16 or f16; the adapter branch
    /// runs in f32 and the result comes back in the input's dtype).
    pub fn forward_mode(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        check_float("input", xs.dtype())?;
        check_device("input", xs, &self.base.device())?;
        let (out_f, in_f) = self.base.dims()?;
        let dims = xs.dims().to_vec();
        if dims.last() != Some(&in_f) {
            let mut expected = dims.clone();
            match expected.last_mut() {
                Some(l) => *l = in_f,
                None => expected.push(in_f),
            }
            return Err(Error::Shape {
                what: "input (last dimension must be in_features)".into(),
                expected,
                found: dims,
            });
        }
        let n = xs.elem_count() / in_f.max(1);
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("dims end with in_f") = out_f;
        if let (LoraBase::Quantized(q), None) = (&self.base, &self.magnitude) {
            if !q.is_cuda() && self.a.dtype() == DType::F32 && self.b.dtype() == DType::F32 {
                // On the CPU the whole layer is one op with its own backward (`FusedLora`), on
                // the input as it is shaped (a reshape would be one more node for autograd).
                let op = FusedLora {
                    base: Arc::clone(q.base()),
                    params: self.params,
                    mode,
                    cache: Mutex::new(None),
                };
                let y = xs.to_dtype(DType::F32)?.contiguous()?.apply_op3(
                    self.a.as_tensor(),
                    self.b.as_tensor(),
                    op,
                )?;
                let y = match q.bias() {
                    Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                    None => y,
                };
                return Ok(y.to_dtype(xs.dtype())?);
            }
        }
        let x = xs.to_dtype(DType::F32)?.reshape((n, in_f))?;
        let s = self.scaling();
        let p = self.params.dropout;
        let seed = match mode {
            Mode::Train { seed } if p > 0.0 => Some(seed),
            _ => None,
        };
        let xd = match seed {
            Some(seed) => {
                let mask = qlora_lora::layer::dropout_mask(seed, p, n * in_f);
                (&x * Tensor::from_vec(mask, (n, in_f), x.device())?)?
            }
            None => x.clone(),
        };
        let u = xd.matmul(&self.a.as_tensor().t()?)?;
        let l = u.matmul(&self.b.as_tensor().t()?)?;
        // On a CUDA device the 4-bit base runs in the input's dtype (a bf16 tile and cuBLAS
        // for bf16 activations); the adapter branch stays in f32, as on the CPU.
        let xw = match &self.base {
            LoraBase::Quantized(q) if q.is_cuda() => self
                .base
                .matmul(&xs.reshape((n, in_f))?)?
                .to_dtype(DType::F32)?,
            _ => self.base.matmul(&x)?,
        };
        let y = match &self.magnitude {
            None => (xw + (l * s)?)?,
            Some(m) => {
                let c = (m.as_tensor() / self.weight_norm()?)?.reshape((1, out_f))?;
                match seed {
                    // y = c ⊙ (X·Wᵀ + s·L)
                    None => (xw + (l * s)?)?.broadcast_mul(&c)?,
                    // y = X·Wᵀ + (c−1)⊙(Xd·Wᵀ) + c⊙s·L
                    Some(_) => {
                        let xdw = self.base.matmul(&xd)?;
                        let cm1 = (&c - 1.0)?;
                        ((xw + xdw.broadcast_mul(&cm1)?)? + (l * s)?.broadcast_mul(&c)?)?
                    }
                }
            }
        };
        let y = match self.base.bias() {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        Ok(y.reshape(out_dims)?.to_dtype(xs.dtype())?)
    }

    /// Merge the adapter into the base (PEFT's `merge_and_unload`): `W + s·B·A` (DoRA:
    /// `m/‖W + s·B·A‖_row · (W + s·B·A)`), returned as a new base (this layer is unchanged).
    /// `MergeOptions::default()` keeps the base's kind: a dense base stays in its dtype, a
    /// 4-bit base is re-quantized with its own options, as PEFT does.
    pub fn merge(&self, options: MergeOptions) -> Result<LoraBase> {
        let bw = self.base.to_base_weight()?;
        let (merged, _) =
            qlora_lora::merge_weight(&bw, &self.params, &self.adapter_weights()?, options)?;
        LoraBase::from_base_weight(merged, self.base.bias().cloned(), &self.base.device())
    }
}

impl Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mode = if self.training.load(Ordering::Relaxed) {
            Mode::Train {
                seed: self.next_seed.fetch_add(1, Ordering::Relaxed),
            }
        } else {
            Mode::Eval
        };
        Ok(self.forward_mode(xs, mode)?)
    }
}

/// A plain LoRA layer over a 4-bit base on the CPU as one candle op, `(X, A, B) ↦ X·Wᵀ +
/// s·(dropout(X)·Aᵀ)·Bᵀ` with its three gradients: `qlora-lora`'s forward and backward
/// ([`LoraView`]; the dropout mask kept as bits between the two). candle's autograd then sees one node
/// instead of a dozen (each of which it would zero-fill and accumulate a gradient for); the
/// values are those of the composed form up to the order of float sums.
struct FusedLora {
    base: Arc<BaseWeight>,
    params: LoraParams,
    mode: Mode,
    /// `U = dropout(X)·Aᵀ` from the forward pass, for the backward pass.
    cache: Mutex<Option<ForwardCache>>,
}

impl FusedLora {
    fn view<'a>(&'a self, a: &'a [f32], b: &'a [f32]) -> LoraView<'a> {
        LoraView {
            base: &self.base,
            bias: None,
            params: self.params,
            a,
            b,
            magnitude: None,
        }
    }
}

fn lora_error(e: qlora_lora::Error) -> candle_core::Error {
    candle_core::Error::from(Error::from(e))
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "qlora-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // `[.., in]` is `n` rows of `in`; the output is `[.., out]`.
        let mut dims = lx.dims().to_vec();
        let in_f = self.base.in_features();
        if dims.last() != Some(&in_f) {
            candle_core::bail!("{}: the input {dims:?} does not end in {in_f}", self.name());
        }
        let n = lx.shape().elem_count() / in_f.max(1);
        let view = self.view(f32s(a, la, "lora_A")?, f32s(b, lb, "lora_B")?);
        let (y, cache) = view
            .forward(f32s(x, lx, "LoRA input")?, n, self.mode)
            .map_err(lora_error)?;
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(cache);
        *dims.last_mut().expect("checked above") = self.base.out_features();
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let Some(cache) = guard.as_ref() else {
            candle_core::bail!("{}: backward before forward", self.name());
        };
        let grads = with_f32s(a, "lora_A", |a| {
            with_f32s(b, "lora_B", |b| {
                with_f32s(x, "LoRA input", |x| {
                    with_f32s(grad_res, "LoRA output gradient", |g| {
                        self.view(a, b).backward(x, cache, g).map_err(lora_error)
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(grads.x, x.shape(), dev)?),
            Some(Tensor::from_vec(grads.a, a.shape(), dev)?),
            Some(Tensor::from_vec(grads.b, b.shape(), dev)?),
        ))
    }
}

/// The 4-bit options a weight was quantized with (quant type, block size, double quant).
fn same_options(q: &QuantizedTensor) -> QuantizeOptions {
    QuantizeOptions {
        quant_type: q.quant_type(),
        blocksize: q.blocksize(),
        double_quant: matches!(q.absmax(), Absmax::Double(_)),
    }
}

/// Save the adapters of `layers` (module path → layer) as a PEFT adapter folder
/// (`adapter_config.json` + `adapter_model.safetensors`, PEFT's key names, byte-compatible with
/// the files PEFT writes) under `config`.
pub fn save_peft_adapter<'a>(
    dir: &Path,
    config: AdapterConfig,
    layers: impl IntoIterator<Item = (&'a str, &'a LoraLinear)>,
) -> Result<()> {
    let mut modules = BTreeMap::new();
    for (name, layer) in layers {
        modules.insert(name.to_string(), layer.adapter_weights()?);
    }
    let adapter = PeftAdapter {
        config,
        modules,
        other_tensors: BTreeMap::new(),
    };
    adapter.save(dir)?;
    Ok(())
}
