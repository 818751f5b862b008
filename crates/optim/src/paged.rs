//! Paged optimizer states (bitsandbytes' `PagedAdamW`, `PagedAdamW8bit`, `PagedAdamW32bit`):
//! `state1`/`state2` of parameters with at least [`PAGED_MIN_NUMEL`] elements live in a
//! `qlora-paged-alloc` pool and are prefetched right before each tensor's update; smaller ones,
//! and every `absmax`, stay in ordinary memory. Paging changes nothing in the math.

use crate::error::Error;
use crate::optimizer::{Adam, AdamConfig};
use crate::storage::{StateBuffer, StateStorage};
use bytemuck::Pod;
use qlora_paged_alloc::{PagedBuf, Pool, PoolError, Stream};
use std::fmt;

/// bitsandbytes pages only states of parameters with `numel >= 1e5`.
pub const PAGED_MIN_NUMEL: usize = 100_000;

fn pool_err(e: PoolError) -> Error {
    Error::Storage(e.to_string())
}

/// A state buffer in the pool or, for small parameters, in a `Vec`.
#[derive(Debug)]
pub enum MaybePaged<T: Pod> {
    /// Ordinary memory.
    Host(Vec<T>),
    /// A pool buffer and the stream its prefetches are ordered on.
    Paged(PagedBuf<T>, Stream),
}

impl<T: Pod + Send + Sync + fmt::Debug> StateBuffer<T> for MaybePaged<T>
where
    PagedBuf<T>: Send + Sync,
{
    fn len(&self) -> usize {
        match self {
            MaybePaged::Host(v) => v.len(),
            MaybePaged::Paged(b, _) => b.len(),
        }
    }
    fn as_slice(&self) -> Result<&[T], Error> {
        match self {
            MaybePaged::Host(v) => Ok(v),
            MaybePaged::Paged(b, _) => b.as_slice().map_err(pool_err),
        }
    }
    fn as_mut_slice(&mut self) -> Result<&mut [T], Error> {
        match self {
            MaybePaged::Host(v) => Ok(v),
            MaybePaged::Paged(b, _) => b.as_mut_slice().map_err(pool_err),
        }
    }
    fn prefetch(&mut self) -> Result<(), Error> {
        match self {
            MaybePaged::Host(_) => Ok(()),
            MaybePaged::Paged(b, s) => b.prefetch_to_device(s).map_err(pool_err),
        }
    }
    fn is_paged(&self) -> bool {
        matches!(self, MaybePaged::Paged(..))
    }
    fn allocated_bytes(&self) -> usize {
        match self {
            MaybePaged::Host(v) => v.capacity() * std::mem::size_of::<T>(),
            MaybePaged::Paged(b, _) => b.capacity_bytes(),
        }
    }
}

/// A [`StateStorage`] that puts the states of large parameters into a paged pool.
#[derive(Clone)]
pub struct PagedStorage {
    pool: Pool,
    stream: Stream,
    min_numel: usize,
}

impl fmt::Debug for PagedStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagedStorage")
            .field("backend", &self.pool.backend())
            .field("stream", &self.stream)
            .field("min_numel", &self.min_numel)
            .finish()
    }
}

impl PagedStorage {
    /// States of parameters with at least [`PAGED_MIN_NUMEL`] elements go to `pool`; prefetches
    /// are ordered on the default stream (bitsandbytes' choice).
    pub fn new(pool: Pool) -> Self {
        PagedStorage {
            pool,
            stream: Stream::Default,
            min_numel: PAGED_MIN_NUMEL,
        }
    }
    /// Order prefetches on another stream of the pool's device.
    pub fn with_stream(mut self, stream: Stream) -> Self {
        self.stream = stream;
        self
    }
    /// Change the paging threshold (bitsandbytes: 10⁵ elements).
    pub fn with_min_numel(mut self, min_numel: usize) -> Self {
        self.min_numel = min_numel;
        self
    }
    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
    fn alloc<T: Pod>(&self, len: usize, param_numel: usize) -> Result<MaybePaged<T>, Error> {
        if param_numel >= self.min_numel {
            let buf = self.pool.alloc::<T>(len).map_err(pool_err)?;
            Ok(MaybePaged::Paged(buf, self.stream.clone()))
        } else {
            Ok(MaybePaged::Host(vec![T::zeroed(); len]))
        }
    }
}

impl StateStorage for PagedStorage {
    type U8 = MaybePaged<u8>;
    type F32 = MaybePaged<f32>;
    fn alloc_u8(&self, len: usize, param_numel: usize) -> Result<Self::U8, Error> {
        self.alloc(len, param_numel)
    }
    fn alloc_f32(&self, len: usize, param_numel: usize) -> Result<Self::F32, Error> {
        self.alloc(len, param_numel)
    }
}

/// `PagedAdamW` / `PagedAdamW8bit` / `PagedAdamW32bit` (and the `PagedAdam*` variants): an
/// [`Adam`] whose large states live in a paged pool.
pub type PagedAdam = Adam<PagedStorage>;

impl Adam<PagedStorage> {
    /// A paged optimizer over `pool` (bitsandbytes' `is_paged=True`).
    pub fn paged(config: AdamConfig, pool: Pool) -> Result<Self, Error> {
        Adam::with_storage(config, PagedStorage::new(pool))
    }
}
