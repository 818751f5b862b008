//! Reading safetensors files (memory-mapped), grouping bitsandbytes' quantized tensors, writing
//! files atomically.

use crate::quant_state::QuantState;
use crate::{Error, Result, FP4_STATE_SUFFIX, NF4_STATE_SUFFIX};
use qlora_atomic_write::TempOutput;
use qlora_codec::{
    num_blocks, packed_len, Absmax, DoubleQuantAbsmax, Element, QuantType, QuantizedTensor,
};
use safetensors::tensor::{SafeTensors, TensorView, View};
use safetensors::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Tensor bytes to be written: dtype, shape and little-endian data, borrowed or owned.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData<'a> {
    /// safetensors dtype.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Raw little-endian bytes.
    pub data: Cow<'a, [u8]>,
}

/// An owned [`TensorData`].
pub type OwnedTensor = TensorData<'static>;

impl TensorData<'static> {
    /// An owned tensor of any `bytemuck::Pod` element type.
    pub fn from_pod<T: bytemuck::Pod>(dtype: StDtype, values: &[T], shape: Vec<usize>) -> Self {
        TensorData {
            dtype,
            shape,
            data: Cow::Owned(bytemuck::cast_slice(values).to_vec()),
        }
    }

    /// An owned f32 tensor.
    pub fn from_f32(values: &[f32], shape: Vec<usize>) -> Self {
        Self::from_pod(StDtype::F32, values, shape)
    }

    /// An owned u8 tensor.
    pub fn from_u8(values: Vec<u8>, shape: Vec<usize>) -> Self {
        TensorData {
            dtype: StDtype::U8,
            shape,
            data: Cow::Owned(values),
        }
    }

    /// An owned tensor of a codec element type (f32, f16, bf16).
    pub fn from_elements<T: Element>(values: &[T], shape: Vec<usize>) -> Self {
        Self::from_pod(st_dtype(T::DTYPE), values, shape)
    }
}

impl<'a> TensorData<'a> {
    /// Borrow a tensor read from a file.
    pub fn borrowed(view: &TensorView<'a>) -> Self {
        TensorData {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: Cow::Borrowed(view.data()),
        }
    }
}

impl View for TensorData<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The safetensors dtype of a codec dtype.
pub(crate) fn st_dtype(d: qlora_codec::Dtype) -> StDtype {
    match d {
        qlora_codec::Dtype::F32 => StDtype::F32,
        qlora_codec::Dtype::F16 => StDtype::F16,
        qlora_codec::Dtype::BF16 => StDtype::BF16,
    }
}

/// The tensors bitsandbytes' `Linear4bit` state dict holds for one quantized weight `name`
/// (see the crate docs for the table).
pub fn quantized_tensors(name: &str, q: &QuantizedTensor) -> Vec<(String, OwnedTensor)> {
    let n = q.numel();
    let mut out = vec![(
        name.to_string(),
        TensorData::from_u8(q.packed().to_vec(), vec![packed_len(n), 1]),
    )];
    let blocks = num_blocks(n, q.blocksize());
    let state = QuantState {
        quant_type: q.quant_type(),
        blocksize: q.blocksize(),
        dtype: q.dtype(),
        shape: q.shape().to_vec(),
        nested_offset: None,
    };
    let state = match q.absmax() {
        Absmax::F32(a) => {
            out.push((
                format!("{name}.absmax"),
                TensorData::from_f32(a, vec![blocks]),
            ));
            state
        }
        Absmax::Double(d) => {
            out.push((
                format!("{name}.absmax"),
                TensorData::from_u8(d.codes.clone(), vec![blocks]),
            ));
            out.push((
                format!("{name}.nested_absmax"),
                TensorData::from_f32(&d.nested_absmax, vec![d.nested_absmax.len()]),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                TensorData::from_f32(qlora_double_quant::DynamicMap::signed().values(), vec![256]),
            ));
            QuantState {
                nested_offset: Some(d.offset),
                ..state
            }
        }
    };
    out.push((
        format!("{name}.quant_map"),
        TensorData::from_f32(q.quant_type().quant_map(), vec![16]),
    ));
    let blob = state.to_json_bytes();
    let len = blob.len();
    let suffix = match q.quant_type() {
        QuantType::Nf4 => NF4_STATE_SUFFIX,
        QuantType::Fp4 => FP4_STATE_SUFFIX,
    };
    out.push((
        format!("{name}{suffix}"),
        TensorData::from_u8(blob, vec![len]),
    ));
    out
}

/// One logical tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A tensor stored as is.
    Dense {
        /// Its key.
        name: String,
        /// Its dtype.
        dtype: StDtype,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A bitsandbytes 4-bit weight: a group of keys sharing the prefix `name`.
    Quantized {
        /// The weight's key (e.g. `model.layers.0.mlp.down_proj.weight`).
        name: String,
        /// Its parsed quant state.
        state: QuantState,
    },
}

impl Entry {
    /// The entry's name.
    pub fn name(&self) -> &str {
        match self {
            Entry::Dense { name, .. } | Entry::Quantized { name, .. } => name,
        }
    }
}

/// A parsed safetensors file (header validated, tensors grouped), borrowing its bytes.
#[derive(Debug)]
pub struct Checkpoint<'a> {
    file: String,
    tensors: SafeTensors<'a>,
    metadata: Option<HashMap<String, String>>,
    entries: Vec<Entry>,
}

/// Parse a safetensors file held in memory; `file` names it in errors.
pub fn read_checkpoint_bytes<'a>(bytes: &'a [u8], file: &str) -> Result<Checkpoint<'a>> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        file: file.to_string(),
        reason: e.to_string(),
    })?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map(|(n, m)| (n, m.metadata().clone()))
        .map_err(|e| Error::Safetensors {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
    // serde keeps the last of duplicate keys; a duplicated tensor name must not pass silently.
    crate::json::parse_strict(&bytes[8..8 + header_len]).map_err(|e| Error::Safetensors {
        file: file.to_string(),
        reason: format!("header JSON: {e}"),
    })?;
    let entries = classify(&(&tensors, file))?;
    Ok(Checkpoint {
        file: file.to_string(),
        tensors,
        metadata,
        entries,
    })
}

fn tensor_err(file: &str, tensor: &str, reason: impl Into<String>) -> Error {
    Error::Tensor {
        file: file.to_string(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

/// Raw tensors addressed by key, from one file or from the shards of a folder: what grouping and
/// the member checks of a 4-bit weight need.
pub(crate) trait RawSource {
    /// Every raw key.
    fn raw_names(&self) -> Vec<&str>;
    /// The file holding `key` (for error messages).
    fn file_of(&self, key: &str) -> String;
    /// Dtype and shape of `key`.
    fn info(&self, key: &str) -> Option<(StDtype, Vec<usize>)>;
    /// The bytes of `key`.
    fn bytes(&self, key: &str) -> Result<Cow<'_, [u8]>>;
}

impl RawSource for (&SafeTensors<'_>, &str) {
    fn raw_names(&self) -> Vec<&str> {
        self.0.names()
    }
    fn file_of(&self, _key: &str) -> String {
        self.1.to_string()
    }
    fn info(&self, key: &str) -> Option<(StDtype, Vec<usize>)> {
        self.0
            .tensor(key)
            .ok()
            .map(|v| (v.dtype(), v.shape().to_vec()))
    }
    fn bytes(&self, key: &str) -> Result<Cow<'_, [u8]>> {
        self.0
            .tensor(key)
            .map(|v| Cow::Borrowed(v.data()))
            .map_err(|e| tensor_err(self.1, key, e.to_string()))
    }
}

/// Group raw keys into logical entries (dense tensors and 4-bit groups), sorted by name.
pub(crate) fn classify(src: &dyn RawSource) -> Result<Vec<Entry>> {
    let all_names = src.raw_names();
    let names: HashSet<&str> = all_names.iter().copied().collect();
    let mut grouped: HashSet<String> = HashSet::new();
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut state_keys: Vec<&str> = names
        .iter()
        .copied()
        .filter(|k| k.ends_with(NF4_STATE_SUFFIX) || k.ends_with(FP4_STATE_SUFFIX))
        .collect();
    state_keys.sort_unstable();
    for key in state_keys {
        let file = src.file_of(key);
        let file = file.as_str();
        let (base, suffix_type) = match key.strip_suffix(NF4_STATE_SUFFIX) {
            Some(b) => (b, QuantType::Nf4),
            None => match key.strip_suffix(FP4_STATE_SUFFIX) {
                Some(b) => (b, QuantType::Fp4),
                None => continue,
            },
        };
        if entries.contains_key(base) {
            return Err(tensor_err(
                file,
                base,
                "has both an nf4 and an fp4 quant state",
            ));
        }
        let (dtype, shape) = src
            .info(key)
            .ok_or_else(|| tensor_err(file, key, "missing"))?;
        if dtype != StDtype::U8 || shape.len() != 1 {
            return Err(tensor_err(
                file,
                key,
                format!("quant state must be a 1-D uint8 tensor, found {dtype:?} {shape:?}"),
            ));
        }
        if shape[0] > MAX_STATE_BLOB {
            return Err(tensor_err(
                file,
                key,
                format!(
                    "quant state blob of {} bytes is implausibly large (limit {MAX_STATE_BLOB})",
                    shape[0]
                ),
            ));
        }
        let blob = src.bytes(key)?;
        let state = QuantState::from_json_bytes(&blob)
            .map_err(|e| tensor_err(file, key, format!("quant state JSON: {e}")))?;
        if state.quant_type != suffix_type {
            return Err(tensor_err(
                file,
                key,
                format!(
                    "quant state says {:?} but its key says {}",
                    state.quant_type.as_str(),
                    suffix_type.as_str()
                ),
            ));
        }
        let mut members = vec![
            base.to_string(),
            format!("{base}.absmax"),
            format!("{base}.quant_map"),
        ];
        if state.is_double_quant() {
            members.push(format!("{base}.nested_absmax"));
            members.push(format!("{base}.nested_quant_map"));
        } else {
            for k in ["nested_absmax", "nested_quant_map"] {
                if names.contains(format!("{base}.{k}").as_str()) {
                    return Err(tensor_err(
                        file,
                        base,
                        format!("has {base}.{k} but its quant state has no nested_offset"),
                    ));
                }
            }
        }
        for m in &members {
            if !names.contains(m.as_str()) {
                return Err(tensor_err(file, base, format!("missing key {m:?}")));
            }
        }
        grouped.extend(members);
        grouped.insert(key.to_string());
        entries.insert(
            base.to_string(),
            Entry::Quantized {
                name: base.to_string(),
                state,
            },
        );
    }
    for name in all_names {
        if !grouped.contains(name) {
            let (dtype, shape) = src
                .info(name)
                .ok_or_else(|| tensor_err(&src.file_of(name), name, "missing"))?;
            entries.insert(
                name.to_string(),
                Entry::Dense {
                    name: name.to_string(),
                    dtype,
                    shape,
                },
            );
        }
    }
    Ok(entries.into_values().collect())
}

/// Largest quant-state blob accepted (bitsandbytes writes about 170 bytes).
pub(crate) const MAX_STATE_BLOB: usize = 4096;

fn expect_member<'s>(
    src: &'s dyn RawSource,
    group: &str,
    key: &str,
    dtype: StDtype,
    numel: usize,
) -> Result<Cow<'s, [u8]>> {
    let file = src.file_of(key);
    let (found_dtype, shape) = src
        .info(key)
        .ok_or_else(|| tensor_err(&file, group, format!("missing key {key:?}")))?;
    if found_dtype != dtype {
        return Err(tensor_err(
            &file,
            group,
            format!("{key} has dtype {found_dtype:?}, expected {dtype:?}"),
        ));
    }
    let found: usize = shape.iter().product();
    if found != numel {
        return Err(tensor_err(
            &file,
            group,
            format!("{key} has shape {shape:?} ({found} elements), expected {numel} elements"),
        ));
    }
    src.bytes(key)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

/// Read the 4-bit group `name` (whose parsed state is `state`) as a typed tensor, after checking
/// every member's dtype and size against the state.
pub(crate) fn build_quantized(
    src: &dyn RawSource,
    name: &str,
    state: &QuantState,
) -> Result<QuantizedTensor> {
    let file = src.file_of(name);
    let file = file.as_str();
    let n = state.numel();
    let blocks = num_blocks(n, state.blocksize);
    let (pdtype, pshape) = src
        .info(name)
        .ok_or_else(|| tensor_err(file, name, "missing packed weight"))?;
    let plen = pshape.iter().product::<usize>() * pdtype.bitsize() / 8;
    if plen != packed_len(n) {
        return Err(tensor_err(
            file,
            name,
            format!(
                "packed weight has {plen} bytes ({pdtype:?} {pshape:?}) but shape {:?} needs {}",
                state.shape,
                packed_len(n)
            ),
        ));
    }
    expect_member(src, name, &format!("{name}.quant_map"), StDtype::F32, 16)?;
    let absmax = match state.nested_offset {
        None => {
            let a = expect_member(src, name, &format!("{name}.absmax"), StDtype::F32, blocks)?;
            Absmax::F32(f32s(&a))
        }
        Some(offset) => {
            let codes = expect_member(src, name, &format!("{name}.absmax"), StDtype::U8, blocks)?;
            let nested = expect_member(
                src,
                name,
                &format!("{name}.nested_absmax"),
                StDtype::F32,
                blocks.div_ceil(qlora_double_quant::NESTED_BLOCKSIZE),
            )?;
            expect_member(
                src,
                name,
                &format!("{name}.nested_quant_map"),
                StDtype::F32,
                256,
            )?;
            Absmax::Double(DoubleQuantAbsmax {
                codes: codes.into_owned(),
                nested_absmax: f32s(&nested),
                offset,
            })
        }
    };
    let packed = src.bytes(name)?.into_owned();
    QuantizedTensor::from_parts(
        state.quant_type,
        state.blocksize,
        state.dtype,
        state.shape.clone(),
        packed,
        absmax,
    )
    .map_err(|e| tensor_err(file, name, e.to_string()))
}

impl<'a> Checkpoint<'a> {
    /// The name used in errors.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Logical tensors, sorted by name: dense tensors and quantized groups.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The underlying safetensors view (every raw key).
    pub fn raw(&self) -> &SafeTensors<'a> {
        &self.tensors
    }

    /// The `__metadata__` map of the header, if any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// A raw tensor by key.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'a>> {
        self.tensors.tensor(name).map_err(|_| Error::NoSuchTensor {
            file: self.file.clone(),
            tensor: name.to_string(),
        })
    }

    /// A dense floating-point tensor converted to `T` (from f32, f16, bf16 or f64; narrowing
    /// rounds to nearest even).
    pub fn dense_as<T: Element>(&self, name: &str) -> Result<Vec<T>> {
        let view = self.tensor(name)?;
        let data = view.data();
        let out = match view.dtype() {
            StDtype::F32 => convert::<f32, T>(data),
            StDtype::F16 => convert::<half::f16, T>(data),
            StDtype::BF16 => convert::<half::bf16, T>(data),
            StDtype::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(data)
                .into_iter()
                .map(|x| T::from_f32(x as f32))
                .collect(),
            other => {
                return Err(tensor_err(
                    &self.file,
                    name,
                    format!("dtype {other:?} is not a floating-point type"),
                ))
            }
        };
        Ok(out)
    }

    /// A quantized weight group as a typed tensor, after checking every member's dtype and size
    /// against the quant state.
    pub fn quantized(&self, name: &str) -> Result<QuantizedTensor> {
        let state = self
            .entries
            .iter()
            .find_map(|e| match e {
                Entry::Quantized { name: n, state } if n == name => Some(state),
                _ => None,
            })
            .ok_or_else(|| Error::NoSuchTensor {
                file: self.file.clone(),
                tensor: name.to_string(),
            })?;
        build_quantized(&(&self.tensors, self.file.as_str()), name, state)
    }
}

pub(crate) fn convert<S: Element, T: Element>(data: &[u8]) -> Vec<T> {
    bytemuck::pod_collect_to_vec::<u8, S>(data)
        .into_iter()
        .map(|x| T::from_f32(x.to_f32()))
        .collect()
}

/// Map `len` bytes of `file` from byte `offset`, read-only. The one place this crate maps memory.
pub(crate) fn map_range(
    file: &std::fs::File,
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and private to this process. Like every memory-mapped reader
    // (safetensors, candle, transformers), we rely on no other process truncating or rewriting the
    // file while it is mapped; that is documented on `MappedFile` and `ModelFolder`.
    #[allow(unsafe_code)]
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    };
    map.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A memory-mapped file.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Map a file read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let len = usize::try_from(len).map_err(|_| Error::Safetensors {
            file: path.display().to_string(),
            reason: format!("{len} bytes do not fit in memory addresses"),
        })?;
        let map = map_range(&file, &path, 0, len)?;
        Ok(MappedFile { path, map })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parse the file as a safetensors checkpoint.
    pub fn checkpoint(&self) -> Result<Checkpoint<'_>> {
        read_checkpoint_bytes(&self.map, &self.path.display().to_string())
    }
}

fn check_unique<S: AsRef<str>, V>(tensors: &[(S, V)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (n, _) in tensors {
        if !seen.insert(n.as_ref()) {
            return Err(Error::Option(format!(
                "duplicate tensor name {:?}",
                n.as_ref()
            )));
        }
    }
    Ok(())
}

/// Serialize tensors to safetensors bytes in memory.
pub fn write_safetensors<V: View>(tensors: Vec<(String, V)>) -> Result<Vec<u8>> {
    check_unique(&tensors)?;
    safetensors::serialize(tensors, None).map_err(|e| Error::Safetensors {
        file: "<output>".into(),
        reason: e.to_string(),
    })
}

/// Largest safetensors header the format's readers accept.
const MAX_HEADER_SIZE: usize = 100_000_000;

/// Write tensors to `path` atomically: streamed into a temporary file in the same directory
/// (`qlora_atomic_write::TempOutput`, so a signal or a later run removes it), renamed over `path`
/// only when complete. The bytes are those of `safetensors::serialize` (tensors by descending
/// dtype alignment, then name). On error (a full disk, a file-size limit, …) nothing is left
/// behind and an existing `path` is untouched.
pub fn write_safetensors_atomic<V: View>(
    path: &Path,
    mut tensors: Vec<(String, V)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use std::io::Write;
    check_unique(&tensors)?;
    let st_err = |reason: String| Error::Safetensors {
        file: path.display().to_string(),
        reason,
    };
    // safetensors' own layout rule (its `prepare`): descending alignment, then name.
    tensors.sort_by(|(ln, l), (rn, r)| r.dtype().cmp(&l.dtype()).then(ln.cmp(rn)));
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, t)| {
            let n = t.data_len();
            let info = safetensors::tensor::TensorInfo {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data_offsets: (offset, offset + n),
            };
            offset += n;
            (name.clone(), info)
        })
        .collect();
    let meta =
        safetensors::tensor::Metadata::new(metadata, infos).map_err(|e| st_err(e.to_string()))?;
    let mut header = serde_json::to_string(&meta)
        .map_err(|e| st_err(e.to_string()))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER_SIZE {
        return Err(st_err(format!(
            "header of {} bytes exceeds the format's limit of {MAX_HEADER_SIZE}",
            header.len()
        )));
    }
    let (tmp, file) = TempOutput::file(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    (|| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (_, t) in &tensors {
            out.write_all(&t.data())?;
        }
        out.flush()
    })()
    .map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    drop(out);
    tmp.commit()?;
    Ok(())
}
