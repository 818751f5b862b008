//! transformers' `config.json` for the Llama family (Llama, Mistral, Qwen2), read with serde into a
//! typed config. Keys this crate does not use are kept (`extra`) so that a config read and written
//! back loses nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::LlamaError;

/// The `model_type`s this implementation runs, with the `architectures` entry of each.
pub const SUPPORTED_MODEL_TYPES: [(&str, &str); 3] = [
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
];

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

/// Rotary-embedding parameters: transformers 5's `rope_parameters`, or transformers 4's
/// `rope_scaling` (whose `rope_theta` sits at the top level of the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RopeParameters {
    /// `"default"`, `"linear"` or `"llama3"` (others are rejected by [`LlamaConfig::validate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// transformers 4's older spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    /// The base θ of the rotary frequencies (transformers 5 keeps it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `linear` and `llama3`: the context-extension factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`: wavelengths above `original_max_position_embeddings / low_freq_factor` are divided
    /// by `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length the model was pretrained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Any other key, kept for writing the config back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RopeParameters {
    /// The rope type, `"default"` when none is given.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }
}

/// A Llama-family `config.json` (the keys this implementation reads; the rest is kept in
/// [`extra`](Self::extra)).
///
/// ```
/// use qlora_candle::llama::LlamaConfig;
/// let cfg = LlamaConfig::tiny(64, 32, 2, 4, 2);
/// assert_eq!(cfg.head_dim(), 8);
/// assert_eq!(cfg.kv_heads(), 2);
/// let json = serde_json::to_string(&cfg).unwrap();
/// let back: LlamaConfig = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, cfg);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// RMSNorm's ε.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// The MLP activation; only `silu` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Whether `lm_head` shares `model.embed_tokens.weight`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama/Mistral: biases on q/k/v/o (Qwen2 always has q/k/v biases, never an o bias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// transformers 4: the rotary base θ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers 4: rotary scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: rotary type, θ and scaling in one object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Mistral (and Qwen2 with `use_sliding_window`): the attention window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// The weights' dtype as saved (`"float32"`, `"bfloat16"`, ...), informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Standard deviation of the normal initialisation of linear and embedding weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
    /// Every other key (token ids, `transformers_version`, ...), written back unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl LlamaConfig {
    /// A small Llama config (untied, θ = 10 000, ε = 1e-6, 128 positions) for tests and demos:
    /// `vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`,
    /// `num_key_value_heads`; the MLP is `ceil(8/3 · hidden / 16) · 16` wide.
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        Self {
            architectures: vec!["LlamaForCausalLM".to_string()],
            model_type: "llama".to_string(),
            vocab_size,
            hidden_size,
            intermediate_size: (8 * hidden_size).div_ceil(3 * 16) * 16,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: Some(hidden_size / num_attention_heads.max(1)),
            max_position_embeddings: 128,
            rms_norm_eps: 1e-6,
            hidden_act: "silu".to_string(),
            tie_word_embeddings: false,
            attention_bias: Some(false),
            mlp_bias: Some(false),
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: Some(RopeParameters {
                rope_type: Some("default".to_string()),
                rope_theta: Some(10_000.0),
                ..RopeParameters::default()
            }),
            sliding_window: None,
            use_sliding_window: None,
            dtype: Some("float32".to_string()),
            initializer_range: Some(0.02),
            extra: Map::new(),
        }
    }

    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, LlamaError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| LlamaError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| LlamaError::ConfigJson {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the config as pretty JSON (the form transformers writes).
    pub fn to_file(&self, path: impl AsRef<Path>) -> Result<(), LlamaError> {
        let path = path.as_ref();
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| LlamaError::ConfigJson {
                path: path.to_path_buf(),
                source,
            })?;
        text.push('\n');
        std::fs::write(path, text).map_err(|source| LlamaError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Whether q/k/v projections have biases (Qwen2: always).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias.unwrap_or(false)
    }

    /// Whether `o_proj` has a bias.
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias.unwrap_or(false)
    }

    /// Whether the MLP projections have biases.
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    /// The rotary parameters in force (transformers 5's `rope_parameters` first, then
    /// transformers 4's `rope_scaling`).
    pub fn rope(&self) -> RopeParameters {
        self.rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default()
    }

    /// The rotary base θ (10 000 when the config names none).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// The attention window in force, if any.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            "qwen2" if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// Every parameter tensor of the model with its HF name and shape, in a fixed order
    /// (embedding, layers, final norm, then `lm_head` unless tied).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.kv_heads() * self.head_dim(),
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (name, rows, cols, bias) in [
                ("self_attn.q_proj", q, h, self.qkv_bias()),
                ("self_attn.k_proj", kv, h, self.qkv_bias()),
                ("self_attn.v_proj", kv, h, self.qkv_bias()),
                ("self_attn.o_proj", h, q, self.o_bias()),
                ("mlp.gate_proj", i, h, self.mlp_bias()),
                ("mlp.up_proj", i, h, self.mlp_bias()),
                ("mlp.down_proj", h, i, self.mlp_bias()),
            ] {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
                if bias {
                    out.push((format!("{p}.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Checks that this implementation can run the config: a supported `model_type` and
    /// architecture, consistent head counts, `silu`, and a supported rotary type.
    pub fn validate(&self) -> Result<(), LlamaError> {
        let Some((_, arch)) = SUPPORTED_MODEL_TYPES
            .iter()
            .find(|(t, _)| *t == self.model_type)
        else {
            return Err(LlamaError::UnsupportedModelType(self.model_type.clone()));
        };
        if !self.architectures.is_empty() && !self.architectures.iter().any(|a| a == arch) {
            return Err(LlamaError::UnsupportedArchitecture {
                model_type: self.model_type.clone(),
                found: self.architectures.clone(),
                expected: (*arch).to_string(),
            });
        }
        let bad = |msg: String| Err(LlamaError::InvalidConfig(msg));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim given)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head_dim {} is odd (rotary embeddings need pairs)",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                self.hidden_act
            ));
        }
        if !self.rms_norm_eps.is_finite() || self.rms_norm_eps <= 0.0 {
            return bad(format!(
                "rms_norm_eps {} is not positive",
                self.rms_norm_eps
            ));
        }
        if !self.rope_theta().is_finite() || self.rope_theta() <= 0.0 {
            return bad(format!("rope_theta {} is not positive", self.rope_theta()));
        }
        if self.attention_window() == Some(0) {
            return bad("sliding_window is 0".to_string());
        }
        let rope = self.rope();
        match rope.kind() {
            "default" => {}
            "linear" => {
                if !rope.factor.is_some_and(|f| f > 0.0) {
                    return bad("rope type \"linear\" needs a positive factor".to_string());
                }
            }
            "llama3" => {
                let ok = rope.factor.is_some_and(|f| f > 0.0)
                    && rope.low_freq_factor.is_some_and(|f| f > 0.0)
                    && rope
                        .high_freq_factor
                        .is_some_and(|f| Some(f) > rope.low_freq_factor)
                    && rope.original_max_position_embeddings.is_some_and(|n| n > 0);
                if !ok {
                    return bad("rope type \"llama3\" needs factor, low_freq_factor < high_freq_factor and original_max_position_embeddings".to_string());
                }
            }
            other => {
                return bad(format!(
                    "rope type {other:?} is not supported (default, linear, llama3)"
                ))
            }
        }
        Ok(())
    }

    /// The rotary inverse frequencies (`head_dim / 2` values), computed as transformers does in
    /// f32: `1 / θ^(2i/d)`, then the `linear` or `llama3` rescaling.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim();
        let theta = self.rope_theta() as f32;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let rope = self.rope();
        match rope.kind() {
            "linear" => {
                let f = rope.factor.unwrap_or(1.0) as f32;
                base.iter().map(|x| x / f).collect()
            }
            "llama3" => {
                let factor = rope.factor.unwrap_or(1.0);
                let low = rope.low_freq_factor.unwrap_or(1.0);
                let high = rope.high_freq_factor.unwrap_or(4.0);
                let old = rope.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }
}
