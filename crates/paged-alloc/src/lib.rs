//! A pool of paged memory for optimizer states: CUDA unified memory with prefetch hints, or host
//! memory with the same API.
//!
//! # Should I use this crate?
//! Use it when you keep large, rarely touched buffers (QLoRA's paged AdamW states) that should be
//! able to spill to host memory when the GPU runs short, and you want to page them in explicitly
//! right before use, as bitsandbytes' paged optimizers do (reference §7). On a machine without a
//! GPU the [`Backend::Host`] pool gives the same API over ordinary memory, so code and tests run
//! everywhere.
//!
//! # What it does
//! * **Size classes.** Every request of `b` bytes is carved from a block of
//!   [`size_class`]`(b) = max(256, b.next_power_of_two())` bytes, 256-byte aligned.
//! * **Reuse.** A dropped [`PagedBuf`] returns its block to the pool's cache; the next request of
//!   the same class takes it (zero-filled again) instead of asking the backend.
//! * **Budget.** The pool never holds more than [`PoolConfig::budget_bytes`] from its backend. A
//!   request that cannot fit even after releasing every cached block is a
//!   [`PoolError::BudgetExceeded`]. The CUDA backend also never asks for more than `cuMemGetInfo`
//!   reports free ([`PoolError::DeviceMemory`]).
//! * **Hints.** [`PagedBuf::prefetch_to_device`], [`PagedBuf::prefetch_to_host`] and
//!   [`PagedBuf::advise`] map to `cuMemPrefetchAsync` / `cuMemAdvise` and are issued only where
//!   the device reports concurrent managed access (they are counted as skipped otherwise); on the
//!   host backend they move nothing but are counted, so bookkeeping can be tested anywhere.
//! * **Statistics.** [`Pool::stats`] gives bytes allocated / in use / reserved / hinted to the
//!   device and counts of prefetches, advice calls and reuses.
//! * **One global pool.** [`Pool::init_global`] / [`Pool::global`]; the package declares
//!   `links = "qlora_paged_alloc"` so Cargo refuses a build with two copies of the crate.
//!
//! # Overhead
//! * Internal fragmentation: a buffer of `b > 0` bytes holds `size_class(b)` bytes, which is less
//!   than `2·b` for `b ≥ 256` and exactly 256 below; the proptests check
//!   `bytes_in_use < 2·bytes_allocated + 256·live_buffers`.
//! * Cached blocks stay reserved (and count against the budget) until a request needs the room
//!   or [`Pool::trim`] is called; `bytes_reserved ≤ budget_bytes` always holds.
//! * Handle: `size_of::<PagedBuf<T>>()` is 56 bytes on 64-bit targets without the `cuda` feature
//!   (checked by a test); each cached block costs one entry in a per-class `Vec`.
//!
//! # Example
//! ```
//! use qlora_paged_alloc::{Pool, PoolConfig, Stream};
//! let pool = Pool::new(PoolConfig::host(64 << 20))?;
//! let mut exp_avg = pool.alloc::<u8>(1 << 20)?;       // 8-bit state
//! let mut absmax = pool.alloc::<f32>((1 << 20) / 256)?; // its per-block scales
//! exp_avg.prefetch_to_device(&Stream::Default)?;      // a counted no-op on the host
//! absmax.as_mut_slice()?.fill(1.0);
//! let stats = pool.stats();
//! assert_eq!(stats.bytes_in_use, (1 << 20) + 16384);
//! assert_eq!(stats.prefetches_to_device, 1);
//! drop(exp_avg);
//! let again = pool.alloc::<i8>(1 << 20)?;             // reuses the cached block
//! assert_eq!(pool.stats().reuses, 1);
//! assert!(again.as_slice()?.iter().all(|&b| b == 0));
//! # Ok::<(), qlora_paged_alloc::PoolError>(())
//! ```
//!
//! # Features
//! | feature | what it adds |
//! |---|---|
//! | `cuda` | `Backend::Cuda`: managed memory through cudarc (the driver is loaded at run time; building needs no CUDA toolkit) |
//! | `dynamic-linking` | cudarc's `dynamic-linking`, for binaries that also link candle's CUDA backend (libcuda is then a link-time dependency and the driver probe answers "present"); turned on by `qlora-candle/cuda` |
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod pool;

#[cfg(feature = "cuda")]
mod cuda;

pub use error::PoolError;
pub use pool::{
    size_class, Advice, Backend, PagedBuf, Pool, PoolConfig, PoolStats, Stream, BLOCK_ALIGN,
    MIN_BLOCK_BYTES,
};
