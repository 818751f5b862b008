//! [`Linear4bit`]: a frozen NF4/FP4 weight (bitsandbytes' layout, with or without double
//! quantization) as a candle [`Module`], and the custom op that multiplies by it.

use crate::error::{check_device, check_float, Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use qlora_codec::{QuantizeOptions, QuantizedTensor};
use qlora_lora::BaseWeight;
use std::sync::Arc;

/// A frozen 4-bit linear layer: `Y = X·deq(W)ᵀ + b`, `W: [out, in]` stored as NF4/FP4 codes
/// (4.127 bits per weight with double quantization, blocks of 64).
///
/// The forward pass is a candle custom op: on CPU, `qlora-lora`'s tiled product (2 MiB of f32
/// dequantized at a time, never the whole weight; for at most 4 tokens the codec's fused 4-bit
/// matrix–vector kernel, no tile at all). Its backward gives the input gradient `dX = G·deq(W)`
/// by the same tiles; the weight itself is frozen and gets no gradient. Inputs of any leading
/// shape `[…, in]` in f32, bf16 or f16 are computed in f32 and returned in their own dtype.
///
/// **On a CUDA device** (feature `cuda`, [`to_device`](Self::to_device)) the codes and scales
/// live on the device once, and the op runs in the input's dtype (f32, bf16 or f16) on candle's
/// stream: for at most 4 tokens `qlora-cuda`'s fused 4-bit GEMV (no tile); otherwise a run of
/// weight rows (at most 2²⁵ elements, 64 MiB in bf16) is dequantized by `qlora-cuda`'s kernel
/// into a scratch tile of the input's dtype and multiplied by cuBLAS (`cublasGemmEx`, f32
/// accumulation), tile after tile. The input gradient `G·deq(W)` accumulates the tiles'
/// products in f32 and is rounded to the input's dtype once.
///
/// Cloning is cheap: the codes are shared.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qlora_candle::Linear4bit;
/// use qlora_codec::QuantizeOptions;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let w = Tensor::randn(0f32, 0.05, (32, 128), &Device::Cpu)?;
/// let layer = Linear4bit::from_tensor(&w, None, QuantizeOptions::qlora())?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 128), &Device::Cpu)?;
/// let y = layer.forward(&x)?;
/// assert_eq!(y.dims(), &[2, 3, 32]);
/// // Exactly what dequantize-then-matmul gives, up to f32 summation order.
/// let want = x.broadcast_matmul(&layer.dequantize()?.t()?)?;
/// let diff = (y - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Linear4bit {
    base: Arc<BaseWeight>,
    bias: Option<Tensor>,
    device: Device,
    /// The codes and scales on the CUDA device (`device`), uploaded once.
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<crate::cuda::CudaWeight>>,
}

impl Linear4bit {
    /// Wrap a 4-bit `[out, in]` weight and an optional bias `[out]` (any float dtype; kept as
    /// f32 on the CPU).
    pub fn new(weight: QuantizedTensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.shape().len() != 2 {
            return Err(Error::Shape {
                what: "4-bit weight (must be 2-D [out, in])".into(),
                expected: vec![0, 0],
                found: weight.shape().to_vec(),
            });
        }
        let base = BaseWeight::quantized(weight)?;
        let bias = bias
            .map(|b| prepare_bias(&b, base.out_features()))
            .transpose()?;
        Ok(Linear4bit {
            base: Arc::new(base),
            bias,
            device: Device::Cpu,
            #[cfg(feature = "cuda")]
            cuda: None,
        })
    }

    /// The same layer on `device`: on a CUDA device (feature `cuda`) the codes and scales are
    /// uploaded once (4.127 bits per weight with NF4, block 64, double quant; nothing is
    /// dequantized) and the bias moved; the forward then runs there, in the input's dtype
    /// (see [`Linear4bit`]'s CUDA notes). `Device::Cpu` gives a CPU layer again. A host copy
    /// of the codes stays with the layer ([`weight`](Self::weight), merges).
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use qlora_candle::Linear4bit;
    /// use qlora_codec::QuantizeOptions;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The first GPU when there is one (and this build has the `cuda` feature), else the CPU.
    /// let dev = Device::new_cuda(0).unwrap_or(Device::Cpu);
    /// let w = Tensor::randn(0f32, 0.05, (64, 256), &Device::Cpu)?;
    /// let layer = Linear4bit::from_tensor(&w, None, QuantizeOptions::qlora())?.to_device(&dev)?;
    /// let x = Tensor::randn(0f32, 1.0, (8, 256), &dev)?;
    /// let y = layer.forward(&x)?;
    /// assert!(y.device().same_device(&dev));
    /// // The same numbers as the CPU layer, up to summation order.
    /// let cpu = layer.to_device(&Device::Cpu)?;
    /// let diff = (y.to_device(&Device::Cpu)? - cpu.forward(&x.to_device(&Device::Cpu)?)?)?
    ///     .abs()?
    ///     .max_all()?
    ///     .to_scalar::<f32>()?;
    /// assert!(diff < 1e-4);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Device`] for a Metal device, or a CUDA device in a build without the `cuda`
    /// feature; [`Error::Cuda`] if the upload or the kernels' loading fails.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if device.same_device(&self.device) {
            return Ok(self.clone());
        }
        let bias = self.bias.as_ref().map(|b| b.to_device(device)).transpose();
        match device {
            Device::Cpu => Ok(Linear4bit {
                base: Arc::clone(&self.base),
                bias: bias?,
                device: Device::Cpu,
                #[cfg(feature = "cuda")]
                cuda: None,
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let w = crate::cuda::CudaWeight::upload(self.weight(), dev)?;
                Ok(Linear4bit {
                    base: Arc::clone(&self.base),
                    bias: bias?,
                    device: device.clone(),
                    cuda: Some(Arc::new(w)),
                })
            }
            other => Err(Error::Device {
                what: "Linear4bit::to_device".into(),
                expected: if cfg!(feature = "cuda") {
                    "cpu or cuda".into()
                } else {
                    "cpu (this build has no `cuda` feature)".into()
                },
                found: crate::error::device_name(other),
            }),
        }
    }

    /// Quantize a dense `[out, in]` weight (f32, bf16 or f16, on the CPU) with our codec
    /// (bit-exact to bitsandbytes' `quantize_4bit`); `QuantizeOptions::qlora()` is QLoRA's NF4,
    /// block 64, double quant. The dequantized values keep the weight's dtype, as in
    /// bitsandbytes.
    pub fn from_tensor(
        weight: &Tensor,
        bias: Option<Tensor>,
        options: QuantizeOptions,
    ) -> Result<Self> {
        check_float("weight", weight.dtype())?;
        check_device("weight", weight, &Device::Cpu)?;
        let shape = weight.dims().to_vec();
        if shape.len() != 2 {
            return Err(Error::Shape {
                what: "weight (must be 2-D [out, in])".into(),
                expected: vec![0, 0],
                found: shape,
            });
        }
        let flat = weight.flatten_all()?;
        let q = match weight.dtype() {
            DType::BF16 => {
                QuantizedTensor::quantize(&flat.to_vec1::<half::bf16>()?, &shape, options)?
            }
            DType::F16 => {
                QuantizedTensor::quantize(&flat.to_vec1::<half::f16>()?, &shape, options)?
            }
            _ => QuantizedTensor::quantize(&flat.to_vec1::<f32>()?, &shape, options)?,
        };
        Self::new(q, bias)
    }

    /// Load `<module>.weight` (a bitsandbytes 4-bit weight group, quant state checked strictly)
    /// and `<module>.bias` when the file has one, from a transformers/bitsandbytes checkpoint
    /// opened with `qlora-checkpoint`. Nothing is dequantized.
    ///
    /// ```
    /// use qlora_candle::Linear4bit;
    /// use qlora_checkpoint::MappedFile;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let path = concat!(
    ///     env!("CARGO_MANIFEST_DIR"),
    ///     "/../../testdata/checkpoints/tiny-llama-nf4-dq/model.safetensors"
    /// );
    /// let file = MappedFile::open(path)?;
    /// let layer = Linear4bit::from_checkpoint(&file.checkpoint()?, "model.layers.0.mlp.down_proj")?;
    /// assert_eq!((layer.out_features(), layer.in_features()), (64, 176));
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_checkpoint(
        checkpoint: &qlora_checkpoint::Checkpoint<'_>,
        module: &str,
    ) -> Result<Self> {
        let weight = checkpoint.quantized(&format!("{module}.weight"))?;
        let bias_name = format!("{module}.bias");
        let has_bias = checkpoint.entries().iter().any(|e| e.name() == bias_name);
        let bias = if has_bias {
            let values = checkpoint.dense_as::<f32>(&bias_name)?;
            let n = values.len();
            Some(Tensor::from_vec(values, n, &Device::Cpu)?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// The 4-bit weight.
    pub fn weight(&self) -> &QuantizedTensor {
        match self.base.as_ref() {
            BaseWeight::Quantized(q) => q,
            // `new` only ever builds the quantized variant.
            BaseWeight::Dense { .. } => unreachable!("Linear4bit holds a 4-bit weight"),
        }
    }

    /// The bias (f32, `[out]`).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.base.in_features()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.base.out_features()
    }

    /// Bits per weight held (codes plus absmax; 4.127 for NF4, block 64, double quant).
    pub fn bits_per_weight(&self) -> f64 {
        self.weight().bits_per_param()
    }

    /// The device the weight lives on (see [`to_device`](Self::to_device)).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of the weight on its device: codes and scales, for a CUDA layer (the tile of the
    /// forward pass is allocated per call); 0 for a CPU layer, whose codes are host memory.
    pub fn device_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(w) = &self.cuda {
            return w.device_bytes();
        }
        0
    }

    /// The whole dequantized weight `[out, in]` as an f32 tensor (values rounded to the weight's
    /// dtype, as bitsandbytes' `dequantize_4bit` returns them). Materializes the matrix: for
    /// tests, merges and inspection, never needed by `forward`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let w = self.base.to_f32()?;
        Ok(
            Tensor::from_vec(w, (self.out_features(), self.in_features()), &Device::Cpu)?
                .to_device(&self.device)?,
        )
    }

    pub(crate) fn base(&self) -> &Arc<BaseWeight> {
        &self.base
    }

    /// `X·deq(W)ᵀ` without the bias, for any `[…, in]` input; the caller checked nothing.
    pub(crate) fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(w) = &self.cuda {
            return cuda_matmul(w, &self.base, &self.device, xs);
        }
        base_matmul(&self.base, &self.device, xs)
    }

    /// Whether the weight lives on a CUDA device (where products run in the input's dtype).
    pub(crate) fn is_cuda(&self) -> bool {
        self.device.is_cuda()
    }
}

impl Module for Linear4bit {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.matmul(xs)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// Check a bias against `[out]` and keep it as f32 on the CPU (a CUDA bias is copied to the
/// host: [`Linear4bit::to_device`] moves the layer).
pub(crate) fn prepare_bias(b: &Tensor, out_features: usize) -> Result<Tensor> {
    check_float("bias", b.dtype())?;
    let b = b.to_device(&Device::Cpu)?;
    if b.dims() != [out_features] {
        return Err(Error::Shape {
            what: "bias".into(),
            expected: vec![out_features],
            found: b.dims().to_vec(),
        });
    }
    Ok(b.to_dtype(DType::F32)?)
}

/// `X·Wᵀ` through [`BaseMatmul`], for `xs: […, in]` in f32/bf16/f16 on `device`: flattened to
/// `[n, in]`, computed in f32, reshaped to `[…, out]` and returned in the input's dtype.
pub(crate) fn base_matmul(base: &Arc<BaseWeight>, device: &Device, xs: &Tensor) -> Result<Tensor> {
    let (n, out_dims) = check_input(base.in_features(), base.out_features(), device, xs)?;
    let in_f = base.in_features();
    let x2 = xs.to_dtype(DType::F32)?.reshape((n, in_f))?.contiguous()?;
    let y = x2.apply_op1(BaseMatmul {
        base: Arc::clone(base),
        transposed: false,
    })?;
    Ok(y.reshape(out_dims)?.to_dtype(xs.dtype())?)
}

/// `X·Wᵀ` on the CUDA device of `w` (the upload of `base`), in the input's dtype (f32, bf16 or
/// f16): no f32 copy of the input, the tile dequantized to the input's dtype.
#[cfg(feature = "cuda")]
fn cuda_matmul(
    w: &Arc<crate::cuda::CudaWeight>,
    base: &BaseWeight,
    device: &Device,
    xs: &Tensor,
) -> Result<Tensor> {
    let in_f = base.in_features();
    let (n, out_dims) = check_input(in_f, base.out_features(), device, xs)?;
    let x2 = xs.reshape((n, in_f))?.contiguous()?;
    let y = x2.apply_op1(crate::cuda::CudaMatmul {
        weight: Arc::clone(w),
        transposed: false,
    })?;
    Ok(y.reshape(out_dims)?)
}

/// Checks `xs: […, in]` (float dtype, on `device`) and gives the row count and output dims.
fn check_input(
    in_f: usize,
    out_f: usize,
    device: &Device,
    xs: &Tensor,
) -> Result<(usize, Vec<usize>)> {
    check_float("input", xs.dtype())?;
    check_device("input", xs, device)?;
    let dims = xs.dims();
    if dims.is_empty() || dims[dims.len() - 1] != in_f {
        let mut expected = dims.to_vec();
        match expected.last_mut() {
            Some(last) => *last = in_f,
            None => expected.push(in_f),
        }
        return Err(Error::Shape {
            what: "input (last dimension must be in_features)".into(),
            expected,
            found: dims.to_vec(),
        });
    }
    let n = xs.elem_count() / in_f.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("checked non-empty above") = out_f;
    Ok((n, out_dims))
}

/// The candle custom op `Y = X·Wᵀ` (or, transposed, `dX = G·W`) over a frozen base weight,
/// `X: [n, in]` f32. Each op's backward is the other one (both are linear in their input), so
/// gradients of any order flow to the input; the weight gets none.
/// `(n, rows_out)` of a base product's 2-D input `dims`: `X·Wᵀ` takes
/// `[n, in_features]`, the transposed `G·W` takes `[n, out_features]`. A shape error naming `op`
/// otherwise.
pub(crate) fn matmul_dims(
    op: &str,
    dims: &[usize],
    transposed: bool,
    in_features: usize,
    out_features: usize,
) -> candle_core::Result<(usize, usize)> {
    let (rows_in, rows_out) = if transposed {
        (out_features, in_features)
    } else {
        (in_features, out_features)
    };
    let &[n, k] = dims else {
        return Err(Error::Shape {
            what: format!("{op} input (must be 2-D)"),
            expected: vec![0, rows_in],
            found: dims.to_vec(),
        }
        .into());
    };
    if k != rows_in {
        return Err(Error::Shape {
            what: format!("{op} input"),
            expected: vec![n, rows_in],
            found: vec![n, k],
        }
        .into());
    }
    Ok((n, rows_out))
}

#[derive(Debug, Clone)]
pub(crate) struct BaseMatmul {
    pub(crate) base: Arc<BaseWeight>,
    /// `false`: `X·Wᵀ` (`[n, in] → [n, out]`); `true`: `G·W` (`[n, out] → [n, in]`).
    pub(crate) transposed: bool,
}

impl CustomOp1 for BaseMatmul {
    fn name(&self) -> &'static str {
        if self.transposed {
            "qlora-base-g-w"
        } else {
            "qlora-base-x-wt"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, rows_out) = matmul_dims(
            self.name(),
            layout.dims(),
            self.transposed,
            self.base.in_features(),
            self.base.out_features(),
        )?;
        let CpuStorage::F32(data) = storage else {
            return Err(Error::Dtype {
                what: format!("{} input", self.name()),
                expected: "f32".into(),
                found: storage.dtype(),
            }
            .into());
        };
        let contiguous;
        let x: &[f32] = match layout.contiguous_offsets() {
            Some((start, end)) => &data[start..end],
            None => {
                // A strided view (e.g. a transposed tensor): gather it once.
                contiguous = gather_f32(data, layout);
                &contiguous
            }
        };
        let mut y = vec![0.0f32; n * rows_out];
        let result = if self.transposed {
            self.base.matmul_g_w(x, n, &mut y)
        } else {
            self.base.matmul_x_wt(x, n, &mut y)
        };
        result.map_err(|e| candle_core::Error::from(Error::from(e)))?;
        Ok((CpuStorage::F32(y), Shape::from((n, rows_out))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let other = BaseMatmul {
            base: Arc::clone(&self.base),
            transposed: !self.transposed,
        };
        Ok(Some(grad_res.to_dtype(DType::F32)?.apply_op1(other)?))
    }
}

/// The elements of a strided 2-D f32 view `[n, k]` in row-major order.
fn gather_f32(data: &[f32], layout: &Layout) -> Vec<f32> {
    let (dims, stride, start) = (layout.dims(), layout.stride(), layout.start_offset());
    let mut out = Vec::with_capacity(dims[0] * dims[1]);
    for i in 0..dims[0] {
        for j in 0..dims[1] {
            out.push(data[start + i * stride[0] + j * stride[1]]);
        }
    }
    out
}
