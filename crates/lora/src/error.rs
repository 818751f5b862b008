//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong in `qlora-lora`: bad shapes, non-finite values, unsupported
/// options, malformed adapter files, and adapters that do not fit a base model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor or buffer whose shape does not fit the others.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Which tensor.
        what: String,
        /// The shape the other inputs require.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A NaN or infinity where finite values are required.
    #[error("{what} holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// Which tensor.
        what: String,
        /// First offending flat index.
        index: usize,
        /// The value found there.
        value: f32,
    },
    /// A hyper-parameter or option outside what this crate supports.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's name (as in PEFT's `adapter_config.json` where there is one).
        option: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A forward/backward or merge call that does not fit the layer's state.
    #[error("layer state: {0}")]
    State(String),
    /// An SVD or QR decomposition that did not converge.
    #[error("decomposition failed: {0}")]
    Decomposition(String),
    /// An error of the 4-bit codec.
    #[error(transparent)]
    Codec(#[from] qlora_codec::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON or has fields of the wrong type.
    #[error("{path}: malformed adapter config: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// `adapter_model.safetensors` is malformed or holds an unexpected tensor.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the tensor key where there is one).
        message: String,
    },
    /// An adapter that does not fit the base model it is applied to.
    #[error("module {module}: {reason}")]
    Module {
        /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
        module: String,
        /// What does not fit.
        reason: String,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn check_len(what: &str, expected: &[usize], found_len: usize) -> Result<()> {
    let n: usize = expected.iter().product();
    if n != found_len {
        return Err(Error::Shape {
            what: what.to_string(),
            expected: expected.to_vec(),
            found: vec![found_len],
        });
    }
    Ok(())
}

pub(crate) fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: what.to_string(),
            index,
            value,
        });
    }
    Ok(())
}
