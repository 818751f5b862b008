//! The CUDA backend: managed memory attached to the host (`cuMemAllocManaged(CU_MEM_ATTACH_HOST)`,
//! exactly what bitsandbytes' `cget_managed_ptr` does), prefetches with `cuMemPrefetchAsync_v2`
//! and advice with `cuMemAdvise_v2`, both only where the device reports concurrent managed access.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream, DevicePtr, DevicePtrMut, UnifiedSlice};

use crate::error::PoolError;
use crate::pool::{Advice, Hint, HintOutcome, Stream};

/// Oldest driver with the `_v2` prefetch/advise entry points (CUDA 12.2).
const MIN_DRIVER_VERSION: i32 = 12020;

pub(crate) struct CudaBackend {
    ctx: Arc<CudaContext>,
    concurrent_managed_access: bool,
}

impl CudaBackend {
    pub(crate) fn new(ordinal: usize) -> Result<Self, PoolError> {
        // SAFETY: `is_culib_present` only attempts to dlopen the driver library by its usual
        // names and drops the handle; it calls no CUDA function.
        #[cfg(not(feature = "dynamic-linking"))]
        if !unsafe { sys::is_culib_present() } {
            return Err(PoolError::DriverUnavailable);
        }
        // With `dynamic-linking` the driver library is a link-time dependency: present.
        result::init()?;
        let mut version = 0;
        // SAFETY: the driver library is loaded (checked above) and `version` is a valid out
        // pointer for the duration of the call.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
        if version < MIN_DRIVER_VERSION {
            return Err(PoolError::DriverTooOld {
                found: version,
                required: MIN_DRIVER_VERSION,
            });
        }
        let ctx = CudaContext::new(ordinal)?;
        if ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY)? == 0 {
            return Err(PoolError::ManagedMemoryUnsupported { ordinal });
        }
        let concurrent_managed_access = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)?
            != 0;
        Ok(Self {
            ctx,
            concurrent_managed_access,
        })
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// A new block of `class` bytes and its unified address.
    pub(crate) fn allocate(&self, class: usize) -> Result<(UnifiedSlice<u8>, usize), PoolError> {
        let (free, _total) = self.ctx.mem_get_info()?;
        if class > free {
            return Err(PoolError::DeviceMemory { class, free });
        }
        // SAFETY: `u8` is valid for every bit pattern, so uninitialised managed memory is a
        // valid `[u8]`; the pool zero-fills the part it hands out before anyone reads it.
        let slice = unsafe { self.ctx.alloc_unified::<u8>(class, false) }?;
        // Host-attached managed memory is host-accessible at the same (unified) address.
        let address = slice.as_slice()?.as_ptr() as usize;
        Ok((slice, address))
    }

    pub(crate) fn zero(&self, slice: &mut UnifiedSlice<u8>, bytes: usize) -> Result<(), PoolError> {
        slice.as_mut_slice()?[..bytes].fill(0);
        Ok(())
    }

    fn stream(&self, stream: &Stream) -> Result<Arc<CudaStream>, PoolError> {
        match stream {
            Stream::Default => Ok(self.ctx.default_stream()),
            // Same device and context handle (two `CudaContext` values may wrap one primary context).
            Stream::Cuda(s) if **s.context() == *self.ctx => Ok(Arc::clone(s)),
            Stream::Cuda(_) => Err(PoolError::ForeignStream),
        }
    }

    fn device_location(&self) -> sys::CUmemLocation {
        sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ctx.ordinal() as i32,
        }
    }

    fn host_location() -> sys::CUmemLocation {
        sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        }
    }

    pub(crate) fn hint(
        &self,
        slice: &mut UnifiedSlice<u8>,
        class: usize,
        hint: &Hint<'_>,
    ) -> Result<HintOutcome, PoolError> {
        if !self.concurrent_managed_access {
            // Without concurrent managed access the driver rejects device prefetches of
            // host-attached memory; bitsandbytes' `cprefetch` returns early in the same case.
            return Ok(HintOutcome::Skipped);
        }
        self.ctx.bind_to_thread()?;
        match hint {
            Hint::ToDevice(stream) => {
                let stream = self.stream(stream)?;
                let (ptr, _record) = slice.device_ptr_mut(&stream);
                // SAFETY: `ptr..ptr+class` is exactly the managed allocation owned by `slice`,
                // which outlives the call; the prefetch is ordered on `stream` after the slice's
                // previous uses (device_ptr_mut made the stream wait on its event) and `_record`
                // records the event after it, so host access waits for the migration.
                unsafe {
                    result::mem_prefetch_async(
                        ptr,
                        class,
                        self.device_location(),
                        stream.cu_stream(),
                    )
                }?;
            }
            Hint::ToHost => {
                let stream = self.ctx.default_stream();
                let (ptr, _record) = slice.device_ptr_mut(&stream);
                // SAFETY: as above, with the host as destination.
                unsafe {
                    result::mem_prefetch_async(
                        ptr,
                        class,
                        Self::host_location(),
                        stream.cu_stream(),
                    )
                }?;
            }
            Hint::Advise(advice) => {
                let (kind, location) = match advice {
                    Advice::PreferDevice => (
                        sys::CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                        self.device_location(),
                    ),
                    Advice::PreferHost => (
                        sys::CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                        Self::host_location(),
                    ),
                    Advice::AccessedByDevice => (
                        sys::CUmem_advise::CU_MEM_ADVISE_SET_ACCESSED_BY,
                        self.device_location(),
                    ),
                };
                let stream = self.ctx.default_stream();
                let (ptr, _record) = slice.device_ptr(&stream);
                // SAFETY: the range is exactly the managed allocation owned by `slice`; advice
                // changes placement policy only, never the contents.
                unsafe { result::mem_advise(ptr, class, kind, location) }?;
            }
        }
        Ok(HintOutcome::Issued)
    }
}
