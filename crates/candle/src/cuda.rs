//! The CUDA side of the layers and optimizers (feature `cuda`): `qlora-cuda`'s kernels launched
//! on candle's own stream, cuBLAS through candle's handle.
//!
//! * [`CudaWeight`]: a 4-bit weight uploaded once (codes, absmax or the double-quantized scales)
//!   and the custom op [`CudaMatmul`] that multiplies by it: `X·Wᵀ` by the fused 4-bit GEMV for
//!   at most [`GEMV_MAX_ROWS`] rows, otherwise tile by tile (a bounded run of weight rows
//!   dequantized into a scratch tile of the input's dtype, then `cublasGemmEx` with f32
//!   accumulation); the transposed product `G·W` (the input gradient) accumulates the tiles'
//!   products in f32.
//! * [`CudaAdam`]: per-variable 8-bit (codes + absmax) or f32 states on the device — or, for the
//!   paged optimizers, `state1`/`state2` in a `qlora-paged-alloc` CUDA pool (managed memory) —
//!   updated in place by `qlora-cuda`'s fused AdamW kernels.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::DeviceId;
use candle_core::{CudaDevice, CudaStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Tensor};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{
    sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop, UnifiedSlice,
};
use qlora_codec::{Absmax, QuantizedTensor};
use qlora_cuda::{Adam8bitState, AdamParams, DynamicMaps, Element, Scales};
use qlora_double_quant::DynamicMap;
use qlora_optim::{ParamState, StateKind, StateTensors, TensorData, PAGED_MIN_NUMEL};
use qlora_paged_alloc::{PagedBuf, Pool, Stream};
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};

/// Most rows the forward pass sends through the fused 4-bit GEMV instead of a tile and cuBLAS.
pub(crate) const GEMV_MAX_ROWS: usize = 4;

/// Elements of the dequantized scratch tile (32 Mi: 64 MiB in bf16/f16, 128 MiB in f32). The
/// tile holds whole weight rows and starts on a scale-block boundary, so it may be rounded up
/// to that granularity (see [`CudaWeight::rows_per_tile`]).
pub(crate) const TILE_ELEMENTS: usize = 1 << 25;

fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda(e.to_string())
}

/// `qlora-cuda`'s kernels loaded into the context of a candle device and launched on its stream:
/// loaded once per candle device (PTX compiled once per process by `qlora-cuda`).
pub(crate) fn kernels(dev: &CudaDevice) -> Result<Arc<qlora_cuda::Device>> {
    type Cache = Mutex<HashMap<DeviceId, Arc<qlora_cuda::Device>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(k) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&dev.id())
    {
        return Ok(Arc::clone(k));
    }
    let k = Arc::new(qlora_cuda::Device::with_stream(dev.cuda_stream())?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(dev.id())
        .or_insert_with(|| Arc::clone(&k));
    Ok(k)
}

/// The scales of a weight on the device.
enum DeviceScales {
    Absmax(CudaSlice<f32>),
    Double {
        qabsmax: CudaSlice<u8>,
        nested_absmax: CudaSlice<f32>,
        nested_code: CudaSlice<f32>,
        offset: f32,
    },
}

/// A 4-bit weight `[out, in]` resident on one CUDA device.
pub(crate) struct CudaWeight {
    device: CudaDevice,
    kernels: Arc<qlora_cuda::Device>,
    packed: CudaSlice<u8>,
    scales: DeviceScales,
    quant_type: qlora_cuda::QuantType,
    blocksize: usize,
    out_features: usize,
    in_features: usize,
}

impl std::fmt::Debug for CudaWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaWeight")
            .field("device", &self.device)
            .field("shape", &(self.out_features, self.in_features))
            .field("quant_type", &self.quant_type)
            .field("blocksize", &self.blocksize)
            .field(
                "double_quant",
                &matches!(self.scales, DeviceScales::Double { .. }),
            )
            .finish()
    }
}

fn fits_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("{what} = {v} does not fit cuBLAS' int")))
}

impl CudaWeight {
    /// Upload a 2-D 4-bit weight (codes and scales; nothing is dequantized).
    pub(crate) fn upload(q: &QuantizedTensor, device: &CudaDevice) -> Result<Self> {
        let &[out_features, in_features] = q.shape() else {
            return Err(Error::Shape {
                what: "4-bit weight (must be 2-D [out, in])".into(),
                expected: vec![0, 0],
                found: q.shape().to_vec(),
            });
        };
        fits_i32("out_features", out_features)?;
        fits_i32("in_features", in_features)?;
        let kernels = kernels(device)?;
        let stream = device.cuda_stream();
        let packed = stream.clone_htod(q.packed()).map_err(cuda_err)?;
        let scales = match q.absmax() {
            Absmax::F32(a) => DeviceScales::Absmax(stream.clone_htod(a).map_err(cuda_err)?),
            Absmax::Double(d) => DeviceScales::Double {
                qabsmax: stream.clone_htod(&d.codes).map_err(cuda_err)?,
                nested_absmax: stream.clone_htod(&d.nested_absmax).map_err(cuda_err)?,
                nested_code: stream
                    .clone_htod(DynamicMap::signed().values())
                    .map_err(cuda_err)?,
                offset: d.offset,
            },
        };
        let quant_type = match q.quant_type() {
            qlora_codec::QuantType::Nf4 => qlora_cuda::QuantType::Nf4,
            qlora_codec::QuantType::Fp4 => qlora_cuda::QuantType::Fp4,
        };
        Ok(CudaWeight {
            device: device.clone(),
            kernels,
            packed,
            scales,
            quant_type,
            blocksize: q.blocksize(),
            out_features,
            in_features,
        })
    }

    /// Bytes held on the device (codes and scales).
    pub(crate) fn device_bytes(&self) -> usize {
        self.packed.len()
            + match &self.scales {
                DeviceScales::Absmax(a) => 4 * a.len(),
                DeviceScales::Double {
                    qabsmax,
                    nested_absmax,
                    nested_code,
                    ..
                } => qabsmax.len() + 4 * (nested_absmax.len() + nested_code.len()),
            }
    }

    /// Elements a tile must start on: a whole byte of codes, a whole scale block, and with
    /// double quantization a whole nested block of 256 scales.
    fn tile_unit(&self) -> usize {
        match self.scales {
            DeviceScales::Absmax(_) => self.blocksize.max(2),
            DeviceScales::Double { .. } => self.blocksize.max(2) * 256,
        }
    }

    /// Rows per tile: a multiple of the rows that keep every tile start on [`Self::tile_unit`],
    /// as many as fit in [`TILE_ELEMENTS`] (at least one such multiple), at most all rows.
    pub(crate) fn rows_per_tile(&self) -> usize {
        let unit = self.tile_unit();
        let step = unit / gcd(unit, self.in_features.max(1));
        let budget_rows = TILE_ELEMENTS / self.in_features.max(1);
        let rows = (budget_rows / step).max(1) * step;
        rows.min(self.out_features).max(1)
    }

    /// The scales of the whole weight.
    fn all_scales(&self) -> Scales<'_> {
        match &self.scales {
            DeviceScales::Absmax(a) => Scales::Absmax(a),
            DeviceScales::Double {
                qabsmax,
                nested_absmax,
                nested_code,
                offset,
            } => Scales::Double {
                qabsmax,
                nested_absmax,
                nested_code,
                offset: *offset,
            },
        }
    }

    /// Dequantize weight rows `[r0, r0 + rows)` into the first `rows · in` elements of `tile`.
    fn dequantize_rows<T: Element>(
        &self,
        r0: usize,
        rows: usize,
        tile: &mut CudaSlice<T>,
    ) -> Result<()> {
        let k = self.in_features;
        let (e0, n) = (r0 * k, rows * k);
        if e0 % self.tile_unit() != 0 {
            return Err(Error::Cuda(format!(
                "tile start {e0} is not on a scale block boundary"
            )));
        }
        let packed = self
            .packed
            .try_slice(e0 / 2..e0 / 2 + n.div_ceil(2))
            .ok_or_else(|| Error::Cuda("tile outside the weight's codes".into()))?;
        let mut out = tile
            .try_slice_mut(0..n)
            .ok_or_else(|| Error::Cuda("tile buffer too small".into()))?;
        let scales = OwnedScales::new(self, e0, n)?;
        self.kernels.dequantize_4bit(
            &packed,
            scales.get(),
            self.quant_type,
            self.blocksize,
            &mut out,
        )?;
        Ok(())
    }
}

/// Views of the scales of one tile, kept alive for a launch.
enum OwnedScales<'a> {
    Absmax(cudarc::driver::CudaView<'a, f32>),
    Double {
        qabsmax: cudarc::driver::CudaView<'a, u8>,
        nested_absmax: cudarc::driver::CudaView<'a, f32>,
        nested_code: &'a CudaSlice<f32>,
        offset: f32,
    },
}

impl<'a> OwnedScales<'a> {
    /// The scales of weight elements `[e0, e0 + n)`, `e0` on a tile unit.
    fn new(w: &'a CudaWeight, e0: usize, n: usize) -> Result<Self> {
        let bs = w.blocksize;
        let (b0, nb) = (e0 / bs, n.div_ceil(bs));
        let out_of_range = || Error::Cuda("tile outside the weight's scales".into());
        Ok(match &w.scales {
            DeviceScales::Absmax(a) => {
                OwnedScales::Absmax(a.try_slice(b0..b0 + nb).ok_or_else(out_of_range)?)
            }
            DeviceScales::Double {
                qabsmax,
                nested_absmax,
                nested_code,
                offset,
            } => {
                let (n0, nn) = (b0 / 256, nb.div_ceil(256));
                OwnedScales::Double {
                    qabsmax: qabsmax.try_slice(b0..b0 + nb).ok_or_else(out_of_range)?,
                    nested_absmax: nested_absmax
                        .try_slice(n0..n0 + nn)
                        .ok_or_else(out_of_range)?,
                    nested_code,
                    offset: *offset,
                }
            }
        })
    }

    fn get(&self) -> Scales<'_> {
        match self {
            OwnedScales::Absmax(a) => Scales::Absmax(a),
            OwnedScales::Double {
                qabsmax,
                nested_absmax,
                nested_code,
                offset,
            } => Scales::Double {
                qabsmax,
                nested_absmax,
                nested_code: *nested_code,
                offset: *offset,
            },
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// An element type of the CUDA path: the kernels' `Element`, candle's storage, cuBLAS' type.
pub(crate) trait GpuFloat: Element + candle_core::cuda_backend::CudaDType {
    const BLAS: blas_sys::cudaDataType;
    const DTYPE: DType;
}
impl GpuFloat for f32 {
    const BLAS: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
    const DTYPE: DType = DType::F32;
}
impl GpuFloat for half::f16 {
    const BLAS: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16F;
    const DTYPE: DType = DType::F16;
}
impl GpuFloat for half::bf16 {
    const BLAS: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
    const DTYPE: DType = DType::BF16;
}

/// One `cublasGemmEx` in column-major terms, f32 compute and scalars, on candle's handle (bound
/// to candle's stream).
struct Gemm {
    transa: bool,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
    beta: f32,
}

impl Gemm {
    /// `C = op(A)·B + beta·C` with `A`, `B` of type `ab` and `C` of type `c`.
    ///
    /// # Safety
    /// `a`, `b`, `c` must be device pointers of the handle's context whose allocations hold the
    /// elements the column-major shapes and leading dimensions address, and stay valid until the
    /// stream has run the product.
    unsafe fn run(
        &self,
        device: &CudaDevice,
        ab: blas_sys::cudaDataType,
        a: sys::CUdeviceptr,
        b: sys::CUdeviceptr,
        c_type: blas_sys::cudaDataType,
        c: sys::CUdeviceptr,
    ) -> Result<()> {
        let blas = device.cublas_handle();
        let alpha = 1.0f32;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // SAFETY: the caller guarantees the pointers and shapes (this function's contract);
        // alpha and beta are host f32 scalars matching CUBLAS_COMPUTE_32F and outlive the call,
        // which only enqueues the product on the handle's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                op(self.transa),
                op(false),
                self.m,
                self.n,
                self.k,
                (&alpha as *const f32).cast(),
                a as *const std::ffi::c_void,
                ab,
                self.lda,
                b as *const std::ffi::c_void,
                ab,
                self.ldb,
                (&self.beta as *const f32).cast(),
                c as *mut std::ffi::c_void,
                c_type,
                self.ldc,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda_err)
    }
}

/// The candle custom op `Y = X·Wᵀ` (or, transposed, `dX = G·W`) over a weight on the device,
/// for a contiguous 2-D input in f32, bf16 or f16 (the output has the input's dtype). Each op's
/// backward is the other one.
#[derive(Debug, Clone)]
pub(crate) struct CudaMatmul {
    pub(crate) weight: Arc<CudaWeight>,
    pub(crate) transposed: bool,
}

impl CudaMatmul {
    fn run<T: GpuFloat>(
        &self,
        storage: &CudaStorage,
        start: usize,
        n: usize,
    ) -> candle_core::Result<CudaStorage> {
        let w = &self.weight;
        let (out_f, in_f) = (w.out_features, w.in_features);
        let dev = &w.device;
        let stream = dev.cuda_stream();
        let k_in = if self.transposed { out_f } else { in_f };
        let x_all = storage.as_cuda_slice::<T>()?;
        let x = x_all
            .try_slice(start..start + n * k_in)
            .ok_or_else(|| Error::Cuda("input view outside its storage".into()))?;
        if n == 0 {
            let y = dev.alloc_zeros::<T>(0)?;
            return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
        }
        if !self.transposed && n <= GEMV_MAX_ROWS {
            let mut y = dev.alloc_zeros::<T>(n * out_f)?;
            w.kernels
                .gemv_4bit(
                    &x,
                    n,
                    &w.packed,
                    w.all_scales(),
                    w.quant_type,
                    w.blocksize,
                    (out_f, in_f),
                    &mut y,
                )
                .map_err(Error::from)?;
            return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
        }
        let n_i = fits_i32("rows", n)?;
        let in_i = fits_i32("in_features", in_f)?;
        let out_i = fits_i32("out_features", out_f)?;
        let rows_per_tile = w.rows_per_tile();
        let mut tile = dev.alloc_zeros::<T>(rows_per_tile * in_f)?;
        let elem = std::mem::size_of::<T>() as u64;
        if self.transposed {
            // dX[n, in] = Σ_tiles G[:, r0..r1] · W[r0..r1, :], accumulated in f32.
            let mut acc = dev.alloc_zeros::<f32>(n * in_f)?;
            let mut r0 = 0;
            while r0 < out_f {
                let rows = rows_per_tile.min(out_f - r0);
                w.dequantize_rows(r0, rows, &mut tile)?;
                let (t_ptr, _t) = tile.device_ptr(&stream);
                let (g_ptr, _g) = x.device_ptr(&stream);
                let (c_ptr, _c) = acc.device_ptr_mut(&stream);
                let gemm = Gemm {
                    transa: false,
                    m: in_i,
                    n: n_i,
                    k: fits_i32("tile rows", rows)?,
                    lda: in_i,
                    ldb: out_i,
                    ldc: in_i,
                    beta: 1.0,
                };
                // SAFETY: column-major A = tile (in × rows, ld in: the first rows·in elements
                // just dequantized), B = G from column r0 (rows × n, ld out: G holds n·out
                // elements and r0 + rows ≤ out), C = acc (in × n, ld in, n·in elements); all
                // on candle's context, guards held until after the enqueue.
                unsafe {
                    gemm.run(
                        dev,
                        T::BLAS,
                        t_ptr,
                        g_ptr + r0 as u64 * elem,
                        blas_sys::cudaDataType::CUDA_R_32F,
                        c_ptr,
                    )?;
                }
                r0 += rows;
            }
            let acc = CudaStorage::wrap_cuda_slice(acc, dev.clone());
            if T::DTYPE == DType::F32 {
                Ok(acc)
            } else {
                acc.to_dtype(&Layout::contiguous((n, in_f)), T::DTYPE)
            }
        } else {
            // Y[:, r0..r1] = X · W[r0..r1, :]ᵀ, each output column block written once.
            let mut y = dev.alloc_zeros::<T>(n * out_f)?;
            let mut r0 = 0;
            while r0 < out_f {
                let rows = rows_per_tile.min(out_f - r0);
                w.dequantize_rows(r0, rows, &mut tile)?;
                let (t_ptr, _t) = tile.device_ptr(&stream);
                let (x_ptr, _x) = x.device_ptr(&stream);
                let (y_ptr, _y) = y.device_ptr_mut(&stream);
                let gemm = Gemm {
                    transa: true,
                    m: fits_i32("tile rows", rows)?,
                    n: n_i,
                    k: in_i,
                    lda: in_i,
                    ldb: in_i,
                    ldc: out_i,
                    beta: 0.0,
                };
                // SAFETY: column-major op(A) = tileᵀ (rows × in, A stored in × rows with ld
                // in), B = X (in × n, ld in, n·in elements), C = Y from row r0 (rows × n, ld
                // out: Y holds n·out elements and r0 + rows ≤ out); same context, guards held.
                unsafe {
                    gemm.run(
                        dev,
                        T::BLAS,
                        t_ptr,
                        x_ptr,
                        T::BLAS,
                        y_ptr + r0 as u64 * elem,
                    )?;
                }
                r0 += rows;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
    }
}

impl CustomOp1 for CudaMatmul {
    fn name(&self) -> &'static str {
        if self.transposed {
            "qlora-cuda-g-w"
        } else {
            "qlora-cuda-x-wt"
        }
    }

    fn cpu_fwd(
        &self,
        _storage: &candle_core::CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        Err(Error::Device {
            what: format!("{} input", self.name()),
            expected: "cuda".into(),
            found: "cpu".into(),
        }
        .into())
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let w = &self.weight;
        let (n, rows_out) = crate::linear4bit::matmul_dims(
            self.name(),
            layout.dims(),
            self.transposed,
            w.in_features,
            w.out_features,
        )?;
        if storage.device.id() != w.device.id() {
            return Err(Error::Device {
                what: format!("{} input", self.name()),
                expected: format!("the weight's cuda device ({:?})", w.device.id()),
                found: format!("cuda device {:?}", storage.device.id()),
            }
            .into());
        }
        let Some((start, _)) = layout.contiguous_offsets() else {
            return Err(Error::Cuda(format!("{} input is not contiguous", self.name())).into());
        };
        let out = match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, start, n)?,
            DType::BF16 => self.run::<half::bf16>(storage, start, n)?,
            DType::F16 => self.run::<half::f16>(storage, start, n)?,
            found => {
                return Err(Error::Dtype {
                    what: format!("{} input", self.name()),
                    expected: "f32, bf16 or f16".into(),
                    found,
                }
                .into())
            }
        };
        Ok((out, Shape::from((n, rows_out))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let other = CudaMatmul {
            weight: Arc::clone(&self.weight),
            transposed: !self.transposed,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(other)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizer states on the device.
// ---------------------------------------------------------------------------------------------

/// A typed view of the first `len` elements of a managed-memory block (`qlora-paged-alloc`
/// hands out its blocks as byte slices), for the launchers' length checks and pointers.
struct Managed<'a, T> {
    bytes: &'a mut UnifiedSlice<u8>,
    len: usize,
    marker: PhantomData<T>,
}

impl<'a, T> Managed<'a, T> {
    fn new(bytes: &'a mut UnifiedSlice<u8>, len: usize) -> Result<Self> {
        let need = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::Cuda("paged state too large".into()))?;
        if DeviceSlice::<u8>::len(bytes) < need {
            return Err(Error::Cuda(format!(
                "paged block of {} bytes is smaller than the {need} bytes of its state",
                DeviceSlice::<u8>::len(bytes)
            )));
        }
        Ok(Managed {
            bytes,
            len,
            marker: PhantomData,
        })
    }
}

impl<T> DeviceSlice<T> for Managed<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        DeviceSlice::<u8>::stream(&*self.bytes)
    }
}

impl<T> DevicePtr<T> for Managed<'_, T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        DevicePtr::<u8>::device_ptr(&*self.bytes, stream)
    }
}

impl<T> DevicePtrMut<T> for Managed<'_, T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        DevicePtrMut::<u8>::device_ptr_mut(&mut *self.bytes, stream)
    }
}

/// One state tensor: device memory, or a block of a CUDA paged pool.
enum StateMem<T: bytemuck::Pod> {
    Device(CudaSlice<T>),
    Paged(PagedBuf<T>),
}

impl<T> StateMem<T>
where
    T: bytemuck::Pod + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    fn zeros(dev: &CudaDevice, pool: Option<&Pool>, len: usize) -> Result<Self> {
        match pool {
            Some(pool) => {
                let buf = pool.alloc::<T>(len)?;
                if buf.unified().is_none() {
                    return Err(Error::Optimizer(
                        "the paged pool of a CUDA optimizer must be a CUDA pool \
                         (PoolConfig::cuda)"
                            .into(),
                    ));
                }
                Ok(StateMem::Paged(buf))
            }
            None => Ok(StateMem::Device(dev.alloc_zeros::<T>(len)?)),
        }
    }

    fn from_host(dev: &CudaDevice, pool: Option<&Pool>, values: &[T]) -> Result<Self> {
        match pool {
            Some(_) => {
                let mut m = Self::zeros(dev, pool, values.len())?;
                if let StateMem::Paged(buf) = &mut m {
                    buf.as_mut_slice()?.copy_from_slice(values);
                }
                Ok(m)
            }
            None => Ok(StateMem::Device(
                dev.cuda_stream().clone_htod(values).map_err(cuda_err)?,
            )),
        }
    }

    fn to_host(&self, dev: &CudaDevice) -> Result<Vec<T>> {
        match self {
            StateMem::Device(s) => Ok(dev.cuda_stream().clone_dtoh(s).map_err(cuda_err)?),
            StateMem::Paged(buf) => Ok(buf.as_slice()?.to_vec()),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            StateMem::Device(s) => s.len() * std::mem::size_of::<T>(),
            StateMem::Paged(buf) => buf.capacity_bytes(),
        }
    }

    fn prefetch(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if let StateMem::Paged(buf) = self {
            buf.prefetch_to_device(&Stream::Cuda(Arc::clone(stream)))?;
        }
        Ok(())
    }
}

/// Run `f` with a launcher-ready view of a state tensor.
macro_rules! with_mem {
    ($mem:expr, $len:expr, |$v:ident| $body:expr) => {
        match $mem {
            StateMem::Device($v) => $body,
            StateMem::Paged(buf) => {
                let bytes = buf
                    .unified_mut()
                    .ok_or_else(|| Error::Optimizer("paged state outside a CUDA pool".into()))?;
                let mut managed = Managed::new(bytes, $len)?;
                let $v = &mut managed;
                $body
            }
        }
    };
}

enum DevTensors {
    Blockwise8bit {
        state1: StateMem<u8>,
        state2: StateMem<u8>,
        absmax1: CudaSlice<f32>,
        absmax2: CudaSlice<f32>,
    },
    Full32bit {
        state1: StateMem<f32>,
        state2: StateMem<f32>,
    },
}

/// The state of one variable on the device.
struct DevState {
    step: u32,
    numel: usize,
    tensors: DevTensors,
}

/// Device-resident AdamW states for the variables of one optimizer (all on one CUDA device).
pub(crate) struct CudaAdam {
    device: CudaDevice,
    kernels: Arc<qlora_cuda::Device>,
    signed: CudaSlice<f32>,
    unsigned: CudaSlice<f32>,
    /// The CUDA pool of a paged optimizer.
    pool: Option<Pool>,
    states: Vec<Option<DevState>>,
}

impl std::fmt::Debug for CudaAdam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaAdam")
            .field("device", &self.device)
            .field("paged", &self.pool.is_some())
            .field("state_bytes", &self.state_bytes())
            .finish()
    }
}

impl CudaAdam {
    /// States for `count` variables on `device`; `pool` (a CUDA pool) for a paged optimizer.
    pub(crate) fn new(device: &CudaDevice, count: usize, pool: Option<Pool>) -> Result<Self> {
        let kernels = kernels(device)?;
        let stream = device.cuda_stream();
        Ok(CudaAdam {
            device: device.clone(),
            kernels,
            signed: stream
                .clone_htod(DynamicMap::signed().values())
                .map_err(cuda_err)?,
            unsigned: stream
                .clone_htod(DynamicMap::unsigned().values())
                .map_err(cuda_err)?,
            pool,
            states: (0..count).map(|_| None).collect(),
        })
    }

    /// Bytes of all states (device memory plus paged blocks).
    pub(crate) fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .flatten()
            .map(|s| match &s.tensors {
                DevTensors::Blockwise8bit {
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                } => state1.bytes() + state2.bytes() + 4 * (absmax1.len() + absmax2.len()),
                DevTensors::Full32bit { state1, state2 } => state1.bytes() + state2.bytes(),
            })
            .sum()
    }

    /// The pool a state of `numel` elements is carved from (paged optimizers page only states of
    /// at least `PAGED_MIN_NUMEL` elements, as bitsandbytes).
    fn pool_for(&self, numel: usize) -> Option<&Pool> {
        self.pool.as_ref().filter(|_| numel >= PAGED_MIN_NUMEL)
    }

    fn fresh(&self, kind: StateKind, numel: usize) -> Result<DevState> {
        let pool = self.pool_for(numel);
        let dev = &self.device;
        let tensors = match kind {
            StateKind::Blockwise8bit => {
                let nb = numel.div_ceil(qlora_optim::OPTIMIZER_BLOCKSIZE);
                DevTensors::Blockwise8bit {
                    state1: StateMem::zeros(dev, pool, numel)?,
                    state2: StateMem::zeros(dev, pool, numel)?,
                    absmax1: dev.alloc_zeros::<f32>(nb)?,
                    absmax2: dev.alloc_zeros::<f32>(nb)?,
                }
            }
            StateKind::Full32bit => DevTensors::Full32bit {
                state1: StateMem::zeros(dev, pool, numel)?,
                state2: StateMem::zeros(dev, pool, numel)?,
            },
        };
        Ok(DevState {
            step: 0,
            numel,
            tensors,
        })
    }

    /// One AdamW update of variable `i` (`param` updated in place by `grad`, same dtype and
    /// shape, both on this device), with the group's hyper-parameters `hyper`; the state is
    /// created (kind `kind`) on first use. The step count advances only when the launch was
    /// enqueued.
    pub(crate) fn step(
        &mut self,
        i: usize,
        kind: StateKind,
        param: &Tensor,
        grad: &Tensor,
        hyper: &qlora_optim::GroupHyper,
    ) -> Result<()> {
        let numel = param.elem_count();
        if self.states.get(i).is_none() {
            return Err(Error::Optimizer(format!("no variable {i}")));
        }
        if self.states[i].is_none() {
            self.states[i] = Some(self.fresh(kind, numel)?);
        }
        let stream = self.device.cuda_stream();
        let state = self.states[i].as_mut().expect("created above");
        if state.numel != numel {
            return Err(Error::Optimizer(format!(
                "variable {i} has {numel} elements, its state {}",
                state.numel
            )));
        }
        let step = state
            .step
            .checked_add(1)
            .ok_or_else(|| Error::Optimizer(format!("step counter of variable {i} overflows")))?;
        let params = AdamParams {
            lr: hyper.lr as f32,
            beta1: hyper.betas.0 as f32,
            beta2: hyper.betas.1 as f32,
            eps: hyper.eps as f32,
            weight_decay: hyper.weight_decay as f32,
            step,
            gnorm_scale: 1.0,
            skip_zeros: false,
        };
        match &mut state.tensors {
            DevTensors::Blockwise8bit { state1, state2, .. } => {
                state1.prefetch(&stream)?;
                state2.prefetch(&stream)?;
            }
            DevTensors::Full32bit { state1, state2 } => {
                state1.prefetch(&stream)?;
                state2.prefetch(&stream)?;
            }
        }
        let op = CudaStepOp {
            state: RefCell::new(state),
            kernels: &self.kernels,
            signed: &self.signed,
            unsigned: &self.unsigned,
            params,
        };
        param.inplace_op2(grad, &op)?;
        op.state.into_inner().step = step;
        Ok(())
    }

    /// The states as safetensors entries under bitsandbytes' names (`{i}.state1`, …), exactly
    /// what `qlora-optim` writes for the same states.
    pub(crate) fn to_tensors(&self) -> Result<Vec<(String, TensorData)>> {
        let dev = &self.device;
        let mut out = Vec::new();
        for (i, s) in self.states.iter().enumerate() {
            let Some(s) = s else { continue };
            let n = s.numel;
            let p = format!("{i}.");
            match &s.tensors {
                DevTensors::Blockwise8bit {
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                } => {
                    let stream = dev.cuda_stream();
                    let a1 = stream.clone_dtoh(absmax1).map_err(cuda_err)?;
                    let a2 = stream.clone_dtoh(absmax2).map_err(cuda_err)?;
                    out.push((
                        format!("{p}state1"),
                        TensorData::u8(vec![n], &state1.to_host(dev)?),
                    ));
                    out.push((
                        format!("{p}state2"),
                        TensorData::u8(vec![n], &state2.to_host(dev)?),
                    ));
                    out.push((format!("{p}absmax1"), TensorData::f32(vec![a1.len()], &a1)));
                    out.push((format!("{p}absmax2"), TensorData::f32(vec![a2.len()], &a2)));
                    out.push((
                        format!("{p}qmap1"),
                        TensorData::f32(vec![256], DynamicMap::signed().values()),
                    ));
                    out.push((
                        format!("{p}qmap2"),
                        TensorData::f32(vec![256], DynamicMap::unsigned().values()),
                    ));
                }
                DevTensors::Full32bit { state1, state2 } => {
                    out.push((
                        format!("{p}state1"),
                        TensorData::f32(vec![n], &state1.to_host(dev)?),
                    ));
                    out.push((
                        format!("{p}state2"),
                        TensorData::f32(vec![n], &state2.to_host(dev)?),
                    ));
                }
            }
            out.push((
                format!("{p}step"),
                TensorData {
                    dtype: safetensors::Dtype::I64,
                    shape: vec![],
                    data: (s.step as i64).to_le_bytes().to_vec(),
                },
            ));
        }
        Ok(out)
    }

    /// Upload `loaded[i]` (host states read and checked by `qlora-optim`) for every variable,
    /// without touching the current states; [`commit`](Self::commit) puts them in place.
    pub(crate) fn stage(
        &self,
        loaded: &[Option<&ParamState<qlora_optim::HostStorage>>],
    ) -> Result<Staged> {
        if loaded.len() != self.states.len() {
            return Err(Error::Optimizer(format!(
                "{} states for {} variables",
                loaded.len(),
                self.states.len()
            )));
        }
        let dev = &self.device;
        let stream = dev.cuda_stream();
        let mut states = Vec::with_capacity(loaded.len());
        for s in loaded {
            let Some(s) = s else {
                states.push(None);
                continue;
            };
            let pool = self.pool_for(s.numel());
            let tensors = match s.tensors() {
                StateTensors::Blockwise8bit {
                    state1,
                    state2,
                    absmax1,
                    absmax2,
                } => DevTensors::Blockwise8bit {
                    state1: StateMem::from_host(dev, pool, state1)?,
                    state2: StateMem::from_host(dev, pool, state2)?,
                    absmax1: stream.clone_htod(absmax1).map_err(cuda_err)?,
                    absmax2: stream.clone_htod(absmax2).map_err(cuda_err)?,
                },
                StateTensors::Full32bit { state1, state2 } => DevTensors::Full32bit {
                    state1: StateMem::from_host(dev, pool, state1)?,
                    state2: StateMem::from_host(dev, pool, state2)?,
                },
            };
            states.push(Some(DevState {
                step: s.step(),
                numel: s.numel(),
                tensors,
            }));
        }
        Ok(Staged(states))
    }

    /// Replace every state by the staged ones.
    pub(crate) fn commit(&mut self, staged: Staged) {
        self.states = staged.0;
    }
}

/// Device states uploaded by [`CudaAdam::stage`], not yet in use.
pub(crate) struct Staged(Vec<Option<DevState>>);

/// The in-place update of one variable on the device.
struct CudaStepOp<'a> {
    state: RefCell<&'a mut DevState>,
    kernels: &'a qlora_cuda::Device,
    signed: &'a CudaSlice<f32>,
    unsigned: &'a CudaSlice<f32>,
    params: AdamParams,
}

impl CudaStepOp<'_> {
    fn run<T: GpuFloat>(
        &self,
        s1: &mut CudaStorage,
        (p0, p1): (usize, usize),
        s2: &CudaStorage,
        (g0, g1): (usize, usize),
    ) -> Result<()> {
        let outside = || Error::Optimizer("parameter or gradient view outside its storage".into());
        let g_all = s2.as_cuda_slice::<T>()?;
        let g = g_all.try_slice(g0..g1).ok_or_else(outside)?;
        let p_all = s1.as_cuda_slice_mut::<T>()?;
        let mut p = p_all.try_slice_mut(p0..p1).ok_or_else(outside)?;
        let mut state = self.state.borrow_mut();
        let n = state.numel;
        let maps = DynamicMaps {
            signed: self.signed,
            unsigned: self.unsigned,
        };
        match &mut state.tensors {
            DevTensors::Blockwise8bit {
                state1,
                state2,
                absmax1,
                absmax2,
            } => with_mem!(state1, n, |v1| with_mem!(state2, n, |v2| {
                self.kernels.adam8bit_step(
                    &mut p,
                    &g,
                    Adam8bitState {
                        state1: v1,
                        state2: v2,
                        absmax1,
                        absmax2,
                    },
                    maps,
                    &self.params,
                )?
            })),
            DevTensors::Full32bit { state1, state2 } => {
                with_mem!(state1, n, |v1| with_mem!(state2, n, |v2| {
                    self.kernels
                        .adam32bit_step(&mut p, &g, v1, v2, &self.params)?
                }))
            }
        }
        Ok(())
    }
}

impl InplaceOp2 for CudaStepOp<'_> {
    fn name(&self) -> &'static str {
        "qlora-cuda-adamw-step"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Err(Error::Optimizer("a CUDA optimizer state got a CPU variable".into()).into())
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let contiguous = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::from(Error::Optimizer(format!("{what} is not contiguous")))
            })
        };
        let p = contiguous(l1, "parameter")?;
        let g = contiguous(l2, "gradient")?;
        if s1.dtype() != s2.dtype() {
            return Err(Error::Optimizer(format!(
                "gradient dtype {:?} differs from the parameter's {:?}",
                s2.dtype(),
                s1.dtype()
            ))
            .into());
        }
        let r = match s1.dtype() {
            DType::F32 => self.run::<f32>(s1, p, s2, g),
            DType::BF16 => self.run::<half::bf16>(s1, p, s2, g),
            DType::F16 => self.run::<half::f16>(s1, p, s2, g),
            other => Err(Error::Optimizer(format!(
                "parameter dtype {other:?} is not f32, bf16 or f16"
            ))),
        };
        r.map_err(Into::into)
    }
}
