//! The one error type of this crate.

/// Everything that can go wrong when carving, hinting or reading a paged buffer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The request, rounded up to its size class, does not fit in the budget even after every
    /// cached (freed) block has been released.
    #[error(
        "request of {requested} bytes (size class {class}) exceeds the pool budget: \
         {in_use} of {budget} bytes are held by live buffers"
    )]
    BudgetExceeded {
        /// Bytes asked for (`len * size_of::<T>()`).
        requested: usize,
        /// The power-of-two size class the request rounds up to.
        class: usize,
        /// Bytes held by live buffers (their size classes) at the time of the request.
        in_use: usize,
        /// The configured budget.
        budget: usize,
    },
    /// `len * size_of::<T>()` or its size class does not fit in `usize`.
    #[error("request of {len} elements of {elem_bytes} bytes overflows the address space")]
    TooLarge {
        /// Elements asked for.
        len: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },
    /// The element type is zero-sized; a pool of nothing is a caller bug we refuse cleanly.
    #[error("zero-sized element types cannot be pooled")]
    ZeroSizedType,
    /// The element type needs a stronger alignment than the pool's blocks give.
    #[error("element alignment {align} exceeds the pool's block alignment {block_align}")]
    UnsupportedAlignment {
        /// `align_of::<T>()`.
        align: usize,
        /// [`crate::BLOCK_ALIGN`].
        block_align: usize,
    },
    /// The device reports less free memory than a new block needs (CUDA backend only): the pool
    /// never asks the driver for more than `cuMemGetInfo` says is free.
    #[error("device has {free} bytes free, a new block of {class} bytes does not fit")]
    DeviceMemory {
        /// Size class of the block that would have been allocated.
        class: usize,
        /// Free bytes reported by the device.
        free: usize,
    },
    /// A configuration value is unusable (for example a zero budget).
    #[error("invalid pool configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// [`crate::Pool::init_global`] was called after the global pool already existed.
    #[error("the process-wide pool is already initialized")]
    GlobalAlreadyInitialized,
    /// A CUDA stream was passed to a buffer of the host backend, or a stream of another context.
    #[error("the stream does not belong to this buffer's backend or device")]
    ForeignStream,
    /// No CUDA driver library could be loaded (CUDA backend only).
    #[error("no CUDA driver library (libcuda) could be loaded")]
    DriverUnavailable,
    /// The driver is older than the CUDA 12.2 API the backend calls (`cuMemPrefetchAsync_v2`).
    #[error("CUDA driver version {found} is older than the required {required}")]
    DriverTooOld {
        /// `cuDriverGetVersion`, e.g. 12020 for 12.2.
        found: i32,
        /// Oldest supported version.
        required: i32,
    },
    /// The device does not support managed memory at all.
    #[error("device {ordinal} does not support managed (unified) memory")]
    ManagedMemoryUnsupported {
        /// Device ordinal.
        ordinal: usize,
    },
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
}
