//! The causal LM: embedding, decoder layers (RMSNorm, rotary self-attention with grouped-query
//! heads, SwiGLU MLP), final norm and `lm_head`, computed as transformers' eager implementation
//! does (norms and softmax in f32, rotary tables in f32 then cast).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::attention::FusedAttention;
use super::norm::RmsNormOp;
use super::weights::{check_tensors, load_safetensors, CONFIG_FILE};
use super::{LlamaConfig, LlamaError};

/// Labels equal to this are ignored by [`causal_lm_loss`] (PyTorch's and transformers' default).
pub const IGNORE_INDEX: i64 = -100;

/// Builds every linear projection of the model, so that a caller decides what each one is: dense
/// ([`DenseLinears`]), a frozen 4-bit base, a LoRA adapter over it, ...
pub trait LinearFactory {
    /// Returns the layer for the module `name` (the Hugging Face module path, e.g.
    /// `"model.layers.0.self_attn.q_proj"` or `"lm_head"`), given its weight
    /// (`[out_features, in_features]`, in the model's dtype) and optional bias. With tied
    /// embeddings `lm_head`'s weight is `model.embed_tokens.weight` itself.
    fn linear(
        &mut self,
        name: &str,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Box<dyn Module>>;
}

/// The dense factory: every projection is a [`candle_nn::Linear`] over the given tensors (trainable
/// when they are [`candle_core::Var`]s, as from a [`VarMap`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct DenseLinears;

impl LinearFactory for DenseLinears {
    fn linear(
        &mut self,
        _name: &str,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Box<dyn Module>> {
        Ok(Box::new(candle_nn::Linear::new(weight, bias)))
    }
}

/// The dtype norms, softmax and the loss are computed in: f32, or f64 for an f64 model (so that
/// gradients can be checked against f64 finite differences).
fn upcast(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        if xs.device().is_cpu()
            && matches!(dtype, DType::F32 | DType::F64)
            && self.weight.dtype() == dtype
        {
            // One fused pass each way; the same operations as the composed form below.
            return xs
                .contiguous()?
                .apply_op2(&self.weight, RmsNormOp { eps: self.eps });
        }
        let x = xs.to_dtype(upcast(dtype))?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// How attention hides future (and out-of-window) positions.
enum AttentionMask {
    /// Inside the fused CPU attention ([`FusedAttention`]; f32/f64 models on the CPU).
    Fused { window: usize },
    /// A `[t, t]` tensor of 0 / −∞ added to the scaled scores (elsewhere).
    Additive(Tensor),
}

struct Attention {
    q: Box<dyn Module>,
    k: Box<dyn Module>,
    v: Box<dyn Module>,
    o: Box<dyn Module>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// Attention from the projections `q: [b, t, heads·d]`, `k, v: [b, t, kv_heads·d]` to the merged
/// heads `[b, t, heads·d]` with candle's ops (the form off the CPU; [`FusedAttention`] computes
/// the same on the CPU): split the heads, rotary embeddings, repeat the key/value heads,
/// `softmax(q·kᵀ/√d + mask)` (upcast for f16/bf16), `·v`, merge. `heads` is
/// `(heads, kv_heads, head_dim)`.
pub(crate) fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let split = |y: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        y.reshape((b, t, n, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = apply_rotary(&split(q, heads)?, cos, sin)?;
    let k = apply_rotary(&split(k, kv_heads)?, cos, sin)?;
    let v = split(v, kv_heads)?;
    let rep = heads / kv_heads;
    let repeat = |x: Tensor| -> candle_core::Result<Tensor> {
        if rep == 1 {
            return Ok(x);
        }
        // Query head h reads key/value head h / rep (transformers' repeat_kv).
        x.unsqueeze(2)?
            .expand((b, kv_heads, rep, t, head_dim))?
            .reshape((b, heads, t, head_dim))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let raw = q.matmul(&k.t()?.contiguous()?)?;
    let dtype = raw.dtype();
    let scores = (raw * scale)?.broadcast_add(mask)?;
    let probs =
        candle_nn::ops::softmax(&scores.to_dtype(upcast(dtype))?, D::Minus1)?.to_dtype(dtype)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, heads * head_dim))
}

impl Attention {
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
    ) -> candle_core::Result<Tensor> {
        let mask = match mask {
            AttentionMask::Fused { window } => {
                // One op from the projections to the merged heads, with its own backward.
                let op = FusedAttention::new(
                    self.heads,
                    self.kv_heads,
                    self.head_dim,
                    *window,
                    cos,
                    sin,
                )?;
                let q = self.q.forward(xs)?.contiguous()?;
                let k = self.k.forward(xs)?.contiguous()?;
                let v = self.v.forward(xs)?.contiguous()?;
                return self.o.forward(&q.apply_op3(&k, &v, op)?);
            }
            AttentionMask::Additive(mask) => mask,
        };
        let q = self.q.forward(xs)?;
        let k = self.k.forward(xs)?;
        let v = self.v.forward(xs)?;
        let heads = (self.heads, self.kv_heads, self.head_dim);
        let out = composed_attention(&q, &k, &v, heads, cos, sin, mask)?;
        self.o.forward(&out)
    }
}

struct Mlp {
    gate: Box<dyn Module>,
    up: Box<dyn Module>,
    down: Box<dyn Module>,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = (self.gate.forward(xs)?, self.up.forward(xs)?);
        let h = if gate.device().is_cpu() && matches!(gate.dtype(), DType::F32 | DType::F64) {
            // One fused op each way (super::swiglu).
            gate.contiguous()?
                .apply_op2(&up.contiguous()?, super::swiglu::SwiGlu)?
        } else {
            (gate.silu()? * up)?
        };
        self.down.forward(&h)
    }
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal language model (Llama, Mistral, Qwen2 layouts).
///
/// Build it from a model folder with [`from_pretrained`](Self::from_pretrained), from any
/// [`VarBuilder`] with [`new`](Self::new), or with fresh trainable weights with
/// [`init_random`](Self::init_random):
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qlora_candle::llama::{causal_lm_loss, LlamaConfig, LlamaForCausalLM};
///
/// let cfg = LlamaConfig::tiny(64, 32, 2, 4, 2);
/// let (model, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 7)?;
/// let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu)?;
/// let logits = model.forward(&ids)?;
/// assert_eq!(logits.dims(), &[1, 4, 64]);
/// let labels = Tensor::new(&[[1i64, 5, 9, -100]], &Device::Cpu)?;
/// let loss = causal_lm_loss(&logits, &labels)?.to_scalar::<f32>()?;
/// assert!((loss - (64f32).ln()).abs() < 0.5); // a fresh model is near uniform: ln(64) = 4.16
/// assert_eq!(varmap.all_vars().len(), cfg.parameter_shapes().len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LlamaForCausalLM {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Box<dyn Module>,
    inv_freq: Vec<f32>,
    window: Option<usize>,
}

impl std::fmt::Debug for LlamaForCausalLM {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaForCausalLM")
            .field("model_type", &self.cfg.model_type)
            .field("layers", &self.layers.len())
            .field("hidden_size", &self.cfg.hidden_size)
            .field("dtype", &self.embed.dtype())
            .finish_non_exhaustive()
    }
}

impl LlamaForCausalLM {
    /// Builds the model from `vb` (tensors named as in transformers, e.g.
    /// `model.layers.0.self_attn.q_proj.weight`); every projection goes through `factory`.
    /// With a [`VarMap`]-backed builder, missing tensors are created with transformers' init
    /// (normal with `initializer_range` for matrices, ones for norms) and are trainable.
    pub fn new(
        cfg: &LlamaConfig,
        vb: VarBuilder<'_>,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, LlamaError> {
        cfg.validate()?;
        let std = cfg.initializer_range.unwrap_or(0.02);
        let normal = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        let embed = vb.get_with_hints((cfg.vocab_size, h), "model.embed_tokens.weight", normal)?;
        let norm_w = |name: &str| -> candle_core::Result<RmsNorm> {
            Ok(RmsNorm {
                weight: vb.get_with_hints(h, name, Init::Const(1.0))?,
                eps: cfg.rms_norm_eps,
            })
        };
        let mut linear = |name: String,
                          rows: usize,
                          cols: usize,
                          bias: bool|
         -> candle_core::Result<Box<dyn Module>> {
            let w = vb.get_with_hints((rows, cols), &format!("{name}.weight"), normal)?;
            let b = if bias {
                Some(vb.get_with_hints(rows, &format!("{name}.bias"), Init::Const(0.0))?)
            } else {
                None
            };
            factory.linear(&name, w, b)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let input_norm = norm_w(&format!("{p}.input_layernorm.weight"))?;
            let attn = Attention {
                q: linear(
                    format!("{p}.self_attn.q_proj"),
                    heads * hd,
                    h,
                    cfg.qkv_bias(),
                )?,
                k: linear(
                    format!("{p}.self_attn.k_proj"),
                    kv_heads * hd,
                    h,
                    cfg.qkv_bias(),
                )?,
                v: linear(
                    format!("{p}.self_attn.v_proj"),
                    kv_heads * hd,
                    h,
                    cfg.qkv_bias(),
                )?,
                o: linear(format!("{p}.self_attn.o_proj"), h, heads * hd, cfg.o_bias())?,
                heads,
                kv_heads,
                head_dim: hd,
            };
            let i = cfg.intermediate_size;
            let mlp = Mlp {
                gate: linear(format!("{p}.mlp.gate_proj"), i, h, cfg.mlp_bias())?,
                up: linear(format!("{p}.mlp.up_proj"), i, h, cfg.mlp_bias())?,
                down: linear(format!("{p}.mlp.down_proj"), h, i, cfg.mlp_bias())?,
            };
            let post_norm = norm_w(&format!("{p}.post_attention_layernorm.weight"))?;
            layers.push(Layer {
                input_norm,
                attn,
                post_norm,
                mlp,
            });
        }
        let norm = norm_w("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            factory.linear("lm_head", embed.clone(), None)?
        } else {
            linear("lm_head".to_string(), cfg.vocab_size, h, false)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: cfg.inv_freq(),
            window: cfg.attention_window(),
        })
    }

    /// Loads `dir/config.json` and the weights (`model.safetensors`, or shards with
    /// `model.safetensors.index.json`), converted to `dtype` on `device`. Missing tensors and
    /// wrong shapes are errors naming the tensor.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, LlamaError> {
        let dir = dir.as_ref();
        let cfg = LlamaConfig::from_file(dir.join(CONFIG_FILE))?;
        let tensors = load_safetensors(dir, device)?;
        Self::from_tensors(&cfg, tensors, dtype, device, factory)
    }

    /// Builds the model from named tensors (checked against `cfg` first), converted to `dtype`.
    pub fn from_tensors(
        cfg: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, LlamaError> {
        cfg.validate()?;
        check_tensors(cfg, &tensors)?;
        Self::new(
            cfg,
            VarBuilder::from_tensors(tensors, dtype, device),
            factory,
        )
    }

    /// A model with fresh trainable weights in a new [`VarMap`] (named as in transformers),
    /// initialised as transformers does (normal(0, `initializer_range`) matrices, unit norms) from
    /// a ChaCha8 stream seeded by `seed`: the same seed gives the same weights. Projections are
    /// dense; save the result with [`save_pretrained`](super::save_pretrained) over
    /// [`varmap_tensors`].
    pub fn init_random(
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<(Self, VarMap), LlamaError> {
        cfg.validate()?;
        let std = cfg.initializer_range.unwrap_or(0.02);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| LlamaError::InvalidConfig("VarMap lock poisoned".to_string()))?;
            for (name, shape) in cfg.parameter_shapes() {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    (0..n)
                        .map(|_| std as f32 * standard_normal(&mut rng))
                        .collect()
                };
                let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
                data.insert(name, candle_core::Var::from_tensor(&t)?);
            }
        }
        let model = Self::new(
            cfg,
            VarBuilder::from_varmap(&varmap, dtype, device),
            &mut DenseLinears,
        )?;
        Ok((model, varmap))
    }

    /// The config the model was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The embedding matrix (`[vocab_size, hidden_size]`).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed
    }

    /// The model's dtype (that of the embedding).
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    fn rotary(&self, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * 2 * half);
        let mut sin = Vec::with_capacity(t * 2 * half);
        for pos in 0..t {
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let dev = self.device();
        let cos = Tensor::from_vec(cos, (t, 2 * half), dev)?.to_dtype(self.dtype())?;
        let sin = Tensor::from_vec(sin, (t, 2 * half), dev)?.to_dtype(self.dtype())?;
        Ok((cos, sin))
    }

    fn causal_mask(&self, t: usize) -> candle_core::Result<Tensor> {
        let window = self.window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > i || i - j >= window {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(mask, (t, t), self.device())?.to_dtype(self.dtype())
    }

    /// The final hidden states (`[batch, seq, hidden_size]`, after the last norm) for `input_ids`
    /// (`[batch, seq]`, u32).
    pub fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor, LlamaError> {
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(LlamaError::SequenceTooLong {
                len: t,
                max: self.cfg.max_position_embeddings,
            });
        }
        if t == 0 {
            return Err(LlamaError::InvalidInput("empty sequence".to_string()));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab_size {
            return Err(LlamaError::InvalidInput(format!(
                "token id {max_id} is out of range for vocab_size {}",
                self.cfg.vocab_size
            )));
        }
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let (cos, sin) = self.rotary(t)?;
        // The fused CPU softmax masks by itself; elsewhere an additive mask is built once.
        let mask = if self.device().is_cpu() && matches!(self.dtype(), DType::F32 | DType::F64) {
            AttentionMask::Fused {
                window: self.window.unwrap_or(usize::MAX),
            }
        } else {
            AttentionMask::Additive(self.causal_mask(t)?)
        };
        for layer in &self.layers {
            let h = layer.input_norm.forward(&x)?;
            x = (x + layer.attn.forward(&h, &cos, &sin, &mask)?)?;
            let h = layer.post_norm.forward(&x)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// The logits (`[batch, seq, vocab_size]`, in the model's dtype) for `input_ids`
    /// (`[batch, seq]`, any integer dtype). Errors if a sequence is longer than
    /// `max_position_embeddings` or an id is not below `vocab_size`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor, LlamaError> {
        let h = self.forward_hidden(input_ids)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Forward and [`causal_lm_loss`] in one call.
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor) -> Result<Tensor, LlamaError> {
        causal_lm_loss(&self.forward(input_ids)?, labels)
    }
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller on (0, 1] uniforms.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// The tensors of a [`VarMap`] by name (for [`save_pretrained`](super::save_pretrained)); they
/// share storage with the variables, so they reflect training so far.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    match varmap.data().lock() {
        Ok(data) => data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        Err(poisoned) => poisoned
            .into_inner()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
    }
}

/// transformers' causal-LM loss: mean cross-entropy (in f32) of `logits[:, i]` against
/// `labels[:, i + 1]` over the positions whose label is not [`IGNORE_INDEX`] (-100).
/// `logits`: `[batch, seq, vocab]`; `labels`: `[batch, seq]` (any integer dtype). Returns a
/// scalar f32 tensor (f64 for f64 logits). Errors if no position is labelled or a label is out of range.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor, LlamaError> {
    let (b, t, v) = logits.dims3()?;
    let (lb, lt) = labels.dims2()?;
    if (lb, lt) != (b, t) {
        return Err(LlamaError::InvalidInput(format!(
            "labels have shape [{lb}, {lt}], logits [{b}, {t}, {v}]"
        )));
    }
    let device = logits.device();
    let shifted: Vec<i64> = labels
        .to_dtype(DType::I64)?
        .narrow(1, 1, t.saturating_sub(1))?
        .flatten_all()?
        .to_vec1()?;
    let mut index = Vec::with_capacity(shifted.len());
    let mut keep = Vec::with_capacity(shifted.len());
    for &l in &shifted {
        if l == IGNORE_INDEX {
            index.push(0u32);
            keep.push(0f32);
        } else if l < 0 || l as usize >= v {
            return Err(LlamaError::InvalidInput(format!(
                "label {l} is neither {IGNORE_INDEX} nor below vocab_size {v}"
            )));
        } else {
            index.push(l as u32);
            keep.push(1f32);
        }
    }
    let count: f32 = keep.iter().sum();
    if count == 0.0 {
        return Err(LlamaError::InvalidInput(
            "no labelled position (every shifted label is -100)".to_string(),
        ));
    }
    if device.is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        // One fused pass each way (the same operations as the composed form below).
        let targets = index
            .iter()
            .zip(&keep)
            .map(|(&l, &k)| (k == 1.0).then_some(l))
            .collect();
        let op = super::loss::CausalLmLoss::new(targets, count as usize);
        return Ok(logits.contiguous()?.apply_op1(op)?);
    }
    let n = index.len();
    let logp = candle_nn::ops::log_softmax(
        &logits
            .narrow(1, 0, t - 1)?
            .reshape((n, v))?
            .to_dtype(upcast(logits.dtype()))?,
        D::Minus1,
    )?;
    let index = Tensor::from_vec(index, (n, 1), device)?;
    let keep = Tensor::from_vec(keep, n, device)?.to_dtype(logp.dtype())?;
    let picked = logp.gather(&index, 1)?.squeeze(1)?;
    Ok(((picked * keep)?.sum_all()? * (-1.0 / count as f64))?)
}
