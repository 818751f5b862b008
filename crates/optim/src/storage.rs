//! Where optimizer states live: a small trait that the host (`Vec`) and, later, paged pools
//! implement, so an optimizer can keep its `state1`/`state2` in any of them without copies.

use crate::error::Error;
use std::fmt::Debug;

/// One state tensor's memory (`state1` or `state2` of one parameter).
///
/// The optimizer borrows the slice for exactly the duration of one tensor's update; a paged
/// backend may migrate the memory between updates, which is why access can fail.
pub trait StateBuffer<T>: Send + Sync + Debug {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read access.
    fn as_slice(&self) -> Result<&[T], Error>;
    /// Write access.
    fn as_mut_slice(&mut self) -> Result<&mut [T], Error>;
    /// Make the buffer resident where the next update runs (bitsandbytes' `prefetch_state`);
    /// a no-op for host memory.
    fn prefetch(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Whether this buffer lives in a paged pool.
    fn is_paged(&self) -> bool {
        false
    }
    /// Bytes this buffer occupies (its allocation, not just `len * size_of::<T>()`).
    fn allocated_bytes(&self) -> usize;
}

impl<T: Send + Sync + Debug> StateBuffer<T> for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn as_slice(&self) -> Result<&[T], Error> {
        Ok(self)
    }
    fn as_mut_slice(&mut self) -> Result<&mut [T], Error> {
        Ok(self)
    }
    fn allocated_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<T>()
    }
}

/// An allocator of optimizer state tensors.
///
/// `param_numel` is the size of the parameter the state belongs to; a paged storage uses it to
/// keep small states (bitsandbytes: fewer than 10⁵ elements) in ordinary memory.
pub trait StateStorage: Send + Sync + Debug {
    /// Buffer type of 8-bit state codes.
    type U8: StateBuffer<u8>;
    /// Buffer type of f32 states.
    type F32: StateBuffer<f32>;
    /// A zero-filled buffer of `len` codes.
    fn alloc_u8(&self, len: usize, param_numel: usize) -> Result<Self::U8, Error>;
    /// A zero-filled buffer of `len` f32 values.
    fn alloc_f32(&self, len: usize, param_numel: usize) -> Result<Self::F32, Error>;
}

/// States in ordinary host memory (`Vec`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStorage;

impl StateStorage for HostStorage {
    type U8 = Vec<u8>;
    type F32 = Vec<f32>;
    fn alloc_u8(&self, len: usize, _param_numel: usize) -> Result<Vec<u8>, Error> {
        Ok(vec![0; len])
    }
    fn alloc_f32(&self, len: usize, _param_numel: usize) -> Result<Vec<f32>, Error> {
        Ok(vec![0.0; len])
    }
}
