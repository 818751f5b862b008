//! The one error type of this crate.

/// Errors of `qlora-optim`: every variant names the tensor, key or flag that was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two buffers that must have the same number of elements do not.
    #[error("length mismatch for {what}: expected {expected} elements, found {found}")]
    Length {
        /// Which buffer (for example `"grad"` or `"state1"`).
        what: String,
        /// The length required.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A parameter id that this optimizer never handed out.
    #[error("unknown parameter {group}/{index}")]
    UnknownParam {
        /// Parameter group.
        group: usize,
        /// Index within the group.
        index: usize,
    },
    /// A parameter group id that does not exist.
    #[error("unknown parameter group {0}")]
    UnknownGroup(usize),
    /// The same parameter was passed twice to one `step`.
    #[error("parameter {group}/{index} was passed twice to one step")]
    DuplicateParam {
        /// Parameter group.
        group: usize,
        /// Index within the group.
        index: usize,
    },
    /// A hyper-parameter outside its valid range (`lr < 0`, `beta` outside `[0, 1)`, …).
    #[error("invalid hyper-parameter {name} = {value}: {reason}")]
    HyperParameter {
        /// Its name (`"lr"`, `"beta1"`, …).
        name: &'static str,
        /// The value given.
        value: f64,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A learning-rate schedule that cannot be evaluated (for example zero total steps).
    #[error("invalid schedule: {0}")]
    Schedule(String),
    /// A safetensors file or buffer that could not be parsed or written.
    #[error("safetensors error for {context}: {source}")]
    SafeTensors {
        /// What was being read or written.
        context: String,
        /// The underlying error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor required for loading is missing.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor has the wrong dtype.
    #[error("tensor `{name}` has dtype {found}, expected {expected}")]
    Dtype {
        /// Tensor name.
        name: String,
        /// Expected dtype(s).
        expected: String,
        /// Dtype found.
        found: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A saved quantization map that is not bitsandbytes' dynamic map.
    #[error("tensor `{0}` is not bitsandbytes' dynamic map (only create_dynamic_map(signed) / (unsigned) are supported)")]
    QuantMap(String),
    /// A saved state that does not fit the parameter it is loaded for.
    #[error("saved state for parameter {param} does not fit: {reason}")]
    StateMismatch {
        /// The parameter (`group/index` or a tensor prefix).
        param: String,
        /// What does not fit.
        reason: String,
    },
    /// The state storage backend failed (for example the paged pool ran out of its budget).
    #[error("state storage: {0}")]
    Storage(String),
    /// A kernel implementation was asked for that this machine cannot run.
    #[error("the {0} kernel implementation is not available on this machine")]
    Unavailable(&'static str),
    /// An I/O error while reading or writing a file.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn length(what: impl Into<String>, expected: usize, found: usize) -> Self {
        Error::Length {
            what: what.into(),
            expected,
            found,
        }
    }

    pub(crate) fn st(context: impl Into<String>, source: safetensors::SafeTensorError) -> Self {
        Error::SafeTensors {
            context: context.into(),
            source,
        }
    }
}
