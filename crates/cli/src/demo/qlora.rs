//! The demo's QLoRA model over qlora-candle's layers: every projection of the decoder quantized
//! to NF4 + double quant ([`Linear4bit`]) under a LoRA adapter ([`LoraLinear`]), `lm_head`,
//! embedding and norms frozen and dense; and the three saved forms (PEFT adapter, 4-bit base,
//! merged model) written and read back.

use super::DemoError;
use candle_core::{DType, Device, Module, Tensor};
use qlora_candle::llama::{save_pretrained, LinearFactory, LlamaConfig, LlamaForCausalLM};
use qlora_candle::{Linear4bit, LoraBase, LoraInit, LoraLinear};
use qlora_checkpoint::{quantized_tensors, write_safetensors_atomic, MappedFile, TensorData};
use qlora_codec::QuantizeOptions;
use qlora_lora::peft::{AdapterConfig, PeftAdapter, TargetModules};
use qlora_lora::{Dtype, LoraParams, MergeOptions, MergeOutput};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The projections that carry adapters (PEFT's `all-linear` for Llama: `lm_head` excluded).
pub(crate) const TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A [`LoraLinear`] shared between the model and the demo, so that switching dropout on and
/// off ([`LoraLinear::set_training`]) reaches the layer the model runs.
struct Shared(Arc<LoraLinear>);

impl Module for Shared {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(xs)
    }
}

/// Where a QLoRA layer's base and adapter come from.
enum Source<'a> {
    /// Quantize the given dense weight; fresh adapter (PEFT's default init, seeded).
    Fresh { params: LoraParams, seed: u64 },
    /// The 4-bit weight of a saved checkpoint and the adapter of a saved PEFT folder.
    Saved {
        checkpoint: &'a qlora_checkpoint::Checkpoint<'a>,
        adapter: &'a PeftAdapter,
    },
}

/// The factory building the QLoRA layers; it keeps each layer (by module path).
struct QloraFactory<'a> {
    source: Source<'a>,
    layers: Vec<(String, Arc<LoraLinear>)>,
}

impl LinearFactory for QloraFactory<'_> {
    fn linear(
        &mut self,
        name: &str,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Box<dyn Module>> {
        if name == "lm_head" {
            return Ok(Box::new(candle_nn::Linear::new(weight, bias)));
        }
        let layer = match &self.source {
            Source::Fresh { params, seed } => {
                let base = Linear4bit::from_tensor(&weight, bias, QuantizeOptions::qlora())?;
                let seed = seed.wrapping_add(self.layers.len() as u64);
                LoraLinear::new(base, *params, LoraInit::Default { seed })?
            }
            Source::Saved {
                checkpoint,
                adapter,
            } => {
                let base = Linear4bit::from_checkpoint(checkpoint, name)?;
                LoraLinear::from_peft(base, adapter, name)?
            }
        };
        let layer = Arc::new(layer);
        self.layers.push((name.to_string(), layer.clone()));
        Ok(Box::new(Shared(layer)))
    }
}

/// The QLoRA model and its adapter layers (module path, layer), in model order.
pub(crate) struct QloraModel {
    pub(crate) model: LlamaForCausalLM,
    pub(crate) layers: Vec<(String, Arc<LoraLinear>)>,
}

impl QloraModel {
    /// Quantizes the dense model's projections (f32 `tensors`) to NF4 + DQ and puts fresh
    /// adapters on them.
    pub(crate) fn new(
        cfg: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        params: LoraParams,
        seed: u64,
    ) -> Result<Self, DemoError> {
        let mut factory = QloraFactory {
            source: Source::Fresh { params, seed },
            layers: Vec::new(),
        };
        let model =
            LlamaForCausalLM::from_tensors(cfg, tensors, DType::F32, &Device::Cpu, &mut factory)?;
        Ok(Self {
            model,
            layers: factory.layers,
        })
    }

    /// Dropout on (training) or off (evaluation) in every adapter.
    pub(crate) fn set_training(&self, training: bool) {
        for (_, l) in &self.layers {
            l.set_training(training);
        }
    }

    /// The trainable variables (every A and B).
    pub(crate) fn vars(&self) -> Vec<candle_core::Var> {
        self.layers.iter().flat_map(|(_, l)| l.vars()).collect()
    }

    /// Bytes of the 4-bit weights (codes, absmax codes, nested scales, offset).
    pub(crate) fn base_linear_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(_, l)| match l.base() {
                LoraBase::Quantized(q) => q.weight().nbytes(),
                LoraBase::Dense(d) => d.weight().elem_count() * d.weight().dtype().size_in_bytes(),
            })
            .sum()
    }

    /// Parameters of the 4-bit weights.
    pub(crate) fn base_linear_params(&self) -> usize {
        self.layers
            .iter()
            .map(|(_, l)| l.base().dims().map(|(o, i)| o * i).unwrap_or(0))
            .sum()
    }

    /// Parameters of the adapters.
    pub(crate) fn adapter_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }
}

/// The dense tensors (everything but the adapted projections' weights) of `tensors`.
fn frozen_dense(cfg: &LlamaConfig, tensors: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = cfg
        .parameter_shapes()
        .into_iter()
        .filter(|(n, _)| !is_target(n))
        .filter_map(|(n, _)| tensors.get(&n).map(|t| (n, t.clone())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn is_target(tensor_name: &str) -> bool {
    TARGET_MODULES
        .iter()
        .any(|m| tensor_name.ends_with(&format!("{m}.weight")))
}

/// Bytes of the frozen dense parameters (embedding, norms, `lm_head`).
pub(crate) fn frozen_dense_bytes(cfg: &LlamaConfig, tensors: &HashMap<String, Tensor>) -> usize {
    frozen_dense(cfg, tensors)
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// The PEFT config of the demo's adapters.
pub(crate) fn adapter_config(params: LoraParams) -> AdapterConfig {
    let mut config = AdapterConfig::new(
        params.r,
        params.alpha,
        TargetModules::List(TARGET_MODULES.iter().map(|s| s.to_string()).collect()),
    );
    // The shortest decimal that round-trips the f32 (0.05, not 0.05000000074505806).
    config.lora_dropout = params
        .dropout
        .to_string()
        .parse()
        .unwrap_or(f64::from(params.dropout));
    config.task_type = Some("CAUSAL_LM".into());
    config.base_model_name_or_path = Some("../base".into());
    config
}

/// Writes the 4-bit base as transformers + bitsandbytes save a `load_in_4bit` model:
/// `model.safetensors` with each projection's bitsandbytes tensors (packed codes, absmax codes,
/// nested scales, quant state) and the dense rest in f32, and a `config.json` with its
/// `quantization_config`.
pub(crate) fn save_4bit_base(
    dir: &Path,
    cfg: &LlamaConfig,
    dense: &HashMap<String, Tensor>,
    q: &QloraModel,
) -> Result<(), DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut tensors = Vec::new();
    for (name, t) in frozen_dense(cfg, dense) {
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        tensors.push((name, TensorData::from_f32(&values, t.dims().to_vec())));
    }
    for (name, layer) in &q.layers {
        let LoraBase::Quantized(base) = layer.base() else {
            return Err(DemoError::Invalid(format!("{name}: the base is not 4-bit")));
        };
        tensors.extend(quantized_tensors(&format!("{name}.weight"), base.weight()));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_safetensors_atomic(&dir.join("model.safetensors"), tensors, Some(metadata))?;
    let mut cfg = cfg.clone();
    cfg.dtype = Some("float32".into());
    cfg.extra.insert(
        "quantization_config".into(),
        serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
        }),
    );
    cfg.to_file(dir.join("config.json"))?;
    Ok(())
}

/// Writes the merged model (`W = deq(NF4) + s·B·A` in f32 for each projection, the dense rest
/// unchanged) as a Hugging Face f32 model folder.
pub(crate) fn save_merged(
    dir: &Path,
    cfg: &LlamaConfig,
    dense: &HashMap<String, Tensor>,
    q: &QloraModel,
) -> Result<(), DemoError> {
    let mut tensors: HashMap<String, Tensor> = frozen_dense(cfg, dense).into_iter().collect();
    let options = MergeOptions {
        safe: false,
        output: MergeOutput::Dense(Dtype::F32),
    };
    for (name, layer) in &q.layers {
        let LoraBase::Dense(merged) = layer.merge(options)? else {
            return Err(DemoError::Invalid(format!(
                "{name}: the merge did not give a dense weight"
            )));
        };
        tensors.insert(format!("{name}.weight"), merged.weight().clone());
    }
    save_pretrained(dir, cfg, &tensors)?;
    Ok(())
}

/// Loads the saved 4-bit base (`base_dir`) with the saved PEFT adapter (`adapter_dir`): the
/// 4-bit weights as stored (nothing dequantized), the adapters under them.
pub(crate) fn load_4bit_with_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
) -> Result<QloraModel, DemoError> {
    let cfg = LlamaConfig::from_file(base_dir.join("config.json"))?;
    let path = base_dir.join("model.safetensors");
    let file = MappedFile::open(&path)?;
    let checkpoint = file.checkpoint()?;
    let adapter = PeftAdapter::load(adapter_dir)?;
    // The dense tensors come from the file; the projections' weights are built by the factory
    // from the 4-bit entries, so `from_tensors` only needs their shapes (zeros, never read).
    let mut tensors = HashMap::new();
    for (name, shape) in cfg.parameter_shapes() {
        let t = if is_target(&name) {
            Tensor::zeros(shape, DType::F32, &Device::Cpu)?
        } else {
            let values = checkpoint.dense_as::<f32>(&name)?;
            Tensor::from_vec(values, shape, &Device::Cpu)?
        };
        tensors.insert(name, t);
    }
    let mut factory = QloraFactory {
        source: Source::Saved {
            checkpoint: &checkpoint,
            adapter: &adapter,
        },
        layers: Vec::new(),
    };
    let model =
        LlamaForCausalLM::from_tensors(&cfg, tensors, DType::F32, &Device::Cpu, &mut factory)?;
    let layers = factory.layers;
    Ok(QloraModel { model, layers })
}
