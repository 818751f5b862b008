//! The owning quantized tensor type.

use crate::{
    check_blocksize, check_len, dequantize_into, dequantize_range_into, num_blocks, packed_len,
    quantize_double_into, quantize_into, AbsmaxView, Dtype, Element, Error, QuantType,
    NESTED_BLOCKSIZE,
};
use qlora_double_quant::DoubleQuantAbsmax;

/// How to quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per absmax block: 32, 64, …, 4096.
    pub blocksize: usize,
    /// Quantize the absmax values again to 8 bits (QLoRA's double quantization).
    pub double_quant: bool,
}

impl QuantizeOptions {
    /// The QLoRA recipe: NF4, block 64, double quantization (4.127 bits per parameter).
    pub const fn qlora() -> Self {
        QuantizeOptions {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

impl QuantizeOptions {
    /// The same options with another block size.
    pub const fn with_blocksize(mut self, blocksize: usize) -> Self {
        self.blocksize = blocksize;
        self
    }
}

impl Default for QuantizeOptions {
    /// [`QuantizeOptions::qlora`].
    fn default() -> Self {
        Self::qlora()
    }
}

/// Per-block absmax storage of a [`QuantizedTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`weight.absmax` as float32).
    F32(Vec<f32>),
    /// Double-quantized (`weight.absmax` as uint8 plus the nested tensors).
    Double(DoubleQuantAbsmax),
}

impl Absmax {
    /// A borrowed view.
    pub fn view(&self) -> AbsmaxView<'_> {
        match self {
            Absmax::F32(a) => AbsmaxView::F32(a),
            Absmax::Double(d) => AbsmaxView::Double {
                codes: &d.codes,
                nested_absmax: &d.nested_absmax,
                offset: d.offset,
            },
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of storage (codes, nested scales and offset for double quant).
    pub fn nbytes(&self) -> usize {
        match self {
            Absmax::F32(a) => 4 * a.len(),
            Absmax::Double(d) => d.nbytes(),
        }
    }

    /// Every absmax value as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::F32(a) => a.clone(),
            Absmax::Double(d) => d.decompress(),
        }
    }
}

/// A 4-bit quantized tensor: packed codes, per-block absmax, and what is needed to restore it
/// (shape, original dtype, block size, quant type).
///
/// Memory: `ceil(n/2)` bytes of codes plus `4·ceil(n/b)` bytes of absmax, or with double
/// quantization `ceil(n/b) + 4·ceil(n/(256 b)) + 4` — see [`bits_per_param`](Self::bits_per_param).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    quant_type: QuantType,
    blocksize: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    packed: Vec<u8>,
    absmax: Absmax,
}

fn numel_of(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl QuantizedTensor {
    /// Quantize `data` (row-major, `shape`) with the given options.
    ///
    /// With double quantization the offset is the correctly rounded mean of the absmax values
    /// ([`qlora_double_quant::absmax_mean`]); bitsandbytes uses torch's f32 mean, which on a GPU
    /// can differ by an ulp. To reproduce a given file byte for byte, pass its offset to
    /// [`quantize_with_dq_offset`](Self::quantize_with_dq_offset).
    pub fn quantize<T: Element>(
        data: &[T],
        shape: &[usize],
        options: QuantizeOptions,
    ) -> Result<Self, Error> {
        Self::quantize_with_dq_offset(data, shape, options, None)
    }

    /// [`quantize`](Self::quantize) with an explicit double-quantization offset (`None`: the
    /// mean). The offset is used only when `options.double_quant` is set.
    ///
    /// ```
    /// use qlora_codec::{Absmax, QuantizeOptions, QuantizedTensor};
    ///
    /// let w: Vec<f32> = (0..4096).map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0).collect();
    /// let q = QuantizedTensor::quantize_with_dq_offset(&w, &[64, 64], QuantizeOptions::qlora(), Some(0.1))?;
    /// let Absmax::Double(dq) = q.absmax() else { unreachable!() };
    /// assert_eq!(dq.offset, 0.1);
    /// # Ok::<(), qlora_codec::Error>(())
    /// ```
    pub fn quantize_with_dq_offset<T: Element>(
        data: &[T],
        shape: &[usize],
        options: QuantizeOptions,
        dq_offset: Option<f32>,
    ) -> Result<Self, Error> {
        check_blocksize(options.blocksize)?;
        let numel = numel_of(shape).unwrap_or(usize::MAX);
        if numel != data.len() {
            return Err(Error::Shape {
                shape: shape.to_vec(),
                numel,
                found: data.len(),
            });
        }
        let mut packed = vec![0u8; packed_len(data.len())];
        let blocks = num_blocks(data.len(), options.blocksize);
        let mut absmax = vec![0f32; blocks];
        let (qt, bs) = (options.quant_type, options.blocksize);
        let absmax = match (options.double_quant, dq_offset) {
            (false, _) => {
                quantize_into(qt, data, bs, &mut packed, &mut absmax)?;
                Absmax::F32(absmax)
            }
            (true, Some(offset)) => {
                quantize_into(qt, data, bs, &mut packed, &mut absmax)?;
                Absmax::Double(DoubleQuantAbsmax::compress_with_offset(&absmax, offset))
            }
            (true, None) => {
                let mut codes = vec![0u8; blocks];
                let mut nested_absmax = vec![0f32; blocks.div_ceil(NESTED_BLOCKSIZE)];
                let offset = quantize_double_into(
                    qt,
                    data,
                    bs,
                    &mut packed,
                    &mut absmax,
                    &mut codes,
                    &mut nested_absmax,
                )?;
                Absmax::Double(DoubleQuantAbsmax {
                    codes,
                    nested_absmax,
                    offset,
                })
            }
        };
        Ok(QuantizedTensor {
            quant_type: options.quant_type,
            blocksize: options.blocksize,
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            packed,
            absmax,
        })
    }

    /// Assemble a tensor from stored parts (e.g. read from a checkpoint), checking that every
    /// length fits the shape and block size.
    pub fn from_parts(
        quant_type: QuantType,
        blocksize: usize,
        dtype: Dtype,
        shape: Vec<usize>,
        packed: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Self, Error> {
        check_blocksize(blocksize)?;
        let numel = numel_of(&shape).ok_or_else(|| Error::Shape {
            shape: shape.clone(),
            numel: usize::MAX,
            found: packed.len().saturating_mul(2),
        })?;
        check_len("packed", packed_len(numel), packed.len())?;
        absmax.view().validate(num_blocks(numel, blocksize))?;
        Ok(QuantizedTensor {
            quant_type,
            blocksize,
            dtype,
            shape,
            packed,
            absmax,
        })
    }

    /// NF4 or FP4.
    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    /// Elements per block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The dtype of the original tensor (what dequantization restores by default).
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Packed codes, two per byte, element 2k in the high nibble of byte k.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The per-block absmax.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// True when the absmax is double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double(_))
    }

    /// Split into (packed codes, absmax).
    pub fn into_parts(self) -> (Vec<u8>, Absmax) {
        (self.packed, self.absmax)
    }

    /// Bytes of tensor data (codes + absmax storage).
    pub fn nbytes(&self) -> usize {
        self.packed.len() + self.absmax.nbytes()
    }

    /// Bits per parameter of the stored data: 4.5 at block 64 without, 4.127 with double quant
    /// (exactly `8·nbytes/n`, including per-tensor constants such as the offset).
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.nbytes() as f64 / self.numel().max(1) as f64
    }

    /// Dequantize into a caller-provided buffer of `numel()` elements.
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<(), Error> {
        check_len("output", self.numel(), out.len())?;
        dequantize_into(
            self.quant_type,
            &self.packed,
            self.absmax.view(),
            self.blocksize,
            out,
        )
    }

    /// Dequantize to a new vector of `T`.
    pub fn dequantize<T: Element>(&self) -> Result<Vec<T>, Error> {
        let mut out = vec![T::from_f32(0.0); self.numel()];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Dequantize the flat elements `start .. start + out.len()` (e.g. rows `r0..r1` of a matrix
    /// are `r0·cols .. r1·cols`).
    pub fn dequantize_range_into<T: Element>(
        &self,
        start: usize,
        out: &mut [T],
    ) -> Result<(), Error> {
        dequantize_range_into(
            self.quant_type,
            &self.packed,
            self.absmax.view(),
            self.blocksize,
            self.numel(),
            start,
            out,
        )
    }
}
