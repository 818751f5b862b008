//! The one error type of this crate, and its conversion into `candle_core::Error` (so that a
//! `Module::forward` or an `Optimizer::step` can return it through candle's `Result`).

use candle_core::{DType, Device};

/// Everything that can go wrong in `qlora-candle`: tensors of the wrong shape, dtype or device,
/// adapters that do not fit their base, and the errors of the layers underneath (codec, LoRA,
/// checkpoint files, optimizer, candle itself).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor whose shape does not fit the layer.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Which tensor.
        what: String,
        /// The shape the layer requires (`0` where any size fits).
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A tensor of a dtype the layer does not take.
    #[error("{what}: expected dtype {expected}, found {found:?}")]
    Dtype {
        /// Which tensor.
        what: String,
        /// What the layer takes.
        expected: String,
        /// The dtype given.
        found: DType,
    },
    /// A tensor on another device than the layer's.
    #[error("{what}: expected a tensor on {expected}, found one on {found}")]
    Device {
        /// Which tensor.
        what: String,
        /// The layer's device.
        expected: String,
        /// The tensor's device.
        found: String,
    },
    /// An adapter that does not fit the base it is applied to (shapes, module names, options).
    #[error("adapter module {module}: {reason}")]
    Adapter {
        /// The module path (e.g. `model.layers.0.self_attn.q_proj`) or the tensor concerned.
        module: String,
        /// What does not fit.
        reason: String,
    },
    /// An optimizer handed a variable or state it cannot handle.
    #[error("optimizer: {0}")]
    Optimizer(String),
    /// An error of the 4-bit codec.
    #[error(transparent)]
    Codec(#[from] qlora_codec::Error),
    /// An error of the LoRA layer, its initialization, merge or PEFT files.
    #[error(transparent)]
    Lora(#[from] qlora_lora::Error),
    /// An error reading a bitsandbytes/transformers checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] qlora_checkpoint::Error),
    /// An error of the optimizer kernels or their state files.
    #[error(transparent)]
    Optim(#[from] qlora_optim::Error),
    /// An error of the paged pool.
    #[error(transparent)]
    Pool(#[from] qlora_paged_alloc::PoolError),
    /// An error of candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A CUDA failure (feature `cuda`): a kernel launcher's refusal or a driver / cuBLAS error.
    #[error("cuda: {0}")]
    Cuda(String),
}

#[cfg(feature = "cuda")]
impl From<qlora_cuda::CudaError> for Error {
    fn from(e: qlora_cuda::CudaError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            // Keep candle's own errors as they are (backtraces, variants callers match on).
            Error::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Name a device for error messages.
pub(crate) fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// The floating-point dtypes the layers take (computation runs in f32 on CPU).
pub(crate) fn check_float(what: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        found => Err(Error::Dtype {
            what: what.into(),
            expected: "f32, bf16 or f16".into(),
            found,
        }),
    }
}

/// The tensor must live on `device` (compared by location: the same CUDA ordinal counts as the
/// same device).
pub(crate) fn check_device(what: &str, t: &candle_core::Tensor, device: &Device) -> Result<()> {
    if t.device().same_device(device) {
        Ok(())
    } else {
        Err(Error::Device {
            what: what.into(),
            expected: device_name(device),
            found: device_name(t.device()),
        })
    }
}
