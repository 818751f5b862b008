//! The pool: size classes, the free lists, the budget, the statistics, and the typed buffer.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytemuck::{Pod, Zeroable};

use crate::error::PoolError;

/// Alignment of every block, in bytes (the alignment `cudaMalloc` guarantees).
pub const BLOCK_ALIGN: usize = 256;

/// The smallest size class, in bytes. A request of 1 byte still holds one 256-byte block.
pub const MIN_BLOCK_BYTES: usize = 256;

/// The power-of-two size class a request of `bytes` bytes is carved from:
/// `max(256, bytes.next_power_of_two())`, or `None` when that overflows `usize`.
///
/// ```
/// use qlora_paged_alloc::size_class;
/// assert_eq!(size_class(0), Some(256));
/// assert_eq!(size_class(257), Some(512));
/// assert_eq!(size_class(4096), Some(4096));
/// assert_eq!(size_class(usize::MAX), None);
/// ```
pub fn size_class(bytes: usize) -> Option<usize> {
    bytes.max(MIN_BLOCK_BYTES).checked_next_power_of_two()
}

/// Which memory a pool carves its blocks from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// Ordinary host memory. Prefetch and advice hints are accepted and counted but move nothing.
    Host,
    /// CUDA managed memory (`cuMemAllocManaged(CU_MEM_ATTACH_HOST)`) on the device with this
    /// ordinal. Needs the `cuda` feature and a CUDA driver at run time.
    #[cfg(feature = "cuda")]
    Cuda {
        /// Device ordinal (0 for the first GPU).
        ordinal: usize,
    },
}

/// How to build a [`Pool`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Where blocks come from.
    pub backend: Backend,
    /// Most bytes the pool may hold from its backend at once (live and cached blocks together).
    pub budget_bytes: usize,
}

impl PoolConfig {
    /// A host-memory pool with the given budget.
    pub fn host(budget_bytes: usize) -> Self {
        Self {
            backend: Backend::Host,
            budget_bytes,
        }
    }

    /// A CUDA managed-memory pool on device `ordinal` with the given budget.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize, budget_bytes: usize) -> Self {
        Self {
            backend: Backend::Cuda { ordinal },
            budget_bytes,
        }
    }
}

/// Where a prefetch to the device is ordered.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Stream {
    /// The device's default stream (what bitsandbytes uses: stream 0). The only stream a host
    /// pool accepts.
    #[default]
    Default,
    /// A cudarc stream of the pool's device.
    #[cfg(feature = "cuda")]
    Cuda(Arc<cudarc::driver::CudaStream>),
}

/// A placement hint for the driver (`cuMemAdvise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Advice {
    /// Prefer keeping the pages in device memory (`CU_MEM_ADVISE_SET_PREFERRED_LOCATION`, device).
    PreferDevice,
    /// Prefer keeping the pages in host memory (`CU_MEM_ADVISE_SET_PREFERRED_LOCATION`, host).
    PreferHost,
    /// Map the pages into the device's page tables so it can read them without a fault
    /// (`CU_MEM_ADVISE_SET_ACCESSED_BY`, device).
    AccessedByDevice,
}

/// A snapshot of a pool's bookkeeping. All byte counts are exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// The budget the pool was configured with.
    pub budget_bytes: usize,
    /// Bytes asked for by live buffers (`Σ len * size_of::<T>()`).
    pub bytes_allocated: usize,
    /// Bytes held by live buffers, i.e. the sum of their size classes.
    pub bytes_in_use: usize,
    /// Bytes held from the backend: live blocks plus cached (freed, reusable) blocks.
    pub bytes_reserved: usize,
    /// Bytes of reserved blocks whose last placement hint was "to the device".
    pub bytes_hinted_device: usize,
    /// Number of live buffers.
    pub live_buffers: usize,
    /// Number of freed blocks kept for reuse.
    pub cached_blocks: usize,
    /// Blocks obtained from the backend so far.
    pub backend_allocations: u64,
    /// Blocks handed back to the backend so far (to make room under the budget).
    pub backend_releases: u64,
    /// Requests served by reusing a cached block.
    pub reuses: u64,
    /// Prefetches to the device issued (counted but inert on the host backend).
    pub prefetches_to_device: u64,
    /// Prefetches to the host issued.
    pub prefetches_to_host: u64,
    /// Advice calls issued.
    pub advice_calls: u64,
    /// Hints not issued because the device lacks concurrent managed access (CUDA backend only;
    /// bitsandbytes skips its prefetch in the same case).
    pub hints_skipped: u64,
}

/// Host memory unit: 256 bytes at 256-byte alignment, so a `Box<[Chunk]>` is a correctly aligned
/// block with no `unsafe` needed to allocate or view it.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(256))]
pub(crate) struct Chunk([u8; BLOCK_ALIGN]);

/// The memory behind one block.
pub(crate) enum Storage {
    Host(Box<[Chunk]>),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::UnifiedSlice<u8>),
}

/// One power-of-two block, live (inside a [`PagedBuf`]) or cached in the pool.
pub(crate) struct Block {
    pub(crate) storage: Storage,
    /// Start address (host-visible; the unified address for CUDA).
    pub(crate) address: usize,
    pub(crate) class: usize,
    pub(crate) on_device: bool,
}

pub(crate) enum BackendImpl {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaBackend),
}

struct State {
    /// Cached blocks by size class.
    free: BTreeMap<usize, Vec<Block>>,
    stats: PoolStats,
}

pub(crate) struct Shared {
    pub(crate) backend: BackendImpl,
    budget: usize,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the counters half-updated in a way that
        // matters more than losing the pool, so keep going with the inner value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pool of paged memory. Cheap to clone (an `Arc`); buffers keep their pool alive.
///
/// Blocks are power-of-two size classes of at least [`MIN_BLOCK_BYTES`]. A freed block is cached
/// and handed to the next request of the same class; when a new block would push the reserved
/// bytes past the budget, cached blocks are released to the backend first (largest first).
///
/// Memory overhead: a buffer of `b` bytes holds `size_class(b) < 2·b + 256` bytes, plus
/// `size_of::<PagedBuf<T>>()` (56 bytes on 64-bit targets, host backend) of handle. Cached blocks
/// count against the budget until released. The CUDA backend also holds one `cudarc`
/// `UnifiedSlice` (an `Arc` to its stream and one CUDA event) per block.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();

impl Pool {
    /// Builds a pool.
    ///
    /// # Errors
    /// [`PoolError::InvalidConfig`] for a zero budget; on the CUDA backend, driver errors
    /// ([`PoolError::DriverUnavailable`], [`PoolError::DriverTooOld`],
    /// [`PoolError::ManagedMemoryUnsupported`], `PoolError::Driver` (feature `cuda`)).
    pub fn new(config: PoolConfig) -> Result<Self, PoolError> {
        if config.budget_bytes == 0 {
            return Err(PoolError::InvalidConfig {
                reason: "budget_bytes must be positive",
            });
        }
        let backend = match config.backend {
            Backend::Host => BackendImpl::Host,
            #[cfg(feature = "cuda")]
            Backend::Cuda { ordinal } => BackendImpl::Cuda(crate::cuda::CudaBackend::new(ordinal)?),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                backend,
                budget: config.budget_bytes,
                state: Mutex::new(State {
                    free: BTreeMap::new(),
                    stats: PoolStats {
                        budget_bytes: config.budget_bytes,
                        ..PoolStats::default()
                    },
                }),
            }),
        })
    }

    /// Creates the process-wide pool. The crate's `links` key guarantees there is one such pool
    /// per binary even when two crates of the dependency graph ask for it.
    ///
    /// # Errors
    /// [`PoolError::GlobalAlreadyInitialized`] if it exists already, or any error of [`Pool::new`].
    pub fn init_global(config: PoolConfig) -> Result<&'static Pool, PoolError> {
        // Serialise initialisers so a failed `Pool::new` leaves the slot empty for a retry.
        static INIT: Mutex<()> = Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if GLOBAL.get().is_some() {
            return Err(PoolError::GlobalAlreadyInitialized);
        }
        let pool = Pool::new(config)?;
        Ok(GLOBAL.get_or_init(|| pool))
    }

    /// The process-wide pool, if [`Pool::init_global`] has created it.
    pub fn global() -> Option<&'static Pool> {
        GLOBAL.get()
    }

    /// The backend this pool carves from.
    pub fn backend(&self) -> Backend {
        match &self.shared.backend {
            BackendImpl::Host => Backend::Host,
            #[cfg(feature = "cuda")]
            BackendImpl::Cuda(cuda) => Backend::Cuda {
                ordinal: cuda.ordinal(),
            },
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats
    }

    /// Carves a zero-filled buffer of `len` elements of `T`.
    ///
    /// # Errors
    /// [`PoolError::ZeroSizedType`], [`PoolError::UnsupportedAlignment`],
    /// [`PoolError::TooLarge`], [`PoolError::BudgetExceeded`], and on the CUDA backend
    /// [`PoolError::DeviceMemory`] or `PoolError::Driver` (feature `cuda`).
    ///
    /// ```
    /// use qlora_paged_alloc::{Pool, PoolConfig};
    /// let pool = Pool::new(PoolConfig::host(1 << 20))?;
    /// let mut state = pool.alloc::<f32>(1000)?;
    /// state.as_mut_slice()?[0] = 1.5;
    /// assert_eq!(state.as_slice()?[..2], [1.5, 0.0]);
    /// assert_eq!(pool.stats().bytes_in_use, 4096);
    /// # Ok::<(), qlora_paged_alloc::PoolError>(())
    /// ```
    pub fn alloc<T: Pod>(&self, len: usize) -> Result<PagedBuf<T>, PoolError> {
        let elem_bytes = std::mem::size_of::<T>();
        if elem_bytes == 0 {
            return Err(PoolError::ZeroSizedType);
        }
        if std::mem::align_of::<T>() > BLOCK_ALIGN {
            return Err(PoolError::UnsupportedAlignment {
                align: std::mem::align_of::<T>(),
                block_align: BLOCK_ALIGN,
            });
        }
        let too_large = PoolError::TooLarge { len, elem_bytes };
        let bytes = len.checked_mul(elem_bytes).ok_or(too_large)?;
        let class = size_class(bytes).ok_or(PoolError::TooLarge { len, elem_bytes })?;

        let shared = &self.shared;
        let mut state = shared.lock();
        let in_use = state.stats.bytes_in_use;
        if class > shared.budget.saturating_sub(in_use) {
            return Err(PoolError::BudgetExceeded {
                requested: bytes,
                class,
                in_use,
                budget: shared.budget,
            });
        }

        let reused = state.free.get_mut(&class).and_then(Vec::pop);
        let mut block = match reused {
            Some(block) => {
                state.stats.cached_blocks -= 1;
                state.stats.reuses += 1;
                block
            }
            None => {
                // Make room: release cached blocks, largest first, until the new block fits.
                while state.stats.bytes_reserved + class > shared.budget {
                    let Some((&largest, _)) = state.free.iter().next_back() else {
                        break;
                    };
                    let list = state.free.get_mut(&largest).expect("key just seen");
                    let released = list.pop().expect("empty lists are removed");
                    if list.is_empty() {
                        state.free.remove(&largest);
                    }
                    release(&mut state.stats, &released);
                    drop(released);
                }
                let (storage, address) = match &shared.backend {
                    BackendImpl::Host => {
                        let chunks = vec![Chunk::zeroed(); class / BLOCK_ALIGN].into_boxed_slice();
                        let address = chunks.as_ptr() as usize;
                        (Storage::Host(chunks), address)
                    }
                    #[cfg(feature = "cuda")]
                    BackendImpl::Cuda(cuda) => {
                        let (slice, address) = cuda.allocate(class)?;
                        (Storage::Cuda(slice), address)
                    }
                };
                state.stats.backend_allocations += 1;
                state.stats.bytes_reserved += class;
                Block {
                    storage,
                    address,
                    class,
                    on_device: false,
                }
            }
        };
        if state.free.get(&class).is_some_and(Vec::is_empty) {
            state.free.remove(&class);
        }
        state.stats.bytes_in_use += class;
        state.stats.bytes_allocated += bytes;
        state.stats.live_buffers += 1;
        drop(state);

        // Reused blocks hold the previous owner's bytes; hand out zeros like a fresh block.
        zero_prefix(&shared.backend, &mut block, bytes)?;
        Ok(PagedBuf {
            block: Some(block),
            len,
            shared: Arc::clone(shared),
            marker: PhantomData,
        })
    }

    /// Hands every cached block back to the backend; returns the bytes released.
    pub fn trim(&self) -> usize {
        let mut state = self.shared.lock();
        let free = std::mem::take(&mut state.free);
        let mut released_bytes = 0;
        for block in free.into_values().flatten() {
            released_bytes += block.class;
            release(&mut state.stats, &block);
        }
        released_bytes
    }
}

fn release(stats: &mut PoolStats, block: &Block) {
    stats.bytes_reserved -= block.class;
    stats.cached_blocks -= 1;
    stats.backend_releases += 1;
    if block.on_device {
        stats.bytes_hinted_device -= block.class;
    }
}

fn zero_prefix(backend: &BackendImpl, block: &mut Block, bytes: usize) -> Result<(), PoolError> {
    match (&mut block.storage, backend) {
        (Storage::Host(chunks), _) => {
            bytemuck::cast_slice_mut::<Chunk, u8>(chunks)[..bytes].fill(0);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(slice), BackendImpl::Cuda(cuda)) => cuda.zero(slice, bytes),
        #[cfg(feature = "cuda")]
        (Storage::Cuda(_), BackendImpl::Host) => {
            unreachable!("a host pool never holds CUDA blocks")
        }
    }
}

/// A typed buffer carved from a [`Pool`]: `len` elements of `T`, zero-filled at allocation,
/// readable and writable from the host, and returned to the pool's cache when dropped.
pub struct PagedBuf<T: Pod> {
    block: Option<Block>,
    len: usize,
    shared: Arc<Shared>,
    marker: PhantomData<T>,
}

impl<T: Pod> std::fmt::Debug for PagedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedBuf")
            .field("len", &self.len)
            .field("capacity_bytes", &self.capacity_bytes())
            .field("address", &format_args!("{:#x}", self.address()))
            .field("hinted_on_device", &self.is_hinted_on_device())
            .finish()
    }
}

impl<T: Pod> PagedBuf<T> {
    fn block(&self) -> &Block {
        self.block.as_ref().expect("present until drop")
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the underlying block (the size class).
    pub fn capacity_bytes(&self) -> usize {
        self.block().class
    }

    /// Start address of the block (host-visible; for CUDA the unified address). Useful to check
    /// that live buffers never overlap.
    pub fn address(&self) -> usize {
        self.block().address
    }

    /// Whether the last placement hint for this buffer sent it to the device.
    pub fn is_hinted_on_device(&self) -> bool {
        self.block().on_device
    }

    /// The elements, after any device work on this buffer has finished.
    ///
    /// # Errors
    /// `PoolError::Driver` (feature `cuda`) if waiting for pending device work fails (CUDA backend).
    pub fn as_slice(&self) -> Result<&[T], PoolError> {
        let bytes = self.len * std::mem::size_of::<T>();
        let raw: &[u8] = match &self.block().storage {
            Storage::Host(chunks) => bytemuck::cast_slice(chunks),
            #[cfg(feature = "cuda")]
            Storage::Cuda(slice) => slice.as_slice()?,
        };
        Ok(bytemuck::cast_slice(&raw[..bytes]))
    }

    /// The elements, mutably, after any device work on this buffer has finished.
    ///
    /// # Errors
    /// `PoolError::Driver` (feature `cuda`) if waiting for pending device work fails (CUDA backend).
    pub fn as_mut_slice(&mut self) -> Result<&mut [T], PoolError> {
        let bytes = self.len * std::mem::size_of::<T>();
        let block = self.block.as_mut().expect("present until drop");
        let raw: &mut [u8] = match &mut block.storage {
            Storage::Host(chunks) => bytemuck::cast_slice_mut(chunks),
            #[cfg(feature = "cuda")]
            Storage::Cuda(slice) => slice.as_mut_slice()?,
        };
        Ok(bytemuck::cast_slice_mut(&mut raw[..bytes]))
    }

    /// Asks for the buffer's pages to move to the device, ordered on `stream`
    /// (`cuMemPrefetchAsync`). Host backend: counted, nothing moves.
    ///
    /// # Errors
    /// [`PoolError::ForeignStream`] for a CUDA stream on a host pool or another device's stream;
    /// `PoolError::Driver` (feature `cuda`) if the driver rejects the prefetch.
    pub fn prefetch_to_device(&mut self, stream: &Stream) -> Result<(), PoolError> {
        self.hint(Hint::ToDevice(stream))
    }

    /// Asks for the buffer's pages to move back to host memory. Host backend: counted only.
    ///
    /// # Errors
    /// `PoolError::Driver` (feature `cuda`) if the driver rejects the prefetch.
    pub fn prefetch_to_host(&mut self) -> Result<(), PoolError> {
        self.hint(Hint::ToHost)
    }

    /// Gives the driver a placement hint (`cuMemAdvise`). Host backend: counted only.
    ///
    /// # Errors
    /// `PoolError::Driver` (feature `cuda`) if the driver rejects the advice.
    pub fn advise(&mut self, advice: Advice) -> Result<(), PoolError> {
        self.hint(Hint::Advise(advice))
    }

    /// The unified-memory slice behind this buffer (CUDA backend), to pass to a kernel launch.
    /// cudarc records an event when it is used on a stream, and [`PagedBuf::as_slice`] waits for
    /// it, so host reads never race the kernel. `None` on the host backend.
    #[cfg(feature = "cuda")]
    pub fn unified(&self) -> Option<&cudarc::driver::UnifiedSlice<u8>> {
        match &self.block().storage {
            Storage::Cuda(slice) => Some(slice),
            Storage::Host(_) => None,
        }
    }

    /// Mutable access to the unified-memory slice (CUDA backend), for kernels that write it.
    #[cfg(feature = "cuda")]
    pub fn unified_mut(&mut self) -> Option<&mut cudarc::driver::UnifiedSlice<u8>> {
        match &mut self.block.as_mut().expect("present until drop").storage {
            Storage::Cuda(slice) => Some(slice),
            Storage::Host(_) => None,
        }
    }

    fn hint(&mut self, hint: Hint<'_>) -> Result<(), PoolError> {
        let block = self.block.as_mut().expect("present until drop");
        let outcome = match (&self.shared.backend, &mut block.storage) {
            (BackendImpl::Host, Storage::Host(_)) => match hint {
                Hint::ToDevice(Stream::Default) | Hint::ToHost | Hint::Advise(_) => {
                    HintOutcome::Issued
                }
                #[cfg(feature = "cuda")]
                Hint::ToDevice(Stream::Cuda(_)) => return Err(PoolError::ForeignStream),
            },
            #[cfg(feature = "cuda")]
            (BackendImpl::Cuda(cuda), Storage::Cuda(slice)) => {
                cuda.hint(slice, block.class, &hint)?
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("a pool only holds blocks of its own backend"),
        };
        let mut state = self.shared.lock();
        let stats = &mut state.stats;
        match outcome {
            HintOutcome::Skipped => stats.hints_skipped += 1,
            HintOutcome::Issued => match hint {
                Hint::ToDevice(_) => {
                    stats.prefetches_to_device += 1;
                    if !block.on_device {
                        block.on_device = true;
                        stats.bytes_hinted_device += block.class;
                    }
                }
                Hint::ToHost => {
                    stats.prefetches_to_host += 1;
                    if block.on_device {
                        block.on_device = false;
                        stats.bytes_hinted_device -= block.class;
                    }
                }
                Hint::Advise(_) => stats.advice_calls += 1,
            },
        }
        Ok(())
    }
}

pub(crate) enum Hint<'a> {
    ToDevice(&'a Stream),
    ToHost,
    Advise(#[cfg_attr(not(feature = "cuda"), allow(dead_code))] Advice),
}

pub(crate) enum HintOutcome {
    Issued,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Skipped,
}

impl<T: Pod> Drop for PagedBuf<T> {
    fn drop(&mut self) {
        let Some(block) = self.block.take() else {
            return;
        };
        let bytes = self.len * std::mem::size_of::<T>();
        let mut state = self.shared.lock();
        state.stats.bytes_in_use -= block.class;
        state.stats.bytes_allocated -= bytes;
        state.stats.live_buffers -= 1;
        state.stats.cached_blocks += 1;
        state.free.entry(block.class).or_default().push(block);
    }
}
