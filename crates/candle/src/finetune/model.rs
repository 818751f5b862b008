//! [`QLoraModel`]: a Llama-family model with frozen 4-bit linear layers and LoRA adapters, from
//! and to Hugging Face folders.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use qlora_atomic_write::TempOutput;
use qlora_checkpoint::{Entry, ModelFolder, TensorData};
use qlora_codec::{Dtype, QuantizeOptions, QuantizedTensor};
use qlora_lora::peft::{AdapterConfig, PeftAdapter, TargetModules};
use qlora_lora::{LoraParams, MergeOptions, MergeOutput};

use super::{io_err, FinetuneError, Result};
use crate::linear4bit::Linear4bit;
use crate::llama::{
    causal_lm_loss, save_pretrained, LinearFactory, LlamaConfig, LlamaForCausalLM, CONFIG_FILE,
};
use crate::lora::{save_peft_adapter, LoraBase, LoraInit, LoraLinear};

/// Files copied from the source folder next to the written models (the tokenizer and generation
/// settings), when present.
pub(crate) const AUX_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// How the base is quantized and which adapters are added (PEFT's `LoraConfig` and
/// transformers' `BitsAndBytesConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct QLoraConfig {
    /// 4-bit codec of the base: quant type (NF4/FP4), block size (64), double quant. Ignored for
    /// a folder that is already 4-bit (its codes are used as they are).
    pub quant: QuantizeOptions,
    /// LoRA rank r.
    pub rank: usize,
    /// `lora_alpha` (scaling `alpha/r`, or `alpha/√r` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter input, in `[0, 1)`.
    pub dropout: f32,
    /// PEFT's `target_modules`: names (`["q_proj", "v_proj"]`) or `"all-linear"`.
    pub target_modules: TargetModules,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// DoRA (magnitude vector).
    pub use_dora: bool,
    /// Seed of PEFT's default init (Kaiming-uniform A, zero B); module `i` (in model order)
    /// uses `init_seed + i`.
    pub init_seed: u64,
}

impl Default for QLoraConfig {
    /// QLoRA's recipe: NF4, block 64, double quant; r 8, alpha 16, no dropout, all linear layers.
    fn default() -> Self {
        QLoraConfig {
            quant: QuantizeOptions::qlora(),
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::Pattern("all-linear".into()),
            use_rslora: false,
            use_dora: false,
            init_seed: 0,
        }
    }
}

impl QLoraConfig {
    /// The PEFT `adapter_config.json` of these settings.
    pub fn adapter_config(&self) -> AdapterConfig {
        let mut c = AdapterConfig::new(self.rank, self.alpha, self.target_modules.clone());
        // The shortest decimal that round-trips the f32, as PEFT's JSON has it (0.05, not
        // 0.05000000074505806).
        c.lora_dropout = self
            .dropout
            .to_string()
            .parse()
            .unwrap_or(f64::from(self.dropout));
        c.use_rslora = self.use_rslora;
        c.use_dora = self.use_dora;
        c.task_type = Some("CAUSAL_LM".into());
        c
    }

    /// The settings of a PEFT adapter config (rank, alpha, dropout, targets, rsLoRA, DoRA); the
    /// codec stays `quant`.
    pub fn from_adapter_config(c: &AdapterConfig, quant: QuantizeOptions) -> Result<Self> {
        c.validate()?;
        if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
            return Err(FinetuneError::Invalid(
                "adapters with rank_pattern/alpha_pattern are not supported for training".into(),
            ));
        }
        Ok(QLoraConfig {
            quant,
            rank: c.r,
            alpha: c.alpha(),
            dropout: c.lora_dropout as f32,
            target_modules: c
                .target_modules
                .clone()
                .ok_or_else(|| FinetuneError::Invalid("adapter has no target_modules".into()))?,
            use_rslora: c.use_rslora,
            use_dora: c.use_dora,
            init_seed: 0,
        })
    }

    fn validate(&self) -> Result<()> {
        LoraParams {
            r: self.rank,
            alpha: self.alpha,
            use_rslora: self.use_rslora,
            dropout: self.dropout,
            use_dora: self.use_dora,
        }
        .validate()?;
        qlora_codec::check_blocksize(self.quant.blocksize)
            .map_err(|e| FinetuneError::Invalid(e.to_string()))?;
        if let TargetModules::List(v) = &self.target_modules {
            if v.is_empty() {
                return Err(FinetuneError::Invalid("target_modules is empty".into()));
            }
        }
        Ok(())
    }
}

/// One linear layer of the decoder blocks.
#[derive(Debug, Clone)]
enum Layer {
    Frozen(Linear4bit),
    Lora(Arc<LoraLinear>),
}

/// A [`LoraLinear`] shared between the model (which runs it) and [`QLoraModel`] (which trains
/// and saves it), so that `set_training` reaches the running layer.
struct SharedLora(Arc<LoraLinear>);

impl Module for SharedLora {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(xs)
    }
}

struct Factory<'a> {
    device: Device,
    quantized: HashMap<String, QuantizedTensor>,
    qcfg: &'a QLoraConfig,
    adapter: AdapterConfig,
    layers: Vec<(String, Layer)>,
}

impl LinearFactory for Factory<'_> {
    fn linear(
        &mut self,
        name: &str,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Box<dyn Module>> {
        if !name.starts_with("model.layers.") {
            // lm_head (transformers keeps it dense under load_in_4bit), frozen.
            return Ok(Box::new(crate::frozen::FrozenLinear::new(weight, bias)));
        }
        // Quantized on the host, then uploaded once (a no-op on the CPU).
        let cpu = Device::Cpu;
        let bias = bias.map(|b| b.to_device(&cpu)).transpose()?;
        let base = match self.quantized.remove(name) {
            Some(q) => Linear4bit::new(q, bias)?,
            None => Linear4bit::from_tensor(&weight.to_device(&cpu)?, bias, self.qcfg.quant)?,
        };
        let base = base.to_device(&self.device)?;
        if self.adapter.targets(name) {
            let params = self.adapter.params_for(name);
            let seed = self.qcfg.init_seed.wrapping_add(self.layers.len() as u64);
            let lora = Arc::new(LoraLinear::new(base, params, LoraInit::Default { seed })?);
            self.layers
                .push((name.to_string(), Layer::Lora(lora.clone())));
            Ok(Box::new(SharedLora(lora)))
        } else {
            self.layers
                .push((name.to_string(), Layer::Frozen(base.clone())));
            Ok(Box::new(base))
        }
    }
}

/// Bytes of the model's parts, for memory tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// Parameters of the full model (as the config counts them).
    pub parameters: usize,
    /// Bytes of the 4-bit linear layers (codes, absmax and double-quant constants).
    pub base_4bit_bytes: usize,
    /// Elements of the 4-bit linear layers.
    pub base_4bit_parameters: usize,
    /// Bytes of the dense frozen tensors (embeddings, norms, `lm_head`, biases).
    pub dense_bytes: usize,
    /// Trainable adapter parameters.
    pub trainable_parameters: usize,
    /// Bytes of the trainable parameters (f32).
    pub trainable_bytes: usize,
}

impl MemoryReport {
    /// All weight bytes (4-bit base, dense frozen tensors, adapters).
    pub fn weight_bytes(&self) -> usize {
        self.base_4bit_bytes + self.dense_bytes + self.trainable_bytes
    }
}

/// The process's peak resident set size (`VmHWM` of `/proc/self/status`), or `None` where that
/// is not available.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// The process's current resident set size (`VmRSS` of `/proc/self/status`), or `None` where
/// that is not available.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A Llama-family causal LM for QLoRA: frozen 4-bit linear layers in the decoder blocks, LoRA
/// adapters on the targeted ones, dense frozen embeddings, norms and `lm_head`. See the
/// [module docs](super) for an example.
pub struct QLoraModel {
    model: LlamaForCausalLM,
    cfg: LlamaConfig,
    qcfg: QLoraConfig,
    layers: Vec<(String, Layer)>,
    dense: HashMap<String, Tensor>,
    source: PathBuf,
    source_was_4bit: bool,
    device: Device,
}

impl std::fmt::Debug for QLoraModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QLoraModel")
            .field("model", &self.model)
            .field("lora_modules", &self.lora_modules().len())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl QLoraModel {
    /// Loads `dir` (config.json + dense safetensors, single or sharded, or a transformers
    /// bitsandbytes-4bit folder) on `device` with computation in f32, quantizes every decoder
    /// linear layer with `qcfg.quant` (a 4-bit folder keeps its own codes) and adds fresh
    /// adapters (PEFT's default init) to the targeted ones. An error when no module is targeted.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        qcfg: &QLoraConfig,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        qcfg.validate()?;
        if !dir.is_dir() {
            return Err(FinetuneError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder"),
            });
        }
        let cfg = LlamaConfig::from_file(dir.join(CONFIG_FILE))?;
        let is_4bit = cfg.extra.contains_key("quantization_config");
        let mut quantized = HashMap::new();
        let tensors = if is_4bit {
            let folder = ModelFolder::open(dir)?;
            let mut tensors = HashMap::new();
            for entry in folder.entries() {
                match entry {
                    Entry::Dense { name, shape, .. } => {
                        let v: Vec<f32> = folder.dense_as(name)?;
                        tensors.insert(name.clone(), Tensor::from_vec(v, shape.clone(), device)?);
                    }
                    Entry::Quantized { name, .. } => {
                        let q = folder.quantized(name)?;
                        // A zero-strided stand-in of the right shape (no allocation): the factory
                        // takes the 4-bit weight itself.
                        let stand_in =
                            Tensor::zeros((), DType::F32, device)?.broadcast_as(q.shape())?;
                        tensors.insert(name.clone(), stand_in);
                        let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
                        quantized.insert(module, q);
                    }
                }
            }
            tensors
        } else {
            crate::llama::load_safetensors(dir, device)?
        };
        Self::build(cfg, tensors, quantized, qcfg, dir, is_4bit, device)
    }

    fn build(
        cfg: LlamaConfig,
        tensors: HashMap<String, Tensor>,
        quantized: HashMap<String, QuantizedTensor>,
        qcfg: &QLoraConfig,
        dir: &Path,
        is_4bit: bool,
        device: &Device,
    ) -> Result<Self> {
        let mut dense = HashMap::new();
        for (name, shape) in cfg.parameter_shapes() {
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            let is_layer_linear = name.starts_with("model.layers.")
                && (name.contains("_proj.weight") || name.contains("_proj.bias"));
            if is_layer_linear || quantized.contains_key(module) {
                continue;
            }
            if let Some(t) = tensors.get(&name) {
                if t.dims() == shape.as_slice() {
                    dense.insert(name, t.to_dtype(DType::F32)?);
                }
            }
        }
        let mut factory = Factory {
            device: device.clone(),
            quantized,
            qcfg,
            adapter: qcfg.adapter_config(),
            layers: Vec::new(),
        };
        let model =
            LlamaForCausalLM::from_tensors(&cfg, tensors, DType::F32, device, &mut factory)?;
        if !factory
            .layers
            .iter()
            .any(|(_, l)| matches!(l, Layer::Lora(_)))
        {
            return Err(FinetuneError::Invalid(format!(
                "target_modules {:?} match no linear layer of the model",
                qcfg.target_modules
            )));
        }
        Ok(QLoraModel {
            model,
            cfg,
            qcfg: qcfg.clone(),
            layers: factory.layers,
            dense,
            source: dir.to_path_buf(),
            source_was_4bit: is_4bit,
            device: device.clone(),
        })
    }

    /// The model config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The QLoRA settings.
    pub fn qlora_config(&self) -> &QLoraConfig {
        &self.qcfg
    }

    /// The folder the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether the source folder was already 4-bit.
    pub fn source_was_4bit(&self) -> bool {
        self.source_was_4bit
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The running model.
    pub fn model(&self) -> &LlamaForCausalLM {
        &self.model
    }

    /// The adapted layers (module path, layer), in model order.
    pub fn lora_modules(&self) -> Vec<(&str, &LoraLinear)> {
        self.layers
            .iter()
            .filter_map(|(n, l)| match l {
                Layer::Lora(l) => Some((n.as_str(), l.as_ref())),
                Layer::Frozen(_) => None,
            })
            .collect()
    }

    /// The trainable variables: A, B (and DoRA's magnitude) of every adapter, in model order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora_modules()
            .into_iter()
            .flat_map(|(_, l)| l.vars())
            .collect()
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.trainable_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Turns adapter dropout on (`true`, training) or off.
    pub fn set_training(&self, training: bool) {
        for (_, l) in self.lora_modules() {
            l.set_training(training);
        }
    }

    /// Sets the dropout seeds of the next forward: layer `i` draws `seed · 2³² + i` (so a
    /// step's masks depend only on the seed, never on earlier steps).
    pub fn set_dropout_seed(&self, seed: u64) {
        for (i, (_, l)) in self.lora_modules().into_iter().enumerate() {
            l.set_seed(seed.wrapping_shl(32).wrapping_add(i as u64));
        }
    }

    /// Logits `[batch, seq, vocab]` (f32) of `input_ids` (`[batch, seq]`, u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.model.forward(input_ids)?)
    }

    /// transformers' causal-LM loss (labels shifted, -100 ignored, mean over scored positions).
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let logits = self.model.forward(input_ids)?;
        Ok(causal_lm_loss(&logits, labels)?)
    }

    /// Replaces the adapter weights by those of a PEFT adapter folder, which must target the
    /// same modules with the same rank, alpha and options (each mismatch named).
    pub fn load_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let adapter = PeftAdapter::load(dir)?;
        let ours = self.lora_modules();
        for (name, layer) in &ours {
            let w = adapter.modules.get(*name).ok_or_else(|| {
                FinetuneError::Invalid(format!(
                    "adapter {} has no weights for module {name}",
                    dir.display()
                ))
            })?;
            let params = adapter.config.params_for(name);
            if params != *layer.params() {
                return Err(FinetuneError::Invalid(format!(
                    "adapter {}: module {name} has {params:?}, the model {:?}",
                    dir.display(),
                    layer.params()
                )));
            }
            let set = |var: &Var, v: &[f32], what: &str| -> Result<()> {
                if v.len() != var.elem_count() {
                    return Err(FinetuneError::Invalid(format!(
                        "adapter {}: {name}.{what} has {} values, the model needs {:?}",
                        dir.display(),
                        v.len(),
                        var.dims()
                    )));
                }
                var.set(&Tensor::from_slice(v, var.dims(), var.device())?)?;
                Ok(())
            };
            set(layer.a(), &w.a, "lora_A")?;
            set(layer.b(), &w.b, "lora_B")?;
            match (layer.magnitude(), &w.magnitude) {
                (Some(m), Some(v)) => set(m, v, "lora_magnitude_vector")?,
                (None, None) => {}
                _ => {
                    return Err(FinetuneError::Invalid(format!(
                        "adapter {}: module {name}: DoRA magnitude present in one of adapter \
                         and model only",
                        dir.display()
                    )))
                }
            }
        }
        if adapter.modules.len() != ours.len() {
            return Err(FinetuneError::Invalid(format!(
                "adapter {} has {} modules, the model adapts {}",
                dir.display(),
                adapter.modules.len(),
                ours.len()
            )));
        }
        Ok(())
    }

    /// The PEFT config written with the adapter.
    /// As PEFT saves it, `"all-linear"` is written expanded to the module names it matched
    /// (sorted: PEFT writes a set).
    pub fn adapter_config(&self) -> AdapterConfig {
        let mut c = self.qcfg.adapter_config();
        c.base_model_name_or_path = Some(self.source.display().to_string());
        if matches!(&c.target_modules, Some(TargetModules::Pattern(p)) if p == "all-linear") {
            let mut names: Vec<String> = self
                .lora_modules()
                .iter()
                .map(|(path, _)| path.rsplit('.').next().unwrap_or(path).to_string())
                .collect();
            names.sort();
            names.dedup();
            c.target_modules = Some(TargetModules::List(names));
        }
        c
    }

    /// Writes the PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`)
    /// atomically: `dir` appears complete or not at all (an existing one is replaced).
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let tmp = TempOutput::folder(dir)?;
        self.write_adapter(tmp.path())?;
        tmp.commit()?;
        Ok(())
    }

    /// Writes the adapter into an existing folder `dir` (no atomicity of its own).
    pub(crate) fn write_adapter(&self, dir: &Path) -> Result<()> {
        save_peft_adapter(dir, self.adapter_config(), self.lora_modules())?;
        Ok(())
    }

    /// The transformers `config.json` of the 4-bit base (`quantization_config` as
    /// `BitsAndBytesConfig(load_in_4bit=True, …)` writes it).
    fn quantized_config(&self) -> LlamaConfig {
        let mut cfg = self.cfg.clone();
        let first = self.layers.first().map(|(_, l)| match l {
            Layer::Frozen(b) => b.weight().clone(),
            Layer::Lora(l) => match l.base() {
                LoraBase::Quantized(q) => q.weight().clone(),
                LoraBase::Dense(_) => unreachable!("QLoraModel bases are 4-bit"),
            },
        });
        let opts = first.as_ref().map_or(self.qcfg.quant, same_options);
        cfg.extra.insert(
            "quantization_config".into(),
            qlora_checkpoint::bnb_quantization_config(&opts, Dtype::F32, None),
        );
        cfg.dtype = Some("float32".into());
        cfg
    }

    /// Writes the frozen 4-bit base as a transformers/bitsandbytes folder (`config.json` with
    /// `quantization_config`, `model.safetensors` with bitsandbytes' key layout: what
    /// `AutoModelForCausalLM.from_pretrained` of a `load_in_4bit` model saves), plus the
    /// tokenizer files of the source folder; atomically.
    pub fn save_base_4bit(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let tmp = TempOutput::folder(dir)?;
        let mut out: Vec<(String, TensorData<'static>)> = Vec::new();
        let mut names: Vec<&String> = self.dense.keys().collect();
        names.sort();
        for name in names {
            let t = &self.dense[name];
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            out.push((name.clone(), TensorData::from_f32(&v, t.dims().to_vec())));
        }
        for (name, layer) in &self.layers {
            let base = match layer {
                Layer::Frozen(b) => b,
                Layer::Lora(l) => match l.base() {
                    LoraBase::Quantized(q) => q,
                    LoraBase::Dense(_) => unreachable!("QLoraModel bases are 4-bit"),
                },
            };
            out.extend(qlora_checkpoint::quantized_tensors(
                &format!("{name}.weight"),
                base.weight(),
            ));
            if let Some(b) = base.bias() {
                let v: Vec<f32> = b.to_dtype(DType::F32)?.to_vec1()?;
                let n = v.len();
                out.push((format!("{name}.bias"), TensorData::from_f32(&v, vec![n])));
            }
        }
        let bytes = qlora_checkpoint::write_safetensors(out)?;
        let st = tmp.path().join(crate::llama::SAFETENSORS_FILE);
        std::fs::write(&st, bytes).map_err(io_err(&st))?;
        self.quantized_config()
            .to_file(tmp.path().join(CONFIG_FILE))?;
        self.copy_aux(tmp.path())?;
        tmp.commit()?;
        Ok(())
    }

    /// The merged dense weights (`W + s·B·A`, DoRA's rescaling included; frozen layers
    /// dequantized) with every other tensor, in `dtype`.
    pub fn merged_tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, t) in &self.dense {
            out.insert(name.clone(), t.to_dtype(dtype)?);
        }
        let opts = MergeOptions {
            safe: false,
            output: MergeOutput::Dense(Dtype::F32),
        };
        for (name, layer) in &self.layers {
            let merged = match layer {
                Layer::Frozen(b) => (b.dequantize()?.to_device(&self.device)?, b.bias().cloned()),
                Layer::Lora(l) => match l.merge(opts)? {
                    LoraBase::Dense(lin) => (lin.weight().clone(), lin.bias().cloned()),
                    LoraBase::Quantized(_) => {
                        return Err(FinetuneError::Invalid(
                            "merge returned a 4-bit weight for a dense request".into(),
                        ))
                    }
                },
            };
            out.insert(format!("{name}.weight"), merged.0.to_dtype(dtype)?);
            if let Some(b) = merged.1 {
                out.insert(format!("{name}.bias"), b.to_dtype(dtype)?);
            }
        }
        Ok(out)
    }

    /// Writes the merged dense model (PEFT's `merge_and_unload()` then `save_pretrained`):
    /// `config.json` (`dtype` set, no `quantization_config`) and `model.safetensors` in `dtype`
    /// (f32, bf16 or f16), plus the tokenizer files of the source folder; atomically.
    pub fn save_merged(&self, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(FinetuneError::Invalid(format!(
                "merged dtype must be f32, bf16 or f16, not {dtype:?}"
            )));
        }
        let dir = dir.as_ref();
        let tensors = self.merged_tensors(dtype)?;
        let mut cfg = self.cfg.clone();
        cfg.extra.remove("quantization_config");
        let tmp = TempOutput::folder(dir)?;
        save_pretrained(tmp.path(), &cfg, &tensors)?;
        self.copy_aux(tmp.path())?;
        tmp.commit()?;
        Ok(())
    }

    fn copy_aux(&self, dir: &Path) -> Result<()> {
        for f in AUX_FILES {
            let src = self.source.join(f);
            if src.is_file() {
                let dst = dir.join(f);
                std::fs::copy(&src, &dst).map_err(io_err(&src))?;
            }
        }
        Ok(())
    }

    /// Sizes of the model's parts.
    pub fn memory(&self) -> MemoryReport {
        let mut r = MemoryReport {
            parameters: self.cfg.num_parameters(),
            ..MemoryReport::default()
        };
        for t in self.dense.values() {
            r.dense_bytes += t.elem_count() * t.dtype().size_in_bytes();
        }
        for (_, layer) in &self.layers {
            let base = match layer {
                Layer::Frozen(b) => b,
                Layer::Lora(l) => match l.base() {
                    LoraBase::Quantized(q) => q,
                    LoraBase::Dense(_) => continue,
                },
            };
            let q = base.weight();
            r.base_4bit_parameters += q.numel();
            r.base_4bit_bytes += q.nbytes();
            if let Some(b) = base.bias() {
                r.dense_bytes += b.elem_count() * b.dtype().size_in_bytes();
            }
        }
        r.trainable_parameters = self.trainable_parameters();
        r.trainable_bytes = 4 * r.trainable_parameters;
        r
    }
}

/// The 4-bit options a weight was quantized with.
fn same_options(q: &QuantizedTensor) -> QuantizeOptions {
    QuantizeOptions {
        quant_type: q.quant_type(),
        blocksize: q.blocksize(),
        double_quant: matches!(q.absmax(), qlora_codec::Absmax::Double(_)),
    }
}
