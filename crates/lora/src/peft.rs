//! PEFT adapter folders: `adapter_config.json` and `adapter_model.safetensors`.
//!
//! Keys are PEFT's canonical ones: `base_model.model.<module>.lora_A.weight` `[r, in]`,
//! `.lora_B.weight` `[out, r]`, `.lora_magnitude_vector` `[out]` (DoRA), no adapter name.
//! Files are written with safetensors metadata `{"format": "pt"}`, tensors as F32 (PEFT's
//! default for adapters), and the config as JSON with sorted keys and 2-space indentation. Every
//! write goes to a temporary file in the same folder first and is renamed into place.

use crate::error::{Error, Result};
use crate::layer::{AdapterWeights, LoraParams};
use half::{bf16, f16};
use regex::Regex;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// `adapter_config.json` file name.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// `adapter_model.safetensors` file name.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// Prefix of every key PEFT writes.
pub const KEY_PREFIX: &str = "base_model.model.";

/// PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names: a module matches if its path equals one or ends with `"." + name`.
    List(Vec<String>),
    /// A regular expression the whole module path must match (`re.fullmatch`), or the special
    /// value `"all-linear"` (every linear layer but the output head).
    Pattern(String),
}

/// PEFT's `init_lora_weights`: `true`, `false`, or a method name (`"gaussian"`, `"pissa"`,
/// `"olora"`, `"loftq"`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` (Kaiming-uniform A, zero B) or `false`.
    Bool(bool),
    /// A named method.
    Method(String),
}

/// PEFT's `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// One layer index.
    One(usize),
    /// Several.
    Many(Vec<usize>),
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> Value {
    Value::from(8)
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}
fn default_peft_type() -> String {
    "LORA".into()
}

/// `adapter_config.json`. Fields PEFT defines that this crate does not use are kept verbatim in
/// [`extra`](Self::extra) and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// E.g. `"CAUSAL_LM"`, or null.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// `lora_alpha` (an int or a float in JSON; kept as written).
    #[serde(default = "default_alpha")]
    pub lora_alpha: Value,
    /// Dropout on the LoRA branch input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules carry adapters.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// `"none"`, `"all"` or `"lora_only"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// Initialization method.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Base weights stored `[in, out]` (HF Conv1D).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Per-module rank `{pattern: r}`.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha `{pattern: alpha}` (numbers kept as written: int or float).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, Value>,
    /// Whole modules trained and saved alongside.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Layer indices that carry adapters.
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// Name of the layer list (`"layers"`, `"h"`, …).
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    /// Every other field, kept as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl AdapterConfig {
    /// A LoRA config with PEFT's defaults for everything but the given fields.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        let alpha = if lora_alpha.fract() == 0.0 && lora_alpha.abs() < 1e15 {
            Value::from(lora_alpha as i64)
        } else {
            Value::from(lora_alpha)
        };
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: None,
            base_model_name_or_path: None,
            r,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules: Some(target_modules),
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: InitLoraWeights::Bool(true),
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            extra: Map::new(),
        }
    }

    /// Parse and validate JSON text (`path` only names the source in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let cfg: AdapterConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        cfg.validate().map_err(|e| match e {
            Error::InvalidOption { option, reason } => bad(format!("{option}: {reason}")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Check what this crate relies on: peft_type LORA, r ≥ 1, a numeric alpha, dropout in
    /// [0, 1), a known bias mode, no `lora_bias`, and valid target regexes.
    pub fn validate(&self) -> Result<()> {
        let opt = |option: &str, reason: String| {
            Err(Error::InvalidOption {
                option: option.into(),
                reason,
            })
        };
        if self.peft_type != "LORA" {
            return opt(
                "peft_type",
                format!("{:?} is not supported (expected \"LORA\")", self.peft_type),
            );
        }
        if self.r == 0 {
            return opt("r", "must be at least 1".into());
        }
        if self.lora_alpha.as_f64().is_none() {
            return opt(
                "lora_alpha",
                format!("must be a number, found {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return opt(
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.lora_dropout),
            );
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            return opt(
                "bias",
                format!("{:?} is not one of none, all, lora_only", self.bias),
            );
        }
        if self.extra.get("lora_bias").and_then(Value::as_bool) == Some(true) {
            return opt("lora_bias", "a bias on lora_B is not supported".into());
        }
        if let Some(TargetModules::Pattern(p)) = &self.target_modules {
            if p != "all-linear" {
                Regex::new(&format!("^(?:{p})$")).map_err(|e| Error::InvalidOption {
                    option: "target_modules".into(),
                    reason: e.to_string(),
                })?;
            }
        }
        for (k, v) in &self.alpha_pattern {
            if v.as_f64().is_none() {
                return opt(
                    "alpha_pattern",
                    format!("alpha for pattern {k:?} is not a number: {v}"),
                );
            }
        }
        for (k, v) in &self.rank_pattern {
            if *v == 0 {
                return opt("rank_pattern", format!("rank 0 for pattern {k:?}"));
            }
        }
        Ok(())
    }

    /// `lora_alpha` as f64.
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.as_f64().unwrap_or(8.0)
    }

    /// The first key of `patterns` that matches `module` as PEFT's `get_pattern_key` does
    /// (`re.match(r"(.*\.)?(KEY)$", module)`).
    fn pattern_key<'a, V>(patterns: &'a BTreeMap<String, V>, module: &str) -> Option<&'a V> {
        patterns.iter().find_map(|(k, v)| {
            Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                .ok()
                .filter(|re| re.is_match(module))
                .map(|_| v)
        })
    }

    /// The hyper-parameters of one module (`model.layers.0.self_attn.q_proj`), with
    /// `rank_pattern` / `alpha_pattern` applied.
    pub fn params_for(&self, module: &str) -> LoraParams {
        let r = Self::pattern_key(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r);
        let alpha = Self::pattern_key(&self.alpha_pattern, module)
            .and_then(Value::as_f64)
            .unwrap_or(self.alpha());
        LoraParams {
            r,
            alpha,
            use_rslora: self.use_rslora,
            dropout: self.lora_dropout as f32,
            use_dora: self.use_dora,
        }
    }

    /// Whether PEFT would put an adapter on `module` (a linear layer's path). `"all-linear"`
    /// matches every linear layer except `lm_head`.
    pub fn targets(&self, module: &str) -> bool {
        let hit = match &self.target_modules {
            None => false,
            Some(TargetModules::Pattern(p)) if p == "all-linear" => {
                !(module == "lm_head" || module.ends_with(".lm_head"))
            }
            Some(TargetModules::Pattern(p)) => Regex::new(&format!("^(?:{p})$"))
                .map(|re| re.is_match(module))
                .unwrap_or(false),
            Some(TargetModules::List(names)) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        };
        if !hit {
            return false;
        }
        match (&self.layers_to_transform, &self.target_modules) {
            (Some(layers), Some(TargetModules::List(_))) => {
                let wanted: Vec<usize> = match layers {
                    LayersToTransform::One(i) => vec![*i],
                    LayersToTransform::Many(v) => v.clone(),
                };
                let pats: Vec<String> = match &self.layers_pattern {
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                    _ => vec![String::new()],
                };
                pats.iter().any(|p| {
                    let re = if p.is_empty() {
                        Regex::new(r".*\.[^.]*\.(\d+)\.")
                    } else {
                        Regex::new(&format!(r".*\.{}\.(\d+)\.", regex::escape(p)))
                    };
                    re.ok()
                        .and_then(|re| re.captures(module).and_then(|c| c[1].parse::<usize>().ok()))
                        .is_some_and(|i| wanted.contains(&i))
                })
            }
            _ => true,
        }
    }

    /// JSON as PEFT writes it: sorted keys, 2-space indent, `inference_mode: true`.
    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Config {
            path: PathBuf::from(CONFIG_NAME),
            message: e.to_string(),
        })?;
        if let Value::Object(m) = &mut v {
            m.insert("inference_mode".into(), Value::Bool(true));
        }
        Ok(serde_json::to_string_pretty(&sorted(v)).unwrap_or_default())
    }
}

fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let b: BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(b.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// An adapter read from (or to be written to) a PEFT folder.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    /// The config.
    pub config: AdapterConfig,
    /// Per module path (e.g. `model.layers.0.self_attn.q_proj`): its tensors, as f32.
    pub modules: BTreeMap<String, AdapterWeights>,
    /// Tensors that are not LoRA factors (modules_to_save, trainable biases), by full key, as
    /// `(shape, f32 values)`.
    pub other_tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn st_err(path: &Path, message: String) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message,
    }
}

fn read_f32(view: &TensorView<'_>, key: &str, path: &Path) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(st_err(
                path,
                format!("tensor {key}: dtype {other:?} is not F32, BF16 or F16"),
            ))
        }
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder
/// (`qlora_atomic_write::write_atomically`: `.NAME.tmp-PID`, removed on error, on a signal once
/// the program installed the clean-up, and by a later run if this one is killed), synced, then
/// renamed. An existing `path` is untouched when it fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    qlora_atomic_write::write_atomically(path, bytes).map_err(|e| Error::Io {
        path: e.path,
        source: e.source,
    })
}

impl PeftAdapter {
    /// Read `adapter_config.json` and `adapter_model.safetensors` from a folder, checking that
    /// each module has both factors with shapes that fit the config's rank for that module (and a
    /// magnitude vector when `use_dora`).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_NAME);
        let text = String::from_utf8(read_file(&cfg_path)?).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
        let config = AdapterConfig::from_json(&text, &cfg_path)?;
        let st_path = dir.join(WEIGHTS_NAME);
        let bytes = read_file(&st_path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| st_err(&st_path, e.to_string()))?;
        #[derive(Default)]
        struct Parts {
            a: Option<(Vec<usize>, Vec<f32>)>,
            b: Option<(Vec<usize>, Vec<f32>)>,
            m: Option<(Vec<usize>, Vec<f32>)>,
        }
        let mut parts: HashMap<String, Parts> = HashMap::new();
        let mut other_tensors = BTreeMap::new();
        for (key, view) in st.tensors() {
            let data = read_f32(&view, &key, &st_path)?;
            let shape = view.shape().to_vec();
            let stripped = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
            let (module, which) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = stripped.strip_suffix(".lora_magnitude_vector") {
                (m, 2)
            } else if stripped.ends_with(".lora_B.bias") {
                return Err(st_err(
                    &st_path,
                    format!("tensor {key}: lora_B bias (lora_bias=true) is not supported"),
                ));
            } else if stripped.contains(".lora_embedding_") {
                return Err(st_err(
                    &st_path,
                    format!("tensor {key}: embedding adapters are not supported"),
                ));
            } else {
                other_tensors.insert(key.clone(), (shape, data));
                continue;
            };
            let p = parts.entry(module.to_string()).or_default();
            let slot = match which {
                0 => &mut p.a,
                1 => &mut p.b,
                _ => &mut p.m,
            };
            *slot = Some((shape, data));
        }
        let mut modules = BTreeMap::new();
        for (module, p) in parts {
            let merr = |reason: String| Error::Module {
                module: module.clone(),
                reason,
            };
            let (ash, a) =
                p.a.ok_or_else(|| merr("lora_B.weight without lora_A.weight".into()))?;
            let (bsh, b) =
                p.b.ok_or_else(|| merr("lora_A.weight without lora_B.weight".into()))?;
            let r = config.params_for(&module).r;
            if ash.len() != 2 || ash[0] != r {
                return Err(merr(format!(
                    "lora_A.weight has shape {ash:?}, expected [{r}, in_features]"
                )));
            }
            if bsh.len() != 2 || bsh[1] != r {
                return Err(merr(format!(
                    "lora_B.weight has shape {bsh:?}, expected [out_features, {r}]"
                )));
            }
            let magnitude = match (p.m, config.use_dora) {
                (Some((msh, m)), true) => {
                    if msh != [bsh[0]] {
                        return Err(merr(format!(
                            "lora_magnitude_vector has shape {msh:?}, expected [{}]",
                            bsh[0]
                        )));
                    }
                    Some(m)
                }
                (None, true) => {
                    return Err(merr(
                        "use_dora is set but lora_magnitude_vector is missing".into(),
                    ))
                }
                (Some(_), false) => {
                    return Err(merr(
                        "lora_magnitude_vector present but use_dora is false".into(),
                    ))
                }
                (None, false) => None,
            };
            modules.insert(module, AdapterWeights { a, b, magnitude });
        }
        Ok(PeftAdapter {
            config,
            modules,
            other_tensors,
        })
    }

    /// The safetensors bytes PEFT would write for these tensors (F32, metadata `{"format":"pt"}`).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut push = |key: String, shape: Vec<usize>, v: &[f32]| {
            entries.push((key, shape, bytemuck::cast_slice::<f32, u8>(v).to_vec()));
        };
        for (module, w) in &self.modules {
            let r = self.config.params_for(module).r;
            if r == 0 || w.a.len() % r != 0 || w.b.len() % r != 0 {
                return Err(Error::Module {
                    module: module.clone(),
                    reason: format!(
                        "lora_A ({} values) and lora_B ({} values) do not fit rank {r}",
                        w.a.len(),
                        w.b.len()
                    ),
                });
            }
            let in_f = w.a.len() / r;
            let out_f = w.b.len() / r;
            push(
                format!("{KEY_PREFIX}{module}.lora_A.weight"),
                vec![r, in_f],
                &w.a,
            );
            push(
                format!("{KEY_PREFIX}{module}.lora_B.weight"),
                vec![out_f, r],
                &w.b,
            );
            if let Some(m) = &w.magnitude {
                push(
                    format!("{KEY_PREFIX}{module}.lora_magnitude_vector"),
                    vec![m.len()],
                    m,
                );
            }
        }
        for (key, (shape, v)) in &self.other_tensors {
            push(key.clone(), shape.clone(), v);
        }
        let views: Vec<(String, TensorView<'_>)> = entries
            .iter()
            .map(|(k, s, b)| {
                TensorView::new(StDtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| st_err(Path::new(WEIGHTS_NAME), format!("tensor {k}: {e}")))
            })
            .collect::<Result<_>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| st_err(Path::new(WEIGHTS_NAME), e.to_string()))
    }

    /// Write the folder (created if missing): `adapter_config.json` and
    /// `adapter_model.safetensors`, each atomically. To make the folder itself appear only when
    /// complete (a training checkpoint), save into a `qlora_atomic_write::TempOutput::folder`'s
    /// path and commit it.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.config.validate()?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join(WEIGHTS_NAME), &self.to_safetensors()?)?;
        write_atomic(&dir.join(CONFIG_NAME), self.config.to_json()?.as_bytes())
    }
}
