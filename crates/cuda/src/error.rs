//! The one error type of this crate.

/// Everything a launcher or the runtime can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library (libcuda) could be loaded.
    #[error("no CUDA driver library (libcuda) could be loaded")]
    DriverUnavailable,
    /// No NVRTC library (libnvrtc) could be loaded, so kernels cannot be compiled.
    #[error("no NVRTC library (libnvrtc) could be loaded; put its directory on LD_LIBRARY_PATH")]
    NvrtcUnavailable,
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device with ordinal {ordinal} ({count} found)")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// NVRTC rejected a kernel source; `log` is NVRTC's own program log.
    #[error("NVRTC failed to compile {program} for {arch}: {log}")]
    Compile {
        /// File name under `cuda/`.
        program: &'static str,
        /// Target architecture, e.g. `sm_90`.
        arch: String,
        /// The NVRTC log (or the failing call when there is no log).
        log: String,
    },
    /// A buffer has the wrong number of elements for the launch.
    #[error("{what}: expected {expected} elements, found {found}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// Required length.
        expected: usize,
        /// Length passed.
        found: usize,
    },
    /// A block size outside the kernel's supported set.
    #[error("block size {blocksize} is not a power of two in [{min}, {max}]")]
    InvalidBlocksize {
        /// Block size passed.
        blocksize: usize,
        /// Smallest accepted.
        min: usize,
        /// Largest accepted.
        max: usize,
    },
    /// An argument outside its valid range (named in `reason`).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// The problem needs more CUDA blocks than one launch can have.
    #[error("{elements} elements exceed what one launch can cover")]
    TooLarge {
        /// Elements requested.
        elements: usize,
    },
    /// A buffer belongs to another CUDA context than the device it is launched on.
    #[error("{what} belongs to another CUDA context")]
    ForeignContext {
        /// Which argument.
        what: &'static str,
    },
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
}
