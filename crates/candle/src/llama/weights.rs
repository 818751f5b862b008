//! Hugging Face model folders: weights from `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, and writing a folder transformers loads.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{LlamaConfig, LlamaError};

/// File name of a single-file checkpoint.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the model config.
pub const CONFIG_FILE: &str = "config.json";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LlamaError + '_ {
    move |source| LlamaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, LlamaError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|source| {
        LlamaError::Safetensors {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Reads every tensor of a model folder: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json` (each tensor taken from the shard the index names). Tensors
/// keep their stored dtype.
pub fn load_safetensors(
    dir: impl AsRef<Path>,
    device: &Device,
) -> Result<HashMap<String, Tensor>, LlamaError> {
    let dir = dir.as_ref();
    let index = dir.join(SAFETENSORS_INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let parsed: ShardIndex =
            serde_json::from_str(&text).map_err(|source| LlamaError::ConfigJson {
                path: index.clone(),
                source,
            })?;
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, file) in &parsed.weight_map {
            by_file.entry(file).or_default().push(tensor);
        }
        let mut out = HashMap::new();
        for (file, names) in by_file {
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(LlamaError::InvalidIndex {
                    path: index.clone(),
                    msg: format!("shard name {file:?} is not a plain file name"),
                });
            }
            let mut shard = load_file(&dir.join(file), device)?;
            for name in names {
                let t = shard.remove(name).ok_or_else(|| LlamaError::InvalidIndex {
                    path: index.clone(),
                    msg: format!("tensor {name:?} is not in shard {file:?}"),
                })?;
                out.insert(name.to_string(), t);
            }
        }
        return Ok(out);
    }
    let single = dir.join(SAFETENSORS_FILE);
    if single.is_file() {
        return load_file(&single, device);
    }
    Err(LlamaError::NoWeights(dir.to_path_buf()))
}

/// Checks `tensors` against the parameters `cfg` needs: every one present with its shape
/// (names and shapes in the error). Extra tensors are allowed (transformers ignores them too).
pub fn check_tensors(
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), LlamaError> {
    for (name, shape) in cfg.parameter_shapes() {
        match tensors.get(&name) {
            None => return Err(LlamaError::MissingTensor(name)),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(LlamaError::ShapeMismatch {
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The transformers name of a dtype (`"float32"`, `"bfloat16"`, ...).
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Writes a Hugging Face model folder that `AutoModelForCausalLM.from_pretrained` loads:
/// `config.json` (with `dtype` set to the tensors' dtype) and `model.safetensors` (metadata
/// `format: pt`). `tensors` must hold every parameter `cfg` needs with its shape (checked first,
/// so nothing is written on error); other tensors are not written. The folder is created if
/// needed; a `model.safetensors.index.json` already there is removed.
pub fn save_pretrained(
    dir: impl AsRef<Path>,
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), LlamaError> {
    let dir = dir.as_ref();
    cfg.validate()?;
    check_tensors(cfg, tensors)?;
    let names: Vec<String> = cfg.parameter_shapes().into_iter().map(|(n, _)| n).collect();
    let dtype = tensors[&names[0]].dtype();
    let mut owned = Vec::with_capacity(names.len());
    for name in names {
        // One dtype for the whole file; contiguous CPU copies for serialisation.
        let t = tensors[&name]
            .to_dtype(dtype)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        owned.push((name, t));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    // A stale shard index would make loaders look for shards instead of this file.
    let stale = dir.join(SAFETENSORS_INDEX_FILE);
    if stale.is_file() {
        std::fs::remove_file(&stale).map_err(io_err(&stale))?;
    }
    let mut cfg = cfg.clone();
    cfg.dtype = Some(torch_dtype_name(dtype).to_string());
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let path: PathBuf = dir.join(SAFETENSORS_FILE);
    safetensors::serialize_to_file(
        owned.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &path,
    )
    .map_err(|e| LlamaError::Candle(candle_core::Error::wrap(e)))?;
    cfg.to_file(dir.join(CONFIG_FILE))
}
