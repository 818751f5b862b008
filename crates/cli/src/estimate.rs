//! `qlora estimate`: exact byte accounting of QLoRA training memory for a Llama-style model.
//!
//! What it owns: the model shape (from a `config.json` or a preset), the per-component byte counts
//! and their printing. The byte counts of quantized tensors come from the codec's own size rules
//! (`ceil(n/2)` packed bytes, `ceil(n/b)` blocks, `ceil(blocks/256)` nested scales, 4 bytes of
//! offset), the optimizer state sizes from `qlora-optim` (`StateKind::state_bytes`, the
//! `min_8bit_size` rule of `Adam::kind_for`), so the estimate cannot drift from what the layers
//! allocate. The activation model is stated in [`activation_model_doc`] and in `docs/memory.md`.

use clap::{Args, ValueEnum};
use qlora_codec::{check_blocksize, num_blocks, packed_len};
use qlora_double_quant::NESTED_BLOCKSIZE;
use qlora_optim::{Adam, AdamConfig, StateKind};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Bytes of one bf16/f16 element.
const BF16: u128 = 2;
/// Bytes of one f32 element.
const F32: u128 = 4;
/// Bytes per tensor of the 4-bit code table a checkpoint stores (`weight.quant_map`, 16 f32).
const QUANT_MAP_BYTES: u128 = 16 * 4;
/// Bytes per tensor of the nested dynamic map (`weight.nested_quant_map`, 256 f32).
const NESTED_MAP_BYTES: u128 = 256 * 4;

/// The shape of a Llama-style decoder (Llama 1/2/3, Mistral): what the accounting needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelShape {
    /// A preset name or the config path.
    pub(crate) name: String,
    pub(crate) hidden: u128,
    pub(crate) intermediate: u128,
    pub(crate) layers: u128,
    pub(crate) heads: u128,
    pub(crate) kv_heads: u128,
    pub(crate) head_dim: u128,
    pub(crate) vocab: u128,
    /// `tie_word_embeddings`: lm_head shares the embedding matrix.
    pub(crate) tied: bool,
    /// `attention_bias`: q/k/v/o carry biases (kept dense).
    pub(crate) attention_bias: bool,
    /// `mlp_bias`: gate/up/down carry biases (kept dense).
    pub(crate) mlp_bias: bool,
}

/// Presets: (name, hidden, intermediate, layers, heads, kv heads, vocab), as in the published
/// Hugging Face `config.json` of each model (all untied, head_dim = hidden / heads).
const PRESETS: [(&str, u128, u128, u128, u128, u128, u128); 6] = [
    ("llama-7b", 4096, 11008, 32, 32, 32, 32000),
    ("llama-13b", 5120, 13824, 40, 40, 40, 32000),
    ("llama-33b", 6656, 17920, 60, 52, 52, 32000),
    ("llama-65b", 8192, 22016, 80, 64, 64, 32000),
    ("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    ("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
];

/// The seven linear layers of a Llama decoder block, in checkpoint order.
pub(crate) const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Upper bounds that keep every product far inside `u128` and reject typos early.
const MAX_DIM: u128 = 1 << 20;
const MAX_LAYERS: u128 = 1 << 12;
const MAX_VOCAB: u128 = 1 << 24;

impl ModelShape {
    /// A named preset, or `None`.
    pub(crate) fn preset(name: &str) -> Option<Self> {
        PRESETS
            .iter()
            .find(|p| p.0 == name)
            .map(|&(name, h, i, l, a, kv, v)| ModelShape {
                name: name.to_string(),
                hidden: h,
                intermediate: i,
                layers: l,
                heads: a,
                kv_heads: kv,
                head_dim: h / a,
                vocab: v,
                tied: false,
                attention_bias: false,
                mlp_bias: false,
            })
    }

    /// The preset names.
    pub(crate) fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    /// Parse a Hugging Face `config.json` of a Llama-style model.
    pub(crate) fn from_config_json(name: &str, text: &str) -> Result<Self, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("{name}: not valid JSON: {e}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| format!("{name}: expected a JSON object"))?;
        if let Some(mt) = obj.get("model_type") {
            let mt = mt.as_str().unwrap_or("");
            if !["llama", "mistral"].contains(&mt) {
                return Err(format!(
                    "{name}: model_type {mt:?} is not supported (the estimate models Llama-style \
                     decoders: \"llama\", \"mistral\")"
                ));
            }
        }
        let int = |key: &str| -> Result<Option<u128>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(u128::from(n)))
                    .ok_or_else(|| format!("{name}: {key} must be a positive integer, found {x}")),
            }
        };
        let req = |key: &str| -> Result<u128, String> {
            int(key)?.ok_or_else(|| format!("{name}: missing {key}"))
        };
        let flag = |key: &str| -> Result<bool, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(format!("{name}: {key} must be true or false, found {x}")),
            }
        };
        let hidden = req("hidden_size")?;
        let heads = req("num_attention_heads")?;
        let kv_heads = int("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match int("head_dim")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(format!(
                    "{name}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} \
                     and no head_dim is given"
                ))
            }
        };
        let shape = ModelShape {
            name: name.to_string(),
            hidden,
            intermediate: req("intermediate_size")?,
            layers: req("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: req("vocab_size")?,
            tied: flag("tie_word_embeddings")?,
            attention_bias: flag("attention_bias")?,
            mlp_bias: flag("mlp_bias")?,
        };
        shape.validate()?;
        Ok(shape)
    }

    fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        for (what, v, max) in [
            ("hidden_size", self.hidden, MAX_DIM),
            ("intermediate_size", self.intermediate, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("num_attention_heads", self.heads, MAX_DIM),
            ("num_hidden_layers", self.layers, MAX_LAYERS),
            ("vocab_size", self.vocab, MAX_VOCAB),
        ] {
            if v > max {
                return Err(format!("{n}: {what} = {v} exceeds the supported {max}"));
            }
        }
        if self.kv_heads > self.heads || self.heads % self.kv_heads != 0 {
            return Err(format!(
                "{n}: num_key_value_heads {} must divide num_attention_heads {}",
                self.kv_heads, self.heads
            ));
        }
        Ok(())
    }

    /// `[out, in]` of each linear layer of one block, in [`LINEAR_NAMES`] order.
    pub(crate) fn linear_shapes(&self) -> [(u128, u128); 7] {
        let (h, i) = (self.hidden, self.intermediate);
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    }

    /// Parameters of all quantized linear layers.
    pub(crate) fn linear_params(&self) -> u128 {
        self.layers
            * self
                .linear_shapes()
                .iter()
                .map(|(o, i)| o * i)
                .sum::<u128>()
    }

    /// Parameters kept dense: embeddings, lm_head (unless tied), RMSNorm weights, biases.
    pub(crate) fn dense_params(&self) -> u128 {
        let (h, l) = (self.hidden, self.layers);
        let embed = self.vocab * h;
        let head = if self.tied { 0 } else { self.vocab * h };
        let norms = (2 * l + 1) * h;
        let shapes = self.linear_shapes();
        let attn_bias: u128 = shapes[..4].iter().map(|s| s.0).sum();
        let mlp_bias: u128 = shapes[4..].iter().map(|s| s.0).sum();
        let biases = l
            * (if self.attention_bias { attn_bias } else { 0 }
                + if self.mlp_bias { mlp_bias } else { 0 });
        embed + head + norms + biases
    }
}

/// Storage format of the base model's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BaseFormat {
    /// Dense bf16 (LoRA without quantization).
    Bf16,
    /// NF4 codes with one f32 absmax per block.
    Nf4,
    /// NF4 with double-quantized absmax (QLoRA).
    #[value(name = "nf4-dq")]
    Nf4Dq,
}

impl BaseFormat {
    fn label(self, blocksize: usize) -> String {
        match self {
            BaseFormat::Bf16 => "bf16".to_string(),
            BaseFormat::Nf4 => format!("NF4, block {blocksize}, f32 absmax"),
            BaseFormat::Nf4Dq => format!("NF4 + double quant, block {blocksize}"),
        }
    }
}

/// Optimizer state precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OptimizerArg {
    /// bitsandbytes AdamW8bit: blockwise 8-bit states (tensors < 4096 elements keep f32).
    #[value(name = "8bit")]
    EightBit,
    /// AdamW with f32 states.
    #[value(name = "32bit")]
    ThirtyTwoBit,
}

/// Dtype of the LoRA weights (and so of their gradients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AdapterDtype {
    /// f32, what PEFT makes of bf16 adapters by default (`autocast_adapter_dtype=True`).
    F32,
    /// bf16.
    Bf16,
}

/// How attention keeps what its backward pass needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AttentionArg {
    /// Fused attention (flash / SDPA): saves q, k, v, the output and a f32 log-sum-exp per row.
    Sdpa,
    /// Eager attention: also saves the f32 softmax and its bf16 copy, `6·b·heads·s²` bytes.
    Eager,
}

/// Everything the accounting depends on besides the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setup {
    pub(crate) format: BaseFormat,
    pub(crate) blocksize: usize,
    pub(crate) rank: u128,
    /// Indices into [`LINEAR_NAMES`].
    pub(crate) targets: Vec<usize>,
    pub(crate) optimizer: OptimizerArg,
    pub(crate) adapter_dtype: AdapterDtype,
    pub(crate) batch: u128,
    pub(crate) seq: u128,
    pub(crate) attention: AttentionArg,
}

/// Exact bytes of one 4-bit tensor of `n` elements as the codec stores it: `ceil(n/2)` packed
/// bytes plus the absmax — `4·ceil(n/b)` bytes, or with double quantization `ceil(n/b)` codes,
/// `4·ceil(ceil(n/b)/256)` nested scales and a 4-byte offset. Equal to
/// `QuantizedTensor::nbytes` (tested).
pub(crate) fn quantized_tensor_bytes(n: u128, blocksize: usize, double_quant: bool) -> u128 {
    // Dimensions are bounded by `validate`, so one tensor always fits in usize on 64-bit
    // targets; the division rules are the codec's own.
    let n = n as usize;
    let packed = packed_len(n) as u128;
    let blocks = num_blocks(n, blocksize);
    let absmax = if double_quant {
        blocks as u128 + 4 * qlora_double_quant::num_blocks(blocks, NESTED_BLOCKSIZE) as u128 + 4
    } else {
        4 * blocks as u128
    };
    packed + absmax
}

/// Bytes of all quantized linear layers of `model` in `format`.
pub(crate) fn base_linear_bytes(model: &ModelShape, format: BaseFormat, blocksize: usize) -> u128 {
    let per_layer: u128 = model
        .linear_shapes()
        .iter()
        .map(|&(o, i)| match format {
            BaseFormat::Bf16 => BF16 * o * i,
            BaseFormat::Nf4 => quantized_tensor_bytes(o * i, blocksize, false),
            BaseFormat::Nf4Dq => quantized_tensor_bytes(o * i, blocksize, true),
        })
        .sum();
    model.layers * per_layer
}

/// Per-tensor code tables a checkpoint stores beside each 4-bit weight (`quant_map`, and
/// `nested_quant_map` with double quant).
pub(crate) fn quant_table_bytes(model: &ModelShape, format: BaseFormat) -> u128 {
    let tensors = model.layers * 7;
    match format {
        BaseFormat::Bf16 => 0,
        BaseFormat::Nf4 => tensors * QUANT_MAP_BYTES,
        BaseFormat::Nf4Dq => tensors * (QUANT_MAP_BYTES + NESTED_MAP_BYTES),
    }
}

/// Activation bytes saved for the backward pass, split as the checkpointing policies need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activations {
    /// Everything one decoder layer saves (its input included).
    pub(crate) per_layer: u128,
    /// The layer input alone (the residual stream, bf16): what a checkpointed layer keeps.
    pub(crate) layer_input: u128,
    /// Final norm, lm_head input, logits and the loss's log-softmax.
    pub(crate) head: u128,
}

impl Activations {
    /// All layers keep everything.
    pub(crate) fn without_checkpointing(&self, layers: u128) -> u128 {
        layers * self.per_layer + self.head
    }

    /// Each layer keeps its input; during backward one layer at a time is recomputed.
    pub(crate) fn with_checkpointing(&self, layers: u128) -> u128 {
        layers * self.layer_input + (self.per_layer - self.layer_input) + self.head
    }
}

/// The activation model, in words (printed with `--explain` and in JSON).
pub(crate) fn activation_model_doc() -> &'static str {
    "tensors saved for backward, bf16 unless noted (T = batch*seq tokens), per decoder layer: \
     RMSNorm input 2Th + f32 rstd 4T (twice), q/k/v input 2Th, q 2T*heads*hd, k and v \
     2T*kv_heads*hd each, attention output 2T*heads*hd, sdpa log-sum-exp 4*b*heads*s \
     (eager: 6*b*heads*s^2), MLP input 2Th, gate, up, silu(gate) and down input 2Ti each, \
     and x*A^T 2Tr per adapted linear; after the layers: final RMSNorm input 2Th + 4T, lm_head \
     input 2Th, bf16 logits 2TV and the f32 log-softmax of the loss 4TV. Gradient \
     checkpointing keeps each layer's input 2Th and recomputes one layer at a time. The method \
     is that of Korthikanti et al. 2022 (arXiv:2205.05198, sec. 4.1), applied to Llama's \
     RMSNorm/SwiGLU/GQA block without dropout."
}

/// Activation bytes of `model` under `setup`.
pub(crate) fn activations(model: &ModelShape, setup: &Setup) -> Activations {
    let t = setup.batch * setup.seq;
    let (h, i) = (model.hidden, model.intermediate);
    let q = model.heads * model.head_dim;
    let kv = model.kv_heads * model.head_dim;
    let rms = BF16 * t * h + F32 * t;
    let attention_internal = match setup.attention {
        AttentionArg::Sdpa => F32 * setup.batch * model.heads * setup.seq,
        AttentionArg::Eager => (F32 + BF16) * setup.batch * model.heads * setup.seq * setup.seq,
    };
    let attention = rms                 // input_layernorm input (= the layer input) + rstd
        + BF16 * t * h                  // normed x: input of q/k/v
        + BF16 * t * (q + 2 * kv)       // q, k, v after RoPE, saved by attention
        + BF16 * t * q                  // attention output: input of o_proj
        + attention_internal;
    let mlp = rms                       // post_attention_layernorm input + rstd
        + BF16 * t * h                  // normed x: input of gate/up
        + 4 * BF16 * t * i; // gate, up, silu(gate), silu(gate)*up (input of down)
    let lora = setup.targets.len() as u128 * BF16 * t * setup.rank;
    let per_layer = attention + mlp + lora;
    let head = rms + BF16 * t * h + (BF16 + F32) * t * model.vocab;
    Activations {
        per_layer,
        layer_input: BF16 * t * h,
        head,
    }
}

/// The full estimate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Estimate {
    pub(crate) linear_params: u128,
    pub(crate) dense_params: u128,
    pub(crate) lora_params: u128,
    /// Quantized linears in each format: bf16, NF4, NF4 + DQ.
    pub(crate) base_by_format: [u128; 3],
    pub(crate) base_linears: u128,
    pub(crate) quant_tables: u128,
    pub(crate) dense: u128,
    pub(crate) lora_weights: u128,
    pub(crate) lora_grads: u128,
    pub(crate) optimizer_states: u128,
    pub(crate) dequant_scratch: u128,
    pub(crate) activations_checkpointed: u128,
    pub(crate) activations_full: u128,
    pub(crate) total_checkpointed: u128,
    pub(crate) total_full: u128,
}

/// Compute the estimate.
pub(crate) fn estimate(model: &ModelShape, setup: &Setup) -> Result<Estimate, String> {
    check_blocksize(setup.blocksize).map_err(|e| e.to_string())?;
    if setup.rank == 0 || setup.rank > MAX_DIM {
        return Err(format!(
            "LoRA rank must be between 1 and {MAX_DIM}, found {}",
            setup.rank
        ));
    }
    if setup.batch == 0 || setup.seq == 0 || setup.batch > MAX_DIM || setup.seq > MAX_DIM {
        return Err(format!(
            "batch and sequence length must be between 1 and {MAX_DIM}, found {} and {}",
            setup.batch, setup.seq
        ));
    }
    let shapes = model.linear_shapes();
    let optimizer = Adam::new(match setup.optimizer {
        OptimizerArg::EightBit => AdamConfig::adamw8bit(),
        OptimizerArg::ThirtyTwoBit => AdamConfig::adamw32bit(),
    })
    .map_err(|e| e.to_string())?;
    let adapter_bytes = match setup.adapter_dtype {
        AdapterDtype::F32 => F32,
        AdapterDtype::Bf16 => BF16,
    };
    let mut lora_params = 0u128;
    let mut optimizer_states = 0u128;
    for &t in &setup.targets {
        let (out, inp) = shapes[t];
        // lora_A is [r, in], lora_B is [out, r]; each gets its own optimizer state.
        for n in [setup.rank * inp, out * setup.rank] {
            lora_params += n;
            let n = usize::try_from(n).map_err(|_| "adapter too large".to_string())?;
            let kind: StateKind = optimizer.kind_for(n);
            optimizer_states += kind.state_bytes(n) as u128;
        }
    }
    lora_params *= model.layers;
    optimizer_states *= model.layers;
    let base_by_format = [BaseFormat::Bf16, BaseFormat::Nf4, BaseFormat::Nf4Dq]
        .map(|f| base_linear_bytes(model, f, setup.blocksize));
    let base_linears = base_by_format[match setup.format {
        BaseFormat::Bf16 => 0,
        BaseFormat::Nf4 => 1,
        BaseFormat::Nf4Dq => 2,
    }];
    let quant_tables = quant_table_bytes(model, setup.format);
    let dense = BF16 * model.dense_params();
    let lora_weights = adapter_bytes * lora_params;
    let lora_grads = adapter_bytes * lora_params;
    // bitsandbytes' 4-bit matmul dequantizes the whole weight to bf16 before the GEMM; the
    // largest such buffer is live at once.
    let dequant_scratch = match setup.format {
        BaseFormat::Bf16 => 0,
        _ => BF16 * shapes.iter().map(|(o, i)| o * i).max().unwrap_or(0),
    };
    let act = activations(model, setup);
    let activations_checkpointed = act.with_checkpointing(model.layers);
    let activations_full = act.without_checkpointing(model.layers);
    let fixed = base_linears
        + quant_tables
        + dense
        + lora_weights
        + lora_grads
        + optimizer_states
        + dequant_scratch;
    Ok(Estimate {
        linear_params: model.linear_params(),
        dense_params: model.dense_params(),
        lora_params,
        base_by_format,
        base_linears,
        quant_tables,
        dense,
        lora_weights,
        lora_grads,
        optimizer_states,
        dequant_scratch,
        activations_checkpointed,
        activations_full,
        total_checkpointed: fixed + activations_checkpointed,
        total_full: fixed + activations_full,
    })
}

/// Arguments of `qlora estimate`.
#[derive(Debug, Args)]
pub(crate) struct EstimateArgs {
    /// A preset (llama-7b, llama-13b, llama-33b, llama-65b, llama-3-8b, mistral-7b) or the path
    /// of a Hugging Face config.json (or of the folder holding it).
    model: String,
    /// Storage of the base model's linear layers.
    #[arg(long, value_enum, default_value = "nf4-dq")]
    format: BaseFormat,
    /// Elements per absmax block: 32, 64, …, 4096.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 64)]
    rank: u64,
    /// Adapted linear layers: `all` or a comma-separated list of q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj.
    #[arg(long, default_value = "all")]
    targets: String,
    /// Optimizer state precision.
    #[arg(long, value_enum, default_value = "8bit")]
    optimizer: OptimizerArg,
    /// Dtype of the LoRA weights and gradients.
    #[arg(long, value_enum, default_value = "f32")]
    adapter_dtype: AdapterDtype,
    /// Micro-batch size.
    #[arg(long, default_value_t = 4)]
    batch: u64,
    /// Sequence length.
    #[arg(long, default_value_t = 2048)]
    seq: u64,
    /// Attention implementation (what it saves for backward).
    #[arg(long, value_enum, default_value = "sdpa")]
    attention: AttentionArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parse `all` or a comma-separated list of linear-layer names.
pub(crate) fn parse_targets(s: &str) -> Result<Vec<usize>, String> {
    if s.trim() == "all" {
        return Ok((0..LINEAR_NAMES.len()).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let idx = LINEAR_NAMES
            .iter()
            .position(|&n| n == part)
            .ok_or_else(|| {
                format!(
                    "unknown target {part:?} (expected `all` or names from {})",
                    LINEAR_NAMES.join(", ")
                )
            })?;
        if !out.contains(&idx) {
            out.push(idx);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn load_model(spec: &str) -> Result<ModelShape, String> {
    if let Some(m) = ModelShape::preset(spec) {
        return Ok(m);
    }
    let mut path = PathBuf::from(spec);
    if path.is_dir() {
        path.push("config.json");
    }
    if !path.exists() {
        return Err(format!(
            "{spec:?} is neither a preset ({}) nor an existing config.json",
            ModelShape::preset_names().join(", ")
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ModelShape::from_config_json(&display(&path), &text)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn setup_from(args: &EstimateArgs) -> Result<Setup, String> {
    Ok(Setup {
        format: args.format,
        blocksize: args.blocksize,
        rank: u128::from(args.rank),
        targets: parse_targets(&args.targets)?,
        optimizer: args.optimizer,
        adapter_dtype: args.adapter_dtype,
        batch: u128::from(args.batch),
        seq: u128::from(args.seq),
        attention: args.attention,
    })
}

/// `qlora estimate`.
pub(crate) fn run(args: &EstimateArgs) -> Result<(), String> {
    let model = load_model(&args.model)?;
    let setup = setup_from(args)?;
    let est = estimate(&model, &setup)?;
    if args.json {
        let text = serde_json::to_string_pretty(&to_json(&model, &setup, &est)?)
            .map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", render_table(&model, &setup, &est));
    }
    Ok(())
}

fn num(x: u128) -> Result<Value, String> {
    u64::try_from(x)
        .map(Value::from)
        .map_err(|_| format!("{x} does not fit in a 64-bit JSON number"))
}

/// The estimate as JSON (all sizes in bytes).
pub(crate) fn to_json(model: &ModelShape, setup: &Setup, e: &Estimate) -> Result<Value, String> {
    Ok(json!({
        "model": {
            "name": model.name,
            "hidden_size": num(model.hidden)?,
            "intermediate_size": num(model.intermediate)?,
            "num_hidden_layers": num(model.layers)?,
            "num_attention_heads": num(model.heads)?,
            "num_key_value_heads": num(model.kv_heads)?,
            "head_dim": num(model.head_dim)?,
            "vocab_size": num(model.vocab)?,
            "tie_word_embeddings": model.tied,
            "linear_params": num(e.linear_params)?,
            "dense_params": num(e.dense_params)?,
        },
        "setup": {
            "format": format!("{:?}", setup.format).to_lowercase(),
            "blocksize": setup.blocksize,
            "rank": num(setup.rank)?,
            "targets": setup.targets.iter().map(|&t| LINEAR_NAMES[t]).collect::<Vec<_>>(),
            "optimizer": match setup.optimizer {
                OptimizerArg::EightBit => "adamw-8bit",
                OptimizerArg::ThirtyTwoBit => "adamw-32bit",
            },
            "adapter_dtype": format!("{:?}", setup.adapter_dtype).to_lowercase(),
            "batch": num(setup.batch)?,
            "seq": num(setup.seq)?,
            "attention": format!("{:?}", setup.attention).to_lowercase(),
        },
        "base_linears_by_format_bytes": {
            "bf16": num(e.base_by_format[0])?,
            "nf4": num(e.base_by_format[1])?,
            "nf4_dq": num(e.base_by_format[2])?,
        },
        "bytes": {
            "base_linears": num(e.base_linears)?,
            "quant_tables": num(e.quant_tables)?,
            "dense_bf16": num(e.dense)?,
            "lora_weights": num(e.lora_weights)?,
            "lora_grads": num(e.lora_grads)?,
            "optimizer_states": num(e.optimizer_states)?,
            "dequant_scratch": num(e.dequant_scratch)?,
            "activations_checkpointed": num(e.activations_checkpointed)?,
            "activations_full": num(e.activations_full)?,
            "total_checkpointed": num(e.total_checkpointed)?,
            "total_full": num(e.total_full)?,
        },
        "lora_params": num(e.lora_params)?,
        "activation_model": activation_model_doc(),
    }))
}

fn gb(x: u128) -> String {
    format!("{:.2}", x as f64 / 1e9)
}

fn gib(x: u128) -> String {
    format!("{:.2}", x as f64 / (1u64 << 30) as f64)
}

/// The human-readable table.
pub(crate) fn render_table(model: &ModelShape, setup: &Setup, e: &Estimate) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let row = |s: &mut String, label: &str, x: u128| {
        let _ = writeln!(s, "  {label:<44} {x:>16} {:>9} {:>9}", gb(x), gib(x));
    };
    let header = |s: &mut String, title: &str| {
        let _ = writeln!(s, "{title:<46} {:>16} {:>9} {:>9}", "bytes", "GB", "GiB");
    };
    let _ = writeln!(
        s,
        "{}: {} layers, hidden {}, intermediate {}, {} heads ({} kv, dim {}), vocab {}{}",
        model.name,
        model.layers,
        model.hidden,
        model.intermediate,
        model.heads,
        model.kv_heads,
        model.head_dim,
        model.vocab,
        if model.tied { ", tied lm_head" } else { "" }
    );
    let targets: Vec<&str> = setup.targets.iter().map(|&t| LINEAR_NAMES[t]).collect();
    let _ = writeln!(
        s,
        "  {} parameters in linear layers, {} kept dense (embeddings, lm_head, norms, biases)",
        e.linear_params, e.dense_params
    );
    let _ = writeln!(
        s,
        "  LoRA r={} on {}: {} parameters\n",
        setup.rank,
        targets.join(","),
        e.lora_params
    );
    header(&mut s, "linear layers by format");
    for (k, f) in [BaseFormat::Bf16, BaseFormat::Nf4, BaseFormat::Nf4Dq]
        .into_iter()
        .enumerate()
    {
        let bits = 8.0 * e.base_by_format[k] as f64 / e.linear_params as f64;
        let mark = if f == setup.format { " *" } else { "" };
        row(
            &mut s,
            &format!("{} ({bits:.3} bit){mark}", f.label(setup.blocksize)),
            e.base_by_format[k],
        );
    }
    let _ = writeln!(s);
    header(
        &mut s,
        &format!(
            "training, batch {} x seq {}, {} attention",
            setup.batch,
            setup.seq,
            format!("{:?}", setup.attention).to_lowercase()
        ),
    );
    let adapter = format!("{:?}", setup.adapter_dtype).to_lowercase();
    row(
        &mut s,
        &format!("linear layers ({})", setup.format.label(setup.blocksize)),
        e.base_linears,
    );
    row(&mut s, "quant-state tables (per tensor)", e.quant_tables);
    row(&mut s, "dense tensors (bf16)", e.dense);
    row(&mut s, &format!("LoRA weights ({adapter})"), e.lora_weights);
    row(&mut s, &format!("LoRA gradients ({adapter})"), e.lora_grads);
    row(
        &mut s,
        match setup.optimizer {
            OptimizerArg::EightBit => "AdamW states (8-bit blockwise)",
            OptimizerArg::ThirtyTwoBit => "AdamW states (f32)",
        },
        e.optimizer_states,
    );
    row(
        &mut s,
        "dequantized weight (largest, transient)",
        e.dequant_scratch,
    );
    row(
        &mut s,
        "activations, gradient checkpointing",
        e.activations_checkpointed,
    );
    row(&mut s, "activations, no checkpointing", e.activations_full);
    row(
        &mut s,
        "TOTAL with gradient checkpointing",
        e.total_checkpointed,
    );
    row(&mut s, "TOTAL without checkpointing", e.total_full);
    let _ = writeln!(
        s,
        "\nnot counted: CUDA context, allocator fragmentation, gradients of activations during \
         backward, temporary GEMM workspaces (see docs/memory.md)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_codec::{QuantizeOptions, QuantizedTensor};

    const TINY_CONFIG: &str =
        include_str!("../../../testdata/checkpoints/tiny-llama-bf16/config.json");

    fn tiny() -> ModelShape {
        ModelShape::from_config_json("tiny", TINY_CONFIG).unwrap()
    }

    fn setup(format: BaseFormat) -> Setup {
        Setup {
            format,
            blocksize: 64,
            rank: 64,
            targets: (0..7).collect(),
            optimizer: OptimizerArg::EightBit,
            adapter_dtype: AdapterDtype::F32,
            batch: 2,
            seq: 16,
            attention: AttentionArg::Sdpa,
        }
    }

    #[test]
    fn tensor_bytes_match_the_codec() {
        // Odd lengths and partial blocks exercise every ceil division, including a nested
        // block count above one (300 blocks of 32 → 2 nested scales).
        for &(n, bs) in &[
            (1usize, 64usize),
            (63, 64),
            (65, 64),
            (4097, 64),
            (9600, 32),
            (9601, 4096),
        ] {
            let w: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            for dq in [false, true] {
                let opts = QuantizeOptions {
                    double_quant: dq,
                    ..QuantizeOptions::qlora()
                }
                .with_blocksize(bs);
                let q = QuantizedTensor::quantize(&w, &[n], opts).unwrap();
                assert_eq!(
                    quantized_tensor_bytes(n as u128, bs, dq),
                    q.nbytes() as u128,
                    "n={n} bs={bs} dq={dq}"
                );
            }
        }
    }

    #[test]
    fn four_point_127_bits_with_double_quant() {
        // 4096 x 4096 at block 64: 8 388 608 packed + 262 144 codes + 1 024 nested f32 + offset.
        let n = 4096u128 * 4096;
        let bytes = quantized_tensor_bytes(n, 64, true);
        assert_eq!(bytes, 8_388_608 + 262_144 + 4 * 1024 + 4);
        let bits = 8.0 * bytes as f64 / n as f64;
        assert!((bits - 4.127).abs() < 5e-4, "{bits}");
        // The per-parameter rule of qlora-double-quant plus the 4-byte per-tensor offset.
        let rule = 4.0 + qlora_double_quant::absmax_bits_per_param(64, true) + 32.0 / n as f64;
        assert!((bits - rule).abs() < 1e-12, "{bits} vs {rule}");
        // Without double quant: 4.5 bits exactly.
        assert_eq!(8 * quantized_tensor_bytes(n, 64, false), 9 * n / 2);
    }

    #[test]
    fn tiny_llama_by_hand() {
        // h 64, i 176, 2 layers, 4 heads of 16, 2 kv heads, vocab 256, untied.
        // Linears per layer: q 64x64 = 4096, k 32x64 = 2048, v 2048, o 4096,
        // gate/up 176x64 = 11264, down 64x176 = 11264 -> 46 080; two layers 92 160.
        let m = tiny();
        assert_eq!(m.linear_params(), 92_160);
        // Dense: embed 256*64 + lm_head 256*64 + 5 norms * 64 = 33 088.
        assert_eq!(m.dense_params(), 33_088);

        let e = estimate(&m, &setup(BaseFormat::Nf4Dq)).unwrap();
        // NF4+DQ block 64: 4096 -> 2048 + 64 + 4*1 + 4 = 2120; 2048 -> 1024 + 32 + 4 + 4 = 1064;
        // 11264 -> 5632 + 176 + 4 + 4 = 5816. Per layer 2*2120 + 2*1064 + 3*5816 = 23 816.
        assert_eq!(e.base_by_format[2], 2 * 23_816);
        // NF4 f32 absmax: 4096 -> 2304, 2048 -> 1152, 11264 -> 6336: per layer 25 920.
        assert_eq!(e.base_by_format[1], 2 * 25_920);
        assert_eq!(e.base_by_format[0], 2 * 92_160);
        assert_eq!(e.base_linears, 47_632);
        assert_eq!(e.quant_tables, 14 * (64 + 1024));
        assert_eq!(e.dense, 2 * 33_088);
        // LoRA r=64: per layer 64 * (128 + 96 + 96 + 128 + 240 + 240 + 240) = 74 752.
        assert_eq!(e.lora_params, 2 * 74_752);
        assert_eq!(e.lora_weights, 4 * 149_504);
        assert_eq!(e.lora_grads, 4 * 149_504);
        // 8-bit states (2n + 8 ceil(n/256)) for n >= 4096, f32 (8n) below:
        // q: A 4096 -> 8320, B 4096 -> 8320; k, v: A 4096 -> 8320, B 2048 -> 16 384;
        // o like q; gate, up: A 4096 -> 8320, B 11264 -> 22 880; down: A 11264 -> 22 880,
        // B 4096 -> 8320. Per layer 2*16 640 + 2*24 704 + 3*31 200 = 176 288.
        assert_eq!(e.optimizer_states, 2 * 176_288);
        // Largest linear 11264 elements in bf16.
        assert_eq!(e.dequant_scratch, 22_528);
        // Activations, T = 32 tokens: per layer rms 4096 + 128, qkv input 4096, q 4096,
        // k 2048, v 2048, attention output 4096, lse 4*2*4*16 = 512, rms 4224, MLP input 4096,
        // 4 x 2*32*176 = 45 056, LoRA 7 x 2*32*64 = 28 672 -> 103 168.
        // Head: rms 4224 + lm_head input 4096 + logits (2+4)*32*256 = 49 152 -> 57 472.
        assert_eq!(e.activations_full, 2 * 103_168 + 57_472);
        assert_eq!(
            e.activations_checkpointed,
            2 * 4096 + (103_168 - 4096) + 57_472
        );
        let fixed = 47_632 + 15_232 + 66_176 + 2 * 598_016 + 352_576 + 22_528;
        assert_eq!(e.total_checkpointed, fixed + 164_736);
        assert_eq!(e.total_full, fixed + 263_808);

        // Eager attention replaces the log-sum-exp by 6 * 2 * 4 * 16^2 = 12 288 per layer.
        let eager = Setup {
            attention: AttentionArg::Eager,
            ..setup(BaseFormat::Nf4Dq)
        };
        let e2 = estimate(&m, &eager).unwrap();
        assert_eq!(e2.activations_full - e.activations_full, 2 * (12_288 - 512));
    }

    #[test]
    fn formats_and_optimizers_change_only_their_rows() {
        let m = ModelShape::preset("llama-7b").unwrap();
        let a = estimate(&m, &setup(BaseFormat::Nf4Dq)).unwrap();
        let b = estimate(&m, &setup(BaseFormat::Bf16)).unwrap();
        assert_eq!(b.base_linears, 2 * m.linear_params());
        assert_eq!(b.dequant_scratch, 0);
        assert_eq!(a.activations_full, b.activations_full);
        let f32_states = Setup {
            optimizer: OptimizerArg::ThirtyTwoBit,
            ..setup(BaseFormat::Nf4Dq)
        };
        let c = estimate(&m, &f32_states).unwrap();
        assert_eq!(c.optimizer_states, 8 * c.lora_params);
        assert!(a.optimizer_states * 3 < c.optimizer_states);
    }

    #[test]
    fn llama_7b_linear_count_matches_the_reference() {
        // 32 * (4 * 4096^2 + 3 * 4096 * 11008) = 6 476 005 376 (performance-anchors.md §5).
        let m = ModelShape::preset("llama-7b").unwrap();
        assert_eq!(m.linear_params(), 6_476_005_376);
        // LoRA r = 16 on all linears: 32 * 16 * (4 * 8192 + 3 * 15104) = 39 976 960.
        let s = Setup {
            rank: 16,
            ..setup(BaseFormat::Nf4Dq)
        };
        assert_eq!(estimate(&m, &s).unwrap().lora_params, 39_976_960);
    }

    #[test]
    fn bad_input_is_an_error() {
        let e = ModelShape::from_config_json("x", "{").unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = ModelShape::from_config_json("x", r#"{"hidden_size": 64}"#).unwrap_err();
        assert!(e.contains("missing num_attention_heads"), "{e}");
        let e = ModelShape::from_config_json("x", r#"{"model_type": "gpt2", "hidden_size": 64}"#)
            .unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        let e =
            ModelShape::from_config_json("x", r#"{"hidden_size": -1, "num_attention_heads": 4}"#)
                .unwrap_err();
        assert!(e.contains("positive integer"), "{e}");
        let cfg = TINY_CONFIG.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        let e = ModelShape::from_config_json("x", &cfg).unwrap_err();
        assert!(e.contains("must divide"), "{e}");
        assert!(parse_targets("q_proj,lm_head").is_err());
        assert_eq!(parse_targets("v_proj, q_proj").unwrap(), vec![0, 2]);
        let m = tiny();
        let bad_block = Setup {
            blocksize: 48,
            ..setup(BaseFormat::Nf4Dq)
        };
        assert!(estimate(&m, &bad_block).is_err());
        let zero_rank = Setup {
            rank: 0,
            ..setup(BaseFormat::Nf4Dq)
        };
        assert!(estimate(&m, &zero_rank).is_err());
        assert!(load_model("no-such-model").unwrap_err().contains("preset"));
    }

    #[test]
    fn json_and_table_carry_the_totals() {
        let m = ModelShape::preset("llama-65b").unwrap();
        let s = setup(BaseFormat::Nf4Dq);
        let e = estimate(&m, &s).unwrap();
        let j = to_json(&m, &s, &e).unwrap();
        assert_eq!(
            j["bytes"]["total_checkpointed"].as_u64().unwrap() as u128,
            e.total_checkpointed
        );
        let t = render_table(&m, &s, &e);
        assert!(t.contains(&e.total_checkpointed.to_string()), "{t}");
    }
}
