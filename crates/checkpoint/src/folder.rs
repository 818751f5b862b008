//! Model folders as transformers writes them (`config.json`, `model.safetensors` or shards plus
//! `model.safetensors.index.json`), read lazily: opening reads and validates only the headers and
//! the JSON files; tensor bytes are read on demand, each through its own memory map that is
//! released when dropped, so memory use follows the tensors in hand, not the model.

use crate::io::{build_quantized, classify, convert, map_range, RawSource, MAX_STATE_BLOB};
use crate::json::{parse_strict, MAX_JSON_BYTES};
use crate::{Entry, Error, QuantState, Result};
use qlora_codec::{Element, QuantizedTensor};
use safetensors::tensor::Metadata;
use safetensors::Dtype as StDtype;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name of a single-file model.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// File name of the shard index.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
/// File name of the model config.
pub const CONFIG_FILE_NAME: &str = "config.json";

/// Largest safetensors header accepted (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// How the weights of a [`ModelFolder`] are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A bare `.safetensors` file was opened (no folder, no config).
    File,
    /// A folder with one `model.safetensors`.
    SingleFile,
    /// A folder with shards listed by `model.safetensors.index.json`.
    Sharded,
}

/// Where one raw tensor lives.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its dtype.
    pub dtype: StDtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Index of its shard in [`ModelFolder::shards`].
    pub shard: usize,
    /// Absolute byte offset of its data in the shard file.
    pub offset: u64,
    /// Byte length of its data.
    pub len: usize,
}

/// One safetensors file of a model.
#[derive(Debug)]
pub struct Shard {
    file_name: String,
    path: PathBuf,
    file: File,
    metadata: Option<HashMap<String, String>>,
    bytes: u64,
}

impl Shard {
    /// The file name (relative to the folder).
    pub fn file_name(&self) -> &str {
        &self.file_name
    }
    /// The full path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The header's `__metadata__`.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }
    /// File size in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.bytes
    }
}

/// Tensor bytes read from a shard: a memory map of exactly the tensor's range.
#[derive(Debug)]
pub struct TensorBytes(memmap2::Mmap);

impl std::ops::Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A model folder (or a single safetensors file) opened lazily. See the module docs.
///
/// Like every memory-mapped reader, it assumes no other process truncates or rewrites the files
/// while they are open.
///
/// ```
/// use qlora_checkpoint::{Entry, ModelFolder};
/// # let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/checkpoints");
/// let model = ModelFolder::open(dir.join("tiny-llama-nf4-dq"))?;
/// let mut n = 0;
/// for entry in model.entries() {
///     if let Entry::Quantized { name, .. } = entry {
///         let q = model.quantized(name)?; // a typed QuantizedTensor, read on demand
///         let w: Vec<half::bf16> = q.dequantize()?;
///         assert_eq!(w.len(), q.numel());
///         n += 1;
///     }
/// }
/// assert_eq!(n, 14);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ModelFolder {
    root: PathBuf,
    layout: Layout,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    order: Vec<String>,
    entries: Vec<Entry>,
    config: Option<Map<String, Value>>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn json_err(file: &Path, key: &str, reason: impl Into<String>) -> Error {
    Error::Json {
        file: file.display().to_string(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Read a small JSON file strictly (size-limited, duplicate keys rejected); must be an object.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > MAX_JSON_BYTES {
        return Err(json_err(
            path,
            "",
            format!("{len} bytes is too large for a JSON file here (limit {MAX_JSON_BYTES})"),
        ));
    }
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    json_object_from_bytes(&bytes, path)
}

fn json_object_from_bytes(bytes: &[u8], path: &Path) -> Result<Map<String, Value>> {
    match parse_strict(bytes).map_err(|e| json_err(path, "", e))? {
        Value::Object(m) => Ok(m),
        other => Err(json_err(
            path,
            "",
            format!("top level is {}, not an object", kind(&other)),
        )),
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Parse the bytes of a `model.safetensors.index.json` strictly (`path` names it in errors):
/// returns tensor name → shard file name. Does not look at the shards.
pub fn parse_index_json(
    bytes: &[u8],
    path: &Path,
) -> Result<std::collections::BTreeMap<String, String>> {
    let obj = json_object_from_bytes(bytes, path)?;
    Ok(parse_index(path, &obj)?.weight_map.into_iter().collect())
}

/// Parse the bytes of a `config.json` strictly and validate the keys this crate reads.
pub fn parse_config_json(bytes: &[u8], path: &Path) -> Result<Map<String, Value>> {
    let obj = json_object_from_bytes(bytes, path)?;
    crate::config::validate(path, &obj)?;
    Ok(obj)
}

/// Read and validate a safetensors header without reading the data: the header length, the
/// JSON (dtypes, shapes, contiguous non-overlapping offsets, shape × dtype = byte length), and
/// that the data section ends exactly at the end of the file.
fn read_header(path: &Path, file: &File) -> Result<(Metadata, u64, u64)> {
    let st_err = |reason: String| Error::Safetensors {
        file: path.display().to_string(),
        reason,
    };
    let file_len = file.metadata().map_err(io_err(path))?.len();
    if file_len < 8 {
        return Err(st_err(format!(
            "file is {file_len} bytes, too short for the 8-byte header length"
        )));
    }
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0).map_err(io_err(path))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES {
        return Err(st_err(format!(
            "header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )));
    }
    if n + 8 > file_len {
        return Err(st_err(format!(
            "header length {n} runs past the end of the file ({file_len} bytes): truncated?"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(io_err(path))?;
    let text =
        std::str::from_utf8(&header).map_err(|e| st_err(format!("header is not UTF-8: {e}")))?;
    // Duplicate keys would silently shadow a tensor; reject them first.
    parse_strict(text.as_bytes()).map_err(|e| st_err(format!("header JSON: {e}")))?;
    let metadata: Metadata =
        serde_json::from_str(text).map_err(|e| st_err(format!("header: {e}")))?;
    let data_len = metadata.data_len() as u64;
    let data_start = 8 + n;
    if data_start + data_len != file_len {
        return Err(st_err(format!(
            "header describes {data_len} data bytes but the file holds {} after the header: {}",
            file_len - data_start,
            if data_start + data_len > file_len {
                "truncated"
            } else {
                "trailing bytes"
            }
        )));
    }
    Ok((metadata, data_start, file_len))
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// The parsed `model.safetensors.index.json`: shard file names in order, tensor → shard.
pub(crate) struct Index {
    pub(crate) shards: Vec<String>,
    pub(crate) weight_map: HashMap<String, String>,
}

/// Parse an index file strictly.
pub(crate) fn parse_index(path: &Path, obj: &Map<String, Value>) -> Result<Index> {
    if let Some(meta) = obj.get("metadata") {
        let Value::Object(meta) = meta else {
            return Err(json_err(
                path,
                "metadata",
                format!("is {}, not an object", kind(meta)),
            ));
        };
        for key in ["total_size", "total_parameters"] {
            if let Some(v) = meta.get(key) {
                if v.as_u64().is_none() {
                    return Err(json_err(
                        path,
                        &format!("metadata.{key}"),
                        format!("{v} is not a non-negative integer"),
                    ));
                }
            }
        }
    }
    let wm = obj
        .get("weight_map")
        .ok_or_else(|| json_err(path, "weight_map", "missing"))?;
    let Value::Object(wm) = wm else {
        return Err(json_err(
            path,
            "weight_map",
            format!("is {}, not an object", kind(wm)),
        ));
    };
    if wm.is_empty() {
        return Err(json_err(path, "weight_map", "is empty"));
    }
    let mut shards = BTreeSet::new();
    let mut weight_map = HashMap::with_capacity(wm.len());
    for (tensor, shard) in wm {
        let key = format!("weight_map.{tensor}");
        let Value::String(shard) = shard else {
            return Err(json_err(
                path,
                &key,
                format!("is {}, not a file name", kind(shard)),
            ));
        };
        if !is_plain_file_name(shard) || !shard.ends_with(".safetensors") {
            return Err(json_err(
                path,
                &key,
                format!("{shard:?} is not a .safetensors file name in the same folder"),
            ));
        }
        shards.insert(shard.clone());
        weight_map.insert(tensor.clone(), shard.clone());
    }
    Ok(Index {
        shards: shards.into_iter().collect(),
        weight_map,
    })
}

impl ModelFolder {
    /// Open a model folder (`model.safetensors.index.json` + shards, or `model.safetensors`) or a
    /// single safetensors file. Validates every header, the index against the shards, the 4-bit
    /// groups and `config.json` (if present); reads no tensor data except the small quant-state
    /// blobs.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let (root, layout, shard_names, index) = if meta.is_dir() {
            let index_path = path.join(INDEX_FILE_NAME);
            if index_path.exists() {
                let obj = read_json_object(&index_path)?;
                let index = parse_index(&index_path, &obj)?;
                (
                    path.to_path_buf(),
                    Layout::Sharded,
                    index.shards.clone(),
                    Some((index_path, index)),
                )
            } else if path.join(SINGLE_FILE_NAME).exists() {
                (
                    path.to_path_buf(),
                    Layout::SingleFile,
                    vec![SINGLE_FILE_NAME.to_string()],
                    None,
                )
            } else {
                return Err(Error::Option(format!(
                    "{}: no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in this folder",
                    path.display()
                )));
            }
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
            (parent, Layout::File, vec![name], None)
        };
        if let Some((ipath, _)) = &index {
            // A shard the index names but the folder lacks is the index's problem to report,
            // before any shard is checked against it.
            if let Some(name) = shard_names.iter().find(|n| !root.join(n).is_file()) {
                return Err(json_err(
                    ipath,
                    "weight_map",
                    format!("names shard {name:?} which cannot be opened: no such file"),
                ));
            }
        }
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        for (i, name) in shard_names.iter().enumerate() {
            let spath = root.join(name);
            let file = File::open(&spath).map_err(|source| {
                if let Some((ipath, _)) = &index {
                    json_err(
                        ipath,
                        "weight_map",
                        format!("names shard {name:?} which cannot be opened: {source}"),
                    )
                } else {
                    Error::Io {
                        path: spath.clone(),
                        source,
                    }
                }
            })?;
            let (md, data_start, bytes) = read_header(&spath, &file)?;
            let mut names: Vec<(String, TensorInfo)> = md
                .tensors()
                .into_iter()
                .map(|(k, info)| {
                    (
                        k,
                        TensorInfo {
                            dtype: info.dtype,
                            shape: info.shape.clone(),
                            shard: i,
                            offset: data_start + info.data_offsets.0 as u64,
                            len: info.data_offsets.1 - info.data_offsets.0,
                        },
                    )
                })
                .collect();
            names.sort_by_key(|(_, t)| t.offset);
            for (k, t) in names {
                if let Some((ipath, idx)) = &index {
                    match idx.weight_map.get(&k) {
                        Some(s) if s == name => {}
                        Some(s) => {
                            return Err(json_err(
                                ipath,
                                &format!("weight_map.{k}"),
                                format!("says {s:?} but the tensor is in {name:?}"),
                            ))
                        }
                        None => {
                            return Err(json_err(
                                ipath,
                                "weight_map",
                                format!("does not list tensor {k:?} of shard {name:?}"),
                            ))
                        }
                    }
                }
                if tensors.contains_key(&k) {
                    return Err(Error::Tensor {
                        file: spath.display().to_string(),
                        tensor: k,
                        reason: "appears in more than one shard".into(),
                    });
                }
                order.push(k.clone());
                tensors.insert(k, t);
            }
            shards.push(Shard {
                file_name: name.clone(),
                path: spath,
                file,
                metadata: md.metadata().clone(),
                bytes,
            });
        }
        if let Some((ipath, idx)) = &index {
            let mut missing: Vec<(&String, &String)> = idx
                .weight_map
                .iter()
                .filter(|(k, _)| !tensors.contains_key(*k))
                .collect();
            missing.sort();
            if let Some((k, s)) = missing.first() {
                return Err(json_err(
                    ipath,
                    &format!("weight_map.{k}"),
                    format!("names shard {s:?}, which has no tensor {k:?}"),
                ));
            }
        }
        let config = match layout {
            Layout::File => None,
            _ => {
                let cpath = root.join(CONFIG_FILE_NAME);
                if cpath.exists() {
                    let c = read_json_object(&cpath)?;
                    crate::config::validate(&cpath, &c)?;
                    Some(c)
                } else {
                    None
                }
            }
        };
        let mut folder = ModelFolder {
            root,
            layout,
            shards,
            tensors,
            order,
            entries: Vec::new(),
            config,
        };
        let mut entries = classify(&folder)?;
        entries.sort_by_key(|e| {
            let t = &folder.tensors[e.name()];
            (t.shard, t.offset)
        });
        folder.entries = entries;
        Ok(folder)
    }

    /// The folder (for [`Layout::File`], the file's parent).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How the weights are stored.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The safetensors files, in index order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Logical tensors (dense tensors and 4-bit groups) in file order across shards.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Raw keys in file order across shards.
    pub fn raw_names(&self) -> &[String] {
        &self.order
    }

    /// Where a raw tensor lives.
    pub fn info(&self, key: &str) -> Result<&TensorInfo> {
        self.tensors.get(key).ok_or_else(|| Error::NoSuchTensor {
            file: self.root.display().to_string(),
            tensor: key.to_string(),
        })
    }

    /// `config.json`, if the folder has one.
    pub fn config(&self) -> Option<&Map<String, Value>> {
        self.config.as_ref()
    }

    /// The path of the shard holding `key`.
    pub fn shard_path(&self, key: &str) -> Result<&Path> {
        Ok(&self.shards[self.info(key)?.shard].path)
    }

    /// The bytes of a raw tensor, memory-mapped (released when dropped).
    pub fn tensor_bytes(&self, key: &str) -> Result<TensorBytes> {
        let t = self.info(key)?;
        let shard = &self.shards[t.shard];
        Ok(TensorBytes(map_range(
            &shard.file,
            &shard.path,
            t.offset,
            t.len,
        )?))
    }

    /// Read `buf.len()` bytes of a raw tensor starting `at` bytes into it.
    pub fn read_tensor_range(&self, key: &str, at: usize, buf: &mut [u8]) -> Result<()> {
        let t = self.info(key)?;
        let shard = &self.shards[t.shard];
        if at.checked_add(buf.len()).is_none_or(|end| end > t.len) {
            return Err(Error::Option(format!(
                "read of {} bytes at {at} is outside tensor {key:?} ({} bytes)",
                buf.len(),
                t.len
            )));
        }
        shard
            .file
            .read_exact_at(buf, t.offset + at as u64)
            .map_err(io_err(&shard.path))
    }

    /// A dense floating-point tensor converted to `T` (from f32, f16, bf16 or f64).
    pub fn dense_as<T: Element>(&self, name: &str) -> Result<Vec<T>> {
        let t = self.info(name)?;
        let bytes = self.tensor_bytes(name)?;
        dense_bytes_as(t.dtype, &bytes).ok_or_else(|| Error::Tensor {
            file: self.shards[t.shard].path.display().to_string(),
            tensor: name.to_string(),
            reason: format!("dtype {:?} is not a floating-point type", t.dtype),
        })
    }

    /// The quant state of a 4-bit group.
    pub fn quant_state(&self, name: &str) -> Result<&QuantState> {
        self.entries
            .iter()
            .find_map(|e| match e {
                Entry::Quantized { name: n, state } if n == name => Some(state),
                _ => None,
            })
            .ok_or_else(|| Error::NoSuchTensor {
                file: self.root.display().to_string(),
                tensor: name.to_string(),
            })
    }

    /// A 4-bit weight as a typed tensor, read on demand (members may live in different shards).
    pub fn quantized(&self, name: &str) -> Result<QuantizedTensor> {
        let state = self.quant_state(name)?;
        build_quantized(self, name, state)
    }

    /// Every 4-bit weight, read one at a time as the iterator advances.
    pub fn quantized_tensors(
        &self,
    ) -> impl Iterator<Item = Result<(String, QuantizedTensor)>> + '_ {
        self.entries.iter().filter_map(move |e| match e {
            Entry::Quantized { name, state } => {
                Some(build_quantized(self, name, state).map(|q| (name.clone(), q)))
            }
            Entry::Dense { .. } => None,
        })
    }
}

/// Convert the little-endian bytes of a float tensor to `T`; `None` for non-float dtypes.
pub(crate) fn dense_bytes_as<T: Element>(dtype: StDtype, data: &[u8]) -> Option<Vec<T>> {
    Some(match dtype {
        StDtype::F32 => convert::<f32, T>(data),
        StDtype::F16 => convert::<half::f16, T>(data),
        StDtype::BF16 => convert::<half::bf16, T>(data),
        StDtype::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(data)
            .into_iter()
            .map(|x| T::from_f32(x as f32))
            .collect(),
        _ => return None,
    })
}

impl RawSource for ModelFolder {
    fn raw_names(&self) -> Vec<&str> {
        self.order.iter().map(String::as_str).collect()
    }
    fn file_of(&self, key: &str) -> String {
        match self.tensors.get(key) {
            Some(t) => self.shards[t.shard].path.display().to_string(),
            None => self.root.display().to_string(),
        }
    }
    fn info(&self, key: &str) -> Option<(StDtype, Vec<usize>)> {
        self.tensors.get(key).map(|t| (t.dtype, t.shape.clone()))
    }
    fn bytes(&self, key: &str) -> Result<Cow<'_, [u8]>> {
        let t = ModelFolder::info(self, key)?;
        if key.contains(".quant_state.") && t.len > MAX_STATE_BLOB {
            return Err(Error::Tensor {
                file: self.file_of(key),
                tensor: key.to_string(),
                reason: format!("{} bytes is too large for a quant state", t.len),
            });
        }
        let mut buf = vec![0u8; t.len];
        self.read_tensor_range(key, 0, &mut buf)?;
        Ok(Cow::Owned(buf))
    }
}
